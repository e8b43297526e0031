"""Which parts of an mmdet detector are slimmed, and the conversion itself.

Slimmable Networks Section 4.3 / Appendix B: the ResNet backbone is slimmable; the FPN's lateral convs read the
slimmed backbone outputs (their in-channels follow the width) while their outputs, the rest of the FPN, the RPN and
the RoI heads are shared and fixed, so every width has exactly the architecture and FLOPs of a detector built on a
ResNet of that width. BN statistics are frozen when the backbone has ``norm_eval=True`` (the paper fixes them after
ImageNet training).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping, Sequence

import torch
from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS
from mmengine.model import is_model_wrapper
from mmengine.registry import WEIGHT_INITIALIZERS
from torch import nn

import slim_plugins as slim
from slim_plugins.errors import InvalidArgumentError, NotSlimmableError, WidthSpecMismatchError
from slim_plugins.nn.layers import SlimMixin
from slim_plugins.width import WidthSpec, check_distill_weight, schedule_from_config, spec_from_config

__all__ = ["SlimSettings", "parse_slimmable", "make_slimmable", "init_slim_detector", "is_slimmable", "slim_settings", "SlimResNet",
           "USResNet", "SlimPretrainedInit", "DEFAULT_SCOPE", "SLIM_DETECTOR", "build_slim_detector", "architecture_of", "slimmable_entry",
           "set_slimmable_entry", "check_slimmable_entries"]

#: Converted parts of a detector: the backbone and the neck. Which neck layers follow the width comes from the
#: neck's graph: every layer reading a backbone output (an FPN's lateral convs, RetinaNet's extra conv on C5 with
#: ``add_extra_convs='on_input'``) takes the active channels of its input.
DEFAULT_SCOPE = ("backbone", "neck")
#: The neck's layers keep their output channels (the FPN's 256, shared by every width): from the neck on, every
#: width has the same tensors, so the heads are shared and fixed.
DEFAULT_FIXED = ("neck.*",)

_KEYS = ("widths", "width_range", "divisor", "num_widths", "rule", "distill", "distill_weight", "eval_widths",
         "calib_samples", "seed", "scope", "fixed")
_DISTILL = (None, "l1", "l2")


@dataclasses.dataclass(frozen=True)
class SlimSettings:
    """The ``slimmable`` config dict, checked.

    Attributes:
        spec: switches (S-Net, switchable BN) or a range (US-Net, post-statistics).
        num_widths: widths per iteration for a range (the sandwich rule's n; ignored by ``rule="all"``).
        rule: width sampling rule (``"all"`` for switches, ``"sandwich"`` for a range by default).
        distill: ``None`` (every width trained on the ground truth; the paper's detection setting) or ``"l1"`` /
            ``"l2"``: inplace distillation of the FPN outputs, the widest width's (detached) features as the target
            of the others, added to their detection loss with weight ``distill_weight``.
        eval_widths: widths the val/test loops evaluate (default: the switches, or min, 0.5, 0.75, max of a range).
        calib_samples: images for BN post-statistics of US widths before evaluation (US-Nets: 2,000).
        seed: width sampling seed (every DDP rank draws the same widths from ``(seed, iteration)``).
        scope / fixed: what is converted and which of its layers keep their output channels.
    """

    spec: WidthSpec
    num_widths: int = 4
    rule: str | None = None
    distill: str | None = None
    distill_weight: float = 1.0
    eval_widths: tuple = ()
    calib_samples: int = 2000
    seed: int = 0
    scope: tuple = DEFAULT_SCOPE
    fixed: tuple = DEFAULT_FIXED

    def to_dict(self) -> dict:
        d = {("widths" if self.spec.is_switches else "width_range"): list(self.spec.widths),
             "divisor": self.spec.divisor}
        d.update(num_widths=self.num_widths, rule=self.rule, distill=self.distill, distill_weight=self.distill_weight,
                 eval_widths=list(self.eval_widths), calib_samples=self.calib_samples, seed=self.seed,
                 scope=list(self.scope), fixed=list(self.fixed))
        return d


def parse_slimmable(cfg: Mapping[str, Any] | bool | None) -> SlimSettings:
    """Check a ``slimmable`` config entry and return its :class:`SlimSettings`.

    Accepted: ``True`` (the paper's S-Net switches ``[0.25, 0.5, 0.75, 1.0]``), ``dict(widths=[...])`` (S-Net) or
    ``dict(width_range=[lo, hi], num_widths=4)`` (US-Net), plus the optional keys of :class:`SlimSettings`.

    Raises:
        InvalidArgumentError: an unknown key, both or neither of ``widths`` / ``width_range``, a bad rule,
            distillation or number (each names the bad value and what is allowed).
        WidthError: a bad width list or range.
    """
    if cfg is True:
        cfg = {"widths": [0.25, 0.5, 0.75, 1.0]}
    spec = spec_from_config(cfg, divisor=8, allowed=_KEYS)
    rule, num_widths = schedule_from_config(cfg)
    distill = cfg.get("distill")
    if distill not in _DISTILL:
        raise InvalidArgumentError(f"distill must be one of {list(_DISTILL)} (feature distillation of the FPN "
                                   f"outputs), got {distill!r}")
    calib = cfg.get("calib_samples", 2000)
    if isinstance(calib, bool) or not isinstance(calib, int) or calib <= 0:
        raise InvalidArgumentError(f"calib_samples must be a positive integer, got {calib!r}")
    if "eval_widths" in cfg and cfg["eval_widths"] is not None:
        eval_widths = tuple(spec.validate(w) for w in cfg["eval_widths"])
    elif spec.is_switches:
        eval_widths = tuple(spec.widths)
    else:
        eval_widths = tuple(sorted({spec.min, spec.max, *[w for w in (0.5, 0.75) if spec.min < w < spec.max]}))
    weight = check_distill_weight(cfg.get("distill_weight", 1.0))
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgumentError(f"seed must be an integer >= 0, got {seed!r}")
    return SlimSettings(spec=spec, num_widths=num_widths, rule=rule, distill=distill, distill_weight=weight,
                        eval_widths=eval_widths, calib_samples=calib, seed=seed,
                        scope=tuple(cfg.get("scope", DEFAULT_SCOPE)), fixed=tuple(cfg.get("fixed", DEFAULT_FIXED)))


def is_slimmable(model: nn.Module) -> bool:
    """The detector (or a wrapper of it) has been converted."""
    return getattr(_unwrap(model), "slim_settings", None) is not None


def slim_settings(model: nn.Module) -> SlimSettings:
    """The :class:`SlimSettings` a detector was converted with.

    Raises:
        NotSlimmableError: the detector is not slimmable.
    """
    s = getattr(_unwrap(model), "slim_settings", None)
    if s is None:
        raise NotSlimmableError(f"{type(_unwrap(model)).__name__} is not slimmable: build it with "
                                "runner_type='SlimRunner' and a `slimmable` config entry (or a SlimResNet/USResNet "
                                "backbone), or call make_slimmable(model, slimmable)")
    return s


def _unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def _module(model):
    """The detector inside an mmengine model wrapper (DDP), or ``model`` itself."""
    return model.module if is_model_wrapper(model) else model


def make_slimmable(detector: nn.Module, slimmable: Mapping | SlimSettings | bool | None = None) -> nn.Module:
    """Convert an mmdet detector in place: backbone and FPN lateral inputs slimmable, heads shared and fixed.

    Args:
        detector: a built mmdet detector (``MODELS.build(cfg.model)``), before DDP wrapping.
        slimmable: the ``slimmable`` config entry (see :func:`parse_slimmable`); ``None`` takes the widths
            declared by a :class:`SlimResNet` / :class:`USResNet` backbone.

    Returns:
        the same detector, with ``detector.slim_settings`` set.

    Raises:
        InvalidArgumentError: neither a ``slimmable`` entry nor a slimmable backbone, or both with different
            widths. WidthError / NotExactError / UnknownLayerError: from :func:`slim_plugins.convert` (the
            detector is unchanged then).
    """
    declared = getattr(getattr(detector, "backbone", None), "slimmable", None)
    if isinstance(slimmable, SlimSettings):
        settings = slimmable
    elif slimmable is None or slimmable is False:
        if declared is None:
            raise InvalidArgumentError(
                "nothing to make slimmable: add `slimmable = dict(widths=[0.25, 0.5, 0.75, 1.0])` (or "
                "width_range=[0.25, 1.0]) to the config, or use a SlimResNet / USResNet backbone")
        settings = parse_slimmable(declared)
    else:
        settings = parse_slimmable(slimmable)
        if declared is not None and parse_slimmable(declared).spec != settings.spec:
            raise InvalidArgumentError(
                f"the backbone declares widths {parse_slimmable(declared).spec.to_dict()} but `slimmable` says "
                f"{settings.spec.to_dict()}; name the widths in one place")
    if is_slimmable(detector):
        raise InvalidArgumentError(f"{type(detector).__name__} is already slimmable")
    backbone = getattr(detector, "backbone", None)
    frozen = bool(getattr(backbone, "norm_eval", False))
    scope = [r for r in settings.scope if r != "neck" or getattr(detector, "neck", None) is not None]
    fixed = [p for p in settings.fixed if "neck" in scope or not p.startswith("neck")]
    # a SlimResNet refuses to run unconverted; its ResNet forward is what the neck sees
    fwd = super(_DeclaresWidths, backbone).forward if isinstance(backbone, _DeclaresWidths) else backbone
    neck = detector.neck if "neck" in scope else None
    feats: list = []

    def run(x):  # the backbone's outputs are what the neck is analysed on
        feats[:] = [tuple(fwd(x))]
        if neck is not None:
            neck(feats[0])

    size = analysis_size(run, _device(detector), detector)
    example = {"backbone": torch.zeros(2, 3, size, size, device=_device(detector))}
    if neck is not None:
        example["neck"] = (feats[0],)
    slim.convert(detector, settings.spec, scope=scope, fixed=fixed, example_input=example, frozen_bn=frozen)
    detector.slim_settings = settings
    return detector


#: Square input sizes tried for the analysis forward, smallest first: 64 gives a 2x2 map at stride 32; SSD's extra
#: layers (unpadded 3x3 convs after stride 64) need 320.
ANALYSIS_SIZES = (64, 128, 320, 512)


def analysis_size(run, device, module: nn.Module) -> int:
    """The smallest of :data:`ANALYSIS_SIZES` for which ``run(zeros(2, 3, s, s))`` (the backbone and neck) runs,
    in eval mode without autograd.

    Raises:
        ExampleInputError: none of them (the last error named).
    """
    from slim_plugins.errors import ExampleInputError

    was = module.training
    module.eval()
    err = None
    try:
        for s in ANALYSIS_SIZES:
            try:
                with torch.no_grad():
                    run(torch.zeros(2, 3, s, s, device=device))
                return s
            except (RuntimeError, ValueError, IndexError) as e:  # too small for a conv / pool / an anchor level
                err = e
    finally:
        module.train(was)
    raise ExampleInputError(f"the backbone and neck of {type(module).__name__} fail on every analysis input "
                            f"{[(s, s) for s in ANALYSIS_SIZES]}: {type(err).__name__}: {err}")


#: The model type of a detector that is slimmable from the moment it is built. Merged into a base config's model::
#:
#:     model = dict(type='SlimDetector', detector='FasterRCNN', slimmable=dict(widths=[0.25, 0.5, 0.75, 1.0]))
#:
#: the base model's keys (backbone, neck, heads, data_preprocessor, train_cfg, test_cfg) stay where mmdet's tools
#: look for them (``init_detector`` reads ``model.backbone``; an mmrazor-style ``architecture=`` nesting would hide
#: them).
SLIM_DETECTOR = "SlimDetector"


def architecture_of(model_cfg: Mapping) -> dict:
    """The plain mmdet model dict of a ``SlimDetector`` model config (``detector`` as the type, the other keys but
    ``slimmable``); any other model config as it is.

    Raises:
        InvalidArgumentError: a ``SlimDetector`` without ``detector``.
    """
    d = dict(model_cfg)
    if str(d.get("type", "")).split(".")[-1] != SLIM_DETECTOR:
        return d
    d.pop("type")
    d.pop("slimmable", None)
    det = d.pop("detector", None)
    if not isinstance(det, str) or not det:
        raise InvalidArgumentError(f"SlimDetector needs detector='<the mmdet model type, e.g. FasterRCNN>' (its "
                                   f"other keys are that detector's), got detector={det!r}")
    return dict(d, type=det)


@MODELS.register_module(name=SLIM_DETECTOR)
def build_slim_detector(slimmable: Mapping | bool = True, **model_cfg) -> nn.Module:
    """``MODELS.build(dict(type='SlimDetector', detector=..., slimmable=..., **detector keys))``: the mmdet
    detector, converted by :func:`make_slimmable` before anything else
    sees it (compare mmrazor's ``SlimmableNetwork``, a model type wrapping an architecture). It is the detector
    itself, not a wrapper: checkpoint keys are the detector's, so every path that builds from the config --
    ``init_detector``, ``DetInferencer``, ``tools/train.py``, ``tools/test.py``, ``get_flops.py``, ``slim`` -- gets
    the same slimmable model, and a checkpoint of one loads into the others.

    Raises:
        InvalidArgumentError / WidthError: a bad ``slimmable`` entry or model dict (before anything is built).
    """
    if slimmable in (None, False):
        raise InvalidArgumentError("SlimDetector needs slimmable=dict(widths=[...]) or dict(width_range=[lo, hi]) "
                                   "(or True for the paper's switches)")
    settings = parse_slimmable(slimmable)  # checked before the (slow) build
    arch = architecture_of(dict(model_cfg, type=SLIM_DETECTOR))
    det = make_slimmable(MODELS.build(arch), settings)
    # mmengine's stock train loops call model.train_step, which would train the widest width only; SlimRunner's
    # loops never call it (multi_width_train_step). Bound on this instance: the class stays mmdet's.
    det.train_step = types.MethodType(_stock_train_step, det)
    return det


def _stock_train_step(self, data, optim_wrapper):
    raise NotSlimmableError(
        f"this {type(self).__name__} is slimmable (model type SlimDetector, widths {slim_settings(self).spec}): "
        "mmengine's stock train loop would train its widest width only; add runner_type = 'SlimRunner' to the "
        "config (its loops train every width of an iteration with one optimizer step)")


def slimmable_entry(cfg) -> Mapping | bool | None:
    """The ``slimmable`` entry of an mmdet config: ``model.slimmable`` of a ``SlimDetector`` model, else the
    top-level ``slimmable`` key (the runner-only form), else a :class:`SlimResNet` / :class:`USResNet` backbone's
    widths; ``None`` when the config names none."""
    model = cfg.get("model") or {}
    if str(model.get("type", "")).split(".")[-1] == SLIM_DETECTOR:
        return model.get("slimmable", True)
    if cfg.get("slimmable") not in (None, False):
        return cfg.get("slimmable")
    bb = architecture_of(model).get("backbone") or {} if model else {}
    t = str(bb.get("type", "")).split(".")[-1]
    if t == "SlimResNet":
        return {"widths": list(bb.get("widths", (0.25, 0.5, 0.75, 1.0)))}
    if t == "USResNet":
        return {"width_range": list(bb.get("width_range", (0.25, 1.0))), "num_widths": int(bb.get("num_widths", 4))}
    return None


def check_slimmable_entries(cfg) -> "SlimSettings | None":
    """The settings of a config's ``slimmable`` entry (:func:`slimmable_entry`), checked before anything is built or
    written; ``None`` when it names none.

    Raises:
        InvalidArgumentError / WidthError: a bad entry, or a top-level ``slimmable`` naming other widths than the
            ``SlimDetector`` model's.
    """
    entry = slimmable_entry(cfg)
    if entry is None:
        return None
    settings = parse_slimmable(entry)
    top = cfg.get("slimmable")
    if top not in (None, False) and parse_slimmable(top).spec != settings.spec:
        raise InvalidArgumentError(f"the top-level slimmable {top} and the SlimDetector model's {entry} name "
                                   "different widths; name them in one place")
    return settings


def set_slimmable_entry(cfg, entry: Mapping) -> None:
    """Write ``entry`` where :func:`slimmable_entry` reads it (``model.slimmable`` of a ``SlimDetector``, else the
    top-level key)."""
    model = cfg.get("model") or {}
    if str(model.get("type", "")).split(".")[-1] == SLIM_DETECTOR:
        cfg.model.slimmable = dict(entry)
    else:
        cfg.slimmable = dict(entry)


def _device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _DeclaresWidths:
    """A ResNet that declares its detector's widths; the detector is converted as a whole by ``SlimRunner``
    (or :func:`make_slimmable`), because the FPN's lateral convs must follow the backbone's width."""

    slimmable: dict

    def forward(self, x):
        from torch.fx._symbolic_trace import is_fx_tracing

        if not is_fx_tracing() and not any(isinstance(m, SlimMixin) for m in self.modules()):
            raise NotSlimmableError(
                f"{type(self).__name__} declares widths {self.slimmable} but its detector was not converted: set "
                "runner_type = 'SlimRunner' in the config (tools/train.py, tools/test.py) or call "
                "slim_plugins.integrations.mmdet.make_slimmable(detector)")
        return super().forward(x)


@MODELS.register_module()
class SlimResNet(_DeclaresWidths, ResNet):
    """mmdet ``ResNet`` of a switchable detector (S-Net, switchable BN): ``widths`` are the switches; every other
    argument is ``ResNet``'s. Same effect as ``slimmable = dict(widths=...)`` in the config; needs
    ``runner_type = 'SlimRunner'``. Input ``(N, 3, H, W)``; outputs as ``ResNet`` with the active channels."""

    def __init__(self, widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0), **kwargs):
        super().__init__(**kwargs)
        self.slimmable = {"widths": list(widths)}


@MODELS.register_module()
class USResNet(_DeclaresWidths, ResNet):
    """mmdet ``ResNet`` of a universally slimmable detector (US-Net): any width in ``width_range``; every other
    argument is ``ResNet``'s. Same effect as ``slimmable = dict(width_range=...)``; needs
    ``runner_type = 'SlimRunner'``."""

    def __init__(self, width_range: Sequence[float] = (0.25, 1.0), num_widths: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.slimmable = {"width_range": list(width_range), "num_widths": int(num_widths)}


@WEIGHT_INITIALIZERS.register_module(name="SlimPretrained")
class SlimPretrainedInit:
    """``init_cfg=dict(type='SlimPretrained', checkpoint=PATH)``: initialise a slimmable backbone from a checkpoint
    written by ``slim train`` (timm ``s_resnet50`` / ``us_resnet50``), per-switch BN statistics included (the
    paper's ImageNet -> COCO pipeline). The classifier head (``fc``) is dropped; the width spec must match.

    Raises:
        WidthSpecMismatchError: the checkpoint was trained with other widths or another BN mode.
        CheckpointError: a tensor does not fit (another depth), or a backbone weight is missing.
    """

    def __init__(self, checkpoint: str, prefix: str | None = None, map_location: str = "cpu"):
        self.checkpoint, self.prefix, self.map_location = checkpoint, prefix, map_location

    def __call__(self, module: nn.Module) -> None:
        from mmengine.logging import print_log

        from slim_plugins.checkpoint import _check_loadable, read_checkpoint

        ck = read_checkpoint(self.checkpoint, self.map_location)
        state = slim.width_spec(module) if any(isinstance(m, SlimMixin) for m in module.modules()) else None
        saved = WidthSpec.from_dict(ck["width_spec"]) if ck.get("width_spec") else None
        if state is None:
            raise NotSlimmableError("SlimPretrained initialises a converted backbone; use it with SlimRunner")
        if saved != state:
            raise WidthSpecMismatchError(f"checkpoint {self.checkpoint!r} has widths {ck.get('width_spec')}, the "
                                         f"detector {state.to_dict()}; train the backbone with the same widths")
        sd = ck["model"]
        if self.prefix:
            p = self.prefix if self.prefix.endswith(".") else self.prefix + "."
            sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        own = module.state_dict()
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        dropped = sorted(k for k in sd if k not in own)
        sd = {k: v for k, v in sd.items() if k in own}
        _check_loadable(module, sd, strict=True)
        module.load_state_dict(sd, strict=True)
        print_log(f"SlimPretrained: loaded {len(sd)} tensors from {self.checkpoint} (dropped {len(dropped)} not in "
                  f"the backbone, e.g. {dropped[:3]})", logger="current")

    def __repr__(self):
        return f"SlimPretrained(checkpoint={self.checkpoint!r})"


def init_slim_detector(config, checkpoint: str | None = None, device: str = "cpu",
                       cfg_options: dict | None = None) -> nn.Module:
    """``mmdet.apis.init_detector`` for a slimmable config: the detector converted, the checkpoint (an mmengine
    checkpoint of a slimmable run) loaded with ``weights_only=True``, ``model.cfg`` and ``dataset_meta`` set, in
    eval mode. ``mmdet.apis.inference_detector(model, img)`` then runs it; wrap the call in ``slim.width(w)``.

    Raises:
        InvalidArgumentError: the config names no widths. WidthError: a bad ``slimmable`` entry.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    cfg = Config.fromfile(config) if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__") else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    model = MODELS.build(cfg.model)
    if not is_slimmable(model):  # the runner-only form (top-level `slimmable`) or a SlimResNet backbone
        make_slimmable(model, cfg.get("slimmable", None))
    if checkpoint is not None:
        ck = load_checkpoint(model, checkpoint, map_location="cpu")  # torch.load(weights_only=True)
        meta = ck.get("meta", {}) if isinstance(ck, dict) else {}
        if meta.get("dataset_meta"):
            model.dataset_meta = dict(meta["dataset_meta"])
    model.cfg = cfg
    return model.to(device).eval()
