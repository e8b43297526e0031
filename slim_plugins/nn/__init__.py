"""Width-switchable layers (DESIGN rule 1: input decides in-channels, width decides out-channels)."""
from .layers import SlimConv2d, SlimLinear, SlimMixin
from .norm import SlimBatchNorm2d

__all__ = ["SlimConv2d", "SlimLinear", "SlimMixin", "SlimBatchNorm2d"]
