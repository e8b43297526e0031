"""BasicSR's own SR archs under ``SlimSRModel``: what the adapter needs to know about each, and nothing else.

* :func:`convert_kwargs`: what ``slim.convert`` needs besides the spec. The analysis input: SwinIR takes a
  different branch for an input of its ``img_size`` (the precomputed attention mask) than for any other size (a
  mask computed from the input's shape, with item assignment torch.fx cannot trace), so an arch with ``img_size``
  is traced at it; RRDBNet at scale 1 / 2 needs a 3-channel input where its first conv takes 12 / 48. The
  fixed layers: SwinIR's upsampler convs have ``num_feat = 64`` written in the arch, so they keep it at every width (else the export would not load into the stock arch).
* :func:`stock_network_g`: the ``network_g`` options of the stock arch at an exported width, read from the exported
  state dict's shapes (``num_feat`` of EDSR / RCAN / MSRResNet / SRVGGNetCompact / WDSR, ``num_feat`` and
  ``num_grow_ch`` of RRDBNet, ``embed_dim`` and per-stage ``num_heads`` of SwinIR), then checked: the stock arch
  built from them loads the exported weights with ``strict=True``, or the export is refused.

Coverage (``benchmarks/coverage_basicsr.py``, ``benchmarks/coverage_basicsr.csv``): EDSR, MSRResNet, RCAN,
RRDBNet, SRVGGNetCompact and SwinIR export exactly; ECBSR is refused by ``convert`` (its re-parameterised
blocks write into a tensor in place and convolve with raw parameters, which the channel analysis cannot follow).
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping

import torch

from slim_plugins.errors import CheckpointError

__all__ = ["FIXED", "WIDTH_KWARGS", "analysis_input", "base_width", "convert_kwargs", "stock_network_g"]


def _heads(sd: Mapping[str, torch.Tensor]) -> list[int]:
    """SwinIR's per-stage head count: the columns of each stage's first relative-position bias table."""
    heads, i = [], 0
    while f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table" in sd:
        heads.append(int(sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]))
        i += 1
    return heads


def _out(key: str) -> Callable[[Mapping[str, torch.Tensor]], int]:
    def read(sd):
        if key in sd:
            return int(sd[key].shape[0])
        v = sd.get(key.replace(".weight", ".parametrizations.weight.original1"))  # weight-normed (WDSR)
        if v is None:
            raise KeyError(key)
        return int(v.shape[0])
    return read


#: ``{arch: {kwarg: reader(state_dict)}}``: the width-dependent constructor arguments of each arch; the first is
#: the arch's body width (``n`` in file names and logs).
WIDTH_KWARGS: dict[str, dict[str, Callable]] = {
    "WDSR": {"num_feat": _out("head.weight")},
    "EDSR": {"num_feat": _out("conv_first.weight")},
    "MSRResNet": {"num_feat": _out("conv_first.weight")},
    "RCAN": {"num_feat": _out("conv_first.weight")},
    "RRDBNet": {"num_feat": _out("conv_first.weight"), "num_grow_ch": _out("body.0.rdb1.conv1.weight")},
    "SRVGGNetCompact_basicsr": {"num_feat": _out("body.0.weight")},  # BasicSR's registry name for it
    "SwinIR": {"embed_dim": _out("conv_first.weight"), "num_heads": _heads},
    "ECBSR": {"num_channel": _out("backbone.0.conv3x3.weight")},
}


def _arch(net_g: Mapping):
    import basicsr.archs  # noqa: F401  fills ARCH_REGISTRY
    from basicsr.utils.registry import ARCH_REGISTRY

    return ARCH_REGISTRY.get(net_g["type"])


def base_width(net_g: Mapping) -> tuple[str, int] | None:
    """``(kwarg, full value)`` of the arch's body width (``num_feat``, ``embed_dim``, ...): the options' value or
    the arch's default; ``None`` for an arch not in :data:`WIDTH_KWARGS` without ``num_feat``."""
    kwargs = WIDTH_KWARGS.get(net_g.get("type"))
    key = next(iter(kwargs)) if kwargs else "num_feat"
    if key in net_g:
        return key, int(net_g[key])
    try:
        default = inspect.signature(_arch(net_g)).parameters[key].default
    except (KeyError, TypeError, ValueError):
        return None
    return (key, int(default)) if isinstance(default, int) else None


def analysis_input(net_g: Mapping, device=None) -> tuple:
    """The example input of the channel analysis: ``(2, num_in_ch, s, s)`` with ``s`` the arch's ``img_size`` when
    it has one (SwinIR), else 64 (``convert``'s default size). Always given: ``convert``'s default input takes its
    channels from the first conv, which RRDBNet at scale 1 / 2 feeds with a pixel-unshuffled image (12 / 48)."""
    try:
        params = inspect.signature(_arch(net_g)).parameters
    except (KeyError, TypeError, ValueError):
        params = {}

    def opt(*keys, default=None):
        for k in keys:
            if k in net_g:
                return net_g[k]
            if k in params and params[k].default is not inspect.Parameter.empty:
                return params[k].default
        return default

    size = opt("img_size", default=64)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    c = opt("num_in_ch", "in_chans", default=3)
    return (torch.zeros(2, int(c), int(h), int(w), device=device),)


#: ``{arch: layer name patterns}``: layers whose output channels are a literal of the stock arch (SwinIR's
#: upsampler has ``num_feat = 64`` written in its ``__init__``), kept at their full width.
FIXED: dict[str, tuple[str, ...]] = {
    "SwinIR": ("conv_before_upsample.0", "upsample.*", "conv_up1", "conv_up2", "conv_hr"),
}


def convert_kwargs(net_g: Mapping, net: torch.nn.Module) -> dict:
    """The ``slim.convert`` arguments for the generator ``net`` built from ``net_g``: its analysis input
    (:func:`analysis_input`) and the layers of :data:`FIXED` it has."""
    import fnmatch

    p = next(net.parameters(), None)
    names = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    fixed = [pat for pat in FIXED.get(net_g.get("type"), ()) if any(fnmatch.fnmatchcase(n, pat) for n in names)]
    return {"example_input": analysis_input(net_g, p.device if p is not None else None), "fixed": fixed}


def stock_network_g(net_g: Mapping, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The ``network_g`` options of the stock arch that holds ``state_dict`` (an exported width), checked.

    Raises:
        CheckpointError: the arch's width arguments are not known here, or the stock arch built from them does not
            load ``state_dict`` with ``strict=True`` (the message names the keys / shapes that differ).
    """
    from basicsr.archs import build_network

    out = dict(net_g)
    readers = WIDTH_KWARGS.get(net_g["type"])
    if readers is None:
        if "num_feat" not in net_g:
            raise CheckpointError(f"export: the width arguments of arch {net_g['type']!r} are not known (known: "
                                  f"{sorted(WIDTH_KWARGS)}); the exported weights have no stock options")
        readers = {"num_feat": WIDTH_KWARGS["EDSR"]["num_feat"]}
    for k, read in readers.items():
        try:
            out[k] = read(state_dict)
        except KeyError as e:
            raise CheckpointError(f"export: {net_g['type']} state dict has no {e.args[0]!r} to read {k} from") from None
    try:
        build_network(dict(out)).load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"export: the stock {net_g['type']}({', '.join(f'{k}={out[k]!r}' for k in readers)}) "
                              f"does not load the exported weights strictly: {' '.join(str(e).split())[:500]}") from None
    return out
