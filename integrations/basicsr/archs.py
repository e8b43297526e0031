"""WDSR for BasicSR's ``ARCH_REGISTRY`` (BasicSR ships none).

WDSR-A (Yu et al. 2018, "Wide Activation for Efficient and Accurate Image Super-Resolution", arXiv 1808.08718;
reference code github.com/JiahuiYu/wdsr_ntire2018): residual blocks with a wide activation (3x3 conv n -> e*n,
ReLU, 3x3 conv e*n -> n), weight normalisation instead of BN, a pixel-shuffle tail and a global 5x5 skip from the
LR image. US-Nets Section 5.1 trains it with 8 blocks at body width n in [32, 64] (``num_feat`` = n); as a
US-Net it is this same class converted with ``slim.convert`` (``SlimSRModel`` does it from the options YAML).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from basicsr.utils.registry import ARCH_REGISTRY
from slim_plugins.registry import register_passthrough


def _wn_conv(cin: int, cout: int, k: int) -> nn.Module:
    # torch's parametrization (not the deprecated hook): slim_plugins slices (g, v) exactly and exports it as one
    return weight_norm(nn.Conv2d(cin, cout, k, padding=k // 2))


class WideActBlock(nn.Module):
    """``x + res_scale * conv(relu(conv(x)))`` with the inner conv ``expansion`` times wider; (N, n, H, W) in/out."""

    def __init__(self, num_feat: int, expansion: int = 4, res_scale: float = 1.0):
        super().__init__()
        self.res_scale = res_scale
        self.body = nn.Sequential(_wn_conv(num_feat, num_feat * expansion, 3), nn.ReLU(inplace=True),
                                  _wn_conv(num_feat * expansion, num_feat, 3))

    def forward(self, x):
        return x + self.body(x) * self.res_scale


@ARCH_REGISTRY.register()
class WDSR(nn.Module):
    """WDSR-A super-resolution network (weight-normed, no BN).

    Args:
        num_in_ch / num_out_ch: image channels (3). num_feat: body width n (US-Nets: 32 ... 64).
        num_block: residual blocks (8 in US-Nets Section 5.1). expansion: wide-activation factor (4, as WDSR-A's
            ``block_feats = 4 n``). upscale: 2, 3 or 4. res_scale: residual scaling (1).
        img_range / rgb_mean: input normalisation ``(x - rgb_mean) * img_range`` (WDSR: DIV2K mean, [-1, 1] range).

    Shapes: ``(N, 3, H, W)`` in [0, 1] -> ``(N, 3, upscale*H, upscale*W)``. The convs feeding the pixel shuffles
    (``tail``, ``skip``) and the RGB input/output keep their channels at every width.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 32, num_block: int = 8,
                 expansion: int = 4, upscale: int = 2, res_scale: float = 1.0, img_range: float = 2.0,
                 rgb_mean=(0.4488, 0.4371, 0.4040)):
        super().__init__()
        if upscale not in (2, 3, 4):
            raise ValueError(f"WDSR upscale must be 2, 3 or 4, got {upscale!r}")
        self.img_range = img_range
        self.register_buffer("mean", torch.tensor(rgb_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        out_feats = upscale * upscale * num_out_ch
        self.head = _wn_conv(num_in_ch, num_feat, 3)
        self.body = nn.Sequential(*[WideActBlock(num_feat, expansion, res_scale) for _ in range(num_block)])
        self.tail = nn.Sequential(_wn_conv(num_feat, out_feats, 3), nn.PixelShuffle(upscale))
        self.skip = nn.Sequential(_wn_conv(num_in_ch, out_feats, 5), nn.PixelShuffle(upscale))

    def forward(self, x):
        x = (x - self.mean) * self.img_range
        y = self.tail(self.body(self.head(x))) + self.skip(x)
        return y / self.img_range + self.mean


# The RGB mean buffer acts on the fixed 3-channel image, never on a slimmed tensor.
register_passthrough(WDSR)
