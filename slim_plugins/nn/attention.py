"""Multi-head attention slimmed by heads (DESIGN rule 9).

The width axis of attention is the number of heads with ``head_dim`` fixed (DynaBERT, Hou et al. 2020; Flextron,
Cai et al. 2024): at a width the module reads tokens ``(..., C_active)`` and runs the first
``H' = C_active / head_dim`` heads, so the softmax scale and every kept head are exactly those of the full model.
``qkv`` (a ``Linear`` ``C -> 3 * H * head_dim``) keeps the rows of the kept heads of q, k and v and the columns
of the active channels; ``proj`` (``H * head_dim -> C``) the columns of the kept heads and the rows of the active
channels. The channel plan rounds the token width to whole heads (the class unit is ``head_dim``), which is
``make_divisible`` on heads.

:class:`SlimHeadsAttention` holds that part; a framework's attention class gets a counterpart by subclassing it
with the framework's forward written for ``H'`` heads (timm's ``Attention`` and Swin ``WindowAttention`` in
``slim_plugins.integrations.timm``, torchvision's ``ShiftedWindowAttention`` in
``slim_plugins.integrations.torchvision``) and registering it (:func:`slim_plugins.registry.register`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NotExactError, UnsupportedModuleError
from ..registry import register
from .layers import Geo, SlimMixin, _share, cached, plain_copy, plain_linear
from .norm import BNGeo, SelectsFromChildren, SlimComposite


def whole_heads(name: str, c: int, head_dim: int) -> int:
    """The number of heads of ``head_dim`` channels in ``c`` active channels.

    Raises:
        NotExactError: ``c`` is not whole heads (layer ``name``).
    """
    if c % head_dim:
        raise NotExactError(f"{name}: {c} active channels are not whole heads of {head_dim}")
    return c // head_dim


def packed_head_rows(t, parts: int, full: int, n: int):
    """The rows (dim 0) of the first ``n`` of ``full`` channels in each of the ``parts`` packed blocks of ``t`` (a
    packed projection ``[q | k | v]``: ``parts=3``, ``full = heads x head_dim``, ``n`` the kept heads' channels);
    ``t`` itself when all are kept, ``None`` for ``None``."""
    if t is None or n == full:
        return t
    return t.view(parts, full, *t.shape[1:])[:, :n].reshape(parts * n, *t.shape[1:])


class SlimHeadsAttention(SlimComposite):
    """Base of the attention counterparts: children ``qkv`` and ``proj`` (``nn.Linear``) and ``num_heads`` (other
    names through ``_qkv`` / ``_proj`` / ``_heads``: torchvision's MaxViT has ``to_qkv`` / ``merge`` / ``n_heads``).

    Input and output ``(..., C_active)``; the output has the input's channels (a residual stream). The weights of
    a width are selected once per width in eval mode without autograd (cached while the parameters are unchanged:
    ``stamps``), as the conv / linear layers do (DESIGN rule 7).

    Raises:
        UnsupportedModuleError: at convert time, an attention whose widths are not ``dim = heads x head_dim`` in
            and out. NotExactError: an active width that is not whole heads.
    """

    channel_dim = -1
    _qkv, _proj, _heads = "qkv", "proj", "num_heads"

    @classmethod
    def head_dims(cls, m) -> tuple[int, int, int]:
        """``(dim, heads, head_dim)`` of an attention module."""
        qkv, proj, heads = getattr(m, cls._qkv), getattr(m, cls._proj), getattr(m, cls._heads)
        dim, attn_dim = qkv.in_features, qkv.out_features // 3
        if attn_dim % heads or proj.out_features != dim or proj.in_features != attn_dim or dim % heads \
                or qkv.out_features != 3 * attn_dim:
            raise UnsupportedModuleError(
                f"{type(m).__name__}(dim={dim}, heads={heads}, qkv->{qkv.out_features}, proj {proj.in_features}"
                f"->{proj.out_features}): only attention with dim = heads x (dim / heads) in and out is slimmed "
                "by heads")
        return dim, heads, attn_dim // heads

    @classmethod
    def analysis_role(cls, m) -> dict:
        dim, heads, _ = cls.head_dims(m)
        return {"role": "norm", "dim": -1, "unit": dim // heads}

    def _dims(self):
        d = self.__dict__.get("_head_dims")
        if d is None:
            d = self.__dict__["_head_dims"] = self.head_dims(self)
        return d

    def heads(self, g: BNGeo) -> int:
        """The heads run at the active channels ``g``."""
        dim, heads, _ = self._dims()
        return whole_heads(self.slim_name, g.c, dim // heads)

    def _select(self, g: BNGeo, h: int):
        _, heads, hd = self._dims()
        qkv, proj = self._modules[self._qkv], self._modules[self._proj]
        w, b = qkv.weight, qkv.bias
        w, b = (packed_head_rows(t, 3, heads * hd, h * hd) for t in (w, b))
        return g.pick(w), b, g.take(proj.weight, 0)[:, :h * hd], g.pick(proj.bias)

    def head_params(self, x) -> tuple:
        """``(geometry, heads, qkv weight, qkv bias, proj weight, proj bias)`` of a call on tokens ``x`` (channels
        last). Without autograd the values of the last call are reused while the configuration, the channels and
        the four parameters (same objects, same ``stamps``) are unchanged (DESIGN rule 7, batch-1 latency).

        Raises:
            NotExactError: the active channels are not whole heads.
        """
        srcs = None if torch.is_grad_enabled() else self._head_srcs()
        if srcs is None:
            return self._head_values(x)
        a = self._slim_state.active(self._dp_width)
        return cached(self, "_slim_head_fast", (a, x.shape[-1]), srcs, lambda: self._head_values(x), size=1)

    def _head_values(self, x) -> tuple:
        g = self.active_geometry(x)
        h = self.heads(g)
        return (g, h, *self.head_weights(g, h))

    def _head_srcs(self) -> tuple | None:
        """The parameters the head weights are selected from: qkv weight / bias, proj weight / bias; ``None`` where
        one is computed at every read (``torch.nn.utils.parametrize``): then nothing is cached."""
        q, p = self._modules[self._qkv], self._modules[self._proj]
        if "parametrizations" in q._modules or "parametrizations" in p._modules:
            return None
        qp, pp = q._parameters, p._parameters
        return qp["weight"], qp.get("bias"), pp["weight"], pp.get("bias")

    def head_weights(self, g: BNGeo, h: int):
        """``(qkv weight, qkv bias, proj weight, proj bias)`` of the first ``h`` heads at channels ``g``."""
        srcs = None if torch.is_grad_enabled() else self._head_srcs()
        if srcs is None:
            return self._select(g, h)
        # keyed by the width's geometry object, which every call at that width reuses
        return cached(self, "_head_cache", (g, h), srcs,
                      lambda: tuple(None if t is None else t.contiguous() for t in self._select(g, h)), size=8)

    def plain_qkv_proj(self, g: BNGeo, h: int):
        """Plain ``nn.Linear`` qkv / proj holding the selected weights (for export)."""
        with torch.no_grad():
            wq, bq, wp, bp = self._select(g, h)
        q, p = self._modules[self._qkv], self._modules[self._proj]
        return plain_linear(wq, bq, q.training), plain_linear(wp, bp, p.training)

    def plain_heads(self, g: BNGeo, tensors_at=None, **attrs) -> nn.Module:
        """The layer's own class at the heads of ``g`` (for export): the head count, plain qkv / proj, the
        per-head tensors ``tensors_at(h)`` (``{name: tensor}`` sliced to the first ``h`` heads) and ``attrs``."""
        h = self.heads(g)
        qkv, proj = self.plain_qkv_proj(g, h)
        p = self.plain_copy({} if tensors_at is None else tensors_at(h), **{self._heads: h}, **attrs)
        setattr(p, self._qkv, qkv)
        setattr(p, self._proj, proj)
        return p

    def __getstate__(self):  # copies drop the weight caches
        d = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        d.pop("_head_cache", None)
        d.pop("_slim_head_fast", None)
        d.pop("_head_dims", None)
        return d


class DecidingHeadsAttention(SelectsFromChildren, SlimMixin):
    """Base of the attention counterparts that change the stream's width: MViT's pooling attention (Li et al. 2022,
    Sec. 3.1) widens ``dim -> dim_out`` at a stage's first block, so unlike the residual attentions it *decides* its
    output channels, as a ``Linear`` does, in whole heads (``unit_out = head_dim``: the channel plan rounds its
    output stream to whole heads; DESIGN rule 9, ``head_dim`` fixed). Input ``(N, L, C_in_active)``; ``qkv``
    keeps the rows of the kept heads of q, k and v and the active input columns, the projection the kept heads'
    columns and the active output rows; everything per head dim (pooling, relative position tables) stays whole.

    A subclass names its children and width attribute (``_qkv``, ``_proj``: dotted paths; ``_dim_out``), adds its
    own layout conditions (``_layout_ok``, described by ``_layout_note``), and writes the framework's forward for
    ``heads' = C_out_active / head_dim`` heads from :meth:`selected`; :meth:`plain_at` builds its export.

    Raises:
        UnsupportedModuleError: at convert time, a layout other than ``dim_out = num_heads x head_dim`` with plain
            ``nn.Linear`` qkv / projection (or one the subclass refuses).
        NotExactError: an active output width that is not whole heads.
    """

    channel_dim = -1
    _qkv, _proj, _dim_out = "qkv", "proj", "dim_out"
    _layout_note = ""

    @classmethod
    def _layout_ok(cls, m) -> bool:
        return True

    @classmethod
    def _qkv_proj(cls, m) -> list:
        """``m``'s qkv and projection layers (``_qkv`` / ``_proj``: dotted paths; read from ``_modules`` directly,
        as every eval call checks the children's parameters)."""
        out = []
        for path in (cls._qkv, cls._proj):
            c = m
            for k in path.split("."):
                c = c._modules[k]
            out.append(c)
        return out

    @classmethod
    def analysis_role(cls, m) -> dict:
        (q, pr), nh, hd = cls._qkv_proj(m), m.num_heads, m.head_dim
        d = getattr(m, cls._dim_out)
        if not (type(q) is nn.Linear and type(pr) is nn.Linear and nh * hd == d and cls._layout_ok(m)
                and (q.out_features, pr.in_features, pr.out_features) == (3 * d, d, d)):
            raise UnsupportedModuleError(
                f"{type(m).__name__}({cls._dim_out}={d}, num_heads={nh}): only the layout with {cls._dim_out} = "
                f"num_heads x head_dim and plain Linear {cls._qkv} / {cls._proj}{cls._layout_note} is slimmed by "
                "heads")
        return {"role": "decider", "dim": -1, "unit_out": hd, "outputs": 2}

    def channel_role(self) -> dict:
        return type(self).analysis_role(self)

    @classmethod
    def from_module(cls, m, name, state, fixed_out=False):
        new = cls.__new__(cls)
        _share(new, m)
        new._init_slim(name, state, fixed_out, getattr(m, cls._dim_out))
        new._plain_cls = type(m)
        return new

    def _full_shape(self) -> tuple[int, int]:
        return getattr(self, self._dim_out), self._qkv_proj(self)[0].in_features

    def _legacy_geometry(self, a, in_c: int) -> Geo:
        full_out, full_in = self._full_shape()
        out_c = self.active_out(a, full_out)
        return Geo(out_c, in_c, 1, out_c == full_out and in_c == full_in)

    def active_geometry(self, x) -> Geo:
        return self.geometry(self._slim_state.active(self._dp_width), x.shape[-1])

    def _children(self) -> list:
        return self._qkv_proj(self)

    def _select(self, g: Geo) -> tuple:
        """``(qkv w, qkv b, proj w, proj b)`` of the kept heads at the channels ``g``."""
        n, full = whole_heads(self.slim_name, g.out_c, self.head_dim) * self.head_dim, getattr(self, self._dim_out)
        q, pr = self._children()
        wq, bq = g.in_cols(packed_head_rows(q.weight, 3, full, n)), packed_head_rows(q.bias, 3, full, n)
        return wq, bq, g.out_rows(pr.weight)[:, :n], g.out_rows(pr.bias)

    def plain_at(self, g: Geo, **attrs) -> nn.Module:
        """The layer's own class at the channels ``g`` (for export): ``num_heads = C_out_active / head_dim``,
        ``<_dim_out> = C_out_active``, plain qkv / projection holding the selected weights, and ``attrs``."""
        wq, bq, wp, bp = self.selected_copy(g)
        p = plain_copy(self, {}, num_heads=wp.shape[1] // self.head_dim, **{self._dim_out: g.out_c}, **attrs)
        q, pr = self._children()
        p.set_submodule(self._qkv, plain_linear(wq, bq, q.training))
        p.set_submodule(self._proj, plain_linear(wp, bp, pr.training))
        return p


@register(nn.MultiheadAttention)
class SlimMultiheadAttention(SlimHeadsAttention, nn.MultiheadAttention):
    """torch's ``nn.MultiheadAttention`` slimmed by heads (module docstring): query, key and value ``(L, N,
    E_active)`` (``(N, L, E_active)`` with ``batch_first``) carry one channel set (the analysis ties them); the
    first ``H' = E_active / head_dim`` heads of the packed ``in_proj`` run. Returns ``(output, weights)`` as torch
    does; exports as ``nn.MultiheadAttention(E_active, H')``.

    Raises:
        UnsupportedModuleError: at convert time, separate k / v dims, ``bias_k`` / ``bias_v`` or ``add_zero_attn``.
        NotExactError: a per-head 3-D ``attn_mask`` at a narrow width (its heads would not be the kept ones).
    """

    @classmethod
    def head_dims(cls, m) -> tuple[int, int, int]:
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise UnsupportedModuleError(
                f"MultiheadAttention(kdim={m.kdim}, vdim={m.vdim}, bias_kv={m.bias_k is not None}, add_zero_attn="
                f"{m.add_zero_attn}): only the packed in_proj without extra key / value biases is slimmed by heads")
        return m.embed_dim, m.num_heads, m.head_dim

    @classmethod
    def analysis_role(cls, m) -> dict:
        dim, heads, hd = cls.head_dims(m)
        return {"role": "norm", "dim": -1, "unit": hd, "tie_inputs": True, "outputs": 2}

    def _select(self, g: BNGeo, h: int):
        dim, heads, hd = self._dims()
        w, b = self.in_proj_weight, self.in_proj_bias
        w, b = (packed_head_rows(t, 3, dim, h * hd) for t in (w, b))
        return g.pick(w), b, g.take(self.out_proj.weight, 0)[:, :h * hd], g.pick(self.out_proj.bias)

    def head_weights(self, g: BNGeo, h: int):
        srcs = None if torch.is_grad_enabled() else self._head_srcs()
        if srcs is None:
            return self._select(g, h)
        return cached(self, "_head_cache", (g, h), srcs,
                      lambda: tuple(None if t is None else t.contiguous() for t in self._select(g, h)), size=8)

    def _head_srcs(self) -> tuple | None:
        o = self._modules["out_proj"]
        if "parametrizations" in self._modules or "parametrizations" in o._modules:
            return None
        pp = o._parameters
        return self._parameters["in_proj_weight"], self._parameters.get("in_proj_bias"), pp["weight"], pp.get("bias")

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        g, h, wq, bq, wp, bp = self.head_params(query)
        if attn_mask is not None and attn_mask.dim() == 3 and h != self.num_heads:
            raise NotExactError(f"{self.slim_name}: a per-head attn_mask ({tuple(attn_mask.shape)}) at {h} of "
                                f"{self.num_heads} heads")
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, g.c, h, wq, bq, None, None, False, self.dropout, wp, bp, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def to_plain(self, g: BNGeo, a=None) -> nn.Module:
        h = self.heads(g)
        wq, bq, wp, bp = (None if t is None else t.detach().clone() for t in self._select(g, h))
        p = nn.MultiheadAttention(g.c, h, dropout=self.dropout, bias=bq is not None, batch_first=self.batch_first,
                                  device=wq.device, dtype=wq.dtype)
        with torch.no_grad():
            p.in_proj_weight.copy_(wq)
            p.out_proj.weight.copy_(wp)
            if bq is not None:
                p.in_proj_bias.copy_(bq)
                p.out_proj.bias.copy_(bp)
        return p.train(self.training)


__all__ = ["DecidingHeadsAttention", "SlimHeadsAttention", "SlimMultiheadAttention", "packed_head_rows", "whole_heads"]
