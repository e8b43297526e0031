"""ShuffleNet v1 (Zhang et al. 2017) as a timm model, and S-ShuffleNet [0.5, 1.0, 2.0]x (Slimmable Networks,
Table 3).

timm has no ShuffleNet v1; this is the architecture of Megvii's reference implementation (grouped 1x1 convs,
a channel shuffle between them, a 3x3 depthwise conv, average-pool shortcut concatenated in the stride-2 units, no
group conv on the first pointwise layer of stage 2), with the paper's channel shuffle (``view(N, g, C/g, H, W)``,
transpose, flatten) and global average pooling. ``shufflenet_v1_g3`` builds one width
(``width_mult`` 0.5/1.0/1.5/2.0 as in the paper); ``s_shufflenet_g3`` is the slimmable network: a 1.0x model
converted with switches ``[0.5, 1.0, 2.0]`` (channels widened to 2.0x), divisor 1 and, for the grouped convs,
a constant group count (every group slimmed, as the official S-ShuffleNet does). FLOPs at 224x224: 38 / 138 /
524 MFLOPs (S-Nets Table 3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

import slim_plugins as slim

__all__ = ["ShuffleNetV1", "shufflenet_v1_g3", "s_shufflenet_g3", "S_SHUFFLENET_SWITCHES"]

#: The switches of S-ShuffleNet in the paper (Slimmable Networks, Table 3).
S_SHUFFLENET_SWITCHES = (0.5, 1.0, 2.0)
_STAGE_OUT = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088), 8: (384, 768, 1536)}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H, W)``: channel ``g * C/groups + i`` moves to ``i * groups + g`` (ShuffleNet
    Section 3.1)."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """A ShuffleNet v1 unit: ``GConv1x1 -> BN -> ReLU -> shuffle -> DWConv3x3 -> BN -> GConv1x1 -> BN``, added to
    the input (stride 1) or concatenated after a 3x3 average pool of it (stride 2)."""

    def __init__(self, inp: int, oup: int, mid: int, groups: int, stride: int, first_group: bool):
        super().__init__()
        self.stride, self.groups = stride, groups
        outputs = oup - inp if stride == 2 else oup
        g1 = 1 if first_group else groups
        self.conv1 = nn.Conv2d(inp, mid, 1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, outputs, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = channel_shuffle(y, self.groups)
        y = self.bn3(self.conv3(self.bn2(self.conv2(y))))
        if self.stride == 1:
            return F.relu(x + y)
        return torch.cat((self.shortcut(x), F.relu(y)), 1)


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1 for ``(N, 3, H, W)`` images -> ``(N, num_classes)`` logits.

    Args:
        groups: group count of the pointwise convs (1, 2, 3, 4, 8; the paper's Table 1 channels).
        width_mult: the paper's scale factor ``s`` (0.5x, 1x, 1.5x, 2x); channels ``int(c * s)``.
        num_classes: classifier outputs (0: no classifier, pooled features).
    """

    def __init__(self, groups: int = 3, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, **_):
        super().__init__()
        if groups not in _STAGE_OUT:
            raise ValueError(f"groups must be one of {sorted(_STAGE_OUT)}, got {groups}")
        stem = int(24 * width_mult)
        outs = [int(c * width_mult) for c in _STAGE_OUT[groups]]
        self.num_classes, self.num_features, self.drop_rate = num_classes, outs[-1], drop_rate
        self.conv1 = nn.Conv2d(in_chans, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inp = [], stem
        for s, (oup, repeats) in enumerate(zip(outs, (4, 8, 4))):
            units = []
            for i in range(repeats):
                units.append(ShuffleUnit(inp, oup, oup // 4, groups, 2 if i == 0 else 1, s == 0 and i == 0))
                inp = oup
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes, bias=False) if num_classes else nn.Identity()
        self.default_cfg = self.pretrained_cfg = {"input_size": (3, 224, 224), "num_classes": num_classes,
                                                  "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                                  "classifier": "fc", "first_conv": "conv1"}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward_features(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.stages(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x).flatten(1)
        if self.drop_rate:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()


def _drop_timm_kwargs(kwargs):
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return kwargs


@register_model
def shufflenet_v1_g3(pretrained: bool = False, width_mult: float = 1.0, **kwargs) -> ShuffleNetV1:
    """ShuffleNet v1, g=3, one width (``width_mult`` 0.5 / 1.0 / 2.0: 38 / 138 / 524 MFLOPs at 224x224)."""
    if pretrained:
        raise ValueError("no pretrained ShuffleNet v1 weights ship with slim-plugins (no downloads)")
    return ShuffleNetV1(groups=3, width_mult=width_mult, **_drop_timm_kwargs(kwargs))


@register_model
def s_shufflenet_g3(pretrained: bool = False, widths=S_SHUFFLENET_SWITCHES, divisor: int = 1, bn: str = "auto",
                    **kwargs) -> ShuffleNetV1:
    """S-ShuffleNet g=3, switches [0.5, 1.0, 2.0] (Slimmable Networks Table 3): a ShuffleNet v1 1.0x converted to
    a slimmable net whose widest switch is 2.0x; FLOPs 38 / 138 / 524 M at 224x224. The grouped convs keep 3
    groups at every width and slim every group (constant group count)."""
    if pretrained:
        raise ValueError("no pretrained S-ShuffleNet weights ship with slim-plugins (no downloads)")
    kwargs = _drop_timm_kwargs(kwargs)
    kwargs.pop("width_range", None)
    model = ShuffleNetV1(groups=3, width_mult=1.0, **kwargs)
    return slim.convert(model, slim.WidthSpec.switches(widths, divisor), bn=bn, group_mode="groups")
