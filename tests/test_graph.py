"""Channel analysis (DESIGN rule 1): exact sub-networks through concatenations, splits, shuffles, grouped convs.

Each narrow net is compared with a plain net built by hand from the selected weights, or with the full net whose
layers read only the active channels (``masked_ref``); the papers' S-ShuffleNet is checked for FLOPs, export and
ONNX; timm's DenseNet-121 and GhostNet and torchvision's ShuffleNet v2 run at every width of a range.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slim_plugins as slim


def _bn_eval(model):
    """Random BN statistics and affine parameters, eval mode (so masked references are non-trivial)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
    return model.eval()


class ConcatNet(nn.Module):
    """Two convs concatenated, a BN over the concatenation, a conv reading it (DenseNet-style)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.c = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(self.c(y).mean((2, 3)))


def test_concat_net_equals_hand_built(mad):
    net = _bn_eval(ConcatNet())
    model = slim.convert(net, slim.WidthSpec.range(0.25, 1.0), bn="naive").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        y = model(x)
    a, b, bn, c, fc = model.a, model.b, model.bn, model.c, model.fc
    sel = torch.cat([torch.arange(8), 16 + torch.arange(8)])  # the first 8 channels of each part, not of the cat
    h = torch.cat([F.conv2d(x, a.weight[:8], a.bias[:8], padding=1), F.conv2d(x, b.weight[:8], b.bias[:8], padding=1)], 1)
    h = torch.relu(F.batch_norm(h, bn.running_mean[sel], bn.running_var[sel], bn.weight[sel], bn.bias[sel], False, 0, bn.eps))
    h = F.conv2d(h, c.weight[:16][:, sel], c.bias[:16])
    want = F.linear(h.mean((2, 3)), fc.weight[:, :16], fc.bias)
    assert mad(y, want) <= 1e-5
    ch = slim.active_channels(model, 0.5)
    assert torch.equal(ch["c"][0], sel) and torch.equal(ch["bn"][0], sel)


class SplitShuffleNet(nn.Module):
    """A ShuffleNet v2 unit: chunk in two halves, a branch on the second, concatenate, shuffle of 2 groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.branch = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(32, 6, 1)

    def forward(self, x):
        x1, x2 = torch.relu(self.stem(x)).chunk(2, dim=1)
        y = torch.cat((x1, torch.relu(self.branch(x2))), 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(y)


def test_split_shuffle_net_equals_hand_built(mad):
    model = slim.convert(SplitShuffleNet(), slim.WidthSpec.range(0.25, 1.0)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        y = model(x)
    s, br, hd = model.stem, model.branch, model.head
    sel = torch.cat([torch.arange(8), 16 + torch.arange(8)])  # chunk needs 8 active channels in each half
    h = torch.relu(F.conv2d(x, s.weight[sel], s.bias[sel], padding=1))
    x1, x2 = h[:, :8], h[:, 8:]
    b = torch.relu(F.conv2d(x2, br.weight[:8, :8], br.bias[:8]))
    z = torch.stack((x1, b), 2).flatten(1, 2)  # shuffle of the two halves: x1[0], b[0], x1[1], ...
    want = F.conv2d(z, hd.weight[:, :16], hd.bias)  # interleaved = the first 16 channels of the full shuffle
    assert mad(y, want) <= 1e-5
    # The prefix rule would feed channels 8..15 (first half at full width) to the branch: not a sub-network.
    ch = slim.active_channels(model, 0.5)
    assert torch.equal(ch["stem"][1], sel) and torch.equal(ch["branch"][0], torch.arange(8))


def test_grouped_conv_g3_equals_hand_built(mad):
    c0, g3, out = nn.Conv2d(3, 48, 1), nn.Conv2d(48, 96, 3, padding=1, groups=3), nn.Conv2d(96, 5, 1)
    model = slim.convert(nn.Sequential(c0, nn.ReLU(), g3, nn.ReLU(), out), slim.WidthSpec.range(0.25, 1.0)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        y = model(x)
    s0 = torch.cat([torch.arange(8) + 16 * k for k in range(3)])    # 8 of each input group of 16
    s1 = torch.cat([torch.arange(16) + 32 * k for k in range(3)])   # 16 of each output group of 32
    h = torch.relu(F.conv2d(x, c0.weight[s0], c0.bias[s0]))
    h = torch.relu(F.conv2d(h, g3.weight[s1][:, :8], g3.bias[s1], padding=1, groups=3))
    assert mad(y, F.conv2d(h, out.weight[:, s1], out.bias)) <= 1e-5


def test_group_width_convention(mad):
    """group_mode='width' (RegNet/ResNeXt): the group width stays, the group count scales with the width."""
    c0, gw, out = nn.Conv2d(3, 32, 1), nn.Conv2d(32, 64, 3, padding=1, groups=8), nn.Conv2d(64, 5, 1)
    model = slim.convert(nn.Sequential(c0, gw, out), slim.WidthSpec.range(0.25, 1.0), group_mode="width").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        y = model(x)
    h = F.conv2d(F.conv2d(x, c0.weight[:16], c0.bias[:16]), gw.weight[:32], gw.bias[:32], padding=1, groups=4)
    assert mad(y, F.conv2d(h, out.weight[:, :32], out.bias)) <= 1e-5


def test_untraceable_literal_split_raises_at_convert():
    class LiteralSplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 32, 1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.b(torch.split(self.a(x), 16, dim=1)[1])  # a literal size does not follow the width

    net = LiteralSplit()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(slim.NotExactError, match=r"split.*literal"):
        slim.convert(net, slim.WidthSpec.range(0.25, 1.0))
    assert type(net.a) is nn.Conv2d and type(net.a.weight) is nn.Parameter and not hasattr(net, "_slim_state")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


# ---- the papers' model and the stock models of the issue ---------------------------------------------------
def test_s_shufflenet_flops_equal_the_paper():
    import timm

    import slim_plugins.integrations.timm  # noqa: F401

    model = timm.create_model("s_shufflenet_g3").eval()
    x = torch.randn(1, 3, 224, 224)
    got = {}
    for w in (0.5, 1.0, 2.0):
        with slim.width(w):
            got[w] = slim.count_mflops(model, x)
    # The paper's Table 3 rounds to whole MFLOPs (38 / 138 / 524 M); conv + linear multiply-adds here are
    # 37.6 / 137.5 / 524.0 (the official profiler also counts pooling inputs: +0.2 / +0.4 / +0.8 M).
    paper = {0.5: 38, 1.0: 138, 2.0: 524}
    assert all(abs(got[w] - paper[w]) < 0.6 for w in paper), got
    for w in (0.5, 1.0, 2.0):  # each switch has exactly the channels of the individual ShuffleNet 0.5x/1x/2x
        plain = timm.create_model("shufflenet_v1_g3", width_mult=w)
        assert slim.count_mflops(plain, x) == pytest.approx(got[w])


def test_s_shufflenet_exact_export_and_onnx(tmp_path, mad, masked_ref):
    import onnxruntime as ort
    import timm

    import slim_plugins.integrations.timm  # noqa: F401
    from slim_plugins.integrations.timm.shufflenet import ShuffleNetV1

    model = _bn_eval(timm.create_model("s_shufflenet_g3", num_classes=10, bn="naive"))
    x = torch.randn(2, 3, 64, 64)
    for w in (0.5, 1.0, 2.0):
        with torch.no_grad(), slim.width(w):
            y = model(x)
        assert mad(y, masked_ref(model, w, x)) <= 1e-4
        plain = slim.export(model, w, example_input=x[:1])
        assert type(plain) is ShuffleNetV1 and not any(hasattr(m, "slim_name") for m in plain.modules())
        with torch.no_grad():
            assert mad(plain(x), y) <= 1e-5
    plain = slim.export(model, 0.5, example_input=x[:1])
    path = slim.export_onnx(plain, x[:1], str(tmp_path / "s_shufflenet_050.onnx"))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = plain(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("name", ["densenet121", "ghostnet_100", "shufflenet_v2_x1_0"])
def test_stock_models_run_exactly_at_every_width(name, mad, masked_ref):
    import timm
    import torchvision

    net = torchvision.models.shufflenet_v2_x1_0(num_classes=7) if name.startswith("shufflenet") else \
        timm.create_model(name, num_classes=7)
    model = slim.convert(_bn_eval(net), slim.WidthSpec.range(0.25, 1.0), bn="naive").eval()
    x = torch.randn(2, 3, 32, 32)
    for w in np.round(np.arange(0.25, 1.0001, 0.05), 2):  # every width of the grid runs
        with torch.no_grad(), slim.width(float(w)):
            assert model(x).shape == (2, 7)
    for w in (0.3, 0.55, 0.8):  # and is the full net restricted to its channels
        with torch.no_grad(), slim.width(w):
            y = model(x)
        assert mad(y, masked_ref(model, w, x)) <= 1e-4
        plain = slim.export(model, w, example_input=x[:1])
        with torch.no_grad():
            assert mad(plain(x), y) <= 1e-5


def test_len_of_a_shape_and_a_tuple_of_feature_maps_trace():
    """An FPN-style forward: a tuple of tensors as input (one placeholder each, so len() / indexing trace) and
    len() of a shape known from the example input; the convs reading the inputs follow their channels."""
    import torch.nn.functional as F

    class Neck(nn.Module):
        def __init__(self):
            super().__init__()
            self.lat = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(16, 4, 1)])
            self.extra = nn.Conv2d(16, 4, 3, stride=2, padding=1)  # reads the last input, as RetinaNet's on_input

        def forward(self, inputs):
            assert len(inputs) == len(self.lat)
            outs = [lat(x) for lat, x in zip(self.lat, inputs)]
            size = outs[0].shape[-2:]
            assert len(size) == 2
            outs[0] = outs[0] + F.interpolate(outs[1], size=size)
            return tuple(outs) + (self.extra(inputs[-1]),)

    class Det(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.neck = Neck()

        def forward(self, x):
            a = self.backbone(x)
            return self.neck((a, self.down(a)))

    det = Det().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = det.backbone(x)
        feats = (a, det.down(a))
    slim.convert(det, slim.WidthSpec.switches([0.5, 1.0]), scope=["backbone", "down", "neck"], fixed=["neck.*"],
                 example_input={"backbone": x, "down": a, "neck": (feats,)})
    with torch.no_grad(), slim.width(0.5):
        outs = det(x)
    assert [o.shape[1] for o in outs] == [4, 4, 4]
    plain = slim.export(det, 0.5, example_input=x)
    assert plain.neck.extra.in_channels == 8 and plain.neck.lat[1].in_channels == 8
    with torch.no_grad(), slim.width(0.5):
        assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(plain(x), det(x)))
