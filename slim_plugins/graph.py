"""Channel analysis (DESIGN rule 1): which channels of its full-width self every tensor carries at a width.

``convert`` traces the model once with torch.fx (width-switchable layers are leaves) and runs the traced graph on
an example input (``ShapeProp``), so every tensor's full shape is known. From the fx graph it builds a small
*channel IR*: layer calls and the channel-moving operations between them (concatenation, ``chunk``/``split``,
channel shuffle, channel slices, flatten, residual adds). Per width, :meth:`ChannelGraph.plan` computes the
*selection* of every tensor: for each channel position of the narrow runtime tensor, the index of the full-width
channel it is. A layer then uses exactly the weights that connect its input selection to its output selection
(gathered by index where a selection is not a prefix, sliced where it is).

The runtime operations are the model's own (``torch.cat``, ``chunk``, ``view``...). They act on positions, so a
selection is exact only if every operation, applied to the narrow tensor, does to its channels what it does at
full width. The planner guarantees it:

* a *free* tensor (the output of a slimmable conv/linear) may carry any subset of its channels in any order; its
  count is the layer's rounded width, its members are chosen by a matching (Glover's algorithm) so that every
  consumer's position constraint holds (a grouped conv, a shuffle or a ``chunk`` needs the ``k``-th run of
  positions to lie in the ``k``-th group of the full tensor), preferring the first channels (prefix, or
  per-group prefix);
* a *derived* tensor (concatenation, split piece, shuffle, slice, depthwise output, the model input) has the
  selection the runtime op produces from its inputs;
* tensors tied by an elementwise op (residual add, SE gating) are one *class* with one selection: free layers in
  a class adopt the selection of its derived member, or of its first layer.

Where no selection satisfies every constraint (a structure whose narrow net cannot be a sub-network of the wide
one with the model's own ops), the plan raises :class:`~slim_plugins.errors.NotExactError` naming the operation;
``convert`` checks the spec's switches (or a grid of a range) so this happens at convert time.
"""
from __future__ import annotations

import copy
import dataclasses
import heapq
import math
import operator
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .errors import ChannelGroupError, ExampleInputError, NotExactError

# ---- the channel IR ----------------------------------------------------------------------------------------------
# Op kinds. Layer roles: "decider" (conv/linear choosing its output channels), "gdecider" (grouped conv, constant
# group count), "norm" (BN and other per-channel layers: output = input selection), "dw" (group width 1,
# multiplier m: depthwise), "gwidth" (grouped conv keeping its group width), "fixed" (decider with fixed outputs),
# "gnorm" (GroupNorm: a norm whose channels split into `groups` equal runs), "param" (a tied parameter).
LAYER, INPUT, CONST, CAT, SPLIT, SHUFFLE, SLICE, FLATTEN, GROUPMAP, TIE, PASS, OPAQUE, OUTPUT, TILE, PARAM, SPLITV = (
    "layer", "input", "const", "cat", "split", "shuffle", "slice", "flatten", "groupmap", "tie", "pass", "opaque",
    "output", "tile", "param", "splitv")
# FLATTEN: channel-major merge (N, C, H, W) -> (N, C*H*W), arg H*W; TILE: channel-minor merge (N, H, W, C) ->
# (N, H*W*C), arg H*W; PARAM: a parameter tied to the channels (takes its class's selection, decides nothing);
# SPLITV: split into pieces of module-attribute sizes (arg: their full sizes), each piece's count read by the module.
_DERIVED = (INPUT, CONST, CAT, SPLIT, SHUFFLE, SLICE, FLATTEN, GROUPMAP, OPAQUE, TILE, SPLITV)


@dataclasses.dataclass
class Op:
    kind: str
    ins: tuple
    outs: tuple
    where: str                    # fx node / layer name, for messages
    arg: Any = None


@dataclasses.dataclass
class LayerCall:
    """One call of a slim layer in the traced forward."""

    name: str
    role: str
    t_in: int
    t_out: int
    groups: int = 1               # gdecider: group count; gwidth: (in, out) group widths
    mult: int = 1                 # dw: channel multiplier
    gw: tuple = (1, 1)
    unit: int = 1                 # the active count must be a multiple of it (attention: the head dim)
    pdim: int = 0                 # param: the dim of the parameter that holds the channels
    scale: tuple = (1, 1)         # module int: the channels it sizes are attribute * scale[0] // scale[1]
    unit_out: int = 1             # decider: the output count must be a multiple of it (an attention that widens)


class Sel:
    """A selection in a plan: ``idx[p]`` = full channel at runtime position ``p`` (numpy int64)."""

    __slots__ = ("idx", "full", "prefix")

    def __init__(self, idx: np.ndarray, full: int):
        self.idx, self.full = idx, int(full)
        n = len(idx)
        self.prefix = bool(n == 0 or (idx[0] == 0 and idx[-1] == n - 1 and np.all(np.diff(idx) == 1)))

    @property
    def n(self) -> int:
        return len(self.idx)

    def __eq__(self, other):
        return isinstance(other, Sel) and self.full == other.full and np.array_equal(self.idx, other.idx)

    def __repr__(self):
        return f"Sel(n={self.n}/{self.full}{', prefix' if self.prefix else ''})"


def _ar(n) -> np.ndarray:
    return np.arange(int(n), dtype=np.int64)


# ---- building the IR from torch.fx ----------------------------------------------------------------------------
_ELEMENTWISE_FN = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                   operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                   torch.minimum, torch.where, torch.addcmul, torch.lerp}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
                        "addcmul", "addcmul_", "lerp", "lerp_", "where", "masked_fill", "masked_fill_"}
_CAT_FN = {torch.cat, torch.concat, torch.concatenate}
_SPLIT = {"chunk", "split", "tensor_split"}
# Ops that mix or move channels when their `dim` is the channel dim (1).
_DIM_OPS = {"softmax", "log_softmax", "normalize", "cumsum", "cumprod", "flip", "roll", "sort", "argsort", "topk",
            "max", "min", "amax", "amin", "mean", "sum", "std", "var", "norm", "prod", "logsumexp", "any", "all",
            "argmax", "argmin", "gather", "index_select", "narrow", "select", "unbind", "median", "count_nonzero"}
# Statistics over the channel dim that a model of any width computes over its own channels (permutation-invariant).
_CHANNEL_STATS = {"normalize", "softmax", "log_softmax", "mean", "sum", "norm", "amax", "amin", "var", "std",
                  "logsumexp"}
# Functional ops that mix channels with weights of their own: the channels cannot be followed through them.
_MIXING = {"conv1d", "conv2d", "conv3d", "conv_transpose2d", "linear", "matmul", "mm", "bmm", "einsum", "bilinear",
           "group_norm", "layer_norm", "instance_norm", "batch_norm", "embedding", "scaled_dot_product_attention"}


def _fname(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


_UNKNOWN = object()


class _ShapeAwareProxy(torch.fx.Proxy):
    """A proxy whose ``len()`` / ``int()`` the tracer answers for shapes known from the example input."""

    def __len__(self):
        return self.tracer.length(self)

    def __int__(self):
        return self.tracer.to_int(self)

    def __index__(self):
        return self.tracer.to_int(self)

    def __getattr__(self, k):
        # a tensor's device / dtype is metadata, not data: answered from the example input, so a forward may build
        # an autocast context from it (EfficientViT-MIT); the graph serves the analysis only, never runs
        if k in ("device", "dtype", "is_cuda"):
            v = self.tracer.values.get(self.node, _UNKNOWN) if isinstance(self.tracer, _Tracer) else _UNKNOWN
            if torch.is_tensor(v):
                return getattr(v, k)
        return super().__getattr__(k)


class _Tracer(torch.fx.Tracer):
    """Keeps slim layers (and modules adapters mark as fx leaves) as leaves; remembers where tracing failed."""

    # buffers read by a forward are graph attributes, not constants: the analysis sees them (a mask, a bias table)
    proxy_buffer_attributes = True

    def __init__(self, leaf_names, leaf_types=(), autowrap=(), inputs=None):
        super().__init__(autowrap_functions=tuple(autowrap))
        self.leaf_names, self.leaf_types = leaf_names, tuple(leaf_types)
        self.stack: list[str] = []
        self.failed_in: str | None = None
        # the example input, run along while tracing: a branch on a shape (``if H % self.window``) is taken as it
        # is for that input (the channel plan is made for it), instead of failing the trace
        self.inputs = list(inputs) if inputs is not None else None
        self.values: dict = {}
        self.shape_only: set = set()
        self._placeholders = 0

    def _value(self, a):
        if isinstance(a, torch.fx.Node):
            v = self.values.get(a, _UNKNOWN)
            if v is _UNKNOWN:
                raise LookupError(a.name)
            return v
        if isinstance(a, (list, tuple)):
            return type(a)(self._value(x) for x in a) if not hasattr(a, "_fields") else \
                type(a)(*(self._value(x) for x in a))
        if isinstance(a, dict):
            return {k: self._value(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self._value(a.start), self._value(a.stop), self._value(a.step))
        if isinstance(a, AttrInt):
            return a.v  # the eager run is not a use of the attribute
        return a

    def _evaluate(self, node):
        if node.op == "placeholder":
            i = self._placeholders
            self._placeholders += 1
            return self.inputs[i] if i < len(self.inputs) else _UNKNOWN
        if node.op == "output":
            return _UNKNOWN
        args, kwargs = self._value(node.args), self._value(node.kwargs)
        self._eager = True  # fx's patches (module calls, parameter reads) pass straight through meanwhile
        try:
            if node.op == "get_attr":
                return _resolve(self.root, node.target)
            with torch.no_grad():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self.root.get_submodule(node.target)(*args, **kwargs)
        finally:
            self._eager = False
        return _UNKNOWN

    _eager = False

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._eager:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj):
        v = self.values.get(obj.node, _UNKNOWN)
        if v is _UNKNOWN or obj.node not in self.shape_only:  # a branch on the data stays untraceable
            return super().to_bool(obj)
        return bool(v)

    def iter(self, obj):
        v = self.values.get(obj.node, _UNKNOWN)
        if v is _UNKNOWN or obj.node not in self.shape_only or not isinstance(v, (tuple, list, torch.Size)):
            return super().iter(obj)
        return iter([obj[i] for i in range(len(v))])

    def proxy(self, node):
        return _ShapeAwareProxy(node, self)

    def length(self, obj):
        """``len()`` of a value computed from shapes only (``len(x.shape[-2:])``); anything else stays untraceable."""
        v = self.values.get(obj.node, _UNKNOWN)
        if v is _UNKNOWN or obj.node not in self.shape_only or not isinstance(v, (tuple, list, torch.Size)):
            raise RuntimeError("'len' is not supported in symbolic tracing by default (the value is not a shape "
                               "known from the example input)")
        return len(v)

    def to_int(self, obj):
        """``int()`` of a number computed from shapes only (SwinIR's ``int(windows.shape[0] / (H * W / ws / ws))``):
        its value for the example input, as a branch on a shape is taken. The graph records it as a literal, which
        the analysis never follows as a channel count (a literal that sizes a channel dim is refused), so the
        channel plan cannot depend on it; anything computed from tensor data stays untraceable."""
        v = self.values.get(obj.node, _UNKNOWN)
        if v is _UNKNOWN or obj.node not in self.shape_only or torch.is_tensor(v) or \
                not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError("int() of a traced value is not supported in symbolic tracing (the value is not a "
                            "number known from the example input's shapes)")
        return int(v)

    def is_leaf_module(self, m, qualname):
        if qualname in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            # an adapter's untraceable module is one op, unless slim layers inside must be seen
            return not any(n.startswith(qualname + ".") for n in self.leaf_names)
        return super().is_leaf_module(m, qualname)

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        try:
            return super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        except NotImplementedError:
            if kind != "placeholder" or not args:
                raise
            # a default fx cannot store (mmdet's YOLOV3Neck: ``feats=Tuple[Tensor]``); the analysis passes inputs
            return super().create_proxy(kind, target, (), kwargs, *rest, **kw)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if self.stack:
            node.meta["slim_module"] = self.stack[-1]  # the module whose forward made it, for messages
        if self.inputs is not None:
            try:
                v = self.values[node] = self._evaluate(node)
            except Exception:  # an op the eager run cannot repeat: its branches stay untraceable
                v = self.values[node] = _UNKNOWN
            # a value computed from shapes only (not from tensor data): a branch on it is fixed by the input size
            if v is not _UNKNOWN and not torch.is_tensor(v) and (
                    (node.op == "call_method" and node.target in ("size", "dim", "numel")) or
                    (node.op == "call_function" and _fname(node.target) == "getattr" and len(node.args) > 1 and
                     node.args[1] in ("shape", "ndim")) or
                    (node.op in ("call_function", "call_method") and node.all_input_nodes and
                     all(a in self.shape_only for a in node.all_input_nodes))):
                self.shape_only.add(node)
        return node

    def call_module(self, m, forward, args, kwargs):
        if self._eager:
            return forward(*args, **kwargs)
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _nested_inputs(model: nn.Module, inputs, n_inputs: int | None) -> dict:
    """``{parameter name: (PH, PH, ...)}`` for each positional input given as a tuple / list of tensors."""
    import inspect

    if not inputs or n_inputs is None:
        return {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())[:n_inputs]
    except (TypeError, ValueError):
        return {}
    out = {}
    for p, a in zip(params, inputs):
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and isinstance(a, (tuple, list)) and a and \
                all(torch.is_tensor(t) for t in a):
            out[p.name] = type(a)(torch.fx._symbolic_trace.PH for _ in a)
    return out


def _concrete_defaults(model: nn.Module, n_inputs: int) -> dict:
    """Forward parameters after the first ``n_inputs`` whose default is ``None`` / a bool / a number / a string
    (``mask=None``, ``is_causal=False``): traced at that default, as the analysis forward calls them."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is inspect.Parameter.empty:
            continue
        if p.default is None or isinstance(p.default, (bool, int, float, str)):
            out[p.name] = p.default
    return out


class AttrTag:
    """Where a traced integer came from: attribute ``attr`` of the module at ``path``; ``escaped`` once the traced
    forward used it in Python (arithmetic, a comparison, a size it passed to torch itself), where the analysis
    cannot see what it decides."""

    __slots__ = ("path", "attr", "escaped", "live", "base", "scale")

    def __init__(self, path: str, attr: str, base: "AttrTag | None" = None, scale=(1, 1)):
        self.path, self.attr, self.escaped, self.live = path, attr, False, True
        self.base, self.scale = base, scale  # a derived value: base * scale[0] // scale[1] (self.c // 2)

    @property
    def root(self) -> "AttrTag":
        return self.base or self

    @property
    def key(self) -> tuple:
        return (self.root, self.scale)

    @property
    def name(self) -> str:
        return _join_name(self.path, self.attr)


def _escape(name):
    base = getattr(int, name)

    def f(self, *args):
        if any(isinstance(a, torch.fx.Proxy) for a in args):
            return NotImplemented  # the proxy's reflected op records a graph node instead
        tag = self.tag
        live = tag.root.live  # tracing (afterwards, e.g. while the builder reads the value, nothing escapes)
        if live and name in ("__floordiv__", "__mul__", "__rmul__") and len(args) == 1 and \
                isinstance(args[0], int) and not isinstance(args[0], bool) and args[0] > 0:
            k = args[0].v if isinstance(args[0], AttrInt) else args[0]  # self.c // 2: scales with the attribute
            if isinstance(args[0], AttrInt):
                args[0].tag.root.escaped = True  # the other operand is a constant here
            m, d = tag.scale
            if name == "__floordiv__" and self.v % k == 0:
                g = math.gcd(m, d * k)
                return AttrInt(self.v // k, AttrTag(tag.path, tag.attr, tag.root, (m // g, d * k // g)))
            if name != "__floordiv__":
                g = math.gcd(m * k, d)
                return AttrInt(self.v * k, AttrTag(tag.path, tag.attr, tag.root, (m * k // g, d // g)))
        if live and name == "__sub__" and len(args) == 1 and type(args[0]) is AttrInt and \
                self.tag.scale == (1, 1) and args[0].tag.scale == (1, 1) and 0 < args[0].v < self.v:
            return AttrDiff(self.v - args[0].v, self, args[0])  # self.dim - self.pdim: a split's other piece
        if live:
            tag.root.escaped = True
        return base(self, *args)

    f.__name__ = name
    return f


class _TracedInt(int):
    """An ``int`` that carries where it came from while tracing; copies and pickles are plain ints."""

    def __reduce__(self):
        return (int, (int(self),))

    def __deepcopy__(self, memo):
        return int(self)

    __hash__ = int.__hash__


# the int operations a traced int intercepts (a use the analysis cannot see marks its attributes escaped)
_INT_OPS = ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__", "__rfloordiv__",
            "__truediv__", "__rtruediv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__neg__", "__lt__",
            "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__index__", "__int__", "__float__", "__bool__",
            "__lshift__", "__rshift__", "__and__", "__or__", "__divmod__")


class AttrInt(_TracedInt):
    """An ``int`` attribute of a module, read while tracing: it lands in the graph's arguments with its origin
    (``tag``), so a literal head count in ``reshape(B, N, 3, self.num_heads, d)`` is known to be ``num_heads``."""

    def __new__(cls, v, tag: AttrTag):
        obj = super().__new__(cls, v)
        obj.tag, obj.v = tag, int.__int__(v) if isinstance(v, AttrInt) else v  # v: the plain value
        return obj


for _n in _INT_OPS:
    setattr(AttrInt, _n, _escape(_n))


class AttrDiff(_TracedInt):
    """``a - b`` of two module int attributes read while tracing (SHViT's ``split(x, [self.pdim, self.dim -
    self.pdim])``): a split's remainder piece. Only a split that also sizes its input by ``a`` and another piece by
    ``b`` claims it (both attributes then follow the width, and the module computes the remainder from them); any
    other use counts as a use of both attributes that sizes no channels, so they stay whole."""

    def __new__(cls, v, left: AttrInt, right: AttrInt):
        obj = super().__new__(cls, v)
        obj.left, obj.right, obj.v = left, right, v
        return obj


def _diff_escape(name):
    base = getattr(int, name)

    def f(self, *args):
        if any(isinstance(a, torch.fx.Proxy) for a in args):
            return NotImplemented
        for t in (self.left.tag, self.right.tag):
            if t.root.live:
                t.root.escaped = True
        return base(self.v, *args)  # (int(self) would come back here)

    f.__name__ = name
    return f


for _n in _INT_OPS:
    setattr(AttrDiff, _n, _diff_escape(_n))


def _tag_ints(root: nn.Module) -> list[AttrTag]:
    """Replace each module's plain ``int`` attributes by :class:`AttrInt` (restored with the module snapshot)."""
    tags, seen = [], set()
    for path, m in root.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        for k, v in list(m.__dict__.items()):
            if k.startswith("_"):
                continue
            if type(v) is int:
                tag = AttrTag(path, k)
                tags.append(tag)
                m.__dict__[k] = AttrInt(v, tag)
            elif type(v) is tuple and any(type(x) is int for x in v):  # a shape: (N, N, num_heads)
                items = []
                for i, x in enumerate(v):
                    if type(x) is int:
                        tags.append(AttrTag(path, f"{k}[{i}]"))
                        x = AttrInt(x, tags[-1])
                    items.append(x)
                m.__dict__[k] = tuple(items)
    return tags


def trace(model: nn.Module, leaf_names, leaf_types=(), autowrap=(), n_inputs: int | None = None,
          snapshot=None, caches=(), inputs=None) -> torch.fx.GraphModule:
    """``torch.fx`` trace of ``model`` with the given leaves (``n_inputs``: the positional inputs the analysis
    forward passes; later parameters with plain defaults are traced at their defaults). The model is restored to
    ``snapshot`` (:func:`snapshot_modules`; taken here when not given) before the graph module is built.

    Raises:
        ChannelGroupError: fx cannot trace the model (names the layer whose forward failed).
    """
    # a positional input that is a tuple / list of tensors (an FPN's backbone features) becomes one placeholder per
    # tensor (fx's pytree concrete_args), so len() / indexing / iteration of it trace
    nested = _nested_inputs(model, inputs, n_inputs)
    flat = None
    if inputs is not None:
        flat = []
        for a in inputs:
            flat.extend(a if isinstance(a, (tuple, list)) and a and all(torch.is_tensor(t) for t in a) else [a])
    tracer = _Tracer(set(leaf_names), leaf_types, autowrap,
                     inputs=[a.clone() if torch.is_tensor(a) else a for a in flat] if flat is not None else None)
    snap = snapshot_modules(model) if snapshot is None else snapshot
    consts: dict = {}
    tags: list = []
    memos: list = []
    try:
        try:
            tags = _tag_ints(model)
            for m in model.modules():  # registered caches filled by an earlier forward: traced as if empty
                for k in caches:
                    if type(m.__dict__.get(k)) is dict:
                        m.__dict__[k] = {}
            concrete = _concrete_defaults(model, n_inputs) if n_inputs is not None else {}
            concrete.update(nested)
            graph = tracer.trace(model, concrete_args=concrete or None)
            # tensor constants fx stored on the model while tracing (`_tensor_constant0`): kept for the graph only
            consts = {n.target: _resolve(model, n.target) for n in graph.nodes
                      if n.op == "get_attr" and n.target.rpartition(".")[2].startswith("_tensor_constant")}
        finally:  # a forward that assigns attributes (EDSR's self.mean) left fx proxies on the model
            # the eager values (activations, views of parameters) go now, not when the tracer's reference cycles
            # are collected: a view keeps its parameter from torch.utils.swap_tensors (``module.to()``)
            tracer.values.clear()
            tracer.inputs = None
            for tag in tags:
                tag.live = False
            paths = {id(m): n for n, m in model.named_modules()}
            memos = [(paths.get(id(m), "?"), k) for m, k in restore_modules(snap)]
    except Exception as e:  # fx raises many types; re-raise one that names the layer
        where = tracer.failed_in or "<top level forward>"
        raise ChannelGroupError(
            f"torch.fx cannot trace {type(model).__name__} (failed inside layer {where!r}: {type(e).__name__}: "
            f"{e}). Convert only submodules that trace (scope=[...], e.g. a detector's backbone), or declare channel "
            "groups: "
            "slim.convert(model, spec, groups={'name': ['layer', ...]}) (exactness of concatenations and splits is "
            "then not checked)") from e
    # The graph module's attributes come from the restored model (a dict root: the model gets nothing new).
    root = {n.target: consts[n.target] if n.target in consts else _resolve(model, n.target)
            for n in graph.nodes if n.op in ("get_attr", "call_module")}
    gm = torch.fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.meta["slim_memos"] = memos  # (module path, attr) of dicts / lists the traced forward filled
    return gm


def _resolve(model, target: str):
    obj = model
    for part in target.split(".") if target else ():
        obj = getattr(obj, part)
    return obj


def snapshot_modules(root: nn.Module):
    """What a forward may change on the modules of ``root``: their attributes, parameter/buffer/child tables,
    buffer values and parameter write counters."""
    mods = []
    for m in root.modules():
        inner = {k: dict(m.__dict__[k]) for k in ("_parameters", "_buffers", "_modules") if k in m.__dict__}
        bufs = {k: b.detach().clone() for k, b in m._buffers.items() if b is not None}
        vers = {k: _param_state(p) for k, p in m._parameters.items() if p is not None}
        conts = {k: (v, copy.copy(v)) for k, v in m.__dict__.items()
                 if type(v) in (dict, list) and k not in inner and not k.startswith("_slim")}
        mods.append((m, dict(m.__dict__), inner, bufs, vers, conts))
    return mods


def _param_state(p: torch.Tensor):
    """What tells whether a forward writes ``p`` in place: its write counter, or for an inference tensor (which
    keeps none) a copy of its values."""
    return p.detach().clone() if p.is_inference() else p._version


def _param_written(p: torch.Tensor, before) -> bool:
    if isinstance(before, torch.Tensor):  # the same values, NaN where NaN was (torch.equal: NaN != NaN)
        return not (p.shape == before.shape and bool(((p == before) | (p.isnan() & before.isnan())).all()))
    return p.is_inference() or p._version != before


def restore_modules(snap) -> list:
    """Put back what :func:`snapshot_modules` recorded; returns ``(module, attr)`` of the dicts / lists the
    forward filled in place (memo caches such as timm's ``attention_bias_cache``), emptied back."""
    memos, written = [], []
    for m, d, inner, bufs, vers, conts in snap:
        m.__dict__.clear()
        m.__dict__.update(d)
        for k, v in inner.items():
            m.__dict__[k].clear()
            m.__dict__[k].update(v)
        for k, (obj, saved) in conts.items():
            same = len(obj) == len(saved) and (
                all(a is b for a, b in zip(obj, saved)) if type(obj) is list else
                all(x in obj and obj[x] is saved[x] for x in saved))
            if not same:
                memos.append((m, k))
                obj.clear()
                obj.extend(saved) if type(obj) is list else obj.update(saved)
        with torch.no_grad():
            for k, b in bufs.items():
                cur = m._buffers.get(k)
                if cur is not None and not torch.equal(cur, b):
                    cur.copy_(b)
        changed = [k for k, v in vers.items() if _param_written(m._parameters[k], v)]
        if changed and not written:  # raised once every module is back
            written = [changed, type(m).__name__]
    if written:
        raise ExampleInputError(f"the analysis forward wrote parameters {written[0]} of {written[1]} in place; "
                                "convert cannot analyse a model whose forward changes its weights")
    return memos


def _shape(node):
    tm = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _carried(s, t) -> list:
    """For each dim of ``t`` (a reshape of ``s``), the dim of ``s`` it carries unchanged (same size and the same
    product of the dims before it, so the same elements in row-major order), else ``None``."""
    pre = [_prod(s[:i]) for i in range(len(s))]
    out = []
    for j, n in enumerate(t):
        pj = _prod(t[:j])
        out.append(next((i for i in range(len(s)) if s[i] == n and pre[i] == pj), None))
    return out


def _dim_map(name, node, s, t) -> list | None:
    """For each dim of the result ``t`` of layout op ``name`` on a tensor of shape ``s``: the source dim it carries."""
    args = node.args[1:]
    if name in ("permute",):
        perm = args if args and not isinstance(args[0], (list, tuple)) else (args[0] if args else
                                                                               node.kwargs.get("dims"))
        if perm is None or not all(isinstance(p, int) for p in perm) or len(perm) != len(s):
            return None
        return [p % len(s) for p in perm]
    if name in ("transpose", "swapaxes"):
        if len(args) < 2 or not all(isinstance(a, int) for a in args[:2]):
            return None
        a, b = args[0] % len(s), args[1] % len(s)
        m = list(range(len(s)))
        m[a], m[b] = m[b], m[a]
        return m
    if name == "movedim":
        if len(args) < 2 or not all(isinstance(a, int) for a in args[:2]):
            return None
        src, dst = args[0] % len(s), args[1] % len(s)
        m = [i for i in range(len(s)) if i != src]
        m.insert(dst, src)
        return m
    if name in ("expand", "expand_as", "repeat"):
        off = len(t) - len(s)
        return [j - off if j - off >= 0 and (s[j - off] == t[j] or name != "repeat") else None for j in range(len(t))]
    if name in _CAST:
        return list(range(len(s))) if tuple(s) == tuple(t) else None
    return _carried(s, t)


# Tensor methods that make a new tensor of a given shape (the source only gives dtype / device).
_NEW_TENSOR = {"new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"}
# Tensor methods that keep values and layout (a parameter read through them is still that parameter).
_CAST = {"to", "type_as", "float", "half", "double", "bfloat16", "contiguous", "clone", "detach", "requires_grad_"}
_LAYOUT = {"view", "reshape", "view_as", "reshape_as", "flatten", "transpose", "permute", "swapaxes", "contiguous", "unflatten", "squeeze",
           "unsqueeze", "movedim", "channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "expand", "expand_as",
           "repeat"}


def _shape_index(a) -> tuple:
    """``(x, j)`` when graph value ``a`` reads dim ``j`` of node ``x``'s size: ``x.shape[j]``, ``x.size(j)``,
    ``x.size()[j]``, or an item of a slice of them (torchvision MViT's ``B, N, C = x.shape[:3]``); else
    ``(None, None)``."""
    if a.op == "call_method" and a.target == "size" and len(a.args) == 2:
        return a.args[0], a.args[1]
    if not (a.op == "call_function" and _fname(a.target) == "getitem" and isinstance(a.args[0], torch.fx.Node)):
        return None, None
    base, j = a.args
    if isinstance(j, int) and base.op == "call_function" and _fname(base.target) == "getitem" and \
            isinstance(base.args[0], torch.fx.Node) and isinstance(base.args[1], slice):
        sl = base.args[1]
        if j < 0 or sl.step not in (None, 1) or not isinstance(sl.start, (int, type(None))) or (sl.start or 0) < 0:
            return None, None
        base, j = base.args[0], (sl.start or 0) + j
    if base.op == "call_function" and _fname(base.target) == "getattr" and base.args[1] == "shape":
        return base.args[0], j
    if base.op == "call_method" and base.target == "size" and len(base.args) == 1:
        return base.args[0], j
    return None, None


class _Builder:
    """Walks an fx graph (with ``tensor_meta`` from ShapeProp) and emits channel IR ops.

    Every channel-carrying tensor records which dim holds its channels (``cdim``: 1 for ``(N, C, H, W)``, the last
    for tokens ``(N, L, C)`` and channels-last maps), followed through permutes, transposes and reshapes.
    ``params`` holds the fx targets of the parameters / buffers of non-slim modules; one the model ties
    elementwise to its channels (class and position tokens, position embeddings, layer scales): it
    becomes a ``param`` call that takes the selection of the channels it is tied to.
    """

    def __init__(self, gm: torch.fx.GraphModule, roles: dict, prefix: str, params=None,
                 layout_fns=frozenset(), tile_fns=None):
        self.gm, self.roles, self.prefix = gm, roles, prefix
        self.layout_fns, self.tile_fns = layout_fns, tile_fns or {}
        self.host_params = set(params or ())
        self.ops: list[Op] = []
        self.calls: list[LayerCall] = []
        self.full: list[int] = []       # full channel count of each tensor id (at trace time)
        self.rank: list[int] = []
        self.cdim: list = []            # the dim holding the channels (None: no channel dim)
        self.val: dict = {}             # fx node -> tensor id / tuple of ids / _Factored / python value
        self.pmap: dict = {}            # tensor id -> (param target, source dim of each dim) for parameter reads
        self.param_ids: dict = {}       # param target -> (tensor id, channel dim)
        self.seen_attrs: set = set()    # get_attr targets read by the forward
        self.fixed_layers: set = set()  # linear layers applied along a non-channel dim (token mixing): kept whole
        self.made_by: dict = {}         # tensor id -> kind of the op that produced it
        self.mods = dict(gm.named_modules())
        self.int_ids: dict = {}         # AttrTag -> param tensor id of a module int that sizes a channel dim
        self.int_claims: dict = {}      # AttrTag -> graph arguments the analysis accounted for
        self.whole_params: set = set()  # param targets read as one tensor together with whole ones: kept whole

    def new(self, shape, cdim=1) -> int:
        r = len(shape) if shape is not None else 0
        if shape is not None and cdim is not None and r >= 2 and -r <= cdim < r:
            cdim %= r
            self.full.append(int(shape[cdim]))
        else:
            cdim = None
            self.full.append(1)
        self.rank.append(r)
        self.cdim.append(cdim)
        return len(self.full) - 1

    def emit(self, kind, ins, outs, where, arg=None):
        self.ops.append(Op(kind, tuple(ins), tuple(outs), where, arg))
        for t in outs:
            self.made_by[t] = kind

    def where(self, node) -> str:
        """``'<op> in <module>'`` for messages (the fx node name alone says little)."""
        mod = node.meta.get("slim_module")
        full = f"{self.prefix}.{mod}" if self.prefix and mod else (mod or self.prefix)
        return f"{_fname(node.target)} ({node.name}) in {full!r}" if full else f"{_fname(node.target)} ({node.name})"

    def tensor_ids(self, a) -> list[int]:
        if isinstance(a, torch.fx.Node):
            v = self.val.get(a)
            if isinstance(v, int) and not isinstance(v, bool) and self._is_tid(a):
                return [v]
            if isinstance(v, tuple) and v and v[0] == "tuple":
                return [t for t in v[1] if t is not None]
            if isinstance(v, _Runs):  # read by an op that is not a layout op: it must stay whole
                return list(v.heads)
            if isinstance(v, _Factored):
                return [v.src]
            return []
        if isinstance(a, (list, tuple)):
            return [t for x in a for t in self.tensor_ids(x)]
        if isinstance(a, dict):
            return [t for x in a.values() for t in self.tensor_ids(x)]
        return []

    def _is_tid(self, node):
        return node in self._tids

    def build(self):
        self._tids = set()
        for node in self.gm.graph.nodes:
            self.visit(node)
        self._check_ints()
        for target in sorted(self.whole_params):
            hit = self.param_ids.get(target)  # also tied to channels elsewhere: it must stay whole there too
            if hit is not None:
                self.keep_whole(hit[0], f"parameter {_join_name(self.prefix, target)!r}")
        return self

    # -- module ints that size channel dims (num_heads) ------------------------------------------------------
    def int_root(self, tag: AttrTag, value: int) -> int:
        """The ``param`` tensor of a module int attribute (``num_heads``) that sizes a channel dim: at a width the
        module reads it as that dim's active count (one per attribute, tied to every dim it sizes)."""
        t = self.int_ids.get(tag.key)
        if t is None:
            t = len(self.full)
            self.full.append(int(value))
            self.rank.append(1)
            self.cdim.append(0)
            name = tag.name
            self.emit(PARAM, (), (t,), f"attribute {_join_name(self.prefix, name)!r}")
            self.calls.append(LayerCall(name, "param", t, t, pdim=0, scale=tag.scale))
            self.int_ids[tag.key] = t
        return t

    def claim_int(self, lit, t: int) -> None:
        """``lit`` (an :class:`AttrInt`) sizes the channel dim of tensor ``t``: tie the attribute to it."""
        r = self.int_root(lit.tag, int(lit))
        self.int_claims[lit.tag.key] = self.int_claims.get(lit.tag.key, 0) + 1
        self.tie_counts(r, t, f"attribute {lit.tag.name!r}")

    def chan_size(self, a):
        """``(t, div)`` when graph value ``a`` is the channel count of tensor ``t`` (``x.shape[k]``,
        ``x.size(k)``), floor-divided by the int ``div`` (1 if not divided); else ``None``."""
        if not isinstance(a, torch.fx.Node):
            return None
        if a.op == "call_function" and a.target is operator.floordiv and len(a.args) == 2 and \
                isinstance(a.args[1], int) and a.args[1] > 0:
            inner = self.chan_size(a.args[0])
            return (inner[0], a.args[1]) if inner is not None and inner[1] == 1 else None
        x, j = _shape_index(a)
        if isinstance(x, torch.fx.Node) and x in self._tids and isinstance(j, int):
            t = self.val[x]
            if self.cdim[t] is not None and self.rank[t] and j % self.rank[t] == self.cdim[t]:
                return (t, 1)
        return None

    def tie_counts(self, a: int, b: int, where: str) -> None:
        """Tensors ``a`` and ``b`` carry one channel set (a size read from one sizes the other)."""
        x = self.new((1, self.full[b]), 1)
        self.emit(TIE, (a, b), (x,), where)

    def heads_of(self, t: int, d: int, where: str) -> int:
        """The heads (groups of ``d`` channels) of tensor ``t``."""
        g = self.new((1, self.full[t] // d), 1)
        self.emit(GROUPMAP, (t,), (g,), where, (d, 1))
        return g

    def claim_node(self, node, tag) -> None:
        """An arithmetic node that reads a hosted attribute (``C // self.num_heads``), accounted for once."""
        seen = self.__dict__.setdefault("_claimed_nodes", set())
        if node not in seen:
            seen.add(node)
            self.int_claims[tag.key] = self.int_claims.get(tag.key, 0) + 1

    def _check_ints(self) -> None:
        """A hosted int must be read only where the analysis saw it size a channel dim; any other use (Python
        arithmetic or a comparison in the forward, another argument) keeps its tensors whole."""
        if not self.int_ids:
            return
        uses: dict = {}

        def walk(a):
            if isinstance(a, AttrInt):
                uses[a.tag.key] = uses.get(a.tag.key, 0) + 1
            elif isinstance(a, AttrDiff):
                walk((a.left, a.right))
            elif isinstance(a, (list, tuple)):
                for x in a:
                    walk(x)
            elif isinstance(a, dict):
                for x in a.values():
                    walk(x)
            elif isinstance(a, slice):
                walk((a.start, a.stop, a.step))

        for node in self.gm.graph.nodes:
            walk(node.args)
            walk(node.kwargs)
        roots: dict = {}
        for key in self.int_ids:
            roots.setdefault(key[0], []).append(key)
        for key, t in self.int_ids.items():
            tag = key[0]
            # every use seen sizing channels, and one scale of the attribute (the module reads one value)
            other = len(roots[tag]) > 1 or any(k[0] is tag and k not in self.int_ids for k in uses)
            if tag.escaped or other or uses.get(key, 0) != self.int_claims.get(key, 0):
                why = "computes with it in Python" if tag.escaped else "passes it where it does not size channels"
                self.emit(OPAQUE, (t,), (), f"attribute {_join_name(self.prefix, tag.name)!r}",
                          f"the forward {why}, so it cannot follow the width")

    # -- helpers -------------------------------------------------------------------------------------------
    def out_tensor(self, node, kind, ins, arg=None, cdim=1):
        t = self.new(_shape(node), cdim)
        self._tids.add(node)
        self.val[node] = t
        self.emit(kind, ins, (t,), self.where(node), arg)
        return t

    def alias(self, node, src: int, cdim=None):
        t = self.new(_shape(node), self.cdim[src] if cdim is None else cdim)
        self._tids.add(node)
        self.val[node] = t
        self.emit(PASS, (src,), (t,), node.name)
        return t

    def channel_inputs(self, node):
        """Tensor-id inputs of ``node`` that carry channels (rank >= 2, a channel dim)."""
        ids = self.tensor_ids(list(node.args) + list(node.kwargs.values()))
        return [t for t in ids if self.rank[t] >= 2 and self.cdim[t] is not None]

    def opaque(self, node, why, cdim=None):
        ins = self.tensor_ids(list(node.args) + list(node.kwargs.values()))
        shape = _shape(node)
        if shape is not None:
            if cdim is None:  # where the channels would be: as in an input of the same rank and size there
                cdim = next((self.cdim[t] for t in ins if self.cdim[t] is not None and self.rank[t] == len(shape)
                             and shape[self.cdim[t]] == self.full[t]), None)
            self.out_tensor(node, OPAQUE, ins, why, cdim)
        else:
            self.val[node] = None
            self.emit(OPAQUE, ins, (), self.where(node), why)

    def _whole_inputs(self, node, name):
        """``None`` unless every tensor input of ``node`` is always whole (the model input, an ``arange``, a buffer,
        parameters read alongside them): then its result holds no channels the width changes, whatever its shape
        (CSATv2's colour and DCT stem). Else ``(params, sets)``: the parameters it reads, which must be read whole
        (``x * self.imagenet_std``, a RoPE table from its bands), and the channel sets its view sizes read, which
        must stay whole (PVT v2's ``reshape(B, N, C)`` of a single-head attention output). Records nothing."""
        nodes = [a for a in node.all_input_nodes if a in self._tids]
        if not nodes or any(not isinstance(self.val.get(a), int) for a in nodes):
            return None
        whole = [a for a in nodes if self.val[a] not in self.pmap]
        if not whole or any(self.made_by.get(self.val[a]) not in (INPUT, CONST) for a in whole):
            return None
        # a size read from a channel tensor: a view of a whole tensor to it keeps that set whole; any other op (an
        # expand, a fill) follows the width, so its result is not whole
        sizes = self._sizes(node, name) or ()
        read = [(a, self.chan_size(a)) for a in node.all_input_nodes if a not in self._tids]
        read = [(a, cs[0]) for a, cs in read if cs is not None and not self._always_full(cs[0])]
        if any(a not in sizes for a, _ in read):
            return None
        return [self.pmap[self.val[a]][0] for a in nodes if self.val[a] in self.pmap], [t for _, t in read]

    def _always_full(self, t) -> bool:
        return self.made_by.get(t) in (INPUT, CONST)

    def rehome(self, t, cdim, shape) -> int:
        """A tensor that is always whole (the model input, a constant) read with its channels on ``cdim``."""
        n = self.new(shape, cdim)
        self.emit(INPUT, (), (n,), f"input read along dim {cdim}")
        return n

    def _param_literal(self, node, name, j, rank, i, target, dims):
        """Source dim of result dim ``j`` of a parameter view: ``None`` for a literal size, kept for a module int
        (claimed once the parameter is tied along that dim)."""
        lit = self._literal_at(node, name, j, rank)
        if lit is None or i is None:
            return i
        if not isinstance(lit, AttrInt) or dims[i] is None:
            return None
        hit = self.param_ids.get(target)
        if hit is not None and hit[1] == dims[i]:
            self.claim_int(lit, hit[0])
        else:
            self.__dict__.setdefault("_pending_ints", []).append((lit, target, dims[i]))
        return i

    def param_root(self, target, pdim) -> int | None:
        """The ``param`` tensor of a host parameter with its channels on ``pdim`` (one per parameter)."""
        hit = self.param_ids.get(target)
        if hit is not None:
            return hit[0] if hit[1] == pdim else None
        shape = tuple(self._attr_shape(target))
        t = len(self.full)
        self.full.append(int(shape[pdim]))
        self.rank.append(len(shape))
        self.cdim.append(pdim)
        self.emit(PARAM, (), (t,), f"parameter {_join_name(self.prefix, target)!r}")
        self.calls.append(LayerCall(target, "param", t, t, pdim=pdim))
        self.param_ids[target] = (t, pdim)
        for lit, tg, pd in self.__dict__.get("_pending_ints", []):
            if tg == target and pd == pdim:
                self.claim_int(lit, t)
        return t

    def _attr_shape(self, target):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj.shape

    # -- the visitor -------------------------------------------------------------------------------------------
    def visit(self, node):
        op = node.op
        if op in ("placeholder", "get_attr"):  # the model input / a constant: all channels, always
            shape = _shape(node)
            if shape is not None:
                t = self.out_tensor(node, INPUT if op == "placeholder" else CONST, ())
                if op == "get_attr":
                    self.seen_attrs.add(node.target)
                    owner = node.target.rpartition(".")[0]
                    if owner in self.roles:  # a layer's weight used by another forward (F.linear(x, self.qkv.weight))
                        self.fixed_layers.add(owner)
                    if node.target in self.host_params and len(shape) >= 1:
                        self.pmap[t] = (node.target, list(range(len(shape))))
            else:
                self.val[node] = None
            return
        if op == "output":
            self.emit(OUTPUT, self.tensor_ids(node.args), (), "output")
            return
        if op == "call_module":
            return self.visit_module(node)
        name = _fname(node.target)
        if name == "getitem":
            return self.visit_getitem(node)
        if isinstance(node.target, type) and issubclass(node.target, tuple):  # a namedtuple of outputs
            ids = [self.tensor_ids(a) for a in list(node.args) + list(node.kwargs.values())]
            self.val[node] = ("tuple", [i[0] if len(i) == 1 else None for i in ids])
            return
        shape = _shape(node)
        first = node.args[0] if node.args else None
        fv = self.val.get(first) if isinstance(first, torch.fx.Node) else None
        for a in node.all_input_nodes:
            if a is not first and isinstance(self.val.get(a), _Factored):
                self._materialize(a, self.where(node))  # x * attn.view(B, r, C // r, 1, 1) (ResNeSt)
        if isinstance(fv, _Factored):
            return self.visit_layout(node, name)
        if isinstance(fv, _Runs):
            return self.visit_runs(node, name, fv)
        if any(isinstance(self.val.get(a), _Runs) for a in node.all_input_nodes):
            return self.opaque(node, f"{name} of a tensor split into heads")
        if isinstance(fv, int) and fv in self.pmap and first in self._tids and shape is not None and \
                self._param_pointwise(node, name, fv, shape):  # a parameter scaled by a number (self.gamma * 2)
            t = self.out_tensor(node, CONST, ())
            self.pmap[t] = self.pmap[fv]
            return
        if isinstance(fv, int) and fv in self.pmap and first in self._tids and shape is not None and \
                (name in _LAYOUT or name in _CAST or node.target in self.layout_fns):  # a parameter read through a
            target, dims = self.pmap[fv]                                             # view, a cast or a resample
            if node.target in self.layout_fns:  # acts on tokens / pixels: the last dim stays the last
                fs = _shape(first)
                m = [None] * (len(shape) - 1) + [len(fs) - 1] if shape[-1] == fs[-1] else None
            else:
                m = _dim_map(name, node, _shape(first), shape)
                if m is not None:  # a literal size (scale.view(self.shape)) cannot follow a sliced parameter,
                    m = [self._param_literal(node, name, j, len(shape), i, target, dims)  # unless it is a module
                         for j, i in enumerate(m)]                                      # attribute (num_heads)
            t = self.out_tensor(node, CONST, ())
            if m is not None:
                self.pmap[t] = (target, [dims[i] if i is not None else None for i in m])
            return
        ins = self.channel_inputs(node)
        whole = self._whole_inputs(node, name)
        if whole is not None:  # computed from whole tensors only (XCiT's Fourier positions, a RoPE table)
            self.whole_params.update(whole[0])
            for t in whole[1]:
                self.keep_whole(t, self.where(node))
            if self._is_tuple_result(node):
                return self._const_tuple(node)
            if shape is not None:
                return self.out_tensor(node, CONST, ())
        if name in _NEW_TENSOR and shape is not None:  # x.new_empty(shape): a fresh tensor, not x's channels
            self.out_tensor(node, CONST, ())
            return
        if op == "call_method" and name in ("size", "dim", "numel", "type", "is_contiguous", "__len__") or \
                name in ("getattr", "len") or (shape is None and not self._is_tuple_result(node)):
            self.val[node] = None  # metadata: not a tensor
            return
        params = [t for t in self.tensor_ids(list(node.args) + list(node.kwargs.values())) if t in self.pmap]
        if not ins or all(t in self.pmap for t in ins):
            if params and (node.target in _ELEMENTWISE_FN or name in _ELEMENTWISE_METHODS):
                return self.visit_tie(node, [t for t in ins if t not in self.pmap])
            if self._is_tuple_result(node):
                return self._const_tuple(node)
            self.out_tensor(node, CONST, ())
            return
        ins = [t for t in ins if t not in self.pmap]
        if name in ("matmul", "bmm"):
            return self.visit_matmul(node, ins)
        if name == "scaled_dot_product_attention":
            return self.visit_sdpa(node, ins)
        if name in _MIXING:
            return self.opaque(node, f"{name} mixes channels")
        if node.target in _CAT_FN or name in ("cat", "concat", "concatenate"):
            return self.visit_cat(node)
        if name in _SPLIT:
            return self.visit_split(node)
        if name in _LAYOUT:
            return self.visit_layout(node, name)
        if node.target in _ELEMENTWISE_FN or name in _ELEMENTWISE_METHODS or len(ins) >= 2 or params:
            return self.visit_tie(node, ins)
        if name in _CHANNEL_STATS and self._dim_hits_channels(node) and shape is not None:
            # a statistic over the active channels (GRN's mean, SwiftFormer's L2 normalize): the narrow net
            # computes what the stock model of that width does, as a LayerNorm does
            if name in ("normalize", "softmax", "log_softmax"):
                if shape != _shape(node.args[0]):
                    return self.opaque(node, f"{name} over the channel dim")
                return self.alias(node, ins[0])
            k = self.cdim[ins[0]]
            keep = len(shape) == self.rank[ins[0]] and shape[k] == 1
            return self.out_tensor(node, CONST, (), cdim=k if keep else None)
        if name in _DIM_OPS and self._dim_hits_channels(node):
            return self.opaque(node, f"{name} over the channel dim")
        if node.target in self.tile_fns and shape is not None:
            src = ins[0]
            if self.cdim[src] == self.rank[src] - 1 and shape[-1] == self.full[src] * self.tile_fns[node.target]:
                return self.out_tensor(node, TILE, (src,), self.tile_fns[node.target], cdim=len(shape) - 1)
            return self.opaque(node, f"{name} on a tensor whose channels are not on the last dim")
        if node.target in self.layout_fns:
            # a tensor, or (tensor, numbers...): torchvision MViT's _unsqueeze returns the input's rank with it
            tup = self._is_tuple_result(node)
            shapes, src, k = self._tuple_shapes(node) if tup else [shape], ins[0], self.cdim[ins[0]]
            if shapes and shapes[0] is not None and all(s is None for s in shapes[1:]):
                nk = len(shapes[0]) - 1 if k == self.rank[src] - 1 else k
                if shapes[0][nk] == self.full[src]:
                    if not tup:
                        return self.alias(node, src, nk)
                    t = self.new(shapes[0], nk)
                    self.emit(PASS, (src,), (t,), node.name)
                    self.val[node] = ("tuple", [t] + [None] * (len(shapes) - 1))
                    return
        return self.visit_unary(node, ins[0])

    _POINTWISE = {"exp", "sigmoid", "tanh", "abs", "neg", "sqrt", "rsqrt", "reciprocal", "log", "softplus", "relu",
                  "clamp", "clamp_min", "clamp_max", "pow", "square"}

    def _param_pointwise(self, node, name, t, shape) -> bool:
        """An elementwise op of one parameter read and numbers only (its result is that parameter, transformed
        entry by entry)."""
        if _shape(node.args[0]) != tuple(shape):
            return False
        others = list(node.args[1:]) + list(node.kwargs.values())
        if any(isinstance(a, torch.fx.Node) for a in others):
            return False
        return node.target in _ELEMENTWISE_FN or name in _ELEMENTWISE_METHODS or name in self._POINTWISE

    def _const_tuple(self, node) -> None:
        """A tuple result whose members are all whole (constants)."""
        self.val[node] = ("tuple", [self.new(s) if s is not None else None for s in self._tuple_shapes(node)])
        for t in self.val[node][1]:
            if t is not None:
                self.emit(CONST, (), (t,), node.name)

    def _is_tuple_result(self, node):
        tm = node.meta.get("tensor_meta")  # TensorMetadata is itself a NamedTuple: a tuple *of* them is meant
        return isinstance(tm, (tuple, list)) and not hasattr(tm, "shape")

    def _tuple_shapes(self, node):
        tm = node.meta.get("tensor_meta")
        return [tuple(t.shape) if hasattr(t, "shape") else None for t in tm]

    def _dims_arg(self, node):
        name = _fname(node.target)
        if name == "roll":  # roll(input, shifts, dims)
            return node.kwargs.get("dims", node.args[2] if len(node.args) > 2 else None)
        if name == "flip":
            return node.kwargs.get("dims", node.args[1] if len(node.args) > 1 else None)
        if name == "norm":  # norm(input, p, dim)
            return node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        if name == "topk":  # topk(input, k, dim=-1): args[1] is k, not a dim
            return node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else -1)
        return node.kwargs.get("dim", node.kwargs.get("axis", node.args[1] if len(node.args) > 1 else None))

    def _dim_hits_channels(self, node) -> bool:
        src = node.args[0] if node.args else None
        rank = len(_shape(src)) if isinstance(src, torch.fx.Node) and _shape(src) else 0
        k = self.cdim[self.val[src]] if isinstance(src, torch.fx.Node) and src in self._tids else 1
        dims = self._dims_arg(node)
        if dims is None:
            # a full reduction / no dim: channels are mixed unless the op keeps the shape (e.g. flip needs dims)
            return True
        if isinstance(dims, torch.fx.Node):
            return True
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        if not all(isinstance(d, int) for d in dims):
            return True
        return any((d % rank if rank else d) == k for d in dims)

    def visit_unary(self, node, src):
        """An op with one channel input: channel-preserving if the channel dim keeps its size (and its place, or
        the place a reduction over other dims moves it to)."""
        shape, sshape = _shape(node), None
        for a in node.all_input_nodes:
            if self.val.get(a) == src and a in self._tids:
                sshape = _shape(a)
        k = self.cdim[src]
        if shape is not None and sshape is not None and len(shape) == len(sshape) >= 2 and \
                shape[k] == sshape[k] and shape[0] == sshape[0]:
            return self.alias(node, src)
        name = _fname(node.target)
        dims = self._dims_arg(node)
        if shape is None and name in ("max", "min", "median", "mode", "sort", "topk") and sshape is not None and \
                self._is_tuple_result(node) and isinstance(dims, int):  # (values, indices) over another dim
            d, members = dims % len(sshape), []
            for s in self._tuple_shapes(node):
                nk = k - (d < k) if s is not None and len(s) == len(sshape) - 1 else k
                members.append((s, nk))
            if d != k and all(s is not None and len(s) >= len(sshape) - 1 and 0 < nk < len(s) and s[nk] == sshape[k]
                              for s, nk in members):
                self.val[node] = ("tuple", [self.new(s, nk) for s, nk in members])
                for t in self.val[node][1]:
                    self.emit(PASS, (src,), (t,), node.name)
                return
        if name in _DIM_OPS and shape is not None and sshape is not None and dims is not None and \
                not isinstance(dims, torch.fx.Node):
            dl = [d % len(sshape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])
                  if isinstance(d, int)]
            nk = k - sum(1 for d in dl if d < k)
            if k not in dl and len(shape) == len(sshape) - len(dl) and 0 < nk < len(shape) and shape[nk] == sshape[k]:
                return self.alias(node, src, nk)  # a reduction over other dims (e.g. mean over tokens)
        if shape is not None and sshape is not None and len(shape) > k and shape[k] == 1 and sshape[k] > 1:
            return self.opaque(node, f"{name} reduces the channel dim")
        return self.opaque(node, f"{name} changes the channel dim "
                                 f"({list(sshape) if sshape else '?'} -> {list(shape) if shape else '?'})")

    def visit_module(self, node):
        target = node.target
        src_ids = [t for t in self.channel_inputs(node) if t not in self.pmap] or \
            [t for t in self.channel_inputs(node)]
        role = self.roles.get(target)
        if role is not None:
            return self.visit_layer(node, target, role, src_ids)
        m = self.mods[target]
        if not src_ids:
            shape = _shape(node)
            if shape is not None:
                self.out_tensor(node, CONST, ())
            else:
                self.val[node] = None
            return
        src = src_ids[0]
        if isinstance(m, nn.Flatten):
            return self.visit_reshape(node, src)
        if isinstance(m, (nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)) and self.cdim[src] != 1:
            return self.opaque(node, f"{type(m).__name__} of a tensor whose channels are on dim {self.cdim[src]}")
        if isinstance(m, nn.ChannelShuffle):
            return self.out_tensor(node, SHUFFLE, (src,), m.groups)
        if isinstance(m, nn.PixelShuffle):
            r2 = m.upscale_factor ** 2
            return self.out_tensor(node, GROUPMAP, (src,), (r2, 1))
        if isinstance(m, nn.PixelUnshuffle):
            r2 = m.downscale_factor ** 2
            return self.out_tensor(node, GROUPMAP, (src,), (1, r2))
        if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            shape = _shape(node)
            d = m.dim if m.dim is not None else 1
            if shape is not None and d % len(shape) == self.cdim[src]:
                return self.opaque(node, f"{type(m).__name__} over the channel dim")
        if len(src_ids) >= 2:
            return self.visit_tie(node, src_ids)
        return self.visit_unary(node, src)

    def visit_layer(self, node, target, role, src_ids):
        shape = _shape(node)
        t_in = src_ids[0] if src_ids else None
        want = role.get("dim", 1)
        if t_in is None:
            t_in = self.new(None)
            self.emit(CONST, (), (t_in,), node.name)
        else:
            r = self.rank[t_in]
            wk = want % r
            if self.cdim[t_in] != wk:
                src_node = next((a for a in node.all_input_nodes if self.val.get(a) == t_in and a in self._tids), None)
                sshape = _shape(src_node) if src_node is not None else None
                if self._always_full(t_in) and sshape is not None:
                    t_in = self.rehome(t_in, wk, sshape)
                elif role["role"] == "decider" and (want == -1 or role.get("pointwise")) and shape is not None \
                        and sshape is not None and len(shape) == len(sshape) and \
                        shape[self.cdim[t_in]] == sshape[self.cdim[t_in]]:
                    # a Linear (or a kernel-1 conv) along another dim (token mixing): the channels pass through
                    # position by position, the layer stays whole
                    self.fixed_layers.add(target)
                    return self.alias(node, t_in)
                else:
                    o = self.new(sshape, wk)
                    self.emit(OPAQUE, (t_in,), (o,), f"{target}", f"{target} reads dim {wk}, the channels are on "
                                                                  f"dim {self.cdim[t_in]}")
                    t_in = o
        r_out = len(shape) if shape is not None else 0
        out_dim = (want % r_out if r_out else 1) if role["role"] in ("decider", "gdecider", "fixed") else \
            (self.cdim[t_in] if self.cdim[t_in] is not None else 1)
        if role.get("tie_inputs") and len(set(src_ids)) > 1:  # query, key, value of one attention: one channel set
            x = self.new((1, self.full[t_in]), 1)
            self.emit(TIE, tuple(dict.fromkeys(src_ids)), (x,), self.where(node))
        if role.get("outputs", 1) > 1:  # (output, attention weights): the output is the channel tensor
            shape = self._tuple_shapes(node)[0] if self._is_tuple_result(node) else None
            r_out = len(shape) if shape is not None else 0
            out_dim = self.cdim[t_in] if self.cdim[t_in] is not None else 1
        t_out = self.new(shape, out_dim)
        if role.get("outputs", 1) > 1:
            self.val[node] = ("tuple", [t_out] + [None] * (role["outputs"] - 1))
        else:
            self._tids.add(node)
            self.val[node] = t_out
        call = LayerCall(target, role["role"], t_in, t_out, role.get("groups", 1), role.get("mult", 1),
                         role.get("gw", (1, 1)), role.get("unit", 1), unit_out=role.get("unit_out", 1))
        self.calls.append(call)
        self.emit(LAYER, (t_in,), (t_out,), target, len(self.calls) - 1)

    def visit_getitem(self, node):
        base, idx = node.args[0], node.args[1]
        v = self.val.get(base)
        if isinstance(v, tuple) and v and v[0] == "tuple":
            if isinstance(idx, int):
                t = v[1][idx]
                self.val[node] = t
                if t is not None:
                    self._tids.add(node)
                return
            if isinstance(idx, slice):
                self.val[node] = ("tuple", v[1][idx])
                return
            self.val[node] = None
            return
        if isinstance(v, _Runs):
            return self.visit_runs(node, "getitem", v)
        if base in self._tids and self.made_by.get(v) in (INPUT, CONST) and v not in self.pmap and \
                _shape(node) is not None:
            return self.out_tensor(node, CONST, ())  # a view of a constant (arange, a buffer): no channels
        if not (base in self._tids):
            self.val[node] = None  # size()[i], python containers
            return
        src = v
        shape, sshape = _shape(node), _shape(base)
        if src in self.pmap:
            t = self.out_tensor(node, CONST, ())
            dims = self._indexed_dims(idx, sshape, shape)
            if dims is not None:  # a bias table read by index (relative position bias): its head dim carried
                target, pd = self.pmap[src]
                self.pmap[t] = (target, [pd[i] if i is not None else None for i in dims])
            return
        k = self.cdim[src]
        if k is None:
            return self.out_tensor(node, CONST, ())
        if not isinstance(idx, tuple):
            idx = (idx,)
        if Ellipsis in idx and sshape is not None and idx.count(Ellipsis) == 1:
            e = idx.index(Ellipsis)
            used = sum(1 for i in idx if i is not None and i is not Ellipsis)
            idx = idx[:e] + (slice(None),) * (len(sshape) - used) + idx[e + 1:]
        if any(isinstance(i, torch.fx.Node) for i in idx) or Ellipsis in idx:
            if shape is not None and sshape is not None and len(shape) == len(sshape) and \
                    shape[:k + 1] == sshape[:k + 1]:
                return self.alias(node, src)
            dims = self._indexed_dims(idx, sshape, shape) if k != 0 else None
            if dims is not None and k in dims:  # a gather along other dims (a bias table read by index)
                return self.alias(node, src, dims.index(k))
            return self.opaque(node, "tensor indexing on the batch or channel dim")
        nk, p, chan = k, 0, None
        for i in idx:
            if i is None:
                if p <= k:
                    nk += 1
                continue
            if p == 0 and i != slice(None):
                return self.opaque(node, "indexing the batch dim")
            if p == k:
                chan = i
            elif isinstance(i, int) and p < k:
                nk -= 1
            elif not isinstance(i, (int, slice)):
                return self.opaque(node, f"index {i!r}")
            p += 1
        if chan is None or chan == slice(None):
            return self.alias(node, src, nk)
        if isinstance(chan, slice) and chan.step in (None, 1) and (
                isinstance(chan.stop, AttrInt) and chan.start in (None, 0) or
                isinstance(chan.start, AttrInt) and chan.stop is None):
            return self.visit_attr_slice(node, src, chan, nk)
        if isinstance(chan, slice) and chan.step in (None, 1) and all(
                v is None or isinstance(v, int) for v in (chan.start, chan.stop)):
            a, b, _ = chan.indices(self.full[src])
            return self.out_tensor(node, SLICE, (src,), (a, b), nk)
        return self.opaque(node, f"channel index {chan!r}")

    def visit_attr_slice(self, node, src, chan, nk):
        """``x[:, :self.c]`` / ``x[:, self.c:]`` (ReXNet's shortcut, DPN's dual path): the two pieces of a split
        at a module attribute, which the module reads as the first piece's active count."""
        lit = chan.stop if isinstance(chan.stop, AttrInt) else chan.start
        b = int(lit)
        f = self.full[src]
        if b == f and chan.stop is lit:  # x[:, :self.out_chs] of exactly out_chs channels (GhostNet): all of them
            self.claim_int(lit, src)
            return self.alias(node, src, nk)
        if not 0 < b < f:
            return self.opaque(node, f"channel slice at {lit.tag.name} = {b} of {f} channels")
        pieces = self.__dict__.setdefault("_attr_slices", {})
        key = (src, lit.tag.key)
        if key not in pieces:
            k = self.cdim[src]
            sshape = list(self._src_shape(node, src))
            outs = []
            for n in (b, f - b):
                sh = list(sshape)
                sh[k] = n
                outs.append(self.new(tuple(sh), k))
            self.emit(SPLITV, (src,), tuple(outs), self.where(node), (b, f - b))
            pieces[key] = outs
        piece = pieces[key][0 if chan.stop is lit else 1]
        self.claim_int(lit, pieces[key][0])
        return self.alias(node, piece, nk)

    def _src_shape(self, node, src):
        """The shape of the input of ``node`` that holds tensor ``src``."""
        for a in node.all_input_nodes:
            if a in self._tids and self.val.get(a) == src:
                return _shape(a)
        return None

    @staticmethod
    def _indexed_dims(idx, sshape, shape):
        """For ``x[idx]``: the source dim each result dim carries (full slices carried, ints dropped, one tensor
        index replaced by its own dims), or ``None``."""
        if sshape is None or shape is None:
            return None
        idx = idx if isinstance(idx, tuple) else (idx,)
        if Ellipsis in idx or None in idx or len(idx) > len(sshape):
            return None
        idx = idx + (slice(None),) * (len(sshape) - len(idx))
        tens = [p for p, i in enumerate(idx) if isinstance(i, torch.fx.Node)]
        if len(tens) > 1 or any(not (isinstance(i, (int, torch.fx.Node)) or i == slice(None)) for i in idx):
            return None
        out = []
        for p, i in enumerate(idx):
            if i == slice(None):
                out.append(p)
            elif isinstance(i, torch.fx.Node):
                ishape = _shape(i)
                if ishape is None:
                    return None
                out.extend([None] * len(ishape))
        return out if len(out) == len(shape) else None

    def visit_cat(self, node):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        ids = self.tensor_ids(tensors)
        shape = _shape(node)
        rank = len(shape) if shape else 0
        if not isinstance(dim, int):
            return self.opaque(node, "cat along a computed dim")
        chans = [t for t in ids if self.rank[t] >= 2 and self.cdim[t] is not None and t not in self.pmap]
        if rank and chans and dim % rank == self.cdim[chans[0]]:
            if any(self.cdim[t] != dim % rank for t in ids if t not in self.pmap):
                return self.opaque(node, "cat of tensors whose channels are on different dims")
            return self.out_tensor(node, CAT, ids, cdim=dim % rank)
        return self.visit_tie(node, chans)  # along tokens / space: one channel set for all parts

    def visit_split(self, node):
        name = _fname(node.target)
        src = node.args[0]
        sid = self.val.get(src) if src in self._tids else None
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        shapes = self._tuple_shapes(node) if self._is_tuple_result(node) else None
        rank = self.rank[sid] if sid is not None else 0
        if sid is None or shapes is None:
            return self.opaque(node, f"{name} of a non-tensor")
        k = self.cdim[sid]
        if not isinstance(dim, int) or rank == 0 or k is None or dim % rank != k:
            outs = []
            for s in shapes:
                t = self.new(s, k)
                outs.append(t)
                self.emit(PASS, (sid,), (t,), node.name)
            self.val[node] = ("tuple", outs)
            return
        arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get(
            "split_size_or_sections", node.kwargs.get("split_size")))
        sizes = [s[k] for s in shapes]
        equal = len(set(sizes)) == 1 and sum(sizes) == self.full[sid]
        # chunk(k) splits the runtime tensor in k equal runs; split(n) with a literal n does not follow the width.
        dynamic = name == "chunk" or isinstance(arg, (torch.fx.Node, AttrInt))
        if not (equal and dynamic):
            if name == "chunk" and sum(sizes) == self.full[sid] and len(sizes) > 1:
                # chunk(k) of a count k does not divide: torch's rule (pieces of ceil(n / k)) at every width
                outs = [self.new(sh, k) for sh in shapes]
                self.emit(SPLITV, (sid,), outs, self.where(node), _ChunkSizes(int(x) for x in sizes))
                self.val[node] = ("tuple", outs)
                return
            if name == "split" and isinstance(arg, (list, tuple)) and len(arg) == len(shapes) and \
                    all(isinstance(a, AttrInt) or self._remainder_of(a, arg, sid) for a in arg) and \
                    sum(sizes) == self.full[sid]:
                # sizes the module holds (FasterNet's [self.dim_conv3, self.dim_untouched]; SHViT's [self.pdim,
                # self.dim - self.pdim], the input sized by self.dim): they follow the width
                outs = [self.new(sh, k) for sh in shapes]
                self.emit(SPLITV, (sid,), outs, self.where(node), tuple(int(x) for x in sizes))
                self.val[node] = ("tuple", outs)
                for a, t in zip(arg, outs):
                    if isinstance(a, AttrInt):
                        self.claim_int(a, t)
                    else:  # the remainder: its attributes size the input and the other piece
                        self.claim_int(a.left, sid)
                        self.claim_int(a.right, outs[self._remainder_of(a, arg, sid) - 1])
                return
            return self.opaque(node, f"{name} with literal sizes {arg!r} (only chunk(k) or split(x.size(1)//k) "
                                     "follow the width)")
        outs = [self.new(s, k) for s in shapes]
        self.emit(SPLIT, (sid,), outs, self.where(node), len(outs))
        self.val[node] = ("tuple", outs)
        if isinstance(arg, AttrInt):  # x.split(self.c // 2): the module reads the attribute at the piece size
            self.claim_int(arg, outs[0])

    def _remainder_of(self, a, arg, sid: int) -> int:
        """``1 + j`` when ``a`` is ``b - c`` (:class:`AttrDiff`) of a split of tensor ``sid`` into ``arg`` with ``b``
        its full channel count and ``c`` the attribute sizing piece ``j``; else 0."""
        if not isinstance(a, AttrDiff) or a.left.v != self.full[sid]:
            return 0
        j = next((i for i, x in enumerate(arg) if isinstance(x, AttrInt) and x.tag.key == a.right.tag.key), None)
        return 0 if j is None else j + 1

    def visit_tie(self, node, ins):
        """An elementwise op (residual add, gating, a scale): its tensors' channels are one set. Broadcasting
        aligns dims from the right; a parameter read (``self.gamma``, ``self.pos_embed``) tied to the channels
        becomes a ``param`` call."""
        shape = _shape(node)
        if shape is None:
            return self.opaque(node, "elementwise op without a tensor result")
        r = len(shape)
        cands = [t for t in ins if self.cdim[t] is not None and self.full[t] > 1 and t not in self.pmap]
        if any(not self._always_full(t) for t in cands):  # a constant broadcast against channels: not a layout
            cands = [t for t in cands if not self._always_full(t)]
        if not cands:
            cands = [t for t in ins if self.cdim[t] is not None and t not in self.pmap]
        if not cands:
            return self.out_tensor(node, CONST, ())
        k = self.cdim[cands[0]] + r - self.rank[cands[0]]
        c = shape[k] if 0 <= k < r else 1
        members = []
        for t in cands:
            kt = self.cdim[t] + r - self.rank[t]
            if kt == k and self.full[t] == c:
                members.append(t)
            elif self.full[t] > 1:
                return self.opaque(node, f"{_fname(node.target)} broadcasts tensors of different channel layouts")
        for t in self.tensor_ids(list(node.args) + list(node.kwargs.values())):
            if t in members or t in cands:
                continue
            tshape_k = k - (r - self.rank[t])
            if t in self.pmap:
                target, dims = self.pmap[t]
                if 0 <= tshape_k < self.rank[t] and c > 1 and self._size_at(t, node, tshape_k) == c:
                    pd = dims[tshape_k]
                    root = self.param_root(target, pd) if pd is not None else None
                    if root is None:
                        return self.opaque(node, f"parameter {target!r} is tied to the channels along another dim")
                    members.append(root)
                continue
            if self.rank[t] >= 1 and 0 <= tshape_k < self.rank[t] and c > 1 and self._size_at(t, node, tshape_k) == c:
                if self.cdim[t] != tshape_k:  # read along that dim (its own channel dim is another)
                    if not self._always_full(t):
                        return self.opaque(node, f"{_fname(node.target)} broadcasts tensors of different channel "
                                                 "layouts")
                    t = self.rehome(t, tshape_k, self._src_shape(node, t))
                members.append(t)  # e.g. a constant of the channels' size: always whole
        if c <= 1 or not members:
            return self.out_tensor(node, CONST, ())
        return self.out_tensor(node, TIE, members, cdim=k)

    def _size_at(self, t, node, d):
        s = self._src_shape(node, t)
        return s[d] if s is not None and d < len(s) else None

    def visit_reshape(self, node, src, name="reshape"):
        """A view / reshape / flatten of a channel tensor: the channel dim is carried to its new place, merged
        with the dims after it (channel-major, ``(N, C, H, W) -> (N, C*H*W)``) or with those before it
        (channel-minor, ``(N, H, W, C) -> (N, H*W*C)``)."""
        shape = _shape(node)
        sshape = self._src_shape(node, src)
        if shape is None or sshape is None:
            return self.opaque(node, f"{name} of unknown shape")
        k = self.cdim[src]
        if self.visit_heads(node, src, sshape, shape, name):
            return None
        m = _dim_map(name, node, sshape, shape)
        if m is not None and k in m:
            j = m.index(k)
            lit = self._literal_at(node, name, j, len(shape))
            if lit is not None and not isinstance(lit, AttrInt):
                return self.opaque(node, f"{name} to a literal channel count {shape[j]} (dim {j}): at another width "
                                         "the tensor has other channels; use -1 or x.shape")
            cs = self._computed_size(node, name, shape, j)
            if cs is False or (cs is not None and cs[0] == "heads"):
                return self.opaque(node, f"{name} to a computed channel count (dim {j}) the analysis cannot follow")
            t = self.alias(node, src, j)
            if lit is not None:
                self.claim_int(lit, t)
            if cs is not None and cs[0] != src:
                self.tie_counts(cs[0], t, self.where(node))
            return t
        if name not in ("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten"):
            return self.opaque(node, f"{name} {list(sshape)} -> {list(shape)} moves the channel dim")
        pre, c = _prod(sshape[:k]), sshape[k]
        tagged = []
        for j in range(len(shape)):
            lit = self._literal_at(node, name, j, len(shape))
            if lit is not None and _prod(shape[:j]) <= pre * c <= _prod(shape[:j + 1]):
                if not isinstance(lit, AttrInt):
                    return self.opaque(node, f"{name} to a literal size {shape[j]} (dim {j}) that holds the channels")
                tagged.append((j, lit))
        for kind in (FLATTEN, TILE):  # channel-major merges first (they win when c = 1)
            for j in range(len(shape)):
                made = None
                if kind == FLATTEN and _prod(shape[:j]) == pre and shape[j] % c == 0:
                    made = next((_prod(sshape[k + 1:e]) for e in range(k + 2, len(sshape) + 1)
                                 if _prod(sshape[k:e]) == shape[j]), None)
                elif kind == TILE and _prod(shape[:j + 1]) == pre * c and shape[j] % c == 0:
                    made = next((_prod(sshape[b:k]) for b in range(1, k) if _prod(sshape[b:k + 1]) == shape[j]),
                                None)
                if made is None:
                    continue
                if any(jj != j for jj, _ in tagged):
                    return self.opaque(node, f"{name} to a literal size that holds the channels")
                cs = self._computed_size(node, name, shape, j)
                if cs is False:
                    return self.opaque(node, f"{name} to a computed channel count (dim {j}) the analysis cannot "
                                             "follow")
                if cs is not None and cs[0] == "heads" and not (kind == FLATTEN and int(cs[1]) == c):
                    return self.opaque(node, f"{name} to {cs[1].tag.name} x a size that does not merge the heads")
                t = self.out_tensor(node, kind, (src,), made, cdim=j)
                for _, lit in tagged:
                    self.claim_int(lit, t)
                if cs is not None and cs[0] == "heads":
                    self.claim_int(cs[1], src)  # the module reads the attribute as the active head count
                elif cs is not None:
                    self.tie_counts(cs[0], t, self.where(node))
                return t
        return self.opaque(node, f"{name} {list(sshape)} -> {list(shape)} merges the channel dim")

    def _computed_size(self, node, name, shape, j):
        """The size argument of result dim ``j`` when it is computed (a graph value): ``(t, 1)`` when it is the
        channel count of tensor ``t`` of that size, ``False`` when the analysis cannot read it; ``None`` when the
        size is not computed."""
        sizes = self._sizes(node, name)
        if sizes is None or len(sizes) != len(shape) or not isinstance(sizes[j], torch.fx.Node):
            return None
        a = sizes[j]
        if a.op == "call_function" and a.target in (operator.mul,) and len(a.args) == 2:
            lits = [x for x in a.args if isinstance(x, AttrInt)]
            dims = [x for x in a.args if isinstance(x, torch.fx.Node)]
            if len(lits) == 1 and len(dims) == 1 and self._fixed_size(dims[0]):
                return ("heads", lits[0])  # s[-1] * self.num_heads (timm's multi-query attention output)
        cs = self.chan_size(a)
        return cs if cs is not None and cs[1] == 1 and self.full[cs[0]] == shape[j] else False

    def _fixed_size(self, a) -> bool:
        """Graph value ``a`` is ``x.shape[j]`` / ``x.size(j)`` of a tensor ``x`` whose dim ``j`` holds no
        channels (a head dim, a token count)."""
        x, j = _shape_index(a)
        if not (isinstance(x, torch.fx.Node) and x in self._tids and isinstance(j, int)):
            return False
        t = self.val[x]
        return self.rank[t] > 0 and (self.cdim[t] is None or j % self.rank[t] != self.cdim[t])

    @staticmethod
    def _sizes(node, name):
        """The size arguments of a ``view`` / ``reshape`` call (``None`` for other ops)."""
        if name not in ("view", "reshape"):
            return None
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = sizes[0]
        if not sizes and "shape" in node.kwargs:
            sizes = node.kwargs["shape"]
        return list(sizes)

    @classmethod
    def _literal_at(cls, node, name, j, rank):
        """The literal size of result dim ``j`` in a ``view`` / ``reshape`` call (not -1, not computed), or
        ``None``; an :class:`AttrInt` when it is a module attribute."""
        sizes = cls._sizes(node, name)
        if sizes is None or len(sizes) != rank:
            return None
        v = sizes[j]
        return v if isinstance(v, int) and not isinstance(v, bool) and v != -1 and v > 1 else None

    @classmethod
    def _literal_size(cls, node, name, j, rank) -> bool:
        """The size of result dim ``j`` is a literal in a ``view`` / ``reshape`` call (not -1, not computed)."""
        return cls._literal_at(node, name, j, rank) is not None

    def visit_heads(self, node, src, sshape, shape, name) -> bool:
        """A reshape that splits the channel dim into heads: ``(..., C) -> (..., H, d)`` or, for a fused
        projection, ``(..., r * C) -> (..., r, H, d)`` (``r`` a literal: q/k/v). ``d`` (the head dim) is fixed; the
        head count ``H`` follows the width: it is computed (``-1``, ``C // d``) or a module attribute
        (``self.num_heads``) that the module then reads as the active head count. Heads are one channel each
        (a ``groupmap`` of ``d`` channels); the ``r`` runs are a ``split``. Returns whether it applied."""
        sizes = self._sizes(node, name)
        if sizes is None or len(sizes) != len(shape):
            return False
        k = self.cdim[src]
        pre, c, post = _prod(sshape[:k]), sshape[k], _prod(sshape[k + 1:])
        for j0 in range(len(shape)):
            # a single head is a dim of size 1, told from other size-1 dims by its size argument
            if _prod(shape[:j0]) != pre or shape[j0] < 1 or (shape[j0] == 1 and not isinstance(sizes[j0], AttrInt)):
                continue
            for n in (2, 3):
                j1 = j0 + n
                if j1 > len(shape) or _prod(shape[j0:j1]) != c or _prod(shape[j1:]) != post or shape[j1 - 1] <= 1:
                    continue
                lits = sizes[j0:j1]

                def literal(v):
                    return isinstance(v, int) and not isinstance(v, (bool, AttrInt)) and v != -1

                if n == 2 and isinstance(lits[0], AttrInt) and lits[0].tag.root.escaped and \
                        (lits[1] == -1 or isinstance(lits[1], torch.fx.Node)):
                    # (self.radix, -1) with an attribute the forward also computes with (ResNeSt's ``if
                    # self.radix > 1``): a fixed run count, not heads; r runs of one channel set, channels last
                    self.val[node] = self._runs_of(src, int(shape[j0]), tuple(shape), j0 + 1, self.where(node))
                    self._tids.add(node)
                    return True
                if n == 2 and literal(lits[0]):  # (r, C / r): q / k / v runs of channels, no heads
                    r, d, h_lit, d_lit = int(shape[j0]), 1, None, lits[1]
                elif n == 2:
                    r, d, h_lit, d_lit = 1, int(shape[j0 + 1]), lits[0], lits[1]
                elif literal(lits[0]) and not literal(lits[1]):
                    r, d, h_lit, d_lit = int(shape[j0]), int(shape[j0 + 2]), lits[1], lits[2]
                else:
                    continue
                # computed sizes: the head count C // d or the head dim C // self.num_heads of some tensor's C
                h_cs = self.chan_size(h_lit) if isinstance(h_lit, torch.fx.Node) else None
                d_cs = self.chan_size(d_lit) if isinstance(d_lit, torch.fx.Node) else None
                if isinstance(h_lit, torch.fx.Node) and (h_cs is None or h_cs[1] != d or d == 1):
                    continue
                if isinstance(d_lit, torch.fx.Node) and (
                        d_cs is None or not isinstance(d_cs[1], AttrInt) or not isinstance(h_lit, AttrInt)
                        or d_cs[1].tag is not h_lit.tag):
                    continue
                if isinstance(d_lit, AttrInt) and isinstance(h_lit, AttrInt) and d_lit.tag is h_lit.tag:
                    continue
                where = self.where(node)
                pieces = [src]
                if r > 1:
                    ps = tuple(sshape[:k]) + (c // r,) + tuple(sshape[k + 1:])
                    pieces = [self.new(ps, k) for _ in range(r)]
                    self.emit(SPLIT, (src,), pieces, where, r)
                heads = pieces
                hshape = tuple(shape[:j0]) + tuple(shape[j0 + (r > 1):])
                if d > 1:
                    heads = [self.new(hshape, j0) for _ in pieces]
                    for p, h in zip(pieces, heads):
                        self.emit(GROUPMAP, (p,), (h,), where, (d, 1))
                if isinstance(h_lit, AttrInt):
                    self.claim_int(h_lit, heads[0])
                for cs in (h_cs, d_cs):
                    if cs is not None:  # that tensor's heads are these heads
                        self.tie_counts(self.heads_of(cs[0], d, where), heads[0], where)
                if d_cs is not None:
                    self.claim_node(d_lit, h_lit.tag)
                if r == 1:
                    self._tids.add(node)
                    self.val[node] = heads[0]
                else:
                    self.val[node] = _Runs(tuple(heads), j0, j0 + 1, tuple(shape))
                return True
        return False

    def visit_runs(self, node, name, f: "_Runs"):
        """Layout ops on a tensor split into ``r`` runs (``(B, N, 3, H, d)`` of a fused qkv): permutes move the
        run and head dims; ``unbind`` / indexing along the run dim gives the pieces."""
        shape = _shape(node)
        if name in ("permute", "transpose", "swapaxes") and shape is not None:
            m = _dim_map(name, node, f.shape, shape)
            if m is not None:
                self.val[node] = _Runs(f.heads, m.index(f.rdim), m.index(f.hdim), tuple(shape))
                return None
        elif name in _CAST and shape is not None and tuple(shape) == f.shape:
            self.val[node] = f
            return None
        elif name == "unbind":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            shapes = self._tuple_shapes(node) if self._is_tuple_result(node) else None
            if isinstance(dim, int) and dim % len(f.shape) == f.rdim and shapes and len(shapes) == len(f.heads):
                hd = f.hdim - (f.rdim < f.hdim)
                outs = []
                for h, s in zip(f.heads, shapes):
                    t = self.new(s, hd)
                    self.emit(PASS, (h,), (t,), node.name)
                    outs.append(t)
                self.val[node] = ("tuple", outs)
                return None
        elif name == "getitem":
            idx = node.args[1]
            idx = idx if isinstance(idx, tuple) else (idx,)
            pos = [p for p, i in enumerate(idx) if i != slice(None)]
            if len(pos) == 1 and pos[0] == f.rdim and isinstance(idx[f.rdim], int) and Ellipsis not in idx:
                i = idx[f.rdim]
                return self.alias(node, f.heads[i], f.hdim - (f.rdim < f.hdim))
        why = f"{name} of a tensor split into heads"
        if shape is not None:
            self.out_tensor(node, OPAQUE, f.heads, why)
        else:
            self.val[node] = None
            self.emit(OPAQUE, f.heads, (), self.where(node), why)
        return None

    def visit_matmul(self, node, ins):
        """``a @ b``: channels on a batch dim of both (attention heads: ``q @ k^T``, ``attn @ v``) stay there
        (one channel set); channels on the rows of ``a`` or the columns of ``b`` pass when the other operand has
        none; a contracted channel dim mixes channels."""
        shape = _shape(node)
        a, b = (node.args + (None, None))[:2]
        ta = self.val.get(a) if isinstance(a, torch.fx.Node) and a in self._tids else None
        tb = self.val.get(b) if isinstance(b, torch.fx.Node) and b in self._tids else None
        pb = tb if tb in self.pmap else None
        ta = ta if ta in ins else None
        tb = tb if tb in ins else None
        if shape is not None and ta is not None and pb is not None and self.cdim[ta] == self.rank[ta] - 1 and \
                self.rank[pb] >= 2:
            # x @ W with a parameter W (SwiftFormer's w_g): a linear map with a fixed output; W's rows are sliced
            # to the active channels of x
            target, dims = self.pmap[pb]
            pd = dims[self.rank[pb] - 2]
            root = self.param_root(target, pd) if pd is not None else None
            if root is None:
                return self.opaque(node, f"matmul with parameter {target!r} read along another dim")
            self.tie_counts(root, ta, self.where(node))
            return self.out_tensor(node, CONST, (), cdim=len(shape) - 1)
        if shape is None or (ta is None and tb is None):
            return self.opaque(node, "matmul mixes channels")
        R = len(shape)
        batch, kept, contracted = [], [], []
        for t, side in ((ta, 0), (tb, 1)):
            if t is None:
                continue
            r, k = self.rank[t], self.cdim[t]
            if r >= 3 and k < r - 2:
                batch.append(t)
            elif (side == 0 and k == r - 2 and r >= 2) or (side == 1 and k == r - 1):
                kept.append((t, side))
            else:
                contracted.append(t)
        if batch and (kept or contracted):
            return self.opaque(node, "matmul mixes channels")
        if batch:
            return self.visit_tie(node, batch)
        # channels summed over (a's columns, b's rows: an attention's q^T @ k over its head dim, DESIGN rule 9), or
        # on b's columns next to a's rows (EfficientViM's state product x @ (a * b)^T, then h @ c): a channel set
        # the result cannot carry stays whole at every width
        for t in contracted + [t for t, side in kept[1:]]:
            self.keep_whole(t, self.where(node))
        if kept:
            t, side = kept[0]
            return self.alias(node, t, R - 2 if side == 0 else R - 1)
        return self.out_tensor(node, CONST, (), cdim=None)

    def keep_whole(self, t, where) -> None:
        """Tensor ``t``'s channel set is whole at every width (tied to a constant of its size)."""
        if self._always_full(t):
            return
        c = self.new((1, self.full[t]), 1)
        self.emit(CONST, (), (c,), where)
        self.tie_counts(t, c, where)

    def visit_sdpa(self, node, ins):
        """``scaled_dot_product_attention(q, k, v, attn_mask)``: heads (a batch dim of every operand) are one
        channel set; channels on the token or feature dims are mixed."""
        heads = []
        for t in ins:
            r, k = self.rank[t], self.cdim[t]
            if r >= 3 and k < r - 2:
                heads.append(t)
            elif r >= 3 and k >= r - 2 and self._size_at(t, node, r - 3) == 1 and not self._always_full(t):
                # one key / value head broadcast over the query heads (multi-query attention): its channels are
                # the head dim, which stays whole at every width
                self.keep_whole(t, self.where(node))
            elif not self._always_full(t):
                return self.opaque(node, "scaled_dot_product_attention mixes channels")
        return self.visit_tie(node, heads)

    def visit_layout(self, node, name):
        src_node = node.args[0] if node.args else None
        v = self.val.get(src_node)
        shape = _shape(node)
        sshape = _shape(src_node) if isinstance(src_node, torch.fx.Node) else None
        if isinstance(v, _Factored):
            return self.visit_factored(node, name, v, shape)
        if src_node not in self._tids:
            return self.opaque(node, f"{name} of a non-tensor")
        src = v
        k = self.cdim[src]
        if name in ("channel_shuffle", "pixel_shuffle", "pixel_unshuffle") and k != 1:
            return self.opaque(node, f"{name} of a tensor whose channels are on dim {k}")
        if name == "channel_shuffle":
            g = node.args[1] if len(node.args) > 1 else node.kwargs.get("groups")
            return self.out_tensor(node, SHUFFLE, (src,), int(g))
        if name in ("pixel_shuffle", "pixel_unshuffle"):
            r = node.args[1] if len(node.args) > 1 else node.kwargs.get("upscale_factor",
                                                                          node.kwargs.get("downscale_factor"))
            r2 = int(r) ** 2
            return self.out_tensor(node, GROUPMAP, (src,), (r2, 1) if name == "pixel_shuffle" else (1, r2))
        if shape is None or sshape is None:
            return self.opaque(node, f"{name} of unknown shape")
        if shape == sshape and name not in ("permute", "transpose", "swapaxes", "movedim"):
            return self.alias(node, src)  # (a permute of equal-sized dims still moves the channels)
        if k == 1 and len(sshape) >= 3 and len(shape) == len(sshape) + 1 and shape[0] == sshape[0] and \
                shape[1] * shape[2] == sshape[1] and tuple(shape[3:]) == tuple(sshape[2:]) and \
                name in ("view", "reshape", "unflatten"):
            dims = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) > 1 else ())
            if name == "unflatten":
                dims = (None, *node.args[2]) if len(node.args) > 2 else ()
            outer_literal = len(dims) > 1 and isinstance(dims[1], int) and dims[1] > 0 and \
                not isinstance(dims[2] if len(dims) > 2 else None, int)
            self.val[node] = _Factored(src, int(shape[1]), int(shape[2]), False, self.full[src], outer_literal)
            return
        return self.visit_reshape(node, src, name)

    def visit_factored(self, node, name, f: "_Factored", shape):
        if name in ("transpose", "swapaxes"):
            dims = [d % 5 for d in node.args[1:3]] if len(node.args) >= 3 else None
            if dims is not None and sorted(dims) == [1, 2]:
                self.val[node] = dataclasses.replace(f, a=f.b, b=f.a, swapped=not f.swapped)
                return
        elif name == "permute":
            perm = node.args[1:] if len(node.args) > 2 else node.args[1]
            perm = [p % 5 for p in perm] if all(isinstance(p, int) for p in perm) else None
            if perm == [0, 2, 1, 3, 4]:
                self.val[node] = dataclasses.replace(f, a=f.b, b=f.a, swapped=not f.swapped)
                return
            if perm == [0, 1, 2, 3, 4]:
                self.val[node] = f
                return
        elif name == "contiguous":
            self.val[node] = f
            return
        elif name in ("view", "reshape", "flatten"):
            if shape is not None and len(shape) == 4 and shape[1] == f.a * f.b:
                src = f.src
                if not f.swapped:
                    return self.alias(node, src)
                if f.outer_literal:  # view(N, g, C//g, ...) with a literal g: g groups at every width
                    return self.out_tensor(node, SHUFFLE, (src,), f.b)
                return self.opaque(node, "channel shuffle with a constant group size (view(N, C//g, g, ...)): its "
                                         "group count changes with the width; use view(N, g, C//g, ...)")
        src_node = node.args[0] if node.args else None
        if self._materialize(src_node, self.where(node)):
            return self.visit(node)
        return self.opaque(node, f"{name} of a channel-factored tensor")

    def _materialize(self, fnode, where) -> bool:
        """A view ``(N, r, C/r, H, W)`` (value of ``fnode``) with a fixed run count ``r`` (SKNet's paths, ResNeSt's
        radix) read by an op other than a channel shuffle: ``r`` equal runs of one channel set, the channels on
        dim 2, so ops over dim 1 act within each channel. Returns whether it applied."""
        f = self.val.get(fnode) if isinstance(fnode, torch.fx.Node) else None
        vshape = _shape(fnode) if isinstance(fnode, torch.fx.Node) else None
        if not isinstance(f, _Factored) or f.swapped or not f.outer_literal or vshape is None or len(vshape) != 5:
            return False
        self.val[fnode] = self._runs_of(f.src, f.a, vshape, 2, where)
        self._tids.add(fnode)
        return True

    def _runs_of(self, src, r, shape, cdim, where) -> int:
        """A tensor of ``shape`` viewing ``src`` as ``r`` equal runs of one channel set, the channels on ``cdim``."""
        runs = [self.new((1, self.full[src] // r), 1) for _ in range(r)]
        self.emit(SPLIT, (src,), runs, where, r)
        t = self.new(shape, cdim)
        self.emit(TIE, runs, (t,), where)
        return t


def _join_name(prefix, name):
    return f"{prefix}.{name}" if prefix else name


@dataclasses.dataclass
class _Factored:
    """A channel tensor viewed as ``(N, a, b, H, W)``; ``swapped`` after a transpose of dims 1 and 2."""

    src: int
    a: int
    b: int
    swapped: bool
    full: int
    outer_literal: bool = False   # the first factor is a literal (constant group count)


@dataclasses.dataclass
class _Runs:
    """A channel tensor split into ``r`` runs of heads (``(B, N, 3, H, d)``): ``heads`` holds the head tensor of
    each run; ``rdim`` / ``hdim`` are the run and head dims in the current layout ``shape``."""

    heads: tuple
    rdim: int
    hdim: int
    shape: tuple


# ---- the graph and its per-width plans ------------------------------------------------------------------------
@dataclasses.dataclass
class LayerSel:
    """The selections one layer uses at one width: runtime input / output positions -> full channel indices."""

    sel_in: Sel
    sel_out: Sel
    groups: int               # runtime group count of a conv
    call: LayerCall


class PlanResult(list):
    """The :class:`LayerSel` of every layer call at one set of channel counts (cached; the state caches the
    layers' geometries on it)."""

    geo = None


class ChannelGraph:
    """The channel IR of one traced part of a model, with union-find classes and per-width planning.

    Args:
        ops: IR ops in topological order. calls: the slim layer calls. full: full channel count per tensor
            (at trace time; :meth:`refresh_full` recomputes them after widening).
    """

    def __init__(self, ops, calls, full, rank, part: str = ""):
        self.ops, self.calls, self.rank, self.part = ops, calls, rank, part
        self.full0 = list(full)
        self.full = list(full)
        self.ntensors = len(full)
        self.producer: dict[int, tuple] = {}
        for i, op in enumerate(ops):
            for t in op.outs:
                self.producer[t] = (i, op)
        self._classes()

    # -- classes -----------------------------------------------------------------------------------------------
    def __getstate__(self):  # copies drop the plan cache
        d = dict(self.__dict__)
        d.pop("_plans", None)
        return d

    def _classes(self):
        parent = list(range(self.ntensors))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        def union(a, b):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

        for op in self.ops:
            if op.kind in (PASS, TIE):
                for t in op.ins:
                    union(t, op.outs[0])
            elif op.kind == LAYER:
                c = self.calls[op.arg]
                if c.role in ("norm", "gnorm") or (c.role == "dw" and c.mult == 1):
                    union(c.t_in, c.t_out)
        self.cls = [find(t) for t in range(self.ntensors)]
        members: dict[int, list[int]] = {}
        for t in range(self.ntensors):
            members.setdefault(self.cls[t], []).append(t)
        self.members = members
        # Sources of each class: derived ops and free / fixed layers producing a member.
        self.derived: dict[int, list[int]] = {}     # class -> indices of derived ops producing a member
        self.deciders: dict[int, list[int]] = {}    # class -> call indices of layers deciding a member
        for i, op in enumerate(self.ops):
            if op.kind in _DERIVED:
                for t in op.outs:
                    self.derived.setdefault(self.cls[t], []).append(i)
            elif op.kind == LAYER:
                c = self.calls[op.arg]
                if c.role in ("decider", "gdecider", "fixed"):
                    self.deciders.setdefault(self.cls[c.t_out], []).append(op.arg)
                elif c.role in ("dw", "gwidth") and not (c.role == "dw" and c.mult == 1):
                    self.derived.setdefault(self.cls[c.t_out], []).append(i)

    def always_whole(self, t: int) -> bool:
        """Tensor ``t`` carries all its channels at every width (tied to the model input, a constant or an op
        whose channels cannot be followed)."""
        return any(self.ops[i].kind in (INPUT, CONST, OPAQUE) for i in self.derived.get(self.cls[t], []))

    def refresh_full(self, layer_full: Callable[[str], tuple]):
        """Recompute full channel counts from the layers' current weights (after widening).

        ``layer_full(name) -> (full_in, full_out)``."""
        full = list(self.full0)
        for _ in range(3):
            for op in self.ops:
                if op.kind == LAYER:
                    c = self.calls[op.arg]
                    fi, fo = layer_full(c.name)
                    if c.role in ("norm", "gnorm") or (c.role == "dw"):
                        full[c.t_out] = full[c.t_in] * (c.mult if c.role == "dw" else 1)
                    elif c.role == "gwidth":
                        full[c.t_out] = full[c.t_in] // c.gw[0] * c.gw[1]
                    else:
                        full[c.t_out] = fo
                elif op.kind in (PASS, TIE):
                    for t in op.outs:
                        full[t] = full[op.ins[0]] if op.ins else full[t]
                elif op.kind == CAT:
                    full[op.outs[0]] = sum(full[t] for t in op.ins)
                elif op.kind == SPLIT:
                    for t in op.outs:
                        full[t] = full[op.ins[0]] // op.arg
                elif op.kind == SPLITV:
                    for t, f in zip(op.outs, op.arg):
                        full[t] = f
                elif op.kind == SHUFFLE:
                    full[op.outs[0]] = full[op.ins[0]]
                elif op.kind == SLICE:
                    a, b = op.arg
                    f0 = self.full0[op.ins[0]]
                    # a slice [:k] of a grown tensor keeps the part that grew with it (scale k like the input)
                    scale = full[op.ins[0]] / f0 if f0 else 1
                    full[op.outs[0]] = min(full[op.ins[0]], int(round(b * scale))) - int(round(a * scale))
                elif op.kind in (FLATTEN, TILE):
                    full[op.outs[0]] = full[op.ins[0]] * op.arg
                elif op.kind == GROUPMAP:
                    gi, go = op.arg
                    full[op.outs[0]] = full[op.ins[0]] // gi * go
        self.full = full

    def output_layers(self, through_norms: bool = False) -> list[str]:
        """Layers whose outputs reach a graph output through channel-preserving ops only (DESIGN rule 2).

        The walk goes back from each output through aliases, elementwise ties, concatenations, splits and
        shuffles; it stops at a norm layer (a model ending in a norm is a feature extractor: a headless backbone
        has no output layers) unless ``through_norms`` (a part whose outputs feed modules that are not converted:
        they must stay whole) and marks every conv/linear it reaches."""
        found, seen = [], set()
        stack = [t for op in self.ops if op.kind == OUTPUT for t in op.ins]
        while stack:
            t = stack.pop()
            if t in seen or t not in self.producer:
                continue
            seen.add(t)
            _, op = self.producer[t]
            if op.kind == LAYER:
                c = self.calls[op.arg]
                if c.role in ("decider", "gdecider", "fixed"):
                    if c.name not in found:
                        found.append(c.name)
                elif c.role in ("dw", "gwidth") or through_norms and c.role in ("norm", "gnorm"):
                    stack.append(c.t_in)
                continue
            if op.kind in (PASS, TIE, CAT, SPLIT, SHUFFLE, SLICE, FLATTEN, GROUPMAP, TILE, SPLITV):
                stack.extend(op.ins)
        return found

    # -- static channel units ----------------------------------------------------------------------------------
    def class_units(self) -> dict[int, int]:
        """Count multiples each class needs so its runs can line up (grouped convs, shuffles, chunks).

        Propagated back through derived ops (a concatenation passes its unit to every part)."""
        unit: dict[int, int] = {}

        def need(t, u):
            c = self.cls[t]
            unit[c] = math.lcm(unit.get(c, 1), int(u))

        for op in self.ops:
            if op.kind == LAYER:
                c = self.calls[op.arg]
                if c.role == "gdecider":
                    need(c.t_in, c.groups)
                    need(c.t_out, c.groups)
                elif c.role == "gwidth":
                    need(c.t_in, c.gw[0])
                elif c.role == "gnorm":
                    need(c.t_in, c.groups)
                if c.unit > 1:
                    need(c.t_in, c.unit)
                if c.unit_out > 1:
                    need(c.t_out, c.unit_out)
            elif op.kind in (SHUFFLE, SPLIT):
                need(op.ins[0], op.arg)
            elif op.kind == GROUPMAP:
                need(op.ins[0], op.arg[0])
        # A concatenation passes its unit to every part, a shuffle or slice to its input (sufficient, and the
        # units of the papers' models); a split does not pass it on: its pieces' counts follow its input.
        for op in reversed(self.ops):
            if not op.outs:
                continue
            u = unit.get(self.cls[op.outs[0]], 1)
            if u == 1:
                continue
            if op.kind == CAT:
                for t in op.ins:
                    need(t, u)
            elif op.kind in (SHUFFLE, SLICE):
                need(op.ins[0], u)
            elif op.kind == SPLIT:  # q / k / v runs of whole heads: the fused projection has r x (heads x d)
                need(op.ins[0], u * op.arg)
            elif op.kind in (FLATTEN, TILE):  # n x arg channels out: n a multiple of u / gcd(u, arg)
                need(op.ins[0], u // math.gcd(u, op.arg))
            elif op.kind == GROUPMAP:  # n / gi groups of go out (heads merged back into a stream tied to another)
                gi, go = op.arg
                need(op.ins[0], gi * (u // math.gcd(u, go)))
        return unit

    # -- planning ----------------------------------------------------------------------------------------------
    def plan(self, count_of: Callable[[LayerCall], int], width_key: str,
             step_of: Callable[[LayerCall], int] | None = None) -> list[LayerSel]:
        """Selections of every layer call at one width.

        ``count_of(call)`` gives the output count a free layer chooses at this width, ``step_of(call)`` its
        rounding step. Where no selection makes the model's ops exact at those counts (a ShuffleNet v2 stage at
        some widths), the free layers coupled to the failing op (through concatenations, splits, shuffles,
        grouped convs) grow by one step at a time, up to their full width, which is always exact. Returns one
        :class:`LayerSel` per layer call (same order as ``self.calls``).

        Raises:
            NotExactError: no selection makes every runtime op exact (names the op and the width).
        """
        key = tuple(min(count_of(self.calls[i]), self.full[self.calls[i].t_out]) for i in self._free_refs())
        cache = self.__dict__.setdefault("_plans", {})
        hit = cache.get(key)
        if hit is not None:  # many widths round to the same counts (US-Nets sample new widths every step)
            return hit
        out = self._plan_search(count_of, width_key, step_of)
        if len(cache) >= 256:
            cache.clear()
        cache[key] = out
        return out

    def _free_refs(self) -> list[int]:
        """The deciding call of each free class (the one whose count the class takes)."""
        refs = self.__dict__.get("_refs")
        if refs is None:
            refs = [dec[0] for c, dec in sorted(self.deciders.items()) if c not in self.derived and not any(
                self.calls[i].role == "fixed" for i in dec)]
            self._refs = refs
        return refs

    def _plan_search(self, count_of, width_key, step_of) -> "PlanResult":
        bumps: dict[int, int] = {}
        for _ in range(4096):
            counts: dict = {}
            try:
                return self._plan_once(count_of, width_key, bumps, step_of, counts)
            except NotExactError as e:
                c = getattr(e, "cls", None)
                if c is None or step_of is None:
                    raise
                grown = False
                for fc in self._component(c):
                    if counts.get(fc, 0) < self.full[self.members[fc][0]]:
                        bumps[fc] = bumps.get(fc, 0) + 1
                        grown = True
                if not grown:
                    raise
        raise NotExactError(f"no exact channel plan found at width {width_key}")

    def _component(self, c_id) -> list[int]:
        """Free (layer-decided, not fixed) classes coupled to class ``c_id`` through derived ops."""
        comp = getattr(self, "_comp", None)
        if comp is None:
            parent = {}

            def find(x):
                parent.setdefault(x, x)
                while parent[x] != x:
                    parent[x] = parent[parent[x]]
                    x = parent[x]
                return x

            def union(a, b):
                parent[find(a)] = find(b)

            for op in self.ops:
                if op.kind in (CAT, SPLIT, SHUFFLE, SLICE, GROUPMAP, FLATTEN, TILE, SPLITV):
                    for t in (*op.ins, *op.outs):
                        union(self.cls[t], self.cls[op.outs[0]])
                elif op.kind == LAYER:
                    c = self.calls[op.arg]
                    if c.role in ("gdecider", "dw", "gwidth"):
                        union(self.cls[c.t_in], self.cls[c.t_out])
            free = [c for c in self.deciders if c not in self.derived and not any(
                self.calls[i].role == "fixed" for i in self.deciders[c])]
            comp = {}
            for c in set(self.cls):
                comp.setdefault(find(c), [])
            for c in free:
                comp[find(c)].append(c)
            self._comp = comp = {c: comp[find(c)] for c in set(self.cls)}
        return comp.get(c_id, [])

    def _plan_once(self, count_of, width_key, bumps, step_of, count: dict) -> list[LayerSel]:
        cls, full, ops, calls = self.cls, self.full, self.ops, self.calls
        # 1. counts per class: free classes from their first deciding layer, derived ones from their inputs.
        fixed: set[int] = set()
        for c_id, dec in self.deciders.items():
            if c_id in self.derived:
                continue
            fixed_calls = [i for i in dec if calls[i].role == "fixed"]
            if fixed_calls:
                count[c_id] = full[calls[fixed_calls[0]].t_out]
                fixed.add(c_id)
            else:
                step = step_of(calls[dec[0]]) if bumps.get(c_id) else 0
                count[c_id] = min(count_of(calls[dec[0]]) + bumps.get(c_id, 0) * step, full[calls[dec[0]].t_out])
        for _ in range(len(ops)):
            changed = False
            for i, op in enumerate(ops):
                if not op.outs:
                    continue
                n = self._derived_count(op, count, full, width_key)
                if n is None:
                    continue
                for k, t in enumerate(op.outs):
                    c = cls[t]
                    nk = n[k] if isinstance(n, list) else n
                    if c not in count:
                        count[c] = nk
                        changed = True
                    elif count[c] != nk and c in self.derived:
                        raise _tag(NotExactError(
                            f"{op.where}: at width {width_key} this tensor has {nk} channels but is tied (residual "
                            f"add / gating) to {self._where_class(c)}, which has {count[c]}"), c)
            if not changed:
                break
        missing = [t for t in range(self.ntensors) if cls[t] not in count]
        for t in missing:  # tensors never fed by anything we follow (unused outputs): full
            count[cls[t]] = full[t]
        # 2. position constraints, pushed back through derived ops.
        lo = {c: np.zeros(n, dtype=np.int64) for c, n in count.items()}
        hi = {c: np.full(n, np.iinfo(np.int64).max, dtype=np.int64) for c, n in count.items()}
        align: dict[int, int] = {}

        def runs(t, k, where):
            c, n, f = cls[t], count[cls[t]], full[t]
            if n % k or f % k:
                raise _tag(NotExactError(f"{where}: {n} active of {f} channels cannot be split into {k} equal "
                                         f"runs at width {width_key}"), c)
            g = np.repeat(_ar(k), n // k)
            np.maximum(lo[c], g * (f // k), out=lo[c])
            np.minimum(hi[c], (g + 1) * (f // k), out=hi[c])

        for op in ops:
            if op.kind == LAYER:
                c = calls[op.arg]
                if c.role == "gdecider":
                    runs(c.t_in, c.groups, c.name)
                    runs(c.t_out, c.groups, c.name)
                elif c.role == "gnorm":
                    runs(c.t_in, c.groups, c.name)
                elif c.role == "gwidth" and c.gw[0] > 1:
                    align[cls[c.t_in]] = math.lcm(align.get(cls[c.t_in], 1), c.gw[0])
            elif op.kind in (SHUFFLE, SPLIT):
                runs(op.ins[0], op.arg, op.where)
            elif op.kind == SPLITV:  # piece j: runtime positions [P_j, P_j + n_j) hold full channels of piece j
                c = cls[op.ins[0]]
                p_off = f_off = 0
                for t, f in zip(op.outs, op.arg):
                    n = count[cls[t]]
                    np.maximum(lo[c][p_off:p_off + n], f_off, out=lo[c][p_off:p_off + n])
                    np.minimum(hi[c][p_off:p_off + n], f_off + f, out=hi[c][p_off:p_off + n])
                    p_off, f_off = p_off + n, f_off + f
            elif op.kind == GROUPMAP and op.arg[0] > 1:
                align[cls[op.ins[0]]] = math.lcm(align.get(cls[op.ins[0]], 1), op.arg[0])
            elif op.kind == SLICE:
                t = op.ins[0]
                c, n, f = cls[t], count[cls[t]], full[t]
                a, b = op.arg
                p = _ar(n)
                kept = (p >= a) & (p < b)
                np.maximum(lo[c], np.where(kept, a, np.where(p < a, 0, b)), out=lo[c])
                np.minimum(hi[c], np.where(kept, b, np.where(p < a, a, f)), out=hi[c])
        for op in reversed(ops):
            self._push_back(op, count, lo, hi, full)
        # 3. selections: free classes by matching, derived ones from their inputs (topological order).
        sel: dict[int, Sel] = {}
        for c_id in count:
            if c_id in self.derived:
                continue
            t0 = self.members[c_id][0]
            f = full[t0]
            if c_id in fixed:
                sel[c_id] = Sel(_ar(f), f)
                continue
            try:
                sel[c_id] = Sel(_match(lo[c_id], hi[c_id], f, align.get(c_id, 1), self._where_class(c_id),
                                       width_key), f)
            except NotExactError as e:
                raise _tag(e, c_id) from None
        for _ in range(3):
            progress = False
            for op in ops:
                if not op.outs or op.kind not in _DERIVED and not (
                        op.kind == LAYER and calls[op.arg].role in ("dw", "gwidth")):
                    continue
                if op.kind == LAYER and calls[op.arg].role == "dw" and calls[op.arg].mult == 1:
                    continue
                ins = op.ins if op.kind != LAYER else (calls[op.arg].t_in,)
                if not all(cls[t] in sel for t in ins):
                    continue
                try:
                    outs = self._derived_sel(op, [sel[cls[t]] for t in ins], full, width_key)
                except NotExactError as e:
                    raise _tag(e, cls[ins[0]]) from None
                for t, s in zip(op.outs, outs):
                    c = cls[t]
                    if c not in sel:
                        sel[c] = s
                        progress = True
                    elif sel[c] != s:
                        raise _tag(NotExactError(
                            f"{op.where}: at width {width_key} this tensor is tied (residual add / gating) to "
                            f"{self._where_class(c)}, which carries other channels; the narrow net is not a "
                            "sub-network of the wide one"), c)
            if not progress:
                break
        for c_id in count:
            if c_id not in sel:
                f = full[self.members[c_id][0]]
                sel[c_id] = Sel(_ar(f), f)
        # 4. verify every class against its constraints.
        for c_id, s in sel.items():
            if s.n != count[c_id]:
                raise _tag(NotExactError(f"{self._where_class(c_id)}: {s.n} channels where {count[c_id]} are "
                                         f"needed at width {width_key}"), c_id)
            if s.n and (np.any(s.idx < lo[c_id]) or np.any(s.idx >= hi[c_id])):
                bad = int(np.argmax((s.idx < lo[c_id]) | (s.idx >= hi[c_id])))
                raise _tag(NotExactError(
                    f"{self._where_class(c_id)}: at width {width_key} runtime channel {bad} is full channel "
                    f"{int(s.idx[bad])}, but a consumer (grouped conv, shuffle, chunk or slice) needs it in "
                    f"[{int(lo[c_id][bad])}, {int(min(hi[c_id][bad], s.full))}); the model's own ops cannot run "
                    "this width as a sub-network of the full one"), c_id)
            a = align.get(c_id, 1)
            if a > 1 and s.n and (s.n % a or np.any(s.idx.reshape(-1, a) // a != (s.idx.reshape(-1, a)[:, :1] // a))
                                  or np.any(s.idx.reshape(-1, a) % a != _ar(a))):
                raise _tag(NotExactError(f"{self._where_class(c_id)}: at width {width_key} the active channels "
                                         f"are not whole groups of {a} in order (needed by a grouped conv / pixel "
                                         "shuffle)"), c_id)
        for op in ops:  # an op whose channels cannot be followed must only ever see full tensors
            if op.kind == OPAQUE and any(sel[cls[t]].n != sel[cls[t]].full for t in op.ins):
                raise NotExactError(
                    f"{op.where}: {op.arg}; its input carries fewer channels at width {width_key}, so the narrow "
                    "net would not be a sub-network of the wide one. Keep the layers feeding it fixed "
                    "(convert(..., fixed=[...])) or restructure the op")
        out = []
        for c in calls:
            si, so = sel[cls[c.t_in]], sel[cls[c.t_out]]
            groups = c.groups if c.role == "gdecider" else (si.n // c.gw[0] if c.role == "gwidth" else
                                                           si.n if c.role == "dw" else 1)
            out.append(LayerSel(si, so, groups, c))
        return PlanResult(out)

    def _where_class(self, c_id) -> str:
        for i in self.derived.get(c_id, []):
            return self.ops[i].where
        for i in self.deciders.get(c_id, []):
            return f"layer {self.calls[i].name!r}"
        return f"tensor {self.members[c_id][0]}"

    def _derived_count(self, op, count, full, width_key="?"):
        cls = self.cls

        def cnt(t):
            return count.get(cls[t])

        k = op.kind
        if k in (INPUT, CONST):
            return full[op.outs[0]]
        if k == OPAQUE:
            return full[op.outs[0]] if op.outs else None
        if k == LAYER:
            c = self.calls[op.arg]
            n = cnt(c.t_in)
            if n is None:
                return None
            if c.role == "dw":
                return n * c.mult
            if c.role == "gwidth":
                return n // c.gw[0] * c.gw[1]
            return None
        if k == CAT:
            ns = [cnt(t) for t in op.ins]
            return None if any(n is None for n in ns) else sum(ns)
        n = cnt(op.ins[0]) if op.ins else None
        if n is None:
            return None
        if k == SPLIT:
            return [n // op.arg] * op.arg
        if k == SPLITV:
            return _piece_counts(n, op.arg, op.where, width_key)
        if k == SHUFFLE:
            return n
        if k == SLICE:
            a, b = op.arg
            if a > 0 and n < min(b, full[op.ins[0]]):
                raise NotExactError(
                    f"{op.where}: the channel slice [{a}:{b}] has literal bounds: at width {width_key} the narrow "
                    f"tensor has {n} of {full[op.ins[0]]} channels, so the slice does not hold the channels it holds "
                    "at full width (keep the layer producing it fixed, or slice by x.size(1))")
            return max(0, min(n, b) - a)
        if k in (FLATTEN, TILE):
            return n * op.arg
        if k == GROUPMAP:
            gi, go = op.arg
            return n // gi * go
        return None

    def _push_back(self, op, count, lo, hi, full):
        """Translate the position constraints on a derived op's output into constraints on its inputs."""
        cls = self.cls
        k = op.kind
        if k == CAT:
            c_out = cls[op.outs[0]]
            off_p, off_v = 0, 0
            for t in op.ins:
                c, n = cls[t], count[cls[t]]
                np.maximum(lo[c], lo[c_out][off_p:off_p + n] - off_v, out=lo[c])
                np.minimum(hi[c], hi[c_out][off_p:off_p + n] - off_v, out=hi[c])
                off_p += n
                off_v += full[t]
        elif k == SPLIT:
            c_in, n = cls[op.ins[0]], count[cls[op.ins[0]]]
            f = full[op.ins[0]]
            kk = op.arg
            for j, t in enumerate(op.outs):
                c = cls[t]
                sl = slice(j * n // kk, (j + 1) * n // kk)
                np.maximum(lo[c_in][sl], lo[c] + j * f // kk, out=lo[c_in][sl])
                np.minimum(hi[c_in][sl], _sat_add(hi[c], j * f // kk), out=hi[c_in][sl])
        elif k == SPLITV:
            c_in = cls[op.ins[0]]
            p_off = f_off = 0
            for t, f in zip(op.outs, op.arg):
                c, n = cls[t], count[cls[t]]
                sl = slice(p_off, p_off + n)
                np.maximum(lo[c_in][sl], lo[c] + f_off, out=lo[c_in][sl])
                np.minimum(hi[c_in][sl], _sat_add(hi[c], f_off), out=hi[c_in][sl])
                p_off, f_off = p_off + n, f_off + f
        elif k == SHUFFLE:
            g = op.arg
            c_in, c_out = cls[op.ins[0]], cls[op.outs[0]]
            n, f = count[c_in], full[op.ins[0]]
            if n % g or f % g:
                return
            m, fg = n // g, f // g
            q = _ar(n)
            tt, gg = q // g, q % g  # output position q = t*g + gi reads input position gi*m + t
            src = gg * m + tt
            lo_v = -((-(lo[c_out] - gg)) // g) + gg * fg
            hi_v = np.where(hi[c_out] >= np.iinfo(np.int64).max // 2, hi[c_in][src],
                            -((-(np.minimum(hi[c_out], np.iinfo(np.int64).max // 2) - gg)) // g) + gg * fg)
            np.maximum.at(lo[c_in], src, lo_v)
            np.minimum.at(hi[c_in], src, hi_v)
        elif k == SLICE:
            a, _ = op.arg
            c_in, c_out = cls[op.ins[0]], cls[op.outs[0]]
            n_out = count[c_out]
            sl = slice(a, a + n_out)
            np.maximum(lo[c_in][sl], lo[c_out] + a, out=lo[c_in][sl])
            np.minimum(hi[c_in][sl], _sat_add(hi[c_out], a), out=hi[c_in][sl])

    def _derived_sel(self, op, ins: list[Sel], full, width_key) -> list[Sel]:
        k = op.kind
        where = op.where
        if k in (INPUT, CONST, OPAQUE):
            return [Sel(_ar(full[t]), full[t]) for t in op.outs]
        if k == LAYER:
            c = self.calls[op.arg]
            s = ins[0]
            if c.role == "dw":
                m = c.mult
                return [Sel((s.idx[:, None] * m + _ar(m)[None, :]).ravel(), full[c.t_out])]
            gi, go = c.gw
            return [Sel(_groupmap(s, gi, go, c.name, width_key), full[c.t_out])]
        if k == CAT:
            off, parts = 0, []
            for t, s in zip(op.ins, ins):
                parts.append(s.idx + off)
                off += full[t]
            return [Sel(np.concatenate(parts) if parts else _ar(0), full[op.outs[0]])]
        s = ins[0]
        f_in = full[op.ins[0]]
        if k == SPLIT:
            kk = op.arg
            n = s.n
            out = []
            for j, t in enumerate(op.outs):
                piece = s.idx[j * n // kk:(j + 1) * n // kk] - j * (f_in // kk)
                if np.any(piece < 0) or np.any(piece >= f_in // kk):
                    raise NotExactError(f"{where}: at width {width_key} chunk {j} of the narrow tensor holds "
                                        "channels of another chunk of the full tensor")
                out.append(Sel(piece, full[t]))
            return out
        if k == SPLITV:
            counts = _piece_counts(s.n, op.arg, where, width_key)
            out, p_off, f_off = [], 0, 0
            for t, f, n in zip(op.outs, op.arg, counts):
                piece = s.idx[p_off:p_off + n] - f_off
                if np.any(piece < 0) or np.any(piece >= f):
                    raise NotExactError(f"{where}: at width {width_key} piece {len(out)} of the narrow tensor holds "
                                        "channels of another piece of the full tensor")
                out.append(Sel(piece, full[t]))
                p_off, f_off = p_off + n, f_off + f
            return out
        if k == SHUFFLE:
            g, n = op.arg, s.n
            if n % g:
                raise NotExactError(f"{where}: {n} active channels cannot be shuffled in {g} groups at width "
                                    f"{width_key}")
            m, fg = n // g, f_in // g
            grid = s.idx.reshape(g, m)  # runtime group gi = positions [gi*m, (gi+1)*m)
            base = (_ar(g) * fg)[:, None]
            if np.any(grid < base) or np.any(grid >= base + fg):
                raise NotExactError(f"{where}: at width {width_key} a runtime shuffle group holds channels of "
                                    "another full group")
            out = ((grid - base) * g + _ar(g)[:, None]).T.ravel()
            return [Sel(out, full[op.outs[0]])]
        if k == SLICE:
            a, b = op.arg
            n = s.n
            kept = s.idx[a:min(b, n)]
            dropped = np.concatenate([s.idx[:a], s.idx[min(b, n):]])
            if np.any(kept < a) or np.any(kept >= b) or np.any((dropped >= a) & (dropped < b)):
                raise NotExactError(f"{where}: at width {width_key} the channel slice [{a}:{b}] of the narrow "
                                    "tensor keeps other channels than at full width")
            return [Sel(kept - a, full[op.outs[0]])]
        if k == FLATTEN:
            hw = op.arg
            return [Sel((s.idx[:, None] * hw + _ar(hw)[None, :]).ravel(), full[op.outs[0]])]
        if k == TILE:  # position p * n + i of the narrow tensor is p * C + idx[i] of the full one
            return [Sel((_ar(op.arg)[:, None] * f_in + s.idx[None, :]).ravel(), full[op.outs[0]])]
        if k == GROUPMAP:
            gi, go = op.arg
            return [Sel(_groupmap(s, gi, go, where, width_key), full[op.outs[0]])]
        raise AssertionError(k)


class _ChunkSizes(tuple):
    """The full piece sizes of a ``chunk(k)`` whose ``k`` does not divide the channel count: the pieces at a width
    follow torch's rule, not the shares of :func:`_splitv_counts`."""


def _chunk_counts(n: int, fulls: _ChunkSizes, where: str = "chunk", width_key="?") -> list[int]:
    """Piece sizes of ``x.chunk(len(fulls))`` on ``n`` channels (pieces of ``ceil(n / k)``, the last the rest).

    Raises:
        NotExactError: torch would return fewer pieces, or a piece larger than the same piece at full width.
    """
    k = len(fulls)
    s = -(-n // k)
    out = [min(s, n - i * s) for i in range(k)]
    if min(out) <= 0 or any(a > f for a, f in zip(out, fulls)):
        raise NotExactError(f"{where}: chunk({k}) of {n} channels at width {width_key} gives pieces "
                            f"{[max(0, a) for a in out]}, not sub-pieces of the full pieces {list(fulls)}")
    return out


def _piece_counts(n: int, fulls, where: str = "split", width_key="?") -> list[int]:
    if isinstance(fulls, _ChunkSizes):
        return _chunk_counts(n, fulls, where, width_key)
    return _splitv_counts(n, fulls)


def _splitv_counts(n: int, fulls) -> list[int]:
    """Active counts of the pieces of a split with module-held sizes when its input has ``n`` channels: each piece
    keeps its share of the full width (largest remainders first), at least one channel where ``n`` allows."""
    f = sum(fulls)
    if n >= f:
        return list(fulls)
    out = [min(fi, n * fi // f) for fi in fulls]
    order = sorted(range(len(fulls)), key=lambda i: (-(n * fulls[i] % f), i))
    for i in order:
        if sum(out) >= n:
            break
        if out[i] < fulls[i]:
            out[i] += 1
    for i in range(len(out)):  # an empty piece would be a zero-channel conv: borrow from the largest
        if out[i] == 0 and n >= len(out):
            j = max(range(len(out)), key=lambda q: out[q])
            out[j] -= 1
            out[i] = 1
    while sum(out) < n:  # only when shares were capped at their full size
        i = next(i for i in range(len(out)) if out[i] < fulls[i])
        out[i] += 1
    return out


def _tag(e: NotExactError, c_id) -> NotExactError:
    """Attach the class an infeasibility concerns (the planner grows the layers coupled to it)."""
    if getattr(e, "cls", None) is None:
        e.cls = c_id
    return e


def _sat_add(a: np.ndarray, v: int) -> np.ndarray:
    big = np.iinfo(np.int64).max // 2
    return np.where(a >= big, a, a + v)


def _groupmap(s: Sel, gi: int, go: int, where, width_key) -> np.ndarray:
    """Selection after an op that maps each whole group of ``gi`` input channels to ``go`` output channels."""
    n = s.n
    if n % gi:
        raise NotExactError(f"{where}: {n} active channels are not whole groups of {gi} at width {width_key}")
    blocks = s.idx.reshape(-1, gi)
    g = blocks[:, 0] // gi
    if np.any(blocks != g[:, None] * gi + _ar(gi)[None, :]):
        raise NotExactError(f"{where}: at width {width_key} the active channels are not whole groups of {gi}")
    return (g[:, None] * go + _ar(go)[None, :]).ravel()


def _match(lo: np.ndarray, hi: np.ndarray, full: int, align: int, where: str, width_key: str) -> np.ndarray:
    """Assign distinct full channels to runtime positions within ``[lo, hi)`` each (Glover's algorithm: sweep the
    channels upwards, give each to the waiting position with the earliest deadline), in whole aligned blocks of
    ``align``; unconstrained positions get the first channels (a prefix)."""
    n = len(lo)
    if n == 0:
        return _ar(0)
    top = np.minimum(hi, full)
    if np.all(lo == 0) and np.all(top >= full) and align == 1:
        return _ar(n)
    if align > 1:
        if n % align or full % align:
            raise NotExactError(f"{where}: {n} of {full} channels are not whole groups of {align} at width {width_key}")
        k = _ar(align)
        blo = (-(-(lo.reshape(-1, align) - k) // align)).max(1)
        bhi = (-(-(top.reshape(-1, align) - k) // align)).min(1)
        blocks = _match(blo, bhi, full // align, 1, where, width_key)
        return (blocks[:, None] * align + k[None, :]).ravel()
    order = np.lexsort((np.arange(n), lo))
    out = np.full(n, -1, dtype=np.int64)
    heap: list = []
    i, v = 0, 0
    while i < n or heap:
        if not heap and i < n:
            v = max(v, int(lo[order[i]]))
        while i < n and lo[order[i]] <= v:
            p = int(order[i])
            heapq.heappush(heap, (int(top[p]), p))
            i += 1
        deadline, p = heapq.heappop(heap)
        if v >= deadline or v >= full:
            raise NotExactError(f"{where}: no choice of {n} of its {full} channels satisfies every consumer at "
                                f"width {width_key} (runtime position {p} needs a channel in "
                                f"[{int(lo[p])}, {int(top[p])}))")
        out[p] = v
        v += 1
    return out
