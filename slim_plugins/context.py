"""Active width: a per-model default plus a per-call override held in a ``ContextVar``.

Nothing here is a module-level flag: the default lives on the model's :class:`SlimState`, the override in a
``ContextVar`` (per thread / per asyncio task), so two threads can run one model at two widths.
"""
from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from typing import Mapping, Union

from .errors import ChannelGroupError, NotSlimmableError, UnknownLayerError, WidthError
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
    """

    __slots__ = ("key", "uniform", "ratios", "switch", "is_max", "is_min")

    def __init__(self, key, uniform, ratios, switch, is_max, is_min):
        self.key, self.uniform, self.ratios, self.switch = key, uniform, ratios, switch
        self.is_max, self.is_min = is_max, is_min

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

    Holds the spec, the BN mode, the model default width and the channel groups (layer name -> group name).
    """

    def __init__(self, spec: WidthSpec, bn_mode: str, output_averaging: bool = False):
        self.spec = spec
        self.bn_mode = bn_mode
        self.output_averaging = output_averaging
        self.default: WidthLike = spec.max
        self.groups: dict[str, str] | None = None  # layer name -> group name (nonuniform widths)
        self.declared_groups: dict[str, list[str]] | None = None
        self.layer_names: list[str] = []
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
    def active(self) -> Active:
        """The configuration in force for the current call (context override, else model default)."""
        w = _call_width.get()
        if w is None:
            w = self.default
        if type(w) is float:  # fast path: every layer calls this once per forward
            a = self._resolved.get(w)
            if a is not None:
                return a
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
            return Active(width_key(c), c, None, sw, c == spec.max, c == spec.min)
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
        for name, r in w.items():
            if name == "*":
                continue
            r = spec.validate(r)
            if name in members:
                group = name
            elif name in self.groups:
                group = self.groups[name]
            else:
                raise UnknownLayerError(f"unknown layer or channel group {name!r}; known groups: {sorted(members)}")
            for layer in members[group]:
                ratios[layer] = r
        vals = set(ratios.values()) | ({rest} if len(ratios) < len(self.groups) else set())
        key = "nu:" + ",".join(f"{g}={ratios.get(m[0], rest):g}" for g, m in sorted(members.items())
                               if ratios.get(m[0], rest) != rest) + f";*={rest:g}"
        return Active(key, rest, ratios, None, vals == {spec.max}, vals == {spec.min})


def find_state(model) -> SlimState:
    """The :class:`SlimState` of a converted model (DDP/DataParallel wrappers are looked through).

    Raises:
        NotSlimmableError: the model has no slimmable layers.
    """
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
    st.resolve(w)  # validate before mutating
    st.default = dict(w) if isinstance(w, Mapping) else st.spec.validate(w)


def get_width(model) -> WidthLike:
    """The model's default width."""
    return find_state(model).default


@contextlib.contextmanager
def width(w: WidthLike):
    """Run every slimmable model called inside the block at width ``w`` (per call, thread- and task-local).

    The width is validated against each model's spec when the model runs (:class:`WidthError` then).

    Example::

        with slim.width(0.5):
            y = model(x)
    """
    token = _call_width.set(w if not isinstance(w, Mapping) else dict(w))
    try:
        yield
    finally:
        _call_width.reset(token)
