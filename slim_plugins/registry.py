"""Adapter registry: which module types ``convert`` replaces, and by which width-switchable class.

The core registers ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``, ``nn.ConvTranspose2d``, ``nn.Linear``, the batch norms and
the other norms; an adapter registers the module types its framework adds (timm's ``BatchNormAct2d`` and ``Conv2dSame``, ...). Like
timm's model registry this is a registry of classes filled at import time, not run-time state.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

_CONVERTERS: dict[type, type] = {}
# Module types that carry parameters or buffers but never depend on channel width (left untouched by convert).
_PASSTHROUGH: set[type] = set()
# Module types torch.fx should not trace into (their forward is not traceable) and functions it should wrap.
_FX_LEAVES: set[type] = set()
_FX_AUTOWRAP: set = set()
# Functions (recorded as one fx call) that only move tokens / pixels: the channels keep their dim and values.
_LAYOUT_FNS: set = set()
_ADAPTERS_TRIED: set[str] = set()


def register(source_type: type, slim_type: type | None = None):
    """Register ``slim_type`` as the width-switchable counterpart of ``source_type``.

    ``slim_type`` must provide ``from_module(module, name, state, fixed_out)`` (classmethod) and
    ``to_plain(record)``. Usable as a decorator on the slim class::

        @register(timm.layers.BatchNormAct2d)
        class SlimBatchNormAct2d(SlimBatchNorm2d): ...
    """
    def deco(cls):
        _CONVERTERS[source_type] = cls
        return cls

    return deco(slim_type) if slim_type is not None else deco


def register_passthrough(source_type: type) -> None:
    """Declare a module type with parameters or buffers that is width-independent (e.g. a scalar gain)."""
    _PASSTHROUGH.add(source_type)


def register_fx_leaf(module_type: type) -> None:
    """Declare a module type that the channel analysis treats as one op (not traced into). It must keep the
    channel dim (``(N, C, ...)`` in and out), like a pooling layer whose forward fx cannot trace."""
    _FX_LEAVES.add(module_type)


def register_fx_autowrap(fn) -> None:
    """Declare a function that fx records as one call instead of tracing into it (e.g. timm's ``pad_same``)."""
    _FX_AUTOWRAP.add(fn)


def register_layout_fn(fn) -> None:
    """Declare a function that acts on tokens or pixels only, each channel on its own (Swin's ``window_partition``
    / ``window_reverse``, timm's ``resample_abs_pos_embed``): its channel dim keeps its size and stays first
    (``(N, C, ...)``) or last (``(..., C)``). It may return a tuple of that tensor and numbers (torchvision MViT's
    ``_unsqueeze``). It is also recorded as one fx call."""
    _LAYOUT_FNS.add(fn)
    _FX_AUTOWRAP.add(fn)


def layout_fns() -> frozenset:
    return frozenset(_LAYOUT_FNS)


_TILE_FNS: dict = {}


def register_tile_fn(fn, copies: int) -> None:
    """Declare a function whose result holds ``copies`` blocks of its input's channels on the last dim, block ``k``
    at ``[k*C, (k+1)*C)`` (torchvision Swin's ``_patch_merging_pad``: four 2x2 neighbours concatenated). It is
    also recorded as one fx call."""
    _TILE_FNS[fn] = int(copies)
    _FX_AUTOWRAP.add(fn)


def tile_fns() -> dict:
    return dict(_TILE_FNS)


_FORWARD_CACHES: set[str] = set()


def register_forward_cache(attr: str) -> None:
    """Declare a dict attribute name that modules use as a cache of tensors their forward computes from their
    parameters (timm's ``attention_bias_cache``). A module whose tied parameters follow the width gets it emptied
    before each forward; a dict the analysis forward fills that is not declared makes ``convert`` refuse the
    module (its cached tensors would not follow the width)."""
    _FORWARD_CACHES.add(attr)


def forward_caches() -> frozenset:
    return frozenset(_FORWARD_CACHES)


def fx_leaves() -> tuple:
    return tuple(_FX_LEAVES)


def fx_autowrap() -> tuple:
    return tuple(_FX_AUTOWRAP)


def lookup(module_type: type) -> type | None:
    """The slim class registered for ``module_type``, or for the nearest registered base class when the subclass
    keeps that base's ``forward`` (e.g. timm's ``LayerNorm2dNoBias(LayerNorm2d)``, which only drops the bias);
    a subclass with a forward of its own must be registered on its own."""
    if module_type not in _CONVERTERS:
        _ensure_adapter(module_type)
    hit = _CONVERTERS.get(module_type)
    if hit is not None:
        return hit
    for base in module_type.__mro__[1:]:
        if base in _CONVERTERS:
            return _CONVERTERS[base] if getattr(module_type, "forward", None) is getattr(base, "forward", None) \
                else None
    return None


def is_passthrough(module_type: type) -> bool:
    return module_type in _PASSTHROUGH


def is_slim(module: nn.Module) -> bool:
    return type(module) in set(_CONVERTERS.values()) or hasattr(module, "slim_name")


def _ensure_adapter(module_type: type) -> None:
    # A timm module type triggers `import slim_plugins.integrations.timm`, so convert() works on any timm model
    # without the user importing the adapter first.
    root = module_type.__module__.split(".")[0]
    if root in ("torch", "slim_plugins", "builtins") or root in _ADAPTERS_TRIED:
        return
    _ADAPTERS_TRIED.add(root)
    try:
        importlib.import_module(f"slim_plugins.integrations.{root}")
    except ModuleNotFoundError as e:
        if e.name not in (f"slim_plugins.integrations.{root}", "slim_plugins.integrations"):
            raise


def converters() -> dict[type, type]:
    """A copy of the registered ``{source type: slim type}`` table."""
    return dict(_CONVERTERS)


PlainFactory = Callable[..., nn.Module]
