"""Width-switchable ``nn.Conv1d``, ``nn.Conv3d`` / ``nn.BatchNorm3d`` and ``nn.ConvTranspose2d`` (issue 21: CoaT,
EfficientViM, LowFormer, torchvision's video models).

Each layer test compares the converted layer with the original at width 1.0 (bit for bit) and, at a narrower width,
with a plain layer built by hand from the sliced weights; the model tests convert, run and export small models using
the layers (the export's outputs equal the dynamic model's).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slim_plugins as slim
from slim_plugins import make_divisible
from slim_plugins.errors import NotExactError, WidthError
from slim_plugins.nn.layers import SlimConv1d, SlimConv3d, SlimConvTranspose2d
from slim_plugins.nn.norm import SlimBatchNorm3d

SPEC = slim.WidthSpec.range(0.25, 1.0)


def _plain(cls, w, b, *args, **kw):
    """A plain layer of type ``cls`` holding ``w`` / ``b`` (its own copies)."""
    p = cls(*args, bias=b is not None, **kw)
    with torch.no_grad():
        p.weight.copy_(w)
        if b is not None:
            p.bias.copy_(b)
    return p


def _convert(model, x):
    ref = copy.deepcopy(model).eval()
    return slim.convert(model, SPEC, example_input=x).eval(), ref


# ---- Conv1d ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding=2, bias=False),
                                dict(padding=1, padding_mode="reflect"), dict(padding=1, padding_mode="circular")])
@pytest.mark.parametrize("w", [0.25, 0.5, 0.6])
def test_conv1d_slices_both_sides(kw, w, mad):
    """Conv1d(3->32) -> Conv1d(32->24) -> Conv1d(24->4): the middle layer slices its inputs and outputs."""
    x = torch.randn(2, 3, 19)
    model, ref = _convert(nn.Sequential(nn.Conv1d(3, 32, 3, **kw), nn.Conv1d(32, 24, 3, **kw), nn.Conv1d(24, 4, 1)),
                          x)
    assert isinstance(model[1], SlimConv1d)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # width 1.0: the original, bit for bit
        with slim.width(w):
            h0 = model[0](x)
            h1 = model[1](h0)
            y = model(x)
        c0, c1 = make_divisible(32 * w), make_divisible(24 * w)
        assert h0.shape[1] == c0 and h1.shape[1] == c1
        kw_ = {k: v for k, v in kw.items() if k != "bias"}
        m1 = ref[1]
        p0 = _plain(nn.Conv1d, ref[0].weight[:c0], None if ref[0].bias is None else ref[0].bias[:c0], 3, c0, 3, **kw_)
        p1 = _plain(nn.Conv1d, m1.weight[:c1, :c0], None if m1.bias is None else m1.bias[:c1], c0, c1, 3, **kw_)
        p2 = _plain(nn.Conv1d, ref[2].weight[:, :c1], ref[2].bias, c1, 4, 1)
        assert mad(h1, p1(p0(x))) <= 1e-6
        assert mad(y, p2(p1(p0(x)))) <= 1e-6


@pytest.mark.parametrize("mult", [1, 2])
def test_conv1d_depthwise_follows_input(mult, mad):
    x = torch.randn(2, 3, 17)
    model, ref = _convert(nn.Sequential(nn.Conv1d(3, 32, 1), nn.Conv1d(32, 32 * mult, 5, padding=4, dilation=2,
                                                                       groups=32), nn.Conv1d(32 * mult, 4, 1)), x)
    layer = model[1]
    assert layer.depthwise and layer.dw_multiplier == mult
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        with slim.width(0.5):
            h = model[0](x)
            y = layer(h)
    c = h.shape[1]
    assert c < 32 and y.shape[1] == c * mult
    p = _plain(nn.Conv1d, ref[1].weight[:c * mult], ref[1].bias[:c * mult], c, c * mult, 5, padding=4, dilation=2,
               groups=c)
    assert mad(y, p(h)) <= 1e-6


def test_conv1d_group_conv_slims_every_group(mad):
    """Constant group count: each of the 4 groups keeps its own first channels (as SlimConv2d)."""
    x = torch.randn(2, 3, 13)
    model, ref = _convert(nn.Sequential(nn.Conv1d(3, 32, 1), nn.Conv1d(32, 64, 3, padding=1, groups=4),
                                        nn.Conv1d(64, 4, 1)), x)
    with torch.no_grad(), slim.width(0.5):
        h = model[1](model[0](x))
    ia, oa = 32 // 4 // 2, h.shape[1] // 4
    sel0 = torch.cat([torch.arange(ia) + 8 * k for k in range(4)])
    sel1 = torch.cat([torch.arange(oa) + 16 * k for k in range(4)])
    p0 = _plain(nn.Conv1d, ref[0].weight[sel0], ref[0].bias[sel0], 3, 4 * ia, 1)
    p1 = _plain(nn.Conv1d, ref[1].weight[sel1][:, :ia], ref[1].bias[sel1], 4 * ia, 4 * oa, 3, padding=1, groups=4)
    assert mad(h, p1(p0(x))) <= 1e-6


# ---- ConvTranspose2d ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1, output_padding=1), dict(stride=2, dilation=2),
                                dict(stride=3, padding=2, output_padding=2, bias=False)])
@pytest.mark.parametrize("w", [0.25, 0.5, 0.6])
def test_conv_transpose2d_slices_both_sides(kw, w, mad):
    """Conv2d(3->32) -> ConvTranspose2d(32->48) -> Conv2d(48->4): the stored weight is ``(C_in, C_out, k, k)``, so
    the narrow layer reads ``W[:c_in, :c_out]``."""
    x = torch.randn(2, 3, 7, 6)
    model, ref = _convert(nn.Sequential(nn.Conv2d(3, 32, 1), nn.ConvTranspose2d(32, 48, 3, **kw),
                                        nn.Conv2d(48, 4, 1)), x)
    layer = model[1]
    assert isinstance(layer, SlimConvTranspose2d)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        with slim.width(w):
            h1 = layer(model[0](x))
            y = model(x)
        c0, c1 = make_divisible(32 * w), make_divisible(48 * w)
        assert h1.shape[1] == c1 and c1 != c0  # unequal counts: rows and columns cannot be confused
        kw_ = {k: v for k, v in kw.items() if k != "bias"}
        m1 = ref[1]
        p0 = _plain(nn.Conv2d, ref[0].weight[:c0], ref[0].bias[:c0], 3, c0, 1)
        p1 = _plain(nn.ConvTranspose2d, m1.weight[:c0, :c1], None if m1.bias is None else m1.bias[:c1], c0, c1, 3,
                    **kw_)
        p2 = _plain(nn.Conv2d, ref[2].weight[:, :c1], ref[2].bias, c1, 4, 1)
        assert mad(h1, p1(p0(x))) <= 1e-6
        assert mad(y, p2(p1(p0(x)))) <= 1e-6


@pytest.mark.parametrize("mult", [1, 2])
def test_conv_transpose2d_depthwise_follows_input(mult, mad):
    """LowFormer's upsampling: ``groups == C_in``; the weight ``(C, mult, k, k)`` keeps its first ``c`` rows."""
    x = torch.randn(2, 3, 5, 5)
    model, ref = _convert(nn.Sequential(nn.Conv2d(3, 32, 1), nn.ConvTranspose2d(32, 32 * mult, 4, stride=2,
                                                                                padding=1, groups=32),
                                        nn.Conv2d(32 * mult, 4, 1)), x)
    layer = model[1]
    assert layer.depthwise and layer.dw_multiplier == mult
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        with slim.width(0.25):
            h = model[0](x)
            y = layer(h)
    c = h.shape[1]
    assert c < 32 and y.shape[1] == c * mult
    p = _plain(nn.ConvTranspose2d, ref[1].weight[:c], ref[1].bias[:c * mult], c, c * mult, 4, stride=2, padding=1,
               groups=c)
    assert mad(y, p(h)) <= 1e-6


def test_conv_transpose2d_group_conv_slims_every_group(mad):
    x = torch.randn(2, 3, 6, 6)
    model, ref = _convert(nn.Sequential(nn.Conv2d(3, 32, 1), nn.ConvTranspose2d(32, 64, 3, stride=2, groups=4),
                                        nn.Conv2d(64, 4, 1)), x)
    with torch.no_grad(), slim.width(0.5):
        h = model[1](model[0](x))
    ia, oa = 32 // 4 // 2, h.shape[1] // 4
    sel0 = torch.cat([torch.arange(ia) + 8 * k for k in range(4)])
    sel1 = torch.cat([torch.arange(oa) + 16 * k for k in range(4)])
    p0 = _plain(nn.Conv2d, ref[0].weight[sel0], ref[0].bias[sel0], 3, 4 * ia, 1)
    # stored (C_in, C_out / G, k, k): the active inputs' rows, each group's first `oa` columns
    p1 = _plain(nn.ConvTranspose2d, ref[1].weight[sel0][:, :oa], ref[1].bias[sel1], 4 * ia, 4 * oa, 3, stride=2,
                groups=4)
    assert mad(h, p1(p0(x))) <= 1e-6


def test_conv_transpose2d_output_size(mad):
    x = torch.randn(2, 3, 5, 5)
    model, ref = _convert(nn.Sequential(nn.Conv2d(3, 32, 1), nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1),
                                        nn.Conv2d(16, 4, 1)), x)
    with torch.no_grad(), slim.width(0.5):
        h = model[0](x)
        y = model[1](h, output_size=[10, 10])
    c0, c1 = h.shape[1], y.shape[1]
    assert y.shape[-2:] == (10, 10)
    p = _plain(nn.ConvTranspose2d, ref[1].weight[:c0, :c1], ref[1].bias[:c1], c0, c1, 3, stride=2, padding=1)
    assert mad(y, p(h, output_size=[10, 10])) <= 1e-6


def test_conv_transpose2d_refuses_widths_above_one():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ConvTranspose2d(16, 16, 2, stride=2), nn.Conv2d(16, 4, 1))
    before = [type(m) for m in model]
    with pytest.raises(WidthError, match="ConvTranspose2d"):
        slim.convert(model, slim.WidthSpec.range(0.25, 1.5), example_input=torch.randn(1, 3, 4, 4))
    assert [type(m) for m in model] == before  # rolled back


def test_conv1d_widens_above_one(mad):
    x = torch.randn(2, 3, 11)
    model = nn.Sequential(nn.Conv1d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 4, 1))
    ref = copy.deepcopy(model)
    slim.convert(model, slim.WidthSpec.range(0.5, 1.5), example_input=x)
    assert model[0].weight.shape[0] > 16
    with torch.no_grad(), slim.width(1.0):
        assert mad(model(x), ref(x)) <= 1e-6
    with torch.no_grad(), slim.width(1.5):
        y = model(x)
        assert mad(slim.export(model, 1.5, example_input=x)(x), y) <= 1e-5


# ---- models ------------------------------------------------------------------------------------------------------
class TokenMixer(nn.Module):
    """Patch embedding, then a kernel-1 Conv1d across tokens (channels on the last dim, CoaT's ``aggregate``):
    it mixes tokens, never channels, so the channels pass through it and it stays whole."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, 4)
        self.mix = nn.Conv1d(16, 4, 1)
        self.fc = nn.Linear(32, 48)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16 tokens, 32 channels)
        t = self.fc(self.mix(t)).relu()  # (N, 4, 48)
        return self.head(t.mean(1))


class Eca(nn.Module):
    """ECA-style attention: a k=3 Conv1d along the pooled channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).unsqueeze(1))  # (N, 1, C)
        return x * y.sigmoid().transpose(1, 2).unsqueeze(-1)


def _seq1d():
    return nn.Sequential(nn.Conv1d(8, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Conv1d(32, 32, 3, padding=2, dilation=2, groups=32), nn.Conv1d(32, 64, 1, stride=2),
                         nn.ReLU(), nn.Conv1d(64, 64, 3, groups=4, padding=1), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(64, 5)), torch.randn(2, 8, 40)


def _decoder():
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.ConvTranspose2d(16, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.ConvTranspose2d(32, 32, 3, padding=1, groups=32),
                         nn.ConvTranspose2d(32, 32, 3, stride=2, padding=1, output_padding=1, groups=4),
                         nn.ConvTranspose2d(32, 64, 3, padding=1, groups=32), nn.Conv2d(64, 3, 1)), \
        torch.randn(2, 3, 16, 16)


def _token_mixer():
    return TokenMixer(), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("make", [_seq1d, _decoder, _token_mixer])
def test_model_converts_runs_and_exports(make, mad):
    model, x = make()
    model.eval()
    model, ref = _convert(model, x)
    slim.calibrate_bn(model, [x], widths=[0.25, 0.5, 0.75])
    model.eval()
    n_full = sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # width 1.0 is the original
        for w in (0.25, 0.5, 0.75, 1.0):
            with slim.width(w):
                y = model(x)
            plain = slim.export(model, w, example_input=x)
            assert not any(hasattr(m, "slim_name") for m in plain.modules())
            assert {type(m) for m in plain.modules()} <= {type(m) for m in ref.modules()}
            assert mad(plain(x), y) <= 1e-5
            n = sum(p.numel() for p in plain.parameters())
            assert (n < n_full) if w < 1.0 else (n == n_full)


def test_token_mixing_conv1d_stays_whole():
    model, x = _token_mixer()
    slim.convert(model, SPEC, example_input=x)
    assert isinstance(model.mix, SlimConv1d) and model.mix.fixed_out
    with torch.no_grad(), slim.width(0.25):
        t = model.patch(x).flatten(2).transpose(1, 2)
        assert t.shape[-1] < 32 and model.mix(t).shape == (2, 4, t.shape[-1])


def test_eca_conv_along_channels_is_refused():
    """A k=3 conv along the channels reads neighbours a narrower input no longer has: a typed refusal naming it."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3), Eca(), nn.Conv2d(32, 4, 1))
    with pytest.raises(NotExactError, match="1.conv"):
        slim.convert(model, SPEC, example_input=torch.randn(1, 3, 8, 8))


# ---- Conv3d / BatchNorm3d (video models) -------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(stride=(1, 2, 2), padding=1), dict(dilation=2, padding=2, bias=False)])
@pytest.mark.parametrize("w", [0.25, 0.5])
def test_conv3d_and_bn3d_equal_the_stock_layers_of_that_width(kw, w, mad):
    """Conv3d(3->32) -> BatchNorm3d -> ReLU -> Conv3d(32->24) -> Conv3d(24->4): at a width every layer equals the
    stock ``nn.Conv3d`` / ``nn.BatchNorm3d`` holding the active channels' weights and statistics."""
    x = torch.randn(2, 3, 5, 9, 9)
    net = nn.Sequential(nn.Conv3d(3, 32, 3, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
                        nn.Conv3d(32, 24, 3, **kw), nn.Conv3d(24, 4, 1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 1.5)
    model = slim.convert(net, slim.WidthSpec.range(0.25, 1.0), bn="naive", example_input=x).eval()
    ref = copy.deepcopy(model)
    assert isinstance(model[0], SlimConv3d) and isinstance(model[1], SlimBatchNorm3d)
    with torch.no_grad(), slim.width(w):
        h = model[2](model[1](model[0](x)))
        y = model[3](h)
    c0, c1 = h.shape[1], y.shape[1]
    assert (c0, c1) == (make_divisible(32 * w), make_divisible(24 * w))
    m0, m1, m3 = ref[0], ref[1], ref[3]
    p0 = _plain(nn.Conv3d, m0.weight[:c0], m0.bias[:c0], 3, c0, 3, padding=1)
    bn = nn.BatchNorm3d(c0).eval()
    with torch.no_grad():
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, k).copy_(getattr(m1, k)[:c0])
    kw_ = {k: v for k, v in kw.items() if k != "bias"}
    p3 = _plain(nn.Conv3d, m3.weight[:c1, :c0], None if m3.bias is None else m3.bias[:c1], c0, c1, 3, **kw_)
    with torch.no_grad():
        assert mad(p3(torch.relu(bn(p0(x)))), y) < 1e-5
        exported = slim.export(model, w)
        assert type(exported[0]) is nn.Conv3d and type(exported[1]) is nn.BatchNorm3d
        fused = slim.export(model, w, fuse_bn=True)  # the BN folded into the Conv3d before it (US-Nets Eq. 7)
        assert type(fused[0]) is nn.Conv3d and not any(isinstance(m, nn.BatchNorm3d) for m in fused.modules())
        with slim.width(w):
            assert mad(exported(x), model(x)) == 0
            assert mad(fused(x), model(x)) < 1e-5


def test_torchvision_video_resnets_convert_calibrate_and_export(mad):
    """torchvision's R(2+1)D (Conv3d + BatchNorm3d, the (2+1)D factorised convs) converts on a short clip, is the
    original at width 1.0, and its export at each calibrated width equals the dynamic model."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.video.r2plus1d_18(num_classes=5).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = net(x)
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=x)
    slim.calibrate_bn(net, [torch.randn(2, 3, 4, 32, 32) for _ in range(2)], widths=[0.25, 0.5])
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), ref)
        for w in (0.25, 0.5):
            with slim.width(w):
                y = net(x)
            p = slim.export(net, w).eval()
            assert not any(type(m).__module__.startswith("slim_plugins") for m in p.modules())
            assert mad(p(x), y) < 1e-5
            assert sum(t.numel() for t in p.parameters()) < sum(t.numel() for t in net.parameters()) / 2


def test_analysis_hands_wrapped_functions_mutable_lists(mad):
    """A ``torch.fx.wrap``-ed function that fills its list argument in place (torchvision's video Swin does) ran on
    fx's immutable lists in the analysis forward and failed with ``ExampleInputError`` although the model runs;
    the analysis now hands it a plain list, so the model converts. The list the call returned is passed on as that
    list: the later ``append`` to it reaches its reader."""
    net = _ListFiller()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = net(x)
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=x)
    with torch.no_grad():
        assert torch.equal(net(x), ref)
        with slim.width(0.5):
            y = net(x)
        assert y.shape == ref.shape
        assert mad(slim.export(net, 0.5)(x), y) == 0


def _fill_sizes(sizes: list, x):
    for i in range(len(sizes)):  # fills its argument in place, as torchvision's _get_window_and_shift_size does
        sizes[i] = min(sizes[i], x.shape[2 + i])
    return sizes


torch.fx.wrap("_fill_sizes")


class _ListFiller(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        k = _fill_sizes([4, 4], x)
        k.append(1)  # (the stride: an IndexError below if the analysis appended to a copy)
        return self.b(nn.functional.avg_pool2d(self.a(x), k[0], stride=k[2], padding=k[0] // 2))
