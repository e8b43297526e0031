"""The timm adapter: stock timm checkpoints load, width 1.0 equals the stock model, nonuniform widths on ResNet-50
with torch.fx channel groups, and the registered s_/us_ models."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame

import slim_plugins as slim
from slim_plugins.integrations.timm import PAPER_RANGES, PAPER_SWITCHES, create_slim_model


@pytest.fixture(scope="module")
def stock_resnet50():
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=10)
    with torch.no_grad():  # trained-looking BN statistics, so a wrong statistic would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def us_resnet50(stock_resnet50):
    model = timm.create_model("us_resnet50", num_classes=10)
    model.load_state_dict(stock_resnet50.state_dict())  # a stock timm checkpoint loads (strict)
    return model.eval()


def _stock_and_slim(name, kind, **kw):
    torch.manual_seed(1)
    stock = timm.create_model(name, num_classes=10, **kw)
    with torch.no_grad():
        for m in stock.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    model = timm.create_model(f"{kind}_{name}", num_classes=10, **kw)
    model.load_state_dict(stock.state_dict())
    return stock.eval(), model.eval()


@pytest.mark.parametrize("kind", ["s", "us"])
@pytest.mark.parametrize("name", ["mobilenetv1_100", "mobilenetv2_100"])
def test_width_one_equals_stock_mobilenets(name, kind, mad):
    stock, model = _stock_and_slim(name, kind)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = stock(x)
        assert mad(model(x), ref) <= 1e-5
        with slim.width(1.0):
            assert mad(model(x), ref) <= 1e-5
    spec = slim.context.find_state(model).spec
    assert spec == (slim.WidthSpec.switches(PAPER_SWITCHES[name]) if kind == "s"
                    else slim.WidthSpec.range(*PAPER_RANGES[name]))


def test_width_one_equals_stock_resnet50(stock_resnet50, us_resnet50, mad):
    x = torch.randn(1, 3, 64, 64)
    s_model = timm.create_model("s_resnet50", num_classes=10)
    s_model.load_state_dict(stock_resnet50.state_dict())
    s_model.eval()
    assert s_model.layer1[0].bn1.running_mean.shape == (4, 64)  # private BN per switch, broadcast from stock
    with torch.no_grad():
        ref = stock_resnet50(x)
        assert mad(us_resnet50(x), ref) <= 1e-5
        assert mad(s_model(x), ref) <= 1e-5


def test_resnet50_channel_groups_tie_residual_adds(us_resnet50):
    groups = slim.channel_groups(us_resnet50)
    owner = {layer: g for g, layers in groups.items() for layer in layers}
    g1 = owner["layer1.0.conv3"]
    assert set(groups[g1]) == {"layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3"}
    for stage, blocks in (("layer2", 4), ("layer3", 6), ("layer4", 3)):
        g = owner[f"{stage}.0.conv3"]
        assert set(groups[g]) == {f"{stage}.0.downsample.0"} | {f"{stage}.{i}.conv3" for i in range(blocks)}
    assert owner["layer1.0.conv1"] == "layer1.0.conv1" and len(groups["layer1.0.conv1"]) == 1
    assert owner["conv1"] == "conv1" and groups["conv1"] == ["conv1"]  # max-pool, then a projection shortcut
    assert "fc" not in owner  # fixed output layer
    assert owner["layer2.0.conv3"] != g1  # stages are separate groups


def test_resnet50_nonuniform_width_calibrate_export(us_resnet50, mad):
    model = copy.deepcopy(us_resnet50)
    w = {"layer1.0.conv3": 0.5, "layer2.1.conv1": 0.25, "layer3.0.downsample.0": 0.75, "*": 0.6}
    slim.set_width(model, w)  # a layer name selects its whole group
    x = torch.randn(4, 3, 64, 64)
    slim.calibrate_bn(model, [x], widths=[w])
    with torch.no_grad():
        y = model(x)
    plain = slim.export(model, w)
    c = slim.make_divisible
    assert plain.layer1[0].conv3.out_channels == plain.layer1[2].conv3.out_channels == c(256 * 0.5) == 128
    assert plain.layer1[0].downsample[0].out_channels == 128
    assert plain.layer2[1].conv1.out_channels == c(128 * 0.25)
    assert plain.layer3[5].conv3.out_channels == c(1024 * 0.75)
    assert plain.layer2[0].conv3.out_channels == c(512 * 0.6)  # "*" for the other groups
    assert plain.fc.in_features == c(2048 * 0.6) and plain.fc.out_features == 10
    with torch.no_grad():
        assert mad(plain(x), y) <= 1e-5
        with slim.width(0.6):  # the uniform width is a different configuration with its own statistics
            with pytest.raises(slim.UncalibratedWidthError):
                model(x)


def test_registered_model_kwargs():
    model = timm.create_model("us_mobilenetv2_100", num_classes=10, cifar_stem=True, width_range=[0.5, 1.0])
    assert slim.context.find_state(model).spec == slim.WidthSpec.range(0.5, 1.0)
    assert model.conv_stem.stride == (1, 1)
    assert model.conv_head.fixed_out  # the 1280 head stays 1280, as timm's own multiplier does
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad(), slim.width(0.5):
        model(x)
    model.eval()
    feats = {}
    h = model.conv_head.register_forward_hook(lambda m, a, o: feats.update(head=o.shape))
    with torch.no_grad(), slim.width(0.5):
        assert model(x).shape == (4, 10)
    h.remove()
    assert feats["head"] == (4, 1280, 2, 2)  # stride-1 stem: 32 -> 2 after the four stride-2 stages
    s_model = timm.create_model("s_mobilenetv1_100", num_classes=10, widths=[0.5, 1.0])
    state = slim.context.find_state(s_model)
    assert state.spec == slim.WidthSpec.switches([0.5, 1.0]) and state.bn_mode == "switchable"


def test_expansion_units_follow_timm_multiplier():
    model = timm.create_model("us_mobilenetv2_100", num_classes=10)
    blk = model.blocks[1][0]
    assert blk.conv_pw.channel_unit == 6
    a = slim.context.find_state(model).resolve(0.5)
    # timm's mobilenetv2_050: block input make_divisible(16 * 0.5) = 8, expansion 6 * 8 = 48 (not 96 * 0.5 rounded)
    assert blk.conv_pw.active_out(a, 96) == 48
    a75 = slim.context.find_state(model).resolve(0.75)
    assert model.blocks[1][1].conv_pw.active_out(a75, 144) == 6 * slim.make_divisible(24 * 0.75)


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0"])
def test_efficientnet_with_se_runs_and_exports(name, warm, mad):
    """SE gates multiply the expanded channels: the SE conv_expand shares the expansion conv's unit. The tf_
    variant uses timm's Conv2dSame (TF "SAME" padding), which stays a Conv2dSame in the export."""
    model = create_slim_model(name, width_range=[0.25, 1.0], num_classes=10)
    blk = model.blocks[1][0]
    assert blk.conv_pw.channel_unit == blk.se.conv_expand.channel_unit == 6
    x = torch.randn(4, 3, 32, 32)
    warm(model, x, [1.0, 0.25])
    model.eval()
    for fuse in (False, True):
        plain = slim.export(model, 0.25, fuse_bn=fuse, example_input=x[:1])
        with torch.no_grad(), slim.width(0.25):
            assert mad(plain(x), model(x)) <= 1e-5
        if name.startswith("tf_"):
            assert type(plain.conv_stem) is Conv2dSame and type(plain.blocks[1][0].conv_dw) is Conv2dSame


def test_multiwidth_step_on_timm_model():
    model = timm.create_model("us_mobilenetv2_100", num_classes=10, cifar_stem=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = slim.MultiWidthStep(model, num_widths=3, distill="kl")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = model.classifier.weight.detach().clone()
    res = step(lambda: model(x), lambda o: F.cross_entropy(o, y), iteration=0)
    opt.step()
    assert res.widths[0] == 1.0 and res.widths[-1] == 0.35 and len(res.widths) == 3
    assert all(torch.isfinite(torch.tensor(v)) for v in res.losses.values())
    assert not torch.equal(model.classifier.weight, before)


def test_range_above_one_exports_timm_wider_model(warm, mad):
    """hi > 1 widens every layer; at 1.25 the export has timm's own mobilenetv1_125 shapes and loads into it."""
    model = create_slim_model("mobilenetv1_100", width_range=[0.25, 1.25], num_classes=10)
    x = torch.randn(4, 3, 64, 64)
    warm(model, x, [1.25, 0.25])
    model.eval()
    plain = slim.export(model, 1.25)
    stock = timm.create_model("mobilenetv1_125", num_classes=10)
    stock.load_state_dict(plain.state_dict())  # strict: every shape matches
    stock.eval()
    with torch.no_grad(), slim.width(1.25):
        assert mad(stock(x), model(x)) <= 1e-5


def test_mbv2_range_above_one_runs_and_exports(warm, mad):
    """With hi > 1 the expansion convs round per layer (no unit: widened layers are sized one by one), so 1.4x does
    not reproduce timm's mobilenetv2_140 shapes, but the widened net is consistent and exports exactly."""
    model = create_slim_model("mobilenetv2_100", width_range=[0.35, 1.4], num_classes=10)
    assert model.blocks[1][0].conv_pw.channel_unit == 1
    x = torch.randn(4, 3, 32, 32)
    warm(model, x, [1.4, 0.35])
    model.eval()
    for w in (1.4, 0.35):
        plain = slim.export(model, w, example_input=x[:1])
        with torch.no_grad(), slim.width(w):
            assert mad(plain(x), model(x)) <= 1e-5


@pytest.mark.parametrize("name,auto_fix", [("resnet18", True), ("convnext_atto", False)])
def test_stock_features_only_backbone_converts(name, auto_fix, mad):
    """timm's ``features_only=True`` wrapper (``FeatureListNet``, a ``ModuleDict`` with its own forward) is traced
    whole: width 1.0 equals the stock wrapper and a narrow width equals its export. It was split into its children,
    each analysed on the model's input (an ``ExampleInputError`` at ``layer1``). Every feature map follows the
    width: ResNet's stages end in a norm (a headless backbone has no output layers); ConvNeXt's residual stream
    ends in a linear, which is an output layer unless ``auto_fix=False``."""
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    slim.convert(model, slim.WidthSpec.range(0.25, 1.0), example_input=x, auto_fix=auto_fix)
    slim.calibrate_bn(model, [torch.randn(4, 3, 64, 64)], widths=[0.5])
    with torch.no_grad():
        with slim.width(1.0):
            assert max(mad(a, b) for a, b in zip(model(x), ref)) == 0
        with slim.width(0.5):
            y = model(x)
        z = slim.export(model, 0.5).eval()(x)
    assert all(b.shape[1] // 2 <= a.shape[1] < b.shape[1] for a, b in zip(y, ref))  # (make_divisible rounds up)
    assert max(mad(a, b) for a, b in zip(y, z)) <= 1e-5
