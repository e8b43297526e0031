"""Active width: a per-model default plus a per-call override held in a ``ContextVar``.

Nothing here is a module-level flag: the default lives on the model's :class:`SlimState`, the override in a
``ContextVar`` (per thread / per asyncio task), so two threads can run one model at two widths.
"""
from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from typing import Mapping, Union

from .errors import ChannelGroupError, NotExactError, NotSlimmableError, UnknownLayerError, WidthError
from .width import WidthSpec, _canon

WidthLike = Union[float, Mapping[str, float]]

# Per-call width override; ``None`` means "use the model's default". Thread-safe by construction.
_call_width: ContextVar = ContextVar("slim_plugins_call_width", default=None)
# Set while ``calibrate_bn`` runs: maps BN module -> accumulator. Scoped to the calibrating context only.
_calibration: ContextVar = ContextVar("slim_plugins_calibration", default=None)

BN_MODES = ("switchable", "switchable_shared", "us", "naive", "frozen")


class Active:
    """A resolved width configuration (immutable).

    Attributes:
        key: canonical string naming the configuration (BN post-statistics are cached under it).
        uniform: the width multiplier used by layers without a per-layer ratio.
        ratios: ``{layer name: ratio}`` for nonuniform widths, else ``None``.
        switch: switch index (S-Nets) or ``None``.
        is_max / is_min: the configuration is the widest / narrowest of the spec.
        geo: per layer slot, the geometry the channel plan gives it at this configuration (``None`` for layers
            outside every traced part), or ``None`` for a model without channel plan.
    """

    __slots__ = ("key", "uniform", "ratios", "switch", "is_max", "is_min", "geo", "sels")

    def __init__(self, key, uniform, ratios, switch, is_max, is_min):
        self.key, self.uniform, self.ratios, self.switch = key, uniform, ratios, switch
        self.is_max, self.is_min = is_max, is_min
        self.geo = None
        self.sels = None  # layer name -> (input selection, output selection) of the channel plan

    def ratio(self, layer_name: str) -> float:
        if self.ratios is None:
            return self.uniform
        return self.ratios.get(layer_name, self.uniform)

    def __repr__(self):
        return f"Active({self.key})"


def width_key(w: float) -> str:
    """Canonical key of a uniform width (used in BN caches and tables)."""
    return f"{_canon(w):g}"


class SlimState:
    """Per-model width state shared by all slimmable layers of one converted model.

    Holds the spec, the BN mode, the model default width, the channel groups (layer name -> group name) and the
    channel graphs of the traced parts (``slim_plugins.graph``) with the layers they plan for.
    """

    def __init__(self, spec: WidthSpec, bn_mode: str, output_averaging: bool = False, frozen_bn: bool = False):
        self.spec = spec
        self.bn_mode = bn_mode
        self.output_averaging = output_averaging
        self.frozen_bn = frozen_bn
        self.default: WidthLike = spec.max
        self.groups: dict[str, str] | None = None  # layer name -> group name (nonuniform widths)
        self.declared_groups: dict[str, list[str]] | None = None
        self.layer_names: list[str] = []
        self.graphs: list = []            # ChannelGraph per traced part
        self.layers: list = []            # slim layers by slot (planned layers)
        self.slots: dict[str, int] = {}   # layer name -> slot
        self._resolved: dict = {}
        self._lock = threading.Lock()

    # Copies drop caches (and the lock, which cannot be copied).
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_resolved"] = {}
        d.pop("_lock", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    # ---- resolution ---------------------------------------------------------------------------------------
    def active(self, carried=None) -> Active:
        """The configuration in force for the current call: the context override, else a width ``carried`` to
        another thread (a DataParallel replica), else the model default."""
        w = _call_width.get()
        if w is None:
            w = self.default if carried is None else carried
        if type(w) is float:  # fast path: every layer calls this once per forward
            a = self._resolved.get(w)
            if a is not None:
                return a
        return self.lookup(w)

    def lookup(self, w: WidthLike) -> Active:
        """:meth:`resolve` through the bounded cache of resolved configurations (plans included)."""
        cache_key = w if not isinstance(w, Mapping) else tuple(sorted(w.items()))
        a = self._resolved.get(cache_key)
        if a is None:
            a = self.resolve(w)
            with self._lock:
                if len(self._resolved) > 256:  # US-Nets sample continuous widths: keep the cache bounded
                    self._resolved.clear()
                self._resolved[cache_key] = a
        return a

    def resolve(self, w: WidthLike) -> Active:
        """Validate ``w`` against the spec and return its :class:`Active` configuration.

        Raises:
            WidthError: width outside the range / not a switch; unknown layer or group name.
            ChannelGroupError: a nonuniform width before channel groups exist.
        """
        spec = self.spec
        if not isinstance(w, Mapping):
            c = spec.validate(w)
            sw = spec.widths.index(c) if spec.is_switches else None
            return self._planned(Active(width_key(c), c, None, sw, c == spec.max, c == spec.min))
        if spec.is_switches:
            raise WidthError("nonuniform (per-layer) widths need a US-Net range spec; this model has switches "
                             f"{list(spec.widths)}")
        if self.groups is None:
            raise ChannelGroupError("nonuniform widths need channel groups: call slim.set_width(model, {...}) or "
                                    "slim.channel_groups(model) once on the model first")
        rest = spec.validate(w.get("*", spec.max))
        members: dict[str, list[str]] = {}
        for layer, g in self.groups.items():
            members.setdefault(g, []).append(layer)
        ratios: dict[str, float] = {}
        given: dict[str, tuple] = {}  # group -> (name that set it, ratio)
        for name, r in w.items():
            if name == "*":
                continue
            if not isinstance(name, str):
                raise WidthError(f"nonuniform width keys are layer or group names, got {name!r}")
            r = spec.validate(r)
            if name in members:
                group = name
            elif name in self.groups:
                group = self.groups[name]
            else:
                raise UnknownLayerError(f"unknown layer or channel group {name!r}; known groups: {sorted(members)}")
            prev = given.get(group)
            if prev is not None and prev[1] != r:
                raise WidthError(f"conflicting ratios for channel group {group!r}: {prev[0]!r}={prev[1]:g} and "
                                 f"{name!r}={r:g} (layers tied by a residual add or gating share one ratio: "
                                 f"{members[group]})")
            given[group] = (name, r)
            for layer in members[group]:
                ratios[layer] = r
        vals = set(ratios.values()) | ({rest} if len(ratios) < len(self.groups) else set())
        key = "nu:" + ",".join(f"{g}={ratios.get(m[0], rest):g}" for g, m in sorted(members.items())
                               if ratios.get(m[0], rest) != rest) + f";*={rest:g}"
        return self._planned(Active(key, rest, ratios, None, vals == {spec.max}, vals == {spec.min}))

    # ---- channel plan -------------------------------------------------------------------------------------
    def _planned(self, a: Active) -> Active:
        """Attach the channel plan's per-layer geometry to ``a`` (DESIGN rule 1).

        Raises:
            NotExactError: the width cannot run as a sub-network of the full model (names the op).
        """
        if self.graphs:
            a.sels = {}
            a.geo = self.geometry(a, a.sels)
        return a

    def geometry(self, a: Active, sels: dict | None = None) -> list:
        layers, slots = self.layers, self.slots
        geo: list = [None] * len(layers)
        seen: dict[int, tuple] = {}
        for g in self.graphs:
            full = g.full
            plan = g.plan(lambda call: layers[slots[call.name]].active_out(a, full[call.t_out]), a.key,
                          lambda call: layers[slots[call.name]].count_step())
            if plan.geo is None:  # a plan is shared by every width with the same counts: build its geometry once
                part = []
                for ls in plan:
                    slot = slots[ls.call.name]
                    part.append((slot, ls, layers[slot].geometry_from_plan(ls, full[ls.call.t_in])))
                plan.geo = part
            for slot, ls, gl in plan.geo:
                prev = seen.get(slot)
                if prev is not None:
                    if not (prev[0] == ls.sel_in and prev[1] == ls.sel_out):
                        lay = layers[slot]
                        what = (f"layer {ls.call.name!r} is called" if not hasattr(lay, "attr") else
                                f"{lay.attr!r} of " + (f"module {lay.host!r}" if lay.host else "the model") +
                                " (a parameter or head count tied to channels) is read")
                        raise NotExactError(f"{what} at several places whose channels differ at width {a.key}; it "
                                            "cannot be slimmed exactly")
                    continue
                seen[slot] = (ls.sel_in, ls.sel_out)
                if sels is not None:
                    sels[ls.call.name] = (ls.sel_in.idx, ls.sel_out.idx)
                geo[slot] = gl
        return geo


def find_state(model, adopt: bool = False) -> SlimState:
    """The :class:`SlimState` of a converted model (DDP/DataParallel wrappers are looked through). With
    ``adopt``, fixed-output layers replaced since convert (a new classifier) are converted first, as the model's
    next forward would (``slim_plugins.convert.HeadGuard``): the verbs that plan before they run a forward.

    Raises:
        NotSlimmableError: the model has no slimmable layers. UnsupportedModuleError (``adopt``): a replaced layer
            that cannot be adopted.
    """
    if not callable(getattr(model, "modules", None)):
        raise NotSlimmableError(f"expected a converted nn.Module, got {type(model).__name__} {model!r:.80}")
    if adopt:
        for m in model.modules():
            for h in list(m._forward_pre_hooks.values()):
                if getattr(h, "slim_head_guard", False):
                    h(m, ())
    st = getattr(model, "_slim_state", None)
    if isinstance(st, SlimState):
        return st
    for m in model.modules():
        st = getattr(m, "_slim_state", None)
        if isinstance(st, SlimState):
            return st
    raise NotSlimmableError(f"{type(model).__name__} has no slimmable layers; convert it with slim.convert(model, spec)")


def set_width(model, w: WidthLike) -> None:
    """Set the model's default width: a width multiplier, or ``{group or layer name: ratio}`` (nonuniform).

    Unlisted groups of a nonuniform width run at ``w["*"]`` if given, else at the spec's max. Per-call
    overrides (:func:`width`) take precedence.

    Raises:
        WidthError: the width is not allowed by the model's spec (the model is left unchanged).
        ChannelGroupError: nonuniform widths on a model that cannot be traced and declared no groups.
    """
    st = find_state(model)
    if isinstance(w, Mapping) and not st.spec.is_switches:  # S-Nets reject dicts in resolve, without tracing
        from .convert import channel_groups  # local import: fx analysis only when nonuniform widths are used

        channel_groups(model)
    a = st.lookup(w if isinstance(w, Mapping) else st.spec.validate(w))  # validate before mutating
    st.default = dict(w) if isinstance(w, Mapping) else a.uniform


def active_channels(model, w: WidthLike) -> dict:
    """The channels each layer uses at width ``w``, as indices into its full-width input and output channels.

    Returns:
        ``{layer name: (input indices, output indices)}`` (``torch.long``, runtime channel order) for every layer
        the channel analysis plans (DESIGN rule 1). A prefix is ``arange(n)``; behind a concatenation, a split, a
        shuffle or a grouped conv the indices are the sub-network's own channels.

    Raises:
        WidthError: ``w`` not allowed. NotExactError: the width cannot run as an exact sub-network.
        ChannelGroupError: the model could not be traced at convert time (no channel plan).
    """
    import torch

    st = find_state(model, adopt=True)
    if not st.graphs:
        raise ChannelGroupError("this model has no channel plan (it could not be traced at convert time)")
    a = st.resolve(w)
    slot_of = {n: st.layers[i] for n, i in st.slots.items()}
    return {n: (torch.as_tensor(i), torch.as_tensor(o)) for n, (i, o) in a.sels.items()
            if isinstance(slot_of.get(n), torch.nn.Module)}  # layers only (not tied parameters / head counts)


def width_spec(model) -> WidthSpec:
    """The :class:`WidthSpec` a converted model runs at.

    Raises:
        NotSlimmableError: the model has no slimmable layers.
    """
    return find_state(model).spec


def get_width(model) -> WidthLike:
    """The model's default width."""
    return find_state(model).default


def checkpoint_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the recomputation in
    backward runs at the width of the forward, even when backward runs outside the ``slim.width`` block or on an
    autograd worker thread (DESIGN rule 4)."""
    w = _call_width.get()
    return contextlib.nullcontext(), (width(w) if w is not None else contextlib.nullcontext())


def checkpoint(function, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint`` (non-reentrant) that recomputes at the width of the forward.

    Example::

        y = slim.checkpoint(block, x)       # inside `with slim.width(0.5):`; backward may run anywhere
    """
    from torch.utils.checkpoint import checkpoint as _ckpt

    if kwargs.pop("use_reentrant", False):
        raise WidthError("slim.checkpoint needs use_reentrant=False (the reentrant variant has no context_fn)")
    return _ckpt(function, *args, use_reentrant=False, context_fn=checkpoint_context_fn, **kwargs)


class CarriesWidth:
    """Mixin of slimmable layers: a DataParallel replica (made in the caller's thread) keeps the caller's
    per-call width, which its worker thread does not see (ContextVars do not cross threads)."""

    _dp_width = None

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._dp_width = _call_width.get()
        return replica


@contextlib.contextmanager
def width(w: WidthLike):
    """Run every slimmable model called inside the block at width ``w`` (per call, thread- and task-local).

    The width is validated against each model's spec when the model runs (:class:`WidthError` then).

    Example::

        with slim.width(0.5):
            y = model(x)
    """
    if type(w) is not float and not isinstance(w, Mapping):
        from .width import _number

        _number(w)  # None, strings and booleans are rejected here, not at the first forward
    token = _call_width.set(w if not isinstance(w, Mapping) else dict(w))
    try:
        yield
    finally:
        _call_width.reset(token)
