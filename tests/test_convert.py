"""convert(): in-place module replacement, width 1.0 == original, fixed layers, channel groups (torch.fx)."""
from __future__ import annotations

import copy
import io
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slim_plugins as slim
from slim_plugins.nn import SlimBatchNorm2d, SlimConv2d, SlimLinear
from slim_plugins.context import find_state

SPECS = {
    "switchable": slim.WidthSpec.switches([0.25, 0.5, 1.0]),
    "switchable_shared": slim.WidthSpec.switches([0.25, 0.5, 1.0]),
    "us": slim.WidthSpec.range(0.25, 1.0),
    "naive": slim.WidthSpec.range(0.25, 1.0),
    "frozen": slim.WidthSpec.range(0.25, 1.0),
}


@pytest.mark.parametrize("bn", list(SPECS))
def test_width_one_equals_original(bn, make_tiny_cnn, mad):
    net = make_tiny_cnn()
    with torch.no_grad():  # non-trivial BN statistics so a wrong statistic choice shows
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    orig = copy.deepcopy(net).eval()
    model = slim.convert(net, SPECS[bn], bn=bn)
    assert model is net  # in place
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert mad(model(x), orig(x)) <= 1e-5
        with slim.width(1.0):
            assert mad(model(x), orig(x)) <= 1e-5
    # train mode too (batch statistics), and the stock state_dict loads into the converted model
    model2 = slim.convert(copy.deepcopy(orig), SPECS[bn], bn=bn)
    model2.load_state_dict(orig.state_dict())
    if bn != "frozen":
        model2.train()
        orig.train()
        assert mad(model2(x), orig(x)) <= 1e-5


def test_modules_replaced_and_parameters_shared(make_tiny_cnn):
    net = make_tiny_cnn()
    w_before = net.conv2.weight
    model = slim.convert(net, slim.WidthSpec.range(0.25, 1.0))
    assert isinstance(model.conv2, SlimConv2d) and isinstance(model.fc, SlimLinear)
    assert isinstance(model.bn2, SlimBatchNorm2d)
    assert model.conv2.weight is w_before  # no copy: optimizers built before convert still work
    assert model.fc.fixed_out and not model.conv2.fixed_out  # last layer auto-fixed (classes)
    assert [n for n, _ in slim.slim_layers(model)] == ["conv1", "bn1", "conv2", "bn2", "dw", "bn3", "pw", "bn4", "fc"]
    assert slim.get_width(model) == 1.0


def test_fixed_layers_keep_channels(make_tiny_cnn):
    # conv2 and pw meet in a residual add: a fixed layer's whole channel group must be fixed with it
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0), fixed=["conv2", "p?"])
    assert model.conv2.fixed_out and model.pw.fixed_out and not model.conv1.fixed_out
    x = torch.randn(2, 3, 16, 16)
    seen = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.shape[1]))
             for n in ("conv1", "conv2", "pw")]
    model.eval()
    with torch.no_grad(), slim.width(0.25):
        slim.calibrate_bn(model, [x], widths=[0.25])
        model(x)
    for h in hooks:
        h.remove()
    assert seen == {"conv1": 8, "conv2": 32, "pw": 32}


def test_converted_model_pickles_and_deepcopies(make_tiny_cnn, mad):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0)).eval()
    x = torch.randn(2, 3, 16, 16)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    cp = copy.deepcopy(model)
    with torch.no_grad(), slim.width(1.0):
        assert mad(loaded(x), model(x)) == 0 and mad(cp(x), model(x)) == 0
    slim.set_width(cp, 0.25)  # copies carry their own state
    assert slim.get_width(model) == 1.0


def test_channel_groups_tie_residual_adds(make_tiny_cnn):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    groups = slim.channel_groups(model)
    # conv2's output is added to pw's output: one ratio for both. fc (fixed) is excluded.
    assert groups["conv2"] == ["conv2", "pw"]
    assert groups["conv1"] == ["conv1"]
    assert all("fc" not in v for v in groups.values())


def test_nonuniform_width_on_tiny_cnn(make_tiny_cnn, mad):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    x = torch.randn(4, 3, 16, 16)
    w = {"conv1": 0.25, "conv2": 0.5}
    slim.set_width(model, w)
    assert slim.get_width(model) == w
    model.eval()
    slim.calibrate_bn(model, [x], widths=[w])
    with torch.no_grad():
        y = model(x)
    plain = slim.export(model, w, example_input=x[:1])
    assert plain.conv1.out_channels == 8 and plain.conv2.out_channels == 16 and plain.pw.out_channels == 16
    assert plain.conv2.in_channels == 8
    with torch.no_grad():
        assert mad(plain(x), y) <= 1e-5


def test_untraceable_net_with_declared_groups(make_untraceable_net, mad):
    model = slim.convert(make_untraceable_net(), slim.WidthSpec.range(0.25, 1.0),
                         groups={"trunk": ["stem", "block.conv"]})  # tied by the residual add in block
    assert slim.channel_groups(model) == {"trunk": ["stem", "block.conv"]}
    w = {"trunk": 0.5}
    slim.set_width(model, w)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    slim.calibrate_bn(model, [x], widths=[w])
    with torch.no_grad():
        y = model(x)
    plain = slim.export(model, w, example_input=x[:1])
    assert plain.stem.out_channels == 8 and plain.block.conv.out_channels == 8
    with torch.no_grad():
        assert mad(plain(x), y) <= 1e-5


# ---- a classifier replaced after convert (fine-tuning) --------------------------------------------------------
def _resnet18_with_stats():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # trained-looking statistics, so a wrong one shows
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


def test_new_classifier_after_convert_is_adopted(mad):
    """torchvision's fine-tuning line ``model.fc = nn.Linear(model.fc.in_features, n)`` (timm:
    ``reset_classifier(n)``) on a converted model: the new head is converted in its place at the next forward or
    verb, so every width runs (it failed at any width below 1.0 with a shape error) and width 1.0 is the plain
    model with that head; its parameters are the ones the user made (an optimizer built on them trains them)."""
    net = _resnet18_with_stats()
    x = torch.randn(2, 3, 32, 32)
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=x)
    slim.calibrate_bn(net, [torch.randn(8, 3, 32, 32)], widths=[0.25, 0.5])
    torch.manual_seed(1)
    net.fc = head = nn.Linear(net.fc.in_features, 7)
    exported = slim.export(net, 0.25)  # a verb before any forward plans with the new head
    assert exported.fc.out_features == 7 and not exported._forward_pre_hooks
    plain = copy.deepcopy(_resnet18_with_stats())
    plain.fc = copy.deepcopy(head)
    with torch.no_grad():
        with slim.width(1.0):
            assert mad(net(x), plain(x)) == 0
        with slim.width(0.25):
            assert mad(exported(x), net(x)) <= 1e-5
        with slim.width(0.5):
            y = net(x)
        assert mad(slim.export(net, 0.5)(x), y) <= 1e-5
    assert isinstance(net.fc, SlimLinear) and net.fc.weight is head.weight and y.shape == (2, 7)


def test_replaced_classifier_that_cannot_be_adopted_is_refused():
    """A new ``Linear`` that does not take the layer's input is a typed error at the forward and at the verbs, the
    model unchanged."""
    net = _resnet18_with_stats()
    x = torch.randn(2, 3, 32, 32)
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=x)
    state = net._slim_state
    layers = list(state.layers)
    net.fc = replacement = nn.Linear(net.fc.in_features // 2, 7)
    for call in (lambda: net(x), lambda: slim.export(net, 1.0)):
        with pytest.raises(slim.UnsupportedModuleError, match=r"does not take the input of \(10, 512\)"):
            call()
    assert net.fc is replacement and state.layers == layers


def test_head_replaced_by_another_kind_of_module_runs_as_the_users_own(mad):
    """``model.fc = nn.Identity()`` (timm: ``reset_classifier(0)``) makes a feature extractor: the module is left
    as it is (not adopted, not refused), so width 1.0 gives the plain model's features and a narrow width the
    active ones."""
    net = _resnet18_with_stats()
    x = torch.randn(2, 3, 32, 32)
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=x)
    slim.calibrate_bn(net, [torch.randn(8, 3, 32, 32)], widths=[0.5])
    net.fc = nn.Identity()
    plain = _resnet18_with_stats()
    plain.fc = nn.Identity()
    with torch.no_grad():
        with slim.width(1.0):
            assert mad(net(x), plain(x)) == 0
        with slim.width(0.5):
            assert net(x).shape == (2, 256)
    assert type(net.fc) is nn.Identity


def test_timm_reset_classifier_on_a_converted_convnext(mad):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("convnext_atto", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=x)
    net.reset_classifier(5)
    with torch.no_grad(), slim.width(0.25):
        y = net(x)
    assert y.shape == (2, 5)
    with torch.no_grad():
        assert mad(slim.export(net, 0.25)(x), y) <= 1e-5


@pytest.mark.parametrize("name,kw", [("vit_tiny_patch16_224", dict(img_size=32, patch_size=8)), ("resnet18", {}),
                                     ("convnext_atto", {})])
def test_timm_forward_features_and_forward_head_run_at_the_width(name, kw, mad):
    """timm's own feature API (``forward_features``, ``forward_head``, ``forward_intermediates``), called without
    ``model(x)``: ViT's class token and position embedding (tied parameters) were read whole there (a shape error
    at every width below 1.0), and a head put in by ``reset_classifier`` was adopted only by ``model(x)``."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=x)
    slim.calibrate_bn(net, [x], widths=[0.5], num_samples=2)
    net.eval().reset_classifier(5)
    with torch.no_grad(), slim.width(0.5):
        feats = net.forward_features(x)  # before any net(x): the new head is not adopted yet
        y = net.forward_head(feats)
        last = net.forward_intermediates(x, intermediates_only=True)[-1]
        assert y.shape == (2, 5)
        assert mad(net(x), y) == 0
    with torch.no_grad():
        plain = slim.export(net, 0.5)
        assert mad(plain.forward_head(plain.forward_features(x)), y) <= 1e-5
        assert mad(plain.forward_intermediates(x, intermediates_only=True)[-1], last) <= 1e-5
    assert net.cls_token.shape[-1] == 192 if name.startswith("vit") else True  # whole outside a forward


def test_torchvision_detector_converts_its_backbone_by_scope(mad):
    """A torchvision detector does not trace whole (its transform branches on the images); the refusal names
    ``scope``, and ``scope='backbone'`` slims the backbone + FPN exactly with the FPN outputs whole, so the RPN and
    box heads run unchanged at every width."""
    pytest.importorskip("torchvision")
    from torchvision.models import detection

    from slim_plugins.errors import ChannelGroupError

    torch.manual_seed(0)
    net = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5,
                                                         box_score_thresh=0.0).eval()
    images = [torch.rand(3, 160, 160)]
    with pytest.raises(ChannelGroupError, match=r"failed inside layer 'transform'.*scope=\[\.\.\.\]"):
        slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=(images,))
    assert not any(type(m).__module__.startswith("slim_plugins") for m in net.modules())
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        ref = net(images)[0]
    by_model_input = copy.deepcopy(net)
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), scope="backbone", example_input={"backbone": x})
    slim.calibrate_bn(net.backbone, [x], widths=[0.5], num_samples=2)
    net.eval()
    with torch.no_grad():
        full = net(images)[0]
        assert len(full["boxes"]) > 0 and mad(full["boxes"], ref["boxes"]) == 0
        with slim.width(0.5):
            feats, out = net.backbone(x), net(images)[0]
        plain = slim.export(net, 0.5, example_input=x)
        assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in net.parameters())
        for k, f in plain.backbone(x).items():
            assert f.shape[1] == net.backbone.out_channels and mad(f, feats[k]) <= 1e-5
        assert mad(plain(images)[0]["boxes"], out["boxes"]) <= 1e-3
    # the detector's own input (a list of images) with scope: the backbone is analysed on what it receives from
    # the transform (was: ExampleInputError, the list handed to the backbone); the same plan as from its input
    slim.convert(by_model_input, slim.WidthSpec.range(0.25, 1.0), scope="backbone", example_input=(images,))
    slim.calibrate_bn(by_model_input.backbone, [x], widths=[0.5], num_samples=2)
    by_model_input.eval()
    assert _chans(by_model_input, 0.5) == _chans(net, 0.5)
    with torch.no_grad():
        assert mad(by_model_input(images)[0]["boxes"], ref["boxes"]) == 0
        with slim.width(0.5):
            out = by_model_input(images)[0]
        plain = slim.export(by_model_input, 0.5, example_input=(images,))  # a tuple: positional inputs, as convert
        assert mad(plain(images)[0]["boxes"], out["boxes"]) <= 1e-3


def _chans(model, w) -> dict:
    return {k: [None if t is None else t.tolist() for t in v] for k, v in slim.active_channels(model, w).items()}


def test_scope_part_feeding_unconverted_modules_keeps_its_outputs_whole(mad):
    """torchvision's SSDLite: its backbone's feature maps come out of conv -> BN -> Hardswish and feed the
    unconverted heads (depthwise convs of the full channel count). Given the detector's own input, convert sees
    that the backbone's outputs leave the scope and keeps them whole (was: the maps slimmed with the backbone and
    an untyped RuntimeError in the head, 'expected input[2, 168, 20, 20] to have 672 channels'). The backbone
    still slims inside: the export is smaller and equal to the dynamic model at 0.5."""
    pytest.importorskip("torchvision")
    from torchvision.models import detection

    torch.manual_seed(0)
    net = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    images = [torch.rand(3, 160, 192), torch.rand(3, 192, 160)]
    with torch.no_grad():
        ref = net(images)
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), scope="backbone", example_input=(images,))
    slim.calibrate_bn(net, [(images,)], widths=[0.25, 0.5])
    net.eval()
    with torch.no_grad():
        assert all(mad(a["boxes"], b["boxes"]) == 0 for a, b in zip(net(images), ref))
        x = torch.rand(1, 3, 320, 320)
        whole = [f.shape[1] for f in net.backbone(x).values()]
        for w in (0.25, 0.5):
            with slim.width(w):
                assert [f.shape[1] for f in net.backbone(x).values()] == whole
                out = net(images)
            if w == 0.5:
                plain = slim.export(net, 0.5, example_input=(images,))
                assert all(mad(a["scores"], b["scores"]) <= 1e-4 for a, b in zip(plain(images), out))
    assert sum(p.numel() for p in plain.parameters()) < 0.6 * sum(p.numel() for p in net.parameters())


class _CountingDetector(nn.Module):
    """A model whose forward takes a list of images, batches them in Python and counts its calls in an attribute."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Conv2d(16, 4, 1)
        self.calls = 0

    def forward(self, images):
        if torch.is_tensor(images):
            raise TypeError("a list of images")
        self.calls += 1
        x = torch.stack([F.interpolate(i[None], size=(24, 24))[0] for i in images])
        return self.head(self.backbone(x))


class _TwoLevelBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())

    def forward(self, x):
        f1 = self.stem(x)
        return f1, self.stage(f1)


class _LateralDetector(nn.Module):
    """A backbone's two maps (each after BN + ReLU) read by converted lateral convs, then an unconverted head."""

    def __init__(self):
        super().__init__()
        self.backbone = _TwoLevelBackbone()
        self.lateral = nn.ModuleList([nn.Conv2d(16, 8, 1), nn.Conv2d(32, 8, 1)])
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        f1, f2 = self.backbone(x)
        return self.head(self.lateral[0](f1)) + self.head(F.interpolate(self.lateral[1](f2), scale_factor=2.0))


def test_scope_parts_get_their_inputs_from_a_forward_of_the_model(mad):
    """``example_input`` for the whole model with ``scope``: each part is analysed on the inputs it receives in one
    forward, which leaves the model as it was (attributes, BN statistics, mode); an input the model does not run on
    is the part's own, as before."""
    torch.manual_seed(0)
    net = _CountingDetector().train()
    images = [torch.rand(3, 20, 30), torch.rand(3, 28, 28)]
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), scope="backbone", example_input=(images,))
    assert net.calls == 0 and net.training and all(m.training for m in net.modules())
    assert find_state(net).graphs and type(net.head) is nn.Conv2d  # traced: the backbone's plan
    net2 = slim.convert(_CountingDetector(), slim.WidthSpec.range(0.25, 1.0), scope="backbone",
                        example_input=torch.rand(2, 3, 24, 24))  # the backbone's own: the model refuses it
    assert _chans(net2, 0.5) == _chans(net, 0.5)
    # the backbone's maps are taken by converted lateral convs (a scope entry that is a ModuleList of layers):
    # they slim, as when the backbone's own input is given, while the lateral convs (fixed) feed the head whole
    x = torch.rand(2, 3, 24, 24)
    plans = []
    for example in (x, {"backbone": x}):
        torch.manual_seed(0)
        lat = slim.convert(_LateralDetector(), slim.WidthSpec.range(0.25, 1.0), scope=["backbone", "lateral"],
                           fixed=["lateral.*"], example_input=example)
        plans.append(_chans(lat, 0.5))
    assert plans[0] == plans[1] and len(plans[0]["backbone.stage.0"][1]) == 16


class _TypeDefaultNeck(nn.Module):
    """mmdet's YOLOV3Neck writes ``def forward(self, feats=Tuple[Tensor])``: a type as the default, which fx
    refused to store as the placeholder's default (``NotImplementedError: argument of type ...``)."""

    def __init__(self):
        super().__init__()
        self.lat = nn.ModuleList(nn.Conv2d(c, 8, 1) for c in (8, 16))

    def forward(self, feats=Tuple[torch.Tensor]):
        return tuple(conv(f) for conv, f in zip(self.lat, feats))


def test_a_forward_parameter_with_a_type_as_default_traces(mad):
    net = nn.ModuleDict({"backbone": nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), "neck": _TypeDefaultNeck()})
    feats = (torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3))
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0), scope=["neck"], example_input={"neck": (feats,)},
                 fixed=["neck.*"])
    narrow = (feats[0][:, :4], feats[1][:, :8])
    with torch.no_grad(), slim.width(0.5):
        out = net["neck"](narrow)
    assert [o.shape[1] for o in out] == [8, 8]
    with torch.no_grad():
        ref = [F.conv2d(f, conv.weight[:, :f.shape[1]], conv.bias) for conv, f in zip(net["neck"].lat, narrow)]
    assert max(mad(a, b) for a, b in zip(out, ref)) <= 1e-6
