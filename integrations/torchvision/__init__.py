"""torchvision adapter: torchvision's own per-channel module types.

``torchvision.ops.FrozenBatchNorm2d`` (the frozen BN of torchvision's detection backbones) holds its statistics and
affine parameters as buffers; converted, it selects them with the layer's active channels. Imported by
``slim_plugins.registry`` the first time ``convert`` meets a torchvision module type.
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
