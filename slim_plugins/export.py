"""Export a fixed-width plain model (DESIGN rule 6) and its ONNX graph."""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .context import find_state, width as width_ctx
from .convert import _WEIGHTED, default_input_shape, positional, slim_layers
from .errors import InvalidArgumentError
from .nn.layers import Geo, SlimMixin
from .nn.norm import BNGeo, SlimBatchNorm1d, SlimBatchNorm2d, SlimBatchNorm3d
from .nn.params import ParamHost, export_hosted


def default_example_input(model: nn.Module) -> torch.Tensor:
    """Zeros of the size ``convert`` analysed the model at (its ``example_input``, batch 1); for a model converted
    in parts, :func:`slim_plugins.convert.default_input_shape` of its first layer at batch 1."""
    p = next(model.parameters())
    shape = getattr(find_state(model), "example_shape", None)
    if shape is not None:
        return torch.zeros(shape, device=p.device, dtype=p.dtype)
    first = next(m for _, m in slim_layers(model) if isinstance(m, _WEIGHTED))
    return torch.zeros(default_input_shape(first, 1), device=p.device, dtype=p.dtype)


def channel_dim(mod) -> int:
    """The dim of a slim layer's input and output that holds its channels."""
    return -1 if isinstance(mod, nn.Linear) else getattr(mod, "channel_dim", 1)


def layer_geometry(mod, a, inp) -> Geo | BNGeo:
    """The geometry layer ``mod`` uses for input ``inp`` at configuration ``a``."""
    return mod.geometry(a, inp.shape[channel_dim(mod)])


@torch.no_grad()
def record_widths(model: nn.Module, w, example_input=None) -> dict:
    """Run one eval forward at width ``w`` and record each slim layer's active channels.

    Returns ``{layer: record}`` where a record holds ``geo`` (the layer's geometry), ``in``, ``out``, ``groups``
    and ``src`` (the layer whose output tensor this layer consumed directly, used for BN fusion).
    """
    a = find_state(model).resolve(w)
    x = default_example_input(model) if example_input is None else example_input
    recs: dict = {}
    produced: dict = {}  # id(output tensor) -> layer; outputs are kept alive in `keep` so ids stay unique
    keep = []
    uses = _OutsideUses(produced)

    def pre_hook(mod, args):
        uses.depth += 1

    def hook(mod, args, out):
        inp = args[0]
        if isinstance(out, tuple):  # (output, attention weights)
            out = out[0]
        geo = layer_geometry(mod, a, inp)
        d = channel_dim(mod)
        r = {"geo": geo, "in": inp.shape[d], "out": out.shape[d], "groups": getattr(geo, "groups", 1)}
        r["src"] = produced.get(id(inp))
        r["src_uses"] = 0
        recs.setdefault(mod, r)
        if r["src"] is not None:
            recs[r["src"]]["src_uses"] += 1
        produced[id(out)] = mod
        keep.append(out)
        uses.depth -= 1

    handles = [h for _, m in slim_layers(model)
               for h in (m.register_forward_pre_hook(pre_hook), m.register_forward_hook(hook))]
    was = model.training
    try:
        model.eval()
        with width_ctx(w), uses:
            model(**x) if isinstance(x, dict) else model(*positional(x))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    for mod, r in recs.items():
        r["outside_uses"] = uses.counts.get(mod, 0)
    return recs


# Ops that read only metadata, not values (a shape read must not block BN fusion).
_METADATA_OPS = {"__get__", "size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "type"}


class _OutsideUses(TorchFunctionMode):
    """Counts torch ops outside slim layers that read a slim layer's output (e.g. a pre-activation residual add of
    a conv output that also feeds a BN): folding that BN into the conv would change what those ops see."""

    def __init__(self, produced: dict):
        super().__init__()
        self.produced, self.depth, self.counts = produced, 0, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0 and getattr(func, "__name__", "") not in _METADATA_OPS:
            for t in tree_leaves((args, kwargs)):
                mod = self.produced.get(id(t)) if isinstance(t, torch.Tensor) else None
                if mod is not None:
                    self.counts[mod] = self.counts.get(mod, 0) + 1
        return func(*args, **kwargs)


@torch.no_grad()
def export(model: nn.Module, width, fuse_bn: bool = False, example_input=None) -> nn.Module:
    """A plain ``nn.Module`` at ``width``: the framework's own layer classes with sliced weights, no
    slim_plugins classes inside, the chosen BN statistics copied in.

    Args:
        model: a converted model.
        width: a width multiplier (or nonuniform dict) allowed by the model's spec.
        fuse_bn: fold each BN that directly follows a conv into the conv's weight and bias (Eq. 7 of US-Nets).
        example_input: an input the model accepts (default ``(1, C, 64, 64)``), a tuple of its positional inputs
            (as in :func:`slim_plugins.convert`) or a dict of keyword inputs; only its channels matter for fully
            convolutional nets; pass the real size for nets with a flatten->linear.

    Returns:
        the plain model in eval mode; its outputs equal ``model`` at ``width`` (<= 1e-5).

    Raises:
        WidthError: width not allowed. UncalibratedWidthError: no BN statistics for ``width``.
        InvalidArgumentError: ``fuse_bn`` not a bool.
    """
    state = find_state(model, adopt=True)
    if not isinstance(fuse_bn, bool):
        raise InvalidArgumentError(f"fuse_bn must be True or False, got {fuse_bn!r}")
    a = state.resolve(width)
    recs = record_widths(model, width, example_input)
    plain = copy.deepcopy(model)
    for m in plain.modules():  # the guards of replaced heads belong to the slimmable model
        for k in [k for k, h in m._forward_pre_hooks.items() if getattr(h, "slim_head_guard", False)]:
            del m._forward_pre_hooks[k]
    names = {id(m): n for n, m in slim_layers(model)}
    rec_by_name = {names[id(m)]: r for m, r in recs.items()}
    new_mods: dict[str, nn.Module] = {}
    for name, m in slim_layers(model):
        r = rec_by_name.get(name)
        geo = r["geo"] if r is not None else _unused_geo(m, a)  # never called: the width's count, full inputs
        new_mods[name] = m.to_plain(geo, a)
    if fuse_bn:
        for bn, r in recs.items():
            src = r["src"]
            if isinstance(bn, SlimBatchNorm2d) and isinstance(src, _conv_of(bn)) and recs[src]["src_uses"] == 1 \
                    and recs[src]["outside_uses"] == 0:
                cname, bname = names[id(src)], names[id(bn)]
                new_mods[cname] = _fuse(new_mods[cname], new_mods[bname])
                new_mods[bname] = _fused_bn_replacement(new_mods[bname])
    for name, mod in new_mods.items():
        parent, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, leaf, mod)
    for m in plain.modules():
        if isinstance(m, ParamHost):  # tied parameters (tokens, position embeddings, layer scales): sliced
            export_hosted(m, a)
        m.__dict__.pop("_slim_state", None)
    return plain.eval()


def _unused_geo(m, a):
    if not isinstance(m, SlimMixin):
        if hasattr(m, "num_features"):
            return BNGeo(m.num_features)
        if hasattr(m, "normalized_shape"):
            return BNGeo(m.normalized_shape[-1])
        return BNGeo(m.num_channels if hasattr(m, "num_channels") else m.weight.shape[-1])
    full_out, per_in = m._full_shape()
    groups = getattr(m, "groups", 1)
    full_in = per_in * groups
    out = m.active_out(a, full_out)
    return Geo(out, full_in, groups, out == full_out)


def _conv_of(bn: SlimBatchNorm2d) -> type:
    """The conv type a BN of this kind can be folded into (the same number of spatial dims)."""
    return nn.Conv1d if isinstance(bn, SlimBatchNorm1d) else nn.Conv3d if isinstance(bn, SlimBatchNorm3d) else \
        nn.Conv2d


def _fuse(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """``conv`` (a plain ``Conv1d`` / ``Conv2d`` / ``Conv3d``) with the plain BN ``bn`` that follows it folded into
    its weight and bias (US-Nets Eq. 7)."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    base = next(t for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(conv, t))
    fused = base(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                 conv.dilation, conv.groups, True, conv.padding_mode,
                 device=conv.weight.device, dtype=conv.weight.dtype)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight.copy_(conv.weight * scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
    fused.bias.copy_((b - bn.running_mean) * scale + beta)
    if type(conv) is not base:  # framework subclass (e.g. timm Conv2dSame): keep its class
        conv = copy.deepcopy(conv)
        conv.weight, conv.bias = fused.weight, fused.bias
        return conv
    return fused


def _fused_bn_replacement(bn: nn.Module) -> nn.Module:
    """What stays of a BN after fusion: nothing, or the activation/dropout of a norm-act layer."""
    rest = [m for n, m in bn.named_children() if n in ("drop", "act")]
    if not rest:
        return nn.Identity()
    return nn.Sequential(*rest) if len(rest) > 1 else rest[0]


def export_onnx(plain: nn.Module, example_input: torch.Tensor, path: str, opset: int = 17,
                dynamic_batch: bool = True, dynamic_hw: bool = False,
                output_names: Sequence[str] = ("output",)) -> str:
    """Write the ONNX graph of an exported plain model atomically; returns ``path``.

    ``dynamic_batch`` / ``dynamic_hw``: the input's and outputs' dims 0 / 2, 3 are left symbolic (a fully
    convolutional net, e.g. super-resolution, then takes any image size). ``output_names``: one name per output
    of a model returning a tuple (e.g. ``("logits", "value")`` for an actor-critic).

    Uses ``torch.onnx.export``; check it with onnxruntime (see tests/test_export.py).

    Raises:
        InvalidArgumentError: ``plain`` is a slimmable model (not yet exported); nothing is written.
    """
    if any(hasattr(m, "slim_name") or isinstance(m, ParamHost) for m in plain.modules()):
        raise InvalidArgumentError(
            f"export_onnx takes a plain model, got a slimmable {type(plain).__name__} (its graph would be the "
            "default width with the width machinery traced in); pass slim.export(model, width)")
    plain = plain.eval()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".onnx.tmp")
    os.close(fd)
    try:
        kwargs = dict(input_names=["input"], output_names=list(output_names), opset_version=opset)
        axes = ({0: "batch"} if dynamic_batch else {}) | ({2: "height", 3: "width"} if dynamic_hw else {})
        if axes:
            kwargs["dynamic_axes"] = {name: dict(axes) for name in ["input", *output_names]}
        torch.onnx.export(plain, (example_input,), tmp, dynamo=False, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
