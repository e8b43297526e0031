"""Width-switchable counterparts of timm's norm, conv and attention layers (registered on import).

Attention (DESIGN rule 9; heads as the width axis as in DynaBERT, Hou et al. 2020, and Flextron, Cai et al. 2024):
a multi-head attention keeps ``head_dim`` and runs the first ``H' = C_active / head_dim`` heads, where ``C_active``
is the active width of the token stream it reads (the channel plan rounds that stream to whole heads), so the
softmax scale and every kept head are exactly those of the full model, and the narrow module equals the stock
class built with ``dim=C_active, num_heads=H'`` holding the selected weights. ``qkv`` keeps the rows of the kept
heads of q, k and v; ``proj`` the columns of the kept heads; a relative position bias table keeps their columns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import (Attention, AttentionRope, BlurPool2d, GroupNorm, GroupNorm1, LayerNorm, LayerNorm2d, RmsNorm,
                         RmsNorm2d, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame)
from timm.layers.padding import pad_same
from timm.layers.norm_act import (GroupNorm1Act, GroupNormAct, LayerNormAct, LayerNormAct2d, RmsNormAct,
                                  RmsNormAct2d)
from torch import nn

from slim_plugins.errors import UnsupportedModuleError
from slim_plugins.nn.attention import DecidingHeadsAttention, SlimHeadsAttention, packed_head_rows, whole_heads
from slim_plugins.nn.layers import Geo, SlimConv2d, _assign, cached, plain_copy, plain_linear
from slim_plugins.nn.norm import (BNGeo, SelectsFromChildren, SlimComposite, SlimGroupNorm, SlimLayerNorm, SlimLayerNorm2d, SlimPerChannel,
                                  SlimRMSNorm, SlimRMSNorm2d)
from slim_plugins.registry import register

register(LayerNorm, SlimLayerNorm)
register(LayerNorm2d, SlimLayerNorm2d)
register(GroupNorm, SlimGroupNorm)
register(GroupNorm1, SlimGroupNorm)
register(RmsNorm, SlimRMSNorm)
register(RmsNorm2d, SlimRMSNorm2d)


class _NormAct:
    """timm's norm + drop + act layers: the slim norm, then the layer's own ``drop`` and ``act``."""

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


@register(LayerNormAct)
class SlimLayerNormAct(_NormAct, SlimLayerNorm):
    pass


@register(LayerNormAct2d)
class SlimLayerNormAct2d(_NormAct, SlimLayerNorm2d):
    pass


@register(RmsNormAct)
class SlimRmsNormAct(_NormAct, SlimRMSNorm):
    pass


@register(RmsNormAct2d)
class SlimRmsNormAct2d(_NormAct, SlimRMSNorm2d):
    pass


@register(GroupNormAct)
class SlimGroupNormAct(_NormAct, SlimGroupNorm):
    pass


@register(GroupNorm1Act)
class SlimGroupNorm1Act(_NormAct, SlimGroupNorm):
    pass


class _StdConv:
    """Weight standardisation over the *active* fan-in of each output channel, so the narrow layer equals the
    stock layer of that width (timm's ``StdConv2d`` / ``ScaledStdConv2d``, which standardise over the whole fan-in
    of their own weight)."""

    def _standardise(self, w, geo):
        gain = None
        if hasattr(self, "gain"):
            gain = (geo.out_rows(self.gain) * (self._slim_gamma * w[0].numel() ** -0.5)).view(-1)
        return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=gain, training=True, momentum=0.,
                            eps=self.eps).reshape_as(w)

    def forward(self, x):
        if getattr(self, "same_pad", False):  # the *Same variants: TF "SAME" padding from the input size
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        a = self._slim_state.active(self._dp_width)
        geo = self.geometry(a, x.shape[1])
        w, b = SlimConv2d._weights(self, geo)
        w = self._standardise(w, geo)
        y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, geo.groups)
        return y * geo.scale if geo.scale is not None else y

    def to_plain(self, geo, a=None) -> nn.Module:
        w, b = self.plain_weights(geo)
        tensors, attrs = {"weight": w, "bias": b}, {}
        if hasattr(self, "gain"):  # ScaledStdConv2d's `scale` is gamma * fan_in^-0.5 of its own (narrow) weight
            tensors["gain"] = geo.out_rows(self.gain)
            attrs["scale"] = self._slim_gamma * w[0].numel() ** -0.5
        return plain_copy(self, tensors, in_channels=geo.in_c, out_channels=geo.out_c, groups=geo.groups, **attrs)


@register(ScaledStdConv2dSame)
@register(ScaledStdConv2d)
@register(StdConv2dSame)
@register(StdConv2d)
class SlimStdConv2d(_StdConv, SlimConv2d):
    """timm's ``StdConv2d`` / ``ScaledStdConv2d`` (and their ``Same`` forms); exports as the module's own class."""

    @classmethod
    def from_module(cls, m, name, state, fixed_out):
        new = super().from_module(m, name, state, fixed_out)
        new._plain_cls = type(m)
        if hasattr(m, "gain"):  # timm stores gamma * fan_in^-0.5 as `scale`; the fan-in changes with the width
            new._slim_gamma = m.scale * m.weight[0].numel() ** 0.5
        return new


SlimScaledStdConv2d = SlimStdConv2d


@register(BlurPool2d)
class SlimBlurPool2d(SlimPerChannel, BlurPool2d):
    """timm's anti-aliasing ``BlurPool2d`` (a fixed per-channel binomial filter, depthwise): the filters of the
    active channels. Exports as ``BlurPool2d(channels=C_active)``."""

    def forward(self, x):
        g = self.active_geometry(x)
        x = F.pad(x, self.padding, mode=self.pad_mode)
        if self.channels is None:
            w = self.filt.expand(g.c, 1, self.filt_size, self.filt_size)
        else:
            w = g.take(self.filt, 0)
        return F.conv2d(x, w, stride=self.stride, groups=g.c)

    def to_plain(self, g: BNGeo, a=None) -> nn.Module:
        if self.channels is None:
            return self.plain_copy({})
        return self.plain_copy({"filt": g.take(self.filt, 0)}, channels=g.c)


# ---- attention ----------------------------------------------------------------------------------------------
def _attend(m, q, k, v, n: int, attn_mask, is_causal: bool):
    """timm's attention core on ``(B, H', N, head_dim)`` q / k / v, fused or not as module ``m`` is set up."""
    if m.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                              dropout_p=m.attn_drop.p if m.training else 0., is_causal=is_causal)
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    attn = (q * m.scale) @ k.transpose(-2, -1)
    attn = maybe_add_mask(attn, resolve_self_attn_mask(n, attn, attn_mask, is_causal))
    return m.attn_drop(attn.softmax(dim=-1)) @ v


@register(Attention)
class SlimAttention(SlimHeadsAttention, Attention):
    """timm's ``Attention`` (ViT, DeiT, and the families built on it) slimmed by heads (module docstring):
    input and output ``(N, L, C_active)``; exports as ``Attention(dim=C_active, num_heads=H')``."""

    @classmethod
    def analysis_role(cls, m) -> dict:
        if m.gate is not None or not isinstance(m.norm, nn.Identity):
            raise UnsupportedModuleError(f"timm Attention with gated={m.gate is not None} / scale_norm="
                                         f"{not isinstance(m.norm, nn.Identity)} is not slimmed by heads yet")
        return super().analysis_role(m)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        B, N, _ = x.shape
        _, h, wq, bq, wp, bp = self.head_params(x)
        hd = self.head_dim
        q, k, v = F.linear(x, wq, bq).reshape(B, N, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        y = _attend(self, q, k, v, N, attn_mask, is_causal)
        y = y.transpose(1, 2).reshape(B, N, h * hd)
        return self.proj_drop(F.linear(y, wp, bp))

    def to_plain(self, g: BNGeo, a=None) -> nn.Module:
        return self.plain_heads(g, attn_dim=self.heads(g) * self.head_dim)


def _register_window_attention():
    from timm.models.swin_transformer import WindowAttention

    @register(WindowAttention)
    class SlimWindowAttention(SlimHeadsAttention, WindowAttention):
        """Swin's window attention slimmed by heads: the relative position bias table keeps the kept heads'
        columns. Exports as ``WindowAttention(dim=C_active, num_heads=H')``."""

        def _rel_bias(self, h):
            t = self.relative_position_bias_table[:, :h]
            bias = t[self.relative_position_index.view(-1)].view(self.window_area, self.window_area, -1)
            return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

        def forward(self, x, mask=None):
            B_, N, _ = x.shape
            _, h, wq, bq, wp, bp = self.head_params(x)
            q, k, v = F.linear(x, wq, bq).reshape(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
            if self.fused_attn:
                attn_mask = self._rel_bias(h)
                if mask is not None:
                    nw = mask.shape[0]
                    mask = mask.view(1, nw, 1, N, N).expand(B_ // nw, -1, h, -1, -1)
                    attn_mask = attn_mask + mask.reshape(-1, h, N, N)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                   dropout_p=self.attn_drop.p if self.training else 0.)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1) + self._rel_bias(h)
                if mask is not None:
                    nw = mask.shape[0]
                    attn = attn.view(-1, nw, h, N, N) + mask.unsqueeze(1).unsqueeze(0)
                    attn = attn.view(-1, h, N, N)
                y = self.attn_drop(self.softmax(attn)) @ v
            y = y.transpose(1, 2).reshape(B_, N, -1)
            return self.proj_drop(F.linear(y, wp, bp))

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            return self.plain_heads(g, lambda h: {"relative_position_bias_table":
                                                  self.relative_position_bias_table[:, :h]}, dim=g.c)

    SlimWindowAttention.__qualname__ = 'SlimWindowAttention'  # pickled by the module-level name below
    return SlimWindowAttention


SlimWindowAttention = _register_window_attention()


def _register_sam_attention():
    from timm.models.vision_transformer_sam import Attention as SamAttention
    from timm.models.vision_transformer_sam import apply_rot_embed_cat, get_decomposed_rel_pos_bias

    @register(SamAttention)
    class SlimSamAttention(SlimHeadsAttention, SamAttention):
        """The attention of timm's SAM image encoder (``VisionTransformerSAM``, Kirillov et al. 2023) slimmed by
        heads: input and output channels-last ``(N, H, W, C_active)``. Its decomposed relative position tables
        (``rel_pos_h`` / ``rel_pos_w``: ``(2 S - 1, head_dim)``), the rotary embedding and the q / k norms are per
        head dim, shared by all heads, so they stay whole. Exports as ``Attention(dim=C_active, num_heads=H')``."""

        def forward(self, x):
            B, H, W, _ = x.shape
            N = H * W
            _, h, wq, bq, wp, bp = self.head_params(x)
            qkv = F.linear(x.reshape(B, N, -1), wq, bq).view(B, N, 3, h, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.reshape(3, B * h, N, -1).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            attn_bias = None
            if self.use_rel_pos:
                attn_bias = get_decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
            elif self.rope is not None:
                rope = self.rope.get_embed()
                q = apply_rot_embed_cat(q, rope).type_as(v)
                k = apply_rot_embed_cat(k, rope).type_as(v)
            if self.fused_attn:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                                   dropout_p=self.attn_drop.p if self.training else 0.)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1)
                if attn_bias is not None:
                    attn = attn + attn_bias
                y = self.attn_drop(attn.softmax(dim=-1)) @ v
            y = y.view(B, h, N, -1).transpose(1, 2).reshape(B, N, -1)
            return self.proj_drop(F.linear(y, wp, bp)).view(B, H, W, -1)

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            return self.plain_heads(g)

    SlimSamAttention.__qualname__ = 'SlimSamAttention'  # pickled by the module-level name below
    return SlimSamAttention


SlimSamAttention = _register_sam_attention()


class _RopeHeadsAttention(SlimHeadsAttention):
    """timm's ``EvaAttention`` (``timm.models.eva``: EVA-02, DINOv3, Perception Encoder, the rotary ViTs) and
    ``AttentionRope`` (``timm.layers``) slimmed by heads: input and output ``(N, L, C_active)``. EVA's ``qkv`` bias
    is ``cat(q_bias, k_bias, v_bias)`` (``k_bias`` a zero buffer) and keeps the kept heads' entries; the rotary
    embedding (passed in, per head dim) and ``q_norm`` / ``k_norm`` (per head dim) stay whole; the optional
    ``scale_norm`` (a ``LayerNorm`` over the heads' output) runs over the kept heads' channels. Exports as the
    module's class with ``num_heads=H'`` (``AttentionRope``: ``attn_dim = kv_dim = H' x head_dim``).

    Raises:
        UnsupportedModuleError: at convert time, separate q / k / v projections (also grouped-query attention), a
            gate, or a scale norm that is not ``nn.LayerNorm``; ``convert`` then traces into the module as before.
    """

    @classmethod
    def analysis_role(cls, m) -> dict:
        if m.qkv is None or m.gate is not None or not isinstance(m.norm, (nn.Identity, nn.LayerNorm)):
            raise UnsupportedModuleError(
                f"{type(m).__name__} with separate q/k/v projections ({m.qkv is None}), gate ({m.gate is not None}) "
                f"or scale norm {type(m.norm).__name__} is not slimmed by heads yet")
        return super().analysis_role(m)

    def _biases(self):
        """EVA's ``(q_bias, k_bias, v_bias)``; ``(None, None, None)`` where ``qkv`` holds its own bias."""
        return self._parameters.get("q_bias"), self._buffers.get("k_bias"), self._parameters.get("v_bias")

    def _head_srcs(self):
        srcs = super()._head_srcs()
        n = self._modules["norm"]
        if srcs is None or "parametrizations" in self._modules or "parametrizations" in n._modules:
            return None
        return (*srcs, *self._biases(), n._parameters.get("weight"), n._parameters.get("bias"))

    def _select(self, g: BNGeo, h: int):
        """``(qkv weight, qkv bias, proj weight, proj bias)`` of the first ``h`` heads."""
        wq, bq, wp, bp = super()._select(g, h)
        qb, kb, vb = self._biases()
        if qb is not None:
            k = h * self.head_dim
            bq = torch.cat((qb[:k], kb[:k], vb[:k]))
        return wq, bq, wp, bp

    def _norm_select(self, h: int):
        """``(weight, bias)`` of the scale norm at the first ``h`` heads (``None`` without one)."""
        n, k = self._modules["norm"], h * self.head_dim
        if not isinstance(n, nn.LayerNorm):
            return None, None
        return (None if n.weight is None else n.weight[:k]), (None if n.bias is None else n.bias[:k])

    def head_weights(self, g: BNGeo, h: int):
        srcs = None if torch.is_grad_enabled() else self._head_srcs()
        if srcs is None:
            return (*self._select(g, h), *self._norm_select(h))
        return cached(self, "_head_cache", (g, h), srcs, lambda: tuple(
            None if t is None else t.contiguous() for t in (*self._select(g, h), *self._norm_select(h))), size=8)

    def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False):
        B, N, _ = x.shape
        _, h, wq, bq, wp, bp, wn, bn = self.head_params(x)
        if bq is not None and self.__dict__.get("qkv_bias_separate") and "q_bias" in self._parameters:
            qkv = F.linear(x, wq)
            qkv += bq
        else:
            qkv = F.linear(x, wq, bq)
        q, k, v = qkv.reshape(B, N, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            from timm.layers import apply_rot_embed_cat

            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        y = _attend(self, q, k, v, N, attn_mask, is_causal)
        y = y.transpose(1, 2).reshape(B, N, h * self.head_dim)
        n = self._modules["norm"]
        if isinstance(n, nn.LayerNorm):
            y = F.layer_norm(y, (y.shape[-1],), wn, bn, n.eps)
        return self.proj_drop(F.linear(y, wp, bp))

    def to_plain(self, g: BNGeo, a=None) -> nn.Module:
        h = self.heads(g)
        wq, bq, _, _ = self._select(g, h)
        wn, bn = self._norm_select(h)
        k = h * self.head_dim
        tensors, attrs = {}, {}
        eva_bias = self._parameters.get("q_bias") is not None
        if eva_bias:
            tensors = {"q_bias": bq[:k], "k_bias": bq[k:2 * k], "v_bias": bq[2 * k:]}
        if "attn_dim" in self.__dict__:  # AttentionRope
            attrs = {"attn_dim": k, "kv_dim": k, "num_kv_heads": h}
        p = self.plain_heads(g, lambda _h: tensors, **attrs)
        if eva_bias:  # the stock qkv has no bias of its own (q_bias / k_bias / v_bias hold it)
            lin = nn.Linear(p.qkv.in_features, p.qkv.out_features, bias=False, device=wq.device, dtype=wq.dtype)
            lin.weight = p.qkv.weight
            p.qkv = lin.train(self.qkv.training)
        n = self._modules["norm"]
        if isinstance(n, nn.LayerNorm):
            p.norm = nn.LayerNorm(k, eps=n.eps, elementwise_affine=n.elementwise_affine, bias=bn is not None,
                                  device=wq.device, dtype=wq.dtype).train(n.training)
            with torch.no_grad():
                if wn is not None:
                    p.norm.weight.copy_(wn)
                if bn is not None:
                    p.norm.bias.copy_(bn)
        return p


@register(AttentionRope)
class SlimAttentionRope(_RopeHeadsAttention, AttentionRope):
    """timm's ``AttentionRope`` slimmed by heads (:class:`_RopeHeadsAttention`)."""


def _register_eva_attention():
    from timm.models.eva import EvaAttention

    @register(EvaAttention)
    class SlimEvaAttention(_RopeHeadsAttention, EvaAttention):
        """timm's ``EvaAttention`` slimmed by heads (:class:`_RopeHeadsAttention`)."""

    SlimEvaAttention.__qualname__ = 'SlimEvaAttention'  # pickled by the module-level name below
    return SlimEvaAttention


SlimEvaAttention = _register_eva_attention()


# ---- counterparts that select from their child convs (focal modulation, linear self-attention) ---------------
def _linear_at(lin: nn.Linear, w, b) -> nn.Linear:
    """A plain ``nn.Linear`` in ``lin``'s mode holding ``w`` / ``b`` (for export)."""
    return plain_linear(w, b, lin.training)


def _conv_at(conv: nn.Conv2d, w, b, groups: int = 1) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``conv``'s geometry holding ``w`` / ``b`` (for export)."""
    p = nn.Conv2d(w.shape[1] * groups, w.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  groups, b is not None, conv.padding_mode, device=w.device, dtype=w.dtype)
    _assign(p, w, b)
    return p.train(conv.training)


def _register_focal_modulation():
    from timm.models.focalnet import FocalModulation

    @register(FocalModulation)
    class SlimFocalModulation(SelectsFromChildren, SlimComposite, FocalModulation):
        """FocalNet's focal modulation (Yang et al. 2022) at the active channels of ``(N, C_active, H, W)``.

        Its ``f`` conv packs ``[q (dim), ctx (dim), gates (focal_level + 1)]`` and the forward splits it by those
        literal sizes, which the channel analysis cannot follow; this counterpart selects them: ``q`` and ``ctx``
        keep the active channels, the ``focal_level + 1`` gates stay whole (one per level, width-free); the
        depthwise focal convs, ``h``, ``proj`` and the post-norm keep the active channels. So at a width it equals
        ``FocalModulation(dim=C_active, ...)`` holding the selected weights, which is what it exports as.

        Raises:
            UnsupportedModuleError: at convert time, a module whose convs are not plain ``nn.Conv2d`` of the stock
                layout or whose post-norm is not ``LayerNorm2d``; ``convert`` then traces into it (and refuses the
                literal split as before).
        """

        channel_dim = 1

        @classmethod
        def analysis_role(cls, m) -> dict:
            d, lv = m.dim, m.focal_level
            convs = [m.f, m.h, m.proj] + [fl[0] for fl in m.focal_layers if len(fl)]
            ok = all(type(c) is nn.Conv2d and c.padding_mode == "zeros" for c in convs) \
                and len(m.focal_layers) == lv \
                and all(len(fl) == 2 and not list(fl[1].parameters()) for fl in m.focal_layers) \
                and (m.f.in_channels, m.f.out_channels, m.f.groups) == (d, 2 * d + lv + 1, 1) \
                and all((c.in_channels, c.out_channels, c.groups) == (d, d, 1) for c in (m.h, m.proj)) \
                and all((fl[0].in_channels, fl[0].out_channels, fl[0].groups) == (d, d, d) for fl in m.focal_layers) \
                and (isinstance(m.norm, nn.Identity) or type(m.norm) is LayerNorm2d) \
                and list(m.input_split) == [d, d, lv + 1]
            if not ok:
                raise UnsupportedModuleError(f"{type(m).__name__}(dim={d}, focal_level={lv}): only the stock layout "
                                             "(plain Conv2d f / h / proj / depthwise focal convs, LayerNorm2d "
                                             "post-norm) is slimmed")
            return {"role": "norm", "dim": 1}

        def _children(self) -> list:
            return [self.f, self.h, self.proj, self.norm] + [fl[0] for fl in self.focal_layers]

        def _select(self, g: BNGeo) -> tuple:
            """``(f w, f b, h w, h b, proj w, proj b, norm w, norm b, [focal w])`` at the channels ``g``."""
            d, lv = self.dim, self.focal_level
            f = self.f
            dev = f.weight.device
            sel = torch.arange(g.c, device=dev) if g.idx is None else g.index(dev)
            rows = torch.cat([sel, sel + d, torch.arange(2 * d, 2 * d + lv + 1, device=dev)])
            wf = g.take(f.weight.index_select(0, rows), 1)
            bf = None if f.bias is None else f.bias.index_select(0, rows)
            out = [wf, bf]
            for c in (self.h, self.proj):
                out += [g.take(g.take(c.weight, 0), 1), g.take(c.bias, 0)]
            n = self.norm
            out += [g.take(getattr(n, "weight", None), 0), g.take(getattr(n, "bias", None), 0)]
            out.append([g.take(fl[0].weight, 0) for fl in self.focal_layers])
            return tuple(out)

        def forward(self, x):
            g, (wf, bf, wh, bh, wp, bp, wn, bn, wk) = self.selected(x)
            c, lv, f = g.c, self.focal_level, self.f
            x = F.conv2d(x, wf, bf, f.stride, f.padding, f.dilation)
            q, ctx, gates = torch.split(x, [c, c, lv + 1], 1)
            ctx_all = 0
            for k, fl in enumerate(self.focal_layers):
                conv = fl[0]
                ctx = fl[1](F.conv2d(ctx, wk[k], None if conv.bias is None else g.take(conv.bias, 0), conv.stride,
                                     conv.padding, conv.dilation, c))
                ctx_all = ctx_all + ctx * gates[:, k:k + 1]
            ctx_global = self.act(ctx.mean((2, 3), keepdim=True))
            ctx_all = ctx_all + ctx_global * gates[:, lv:]
            if self.normalize_modulator:
                ctx_all = ctx_all / (lv + 1)
            h = self.h
            x_out = q * F.conv2d(ctx_all, wh, bh, h.stride, h.padding, h.dilation)
            if not isinstance(self.norm, nn.Identity):
                x_out = F.layer_norm(x_out.permute(0, 2, 3, 1), (c,), wn, bn, self.norm.eps).permute(0, 3, 1, 2)
            p = self.proj
            return self.proj_drop(F.conv2d(x_out, wp, bp, p.stride, p.padding, p.dilation))

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            c, lv = g.c, self.focal_level
            wf, bf, wh, bh, wp, bp, wn, bn, wk = self.selected_copy(g)
            p = self.plain_copy({}, dim=c, input_split=[c, c, lv + 1])
            p.f, p.h, p.proj = _conv_at(self.f, wf, bf), _conv_at(self.h, wh, bh), _conv_at(self.proj, wp, bp)
            for k, fl in enumerate(p.focal_layers):
                b = self.focal_layers[k][0].bias
                fl[0] = _conv_at(self.focal_layers[k][0], wk[k], None if b is None else g.take(b, 0).detach().clone(),
                                 groups=c)
            if not isinstance(self.norm, nn.Identity):
                n = self.norm
                p.norm = LayerNorm2d(c, eps=n.eps, affine=wn is not None, bias=bn is not None,
                                     device=wf.device, dtype=wf.dtype).train(n.training)
                with torch.no_grad():
                    for name, t in (("weight", wn), ("bias", bn)):
                        if t is not None:
                            getattr(p.norm, name).copy_(t)
            return p

    SlimFocalModulation.__qualname__ = 'SlimFocalModulation'  # pickled by the module-level name below
    return SlimFocalModulation


SlimFocalModulation = _register_focal_modulation()


def _register_linear_self_attention():
    from timm.models.mobilevit import LinearSelfAttention

    from slim_plugins.errors import InvalidArgumentError

    @register(LinearSelfAttention)
    class SlimLinearSelfAttention(SelectsFromChildren, SlimComposite, LinearSelfAttention):
        """MobileViT v2's separable linear self-attention (Mehta & Rastegari 2022, §3) on ``(N, C_active, P, M)``.

        Its ``qkv_proj`` packs ``[query (1), key (dim), value (dim)]`` and the forward splits it by those literal
        sizes, which the channel analysis cannot follow; this counterpart selects them: the one query row (the
        context scores, width-free) stays whole, ``key`` and ``value`` keep the active channels, ``out_proj`` keeps
        the active channels in and out. So at a width it equals ``LinearSelfAttention(embed_dim=C_active)`` holding
        the selected weights, which is what it exports as.

        Raises:
            UnsupportedModuleError: at convert time, a module whose projections are not the stock plain 1×1
                ``nn.Conv2d``; ``convert`` then traces into it (and refuses the literal split as before).
            InvalidArgumentError: a call with ``x_prev`` (cross-attention; timm's own path fails on it too).
        """

        channel_dim = 1

        @classmethod
        def analysis_role(cls, m) -> dict:
            d, q, o = m.embed_dim, m.qkv_proj, m.out_proj
            ok = all(type(c) is nn.Conv2d and c.padding_mode == "zeros" and c.groups == 1 for c in (q, o)) \
                and (q.in_channels, q.out_channels, o.in_channels, o.out_channels) == (d, 2 * d + 1, d, d)
            if not ok:
                raise UnsupportedModuleError(f"{type(m).__name__}(embed_dim={d}): only the stock layout (plain "
                                             "Conv2d qkv_proj of 2 * embed_dim + 1 outputs, out_proj) is slimmed")
            return {"role": "norm", "dim": 1}

        def _children(self) -> list:
            return [self.qkv_proj, self.out_proj]

        def _select(self, g: BNGeo) -> tuple:
            """``(qkv w, qkv b, out w, out b)`` at the channels ``g``."""
            d, q, o = self.embed_dim, self.qkv_proj, self.out_proj
            dev = q.weight.device
            sel = torch.arange(g.c, device=dev) if g.idx is None else g.index(dev)
            rows = torch.cat([torch.zeros(1, dtype=sel.dtype, device=dev), sel + 1, sel + 1 + d])
            return (g.take(q.weight.index_select(0, rows), 1), None if q.bias is None else q.bias.index_select(0, rows),
                    g.take(g.take(o.weight, 0), 1), g.take(o.bias, 0))

        def forward(self, x, x_prev=None):
            if x_prev is not None:
                raise InvalidArgumentError("x_prev: the slimmable LinearSelfAttention runs self-attention only "
                                           "(x_prev=None); timm's cross-attention path indexes one qkv row as a "
                                           "conv weight and fails as well")
            g, (wq, bq, wo, bo) = self.selected(x)
            q, o = self.qkv_proj, self.out_proj
            query, key, value = F.conv2d(x, wq, bq, q.stride, q.padding, q.dilation).split([1, g.c, g.c], dim=1)
            scores = self.attn_drop(F.softmax(query, dim=-1))
            context = (key * scores).sum(dim=-1, keepdim=True)
            out = F.relu(value) * context.expand_as(value)
            return self.out_drop(F.conv2d(out, wo, bo, o.stride, o.padding, o.dilation))

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            wq, bq, wo, bo = self.selected_copy(g)
            p = self.plain_copy({}, embed_dim=g.c)
            p.qkv_proj, p.out_proj = _conv_at(self.qkv_proj, wq, bq), _conv_at(self.out_proj, wo, bo)
            return p

    SlimLinearSelfAttention.__qualname__ = 'SlimLinearSelfAttention'  # pickled by the module-level name below
    return SlimLinearSelfAttention


SlimLinearSelfAttention = _register_linear_self_attention()


def _register_volo_attention():
    import math

    from timm.models.volo import ClassAttention as VoloClassAttention
    from timm.models.volo import OutlookAttention

    @register(OutlookAttention)
    class SlimOutlookAttention(SelectsFromChildren, SlimComposite, OutlookAttention):
        """VOLO's outlook attention (Yuan et al. 2022, §2.1) slimmed by heads, ``head_dim`` fixed (module
        docstring): input and output channels-last ``(N, H, W, C_active)``, ``H' = C_active / head_dim`` heads.

        ``v`` and ``proj`` keep the active channels in and out; ``attn`` (``C -> heads x k^4``, the per-head
        ``k^2 x k^2`` aggregation weights of each window) keeps the rows of the kept heads and the active columns.
        The ``unfold`` / ``fold`` that the channel analysis cannot follow run on the active channels, head-major as
        in the stock forward. So at a width it equals ``OutlookAttention(dim=C_active, num_heads=H')`` holding the
        selected weights, which is what it exports as.

        Raises:
            UnsupportedModuleError: at convert time, a module whose ``v`` / ``attn`` / ``proj`` are not plain
                ``nn.Linear`` of the stock sizes; ``convert`` then traces into it (and refuses ``unfold``).
            NotExactError: an active width that is not whole heads.
        """

        channel_dim = -1

        @classmethod
        def analysis_role(cls, m) -> dict:
            v, at, pr, nh, k = m.v, m.attn, m.proj, m.num_heads, m.kernel_size
            d = v.in_features
            ok = all(type(lin) is nn.Linear for lin in (v, at, pr)) and d % nh == 0 \
                and (v.out_features, at.in_features, at.out_features, pr.in_features, pr.out_features) \
                == (d, d, k ** 4 * nh, d, d) and math.isclose(m.scale, (d // nh) ** -0.5)
            if not ok:
                raise UnsupportedModuleError(f"{type(m).__name__}(dim={d}, num_heads={nh}): only the stock layout "
                                             "(plain Linear v / attn / proj, scale head_dim ** -0.5) is slimmed")
            return {"role": "norm", "dim": -1, "unit": d // nh}

        def _children(self) -> list:
            return [self.v, self.attn, self.proj]

        def _heads(self, g: BNGeo) -> int:
            return whole_heads(self.slim_name, g.c, self.v.in_features // self.num_heads)

        def _select(self, g: BNGeo) -> tuple:
            """``(v w, v b, attn w, attn b, proj w, proj b)`` at the channels ``g`` and their heads."""
            rows = self._heads(g) * self.kernel_size ** 4
            at = self.attn
            out = []
            for lin in (self.v, self.proj):
                out += [g.take(g.take(lin.weight, 0), 1), g.take(lin.bias, 0)]
            return (*out[:2], g.take(at.weight[:rows], 1), None if at.bias is None else at.bias[:rows], *out[2:])

        def forward(self, x):
            B, H, W, C = x.shape
            g, (wv, bv, wa, ba, wp, bp) = self.selected(x)
            nh, k, kk = self._heads(g), self.kernel_size, self.kernel_size ** 2
            v = F.linear(x, wv, bv).permute(0, 3, 1, 2)
            h, w = math.ceil(H / self.stride), math.ceil(W / self.stride)
            v = self.unfold(v).reshape(B, nh, C // nh, kk, h * w).permute(0, 1, 4, 3, 2)
            attn = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            attn = F.linear(attn, wa, ba).reshape(B, h * w, nh, kk, kk).permute(0, 2, 1, 3, 4)
            attn = self.attn_drop((attn * self.scale).softmax(dim=-1))
            x = (attn @ v).permute(0, 1, 4, 3, 2).reshape(B, C * kk, h * w)
            x = F.fold(x, output_size=(H, W), kernel_size=k, padding=self.padding, stride=self.stride)
            return self.proj_drop(F.linear(x.permute(0, 2, 3, 1), wp, bp))

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            t = self.selected_copy(g)
            p = self.plain_copy({}, num_heads=self._heads(g))
            p.v, p.attn, p.proj = (_linear_at(m, *t[i:i + 2]) for m, i in ((self.v, 0), (self.attn, 2),
                                                                             (self.proj, 4)))
            return p

    SlimOutlookAttention.__qualname__ = 'SlimOutlookAttention'  # pickled by the module-level names below

    @register(VoloClassAttention)
    class SlimVoloClassAttention(SelectsFromChildren, SlimComposite, VoloClassAttention):
        """VOLO's class attention (the class token attends to every token; Touvron et al. 2021, CaiT §3) slimmed
        by heads, ``head_dim`` fixed: input ``(N, L, C_active)``, output ``(N, 1, C_active)``, ``H' = C_active /
        head_dim`` heads. ``q`` keeps the rows of the kept heads, ``kv`` those of the kept heads of k and of v,
        both the active columns; ``proj`` the columns of the kept heads and the active rows. Exports as
        ``ClassAttention(dim=C_active, num_heads=H')``.

        Raises:
            UnsupportedModuleError: at convert time, a module whose ``dim`` is not ``num_heads x head_dim`` or
                whose ``q`` / ``kv`` / ``proj`` are not plain ``nn.Linear``.
            NotExactError: an active width that is not whole heads.
        """

        channel_dim = -1

        @classmethod
        def analysis_role(cls, m) -> dict:
            q, kv, pr, nh, hd = m.q, m.kv, m.proj, m.num_heads, m.head_dim
            d, a = q.in_features, nh * hd
            ok = all(type(lin) is nn.Linear for lin in (q, kv, pr)) and a == d and math.isclose(m.scale, hd ** -0.5) \
                and (q.out_features, kv.in_features, kv.out_features, pr.in_features, pr.out_features) \
                == (a, d, 2 * a, a, d)
            if not ok:
                raise UnsupportedModuleError(f"{type(m).__name__}(dim={d}, num_heads={nh}, head_dim={hd}): only the "
                                             "stock layout with dim = num_heads x head_dim is slimmed by heads")
            return {"role": "norm", "dim": -1, "unit": hd}

        def _children(self) -> list:
            return [self.q, self.kv, self.proj]

        def _heads(self, g: BNGeo) -> int:
            return whole_heads(self.slim_name, g.c, self.head_dim)

        def _select(self, g: BNGeo) -> tuple:
            """``(q w, q b, kv w, kv b, proj w, proj b)`` of the kept heads at the channels ``g``."""
            n, a = self._heads(g) * self.head_dim, self.num_heads * self.head_dim
            q, kv, pr = self.q, self.kv, self.proj

            def kv_rows(t):
                return packed_head_rows(t, 2, a, n)

            return (g.take(q.weight[:n], 1), None if q.bias is None else q.bias[:n],
                    g.take(kv_rows(kv.weight), 1), kv_rows(kv.bias),
                    g.take(pr.weight, 0)[:, :n], g.take(pr.bias, 0))

        def forward(self, x):
            B, N, C = x.shape
            g, (wq, bq, wkv, bkv, wp, bp) = self.selected(x)
            nh, hd = self._heads(g), self.head_dim
            k, v = F.linear(x, wkv, bkv).reshape(B, N, 2, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)
            q = F.linear(x[:, :1, :], wq, bq).reshape(B, nh, 1, hd) * self.scale
            attn = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
            y = (attn @ v).transpose(1, 2).reshape(B, 1, hd * nh)
            return self.proj_drop(F.linear(y, wp, bp))

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            t = self.selected_copy(g)
            p = self.plain_copy({}, num_heads=self._heads(g))
            p.q, p.kv, p.proj = (_linear_at(m, *t[i:i + 2]) for m, i in ((self.q, 0), (self.kv, 2), (self.proj, 4)))
            return p

    SlimVoloClassAttention.__qualname__ = 'SlimVoloClassAttention'
    return SlimOutlookAttention, SlimVoloClassAttention


SlimOutlookAttention, SlimVoloClassAttention = _register_volo_attention()


class _ConvHeadsAttention(SelectsFromChildren, SlimComposite):
    """Base of the conv-projection attentions of timm's ``byoanet`` family (``HaloAttn``, ``BottleneckAttn``)
    slimmed by heads on ``(N, C_active, H, W)``, for the stock layout with ``dim_out == dim`` (their blocks):
    ``H' = C_active / dim_head_v`` heads, each with its ``dim_head_qk`` / ``dim_head_v`` kept (so the scale and the
    relative position embedding, per head dim, are those of the full model); the output is the first ``H'`` heads,
    so the active channels in and out are the same prefix. Exports as the stock class with ``num_heads=H'``.

    Raises:
        UnsupportedModuleError: at convert time, another layout (``dim_out != dim``, projections not plain 1×1
            ``nn.Conv2d``); ``convert`` then traces into it (and refuses the head merge as before).
        NotExactError: an active width that is not whole heads, or active channels that are not a prefix.
    """

    channel_dim = 1
    _convs: tuple = ()  # the projection convs, with their out channels per head as (qk heads, v heads)
    _per_head: tuple = ()

    @classmethod
    def analysis_role(cls, m) -> dict:
        convs, nh, d = [getattr(m, n) for n in cls._convs], m.num_heads, m.dim_out_v
        ok = all(type(c) is nn.Conv2d and c.kernel_size == (1, 1) and c.groups == 1 and c.padding == (0, 0)
                 and c.padding_mode == "zeros" and c.in_channels == d for c in convs) \
            and (m.dim_out_qk, m.dim_out_v) == (nh * m.dim_head_qk, nh * m.dim_head_v) \
            and all(c.out_channels == nh * (a * m.dim_head_qk + b * m.dim_head_v) for c, (a, b) in
                    zip(convs, cls._per_head))
        if not ok:
            raise UnsupportedModuleError(f"{type(m).__name__}(dim={convs[0].in_channels}, dim_out={d}, num_heads={nh}):"
                                         f" only the stock layout with dim_out == dim (plain 1x1 Conv2d "
                                         f"{' / '.join(cls._convs)}) is slimmed by heads")
        return {"role": "norm", "dim": 1, "unit": m.dim_head_v}

    def _children(self) -> list:
        return [getattr(self, n) for n in self._convs]

    def heads(self, g: BNGeo) -> int:
        """The heads run at the active channels ``g``."""
        from slim_plugins.errors import NotExactError

        if g.idx is not None:  # the output is the first heads: the same channels only where they are a prefix
            raise NotExactError(f"{self.slim_name}: its {g.c} active channels are not a prefix")
        return whole_heads(self.slim_name, g.c, self.dim_head_v)

    def _rows(self, n: int) -> list:
        """Rows of each projection conv that the first ``n`` heads read."""
        raise NotImplementedError

    def _select(self, g: BNGeo) -> tuple:
        """``(w, b)`` of each projection conv: the rows of the kept heads, the active input channels."""
        out = []
        for c, rows in zip(self._children(), self._rows(self.heads(g))):
            rows = rows.to(c.weight.device) if torch.is_tensor(rows) else rows
            out += [g.take(c.weight[rows], 1), None if c.bias is None else c.bias[rows]]
        return tuple(out)

    def to_plain(self, g: BNGeo, a=None) -> nn.Module:
        t, nh = self.selected_copy(g), self.heads(g)
        p = self.plain_copy({}, num_heads=nh, dim_out_qk=nh * self.dim_head_qk, dim_out_v=nh * self.dim_head_v)
        for i, name in enumerate(self._convs):
            setattr(p, name, _conv_at(getattr(self, name), t[2 * i], t[2 * i + 1]))
        return p


def _register_byoanet_attention():
    from timm.layers.bottleneck_attn import BottleneckAttn
    from timm.layers.halo_attn import HaloAttn

    from slim_plugins.errors import NotExactError

    @register(HaloAttn)
    class SlimHaloAttn(_ConvHeadsAttention, HaloAttn):
        """HaloNet's blocked local self-attention (Vaswani et al. 2021, §2) slimmed by heads
        (:class:`_ConvHeadsAttention`): output ``(N, H' x dim_head_v, H / stride, W / stride)``; ``q`` keeps the
        rows of the kept heads, ``kv`` (head-major ``[k, v]`` per head) those of the kept heads.

        Raises:
            NotExactError: also an input whose sides are not whole blocks (timm asserts the same).
        """

        _convs, _per_head = ("q", "kv"), ((1, 0), (1, 1))

        @classmethod
        def analysis_role(cls, m) -> dict:
            if m.kv.stride != (1, 1):
                raise UnsupportedModuleError(f"HaloAttn with a strided kv conv ({m.kv.stride}) is not slimmed")
            return super().analysis_role(m)

        def _rows(self, n: int) -> list:
            return [slice(0, n * self.dim_head_qk), slice(0, n * (self.dim_head_qk + self.dim_head_v))]

        def forward(self, x):
            B, C, H, W = x.shape
            g, (wq, bq, wkv, bkv) = self.selected(x)
            nh, dqk, dv, bs, bsd, hs = (self.heads(g), self.dim_head_qk, self.dim_head_v, self.block_size,
                                        self.block_size_ds, self.halo_size)
            if H % bs or W % bs:
                raise NotExactError(f"{self.slim_name}: input {H}x{W} is not whole blocks of {bs}")
            nbh, nbw = H // bs, W // bs
            nb = nbh * nbw
            q = F.conv2d(x, wq, bq, self.q.stride)
            q = q.reshape(-1, dqk, nbh, bsd, nbw, bsd).permute(0, 1, 3, 5, 2, 4)
            q = q.reshape(B * nh, dqk, -1, nb).transpose(1, 3)
            kv = F.pad(F.conv2d(x, wkv, bkv), [hs, hs, hs, hs])
            kv = kv.unfold(2, self.win_size, bs).unfold(3, self.win_size, bs).reshape(
                B * nh, dqk + dv, nb, -1).permute(0, 2, 3, 1)
            k, v = torch.split(kv, [dqk, dv], dim=-1)
            if self.scale_pos_embed:
                attn = (q @ k.transpose(-1, -2) + self.pos_embed(q)) * self.scale
            else:
                attn = (q @ k.transpose(-1, -2)) * self.scale + self.pos_embed(q)
            out = (attn.softmax(dim=-1) @ v).transpose(1, 3)
            out = out.reshape(-1, bsd, bsd, nbh, nbw).permute(0, 3, 1, 4, 2).contiguous().view(
                B, nh * dv, H // self.block_stride, W // self.block_stride)
            return self.pool(out)

    @register(BottleneckAttn)
    class SlimBottleneckAttn(_ConvHeadsAttention, BottleneckAttn):
        """BoTNet's global self-attention with 2-D relative positions (Srinivas et al. 2021, §3) slimmed by heads
        (:class:`_ConvHeadsAttention`): the packed ``qkv`` conv (``[q heads, k heads, v heads]``) keeps the rows of
        the kept heads of each part.

        Raises:
            NotExactError: also an input of another size than the position embedding's (timm asserts the same).
        """

        _convs, _per_head = ("qkv",), ((2, 1),)

        def _rows(self, n: int) -> list:
            a, nq, nv = self.dim_out_qk, n * self.dim_head_qk, n * self.dim_head_v
            return [torch.cat([torch.arange(nq), a + torch.arange(nq), 2 * a + torch.arange(nv)])]

        def forward(self, x):
            B, C, H, W = x.shape
            if (H, W) != (self.pos_embed.height, self.pos_embed.width):
                raise NotExactError(f"{self.slim_name}: input {H}x{W}, position embedding "
                                    f"{self.pos_embed.height}x{self.pos_embed.width}")
            g, (w, b) = self.selected(x)
            nh, dqk, dv = self.heads(g), self.dim_head_qk, self.dim_head_v
            q, k, v = torch.split(F.conv2d(x, w, b), [nh * dqk, nh * dqk, nh * dv], dim=1)
            q = q.reshape(B * nh, dqk, -1).transpose(-1, -2)
            k = k.reshape(B * nh, dqk, -1)
            v = v.reshape(B * nh, dv, -1).transpose(-1, -2)
            if self.scale_pos_embed:
                attn = (q @ k + self.pos_embed(q)) * self.scale
            else:
                attn = (q @ k) * self.scale + self.pos_embed(q)
            out = (attn.softmax(dim=-1) @ v).transpose(-1, -2).reshape(B, nh * dv, H, W)
            return self.pool(out)

    for cls in (SlimHaloAttn, SlimBottleneckAttn):
        cls.__qualname__ = cls.__name__  # pickled by the module-level names below
    return SlimHaloAttn, SlimBottleneckAttn


SlimHaloAttn, SlimBottleneckAttn = _register_byoanet_attention()


def _register_lstm2d():
    from timm.models.sequencer import LSTM2d

    from slim_plugins.errors import NotExactError

    @register(LSTM2d)
    class SlimLSTM2d(SelectsFromChildren, SlimComposite, LSTM2d):
        """Sequencer's 2-D BiLSTM (Tatsunami & Taki 2022, §3.1) on channels-last ``(N, H, W, C_active)``: the
        vertical and horizontal LSTMs run ``hidden' = C_active x hidden_size / C`` hidden units (the hidden width
        follows the width, as a transformer's MLP does), each gate keeping the rows of its first ``hidden'`` units
        and the active input columns; ``fc`` reads the kept units of each direction and writes the active channels.
        So at a width it equals ``LSTM2d(C_active, hidden')`` holding the selected weights, which is what it exports
        as.

        Raises:
            UnsupportedModuleError: at convert time, a module without ``fc``, with stacked or projected LSTMs, or
                whose ``C`` is not a multiple of ``hidden_size``; ``convert`` then refuses the LSTM as before.
            NotExactError: active channels that are not whole multiples of ``C / hidden_size``.
        """

        channel_dim = -1

        @classmethod
        def analysis_role(cls, m) -> dict:
            c, hid = m.input_size, m.hidden_size
            rnns = cls._rnns(m)
            ok = type(m.fc) is nn.Linear and bool(rnns) and c % hid == 0 and all(
                type(r) is nn.LSTM and r.num_layers == 1 and r.batch_first and r.proj_size == 0
                and (r.input_size, r.hidden_size) == (c, hid) for r in rnns) \
                and (m.fc.in_features, m.fc.out_features) == ((2 if m.union == "cat" and len(rnns) == 2 else 1)
                                                              * m.output_size, c)
            if not ok:
                raise UnsupportedModuleError(f"{type(m).__name__}(input_size={c}, hidden_size={hid}, union="
                                             f"{m.union!r}): only single-layer batch-first LSTMs with an fc and "
                                             "input_size a multiple of hidden_size are slimmed")
            return {"role": "norm", "dim": -1, "unit": c // hid}

        @staticmethod
        def _rnns(m) -> list:
            return [r for r, on in ((m.rnn_v, m.with_vertical), (m.rnn_h, m.with_horizontal)) if on]

        def _children(self) -> list:
            return self._rnns(self) + [self.fc]

        def _hidden(self, g: BNGeo) -> int:
            ratio = self.input_size // self.hidden_size
            if g.c % ratio:
                raise NotExactError(f"{self.slim_name}: {g.c} active channels are not a multiple of {ratio} "
                                    "(channels per LSTM hidden unit)")
            return g.c // ratio

        def _select(self, g: BNGeo) -> tuple:
            """``([flat LSTM weights of each direction] per LSTM, fc w, fc b)`` at the channels ``g``."""
            hid, hp = self.hidden_size, self._hidden(g)
            dev = self.fc.weight.device
            units = torch.arange(hp, device=dev)
            rows = torch.cat([k * hid + units for k in range(4)])  # gates i, f, g, o
            out = []
            for r in self._rnns(self):
                ws = []
                for sfx in ("_l0", "_l0_reverse")[:2 if r.bidirectional else 1]:
                    ws += [g.take(getattr(r, "weight_ih" + sfx)[rows], 1), getattr(r, "weight_hh" + sfx)[rows, :hp]]
                    if r.bias:
                        ws += [getattr(r, "bias_ih" + sfx)[rows], getattr(r, "bias_hh" + sfx)[rows]]
                out.append(ws)
            cols = torch.cat([b * hid + units for b in range(self.fc.in_features // hid)])
            return (*out, g.take(self.fc.weight[:, cols], 0), g.take(self.fc.bias, 0))

        def forward(self, x):
            B, H, W, C = x.shape
            g, sel = self.selected(x)
            hp = self._hidden(g)
            ws = iter(sel[:-2])

            def run(r, seq):  # nn.LSTM's own kernel call (torch._VF.lstm), on the selected weights
                h0 = seq.new_zeros(2 if r.bidirectional else 1, seq.shape[0], hp)
                return torch._VF.lstm(seq, (h0, h0), next(ws), r.bias, 1, float(r.dropout), self.training,
                                      r.bidirectional, True)[0]

            v = h = None
            if self.with_vertical:
                v = run(self.rnn_v, x.permute(0, 2, 1, 3).reshape(-1, H, C)).reshape(B, W, H, -1).permute(0, 2, 1, 3)
            if self.with_horizontal:
                h = run(self.rnn_h, x.reshape(-1, W, C)).reshape(B, H, W, -1)
            if v is not None and h is not None:
                x = torch.cat([v, h], dim=-1) if self.union == "cat" else v + h
            else:
                x = v if v is not None else h
            return F.linear(x, sel[-2], sel[-1])

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            sel, hp = self.selected_copy(g), self._hidden(g)
            p = self.plain_copy({}, input_size=g.c, hidden_size=hp, output_size=self.output_size // self.hidden_size * hp)
            names = [n for n, on in (("rnn_v", self.with_vertical), ("rnn_h", self.with_horizontal)) if on]
            for name, r, ws in zip(names, self._rnns(self), sel[:-2]):
                q = nn.LSTM(g.c, hp, 1, bias=r.bias, batch_first=True, bidirectional=r.bidirectional,
                            device=ws[0].device, dtype=ws[0].dtype).train(r.training)
                with torch.no_grad():
                    for t, w in zip(q._flat_weights, ws):
                        t.copy_(w)
                setattr(p, name, q)
            p.fc = _linear_at(self.fc, sel[-2], sel[-1])
            return p

    SlimLSTM2d.__qualname__ = 'SlimLSTM2d'  # pickled by the module-level name below
    return SlimLSTM2d


SlimLSTM2d = _register_lstm2d()


def _register_mvit_attention():
    from timm.models.mvitv2 import MultiScaleAttention, cal_rel_pos_type, reshape_post_pool, reshape_pre_pool

    @register(MultiScaleAttention)
    class SlimMultiScaleAttention(DecidingHeadsAttention, MultiScaleAttention):
        """MViTv2's pooling attention (Li et al. 2022, Sec. 3.1) slimmed by heads, ``head_dim`` fixed
        (:class:`slim_plugins.nn.attention.DecidingHeadsAttention`): input ``(N, L, C_in_active)``, output ``((N,
        L', C_out_active), [H', W'])`` with ``heads' = C_out_active / head_dim``. The pooling convs and norms (per
        head dim, shared by all heads) and the decomposed relative position tables (``(2 S - 1, head_dim)``) stay
        whole. Exports as ``MultiScaleAttention(dim=C_in_active, dim_out=C_out_active, num_heads=heads')``.

        Raises:
            UnsupportedModuleError: at convert time, ``mode='conv_unshared'`` or a layout other than ``dim_out =
                num_heads x head_dim`` with plain ``nn.Linear`` ``qkv`` / ``proj``.
            NotExactError: an active output width that is not whole heads.
        """

        _layout_note = " and shared pooling (mode != 'conv_unshared')"

        @classmethod
        def _layout_ok(cls, m) -> bool:
            return m.mode != "conv_unshared"

        def _pooled(self, t, pool, norm, h: int, feat_size):
            if pool is not None:
                t, tok = reshape_pre_pool(t, feat_size, self.has_cls_token)
                t, feat_size = reshape_post_pool(pool(t), h, tok)
            return (t if norm is None else norm(t)), feat_size

        def forward(self, x, feat_size):
            B, N, _ = x.shape
            g, (wq, bq, wp, bp) = self.selected(x)
            h = g.out_c // self.head_dim  # (whole: _select checked it)
            q, k, v = F.linear(x, wq, bq).reshape(B, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
            q, q_size = self._pooled(q, self.pool_q, self.norm_q, h, feat_size)
            k, k_size = self._pooled(k, self.pool_k, self.norm_k, h, feat_size)
            v, _ = self._pooled(v, self.pool_v, self.norm_v, h, feat_size)
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if self.rel_pos_type == "spatial":
                attn = cal_rel_pos_type(attn, q, self.has_cls_token, q_size, k_size, self.rel_pos_h, self.rel_pos_w)
            y = attn.softmax(dim=-1) @ v
            if self.residual_pooling:
                y = y + q
            y = y.transpose(1, 2).reshape(B, -1, h * self.head_dim)
            return F.linear(y, wp, bp), q_size

        def to_plain(self, g: Geo, a=None) -> nn.Module:
            return self.plain_at(g)

    SlimMultiScaleAttention.__qualname__ = 'SlimMultiScaleAttention'  # pickled by the module-level name below
    return SlimMultiScaleAttention


SlimMultiScaleAttention = _register_mvit_attention()

__all__ = ["SlimAttention", "SlimWindowAttention", "SlimSamAttention", "SlimEvaAttention", "SlimAttentionRope",
           "SlimFocalModulation", "SlimLinearSelfAttention", "SlimOutlookAttention", "SlimVoloClassAttention",
           "SlimHaloAttn", "SlimBottleneckAttn", "SlimLSTM2d", "SlimMultiScaleAttention", "SlimBlurPool2d",
           "SlimStdConv2d", "SlimScaledStdConv2d", "SlimLayerNormAct", "SlimLayerNormAct2d", "SlimGroupNormAct",
           "SlimGroupNorm1Act", "SlimRmsNormAct", "SlimRmsNormAct2d"]
