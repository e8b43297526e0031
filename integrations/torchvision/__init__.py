"""torchvision adapter: torchvision's own per-channel module types.

``torchvision.ops.FrozenBatchNorm2d`` (the frozen BN of torchvision's detection backbones) holds its statistics and
affine parameters as buffers; converted, it selects them with the layer's active channels. ConvNeXt's
``LayerNorm2d`` is the core channels-first LayerNorm; Swin's ``ShiftedWindowAttention`` (V1, V2 and the video Swin's
``ShiftedWindowAttention3d``) is slimmed by heads and its patch merging is four blocks of the channels. Imported by ``slim_plugins.registry`` the first time ``convert``
meets a torchvision module type.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from slim_plugins.nn.norm import BNGeo, SlimPerChannel
from slim_plugins.registry import register

__all__ = ["SlimFrozenBatchNorm2d"]


@register(FrozenBatchNorm2d)
class SlimFrozenBatchNorm2d(SlimPerChannel, FrozenBatchNorm2d):
    """Width-switchable ``torchvision.ops.FrozenBatchNorm2d``: ``(N, C_active, H, W)`` in and out, the fixed
    statistics and affine parameters of the active channels. Exports as ``FrozenBatchNorm2d``."""

    def forward(self, x):
        g = self.geometry(self._slim_state.active(self._dp_width), x.shape[1])
        w, b, rv, rm = (g.pick(t).reshape(1, -1, 1, 1) for t in (self.weight, self.bias, self.running_var,
                                                                  self.running_mean))
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)

    def to_plain(self, g: BNGeo, a) -> nn.Module:
        p = FrozenBatchNorm2d(g.c, eps=self.eps)
        with torch.no_grad():
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(p, k).copy_(g.pick(getattr(self, k)))
        return p.to(self.weight.device)


def _publish(cls: type) -> None:
    """A counterpart defined inside a function (it needs torchvision imported) as a module-level name, so that
    pickle (``torch.save(model)``) finds the class of a converted model's layers by that name."""
    cls.__qualname__ = cls.__name__
    globals()[cls.__name__] = cls
    __all__.append(cls.__name__)


def _register_swin() -> None:
    """torchvision's Swin (image and video): window attention slimmed by heads, patch merging as four channel
    blocks."""
    from torchvision.models import swin_transformer as tvswin

    from slim_plugins.nn.attention import SlimHeadsAttention
    from slim_plugins.registry import register_tile_fn

    register_tile_fn(tvswin._patch_merging_pad, 4)

    @register(tvswin.ShiftedWindowAttention)
    class SlimShiftedWindowAttention(SlimHeadsAttention, tvswin.ShiftedWindowAttention):
        """torchvision's ``ShiftedWindowAttention`` slimmed by heads (:mod:`slim_plugins.nn.attention`): torchvision's
        own ``shifted_window_attention`` run with the kept heads' weights and relative-bias columns; input and output
        ``(N, H, W, C_active)``. Exports as ``ShiftedWindowAttention(dim=C_active, num_heads=H')``."""

        def forward(self, x):
            _, h, wq, bq, wp, bp = self.head_params(x)
            bias = tvswin._get_relative_position_bias(self.relative_position_bias_table[:, :h],
                                                      self.relative_position_index, self.window_size)
            return tvswin.shifted_window_attention(
                x, wq, wp, bias, self.window_size, h, shift_size=self.shift_size,
                attention_dropout=self.attention_dropout, dropout=self.dropout, qkv_bias=bq, proj_bias=bp,
                training=self.training)

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            return self.plain_heads(g, lambda h: {"relative_position_bias_table":
                                                  self.relative_position_bias_table[:, :h]})

    @register(tvswin.ShiftedWindowAttentionV2)
    class SlimShiftedWindowAttentionV2(SlimHeadsAttention, tvswin.ShiftedWindowAttentionV2):
        """torchvision's Swin V2 ``ShiftedWindowAttentionV2`` slimmed by heads: cosine attention with the kept heads'
        ``logit_scale`` and the kept columns of the continuous position bias (``cpb_mlp``, whose output is one column
        per head), torchvision's own ``shifted_window_attention``; input and output ``(N, H, W, C_active)``. Exports
        as ``ShiftedWindowAttentionV2(dim=C_active, num_heads=H')`` (``cpb_mlp``'s last layer keeps ``H'`` rows)."""

        def forward(self, x):
            _, h, wq, bq, wp, bp = self.head_params(x)
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)[:, :h]
            bias = 16 * torch.sigmoid(tvswin._get_relative_position_bias(table, self.relative_position_index,
                                                                         self.window_size))
            return tvswin.shifted_window_attention(
                x, wq, wp, bias, self.window_size, h, shift_size=self.shift_size,
                attention_dropout=self.attention_dropout, dropout=self.dropout, qkv_bias=bq, proj_bias=bp,
                logit_scale=self.logit_scale[:h], training=self.training)

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            p = self.plain_heads(g, lambda h: {"logit_scale": self.logit_scale[:h]})
            h, last = p.num_heads, p.cpb_mlp[-1]
            with torch.no_grad():
                p.cpb_mlp[-1] = nn.Linear(last.in_features, h, bias=last.bias is not None, device=last.weight.device,
                                          dtype=last.weight.dtype)
                p.cpb_mlp[-1].weight.copy_(last.weight[:h])
                if last.bias is not None:
                    p.cpb_mlp[-1].bias.copy_(last.bias[:h])
            return p

    from torchvision.models.video import swin_transformer as tvswin3d

    @register(tvswin3d.ShiftedWindowAttention3d)
    class SlimShiftedWindowAttention3d(SlimHeadsAttention, tvswin3d.ShiftedWindowAttention3d):
        """torchvision's video Swin ``ShiftedWindowAttention3d`` slimmed by heads: torchvision's own
        ``shifted_window_attention_3d`` run with the kept heads' weights and relative-bias columns, the window
        fitted to the input as torchvision fits it; input and output ``(N, T, H, W, C_active)``. Exports as
        ``ShiftedWindowAttention3d(dim=C_active, num_heads=H')``."""

        def forward(self, x):
            _, h, wq, bq, wp, bp = self.head_params(x)
            _, t, hh, ww, _ = x.shape
            window, shift = tvswin3d._get_window_and_shift_size(list(self.shift_size), [t, hh, ww],
                                                                 list(self.window_size))
            bias = tvswin3d._get_relative_position_bias(self.relative_position_bias_table[:, :h],
                                                        self.relative_position_index, window)
            return tvswin3d.shifted_window_attention_3d(
                x, wq, wp, bias, window, h, shift_size=shift, attention_dropout=self.attention_dropout,
                dropout=self.dropout, qkv_bias=bq, proj_bias=bp, training=self.training)

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            return self.plain_heads(g, lambda h: {"relative_position_bias_table":
                                                  self.relative_position_bias_table[:, :h]})

    for c in (SlimShiftedWindowAttention, SlimShiftedWindowAttentionV2, SlimShiftedWindowAttention3d):
        _publish(c)


_register_swin()


def _register_convnext() -> None:
    """torchvision's ConvNeXt ``LayerNorm2d`` (permute, ``layer_norm`` over the channels, permute back)."""
    from torchvision.models.convnext import LayerNorm2d

    from slim_plugins.nn.norm import SlimLayerNorm2d

    register(LayerNorm2d, SlimLayerNorm2d)


_register_convnext()


def _register_maxvit() -> None:
    """torchvision's MaxViT: its ``RelativePositionalMultiHeadAttention`` (``to_qkv`` / ``merge``) slimmed by
    heads."""
    import torch.nn.functional as F
    from torchvision.models import maxvit as tvmaxvit

    from slim_plugins.nn.attention import SlimHeadsAttention

    base = tvmaxvit.RelativePositionalMultiHeadAttention

    @register(base)
    class SlimRelativePositionalMultiHeadAttention(SlimHeadsAttention, base):
        """torchvision's MaxViT attention slimmed by heads (:mod:`slim_plugins.nn.attention`): input and output
        ``(B, G, P, C_active)``, the first ``H' = C_active / head_dim`` heads with their relative-bias columns.
        The logit scale stays the full model's (torchvision scales by ``feat_dim ** -0.5``, not by ``head_dim``),
        so the export is ``RelativePositionalMultiHeadAttention(feat_dim=C_active, head_dim)`` with the full
        model's ``scale_factor`` attribute."""

        _qkv, _proj, _heads = "to_qkv", "merge", "n_heads"

        def forward(self, x):
            _, h, wq, bq, wp, bp = self.head_params(x)
            b_, g_, p_, _ = x.shape
            q, k, v = (t.reshape(b_, g_, p_, h, self.head_dim).permute(0, 1, 3, 2, 4)
                       for t in torch.chunk(F.linear(x, wq, bq), 3, dim=-1))
            dot = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k * self.scale_factor)
            bias = self.relative_position_bias_table[:, :h][self.relative_position_index.view(-1)]
            bias = bias.view(self.max_seq_len, self.max_seq_len, h).permute(2, 0, 1).unsqueeze(0)
            out = torch.einsum("B G H I J, B G H J D -> B G H I D", F.softmax(dot + bias, dim=-1), v)
            return F.linear(out.permute(0, 1, 3, 2, 4).reshape(b_, g_, p_, h * self.head_dim), wp, bp)

        def to_plain(self, g: BNGeo, a=None) -> nn.Module:
            return self.plain_heads(g, lambda h: {"relative_position_bias_table":
                                                  self.relative_position_bias_table[:, :h]})

    _publish(SlimRelativePositionalMultiHeadAttention)


_register_maxvit()


def _register_mvit() -> None:
    """torchvision's video MViT (v1 / v2): its pooling ``MultiscaleAttention`` slimmed by heads, and its
    ``_unsqueeze`` / ``_squeeze`` (a batch dim of heads added in front of the tokens and taken away) as layout
    functions, so the residual stream's max-pool skip (``pool_skip``) follows its channels."""
    import torch.nn.functional as F
    from torchvision.models.video import mvit as tvmvit

    from slim_plugins.nn.attention import DecidingHeadsAttention
    from slim_plugins.nn.layers import Geo
    from slim_plugins.registry import register_layout_fn

    register_layout_fn(tvmvit._unsqueeze)
    register_layout_fn(tvmvit._squeeze)
    base = tvmvit.MultiscaleAttention

    @register(base)
    class SlimMultiscaleAttention(DecidingHeadsAttention, base):
        """torchvision's MViT pooling attention slimmed by heads, ``head_dim`` fixed
        (:class:`slim_plugins.nn.attention.DecidingHeadsAttention`): input ``(N, L, C_in_active)``, output ``((N,
        L', C_out_active), thw')`` with ``heads' = C_out_active / head_dim``. The pools (a depthwise ``Conv3d`` of
        ``head_dim`` channels and its norm, shared by all heads) and the decomposed relative position tables (v2)
        stay whole. Exports as ``MultiscaleAttention(embed_dim=C_in_active, output_dim=C_out_active,
        num_heads=heads')``."""

        _proj, _dim_out = "project.0", "output_dim"

        def forward(self, x, thw):
            B, N, _ = x.shape
            g, (wq, bq, wp, bp) = self.selected(x)
            h = g.out_c // self.head_dim  # (whole: _select checked it)
            q, k, v = F.linear(x, wq, bq).reshape(B, N, 3, h, self.head_dim).transpose(1, 3).unbind(dim=2)
            k, k_thw = (k, thw) if self.pool_k is None else self.pool_k(k, thw)
            if self.pool_v is not None:
                v = self.pool_v(v, thw)[0]
            if self.pool_q is not None:
                q, thw = self.pool_q(q, thw)
            attn = torch.matmul(self.scaler * q, k.transpose(2, 3))
            if self.rel_pos_h is not None and self.rel_pos_w is not None and self.rel_pos_t is not None:
                attn = tvmvit._add_rel_pos(attn, q, thw, k_thw, self.rel_pos_h, self.rel_pos_w, self.rel_pos_t)
            y = torch.matmul(attn.softmax(dim=-1), v)
            if self.residual_pool:
                tvmvit._add_shortcut(y, q, self.residual_with_cls_embed)
            y = F.linear(y.transpose(1, 2).reshape(B, -1, h * self.head_dim), wp, bp)
            for m in list(self.project)[1:]:  # (its dropout)
                y = m(y)
            return y, thw

        def to_plain(self, g: Geo, a=None) -> nn.Module:
            return self.plain_at(g, embed_dim=g.in_c)

    _publish(SlimMultiscaleAttention)


_register_mvit()
