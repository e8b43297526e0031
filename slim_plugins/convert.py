"""Convert an existing model into a slimmable one by module replacement.

``convert(model, spec)`` swaps every registered module type (Conv2d, Linear, BatchNorm2d and adapter types) for
its width-switchable counterpart, sharing the original parameters, so a stock checkpoint loads and width 1.0
computes exactly what the original did.
"""
from __future__ import annotations

import fnmatch
import operator
from typing import Iterable, Mapping

import torch
from torch import nn

from . import registry
from .context import BN_MODES, SlimState, find_state
from .errors import ChannelGroupError, NotSlimmableError, UnknownLayerError, UnsupportedModuleError, WidthError
from .nn.layers import SlimMixin
from .width import WidthSpec, as_spec

# Parametric modules whose parameters never depend on channel width.
_WIDTH_FREE = (nn.PReLU,)


def convert(model: nn.Module, spec: WidthSpec, fixed: Iterable[str] = (), bn: str = "auto",
            output_averaging: bool = False, groups: Mapping[str, Iterable[str]] | None = None,
            auto_fix: bool = True) -> nn.Module:
    """Make ``model`` slimmable in place and return it.

    Args:
        model: any ``nn.Module`` built from registered layer types.
        spec: :class:`WidthSpec` (switches -> S-Net, range -> US-Net) or a list of switches.
        fixed: names (``fnmatch`` patterns) of layers whose output channels never change. The first conv/linear
            (input layer) reads its in-channels from the input anyway; the last one (output layer) is fixed
            automatically when ``auto_fix`` is true.
        bn: ``"auto"`` (switchable for switches, ``"us"`` for a range), or one of ``switchable``,
            ``switchable_shared``, ``us``, ``naive``, ``frozen``.
        output_averaging: scale conv/linear outputs by ``C_in_full / C_in_active`` (US-Nets, "US-MobileNet v1 +").
        groups: declared channel groups ``{group name: [layer names]}`` for nonuniform widths (else torch.fx).

    Returns:
        the same model object, converted.

    Raises:
        WidthError: bad spec or ``bn`` mode, or the model is already converted.
        ChannelGroupError: ``hi > 1`` on a model that cannot be traced (names the failing layer).
        UnsupportedModuleError: a module with parameters of an unregistered type (named in the message).
        UnknownLayerError: a ``fixed`` pattern or declared group member that matches no layer.
    The model is unchanged when an error is raised.
    """
    spec = as_spec(spec)
    if bn == "auto":
        bn = "switchable" if spec.is_switches else "us"
    if bn not in BN_MODES:
        raise WidthError(f"unknown bn mode {bn!r}; allowed: {['auto', *BN_MODES]}")
    if bn in ("switchable", "switchable_shared") and not spec.is_switches:
        raise WidthError(f"bn={bn!r} needs a switch list; a range spec uses bn='us' (post-statistics)")
    if any(isinstance(m, SlimMixin) for m in model.modules()):
        raise WidthError(f"{type(model).__name__} is already slimmable; convert it only once")

    # ---- plan (no mutation until every check has passed) ---------------------------------------------------
    plan: list[tuple[str, nn.Module, type]] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p, _, _ in plan):
            continue  # inside a replaced module (e.g. the act of a BatchNormAct2d)
        cls = registry.lookup(type(m))
        if cls is not None:
            plan.append((name, m, cls))
        elif list(m.parameters(recurse=False)) and not isinstance(m, _WIDTH_FREE) \
                and not registry.is_passthrough(type(m)):
            raise UnsupportedModuleError(
                f"layer {name!r} of type {type(m).__module__}.{type(m).__qualname__} has parameters but no "
                f"width-switchable counterpart; register one with slim_plugins.registry.register(...) "
                f"(registered: {sorted(t.__name__ for t in registry.converters())})")
    weighted = [n for n, m, _ in plan if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weighted:
        raise NotSlimmableError(f"{type(model).__name__} has no Conv2d/Linear layer to slim")
    fixed = list(fixed)
    for pat in fixed:
        if not any(fnmatch.fnmatchcase(n, pat) for n in weighted):
            raise UnknownLayerError(f"fixed pattern {pat!r} matches no conv/linear layer; layers are e.g. "
                                    f"{weighted[:5]}")
    fixed_names = {n for n in weighted if any(fnmatch.fnmatchcase(n, p) for p in fixed)}
    if auto_fix:
        fixed_names.add(weighted[-1])

    state = SlimState(spec, bn, output_averaging)
    state.layer_names = [n for n in weighted if n not in fixed_names]
    if groups is not None:
        state.declared_groups = {g: list(v) for g, v in groups.items()}
        _apply_declared_groups(state)
    if spec.max > 1.0:
        in_scaled = _inputs_scaled(model, {n for n, _, _ in plan}, fixed_names)

    # ---- replace ------------------------------------------------------------------------------------------
    for name, m, cls in plan:
        new = cls.from_module(m, name, state, name in fixed_names)
        if spec.max > 1.0 and isinstance(new, SlimMixin):
            _widen(new, spec, name in fixed_names, in_scaled.get(name, False))
        elif spec.max > 1.0 and hasattr(new, "bn_mode"):
            _widen_bn(new, spec)
        _set_submodule(model, name, new)
    model._slim_state = state
    return model


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise UnsupportedModuleError("convert() needs a container model; wrap a single layer in nn.Sequential")
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def slim_layers(model: nn.Module):
    """``(name, module)`` of every width-switchable layer of a converted model."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "slim_name")]


# ---- widening for hi > 1 -----------------------------------------------------------------------------------
def _widen(layer, spec: WidthSpec, fixed_out: bool, in_scaled: bool):
    w = layer.weight
    out = w.shape[0] if fixed_out else spec.channels(layer.base_out, spec.max)
    if getattr(layer, "depthwise", False):
        out = spec.channels(layer.base_out, spec.max)
    groups = getattr(layer, "groups", 1)  # nn.Linear has no groups
    fan_in = w.shape[1] if not in_scaled else spec.channels(w.shape[1] * groups, spec.max) // groups
    if getattr(layer, "depthwise", False):
        fan_in = 1
        layer.groups = out // layer.dw_multiplier
        layer.in_channels = out // layer.dw_multiplier
    big = torch.empty((out, fan_in, *w.shape[2:]), dtype=w.dtype, device=w.device)
    nn.init.kaiming_normal_(big, mode="fan_out")
    big[: w.shape[0], : w.shape[1]] = w.detach()
    layer.weight = nn.Parameter(big)
    if layer.bias is not None:
        b = torch.zeros(out, dtype=w.dtype, device=w.device)
        b[: layer.bias.shape[0]] = layer.bias.detach()
        layer.bias = nn.Parameter(b)
    if isinstance(layer, nn.Conv2d):
        layer.out_channels, layer.in_channels = out, fan_in * layer.groups
    else:
        layer.out_features, layer.in_features = out, fan_in


def _widen_bn(bn, spec: WidthSpec):
    c = spec.channels(bn.num_features, spec.max)

    def grow(t, fill):
        if t is None:
            return None
        shape = (*t.shape[:-1], c)
        g = torch.full(shape, fill, dtype=t.dtype, device=t.device)
        g[..., : t.shape[-1]] = t.detach()
        return g

    for pname, fill in (("weight", 1.0), ("bias", 0.0)):
        if bn._parameters.get(pname) is not None:
            bn._parameters[pname] = nn.Parameter(grow(bn._parameters[pname], fill))
    for bname, fill in (("running_mean", 0.0), ("running_var", 1.0), ("min_mean", 0.0), ("min_var", 1.0)):
        if bn._buffers.get(bname) is not None:
            bn._buffers[bname] = grow(bn._buffers[bname], fill)
    bn.num_features = c


# ---- torch.fx channel analysis -----------------------------------------------------------------------------
class _Tracer(torch.fx.Tracer):
    """Keeps registered / slim layers as leaves and remembers which module was being traced on failure."""

    def __init__(self, leaf_names):
        super().__init__()
        self.leaf_names = leaf_names
        self.stack: list[str] = []
        self.failed_in: str | None = None  # innermost module whose forward raised (the stack unwinds before we see it)

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaf_names or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _trace(model: nn.Module, leaf_names):
    tracer = _Tracer(set(leaf_names))
    try:
        return tracer.trace(model)
    except Exception as e:  # fx raises many types; re-raise one that names the layer
        where = tracer.failed_in or "<top level forward>"
        raise ChannelGroupError(
            f"torch.fx cannot trace {type(model).__name__} (failed inside layer {where!r}: "
            f"{type(e).__name__}: {e}). Declare channel groups instead: "
            "slim.convert(model, spec, groups={'name': ['layer', ...]})") from e


_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, torch.add, torch.mul,
                torch.sub}
_ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}


def _channel_sources(graph, deciders: set[str], modules: dict):
    """For each fx node, the set of layer names that decide its channel count ("<input>" for the graph input),
    plus the list of sets that elementwise ops tie together."""
    src: dict = {}
    ties: list[set] = []
    for node in graph.nodes:
        tensor_args = [a for a in node.all_input_nodes]
        if node.op == "placeholder":
            src[node] = {"<input>"}
        elif node.op == "get_attr":
            src[node] = set()
        elif node.op == "call_module" and node.target in deciders:
            src[node] = {node.target}
        elif node.op in ("call_function", "call_method") and (
                node.target in _ELEMENTWISE or node.target in _ELEMENTWISE_METHODS) and len(tensor_args) >= 2:
            parts = [src.get(a, set()) for a in tensor_args]
            parts = [p for p in parts if p]
            if len(parts) >= 2:
                ties.append(set().union(*parts))
            src[node] = set().union(*parts) if parts else set()
        elif tensor_args:
            src[node] = src.get(tensor_args[0], set())
        else:
            src[node] = set()
    return src, ties


def _deciders(model, names) -> set[str]:
    out = set()
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not (
                isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels):
            out.add(n)
    return out


def _inputs_scaled(model, leaf_names, fixed_names) -> dict[str, bool]:
    """Whether each conv/linear receives channels that scale with width (needed to widen for hi > 1)."""
    gm = _trace(model, leaf_names)
    deciders = _deciders(model, leaf_names)
    src, _ = _channel_sources(gm, deciders, dict(model.named_modules()))
    out = {}
    for node in gm.nodes:
        if node.op == "call_module" and node.target in leaf_names and node.all_input_nodes:
            s = src.get(node.all_input_nodes[0], set())
            out[node.target] = bool(s) and not (s & ({"<input>"} | set(fixed_names)))
    return out


def channel_groups(model: nn.Module) -> dict[str, list[str]]:
    """Channel groups of a converted model: layers tied by residual adds / gating share one ratio.

    Derived once with torch.fx (cached on the model) unless groups were declared at ``convert``. Each group is
    named after its first layer (definition order); a layer not tied to others is its own group.

    Returns:
        ``{group name: [layer names]}`` (fixed layers excluded).

    Raises:
        ChannelGroupError: the model cannot be traced and no groups were declared (names the failing layer).
    """
    state = find_state(model)
    if state.groups is None:
        leaf = {n for n, _ in slim_layers(model)}
        gm = _trace(model, leaf)
        names = state.layer_names
        deciders = _deciders(model, leaf) & set(names)
        _, ties = _channel_sources(gm, deciders, dict(model.named_modules()))
        parent = {n: n for n in names}

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        order = {n: i for i, n in enumerate(names)}
        for tie in ties:
            members = sorted((t for t in tie if t in parent), key=order.get)
            for other in members[1:]:
                ra, rb = find(members[0]), find(other)
                if ra != rb:
                    parent[max(ra, rb, key=order.get)] = min(ra, rb, key=order.get)
        state.groups = {n: find(n) for n in names}
    out: dict[str, list[str]] = {}
    for layer, g in state.groups.items():
        out.setdefault(g, []).append(layer)
    return out


def _apply_declared_groups(state: SlimState):
    groups = {n: n for n in state.layer_names}
    for g, layers in state.declared_groups.items():
        for layer in layers:
            if layer not in groups:
                raise UnknownLayerError(f"declared group {g!r} names {layer!r}, which is not a slimmable layer; "
                                        f"layers are e.g. {state.layer_names[:5]}")
            groups[layer] = g
    state.groups = groups
