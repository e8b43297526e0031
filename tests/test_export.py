"""export(): fixed-width plain models equal the dynamic model (DESIGN rule 6), timm classes kept, stock timm
checkpoints at timm's own width multipliers, and ONNX run by onnxruntime."""
from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import slim_plugins as slim
from slim_plugins.integrations.timm import SlimBatchNormAct2d  # also registers the s_/us_ models


def _assert_plain(model):
    """No slim_plugins class or state anywhere inside an exported model."""
    for name, m in model.named_modules():
        assert not type(m).__module__.startswith("slim_plugins"), (name, type(m))
        assert "_slim_state" not in m.__dict__, name
        assert not hasattr(m, "slim_name"), name


def _tol(ref, fuse):
    """1e-5 absolute without fusion (slicing is exact). Folding BN into conv weights reorders float32 roundings
    through ~50 layers: the float32 dynamic model is itself ~7e-5 away from its float64 value on logits of ~10
    (random weights, randomised BN), so fused float32 exports are held to 5e-5 relative to the output scale, and
    test_fused_export_exact_in_float64 checks the fusion itself to 1e-9."""
    return 5e-5 * max(1.0, ref.abs().max().item()) if fuse else 1e-5


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


@pytest.fixture(scope="module")
def us_mbv2():
    """A calibrated US-MobileNetV2 (timm BatchNormAct2d, ReLU6, depthwise, inverted residuals)."""
    torch.manual_seed(0)
    model = timm.create_model("us_mobilenetv2_100", num_classes=10)
    _randomise_bn(model)
    x = torch.randn(8, 3, 64, 64)
    model.train()
    with torch.no_grad():
        for w in (1.0, 0.35):  # training tracks the max and min width statistics
            with slim.width(w):
                model(x)
    slim.calibrate_bn(model, [torch.randn(8, 3, 64, 64) for _ in range(2)], widths=[0.5, 0.6, 0.75])
    return model.eval()


@pytest.mark.parametrize("w", [0.35, 0.5, 0.6, 0.75, 1.0])
@pytest.mark.parametrize("fuse", [False, True])
def test_mbv2_export_equals_dynamic(us_mbv2, w, fuse, mad):
    x = torch.randn(2, 3, 64, 64)
    before = copy.deepcopy(us_mbv2.state_dict())
    plain = slim.export(us_mbv2, w, fuse_bn=fuse)
    _assert_plain(plain)
    assert not plain.training
    with torch.no_grad(), slim.width(w):
        ref = us_mbv2(x)
        assert mad(plain(x), ref) <= _tol(ref, fuse)
    bnacts = [m for m in plain.modules() if isinstance(m, BatchNormAct2d)]
    if fuse:
        assert not bnacts and not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
        # the activation of each fused BatchNormAct2d survives
        assert sum(isinstance(m, nn.ReLU6) for m in plain.modules()) == sum(
            isinstance(m, nn.ReLU6) for m in us_mbv2.modules())
    else:  # timm's class stays timm's class
        assert len(bnacts) == sum(isinstance(m, SlimBatchNormAct2d) for m in us_mbv2.modules()) > 30
        assert type(plain.bn1) is BatchNormAct2d and isinstance(plain.bn1.act, nn.ReLU6)
    # the source model is untouched and still slimmable
    after = us_mbv2.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if torch.is_tensor(v))
    assert not us_mbv2.training and slim.get_width(us_mbv2) == 1.0


def test_fused_export_exact_in_float64(us_mbv2, mad):
    m64 = copy.deepcopy(us_mbv2).double()  # float64 convs are slow on CPU: one small input
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for w in (0.6,):
        plain = slim.export(m64, w, fuse_bn=True, example_input=x[:1])
        assert plain.conv_stem.weight.dtype == torch.float64
        with torch.no_grad(), slim.width(w):
            assert mad(plain(x), m64(x)) <= 1e-9


@pytest.mark.parametrize("w, stock_name", [(0.35, "mobilenetv2_035"), (0.5, "mobilenetv2_050"),
                                           (0.75, "mobilenetv2_075"), (1.0, "mobilenetv2_100")])
def test_mbv2_export_loads_into_stock_timm_width(us_mbv2, w, stock_name, mad):
    """timm builds MobileNetV2 at multiplier m with make_divisible(32 m) stem, make_divisible(c m) block outputs,
    6x the *rounded* block input for the expansion, and max(1280, .) head: the exported model has exactly those
    shapes (the adapter rounds the expansion conv in units of 6, as the official US-MobileNetV2 does)."""
    plain = slim.export(us_mbv2, w)
    stock = timm.create_model(stock_name, num_classes=10)
    sd = plain.state_dict()
    stock_sd = stock.state_dict()
    assert sd.keys() == stock_sd.keys()
    wrong = {k: (tuple(sd[k].shape), tuple(v.shape)) for k, v in stock_sd.items() if sd[k].shape != v.shape}
    assert not wrong, wrong
    stock.load_state_dict(sd)  # strict
    stock.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), slim.width(w):
        assert mad(stock(x), us_mbv2(x)) <= 1e-5


@pytest.mark.parametrize("fuse", [False, True])
def test_mbv1_export_at_several_widths(fuse, warm, mad):
    model = timm.create_model("us_mobilenetv1_100", num_classes=7)
    _randomise_bn(model)
    x = torch.randn(6, 3, 64, 64)
    warm(model, x, [1.0, 0.25])
    slim.calibrate_bn(model, [x], widths=[0.5, 0.6, 0.75])
    model.eval()
    for w in (0.25, 0.5, 0.6, 0.75):
        plain = slim.export(model, w, fuse_bn=fuse)
        _assert_plain(plain)
        with torch.no_grad(), slim.width(w):
            ref = model(x[:2])
            assert mad(plain(x[:2]), ref) <= _tol(ref, fuse)
        convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
        assert convs[0].out_channels == slim.make_divisible(32 * w)


def test_snet_export_uses_private_bn(make_tiny_cnn, mad):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.switches([0.25, 0.5, 1.0]))
    x = torch.randn(6, 3, 16, 16)
    slim.calibrate_bn(model, [x])
    model.eval()
    for w in (0.25, 0.5, 1.0):
        for fuse in (False, True):
            plain = slim.export(model, w, fuse_bn=fuse, example_input=x[:1])
            _assert_plain(plain)
            with torch.no_grad(), slim.width(w):
                ref = model(x)
                assert mad(plain(x), ref) <= _tol(ref, fuse)
    plain = slim.export(model, 0.5)
    assert torch.equal(plain.bn2.running_mean, model.bn2.running_mean[1, :16])


def test_output_averaging_folded_into_export(make_tiny_cnn, warm, mad):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0), output_averaging=True)
    x = torch.randn(6, 3, 16, 16)
    warm(model, x, [1.0, 0.25])
    slim.calibrate_bn(model, [x], widths=[0.5])
    model.eval()
    for w in (0.25, 0.5):
        for fuse in (False, True):
            plain = slim.export(model, w, fuse_bn=fuse, example_input=x[:1])
            _assert_plain(plain)
            with torch.no_grad(), slim.width(w):
                assert mad(plain(x), model(x)) <= 1e-5
    # the scale C_in_full / C_in_active sits in the exported weights: 16 / 8 for conv2 at 0.25
    plain = slim.export(model, 0.25, example_input=x[:1])
    assert torch.allclose(plain.conv2.weight, model.conv2.weight[:8, :8] * (16 / 8))


def test_snet_with_switch_above_one(make_tiny_cnn, mad):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.switches([0.5, 1.0, 1.5]))
    assert model.bn2.running_mean.shape == (3, 48)
    x = torch.randn(6, 3, 16, 16)
    slim.calibrate_bn(model, [x])
    model.eval()
    for w in (0.5, 1.0, 1.5):
        for fuse in (False, True):
            plain = slim.export(model, w, fuse_bn=fuse, example_input=x[:1])
            with torch.no_grad(), slim.width(w):
                assert mad(plain(x), model(x)) <= 1e-5
    assert slim.export(model, 1.5, example_input=x[:1]).conv2.out_channels == 48


class _PreActNet(nn.Module):
    """CIFAR PreAct-ResNet shape: the stem conv's output feeds a BN *and* the identity shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv(torch.relu(self.bn(x)))
        y = torch.relu(self.bn2(y))
        return self.fc((x + y).mean((2, 3)))


def test_fusion_skips_bn_whose_conv_output_is_used_elsewhere(mad):
    model = slim.convert(_PreActNet(), slim.WidthSpec.range(0.25, 1.0), bn="naive")
    _randomise_bn(model)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn2.running_mean.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    for w in (1.0, 0.5):
        plain = slim.export(model, w, fuse_bn=True, example_input=x[:1])
        assert isinstance(plain.bn, nn.BatchNorm2d)  # folding it would change what the shortcut adds
        assert isinstance(plain.bn2, nn.Identity)  # conv -> bn2 alone: folded
        with torch.no_grad(), slim.width(w):
            assert mad(plain(x), model(x)) <= 1e-5


def test_resnet_fused_export(mad, warm):
    model = slim.convert(timm.create_model("resnet18", num_classes=10), slim.WidthSpec.range(0.25, 1.0))
    _randomise_bn(model)
    x = torch.randn(4, 3, 64, 64)
    warm(model, x, [1.0, 0.25])
    slim.calibrate_bn(model, [x], widths=[0.6])
    model.eval()
    for w in (0.25, 0.6):
        plain = slim.export(model, w, fuse_bn=True)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
        assert type(plain).__name__ == "ResNet"
        with torch.no_grad(), slim.width(w):
            ref = model(x)
            assert mad(plain(x), ref) <= _tol(ref, True)


def test_export_rejects_bad_and_uncalibrated_widths(us_mbv2):
    with pytest.raises(slim.WidthError, match=r"0\.2 .*\[0\.35, 1\.0\]"):
        slim.export(us_mbv2, 0.2)
    with pytest.raises(slim.UncalibratedWidthError, match="0.45"):
        slim.export(us_mbv2, 0.45)


def test_onnx_refuses_a_slimmable_model(us_mbv2, tmp_path):
    """``export_onnx`` of the converted model (not its export) is refused before anything is written; it traced
    the default width with the width machinery in the graph."""
    was = us_mbv2.training
    us_mbv2.train()
    with pytest.raises(slim.InvalidArgumentError, match="slim.export"):
        slim.export_onnx(us_mbv2, torch.randn(1, 3, 64, 64), str(tmp_path / "m.onnx"))
    assert list(tmp_path.iterdir()) == [] and us_mbv2.training  # no file, the model's mode untouched
    us_mbv2.train(was)


@pytest.mark.parametrize("fuse", [False, True])
def test_onnx_equals_eager(us_mbv2, tmp_path, fuse):
    plain = slim.export(us_mbv2, 0.5, fuse_bn=fuse)
    x = torch.randn(1, 3, 64, 64)
    path = slim.export_onnx(plain, x, str(tmp_path / "sub" / "mbv2_050.onnx"))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["mbv2_050.onnx"]  # no temp file left
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    xb = torch.randn(3, 3, 64, 64)  # dynamic batch axis
    got = sess.run(None, {"input": xb.numpy()})[0]
    with torch.no_grad():
        want = plain(xb).numpy()
    assert got.shape == (3, 10)
    # 1e-4 on logits up to 10; onnxruntime's float32 kernels round differently, so larger logits scale the bound
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max() / 10)
