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
from slim_plugins.nn.attention import SlimHeadsAttention
from slim_plugins.nn.layers import SlimConv2d, _assign, cached, plain_copy
from slim_plugins.nn.norm import (BNGeo, SlimComposite, SlimGroupNorm, SlimLayerNorm, SlimLayerNorm2d, SlimPerChannel,
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


# ---- focal modulation ---------------------------------------------------------------------------------------
def _conv_at(conv: nn.Conv2d, w, b, groups: int = 1) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``conv``'s geometry holding ``w`` / ``b`` (for export)."""
    p = nn.Conv2d(w.shape[1] * groups, w.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  groups, b is not None, conv.padding_mode, device=w.device, dtype=w.dtype)
    _assign(p, w, b)
    return p.train(conv.training)


def _register_focal_modulation():
    from timm.models.focalnet import FocalModulation

    @register(FocalModulation)
    class SlimFocalModulation(SlimComposite, FocalModulation):
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

        def _srcs(self):
            mods = [self.f, self.h, self.proj, self.norm] + [fl[0] for fl in self.focal_layers]
            if any("parametrizations" in m._modules or "weight" in m.__dict__ or "bias" in m.__dict__
                   for m in mods):
                # computed at every read, or held as plain attributes (a DataParallel replica): not cached
                return None
            return tuple(m._parameters.get(n) for m in mods for n in ("weight", "bias"))

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

        def focal_params(self, x) -> tuple:
            """``(geometry, selected weights)`` of a call on ``x``; without autograd reused per width while the
            parameters are unchanged (``stamps``, DESIGN rule 7)."""
            g = self.active_geometry(x)
            srcs = None if torch.is_grad_enabled() else self._srcs()
            if srcs is None:
                return g, self._select(g)
            return g, cached(self, "_slim_focal_cache", (g,), srcs, lambda: tuple(
                [t.contiguous() for t in v] if type(v) is list else None if v is None else v.contiguous()
                for v in self._select(g)), size=8)

        def forward(self, x):
            g, (wf, bf, wh, bh, wp, bp, wn, bn, wk) = self.focal_params(x)
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
            with torch.no_grad():
                wf, bf, wh, bh, wp, bp, wn, bn, wk = (
                    [t.detach().clone() for t in v] if type(v) is list else None if v is None else v.detach().clone()
                    for v in self._select(g))
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

        def __getstate__(self):  # copies drop the weight cache
            d = dict(super().__getstate__())
            d.pop("_slim_focal_cache", None)
            return d

    SlimFocalModulation.__qualname__ = 'SlimFocalModulation'  # pickled by the module-level name below
    return SlimFocalModulation


SlimFocalModulation = _register_focal_modulation()

__all__ = ["SlimAttention", "SlimWindowAttention", "SlimSamAttention", "SlimEvaAttention", "SlimAttentionRope", "SlimFocalModulation", "SlimBlurPool2d", "SlimStdConv2d", "SlimScaledStdConv2d",
           "SlimLayerNormAct", "SlimLayerNormAct2d", "SlimGroupNormAct", "SlimGroupNorm1Act", "SlimRmsNormAct",
           "SlimRmsNormAct2d"]
