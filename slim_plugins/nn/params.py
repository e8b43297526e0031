"""Parameters tied to channels outside any layer: class / register tokens, absolute position embeddings, layer
scales (``x * self.gamma``) — a parameter or buffer of a module that has no width-switchable counterpart, which the
channel analysis finds tied elementwise to a channel tensor (DESIGN rule 9).

``convert`` gives each such parameter a *slot* (:class:`ParamSlot`) in the channel plan and switches the module
that holds it to a subclass of its own class (:func:`host`) whose attribute read ``module.<name>`` inside a
forward (``__call__`` or a ``forward_*`` method) returns the parameter restricted to the active channels at the
current width, so the module's own forward runs unchanged. The stored parameter stays whole (state dict keys and shapes, ``get_parameter``, optimizers and
EMA copies see the full tensor); only reads inside the forward are sliced, and gradients flow to the selected
entries.
"""
from __future__ import annotations

import functools
import inspect
import sys
from contextvars import ContextVar

import torch
from torch import nn

from ..context import _call_width
from ..errors import UnsupportedModuleError
from .layers import TracksParameters, stamps, unbased
from .norm import BNGeo


class ParamSlot:
    """The plan slot of one tied parameter: ``host`` (module name), ``attr`` (parameter name), ``dim`` (the dim
    that holds the channels)."""

    _slim_slot: int = -1

    def __init__(self, name: str, dim: int):
        self.slim_name = name
        self.host, _, self.attr = name.rpartition(".")
        self.dim = int(dim)

    def channel_role(self) -> dict:
        return {"role": "param", "pdim": self.dim}

    def geometry_from_plan(self, ls, full_in: int) -> BNGeo:
        s = ls.sel_in
        return BNGeo(s.n, None if s.prefix else s.idx)


# The outermost hosted module whose forward runs, False outside one (per thread / task): reads are sliced there
# only, so ``model.get_parameter(name)``, optimizers and EMA code outside the forward see the parameter itself.
_in_forward: ContextVar = ContextVar("slim_plugins_host_forward", default=False)
_MISSING = object()


class ParamHost(TracksParameters):
    """Mixin put in front of a module's own class: inside its forward (``__call__``, or one of its class's
    ``forward_*`` methods called directly: timm's ``forward_features`` / ``forward_head``), reads of its tied
    parameters return the active channels; elsewhere the parameter itself."""

    _tracks_subtree = False  # its own (tied) parameters: the slim children track theirs

    def __call__(self, *args, **kwargs):
        caches = self.__dict__.get("_slim_caches")
        if caches:  # (inline, not _clear_forward_caches: one Python call less per hosted module, batch-1 latency)
            for k in caches:  # tensors cached at another width (register_forward_cache)
                self.__dict__[k].clear()
        call = type(self)._slim_plain_class.__call__
        if _in_forward.get():  # called inside another hosted module's forward (the model's): already marked
            return call(self, *args, **kwargs)
        token = _in_forward.set(self)  # (truthy; the module, so its forward_* methods see their own call)
        try:
            return call(self, *args, **kwargs)
        finally:
            _in_forward.reset(token)

    def __getstate__(self):  # copies and pickles start without the selections cached from the parameters
        d = dict(super().__getstate__())
        d.pop("_slim_param_cache", None)
        return d

    def __setstate__(self, state):  # unpickled in a fresh process: the recreated class needs its descriptors again
        super().__setstate__(state)
        _add_descriptors(type(self), list(self.__dict__.get("_slim_hosted") or ()) +
                         list(self.__dict__.get("_slim_ints") or ()))

    def __delattr__(self, name):
        """Refused for a hosted name (``del module.pos_embed``, also ``torch.nn.utils.parametrize``, which deletes
        the tensor before it puts its property in front of this class's descriptor, so forward reads would be whole
        at every width); nothing is changed.

        Raises:
            UnsupportedModuleError: ``name`` is a tied parameter or a head count of this module.
        """
        d = self.__dict__
        if name in (d.get("_slim_hosted") or ()) or name in (d.get("_slim_ints") or ()):
            from ..errors import UnsupportedModuleError

            raise UnsupportedModuleError(
                f"{type(self).__name__}.{name} is tied to channels (its reads in a forward are the active channels "
                "at the width); it cannot be deleted or parametrized (torch.nn.utils.parametrize) after "
                "slim.convert")
        super().__delattr__(name)

    def _slim_read(self, name):
        """``self.<name>`` for a name this class serves through a :class:`_Hosted` descriptor."""
        d = self.__dict__
        hosted = d.get("_slim_hosted")
        if hosted is None or name not in hosted and name not in d.get("_slim_ints", ()):
            return _plain_read(self, name)  # not hosted in this instance: what the module's own class gives
        ints = d.get("_slim_ints")
        if ints is not None and name in ints:  # a head count: the active one inside a forward
            if _in_forward.get():
                geos = self._slim_state.active(None).geo
                if geos is not None:
                    return _active_int(ints[name], name, hosted, geos)
            return ints[name]
        value = d["_parameters"].get(name, _MISSING)
        if value is _MISSING:
            value = d["_buffers"].get(name, _MISSING)
        if value is _MISSING:
            value = _plain_read(self, name)
        if not _in_forward.get():
            return value
        slot, dim = hosted[name]
        a = self._slim_state.active(None)
        g = a.geo[slot] if a.geo is not None else None
        if value is None:
            return value
        grad = torch.is_grad_enabled()
        if g is None or (g.idx is None and value.shape[dim] == g.c):
            out, stamp = value, None  # the whole tensor: what the module's own class reads
        elif grad:
            return g.take(value, dim)
        else:
            st = stamps((value,))  # before selecting (a concurrent write: a miss)
            with torch.no_grad():
                out = unbased(g.take(value, dim).contiguous())
            if st is None:  # an inference tensor: nothing to reuse
                return out
            stamp = st[0]
        if not grad:  # one entry per attribute (batch-1 latency: checked first, in the descriptor)
            d.setdefault("_slim_param_cache", {})[name] = (a, value, stamp, out)
        return out


class _Hosted:
    """Class-level descriptor of a hosted name (a tied parameter, a head count) on a hosted class. A descriptor,
    not ``__getattr__``, so reads of the module's children and other attributes cost what they cost in the
    module's own class (batch-1 latency: every ``self.<child>`` in a forward). Non-data: a value the instance
    holds in its ``__dict__`` wins, as without it."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        d = obj.__dict__
        cache = d.get("_slim_param_cache")  # name -> (configuration, tensor, stamp or None, value)
        if cache is not None:  # the common read at batch 1 first: the selection of the last no-grad read
            name = self.name
            hit = cache.get(name)
            if hit is not None and _in_forward.get() and not torch.is_grad_enabled():
                t = d["_parameters"].get(name)
                if t is None:
                    t = d["_buffers"].get(name)
                st = d["_slim_state"]
                w = _call_width.get()
                if w is None:
                    w = st.default
                # SlimState.active for an already resolved width multiplier, inline (batch-1 latency)
                a = st._resolved.get(w) if type(w) is float else st.active(None)
                if t is hit[1] and hit[0] is a:
                    st = hit[2]
                    if st is None:
                        return hit[3]  # (no stamp for the whole tensor: it is read live)
                    if st[0]._version == st[1] and t.__dict__ is st[2]:  # stamps(): unchanged
                        return hit[3]
        return obj._slim_read(self.name)


def _clear_forward_caches(module) -> None:
    caches = module.__dict__.get("_slim_caches")
    if caches:
        for k in caches:  # tensors cached at another width (register_forward_cache)
            module.__dict__[k].clear()


def _marking(fn):
    """``fn`` (a ``forward_*`` method of a hosted class) run as the module's forward: its reads of tied parameters
    are the active channels, its forward caches start empty and its head guards run first, as in ``__call__``."""
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        running = _in_forward.get()
        if running is self:  # called from its own __call__ (model(x) -> forward_features): done there already
            return fn(self, *args, **kwargs)
        _clear_forward_caches(self)
        refused = None
        for hook in tuple(self._forward_pre_hooks.values()):
            if getattr(hook, "slim_head_guard", False):  # a new classifier: adopted as a forward would
                try:
                    hook(self, args)
                except UnsupportedModuleError as e:  # raised only if this method fails (it may not use the head)
                    refused = e
        token = None if running else _in_forward.set(self)  # (nested in another forward: already marked)
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:
            if refused is not None:
                raise refused from e
            raise
        finally:
            if token is not None:
                _in_forward.reset(token)

    method.__slim_marking__ = True
    return method


def forward_methods(cls: type) -> dict:
    """``{name: function}`` of the public ``forward_*`` methods of ``cls`` (timm's ``forward_features``,
    ``forward_head``, ``forward_intermediates``): entry points a user calls instead of ``__call__``."""
    out = {}
    for name in dir(cls):
        if name.startswith("forward_") and not hasattr(nn.Module, name):
            fn = inspect.getattr_static(cls, name, None)
            if inspect.isfunction(fn) and not getattr(fn, "__slim_marking__", False):
                out[name] = fn
    return out


def _plain_read(obj, name):
    """``obj.<name>`` as the module's own class answers it (a class attribute, else ``nn.Module.__getattr__``)."""
    cls = type(obj)
    try:  # past the hosted class, also from a subclass of it
        return getattr(super(_HOSTED.get(cls._slim_plain_class, cls), obj), name)
    except AttributeError:
        return cls._slim_plain_class.__getattr__(obj, name)


def _add_descriptors(cls: type, names) -> None:
    for name in names:
        base = _int_attr(name)
        if not isinstance(cls.__dict__.get(base), _Hosted):
            setattr(cls, base, _Hosted(base))


def _active_int(value, name, hosted, geos):
    """``value`` (an int, or a tuple of them such as a bias shape) with each hosted entry at its active count."""
    if isinstance(value, tuple):
        out = list(value)
        for i in range(len(out)):
            hit = hosted.get(f"{name}[{i}]")
            g = geos[hit[0]] if hit is not None else None
            if g is not None:
                out[i] = _unscale(g.c, hit[1], name)
        return tuple(out)
    slot, scale = hosted[name]
    g = geos[slot]
    return value if g is None else _unscale(g.c, scale, name)


def _unscale(c: int, scale, name) -> int:
    """The attribute value whose ``* scale[0] // scale[1]`` is the active count ``c``."""
    m, d = scale
    if (c * d) % m:
        from ..errors import NotExactError

        raise NotExactError(f"attribute {name!r}: {c} active channels are not {m}/{d} of a whole value")
    return c * d // m


def _int_attr(attr: str) -> str:
    """``'bias_shape'`` for a hosted tuple entry ``'bias_shape[2]'``."""
    return attr.partition("[")[0]


_HOSTED: dict[type, type] = {}


def _class_name(cls: type) -> str:
    return "Hosted_" + (cls.__module__ + "." + cls.__qualname__).replace("_", "_u").replace(".", "_d")


def hosted_class(cls: type) -> type:
    """The subclass of ``cls`` with :class:`ParamHost` in front (one per class; picklable by name)."""
    sub = _HOSTED.get(cls)
    if sub is None:
        name = _class_name(cls)
        body = {"__module__": __name__, "__qualname__": name, "_slim_plain_class": cls}
        body.update({k: _marking(fn) for k, fn in forward_methods(cls).items()})
        sub = type(cls.__name__, (ParamHost, cls), body)
        _HOSTED[cls] = sub
        setattr(sys.modules[__name__], name, sub)
    return sub


def __getattr__(name):  # unpickling a hosted module in a fresh process recreates its class
    if name.startswith("Hosted_"):
        path = name[len("Hosted_"):].replace("_d", ".").replace("_u", "_")
        import importlib

        mod, _, qual = path.rpartition(".")
        while mod:
            try:
                obj = importlib.import_module(mod)
                break
            except ModuleNotFoundError:
                mod, _, head = mod.rpartition(".")
                qual = f"{head}.{qual}"
        else:
            raise AttributeError(name)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return hosted_class(obj)
    raise AttributeError(name)


def host(module: nn.Module, attr: str, slot: int, dim: int, state, scale=(1, 1)) -> None:
    """Make ``module.<attr>`` read as its active channels (slot ``slot`` of the plan, channels on ``dim``); an
    ``int`` attribute (a head count that sizes a channel dim) reads as the active count."""
    if not isinstance(module, ParamHost):
        module.__class__ = hosted_class(type(module))
    if attr not in module._parameters and attr not in module._buffers:
        base = _int_attr(attr)
        ints = module.__dict__.setdefault("_slim_ints", {})
        if base not in ints:
            ints[base] = module.__dict__.pop(base)  # so that reads reach the descriptor
        dim = tuple(scale)  # an int: the sized channels are attribute * scale[0] // scale[1]
    module.__dict__.setdefault("_slim_hosted", {})[attr] = (slot, dim)
    module.__dict__["_slim_state"] = state
    _add_descriptors(type(module), [attr])


def host_root(model: nn.Module, state) -> None:
    """Let the model's own forward mark the forward as running (tied parameters of its submodules are sliced when
    the model's forward reads them directly)."""
    if not isinstance(model, ParamHost):
        model.__class__ = hosted_class(type(model))
    model.__dict__.setdefault("_slim_hosted", {})
    model.__dict__["_slim_state"] = state


def unhost(module: nn.Module) -> None:
    """Give ``module`` its own class back (rollback of a failed convert, export)."""
    if isinstance(module, ParamHost):
        module.__class__ = type(module)._slim_plain_class
    for attr, v in (module.__dict__.pop("_slim_ints", None) or {}).items():
        module.__dict__.setdefault(attr, v)
    module.__dict__.pop("_slim_hosted", None)
    module.__dict__.pop("_slim_caches", None)
    module.__dict__.pop("_slim_state", None)
    module.__dict__.pop("_slim_param_cache", None)


def _take(t, dim, g: BNGeo | None):
    return t if g is None else g.take(t, dim)


def export_hosted(module: nn.Module, a) -> None:
    """In an exported copy: store each tied parameter's active channels at configuration ``a`` and restore the
    module's own class."""
    hosted = module.__dict__.get("_slim_hosted") or {}
    ints = module.__dict__.get("_slim_ints") or {}
    for k in module.__dict__.get("_slim_caches", ()):  # filled at some width of the dynamic model
        module.__dict__[k].clear()
    if ints and a.geo is not None:
        for base in list(ints):
            module.__dict__[base] = _active_int(ints.pop(base), base, hosted, a.geo)
    with torch.no_grad():
        for attr, (slot, dim) in hosted.items():
            g = a.geo[slot] if a.geo is not None else None
            if _int_attr(attr) in ints:
                continue
            elif attr in module._parameters and module._parameters[attr] is not None:
                p = module._parameters[attr]
                module._parameters[attr] = nn.Parameter(_take(p.detach(), dim, g).clone(), p.requires_grad)
            elif module._buffers.get(attr) is not None:
                module._buffers[attr] = _take(module._buffers[attr], dim, g).clone()
    unhost(module)


__all__ = ["ParamSlot", "ParamHost", "host", "host_root", "unhost", "export_hosted", "hosted_class"]
