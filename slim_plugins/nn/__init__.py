"""Width-switchable layers (DESIGN rule 1: input decides in-channels, width decides out-channels)."""
from .layers import SlimConv1d, SlimConv2d, SlimConv3d, SlimConvTranspose2d, SlimLinear, SlimMixin
from .norm import SlimBatchNorm2d, SlimBatchNorm3d
from .attention import SlimMultiheadAttention  # noqa: E402 (registers nn.MultiheadAttention)

__all__ = ["SlimConv1d", "SlimConv2d", "SlimConv3d", "SlimConvTranspose2d", "SlimLinear", "SlimMixin", "SlimBatchNorm2d",
           "SlimBatchNorm3d",
           "SlimMultiheadAttention"]
