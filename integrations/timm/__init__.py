"""timm adapter: timm's module types, slimmable timm models, and the fixed layers of each architecture.

Importing it registers ``s_mobilenetv1_100``, ``us_mobilenetv1_100``, ``s_mobilenetv2_100``, ``us_mobilenetv2_100``,
``s_resnet50`` and ``us_resnet50`` with ``timm.create_model`` (widths as in the papers: MobileNet v1 and ResNet-50
0.25-1.0x, MobileNet v2 0.35-1.0x). Any other timm CNN converts with :func:`create_slim_model` or ``slim.convert``.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import timm
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from timm.layers import Linear as TimmLinear
from timm.layers.padding import pad_same
from timm.models import register_model
from torch import nn

import slim_plugins as slim
from slim_plugins.nn import SlimBatchNorm2d, SlimConv2d, SlimLinear
from slim_plugins.nn.norm import load_bn
from slim_plugins.registry import (register, register_forward_cache, register_fx_autowrap, register_fx_leaf,
                                   register_layout_fn, register_passthrough)
from slim_plugins.width import WidthSpec

__all__ = ["SlimBatchNormAct2d", "SlimConv2dSame", "create_slim_model", "spec_from_args", "fixed_layers",
           "apply_cifar_stem", "set_expansion_units", "PAPER_SWITCHES", "PAPER_RANGES"]

# Widths of the papers (Slimmable Networks Table 3, US-Nets Section 5.1).
PAPER_SWITCHES = {"mobilenetv1_100": [0.25, 0.5, 0.75, 1.0], "mobilenetv2_100": [0.35, 0.5, 0.75, 1.0],
                  "resnet50": [0.25, 0.5, 0.75, 1.0]}
PAPER_RANGES = {"mobilenetv1_100": (0.25, 1.0), "mobilenetv2_100": (0.35, 1.0), "resnet50": (0.25, 1.0)}


@register(BatchNormAct2d)
class SlimBatchNormAct2d(SlimBatchNorm2d):
    """Width-switchable timm ``BatchNormAct2d`` (BN, then timm's drop and act modules, kept as they are)."""

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))

    def to_plain(self, g, a) -> nn.Module:
        w, b, mean, var = self.plain_state(g, a)
        p = BatchNormAct2d(g.c, eps=self.eps, momentum=self.momentum, affine=self.affine,
                           track_running_stats=self.track_running_stats, act_layer=nn.Identity,
                           device=self._dev(), dtype=self._dtype())
        p.drop, p.act = copy.deepcopy(self.drop), copy.deepcopy(self.act)
        load_bn(p, w, b, mean, var)
        return p


@register(Conv2dSame)
class SlimConv2dSame(SlimConv2d):
    """Width-switchable timm ``Conv2dSame`` (TF "SAME" padding computed from the input size)."""

    def forward(self, x):
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return super().forward(x)

    def to_plain(self, geo, a=None) -> nn.Module:
        w, b = self.plain_weights(geo)
        p = Conv2dSame(geo.in_c, geo.out_c, self.kernel_size, self.stride, 0, self.dilation, geo.groups,
                       b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            p.weight.copy_(w)
            if b is not None:
                p.bias.copy_(b)
        return p


@register(TimmLinear)
class SlimTimmLinear(SlimLinear):
    """Width-switchable timm ``Linear`` (MobileNetV3 / EfficientNet heads); exports as timm's ``Linear``."""

    def to_plain(self, geo, a=None) -> nn.Module:
        w, b = self.plain_weights(geo)
        p = TimmLinear(geo.in_c, geo.out_c, b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            p.weight.copy_(w)
            if b is not None:
                p.bias.copy_(b)
        return p


def _register_fx_notrace() -> None:
    """timm's own list of modules and functions torch.fx cannot trace (``timm.layers._fx``): the channel analysis
    treats such a module as one op (unless slim layers inside need to be seen) and records such a function as one
    call (e.g. ``pad_same``)."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # older timm: nothing registered, models that fx cannot trace fall back to the prefix rule
        return
    for t in timm_fx.get_notrace_modules():
        register_fx_leaf(t)
    for f in timm_fx.get_notrace_functions():
        if f.__name__ in _LAYOUT_FN_NAMES:
            register_layout_fn(f)
        else:
            register_fx_autowrap(f)


# timm's untraceable functions that act on tokens / pixels only (window and grid partitions of Swin, MaxViT, ...).
_LAYOUT_FN_NAMES = {"window_partition", "window_reverse", "grid_partition", "grid_reverse", "window_partition_nchw",
                    "window_reverse_nchw", "grid_partition_nchw", "grid_reverse_nchw",
                    # position embeddings interpolated over the token grid, each channel on its own
                    "resample_abs_pos_embed", "resample_abs_pos_embed_nhwc", "resample_pos_embed_grid"}


_register_fx_notrace()


def _register_rope() -> None:
    """timm's rotary position embeddings act on one head's dims (``dim`` = ``head_dim``, buffers of frequencies and
    positions), which attention slimmed by heads never changes (DESIGN rule 9): width-free. Not
    ``RotaryEmbeddingMixed``, whose learned frequencies are per head."""
    from timm.layers import pos_embed_sincos as pe

    for n in ("RotaryEmbedding", "RotaryEmbeddingCat", "RotaryEmbeddingDinoV3"):
        t = getattr(pe, n, None)
        if t is not None:
            register_passthrough(t)


_register_rope()
# LeViT / EfficientFormer / TinyViT attention: eval-mode cache of the indexed bias table (a pure cache; emptied
# before each forward once the table follows the width)
register_forward_cache("attention_bias_cache")


def fixed_layers(model: nn.Module) -> list[str]:
    """Layers that keep their channels besides the auto-fixed input/output layers.

    timm's MobileNetV2 keeps its 1280-channel head below 1.0x (``max(1280, round(1280 * m))``), as the official
    US-MobileNetV2 does, so ``conv_head`` is fixed for EfficientNet-family models with a 1280 head.
    """
    fixed = []
    head = getattr(model, "conv_head", None)
    if isinstance(head, nn.Conv2d) and head.out_channels == 1280:
        fixed.append("conv_head")
    return fixed


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Adapt an ImageNet timm CNN to 32x32 inputs: stride-1 stem (and a 3x3 stride-1 conv1, no max-pool, for
    ResNets), the usual CIFAR recipe."""
    if hasattr(model, "conv_stem"):  # EfficientNet family (MobileNet v1/v2/v3, EfficientNet)
        model.conv_stem.stride = (1, 1)
    elif hasattr(model, "conv1") and hasattr(model, "maxpool"):  # ResNet family
        old = model.conv1
        if isinstance(old, nn.Conv2d):
            model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=old.bias is not None)
        model.maxpool = nn.Identity()
    else:
        raise ValueError(f"don't know the stem of {type(model).__name__}; adapt it by hand")
    return model


def spec_from_args(widths: Sequence[float] | None = None, width_range: Sequence[float] | None = None,
                   divisor: int = 8, default_model: str | None = None, kind: str = "range") -> WidthSpec:
    """A :class:`WidthSpec` from config-style arguments (``widths:`` list or ``width_range: [lo, hi]``)."""
    if widths is not None and width_range is not None:
        raise slim.WidthError("give either widths (S-Net switches) or width_range (US-Net), not both")
    if widths is not None:
        return WidthSpec.switches(widths, divisor)
    if width_range is not None:
        lo, hi = width_range
        return WidthSpec.range(lo, hi, divisor)
    base = default_model or ""
    if kind == "switches":
        return WidthSpec.switches(PAPER_SWITCHES.get(base, [0.25, 0.5, 0.75, 1.0]), divisor)
    return WidthSpec.range(*PAPER_RANGES.get(base, (0.25, 1.0)), divisor=divisor)


def create_slim_model(model_name: str, widths: Sequence[float] | None = None,
                      width_range: Sequence[float] | None = None, divisor: int = 8, bn: str = "auto",
                      output_averaging: bool = False, cifar_stem: bool = False, fixed: Iterable[str] = (),
                      kind: str = "range", **timm_kwargs) -> nn.Module:
    """``timm.create_model(model_name, **timm_kwargs)`` converted to a slimmable model.

    Args:
        widths: S-Net switch list; width_range: US-Net ``[lo, hi]``; neither: the paper's range for the model.
        cifar_stem: stride-1 stem for 32x32 inputs (see :func:`apply_cifar_stem`).
        fixed: extra layers to keep fixed besides :func:`fixed_layers`.
    """
    spec = spec_from_args(widths, width_range, divisor, model_name, kind)
    model = timm.create_model(model_name, **timm_kwargs)
    if cifar_stem:
        apply_cifar_stem(model)
    model = slim.convert(model, spec, fixed=[*fixed_layers(model), *fixed], bn=bn, output_averaging=output_averaging,
                         example_input=example_input(model))
    set_units(model)
    return model


def set_units(model: nn.Module) -> None:
    """timm's channel rounding on a converted model: expansion convs (:func:`set_expansion_units`), Swin stage
    widths and MLP hidden widths (``transformers``), then the spec's widths planned again. Nothing for a spec
    above 1.0 (widened layers are sized per layer; units would outgrow them)."""
    if slim.width_spec(model).max > 1.0:
        return
    set_expansion_units(model)
    set_stage_units(model)
    set_mlp_units(model)
    slim.check_widths(model)  # the units changed the channel counts: plan the spec's widths again


def example_input(model: nn.Module) -> torch.Tensor | None:
    """An input for ``convert``'s analysis forward: ``(2, C, H, W)`` at the image size of a model with a fixed-size
    patch embedding (ViT, Swin, ...), else ``None`` (the default ``(2, C, 64, 64)``: any CNN with global pooling)."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None or getattr(pe, "dynamic_img_size", False) or not hasattr(pe, "proj"):
        return None
    p = next(model.parameters())
    return torch.zeros(2, pe.proj.in_channels, *size, device=p.device, dtype=p.dtype)


def set_expansion_units(model: nn.Module) -> None:
    """Round the expansion conv of each timm ``InvertedResidual`` in units of its expansion ratio.

    timm builds MobileNetV2 at multiplier ``m`` with ``mid = make_divisible(make_divisible(in * m) * 6)``, i.e. 6x
    the *rounded* input, as the official US-MobileNetV2 does; rounding ``mid * m`` directly gives other counts
    (e.g. 72 instead of 96 at 0.5x). With the unit the export at 0.35/0.5/0.75 loads into timm's
    ``mobilenetv2_035/050/075``. The SE ``conv_expand`` (gates the expanded channels) gets the same unit.
    """
    from timm.models._efficientnet_blocks import InvertedResidual

    for blk in model.modules():
        pw = getattr(blk, "conv_pw", None)
        if not isinstance(blk, InvertedResidual) or not isinstance(pw, SlimConv2d) or pw.fixed_out:
            continue
        cin = pw.weight.shape[1] * pw.groups
        unit = pw.base_out // cin
        if unit < 2 or unit * cin != pw.base_out:
            continue
        convs = [pw, getattr(getattr(blk, "se", None), "conv_expand", None)]
        for conv in convs:
            if isinstance(conv, SlimConv2d) and conv.base_out == pw.base_out and not conv.fixed_out:
                conv.channel_unit = unit
                conv._out_cache.clear()


def _entry(base: str, kind: str):
    def fn(pretrained: bool = False, widths=None, width_range=None, divisor: int = 8, bn: str = "auto",
           output_averaging: bool = False, cifar_stem: bool = False, **kwargs):
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        if kind == "switches" and widths is None and width_range is None:
            widths = PAPER_SWITCHES[base]
        return create_slim_model(base, widths=widths, width_range=width_range, divisor=divisor, bn=bn,
                                 output_averaging=output_averaging, cifar_stem=cifar_stem, kind=kind,
                                 pretrained=pretrained, **kwargs)

    prefix = "s" if kind == "switches" else "us"
    fn.__name__ = f"{prefix}_{base}"
    fn.__qualname__ = fn.__name__
    fn.__doc__ = (f"Slimmable timm ``{base}`` ({'S-Net, switches' if kind == 'switches' else 'US-Net, range'} "
                  f"{PAPER_SWITCHES[base] if kind == 'switches' else PAPER_RANGES[base]} by default).")
    return fn


for _base in PAPER_SWITCHES:
    for _kind in ("switches", "range"):
        _f = _entry(_base, _kind)
        globals()[_f.__name__] = register_model(_f)
        __all__.append(_f.__name__)

from . import shufflenet  # noqa: E402,F401  (registers shufflenet_v1_g3 and s_shufflenet_g3 with timm)
from .shufflenet import ShuffleNetV1, s_shufflenet_g3, shufflenet_v1_g3  # noqa: E402,F401

__all__ += ["ShuffleNetV1", "s_shufflenet_g3", "shufflenet_v1_g3"]
from . import layers  # noqa: E402,F401  (norm, std-conv, blur-pool and attention counterparts)
from .transformers import set_mlp_units, set_stage_units, stock_kwargs, us_convnext_atto, us_deit_tiny_patch16_224  # noqa: E402

__all__ += ["set_units", "set_mlp_units", "set_stage_units", "stock_kwargs", "us_convnext_atto", "us_deit_tiny_patch16_224"]
