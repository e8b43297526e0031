"""Convert an existing model into a slimmable one by module replacement.

``convert(model, spec)`` swaps every registered module type (Conv1d/2d/3d, ConvTranspose2d, Linear, BatchNorm1d/2d/3d,
SyncBatchNorm, the norms, PReLU, weight-normed convs and adapter types) for its width-switchable counterpart, sharing the
original parameters, so a stock checkpoint loads and width 1.0 computes exactly what the original did. It then
analyses the channels of the converted part(s) with torch.fx (:mod:`slim_plugins.graph`), which decides the output
layers (DESIGN rule 2), the channel groups of nonuniform widths and, at every width, which channels each tensor
carries (rule 1).
"""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.passes.shape_prop import ShapeProp

from . import registry
from .context import BN_MODES, SlimState, find_state
from .errors import (ChannelGroupError, ExampleInputError, NotSlimmableError, UnknownLayerError,
                     UnsupportedModuleError, WidthError)
from .graph import ChannelGraph, _Builder, restore_modules, snapshot_modules, trace
from .nn.layers import (GROUP_MODES, SlimConvNd, SlimConvTranspose2d, SlimMixin, SlimWeightNormConv2d,
                        is_weight_normed, track_data_writes)
from .nn.norm import SelectsFromChildren, SlimComposite
from .nn.params import ParamHost, ParamSlot, forward_methods, host, host_root, unhost
from .width import WidthSpec, as_spec

class SlimWarning(UserWarning):
    """A conversion that works but whose exactness could not be checked (an untraceable model)."""


def convert(model: nn.Module, spec: WidthSpec, fixed: Iterable[str] = (), bn: str = "auto",
            output_averaging: bool = False, groups: Mapping[str, Iterable[str]] | None = None,
            auto_fix: bool = True, scope: Iterable[str] | None = None, example_input=None,
            group_mode: str | Mapping[str, str] = "groups", frozen_bn: bool = False) -> nn.Module:
    """Make ``model`` slimmable in place and return it.

    Args:
        model: any ``nn.Module`` built from registered layer types.
        spec: :class:`WidthSpec` (switches -> S-Net, range -> US-Net) or a list of switches.
        fixed: names (``fnmatch`` patterns) of layers whose output channels never change, besides the output
            layers found from the graph (``auto_fix``): every conv/linear whose output reaches a model output
            through channel-preserving ops without a norm layer in between (a classifier, each head of a
            multi-head model; a headless backbone has none; through norms too for a ``scope`` part whose outputs
            feed unconverted modules, see ``example_input``). The input layer reads its in-channels from the input.
        bn: ``"auto"`` (switchable for switches, ``"us"`` for a range), or one of ``switchable``,
            ``switchable_shared``, ``us``, ``naive``, ``frozen`` (naive layout, frozen).
        output_averaging: scale conv/linear outputs by ``C_in_full / C_in_active`` (US-Nets, "US-MobileNet v1 +").
        groups: declared channel groups ``{group name: [layer names]}`` for nonuniform widths (else from the graph).
        scope: names of the submodules to convert (a detector's ``["backbone", "neck.lateral_convs"]``); default
            the whole model. Each named part is analysed on its own; the model holds one width state.
        example_input: input for the one analysis forward (``ShapeProp``), a tensor / tuple, or ``{part: input}``
            with ``scope``. With ``scope``, a tensor / tuple the whole model runs on (a detector's list of images)
            gives each part the inputs it receives in that forward, and a part with outputs that no converted
            module takes (they feed a detector's heads) keeps them whole; one it does not run on is each part's
            input.
            Default ``(2, C, 64, 64)`` (or ``(2, F)``) from the part's first layer; give the real size for nets
            with a fixed-size flatten -> linear.
        group_mode: convention for grouped convs (1 < groups < in_channels): ``"groups"`` (default; constant
            group count, every group slimmed, the official S-ShuffleNet) or ``"width"`` (constant group width,
            RegNet/ResNeXt), or ``{layer pattern: mode}``. A module attribute ``slim_group_mode`` also sets it.
        frozen_bn: BN layers keep their statistics and never update them, whatever the mode (DESIGN rule 3).

    Returns:
        the same model object, converted.

    Raises:
        WidthError: bad spec, ``bn`` or ``group_mode``, or the model is already converted.
        NotExactError: a structure that cannot run a width of the spec as an exact sub-network (names the
            operation): a concatenation / split / shuffle / grouped conv whose channels cannot line up.
        ChannelGroupError: ``hi > 1`` on a model that cannot be traced (names the failing layer).
        UnsupportedModuleError: a module with parameters or per-channel buffers of an unregistered type.
        UnknownLayerError: a ``fixed`` / ``scope`` / ``group_mode`` pattern or declared group member matching nothing.
        UnsupportedModuleError: ``model`` is not an ``nn.Module``.
        ExampleInputError: the analysis forward fails on ``example_input`` (or on the default input), or a
            forward of the model writes its parameters in place.
    The model is unchanged when an error is raised.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"convert() needs an nn.Module, got {type(model).__name__} {model!r:.80}")
    spec = as_spec(spec)
    if bn == "auto":
        bn = "switchable" if spec.is_switches else "us"
    if bn not in BN_MODES:
        raise WidthError(f"unknown bn mode {bn!r}; allowed: {['auto', *BN_MODES]}")
    if bn in ("switchable", "switchable_shared") and not spec.is_switches:
        raise WidthError(f"bn={bn!r} needs a switch list; a range spec uses bn='us' (post-statistics)")
    modes = group_mode if isinstance(group_mode, Mapping) else {"*": group_mode}
    for pat, mode in modes.items():
        if mode not in GROUP_MODES:
            raise WidthError(f"unknown group_mode {mode!r} for {pat!r}; allowed: {list(GROUP_MODES)}")
    if any(isinstance(m, SlimMixin) for m in model.modules()):
        raise WidthError(f"{type(model).__name__} is already slimmable; convert it only once")
    roots = _scope_roots(model, scope)

    # ---- plan (no mutation until every check has passed) ---------------------------------------------------
    plan: list[tuple[str, nn.Module, type]] = []
    hosts: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not any(_under(name, r) for r in roots):
            continue
        if any(name.startswith(p + ".") for p, _, _ in plan):
            continue  # inside a replaced module (e.g. the act of a BatchNormAct2d)
        cls = _slim_class(name, m)
        if cls is not None:
            plan.append((name, m, cls))
        elif _has_channel_state(m) and not registry.is_passthrough(type(m)):
            hosts[name] = m  # its parameters must be seen by the channel analysis (tied to channels) or it is refused
    weighted = [n for n, m, _ in plan if isinstance(m, _WEIGHTED)]
    if not weighted:
        raise NotSlimmableError(f"{type(model).__name__} has no Conv1d/Conv2d/Conv3d/ConvTranspose2d/Linear layer to "
                                "slim" + (f" in scope {roots}" if scope is not None else ""))
    fixed = list(fixed)
    for pat in fixed:
        if not any(fnmatch.fnmatchcase(n, pat) for n in weighted):
            raise UnknownLayerError(f"fixed pattern {pat!r} matches no conv/linear layer; layers are e.g. "
                                    f"{weighted[:5]}")
    for pat in modes:
        if pat != "*" and not any(fnmatch.fnmatchcase(n, pat) for n in weighted):
            raise UnknownLayerError(f"group_mode pattern {pat!r} matches no layer; layers are e.g. {weighted[:5]}")
    fixed_names = {n for n in weighted if any(fnmatch.fnmatchcase(n, p) for p in fixed)}
    planned = {n for n, _, _ in plan}

    # ---- channel analysis of each part (fx + ShapeProp on the original modules) ------------------------------
    parts, untraced = [], []
    part_roots = _parts(model, roots, planned)
    part_inputs, outside = _part_inputs(model, part_roots, planned, example_input)
    for root in part_roots:
        x = part_inputs.get(root, example_input)
        try:
            parts.append((root, _analyse(model, root, planned, x, hosts)))
        except ChannelGroupError as e:
            untraced.append((root, e))
    # a module a counterpart holds is the counterpart's to read, also where it is reached first by another name
    # (SAM's rotary embedding: a child of the root and of every attention)
    owned = {id(c) for _, m, _ in plan for c in m.modules() if c is not m}
    _check_hosts(model, hosts, parts, untraced, owned)
    # An untraceable part holding one conv/linear (mmcv's ConvModule: conv, norm, act) is a chain: the prefix rule
    # is exact there, and its layer is an output layer unless a norm follows it (the graph's rule).
    chains = [(r, e) for r, e in untraced if len([n for n in weighted if _under(n, r)]) == 1]
    untraced = [(r, e) for r, e in untraced if (r, e) not in chains]
    for root, builder in parts:  # linear layers applied along a non-channel dim (token mixing) stay whole
        fixed_names.update(_join(root, n) for n in builder.fixed_layers)
    if auto_fix:
        for root, builder in parts:
            fixed_names.update(_join(root, n) for n in ChannelGraph(builder.ops, builder.calls, builder.full,
                                                                     builder.rank).output_layers(root in outside))
        for root, _ in chains:
            if not any(_under(n, root) and n not in weighted for n in planned):
                fixed_names.update(n for n in weighted if _under(n, root))
        if untraced:  # no graph: the last conv/linear in definition order (legacy rule)
            for root, _ in untraced:
                inside = [n for n in weighted if _under(n, root)]
                if inside and scope is None:
                    fixed_names.add(inside[-1])
    if spec.max > 1.0 and (untraced or chains):
        raise (untraced or chains)[0][1]
    if untraced and groups is None:  # no graph, nothing proves the narrow net exact: refuse (DESIGN rule 10)
        root, e = untraced[0]
        raise ChannelGroupError(f"{e} Without the channel graph the output layers and the exactness of "
                                "concatenations, splits and grouped convs cannot be shown; declare the channel "
                                "groups (groups=) to convert it with the prefix rule") from e

    state = SlimState(spec, bn, output_averaging, frozen_bn)
    state.trace_error = str(untraced[0][1]) if untraced else None
    # The input the analysis ran on (batch 1): export / profile use it when they are given none (DESIGN rule 10).
    whole = [b.example_shapes for r, b in parts if r == ""]
    if whole and len(whole[0]) == 1 and whole[0][0] is not None:
        state.example_shape = (1, *whole[0][0][1:])
    state.layer_names = [n for n in weighted if n not in fixed_names]
    if groups is not None:
        state.declared_groups = {g: list(v) for g, v in groups.items()}
        _apply_declared_groups(state)

    # ---- replace (rolled back if a later check fails) ------------------------------------------------------
    new_mods: dict[str, nn.Module] = {}
    for name, m, cls in plan:
        new = cls.from_module(m, name, state, name in fixed_names)
        if isinstance(new, SlimMixin):
            if getattr(new, "groups", 1) > 1 and not getattr(new, "depthwise", False) and \
                    getattr(m, "slim_group_mode", None) is None:
                new.group_mode = _mode_for(name, modes)
        new_mods[name] = new
    try:
        for name, new in new_mods.items():
            _set_submodule(model, name, new)
        model._slim_state = state
        _attach_graphs(model, state, parts, new_mods)
        if spec.max > 1.0:
            _widen_all(model, state, new_mods)
        if groups is None and state.graphs:
            state.groups = _groups_from_graphs(state)
        _check_widths(state)
    except Exception:
        for name, m, _ in plan:
            _set_submodule(model, name, m)
        for m in [model, *model.modules()]:  # hosts of tied parameters and of head counts
            unhost(m)
        model.__dict__.pop("_slim_state", None)
        raise
    for new in new_mods.values():  # only now: the parameters are shared with the caller's modules
        for m in new.modules():  # an attention layer's own qkv / proj children too (their weights are cached)
            track_data_writes(m)
    for m in model.modules():  # modules holding tied parameters (their active channels are cached too)
        if isinstance(m, ParamHost):
            track_data_writes(m)
    _guard_fixed_layers(model, state)
    return model


# ---- a fixed layer replaced after convert (a new classifier) --------------------------------------------------
class HeadGuard:
    """Forward pre-hook of a module whose children include fixed-output layers (``{child: slot}``): a child that
    is no longer a width-switchable layer was replaced after convert — a new classifier for fine-tuning, timm's
    ``model.reset_classifier(n)`` or torchvision's ``model.fc = nn.Linear(model.fc.in_features, n)``. It is
    converted in its place before the forward runs (:func:`_adopt`), or refused; a module of another type is left
    to run as it is. One dict read per child per call; ``export`` drops the hook. It runs when that module is
    called or one of its ``forward_*`` methods (timm's ``forward_head``; the module gets the hosted class of
    :mod:`slim_plugins.nn.params` for that): a head called directly by an ancestor's forward is adopted by the verbs
    (``find_state(adopt=True)``)."""

    slim_head_guard = True  # (found by find_state(adopt=True))

    def __init__(self, state: SlimState, children: dict):
        self.state, self.children = state, dict(children)
        self.left: dict = {}  # child -> a module of another kind, left to run as the user's own

    def __call__(self, module, args):
        if module.__dict__.get("_is_replica"):  # a DataParallel replica: the original adopts (its forward, a verb)
            return
        mods = module._modules
        for leaf, slot in self.children.items():
            cur = mods.get(leaf)
            if not isinstance(cur, SlimMixin) and cur is not self.left.get(leaf):
                if not _adopt(module, leaf, slot, self.state):  # (nn.Identity for a feature extractor)
                    self.left[leaf] = cur


def _guard_fixed_layers(model, state: SlimState) -> None:
    by_parent: dict[str, dict] = {}
    for slot, layer in enumerate(state.layers):
        if isinstance(layer, SlimMixin) and layer.fixed_out and not isinstance(layer, SlimConvTranspose2d):
            parent, _, leaf = layer.slim_name.rpartition(".")
            by_parent.setdefault(parent, {})[leaf] = slot
    for parent, children in by_parent.items():
        m = model.get_submodule(parent) if parent else model
        if all(isinstance(m._modules.get(k), SlimMixin) for k in children):
            m.register_forward_pre_hook(HeadGuard(state, children))
            if forward_methods(type(m)) and not isinstance(m, ParamHost):
                host_root(m, state)  # its forward_* methods (timm's forward_head) run the guard too


def _adopt(parent: nn.Module, leaf: str, slot: int, state: SlimState) -> bool:
    """Convert ``parent.<leaf>``, put there after convert in place of the fixed-output layer of ``slot``; ``False``
    (nothing done) for a module of another type (``nn.Identity`` to make a feature extractor, a ``Sequential``
    head): it runs as the user's own module.

    Adopted: the same layer type with the same input channels (and groups); a new output count only for an output
    layer of the graph (nothing in the model reads its channels). The graph's channel counts follow it.

    Raises:
        UnsupportedModuleError: a layer of that type it cannot adopt (other input channels, a parametrized weight,
            a new output count of a layer whose output the model reads); the model is unchanged.
    """
    with state._lock:
        cur = parent._modules.get(leaf)
        if isinstance(cur, SlimMixin):  # another thread adopted it
            return True
        old = state.layers[slot]
        name = old.slim_name
        cls = registry.lookup(type(cur)) if isinstance(cur, nn.Module) else None
        if cls is not type(old):
            return False
        why = None
        if is_weight_normed(cur) or "parametrizations" in cur._modules:
            why = f"its weight is parametrized ({type(cur).__name__})"
        elif cur.weight.shape[1:] != old.weight.shape[1:] or getattr(cur, "groups", 1) != getattr(old, "groups", 1):
            why = (f"its weight {tuple(cur.weight.shape)} does not take the input of {tuple(old.weight.shape)} "
                   "(same input channels, kernel and groups)")
        else:
            graphs = [g for g in state.graphs if any(c.name == name for c in g.calls)]
            changed = cur.weight.shape[0] != old.weight.shape[0]
            if changed and not all(name in g.output_layers() for g in graphs):
                why = (f"it has {cur.weight.shape[0]} output channels, not {old.weight.shape[0]}, and the model reads "
                       "its output")
        if why is not None:
            raise UnsupportedModuleError(
                f"{name!r} was replaced after slim.convert and {why}; a slimmable model adopts only a new layer of "
                "the same type and input (a new classifier); change the model before converting it")
        new = cls.from_module(cur, name, state, True)
        new._slim_slot = slot
        for m in new.modules():
            track_data_writes(m)
        for g in graphs:
            counts = {c.name: g.full[c.t_out] for c in g.calls}
            counts[name] = new.weight.shape[0]
            g.refresh_full(lambda n: (None, counts.get(n)))
            g.__dict__.pop("_plans", None)
        state.layers[slot] = new
        setattr(parent, leaf, new)
        state._resolved = {}
        return True


# ---- helpers: scope, classes ------------------------------------------------------------------------------------
def _under(name: str, root: str) -> bool:
    return root == "" or name == root or name.startswith(root + ".")


def _join(root: str, name: str) -> str:
    return f"{root}.{name}" if root and name else (root or name)


def _scope_roots(model, scope) -> list[str]:
    if scope is None:
        return [""]
    roots = [scope] if isinstance(scope, str) else list(scope)
    names = dict(model.named_modules())
    for r in roots:
        if r not in names:
            raise UnknownLayerError(f"scope {r!r} names no submodule; top-level children: "
                                    f"{[n for n, _ in model.named_children()]}")
    return roots


def _slim_class(name, m):
    if is_weight_normed(m):
        base = type(m).__mro__[1]
        if issubclass(base, nn.Conv2d):
            return SlimWeightNormConv2d
        raise UnsupportedModuleError(f"layer {name!r}: weight-normed {base.__name__} cannot be slimmed (conv only)")
    if hasattr(m, "weight_g") and hasattr(m, "weight_v"):
        raise UnsupportedModuleError(
            f"layer {name!r} uses the deprecated hook-based torch.nn.utils.weight_norm; use "
            "torch.nn.utils.parametrizations.weight_norm, which slim_plugins slices exactly")
    if isinstance(m, nn.PReLU) and m.num_parameters == 1:
        return None  # one shared slope: width-free
    cls = registry.lookup(type(m))
    if cls is not None and hasattr(cls, "accepts") and not cls.accepts(m):
        return None  # a configuration the counterpart does not cover: traced into like any module
    return cls


def _has_channel_state(m: nn.Module) -> bool:
    if isinstance(m, nn.PReLU) and m.num_parameters == 1:
        return False
    if list(m.parameters(recurse=False)):
        return True
    return any(b is not None and b.is_floating_point() and b.dim() >= 1 for b in m.buffers(recurse=False))


def _mode_for(name, modes) -> str:
    for pat, mode in modes.items():
        if pat != "*" and fnmatch.fnmatchcase(name, pat):
            return mode
    return modes.get("*", "groups")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise UnsupportedModuleError("convert() needs a container model; wrap a single layer in nn.Sequential")
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def slim_layers(model: nn.Module):
    """``(name, module)`` of every width-switchable layer of a converted model."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "slim_name")]


# ---- channel analysis --------------------------------------------------------------------------------------------
def _parts(model, roots, planned):
    """The modules to trace: each scope root, containers without a forward split into their children."""
    out = []
    for r in roots:
        m = model.get_submodule(r) if r else model
        if r in planned:
            continue  # a single layer: nothing to trace
        # a ModuleList / ModuleDict has no forward; a subclass with its own (timm's features_only FeatureListNet) is
        # traced whole
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and type(m).forward is nn.Module.forward:
            out.extend(_parts(model, [_join(r, n) for n, _ in m.named_children()], planned))
        else:
            out.append(r)
    return out


# The layer types whose output channels the width chooses (the ``weighted`` layers of a plan).
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
_WEIGHTED = (*_CONVS, nn.Linear)


def default_input_shape(m: nn.Module, batch: int) -> tuple:
    """The input shape the analysis assumes for a model whose first layer is ``m`` (a conv or linear): ``(batch,
    C, 64)`` for a Conv1d, ``(batch, C, 8, 32, 32)`` for a Conv3d, ``(batch, C, 64, 64)`` for a 2-d conv,
    ``(batch, F)`` for a Linear."""
    if not isinstance(m, _CONVS):
        return (batch, m.in_features)
    # (a Conv3d gets a short clip: memory)
    spatial = (64,) if isinstance(m, nn.Conv1d) else (8, 32, 32) if isinstance(m, nn.Conv3d) else (64, 64)
    return (batch, m.in_channels, *spatial)


def _default_input(part: nn.Module, planned_rel):
    for n, m in part.named_modules():
        if n in planned_rel and isinstance(m, _WEIGHTED):
            p = next(iter(m.parameters()), None)
            if p is None:
                p = next(m.parametrizations.weight.parameters())
            return (torch.zeros(default_input_shape(m, 2), device=p.device, dtype=p.dtype),)
    return None


class _ShapeProp(ShapeProp):
    """fx's ShapeProp handing each call plain lists and dicts: fx passes a node's list / dict arguments as immutable
    containers, and a wrapped function that fills its list argument in place (torchvision's video Swin,
    ``_get_window_and_shift_size``) fails there although the model's own forward runs."""

    def fetch_args_kwargs_from_env(self, n):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)


def _mutable(v):
    """``v`` with fx's immutable lists / dicts (the node's own containers) as plain ones; every value a previous
    node produced (a list a leaf module returned, an ``OrderedDict``, ``torch.Size``) is passed as it is."""
    if type(v) is immutable_list:
        return [_mutable(a) for a in v]
    if type(v) is immutable_dict:
        return {k: _mutable(a) for k, a in v.items()}
    if type(v) is tuple:
        return tuple(_mutable(a) for a in v)
    return v


def positional(example_input) -> tuple:
    """The positional inputs an example input stands for: a tuple is the inputs, anything else the one input."""
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _part_inputs(model, roots, planned, example_input) -> tuple[dict, set]:
    """``({part: positional inputs}, parts feeding the rest)`` from one forward of the whole model on
    ``example_input`` (eval mode, no grad) with a ``scope``: a user passes the model's own input (a detector's list
    of images) and each part is analysed on what it really receives (a backbone: the batched, resized images).
    A part with an output tensor that no converted module outside it takes as input (another part, a converted
    layer of the scope) feeds modules that are not converted (a detector's heads): its outputs must stay whole at
    every width (:meth:`ChannelGraph.output_layers` through norms; torchvision's SSDLite backbone ends in conv ->
    BN -> activation). Uses outside modules (``head(a + part(a))``) are not seen.

    Both empty when there is nothing to capture (no scope, no example input, a ``{part: input}`` mapping) or the
    model does not run on it (then ``example_input`` is each part's input, as before); a part called with keyword
    arguments gets no captured input. The model is left as it was (:func:`snapshot_modules`; forward hooks of the
    user's run as in any forward).

    Raises:
        ExampleInputError: that forward wrote the model's parameters in place.
    """
    if example_input is None or isinstance(example_input, Mapping) or not any(roots):
        return {}, set()
    found: dict = {}   # part -> positional inputs of its first call (None: called with keyword arguments)
    outs: dict = {}    # part -> output of its first call
    taken: list = []   # (part holding the taking module, inputs of one call): every call, kept alive for id()
    owner = {n: next((r for r in roots if _under(n, r)), n) for n in [*roots, *planned]}

    def hooks(name, part):
        def pre(mod, args, kwargs):
            taken.append((owner[name], (args, kwargs)))
            if part and name not in found:
                found[name] = args if not kwargs else None

        def post(mod, args, out):
            outs.setdefault(name, out)
        return pre, post

    args = positional(example_input)
    handles: list = []
    snap = snapshot_modules(model)
    try:
        for name in dict.fromkeys([*roots, *planned]):  # (planned: the converted layers, all in the scope)
            if not name:
                continue
            pre, post = hooks(name, name in roots)
            m = model.get_submodule(name)
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            if name in roots:
                handles.append(m.register_forward_hook(post))
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception:  # not the model's input: the parts' own (the documented form before)
        return {}, set()
    finally:
        for h in handles:
            h.remove()
        restore_modules(snap)
    outside = set()
    for r, o in outs.items():
        by_others = {id(t) for who, a in taken if who != r for t in tree_leaves(a) if torch.is_tensor(t)}
        if any(torch.is_tensor(t) and id(t) not in by_others for t in tree_leaves(o)):
            outside.add(r)
    return {r: a for r, a in found.items() if a is not None}, outside


def _analyse(model, root, planned, example_input, hosts):
    """Trace part ``root`` and run it once: returns its built :class:`_Builder`.

    The model is left exactly as it was (DESIGN rule 10): attributes a forward assigns (BasicSR's EDSR sets
    ``self.mean`` in ``forward``), buffers and training flags are restored afterwards, whether the analysis
    succeeds or raises.

    Raises:
        ChannelGroupError: torch.fx cannot trace the part. ExampleInputError: the traced part does not run on the
        example input (the analysis needs every tensor's shape: pass ``example_input=``).
    """
    part = model.get_submodule(root) if root else model
    rel = {n[len(root) + 1:] if root else n: n for n in planned if _under(n, root) and n != root}
    roles = {r: _role_of(part.get_submodule(r)) for r in rel}
    params = set()  # fx targets (relative to the part) of the parameters of modules without a counterpart
    for hname, hm in hosts.items():
        if _under(hname, root):
            hrel = hname[len(root):].lstrip(".") if root else hname
            params.update(_join(hrel, k) for k, t in [*hm._parameters.items(), *hm._buffers.items()]
                          if t is not None and t.is_floating_point() and t.dim() >= 1)
    snap = snapshot_modules(part)
    try:
        x = example_input.get(root) if isinstance(example_input, Mapping) else example_input
        given = x is not None
        if x is None:
            x = _default_input(part, set(rel))
        args = positional(x)
        # traced in the model's own mode (layers only a training forward reaches, e.g. auxiliary heads, are seen),
        # run once in eval mode (BN statistics untouched)
        gm = trace(part, set(rel), registry.fx_leaves(), registry.fx_autowrap(), n_inputs=len(args), snapshot=snap,
                   caches=registry.forward_caches(), inputs=args if x is not None else None)
        if x is None:
            raise ExampleInputError(f"no example input for part {root or type(model).__name__!r}: its first "
                                    "layer is not a Conv1d / Conv2d / Conv3d / ConvTranspose2d / Linear; pass example_input=")
        part.eval()
        try:
            with torch.no_grad():
                _ShapeProp(gm).propagate(*args)
        except Exception as e:
            shapes = [tuple(a.shape) for a in args if torch.is_tensor(a)]
            hint = ("pass example_input= with an input the model accepts" + (
                f" (the whole model's input, or {{{root!r}: its input}})" if root else "") if given else
                    f"the default example input {shapes} does not fit this model (e.g. a fixed-size flatten -> "
                    "linear); pass example_input= with the size the model takes")
            raise ExampleInputError(
                f"the analysis forward of {root or type(model).__name__!r} failed on an example input of shape "
                f"{shapes} ({type(e).__name__}: {e}); {hint}") from e
    finally:
        restore_modules(snap)
    b = _Builder(gm, roles, root, params, registry.layout_fns(), registry.tile_fns()).build()
    b.example_shapes = [tuple(a.shape) if torch.is_tensor(a) else None for a in args]
    b.memos = [(_join(root, p), k) for p, k in gm.meta.get("slim_memos", [])]
    return b


def _check_hosts(model, hosts: dict, parts, untraced=(), owned=frozenset()) -> None:
    """Every parameter of a module without a width-switchable counterpart must be read by a traced forward (the
    analysis then ties it to channels or proves it width-free) or by the counterpart holding it (``owned``: ids);
    else the module is refused (with the trace failure of its part, where fx could not trace it)."""
    seen = {_join(root, t) for root, b in parts for t in b.seen_attrs}
    for name, m in hosts.items():
        failed = next((e for r, e in untraced if _under(name, r)), None)
        if failed is not None and any(t is not None and t.is_floating_point() and t.numel() > 1
                                      for t in [*m._parameters.values(), *m._buffers.values()]):
            raise failed
        missing = [] if id(m) in owned else [
            k for k, t in [*m._parameters.items(), *m._buffers.items()]
            if t is not None and t.is_floating_point() and t.numel() > 1 and _join(name, k) not in seen]
        if missing:
            memo = [k for k, v in m.__dict__.items() if type(v) is dict and k not in registry.forward_caches()
                    and any(torch.is_tensor(x) for x in v.values())]
            hint = (f"; its forward may read them from the cache {memo} (a pure cache can be declared with "
                    f"slim_plugins.registry.register_forward_cache({memo[0]!r}))" if memo else "")
            raise UnsupportedModuleError(
                f"layer {name!r} of type {type(m).__module__}.{type(m).__qualname__} has parameters or per-channel "
                f"buffers ({missing[:3]}) that the channel analysis cannot follow (its forward was not traced) and "
                "no width-switchable counterpart; register one with slim_plugins.registry.register(...) "
                f"(registered: {sorted(t.__name__ for t in registry.converters())}){hint}")


def _role_of(m) -> dict:
    """Channel role of an original module (before replacement)."""
    if isinstance(m, _CONVS):
        return SlimConvNd.analysis_role(m)
    if isinstance(m, nn.Linear):
        return {"role": "decider", "dim": -1}
    cls = registry.lookup(type(m))
    if cls is not None and hasattr(cls, "analysis_role"):
        return cls.analysis_role(m)
    return {"role": "norm"}


def _attach_graphs(model, state: SlimState, parts, new_mods):
    """Build each part's ChannelGraph with the roles of the converted layers and assign layer slots; tied
    parameters get a slot and their module reads them at the active channels."""
    params: dict[str, ParamSlot] = {}
    for root, builder in parts:
        for call in builder.calls:
            full = _join(root, call.name)
            if call.role == "param":
                obj = params[full] = ParamSlot(full, call.pdim)
            else:
                obj = new_mods[full]
            role = obj.channel_role()
            call.name = full
            call.role = role["role"]
            call.groups = role.get("groups", 1)
            call.mult = role.get("mult", 1)
            call.gw = role.get("gw", (1, 1))
            call.unit = role.get("unit", 1)
            call.unit_out = role.get("unit_out", 1)
        g = ChannelGraph(builder.ops, builder.calls, builder.full, builder.rank, root)
        state.graphs.append(g)
        for call in builder.calls:
            if call.name not in state.slots:
                state.slots[call.name] = len(state.layers)
                layer = new_mods[call.name] if call.role != "param" else params[call.name]
                layer._slim_slot = len(state.layers)
                state.layers.append(layer)
            if call.role == "param" and not g.always_whole(call.t_in):  # else nothing to slice
                p = params[call.name]
                hm = model.get_submodule(p.host) if p.host else model
                _check_memos(hm, p.host, getattr(builder, "memos", ()))
                host(hm, p.attr, p._slim_slot, p.dim, state, scale=call.scale)
        units = g.class_units()
        for c_id, u in units.items():
            if u <= 1:
                continue
            for i in g.deciders.get(c_id, []):
                layer = new_mods[g.calls[i].name]
                if isinstance(layer, SlimMixin) and not layer.fixed_out:
                    layer.channel_multiple = math.lcm(layer.channel_multiple, u)
    if any(isinstance(m, ParamHost) for m in model.modules()) and not isinstance(model, ParamHost):
        host_root(model, state)  # tied parameters read by an ancestor's forward are sliced there too
    if params and state.spec.max > 1.0:
        raise ChannelGroupError(f"widths above 1.0 are not supported for models with tied parameters "
                                f"({sorted(params)[:3]})")


def _check_memos(module, path: str, memos) -> None:
    """A module whose tied parameters or head count follow the width must not keep tensors its forward computed
    (a memo dict would hand one width's tensors to another): registered caches are emptied before each forward.

    Raises:
        UnsupportedModuleError: the module's forward fills an attribute that is not a registered cache."""
    mine = sorted({k for p, k in memos if p == path} |
                  {k for k in registry.forward_caches() if type(module.__dict__.get(k)) is dict})
    bad = [k for k in mine if k not in registry.forward_caches()]
    if bad:
        raise UnsupportedModuleError(
            f"layer {path!r} ({type(module).__name__}) stores what its forward computes in {bad}; those tensors "
            "would not follow the width. Declare a pure cache with slim_plugins.registry.register_forward_cache("
            f"{bad[0]!r}) (registered: {sorted(registry.forward_caches())})")
    if mine:
        module.__dict__["_slim_caches"] = tuple(mine)


def check_widths(model: nn.Module) -> None:
    """Plan the spec's switches (or a grid of its range) again, after an adapter changed the rounding of layers'
    channel counts (``channel_unit`` / ``channel_multiple``, e.g. timm's expansion ratios) on a converted model.

    Raises:
        NotExactError: a width that cannot run as an exact sub-network (names the op).
    """
    state = find_state(model)
    state._resolved = {}
    _check_widths(state)


def _check_widths(state: SlimState):
    """Plan the switches (or a grid of the range) once: a structure that cannot be sliced exactly raises here,
    at convert time, naming the op (never a shape error at the first narrow forward)."""
    if not state.graphs:
        return
    spec = state.spec
    if spec.is_switches:
        widths = list(spec.widths)
    else:
        n = 8
        widths = sorted({round(spec.min + (spec.max - spec.min) * i / n, 6) for i in range(n + 1)})
    for w in widths:
        state.resolve(w)  # plans every part; raises NotExactError naming the op


def _groups_from_graphs(state: SlimState) -> dict[str, str]:
    """Channel groups: free layers whose outputs are one class (tied by adds / gating) share a ratio; each group
    is named after its first layer in definition order."""
    order = {n: i for i, n in enumerate(state.layer_names)}
    groups = {n: n for n in state.layer_names}
    for g in state.graphs:
        for c_id, dec in g.deciders.items():
            names = sorted({g.calls[i].name for i in dec if g.calls[i].name in order}, key=order.get)
            for n in names:
                groups[n] = names[0]
    return groups


# ---- widening for hi > 1 -----------------------------------------------------------------------------------
def _widen_all(model, state: SlimState, new_mods):
    """Grow every non-fixed layer to its channels at the spec's max width; the original weights go where the
    width-1.0 sub-network reads them (the channel plan at 1.0), so width 1.0 equals the original model."""
    spec = state.spec
    if not spec.min <= 1.0 <= spec.max:
        raise WidthError(f"a spec above 1.0 must contain 1.0 (the original model), got {spec.to_dict()}")
    transposed = [n for n, m in new_mods.items() if isinstance(m, SlimConvTranspose2d)]
    if transposed:
        raise WidthError(f"widths above 1.0 are not supported for ConvTranspose2d layers ({transposed[:3]}); use a "
                         "spec with max 1.0")
    # an attention / FocalNet modulation counterpart selects from its own child layers, which widening does not grow
    composite = [f"{n} ({type(m).__name__})" for n, m in new_mods.items()
                 if isinstance(m, (SlimComposite, SelectsFromChildren))]
    if composite:
        raise WidthError(f"widths above 1.0 are not supported for layers that select from their own child layers "
                         f"({composite[:3]}: attention heads, FocalNet's modulation); use a spec with max 1.0")
    outside = [n for n in new_mods if n not in state.slots]
    if outside:
        raise ChannelGroupError(f"widening above 1.0 needs every converted layer in a traced part; {outside[:3]} "
                                "are not (convert the enclosing module)")
    old = {n: _snapshot(m) for n, m in new_mods.items()}
    new_out = {}
    for n, m in new_mods.items():
        if isinstance(m, SlimMixin):
            u, k = m.channel_unit, m.channel_multiple
            new_out[n] = m.base_out if m.fixed_out else u * spec.channels(m.base_out // u, spec.max,
                                                                           k // math.gcd(k, u))
    for g in state.graphs:
        g.refresh_full(lambda name: (None, new_out.get(name)))
    for g in state.graphs:
        for call in g.calls:
            _resize(new_mods[call.name], g.full[call.t_in], g.full[call.t_out])
    a = state.resolve(1.0)
    for n, m in new_mods.items():
        _place(m, old[n], a.geo[m._slim_slot])
    state._resolved = {}


def _snapshot(m) -> dict:
    d = {k: v.detach().clone() for k, v in list(m._parameters.items()) + list(m._buffers.items()) if v is not None}
    if isinstance(m, SlimWeightNormConv2d):
        pl = m.parametrizations.weight
        d["weight"], d["g"] = pl.original1.detach().clone(), pl.original0.detach().clone()
    return d


def _resize(m, full_in: int, full_out: int):
    """Allocate new (randomly initialised) parameters of the widened shape."""
    def new_param(name, shape, fill=None, init=None):
        t = m._parameters.get(name) if name in m._parameters else m._buffers.get(name)
        if t is None:
            return
        big = torch.empty(shape, dtype=t.dtype, device=t.device)
        if init is not None:
            init(big)
        elif fill is not None:
            big.fill_(fill)
        if name in m._parameters:
            m._parameters[name] = nn.Parameter(big, requires_grad=t.requires_grad)
        else:
            m._buffers[name] = big

    kaiming = lambda t: nn.init.kaiming_normal_(t, mode="fan_out")  # noqa: E731
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if m.depthwise:
            m.groups = full_in
            fan_in = 1
            full_out = full_in * m.dw_multiplier
        elif m.groups > 1 and m.group_mode == "width":
            gw, go = m.in_channels // m.groups, m.out_channels // m.groups
            m.groups = full_in // gw
            fan_in, full_out = gw, m.groups * go
        else:
            fan_in = full_in // m.groups
        k = tuple(m.kernel_size)
        if isinstance(m, SlimWeightNormConv2d):
            pl = m.parametrizations.weight
            v = torch.empty((full_out, fan_in, *k), dtype=pl.original1.dtype, device=pl.original1.device)
            kaiming(v)
            pl.original1 = nn.Parameter(v)
            pl.original0 = nn.Parameter(torch.linalg.vector_norm(v.flatten(1), dim=1).view(-1, 1, 1, 1))
        else:
            new_param("weight", (full_out, fan_in, *k), init=kaiming)
        new_param("bias", (full_out,), fill=0.0)
        m.in_channels, m.out_channels = full_in, full_out
    elif isinstance(m, nn.Linear):
        new_param("weight", (full_out, full_in), init=kaiming)
        new_param("bias", (full_out,), fill=0.0)
        m.in_features, m.out_features = full_in, full_out
    else:  # norm / per-channel: leading dims (switches) kept
        c = full_in
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0),
                           ("min_mean", 0.0), ("min_var", 1.0)):
            t = m._parameters.get(name, m._buffers.get(name))
            if t is not None and t.dim() >= 1 and t.shape[-1] != c:
                new_param(name, (*t.shape[:-1], c), fill=fill)
        for attr in ("num_features", "num_parameters"):
            if hasattr(m, attr):
                setattr(m, attr, c)
    if hasattr(m, "_w_cache"):
        m._w_cache.clear()
        m._out_cache.clear()
    track_data_writes(m)


def _place(m, old: dict, geo):
    """Copy the original tensors into the widened ones where the width-1.0 plan reads them."""
    with torch.no_grad():
        if isinstance(m, SlimMixin):
            if isinstance(m, SlimWeightNormConv2d):
                pl = m.parametrizations.weight
                targets = {"weight": pl.original1, "g": pl.original0}
            else:
                targets = {"weight": m._parameters.get("weight")}
            targets["bias"] = m._parameters.get("bias")
            for k, dst in targets.items():
                src = old.get(k)
                if src is None or dst is None:
                    continue
                rows = torch.as_tensor(geo.out_idx) if geo.out_idx is not None else torch.arange(src.shape[0])
                rows = rows.to(dst.device)
                if k == "weight":
                    block = dst.index_select(0, rows)
                    if geo.in_idx is None:
                        block[:, :src.shape[1]] = src
                    elif geo.in_idx.ndim == 1:
                        block[:, torch.as_tensor(geo.in_idx)] = src
                    else:  # constant group count: each output row's columns within its own group
                        g = geo.in_idx.shape[0]
                        per_rows = block.shape[0] // g
                        for gi in range(g):
                            sl = slice(gi * per_rows, (gi + 1) * per_rows)
                            block[sl, torch.as_tensor(geo.in_idx[gi])] = src[sl]
                    dst.index_copy_(0, rows, block)
                else:
                    dst.index_copy_(0, rows, src)
        else:
            idx = torch.as_tensor(geo.idx) if geo.idx is not None else None
            for k, src in old.items():
                dst = m._parameters.get(k, m._buffers.get(k))
                if dst is None or src.dim() == 0:
                    continue
                if dst.shape == src.shape:
                    dst.copy_(src)
                    continue
                cols = torch.arange(src.shape[-1]) if idx is None else idx
                dst.index_copy_(dst.dim() - 1, cols.to(dst.device), src)


# ---- channel groups (nonuniform widths) --------------------------------------------------------------------
def channel_groups(model: nn.Module) -> dict[str, list[str]]:
    """Channel groups of a converted model: layers tied by residual adds / gating share one ratio.

    Derived from the channel graph at convert time unless groups were declared. Each group is named after its
    first layer (definition order); a layer not tied to others is its own group.

    Returns:
        ``{group name: [layer names]}`` (fixed layers excluded).

    Raises:
        ChannelGroupError: the model could not be traced and no groups were declared (names the failing layer).
    """
    state = find_state(model)
    if state.groups is None:
        if state.graphs:
            state.groups = _groups_from_graphs(state)
        else:
            why = getattr(state, "trace_error", None) or "this model could not be traced at convert time"
            raise ChannelGroupError(f"nonuniform widths need channel groups: {why}")
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
