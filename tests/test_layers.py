"""Width-switchable layers (DESIGN rule 1): conv (normal, group, depthwise, dilated, padding modes), linear, BN."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slim_plugins as slim
from slim_plugins import make_divisible
from slim_plugins.nn import SlimBatchNorm2d, SlimConv2d, SlimLinear


def _convert_pair(first: nn.Module, second: nn.Module, spec, **kw):
    """Sequential(first, second): ``second`` is the auto-fixed output layer, ``first`` is free to slim."""
    return slim.convert(nn.Sequential(first, second), spec, **kw)


@pytest.mark.parametrize("kw", [dict(), dict(dilation=2, padding=2), dict(stride=2, padding=1, bias=False),
                                dict(padding=1, padding_mode="reflect"), dict(padding=1, padding_mode="circular")])
@pytest.mark.parametrize("w", [0.25, 0.5, 0.6, 1.0])
def test_conv_slices_output_channels(kw, w, mad):
    conv = nn.Conv2d(3, 32, 3, **kw)
    ref = nn.Conv2d(3, 32, 3, **kw)
    ref.load_state_dict(conv.state_dict())
    model = _convert_pair(conv, nn.Conv2d(32, 4, 1), slim.WidthSpec.range(0.25, 1.0))
    layer = model[0]
    assert isinstance(layer, SlimConv2d) and layer.weight is conv.weight  # shares the parameter, no copy
    x = torch.randn(2, 3, 11, 11)
    c = 32 if w == 1.0 else make_divisible(32 * w)
    with slim.width(w):
        y = layer(x)
    assert y.shape[1] == c
    full = ref(x)
    assert mad(y, full[:, :c]) <= 1e-6  # the first c filters are the slim sub-network
    assert layer.in_channels == 3 and layer.out_channels == 32  # forward never mutates the module


@pytest.mark.parametrize("w", [0.25, 0.5, 0.75])
def test_conv_reads_input_channels_from_tensor(w, mad):
    conv = nn.Conv2d(32, 24, 3, padding=1)
    model = _convert_pair(nn.Conv2d(3, 32, 1), conv, slim.WidthSpec.range(0.25, 1.0), fixed=["0"])
    layer = model[1]  # output layer: fixed out, input sliced
    x = torch.randn(2, 32, 8, 8)
    cin = make_divisible(32 * w)
    with slim.width(w):
        y = layer(x[:, :cin])
    assert y.shape[1] == 24  # fixed output layer keeps all channels
    assert mad(y, F.conv2d(x[:, :cin], conv.weight[:, :cin], conv.bias, padding=1)) <= 1e-6


def test_depthwise_follows_input(mad):
    dw = nn.Conv2d(32, 64, 3, padding=1, groups=32)  # depthwise with channel multiplier 2
    model = _convert_pair(dw, nn.Conv2d(64, 4, 1), slim.WidthSpec.range(0.25, 1.0))
    layer = model[0]
    assert layer.depthwise and layer.dw_multiplier == 2
    x = torch.randn(2, 12, 8, 8)  # 12 active channels, not a make_divisible count: the input decides
    with slim.width(0.25):
        y = layer(x)
    assert y.shape[1] == 24
    assert mad(y, F.conv2d(x, dw.weight[:24], dw.bias[:24], padding=1, groups=12)) <= 1e-6


def test_group_conv_slims_every_group(mad):
    """Constant group count (the default, the official S-ShuffleNet): each of the G=4 groups keeps its own first
    channels, so every output channel meets the same weights as at full width (not W[:out, :in/G])."""
    c0, g = nn.Conv2d(3, 32, 1), nn.Conv2d(32, 64, 3, padding=1, groups=4)
    model = slim.convert(nn.Sequential(c0, g, nn.Conv2d(64, 4, 1)), slim.WidthSpec.range(0.25, 1.0))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        h = model[1](model[0](x))
    assert h.shape[1] == 32
    sel0 = torch.cat([torch.arange(4) + 8 * k for k in range(4)])     # 4 of each input group of 8
    sel1 = torch.cat([torch.arange(8) + 16 * k for k in range(4)])    # 8 of each output group of 16
    ref = F.conv2d(F.conv2d(x, c0.weight[sel0], c0.bias[sel0]), g.weight[sel1][:, :4], g.bias[sel1], padding=1,
                   groups=4)
    assert mad(h, ref) <= 1e-5
    # the same channels of the full conv, fed the full input with the inactive channels zeroed
    mask = torch.zeros(32)
    mask[sel0] = 1
    full = F.conv2d(F.conv2d(x, c0.weight, c0.bias) * mask.view(1, -1, 1, 1), g.weight, g.bias, padding=1, groups=4)
    assert mad(h, full[:, sel1]) <= 1e-5


@pytest.mark.parametrize("w", [0.25, 0.5, 1.0])
def test_linear_flatten_channel_major(w, mad):
    fc = nn.Linear(16 * 2 * 2, 10)
    model = slim.convert(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), fc),
                         slim.WidthSpec.range(0.25, 1.0))
    assert isinstance(model[3], SlimLinear)
    x = torch.randn(2, 3, 8, 8)
    with slim.width(w):
        y = model(x)
        h = model[2](model[1](model[0](x)))
    c = 16 if w == 1.0 else make_divisible(16 * w)
    assert h.shape[1] == c * 4
    assert mad(y, F.linear(h, fc.weight[:, : c * 4], fc.bias)) <= 1e-6


def test_output_averaging_scales_by_fan_in(mad):
    conv = nn.Conv2d(32, 16, 1)
    model = _convert_pair(nn.Conv2d(3, 32, 1), conv, slim.WidthSpec.range(0.25, 1.0), output_averaging=True)
    x = torch.randn(2, 8, 4, 4)
    with slim.width(0.25):
        y = model[1](x)
    plain = F.conv2d(x, conv.weight[:, :8], conv.bias)
    assert mad(y, plain * 4.0) <= 1e-5  # C_in_full / C_in_active = 32 / 8 (US-MobileNet v1 +)
    full = torch.randn(2, 32, 4, 4)
    with slim.width(1.0):  # full fan-in: no scaling
        assert mad(model[1](full), F.conv2d(full, conv.weight, conv.bias)) <= 1e-6


def test_eval_weight_cache_invalidated_by_updates(mad):
    model = slim.convert(nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 4, 1)), slim.WidthSpec.range(0.25, 1.0))
    model.eval()
    layer = model[0]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        y0 = layer(x)
        assert layer._w_cache  # the contiguous slice is cached in eval/no-grad
        y1 = layer(x)
    assert torch.equal(y0, y1)
    # An optimizer step changes parameters in place: the cached slice must not be reused.
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer.weight.grad = torch.ones_like(layer.weight)
    layer.bias.grad = torch.ones_like(layer.bias)
    opt.step()
    with torch.no_grad(), slim.width(0.5):
        y2 = layer(x)
    assert mad(y2, F.conv2d(x, layer.weight[:16], layer.bias[:16])) <= 1e-6
    assert mad(y2, y0) > 1.0
    # load_state_dict also copies in place
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    with torch.no_grad(), slim.width(0.5):
        y3 = layer(x)
    assert mad(y3, F.conv2d(x, sd["0.weight"][:16], sd["0.bias"][:16])) <= 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eval_fast_path_follows_width_writes_and_new_parameters(kind, mad):
    """The one-entry eval fast path of SlimLinear / SlimConv2d (batch-1 latency) must miss on every change that the
    per-geometry cache misses on: another width, an in-place write, a new parameter object."""
    if kind == "linear":
        net, x, h, op = nn.Sequential(nn.Linear(3, 32), nn.Linear(32, 4)), torch.randn(2, 3), torch.randn(2, 16), \
            F.linear
    else:
        net, x, h, op = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 4, 1)), torch.randn(2, 3, 4, 4), \
            torch.randn(2, 16, 4, 4), F.conv2d
    model = slim.convert(net, slim.WidthSpec.range(0.25, 1.0))
    model.eval()
    layer = model[0]
    with torch.no_grad():
        for w, c in [(0.5, 16), (0.25, 8), (0.5, 16), (1.0, 32)]:
            with slim.width(w):
                y = layer(x)
                assert torch.equal(layer(x), y)  # the second call is the fast path
            assert mad(y, op(x, layer.weight[:c], layer.bias[:c])) <= 1e-6
    head = model[1]  # reads 16 of 32 inputs: its cached weight is a copy, not a view
    with torch.no_grad(), slim.width(0.5):
        head.bias = nn.Parameter(torch.zeros(4))
        y0 = head(h)
        head.bias = nn.Parameter(torch.ones(4))  # a new parameter object with the same write counter
        y1 = head(h)
        head.weight.mul_(2.0)  # an in-place write (optimizer step, EMA)
        y2 = head(h)
    assert mad(y1, y0 + 1.0) <= 1e-6
    assert mad(y2, 2.0 * y0 + 1.0) <= 1e-5
    assert mad(y2, op(h, head.weight[:, :16], head.bias)) <= 1e-6
    # at the full width the layer reads its parameters live (no write-counter check): writes and swaps show
    with torch.no_grad(), slim.width(1.0):
        layer(x)
        layer.weight.mul_(3.0)
        assert mad(layer(x), op(x, layer.weight, layer.bias)) <= 1e-6
        layer.weight.data = torch.randn_like(layer.weight)
        assert mad(layer(x), op(x, layer.weight, layer.bias)) <= 1e-6


def test_eval_fast_path_misses_after_a_write_during_the_selection(mad):
    """A write by another thread (an EMA, an optimizer step) between the start of a selection and storing it must
    make the next call miss, not reuse the pre-write copy: the write counters are read before selecting. Simulated
    by a selection that writes the weight right after it is made."""
    model = slim.convert(nn.Sequential(nn.Linear(3, 32), nn.Linear(32, 4)), slim.WidthSpec.range(0.25, 1.0))
    model.eval()
    head, h = model[1], torch.randn(2, 16)

    def racing(a, c):
        out = type(head)._eval_values(head, a, c)
        with torch.no_grad():
            head.weight.mul_(2.0)
        return out

    head._eval_values = racing
    with torch.no_grad(), slim.width(0.5):
        head(h)
    del head._eval_values
    with torch.no_grad(), slim.width(0.5):
        assert mad(head(h), F.linear(h, head.weight[:, :16], head.bias)) <= 1e-6


def test_eval_fast_path_with_a_computed_weight(mad):
    """A layer whose weight a parametrization computes (registered after convert) has no stored weight to check:
    no-grad calls recompute it instead of failing or reusing it."""
    model = slim.convert(nn.Sequential(nn.Linear(3, 32), nn.Linear(32, 4)), slim.WidthSpec.range(0.25, 1.0))
    model.eval()

    class Double(nn.Module):
        def forward(self, w):
            return 2.0 * w

    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Double())
    x = torch.randn(2, 3)
    with torch.no_grad():
        for w, c in [(1.0, 32), (0.5, 16), (0.5, 16)]:
            with slim.width(w):
                assert mad(model[0](x), F.linear(x, model[0].weight[:c], model[0].bias[:c])) <= 1e-6


def test_gradients_reach_only_the_active_slice():
    model = slim.convert(nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 4, 1)), slim.WidthSpec.range(0.25, 1.0))
    with slim.width(0.5):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    g = model[0].weight.grad
    assert g[:16].abs().sum() > 0 and g[16:].abs().sum() == 0
    assert model[1].weight.grad[:, :16].abs().sum() > 0 and model[1].weight.grad[:, 16:].abs().sum() == 0


# ---- BatchNorm modes ----------------------------------------------------------------------------------------
def _bn_model(spec, bn, c=16):
    return slim.convert(nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, 4, 1)),
                        spec, bn=bn)


def test_switchable_bn_private_per_switch_even_with_equal_channels():
    spec = slim.WidthSpec.switches([0.5, 0.55, 1.0])  # 0.5 and 0.55 both give 8 of 16 channels
    model = _bn_model(spec, "switchable")
    bn = model[1]
    assert isinstance(bn, SlimBatchNorm2d) and bn.running_mean.shape == (3, 16) and bn.weight.shape == (3, 16)
    x = torch.randn(4, 3, 8, 8) + 3.0
    with slim.width(0.55):
        assert model[0](x).shape[1] == 8
        model(x)
    rm = bn.running_mean
    assert rm[1].abs().sum() > 0  # switch 0.55 updated
    assert rm[0].abs().sum() == 0 and rm[2].abs().sum() == 0  # 0.5 and 1.0 untouched
    assert (bn.weight.grad is None)
    with slim.width(0.5):
        model(x).sum().backward()
    assert bn.weight.grad[0, :8].abs().sum() > 0 and bn.weight.grad[1:].abs().sum() == 0


def test_switchable_shared_shares_affine_not_stats():
    model = _bn_model(slim.WidthSpec.switches([0.5, 1.0]), "switchable_shared")
    bn = model[1]
    assert bn.weight.shape == (16,) and bn.running_mean.shape == (2, 16)


def test_stock_bn_checkpoint_broadcasts_into_switches():
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1))
    with torch.no_grad():
        plain[1].running_mean.uniform_()
        plain[1].weight.uniform_()
    sd = plain.state_dict()
    model = _bn_model(slim.WidthSpec.switches([0.25, 0.5, 1.0]), "switchable")
    model.load_state_dict(sd)
    assert torch.equal(model[1].running_mean, sd["1.running_mean"].expand(3, 16))
    assert torch.equal(model[1].weight.detach(), sd["1.weight"].expand(3, 16))


def test_naive_bn_updates_at_every_width():
    model = _bn_model(slim.WidthSpec.range(0.25, 1.0), "naive")
    bn = model[1]
    before = bn.running_mean.clone()
    with slim.width(0.5):
        model(torch.randn(4, 3, 8, 8) + 2)
    assert not torch.equal(bn.running_mean[:8], before[:8]) and torch.equal(bn.running_mean[8:], before[8:])
    model.eval()
    with slim.width(0.6):  # naive: no calibration needed
        model(torch.randn(1, 3, 8, 8))


def test_frozen_bn_never_updates(mad):
    model = _bn_model(slim.WidthSpec.range(0.25, 1.0), "frozen")
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_()
        bn.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in bn.state_dict().items() if torch.is_tensor(v)}
    model.train()
    x = torch.randn(4, 3, 8, 8)
    with slim.width(0.5):
        h = model[0](x)
        y = bn(h)
    for k, v in before.items():
        assert torch.equal(bn.state_dict()[k], v), k
    ref = F.batch_norm(h, before["running_mean"][:8], before["running_var"][:8], bn.weight[:8], bn.bias[:8],
                       False, 0.0, bn.eps)
    assert mad(y, ref) <= 1e-6  # normalises with the stored statistics even in train mode
