"""Slimmable timm transformers and modern CNNs: how a width maps to the stock model's arguments, and registered
US entry points (``us_deit_tiny_patch16_224``, ``us_convnext_atto``).

Width axes (DESIGN rule 9; US-Nets Sec. 3 applied per layer as in DynaBERT / Flextron / MatFormer):

- **ViT / DeiT** (``VisionTransformer``): the token width ``C_w = make_divisible(C * w, head_dim)``, i.e. whole
  heads ``H_w = C_w / head_dim`` with ``head_dim`` fixed. The export at ``w`` is
  ``timm.create_model(name, embed_dim=C_w, num_heads=H_w)``.
- **ConvNeXt**: every stage width ``make_divisible(dims[i] * w, 8)``, the MLP 4x that (timm's fixed ratio); the
  export is ``timm.create_model(name, dims=(...))``.
- **Swin**: stage ``i``'s width ``2^i x make_divisible(C * w, head_dim)`` (whole heads of 32 everywhere), so the
  export is ``timm.create_model(name, embed_dim=C_w, num_heads=(...), mlp_ratio=4)``.

In all three the MLP hidden width is exactly the MLP ratio x the token width (``mlp_ratio`` keeps its stock value).

:func:`stock_kwargs` reads those arguments off an exported model.
"""
from __future__ import annotations

import math

from timm.layers import ConvMlp, Mlp
from timm.models import register_model
from torch import nn

from slim_plugins.nn.layers import SlimMixin


def set_mlp_units(model: nn.Module) -> None:
    """Round each timm ``Mlp``'s hidden width in units of its ratio to the input width, so the hidden width stays
    ``ratio x`` the rounded token width (ConvNeXt's stock ``mlp_ratio``; timm's own rule at any ``dims``)."""
    for m in model.modules():
        fc1 = getattr(m, "fc1", None)
        if not isinstance(m, (Mlp, ConvMlp)) or not isinstance(fc1, SlimMixin) or fc1.fixed_out or \
                getattr(fc1, "groups", 1) > 1:
            continue
        cin = fc1.weight.shape[1]
        unit = fc1.base_out // cin
        if unit >= 2 and unit * cin == fc1.base_out:
            fc1.channel_unit = unit
            fc2 = getattr(m, "fc2", None)  # decides the token width: the hidden width is `unit` x exactly that
            if isinstance(fc2, SlimMixin) and not fc2.fixed_out:
                fc1.channel_multiple = math.lcm(fc1.channel_multiple, unit * fc2.channel_multiple)
            fc1._out_cache.clear()


def set_stage_units(model: nn.Module) -> None:
    """Swin: round stage ``i``'s width in units of ``2^i x`` stage 0's (whole heads of 32 at every stage), so the
    stage widths stay ``embed_dim x 2^i`` at every width, as timm's ``SwinTransformer(embed_dim=...)`` builds them
    (``make_divisible(2^i a, 2^i d) = 2^i make_divisible(a, d)``)."""
    from timm.models.swin_transformer import SwinTransformer

    if not isinstance(model, SwinTransformer):
        return
    proj = model.patch_embed.proj
    m0 = proj.channel_multiple if isinstance(proj, SlimMixin) else 1  # whole heads of stage 0
    for i, stage in enumerate(model.layers):
        if i == 0:
            continue
        reduction = getattr(getattr(stage, "downsample", None), "reduction", None)
        deciders = [reduction, *(m.fc2 for m in stage.modules() if isinstance(m, (Mlp, ConvMlp)))]
        for d in deciders:  # the layers that decide stage i's token width
            if isinstance(d, SlimMixin) and not d.fixed_out:
                d.channel_multiple = math.lcm(d.channel_multiple, m0 * 2 ** i)
                d._out_cache.clear()


def _hidden(mlp) -> int:
    fc1 = mlp.fc1
    return fc1.out_features if isinstance(fc1, nn.Linear) else fc1.out_channels


def _ratio(hidden: int, dim: int) -> float:
    r = hidden / dim
    return r if int(dim * r) == hidden else (hidden + 0.5) / dim


def stock_kwargs(plain: nn.Module) -> dict:
    """``timm.create_model`` keyword arguments that build the stock model of an exported ViT / DeiT, ConvNeXt or
    Swin (strict state-dict load, equal outputs).

    Raises:
        TypeError: another model class.
    """
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(plain, VisionTransformer):
        blk = plain.blocks[0]
        c = blk.attn.qkv.in_features
        return {"embed_dim": c, "num_heads": blk.attn.num_heads, "mlp_ratio": _ratio(_hidden(blk.mlp), c)}
    if isinstance(plain, ConvNeXt):
        dims = tuple(s.blocks[0].conv_dw.out_channels for s in plain.stages)
        if any(_hidden(s.blocks[0].mlp) != 4 * d for s, d in zip(plain.stages, dims)):
            raise TypeError("this ConvNeXt's MLP widths are not 4x its stage widths (timm's ConvNeXt has no "
                            "mlp_ratio argument); convert it with create_slim_model, which keeps them 4x")
        return {"dims": dims}
    if isinstance(plain, SwinTransformer):
        stages = [s.blocks[0] for s in plain.layers]
        dims = [b.attn.qkv.in_features for b in stages]
        if any(d != dims[0] * 2 ** i for i, d in enumerate(dims)):
            raise TypeError(f"Swin stage widths {dims} are not embed_dim x 2^i (timm's SwinTransformer builds only "
                            "those); convert it with create_slim_model, which keeps them so")
        return {"embed_dim": dims[0], "num_heads": tuple(b.attn.num_heads for b in stages),
                "mlp_ratio": _ratio(_hidden(stages[0].mlp), dims[0])}
    raise TypeError(f"no stock arguments known for {type(plain).__name__}; supported: VisionTransformer, ConvNeXt, "
                    "SwinTransformer")


def _us_entry(base: str, doc: str, **defaults):
    def fn(pretrained: bool = False, width_range=(0.25, 1.0), widths=None, divisor: int = 8, **kwargs):
        from . import create_slim_model

        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kw = {**defaults, **kwargs}
        return create_slim_model(base, widths=widths, width_range=None if widths is not None else width_range,
                                 divisor=divisor, pretrained=pretrained, **kw)

    fn.__name__ = fn.__qualname__ = f"us_{base}"
    fn.__doc__ = doc
    return register_model(fn)


us_deit_tiny_patch16_224 = _us_entry(
    "deit_tiny_patch16_224",
    "US DeiT-tiny (widths 0.25-1.0 by default): 1-3 heads of 64 (token width 64/128/192), MLP 4x-ish; "
    "``img_size=32, patch_size=4`` for CIFAR-10.")
us_convnext_atto = _us_entry(
    "convnext_atto",
    "US ConvNeXt-atto (widths 0.25-1.0 by default): stage widths make_divisible(dims * w, 8), MLP 4x; "
    "``patch_size=2`` suits 32x32 inputs.")

US_ENTRIES = ("us_deit_tiny_patch16_224", "us_convnext_atto")

__all__ = ["stock_kwargs", "set_mlp_units", "set_stage_units", "us_deit_tiny_patch16_224", "us_convnext_atto"]
