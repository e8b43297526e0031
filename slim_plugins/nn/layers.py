"""Width-switchable Conv1d / Conv2d / Conv3d / ConvTranspose2d / Linear.

Rule (DESIGN.md, rule 1): at a width every tensor carries a known selection of its full-width channels and a
layer uses exactly the weights connecting its input selection to its output selection. For traced models the
selections come from the channel plan (:mod:`slim_plugins.graph`): a prefix is sliced (``W[:out, :in]``, the fast
path), any other selection is gathered by index. For untraced layers the legacy prefix rule applies: the input
tensor decides the in-channels, ``make_divisible(base_out * ratio)`` the out-channels.

Grouped convolutions (1 < groups < in_channels) follow one of two conventions (``group_mode``):

- ``"groups"`` (default): constant group count, every group slimmed by the same ratio (the official S-ShuffleNet,
  Slimmable Networks Table 3): group ``g`` uses its own first channels (per-group prefix).
- ``"width"``: constant group width, the group count scales with the width (RegNet / ResNeXt). Depthwise
  convolutions are this convention with group width 1.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..context import CarriesWidth, _call_width
from ..errors import NotExactError, WidthError
from ..registry import register

GROUP_MODES = ("groups", "width")


class Geo:
    """Geometry of one layer call at one width (from the channel plan or the legacy prefix rule).

    Attributes:
        out_c / in_c: active output / input channels. groups: runtime group count. full: the whole weight is used.
        scale: output-averaging factor or ``None``. out_idx / in_idx: numpy index arrays where the selection is not
        a prefix (``in_idx`` is ``(G, in_c // G)`` for a conv with constant group count), else ``None``.
        in_sel / out_sel: full selections (numpy) for export and BN statistics, ``None`` for a prefix.
    """

    __slots__ = ("out_c", "in_c", "groups", "full", "scale", "out_idx", "in_idx", "_dev")

    def __init__(self, out_c, in_c, groups, full, scale=None, out_idx=None, in_idx=None):
        self.out_c, self.in_c, self.groups, self.full, self.scale = out_c, in_c, groups, full, scale
        self.out_idx, self.in_idx = out_idx, in_idx
        self._dev: dict = {}

    def index(self, which: str, device) -> torch.Tensor | None:
        """``out_idx`` / ``in_idx`` as a LongTensor on ``device`` (cached)."""
        arr = self.out_idx if which == "out" else self.in_idx
        if arr is None:
            return None
        key = (which, device)
        t = self._dev.get(key)
        if t is None:
            t = torch.as_tensor(arr, dtype=torch.long, device=device)
            self._dev[key] = t
        return t

    @property
    def is_prefix(self) -> bool:
        return self.out_idx is None and self.in_idx is None

    def out_rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The rows (dim 0) of ``t`` of the active output channels (a view for a prefix, a gather otherwise)."""
        if t is None:
            return None
        oi = self.index("out", t.device)
        return t[:self.out_c] if oi is None else t.index_select(0, oi)

    def in_cols(self, t: torch.Tensor) -> torch.Tensor:
        """The columns (dim 1) of weight ``t`` (its rows already the active outputs) of the active input channels
        of each group: a view for a prefix, a gather elsewhere (with a constant group count each output row reads
        the columns of its own group)."""
        ii = self.index("in", t.device)
        if ii is None:
            per = self.in_c // self.groups
            return t if per == t.shape[1] else t[:, :per]
        if ii.dim() == 1:
            return t.index_select(1, ii)
        g, per = ii.shape
        idx = ii.repeat_interleave(t.shape[0] // g, 0).view(t.shape[0], per, *([1] * (t.dim() - 2)))
        return torch.gather(t, 1, idx.expand(-1, -1, *t.shape[2:]))


def stamps(tensors) -> tuple | None:
    """What a selection cached from ``tensors`` is checked against before it is reused (DESIGN rule 7): per tensor
    ``(alias, write counter, Python dict)`` (``None`` entries stay ``None``), or ``None`` when one of them is an
    inference tensor (made under ``torch.inference_mode``, or a parameter whose ``.data`` became one there): writes
    to those count nowhere, so nothing selected from them may be reused.

    A tensor ``t`` is unchanged while ``alias._version == counter and t.__dict__ is dict``:

    - ``alias`` is ``t.detach()``: the same write counter (in-place writes, ``.data`` writes and ``.data`` swaps of a
      :class:`SlimParameter` count there), read through a plain tensor, which skips the ``__torch_function__`` check
      a ``Parameter`` subclass costs on every attribute read (2.5x: batch-1 latency);
    - ``torch.utils.swap_tensors`` (``module.to()`` under swap-on-conversion, ``load_state_dict`` there, or by hand)
      keeps the object but swaps its tensor, class and ``__dict__``: the dict's identity shows a swap.

    A plain ``nn.Parameter`` among ``tensors`` also gives ``None``: its ``.data`` writes count nowhere. Convert
    tracks the parameters it finds and the slim modules track those assigned to them later (``__setattr__``, also
    ``load_state_dict(assign=True)``); the others (put in by ``torch.func.functional_call``, or into an attention's
    plain qkv / proj children) are not the model's to change, so they are used uncached.
    """
    if any(t is not None and (t.is_inference() or type(t) is nn.Parameter) for t in tensors):
        return None
    return tuple(None if t is None else (t.detach(), t._version, t.__dict__) for t in tensors)


def unbased(x):
    """``x`` (a tensor, or a tuple / list of them) with every view detached from its base: a cached selection must
    not hold its parameter's tensor, which ``torch.utils.swap_tensors`` refuses to swap while another tensor holds
    it (``module.to()`` under ``torch.__future__.set_swap_module_params_on_conversion(True)``). The detached view
    shares the storage and the write counter, so it reads what the view read."""
    if isinstance(x, torch.Tensor):
        return x.detach() if x._is_view() else x
    if type(x) in (tuple, list):
        return type(x)(unbased(t) for t in x)
    return x


class TracksParameters:
    """Mixin of the modules whose parameters convert tracks (:class:`SlimParameter`, whose ``.data`` writes count):
    they stay tracked when assigned later (also ``load_state_dict(assign=True)``), unpickled, or moved / cast."""

    #: also the children's parameters (an attention's plain qkv / proj); a tied-parameter host tracks only its own
    _tracks_subtree = True

    def __setattr__(self, name, value):
        if type(value) is nn.Parameter:  # see stamps(): a plain Parameter is used uncached
            value.__class__ = SlimParameter
        super().__setattr__(name, value)

    def __setstate__(self, state):
        super().__setstate__(state)
        for m in self.modules() if self._tracks_subtree else (self,):  # unpickled: plain Parameters again
            track_data_writes(m)

    def _apply(self, fn, *args, **kwargs):
        """``Module._apply`` (``.to()``, ``.half()``, ``.cuda()``): the selections cached from the old tensors are
        dropped first (a cached view would hold a parameter's tensor, which ``torch.utils.swap_tensors`` refuses to
        swap; this also frees them), and afterwards the parameters are :class:`SlimParameter` again: under
        ``torch.__future__.set_swap_module_params_on_conversion(True)`` torch swaps each one with a plain
        ``Parameter``, class included."""
        drop_caches(self)
        mods = list(self.modules()) if self._tracks_subtree else [self]
        for m in mods:  # torch wraps what fn returns in nn.Parameter(), which refuses a SlimParameter (a no-op .to())
            for p in m._parameters.values():
                if type(p) is SlimParameter:
                    p.__class__ = nn.Parameter
        try:
            return super()._apply(fn, *args, **kwargs)
        finally:
            for m in mods:
                track_data_writes(m)
            drop_caches(self)  # (a hook of fn may have called the module)


class EvalFast(TracksParameters):
    """One-entry eval fast path of a width-switchable layer whose width-dependent values come from its own
    ``weight`` / ``bias`` (conv, linear, the norms): a subclass defines ``_eval_values(a, c)``."""

    def _eval_fast(self, c: int) -> tuple:
        """``self._eval_values(a, c)`` of a no-grad call at the active configuration ``a``, reused from the last call
        while the configuration, the input channels and the parameters (same objects, same :func:`stamps`) are
        unchanged (DESIGN rule 7; one entry, checked inline: batch-1 latency). Values that are the parameters
        themselves (the full width) need no check: they are what the plain layer would use."""
        st = self._slim_state
        w = _call_width.get()
        if w is None:
            w = st.default if self._dp_width is None else self._dp_width
        # SlimState.active for an already resolved width multiplier, inline (one Python call less per layer)
        a = st._resolved.get(w) if type(w) is float else None
        if a is None:
            a = st.active(self._dp_width)
        p = self._parameters
        w0, b0 = p.get("weight"), p.get("bias")
        f = self.__dict__.get("_slim_fast")
        if f is not None and f[0] is a and f[1] == c and f[2] is w0 and f[3] is b0:
            s = f[4]
            if s is None:
                return f[5]
            sw, sb = s  # stamps(): unchanged
            if sw[0]._version == sw[1] and w0.__dict__ is sw[2] and (
                    sb is None or sb[0]._version == sb[1] and b0.__dict__ is sb[2]):
                return f[5]
        # stamped before selecting: a write by another thread meanwhile makes the next call miss
        s = stamps((w0, b0))
        out = self._eval_values(a, c)
        # stamps matter only for selections (views or copies) of the parameters
        if all(t is w0 or t is b0 for t in out if isinstance(t, torch.Tensor)):
            s = None
        elif w0 is None or s is None or "parametrizations" in self._modules:
            return out  # tensors the layer computes (a parametrization), an inference tensor: nothing to reuse
        # (the selections come from _weights / cached(), which already hold no view of a parameter: unbased)
        self.__dict__["_slim_fast"] = (a, c, w0, b0, s, out)
        return out

    def __getstate__(self):  # copies and pickles start without the entry (it holds a resolved configuration)
        d = dict(super().__getstate__())
        d.pop("_slim_fast", None)
        return d


class SlimMixin(EvalFast, CarriesWidth):
    """State shared by all width-switchable conv/linear layers.

    Attributes:
        slim_name: qualified name of the layer in the converted model.
        fixed_out: the layer keeps all its output channels at every width.
        base_out: output channels at width 1.0.
    """

    slim_name: str
    fixed_out: bool
    _slim_slot: int = -1
    #: Output channels are rounded in units of ``channel_unit``: ``unit * make_divisible(base_out / unit * r)``.
    #: An adapter sets it on expansion convs whose 1.0x output is ``unit`` x their input (MobileNetV2's 6x), so
    #: the expansion stays ``unit`` x the rounded input at every width.
    channel_unit: int = 1
    #: The output count is a multiple of ``channel_multiple``: the channel analysis sets it where a grouped conv,
    #: a shuffle or a ``chunk`` needs equal runs (rounding with divisor ``lcm(divisor, multiple)``).
    channel_multiple: int = 1

    def _init_slim(self, name, state, fixed_out, base_out):
        self._slim_state = state
        self.slim_name = name
        self.fixed_out = bool(fixed_out)
        self.base_out = int(base_out)
        self._out_cache: dict = {}  # ratio -> out channels, and (Active, in_c) -> legacy geometry
        self._w_cache: dict = {}
        self._slim_slot = -1

    def active_out(self, active, full: int) -> int:
        """Active output channels for configuration ``active`` (capped at the stored ``full``)."""
        if self.fixed_out:
            return full
        r = active.ratio(self.slim_name)
        c = self._out_cache.get(r)
        if c is None:
            u, m = self.channel_unit, self.channel_multiple
            c = min(full, u * self._slim_state.spec.channels(self.base_out // u, r, m // math.gcd(m, u)))
            self._remember(r, c)
        return c

    def count_step(self) -> int:
        """The rounding step of this layer's output count (for the planner's fallback to the next count)."""
        u, m = self.channel_unit, self.channel_multiple
        return u * math.lcm(self._slim_state.spec.divisor, m // math.gcd(m, u))

    def _remember(self, key, value):
        # US-Nets train at ever new random widths: keep the per-width caches bounded.
        if len(self._out_cache) >= 512:
            self._out_cache.clear()
        self._out_cache[key] = value

    def _wb(self):
        """``(weight, bias)`` read from ``_parameters`` (``self.weight`` goes through ``nn.Module.__getattr__``,
        which costs more per call than a batch-1 BN kernel); weight-normed or parametrized layers
        (``torch.nn.utils.parametrize``, also when registered after convert) compute theirs."""
        p = self._parameters
        w = p.get("weight")
        if w is None or "parametrizations" in self._modules:  # (a bias may be parametrized alone)
            return self.weight, self.bias
        return w, p.get("bias")

    def geometry(self, a, in_c: int) -> Geo:
        """The geometry of a call at configuration ``a`` with an input of ``in_c`` channels."""
        geos = a.geo
        if geos is not None and self._slim_slot >= 0:
            g = geos[self._slim_slot]
            if g is not None:
                if g.in_c == in_c:
                    return g
                if not g.is_prefix:
                    raise NotExactError(
                        f"{self.slim_name}: at width {a.key} the channel plan expects {g.in_c} input channels, "
                        f"got {in_c}: the forward took a path that was not traced at convert time")
        geo = self._out_cache.get((a, in_c))
        if geo is None:
            geo = self._legacy_geometry(a, in_c)
            self._remember((a, in_c), geo)
        return geo

    def _weights(self, geo: Geo):
        """``(weight, bias)`` for ``geo``; contiguous copies cached per geometry when no grad is needed."""
        p = self._parameters
        w, b = p.get("weight"), p.get("bias")
        if not geo.full and not torch.is_grad_enabled():
            # Fast dynamic inference (DESIGN rule 7): reuse the contiguous selection while the parameters are the
            # same objects (torch.func.functional_call puts others in _parameters without __setattr__) and
            # unchanged (stamps).
            hit = self._w_cache.get(geo)
            if hit is not None and hit[0] is w and hit[2] is b:
                sw, sb = hit[1], hit[3]  # stamps(): unchanged
                if sw[0]._version == sw[1] and w.__dict__ is sw[2] and (
                        sb is None or sb[0]._version == sb[1] and b.__dict__ is sb[2]):
                    return hit[4], hit[5]
        computed = w is None or "parametrizations" in self._modules
        if computed:  # tensors the layer computes (weight norm, a parametrization added after convert)
            w, b = self._wb()
        if geo.full:
            return w, b
        if torch.is_grad_enabled() and (w.requires_grad or b is not None and b.requires_grad):
            return self._select(w, b, geo)  # (a frozen weight with a trained bias: BitFit)
        # stamped before selecting (a concurrent write: a miss); a computed weight is new at every call
        st = None if computed else stamps((w, b))
        with torch.no_grad():
            ws, bs = unbased(self._select(w, b, geo))
            ws = ws.contiguous()
            bs = bs.contiguous() if bs is not None else None
        if st is None:  # a computed weight, an inference tensor: nothing to reuse
            return ws, bs
        if len(self._w_cache) >= 8:
            self._w_cache.clear()
        self._w_cache[geo] = (w, st[0], b, st[1], ws, bs)
        return ws, bs

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("weight", "bias") and "_w_cache" in self.__dict__:
            self._w_cache = {}  # a new tensor object: selections of the old one are stale

    def _select(self, w, b, geo: Geo):
        """The weight rows/columns of ``geo`` (views where prefixes, index gathers elsewhere)."""
        return geo.in_cols(geo.out_rows(w)), geo.out_rows(b)

    def _full_shape(self) -> tuple[int, int]:
        """``(out, in / groups)`` of the weight in the layout ``_select`` reads."""
        w = self._wb()[0]
        return w.shape[0], w.shape[1]

    def geometry_from_plan(self, ls, full_in: int) -> Geo:
        """Build a :class:`Geo` from a plan entry (``slim_plugins.graph.LayerSel``)."""
        si, so = ls.sel_in, ls.sel_out
        full_out, per_full = self._full_shape()
        groups = ls.groups
        out_idx = None if so.prefix else so.idx
        in_idx = None
        role = ls.call.role
        if role == "gdecider":
            g = groups
            local = si.idx.reshape(g, -1) - (np.arange(g, dtype=np.int64) * per_full)[:, None]
            if not np.all(local == np.arange(local.shape[1], dtype=np.int64)[None, :]):
                in_idx = local
        elif role in ("decider", "fixed"):
            if not si.prefix:
                in_idx = si.idx
        # dw / gwidth: the columns are each group's own channels in order (the plan checks it)
        full = so.n == full_out and si.n == full_in and out_idx is None and in_idx is None
        scale = None
        if getattr(self, "averaging", False) and si.n != full_in:
            scale = full_in / si.n
        return Geo(so.n, si.n, groups, full, scale, out_idx, in_idx)

    def __getstate__(self):
        d = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        d = dict(d)
        d["_w_cache"] = {}
        d["_out_cache"] = {}
        return d

    # -- export -----------------------------------------------------------------------------------------------
    def plain_weights(self, geo: Geo):
        """Selected ``(weight, bias)`` of the plain layer (output averaging folded in)."""
        with torch.no_grad():
            w, b = self._wb()
            ws, bs = self._select(w.detach(), None if b is None else b.detach(), geo)
            ws = ws.clone()
            bs = bs.clone() if bs is not None else None
            if geo.scale is not None:
                ws, bs = ws * geo.scale, (bs * geo.scale if bs is not None else None)
        return ws, bs


class SlimConvNd(SlimMixin):
    """What the width-switchable convolutions share: roles, the legacy prefix rule, forward and export.

    A subclass names its plain type (``_plain_type``) and its functional (``_fconv``); the weight is read in the
    convolution layout ``(C_out, C_in / groups, *k)`` (transposed convolutions permute theirs into it).
    """

    group_mode: str = "groups"
    _plain_type: type = nn.Conv2d

    @classmethod
    def from_module(cls, m, name, state, fixed_out):
        new = cls.__new__(cls)
        _share(new, m)
        new._init_slim(name, state, fixed_out, m.out_channels)
        new.depthwise = m.groups > 1 and m.groups == m.in_channels
        new.dw_multiplier = m.out_channels // m.groups if new.depthwise else 1
        new.averaging = bool(state.output_averaging) and not new.depthwise
        new.group_mode = getattr(m, "slim_group_mode", "groups")
        return new

    @staticmethod
    def analysis_role(m) -> dict:
        """The channel role of the original layer ``m`` (before replacement) for the channel analysis.

        ``pointwise``: a kernel-1, stride-1, unpadded conv acts on each position of its length on its own, so a
        tensor whose channels lie on that length (CoaT's ``aggregate`` over class tokens) passes through it.
        """
        if m.groups > 1 and m.groups == m.in_channels:
            return {"role": "dw", "mult": m.out_channels // m.groups}
        if m.groups > 1:
            return {"role": "gdecider", "groups": m.groups}
        pointwise = all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride) and \
            not isinstance(m.padding, str) and all(p == 0 for p in m.padding)
        return {"role": "decider", "pointwise": pointwise}

    def channel_role(self) -> dict:
        """How the channel analysis treats this conv (see :mod:`slim_plugins.graph`)."""
        if self.depthwise:
            return {"role": "dw", "mult": self.dw_multiplier}
        if self.groups > 1:
            if self.group_mode == "width":
                return {"role": "gwidth", "gw": (self.in_channels // self.groups, self.out_channels // self.groups)}
            return {"role": "fixed" if self.fixed_out else "gdecider", "groups": self.groups}
        return {"role": "fixed" if self.fixed_out else "decider"}

    def _legacy_geometry(self, a, in_c: int) -> Geo:
        """Prefix rule for calls outside the channel plan (untraced models)."""
        full_out, per_in = self._full_shape()
        if self.depthwise:
            out_c, groups = in_c * self.dw_multiplier, in_c
        elif self.groups > 1 and self.group_mode == "width":
            out_c, groups = in_c // per_in * (self.out_channels // self.groups), in_c // per_in
        else:
            out_c, groups = self.active_out(a, full_out), self.groups
        if groups > 1 and not self.depthwise and (in_c % groups or out_c % groups):
            raise WidthError(f"{self.slim_name}: active channels in={in_c}, out={out_c} must be divisible by "
                             f"groups={groups}")
        full = out_c == full_out and in_c // groups == per_in
        full_in = per_in * self.groups
        scale = full_in / in_c if self.averaging and in_c != full_in else None
        return Geo(out_c, in_c, groups, full, scale)

    def _geo_for(self, x) -> Geo:
        return self._geo_at(self._slim_state.active(self._dp_width), x.shape[1])

    def _geo_at(self, a, in_c: int) -> Geo:
        geos, slot = a.geo, self._slim_slot
        geo = geos[slot] if geos is not None and slot >= 0 else None
        if geo is None or geo.in_c != in_c:
            geo = self.geometry(a, in_c)
        return geo

    def _eval_values(self, a, in_c: int) -> tuple:
        """``(geometry, weight, bias)`` of a no-grad call (:meth:`EvalFast._eval_fast`)."""
        geo = self._geo_at(a, in_c)
        return (geo, *self._weights(geo))

    def forward(self, x):
        if torch.is_grad_enabled():
            geo = self._geo_for(x)
            w, b = self._weights(geo)
        else:
            geo, w, b = self._eval_fast(x.shape[1])
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            y = self._fconv(x, w, b, self.stride, 0, self.dilation, geo.groups)
        else:
            y = self._fconv(x, w, b, self.stride, self.padding, self.dilation, geo.groups)
        if geo.scale is not None:
            y = y * geo.scale
        return y

    def _plain_args(self, geo: Geo, bias: bool) -> tuple:
        return (geo.in_c, geo.out_c, self.kernel_size, self.stride, self.padding, self.dilation, geo.groups, bias,
                self.padding_mode)

    def to_plain(self, geo: Geo, a=None) -> nn.Module:
        w, b = self.plain_weights(geo)
        p = self._plain_type(*self._plain_args(geo, b is not None), device=w.device, dtype=w.dtype)
        _assign(p, w, b)
        return p


@register(nn.Conv2d)
class SlimConv2d(SlimConvNd, nn.Conv2d):
    """Width-switchable ``nn.Conv2d``: normal, group, depthwise and dilated convolutions.

    Input ``(N, C_in_active, H, W)`` -> output ``(N, C_out_active, H', W')``. Depthwise convolutions
    (``groups == in_channels``) follow their input (``C_out = multiplier * C_in_active``); grouped convolutions
    follow ``group_mode`` (module docstring). With ``output_averaging`` the output of a non-depthwise conv is
    scaled by ``C_in_full / C_in_active`` (US-Nets paper, "US-MobileNet v1 +").

    Raises:
        WidthError: active channels of a grouped conv not divisible by its groups (untraced models; traced models
            get whole groups from the channel plan).
    """

    _plain_type = nn.Conv2d
    _fconv = staticmethod(F.conv2d)


@register(nn.Conv1d)
class SlimConv1d(SlimConvNd, nn.Conv1d):
    """Width-switchable ``nn.Conv1d`` (sequence convs, EfficientViM's projections, CoaT's token aggregate).

    Input ``(N, C_in_active, L)`` -> output ``(N, C_out_active, L')``; groups, depthwise convolutions, stride,
    dilation and padding modes as :class:`SlimConv2d`. A kernel-1 conv applied along a tensor whose channels lie
    on its length (mixing tokens, not channels) is kept whole by the channel analysis; a wider kernel along the
    channels (ECA's attention) reads neighbours a narrower input lacks and is refused (``NotExactError``).

    Raises:
        WidthError: active channels of a grouped conv not divisible by its groups (untraced models).
    """

    _plain_type = nn.Conv1d
    _fconv = staticmethod(F.conv1d)


@register(nn.Conv3d)
class SlimConv3d(SlimConvNd, nn.Conv3d):
    """Width-switchable ``nn.Conv3d`` (video and volumetric models: torchvision's R3D / MC3 / R(2+1)D / S3D).

    Input ``(N, C_in_active, D, H, W)`` -> output ``(N, C_out_active, D', H', W')``; groups, depthwise
    convolutions, stride, dilation and padding modes as :class:`SlimConv2d`. Exports as ``nn.Conv3d``.

    Raises:
        WidthError: active channels of a grouped conv not divisible by its groups (untraced models).
    """

    _plain_type = nn.Conv3d
    _fconv = staticmethod(F.conv3d)


@register(nn.ConvTranspose2d)
class SlimConvTranspose2d(SlimConvNd, nn.ConvTranspose2d):
    """Width-switchable ``nn.ConvTranspose2d`` (decoders, LowFormer's upsampling): normal, group and depthwise.

    Input ``(N, C_in_active, H, W)`` -> output ``(N, C_out_active, H', W')``, with stride, padding, output padding,
    dilation and ``forward(x, output_size)`` as the plain layer. The weight is stored transposed,
    ``(C_in, C_out / groups, kh, kw)``; selections are made in the convolution layout ``(C_out, C_in / groups,
    kh, kw)`` (one permutation per group) and turned back, so the channel plan and the group conventions are
    those of :class:`SlimConv2d`.

    Raises:
        WidthError: active channels of a grouped conv not divisible by its groups (untraced models).
    """

    _plain_type = nn.ConvTranspose2d

    @staticmethod
    def _swap_layout(w: torch.Tensor, groups: int) -> torch.Tensor:
        """``(G * a, b, *k)`` -> ``(G * b, a, *k)``: the stored ``(C_in, C_out / G, *k)`` layout to the convolution
        layout ``(C_out, C_in / G, *k)`` and back (``groups``: the group count ``G`` of ``w``)."""
        g = groups
        a, b = w.shape[0] // g, w.shape[1]
        return w.reshape(g, a, b, *w.shape[2:]).transpose(1, 2).reshape(g * b, a, *w.shape[2:])

    def _full_shape(self):
        w = self._wb()[0]
        return w.shape[1] * self.groups, w.shape[0] // self.groups

    def _select(self, w, b, geo: Geo):
        ws, bs = super()._select(self._swap_layout(w, self.groups), b, geo)
        return self._swap_layout(ws, geo.groups), bs

    def forward(self, x, output_size=None):
        geo = self._geo_for(x)
        w, b = self._weights(geo)
        op = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        y = F.conv_transpose2d(x, w, b, self.stride, self.padding, op, geo.groups, self.dilation)
        if geo.scale is not None:
            y = y * geo.scale
        return y

    def _plain_args(self, geo, bias):
        return (geo.in_c, geo.out_c, self.kernel_size, self.stride, self.padding, self.output_padding, geo.groups,
                bias, self.dilation, self.padding_mode)


@register(nn.Linear)
class SlimLinear(SlimMixin, nn.Linear):
    """Width-switchable ``nn.Linear``: input ``(..., F_in_active)`` -> output ``(..., F_out_active)``.

    A flatten of ``(N, C, H, W)`` keeps channel-major order; the channel plan expands the input selection by
    ``H*W`` (legacy rule: ``W[:, :C_active*H*W]``).
    """

    @classmethod
    def from_module(cls, m: nn.Linear, name, state, fixed_out):
        new = cls.__new__(cls)
        _share(new, m)
        new._init_slim(name, state, fixed_out, m.out_features)
        new.averaging = bool(state.output_averaging)
        return new

    def channel_role(self) -> dict:
        return {"role": "fixed" if self.fixed_out else "decider"}

    def _legacy_geometry(self, a, in_c: int) -> Geo:
        w = self._wb()[0]
        out_c = self.active_out(a, w.shape[0])
        full = out_c == w.shape[0] and in_c == w.shape[1]
        scale = w.shape[1] / in_c if self.averaging and in_c != w.shape[1] else None
        return Geo(out_c, in_c, 1, full, scale)

    def _eval_values(self, a, in_c: int) -> tuple:
        """``(weight, bias, scale)`` of a no-grad call (:meth:`EvalFast._eval_fast`)."""
        geo = self.geometry(a, in_c)
        return (*self._weights(geo), geo.scale)

    def forward(self, x):
        if not torch.is_grad_enabled():
            w, b, scale = self._eval_fast(x.shape[-1])
            y = F.linear(x, w, b)
            return y if scale is None else y * scale
        geo = self.geometry(self._slim_state.active(self._dp_width), x.shape[-1])
        w, b = self._weights(geo)
        y = F.linear(x, w, b)
        if geo.scale is not None:
            y = y * geo.scale
        return y

    def to_plain(self, geo: Geo, a=None) -> nn.Module:
        w, b = self.plain_weights(geo)
        p = nn.Linear(geo.in_c, geo.out_c, b is not None, device=w.device, dtype=w.dtype)
        _assign(p, w, b)
        return p


class SlimWeightNormConv2d(SlimConv2d):
    """A ``torch.nn.utils.parametrizations.weight_norm`` conv (BasicSR's WDSR): ``w = g * v / ||v||``.

    At a width ``g`` is selected per output channel, ``v`` by rows and columns, and the norm is recomputed over the
    active inputs, so the narrow layer is itself a weight-normed conv of the selected ``(g, v)``; exports as one.
    The parameters stay where ``weight_norm`` put them (``parametrizations.weight.original0/1``), so
    checkpoints keep their keys.
    """

    @classmethod
    def from_module(cls, m, name, state, fixed_out):
        plist = m.parametrizations["weight"]
        wn = plist[0]
        if len(plist) != 1 or type(wn).__name__ != "_WeightNorm" or getattr(wn, "dim", 0) != 0:
            raise WidthError(f"layer {name!r}: only weight_norm(dim=0) parametrizations can be slimmed, got "
                             f"{[type(p).__name__ for p in plist]}")
        return super().from_module(m, name, state, fixed_out)

    @property
    def weight(self):
        p = self._modules["parametrizations"]["weight"]
        return torch._weight_norm(p.original1, p.original0, 0)

    def _gv(self):
        p = self._modules["parametrizations"]["weight"]
        return p.original0, p.original1

    def _wb(self):
        return self.weight, self._parameters.get("bias")

    def _weights(self, geo: Geo):
        g, v = self._gv()
        b = self._parameters.get("bias")
        if geo.full:
            return torch._weight_norm(v, g, 0), b
        vs, bs = self._select(v, b, geo)
        gs = geo.out_rows(g)
        return torch._weight_norm(vs, gs, 0), bs

    def plain_weights(self, geo: Geo):
        raise NotImplementedError  # exported as a weight-normed conv (to_plain)

    def to_plain(self, geo: Geo, a=None) -> nn.Module:
        with torch.no_grad():
            g, v = self._gv()
            b = self._parameters.get("bias")
            vs, bs = self._select(v.detach(), None if b is None else b.detach(), geo)
            gs = geo.out_rows(g.detach())
            if geo.scale is not None:  # averaging scales the whole output: fold it into g and the bias
                gs, bs = gs * geo.scale, (bs * geo.scale if bs is not None else None)
            p = nn.Conv2d(geo.in_c, geo.out_c, self.kernel_size, self.stride, self.padding, self.dilation,
                          geo.groups, bs is not None, self.padding_mode, device=v.device, dtype=v.dtype)
            if bs is not None:
                p.bias.copy_(bs)
            p = nn.utils.parametrizations.weight_norm(p)
            p.parametrizations.weight.original0.copy_(gs)
            p.parametrizations.weight.original1.copy_(vs)
        return p


def cached(owner: nn.Module, slot: str, key, srcs: tuple, make, size: int = 16):
    """``make()`` computed once per ``key`` and kept in ``owner.__dict__[slot]`` while every tensor of ``srcs`` is
    the same object, unchanged (:func:`stamps`; DESIGN rule 7: selections built once per width for inference
    without autograd)."""
    cache = owner.__dict__.get(slot)
    if cache is None:
        cache = owner.__dict__[slot] = {}
    hit = cache.get(key)
    if hit is not None:
        for t, (s, st) in zip(srcs, hit[0]):  # a loop, not all(<generator>): this runs per layer call at batch 1
            if t is not s or (st is not None and (st[0]._version != st[1] or t.__dict__ is not st[2])):
                break
        else:
            return hit[1]
    sts = stamps(srcs)  # before make(): see EvalFast
    with torch.no_grad():
        out = unbased(make())
    if sts is None:  # an inference tensor: nothing to reuse
        return out
    if len(cache) >= size:
        cache.clear()
    cache[key] = (tuple(zip(srcs, sts)), out)
    return out


# Attributes of slim layers that the plain module of an export does not get.
SLIM_ATTRS = {"_post", "_eval_cache", "_geo_cache", "_plain_cls", "_dp_width", "slim_name", "bn_mode", "frozen",
              "_head_cache", "_head_dims", "_pick_cache", "_slim_fast", "_w_cache", "_out_cache", "fixed_out", "base_out",
              "depthwise", "dw_multiplier", "averaging", "group_mode", "channel_multiple", "channel_unit"}


def plain_copy(layer: nn.Module, tensors: dict, **attrs) -> nn.Module:
    """An instance of the layer's own (framework) class, ``layer._plain_cls``, holding ``tensors`` (selected
    parameters / buffers by name) and ``attrs``; every other attribute and child as in the layer (for export)."""
    cls = layer._plain_cls
    p = cls.__new__(cls)
    d = {k: v for k, v in layer.__dict__.items() if not k.startswith("_slim") and k not in SLIM_ATTRS}
    d["_parameters"], d["_buffers"] = dict(layer._parameters), dict(layer._buffers)
    d["_modules"] = {k: copy.deepcopy(v) for k, v in layer._modules.items()}
    p.__dict__.update(d)
    with torch.no_grad():
        for k, t in tensors.items():
            if t is None:
                continue
            if k in p._parameters:
                old = layer._parameters[k]
                p._parameters[k] = nn.Parameter(t.detach().clone(), old.requires_grad if old is not None else True)
            else:
                p._buffers[k] = t.detach().clone()
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


class SlimParameter(nn.Parameter):
    """A ``Parameter`` whose ``.data`` shares its version counter (``.detach()`` semantics).

    ``p.data.mul_()`` (BasicSR's EMA, SB3's Polyak update) otherwise writes the storage through a tensor with a
    version counter of its own, which the eval weight cache (DESIGN rule 7) cannot see. Converted layers switch
    their parameters to this class in place (same object, same storage, optimizers unaffected).
    """

    @property
    def data(self):
        return self.detach()

    @data.setter
    def data(self, value):
        # count the swap as a write (caches of the old storage are stale): before it too, since writes to the
        # new data count nowhere when it is an inference tensor (the parameter keeps its counter)
        _count_write(self)
        torch._C.TensorBase.data.__set__(self, value)
        _count_write(self)


    def module_load(self, other, assign=False):
        # load_state_dict under swap-on-conversion swaps this object with what this returns: a SlimParameter, so the
        # parameter stays one (torch wraps anything else in a plain Parameter)
        return SlimParameter(super().module_load(other, assign=assign), self.requires_grad)


def _count_write(t: torch.Tensor) -> None:
    if not t.is_inference():
        with torch.no_grad():
            t.detach().mul_(1)


def track_data_writes(module: nn.Module) -> None:
    """Switch the direct parameters of ``module`` to :class:`SlimParameter` (same objects)."""
    for p in module._parameters.values():
        if p is not None and type(p) is nn.Parameter:
            p.__class__ = SlimParameter


# Per-module caches of selections made from the module's tensors (eval fast paths, DESIGN rule 7).
_EVAL_CACHES = ("_slim_fast", "_pick_cache", "_head_cache", "_slim_head_fast", "_slim_param_cache",
                "_slim_sel_cache")


def drop_caches(module: nn.Module) -> None:
    """Drop the selections ``module`` cached from its tensors (its own caches, not its children's)."""
    d = module.__dict__
    for k in _EVAL_CACHES:
        d.pop(k, None)
    for k in ("_w_cache", "_eval_cache"):  # read as attributes: emptied, not removed
        if k in d:
            d[k] = {}


def _share(new: nn.Module, m: nn.Module) -> None:
    """Let ``new`` use ``m``'s parameters, buffers, children and hooks without mutating ``m``'s containers."""
    new.__dict__.update(m.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = type(m.__dict__[key])(m.__dict__[key])


def is_weight_normed(m: nn.Module) -> bool:
    return parametrize.is_parametrized(m, "weight")


def plain_linear(w: torch.Tensor, b: torch.Tensor | None, training: bool) -> nn.Linear:
    """A plain ``nn.Linear`` holding copies of ``w`` ``(out, in)`` and ``b`` ``(out,)`` (or no bias), in train mode
    ``training``: the selected weights of a counterpart's child layer, for export."""
    p = nn.Linear(w.shape[1], w.shape[0], b is not None, device=w.device, dtype=w.dtype)
    _assign(p, w, b)
    return p.train(training)


def _assign(p: nn.Module, w, b):
    with torch.no_grad():
        p.weight.copy_(w)
        if b is not None:
            p.bias.copy_(b)


__all__ = ["Geo", "EvalFast", "plain_linear", "SlimMixin", "SlimConvNd", "SlimConv2d", "SlimConv1d", "SlimConv3d", "SlimConvTranspose2d", "SlimLinear",
           "SlimWeightNormConv2d", "SlimParameter", "GROUP_MODES", "track_data_writes", "TracksParameters", "drop_caches",
           "is_weight_normed", "cached", "plain_copy", "stamps", "unbased"]
