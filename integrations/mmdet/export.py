"""Export one width of a slimmable detector as a plain mmdet config + checkpoint (DESIGN rule 6).

The result is what an individually trained detector of that width looks like: mmdet's own ``ResNet`` with
``base_channels`` / ``stem_channels`` of that width (a backbone scaled by ``widen_factor``: that factor x width),
a neck whose ``in_channels`` follow it, the shared heads, and the switch's (or the calibrated width's) BN
statistics. ``mmdet.apis.init_detector`` loads it with no slim_plugins import. The config is built and compared
with the exported model before anything is written; a width no config of the backbone / neck holds is refused.
"""
from __future__ import annotations

import copy
import inspect
import json
import os

import torch
from mmengine.config import Config, ConfigDict
from torch import nn

import slim_plugins as slim
from slim_plugins.checkpoint import atomic_write
from slim_plugins.errors import InvalidArgumentError

from .model import architecture_of, slim_settings

__all__ = ["export_detector", "plain_config"]

_OUR_IMPORT = "slim_plugins.integrations.mmdet"
# types of ours that an exported (plain) detector may still use: its config keeps our import for them
_OUR_PLAIN_TYPES = ("CocoKeypointDataset", "KeypointRCNN", "KeypointRoIHead",
                    "KeypointRCNNHead", "CocoKeypointMetric", "LoadKeypointAnnotations", "KeypointResize",
                    "KeypointRandomFlip", "PackKeypointDetInputs")
_OUR_HOOKS = ("PlainMessageHubHook", "ResumeRNGHook")
_STOCK_LOOPS = {"SlimEpochBasedTrainLoop": "EpochBasedTrainLoop", "SlimIterBasedTrainLoop": "IterBasedTrainLoop",
                "SlimValLoop": "ValLoop", "SlimTestLoop": "TestLoop"}


def _example_input(module: nn.Module, size: int | None = None) -> dict:
    """Keyword arguments of one ``mode='tensor'`` forward of a detector on a blank ``(1, 3, size, size)`` image
    (default: the smallest analysis size its backbone and neck run on, :func:`analysis_size`)."""
    from mmdet.structures import DetDataSample

    from .model import analysis_size

    p = next(module.parameters())
    if size is None:
        size = analysis_size(module.extract_feat, p.device, module)
    meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                batch_input_shape=(size, size), scale_factor=(1.0, 1.0))
    return {"inputs": torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype),
            "data_samples": [DetDataSample(metainfo=meta)], "mode": "tensor"}


def _resnet_channels(backbone: nn.Module, w: float) -> dict:
    """``stem_channels``, ``base_channels`` and the stage output channels of an exported (plain) ResNet.

    Raises:
        InvalidArgumentError: the width's channel counts are not those of an mmdet ResNet (stage ``i`` must have
            ``base * 2**i`` bottleneck channels): only widths whose ``64 * w`` is a multiple of the divisor export.
    """
    stem = backbone.conv1.out_channels
    layers = [getattr(backbone, n) for n in backbone.res_layers]
    base = layers[0][0].conv1.out_channels
    outs = []
    for i, layer in enumerate(layers):
        planes = base * 2 ** i
        for blk in layer:
            convs = [blk.conv1, blk.conv2] + ([blk.conv3] if hasattr(blk, "conv3") else [])
            mids = {c.out_channels for c in convs[:-1]}
            if mids != {planes} or convs[-1].out_channels != planes * blk.expansion:
                raise InvalidArgumentError(
                    f"width {w:g} cannot be written as an mmdet ResNet config: stage {i + 1} has "
                    f"{sorted(mids)}/{convs[-1].out_channels} channels, a ResNet with base_channels={base} has "
                    f"{planes}/{planes * blk.expansion}; export a width whose 64*w is a multiple of 8 "
                    "(0.25, 0.375, 0.5, ..., 1.0)")
        outs.append(layer[-1].conv3.out_channels if hasattr(layer[-1], "conv3") else layer[-1].conv2.out_channels)
    return {"stem_channels": stem, "base_channels": base, "stage_channels": outs}


def _unique_id_datasets(node, found: list) -> None:
    """Every ``CocoDatasetUniqueIds`` dataset dict in a config tree (wrappers such as ``RepeatDataset`` included)."""
    if isinstance(node, dict):
        if str(node.get("type", "")).split(".")[-1] == "CocoDatasetUniqueIds":
            found.append(node)
        for v in node.values():
            _unique_id_datasets(v, found)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _unique_id_datasets(v, found)


def _annotation_path(ds: dict) -> str:
    ann, root = str(ds.get("ann_file", "")), ds.get("data_root")
    return ann if os.path.isabs(ann) or not root else os.path.join(str(root), ann)


def _plain_datasets(cfg: Config, out_dir: str) -> dict:
    """Point the config's ``CocoDatasetUniqueIds`` datasets at mmdet's ``CocoDataset`` on a copy of their JSON with
    the repeated annotation ids renumbered, ``out_dir/<name>`` (absolute). Returns ``{file name: COCO JSON}`` to
    write there; the config is changed in place.

    Raises:
        InvalidArgumentError: an annotation file that cannot be read as JSON.
    """
    from .data import renumber_annotation_ids

    found: list = []
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        _unique_id_datasets(cfg.get(key), found)
    files: dict = {}
    names: dict = {}
    for ds in found:
        src = _annotation_path(ds)
        if src not in names:
            try:
                with open(src) as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise InvalidArgumentError(f"cannot read the annotation file {src!r} of a CocoDatasetUniqueIds "
                                           f"dataset to write a plain copy: {e}") from e
            renumber_annotation_ids(data)
            names[src] = f"annotations_{len(names)}_{os.path.basename(src)}"
            files[names[src]] = data
        ds["type"] = "CocoDataset"
        ds["ann_file"] = os.path.join(os.path.abspath(out_dir), names[src])
    return files


def _backbone_args(backbone: nn.Module, bb_cfg: dict, w: float) -> dict:
    """The backbone config arguments that build the exported (plain) ``backbone``: mmdet's ResNet
    ``stem_channels`` / ``base_channels`` (and its stage channels, for the record), or ``widen_factor`` x ``w`` for
    a backbone scaled by one (CSPNeXt of RTMDet, CSPDarknet of YOLOX, MobileNetV2); :func:`_check_buildable`
    checks the result.

    Raises:
        InvalidArgumentError: a backbone with neither (its channels have no config argument).
    """
    if hasattr(backbone, "res_layers"):
        return _resnet_channels(backbone, w)
    params = inspect.signature(type(backbone).__init__).parameters
    if "widen_factor" in params:
        return {"widen_factor": float(bb_cfg.get("widen_factor", params["widen_factor"].default)) * w}
    raise InvalidArgumentError(
        f"width {w:g}: the exported {type(backbone).__name__} has no config argument for its channels (mmdet's "
        "ResNet takes base_channels / stem_channels, CSPNeXt / CSPDarknet / MobileNetV2 a widen_factor); it cannot "
        "be written as a plain mmdet config. slim.export(detector, w) gives the plain model itself")


def _neck_in_channels(cfg_in, narrow: list, w: float):
    """The neck's ``in_channels`` at the width, in the config's order and type: the config lists the backbone's
    outputs (``narrow`` at the width, shallow to deep) in their order (an FPN), deepest first (YOLOv3's neck), or
    as one int for equal ones. (:func:`_check_buildable` then checks the whole config against the export.)

    Raises:
        InvalidArgumentError: a config entry list of another length or order.
    """
    if isinstance(cfg_in, int):
        if len(set(narrow)) == 1:
            return narrow[0]
    elif len(cfg_in) == len(narrow) and len(cfg_in) > 0:
        cfg_in = [int(c) for c in cfg_in]
        if cfg_in == sorted(cfg_in) or len(cfg_in) == 1:
            return narrow
        if cfg_in == sorted(cfg_in, reverse=True):
            return narrow[::-1]
    raise InvalidArgumentError(f"width {w:g}: the neck's in_channels {cfg_in} cannot be matched to the backbone's "
                               f"outputs ({narrow} channels at the width) in order or reversed")


def _check_buildable(new_cfg: Config, plain: nn.Module, w: float) -> None:
    """Build ``new_cfg.model`` with mmdet's registry and compare its state dict with ``plain``'s (names and
    shapes): the written config must give the exported detector, or nothing is written.

    Raises:
        InvalidArgumentError: a parameter of another shape (e.g. a ``widen_factor`` whose ``int(c * f)`` rounding
            differs from the width's ``make_divisible``), or a missing / unexpected key.
    """
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    try:
        with DefaultScope.overwrite_default_scope(new_cfg.get("default_scope", "mmdet")):
            ref = MODELS.build(copy.deepcopy(new_cfg.model))
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise InvalidArgumentError(f"width {w:g} cannot be written as a plain mmdet config: building it failed "
                                   f"({type(e).__name__}: {e})") from None
    want = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    bad = [f"{k}: {got.get(k)} in the config, {want.get(k)} exported" for k in sorted(set(want) | set(got))
           if want.get(k) != got.get(k)]
    if bad:
        parts: dict = {}
        for b in bad:
            parts[b.split(".")[0]] = parts.get(b.split(".")[0], 0) + 1
        hints = []
        if "backbone" in parts and "widen_factor" in new_cfg.model.backbone:
            hints.append("the backbone's widen_factor rounds int(c * factor): a slimmable config with divisor=1 "
                         "rounds the same way at widths where c * width is whole")
        if "neck" in parts and isinstance(new_cfg.model.get("neck"), dict):
            hints.append(f"the {new_cfg.model.neck.get('type')} neck builds its inner layers from in_channels, while "
                         "the slimmable detector keeps the neck's layers whole (fixed=['neck.*']), so no config of "
                         "that neck gives this export")
        raise InvalidArgumentError(
            f"width {w:g} cannot be written as a plain mmdet config: the config's detector differs from the export "
            f"at {len(bad)} tensors ({', '.join(f'{k}: {n}' for k, n in parts.items())}), e.g. {bad[:2]}"
            + ("; " + "; ".join(hints) if hints else "") + ". slim.export(detector, w) gives the plain model itself")


def plain_config(cfg: Config, channels: dict, out_indices=None, out_dir: str | None = None) -> tuple[Config, dict]:
    """``cfg`` with the slimmable parts replaced by mmdet's plain ones at the exported channel counts.

    ``channels``: the backbone arguments (``stem_channels`` / ``base_channels`` of a ResNet, or ``widen_factor``)
    and ``neck_in_channels`` (the neck's ``in_channels`` at the width, in the config's order and type); without it,
    ``stage_channels`` at ``out_indices`` (the earlier signature).

    Returns ``(config, files)``: ``files`` (``{name: COCO JSON}``) are the annotation copies the config names in
    ``out_dir``: a ``CocoDatasetUniqueIds`` dataset becomes mmdet's ``CocoDataset`` on its JSON with the repeated
    ids renumbered, so the exported config needs no import of this package (``out_dir=None``: left as is).
    """
    new = copy.deepcopy(cfg)
    files = _plain_datasets(new, out_dir) if out_dir is not None else {}
    new.model = ConfigDict(architecture_of(new.model))  # a SlimDetector's plain mmdet model
    bb = new.model.backbone
    for k in ("widths", "width_range", "num_widths"):
        bb.pop(k, None)
    if bb.get("type") in ("SlimResNet", "USResNet", "mmdet.SlimResNet", "mmdet.USResNet"):
        bb["type"] = "ResNet"
    for k in ("stem_channels", "base_channels", "widen_factor"):
        if k in channels:
            bb[k] = channels[k]
    bb["init_cfg"] = None
    neck_in = channels.get("neck_in_channels")
    if neck_in is None and "stage_channels" in channels and out_indices is not None:  # the earlier signature
        neck_in = [channels["stage_channels"][i] for i in out_indices]
    if new.model.get("neck") is not None and neck_in is not None:
        new.model.neck["in_channels"] = neck_in
    for k in ("slimmable", "runner_type"):
        new.pop(k, None)
    hooks = new.get("custom_hooks")
    if hooks:  # this package's training hooks (checkpoint format, resume RNG) are not part of a plain detector
        kept = [h for h in hooks if str(h.get("type", "")).split(".")[-1] not in _OUR_HOOKS]
        if kept:
            new.custom_hooks = kept
        else:
            new.pop("custom_hooks")
    ci = new.get("custom_imports")
    if ci and not any(f"'{t}'" in new.pretty_text for t in _OUR_PLAIN_TYPES):
        imports = [m for m in ci.get("imports", []) if m != _OUR_IMPORT and not m.startswith(_OUR_IMPORT + ".")]
        if imports:
            new.custom_imports = dict(ci, imports=imports)
        else:
            new.pop("custom_imports")
    for loop in ("train_cfg", "val_cfg", "test_cfg"):
        lc = new.get(loop)
        if isinstance(lc, dict) and lc.get("type") in _STOCK_LOOPS:
            lc["type"] = _STOCK_LOOPS[lc["type"]]
    new.load_from = None
    new.resume = False
    return new, files


def export_detector(model: nn.Module, cfg: Config, width: float, out_dir: str, dataset_meta: dict | None = None
                    ) -> dict:
    """Write ``out_dir/config.py`` and ``out_dir/model.pth``: the detector at ``width`` as a plain mmdet model.

    Args:
        model: a slimmable detector (DDP wrapper allowed) with statistics for ``width`` (a switch, or a US width
            after calibration).
        cfg: the config it was built from.
        dataset_meta: class names / palette stored in the checkpoint's meta for ``init_detector``.

    Returns:
        ``{"config": path, "checkpoint": path, "width": w, "channels": {...}}``. A ``CocoDatasetUniqueIds`` dataset
        of ``cfg`` becomes mmdet's ``CocoDataset`` on a renumbered copy of its JSON in ``out_dir``
        (:func:`plain_config`), so ``config.py`` is a plain mmdet config.

    Raises:
        WidthError: ``width`` not allowed. InvalidArgumentError: the width's channels are not those of any config
            of the backbone (mmdet's ResNet ``base_channels``, a ``widen_factor``; checked by building it).
        UncalibratedWidthError: a US width without BN statistics.
    Both files are written atomically; nothing is written when an error is raised.
    """
    module = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    w = slim_settings(module).spec.validate(width)
    example = _example_input(module)
    plain = slim.export(module, w, example_input=example)
    channels = _backbone_args(plain.backbone, architecture_of(cfg.model).get("backbone", {}), w)
    p = next(plain.parameters())
    size = example["inputs"].shape[-1]
    x = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
    neck_cfg = architecture_of(cfg.model).get("neck")
    if neck_cfg is not None:
        if not isinstance(neck_cfg, dict) or "in_channels" not in neck_cfg:
            raise InvalidArgumentError(f"width {w:g}: a neck config of {type(neck_cfg).__name__} "
                                       f"{str(neck_cfg)[:80]} has no in_channels to write (a list of necks, ...)")
        with torch.no_grad():  # what the neck reads: the backbone's outputs at w (the export's own backbone)
            narrow = [int(t.shape[1]) for t in plain.backbone(x)]
        channels["neck_in_channels"] = _neck_in_channels(neck_cfg["in_channels"], narrow, w)
    new_cfg, files = plain_config(cfg, channels, out_dir=out_dir)
    _check_buildable(new_cfg, plain, w)
    meta = {"dataset_meta": dataset_meta or getattr(module, "dataset_meta", None) or {},
            "slim_export": {"width": w, "spec": slim.width_spec(module).to_dict(), **channels}}
    # a new folder is written whole in a temporary sibling and renamed into place: a failed write leaves no folder
    fresh = not os.path.isdir(out_dir)
    target = out_dir
    if fresh:
        import tempfile

        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        target = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        ck_path, cfg_path = os.path.join(target, "model.pth"), os.path.join(target, "config.py")
        atomic_write(ck_path, lambda f: torch.save({"meta": meta, "state_dict": plain.state_dict()}, f))
        for name, data in files.items():
            atomic_write(os.path.join(target, name), lambda f, d=data: json.dump(d, f), "w")
        atomic_write(cfg_path, lambda f: f.write(new_cfg.pretty_text), "w")
        if fresh:
            os.replace(target, out_dir)
    finally:
        if fresh and os.path.isdir(target):
            import shutil

            shutil.rmtree(target, ignore_errors=True)
    return {"config": os.path.join(out_dir, "config.py"), "checkpoint": os.path.join(out_dir, "model.pth"),
            "width": w, "channels": channels}
