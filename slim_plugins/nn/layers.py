"""Width-switchable Conv2d / Linear.

Rule (DESIGN.md, rule 1): a layer reads its active *input* channels from the tensor it receives and computes its
active *output* channels as ``make_divisible(base_out * ratio)``; fixed layers keep all output channels. Weights
are sliced as ``W[:out, :in]`` (the first channels are the slim sub-network, Slimmable Networks Section 3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WidthError
from ..registry import register


class SlimMixin:
    """State shared by all width-switchable layers.

    Attributes:
        slim_name: qualified name of the layer in the converted model.
        fixed_out: the layer keeps all its output channels at every width.
        base_out: output channels at width 1.0.
    """

    slim_name: str
    fixed_out: bool
    #: Output channels are rounded in units of ``channel_unit``: ``unit * make_divisible(base_out / unit * r)``.
    #: An adapter sets it on expansion convs whose 1.0x output is ``unit`` x their input (MobileNetV2's 6x), so
    #: the expansion stays ``unit`` x the rounded input at every width, as timm's channel multiplier and the
    #: official US-MobileNetV2 (``ratio=[1, expand_ratio]``) compute it.
    channel_unit: int = 1

    def _init_slim(self, name, state, fixed_out, base_out):
        self._slim_state = state
        self.slim_name = name
        self.fixed_out = bool(fixed_out)
        self.base_out = int(base_out)
        self._out_cache: dict = {}  # ratio -> out channels, and (Active, in_c) -> geometry of a call
        self._w_cache: dict = {}

    def active_out(self, active, full: int) -> int:
        """Active output channels for configuration ``active`` (capped at the stored ``full``)."""
        if self.fixed_out:
            return full
        r = active.ratio(self.slim_name)
        c = self._out_cache.get(r)
        if c is None:
            u = self.channel_unit
            c = min(full, u * self._slim_state.spec.channels(self.base_out // u, r))
            self._remember(r, c)
        return c

    def _remember(self, key, value):
        # US-Nets train at ever new random widths: keep the per-width caches bounded.
        if len(self._out_cache) >= 512:
            self._out_cache.clear()
        self._out_cache[key] = value

    def _wb(self):
        """``(weight, bias)`` read from ``_parameters`` (``self.weight`` goes through ``nn.Module.__getattr__``,
        which costs more per call than a batch-1 BN kernel); weight-normed layers fall back to the attribute."""
        p = self._parameters
        w = p.get("weight")
        if w is None:
            return self.weight, self.bias
        return w, p.get("bias")

    def _sliced(self, out_c: int, in_c: int, partial: bool = False):
        """``(weight[:out_c, :in_c], bias[:out_c])``; contiguous copies cached per shape when no grad is needed.
        ``partial``: the caller knows the slice is not the whole weight (skips the shape check)."""
        w, b = self._wb()
        if not partial and out_c == w.shape[0] and in_c == w.shape[1]:
            return w, b
        if torch.is_grad_enabled() and w.requires_grad:
            return w[:out_c, :in_c], (b[:out_c] if b is not None else None)
        # Fast dynamic inference (DESIGN rule 7): reuse the contiguous slice until the parameters change.
        version = (w._version, w.data_ptr(), None if b is None else b._version)
        hit = self._w_cache.get((out_c, in_c))
        if hit is not None and hit[0] == version:
            return hit[1], hit[2]
        ws = w[:out_c, :in_c].contiguous()
        bs = b[:out_c].contiguous() if b is not None else None
        if len(self._w_cache) >= 8:
            self._w_cache.clear()
        self._w_cache[(out_c, in_c)] = (version, ws, bs)
        return ws, bs

    def __getstate__(self):
        d = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        d = dict(d)
        d["_w_cache"] = {}
        return d


@register(nn.Conv2d)
class SlimConv2d(SlimMixin, nn.Conv2d):
    """Width-switchable ``nn.Conv2d``: normal, group, depthwise and dilated convolutions.

    Input ``(N, C_in_active, H, W)`` -> output ``(N, C_out_active, H', W')``. Depthwise convolutions
    (``groups == in_channels``) follow their input (``C_out = multiplier * C_in_active``); group convolutions keep
    their group count and slice ``W[:out, :in/groups]``. With ``output_averaging`` the output of a
    non-depthwise conv is scaled by ``C_in_full / C_in_active`` (US-Nets paper, "US-MobileNet v1 +").

    Raises:
        WidthError: active channels of a group conv not divisible by its groups (pick a divisor that is a
            multiple of the group count).
    """

    @classmethod
    def from_module(cls, m: nn.Conv2d, name, state, fixed_out):
        new = cls.__new__(cls)
        new.__dict__.update(m.__dict__)  # shares parameters, buffers and hooks: no copy
        new._init_slim(name, state, fixed_out, m.out_channels)
        new.depthwise = m.groups > 1 and m.groups == m.in_channels
        new.dw_multiplier = m.out_channels // m.groups if new.depthwise else 1
        new.averaging = bool(state.output_averaging) and not new.depthwise
        return new

    def channels_for(self, active, in_c: int):
        """``(out_channels, groups)`` at ``active`` for an input with ``in_c`` channels."""
        if self.depthwise:
            return in_c * self.dw_multiplier, in_c
        return self.active_out(active, self.weight.shape[0]), self.groups

    def _geometry(self, a, in_c: int):
        """``(out_c, groups, full, scale)`` of a call at ``a`` with ``in_c`` input channels, cached per call
        configuration (DESIGN rule 7: per-call Python work stays at a few dict lookups)."""
        out_c, groups = self.channels_for(a, in_c)
        if groups > 1 and not self.depthwise and (in_c % groups or out_c % groups):
            raise WidthError(f"{self.slim_name}: active channels in={in_c}, out={out_c} must be divisible by "
                             f"groups={groups}")
        w = self._wb()[0]
        full = out_c == w.shape[0] and in_c // groups == w.shape[1]
        full_in = w.shape[1] * groups
        scale = full_in / in_c if self.averaging and in_c != full_in else None
        geo = (out_c, groups, full, scale)
        self._remember((a, in_c), geo)
        return geo

    def forward(self, x):
        a = self._slim_state.active()
        in_c = x.shape[1]
        geo = self._out_cache.get((a, in_c))
        if geo is None:
            geo = self._geometry(a, in_c)
        out_c, groups, full, scale = geo
        w, b = self._wb() if full else self._sliced(out_c, in_c // groups, True)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            y = F.conv2d(x, w, b, self.stride, 0, self.dilation, groups)
        else:
            y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)
        if scale is not None:
            y = y * scale
        return y

    def plain_weights(self, rec):
        """Sliced ``(weight, bias)`` of the plain layer for a recorded call (averaging folded in)."""
        in_c, out_c, groups = rec["in"], rec["out"], rec["groups"]
        w = self.weight.detach()[:out_c, : in_c // groups].clone()
        b = self.bias.detach()[:out_c].clone() if self.bias is not None else None
        if self.averaging and in_c != self.weight.shape[1] * groups:
            s = self.weight.shape[1] * groups / in_c
            w, b = w * s, (b * s if b is not None else None)
        return w, b

    def to_plain(self, rec) -> nn.Module:
        w, b = self.plain_weights(rec)
        p = nn.Conv2d(rec["in"], rec["out"], self.kernel_size, self.stride, self.padding, self.dilation,
                      rec["groups"], b is not None, self.padding_mode, device=w.device, dtype=w.dtype)
        _assign(p, w, b)
        return p

    def record(self, x, y):
        return {"in": x.shape[1], "out": y.shape[1], "groups": x.shape[1] if self.depthwise else self.groups}


@register(nn.Linear)
class SlimLinear(SlimMixin, nn.Linear):
    """Width-switchable ``nn.Linear``: input ``(..., F_in_active)`` -> output ``(..., F_out_active)``.

    A flatten of ``(N, C, H, W)`` keeps channel-major order, so ``W[:, :C_active*H*W]`` is the right slice.
    """

    @classmethod
    def from_module(cls, m: nn.Linear, name, state, fixed_out):
        new = cls.__new__(cls)
        new.__dict__.update(m.__dict__)
        new._init_slim(name, state, fixed_out, m.out_features)
        new.averaging = bool(state.output_averaging)
        return new

    def _geometry(self, a, in_c: int):
        w = self._wb()[0]
        out_c = self.active_out(a, w.shape[0])
        full = out_c == w.shape[0] and in_c == w.shape[1]
        scale = w.shape[1] / in_c if self.averaging and in_c != w.shape[1] else None
        geo = (out_c, 1, full, scale)
        self._remember((a, in_c), geo)
        return geo

    def forward(self, x):
        a = self._slim_state.active()
        in_c = x.shape[-1]
        geo = self._out_cache.get((a, in_c))
        if geo is None:
            geo = self._geometry(a, in_c)
        out_c, _, full, scale = geo
        w, b = self._wb() if full else self._sliced(out_c, in_c, True)
        y = F.linear(x, w, b)
        if scale is not None:
            y = y * scale
        return y

    def plain_weights(self, rec):
        in_c, out_c = rec["in"], rec["out"]
        w = self.weight.detach()[:out_c, :in_c].clone()
        b = self.bias.detach()[:out_c].clone() if self.bias is not None else None
        if self.averaging and in_c != self.weight.shape[1]:
            s = self.weight.shape[1] / in_c
            w, b = w * s, (b * s if b is not None else None)
        return w, b

    def to_plain(self, rec) -> nn.Module:
        w, b = self.plain_weights(rec)
        p = nn.Linear(rec["in"], rec["out"], b is not None, device=w.device, dtype=w.dtype)
        _assign(p, w, b)
        return p

    def record(self, x, y):
        return {"in": x.shape[-1], "out": y.shape[-1], "groups": 1}


def _assign(p: nn.Module, w, b):
    with torch.no_grad():
        p.weight.copy_(w)
        if b is not None:
            p.bias.copy_(b)
