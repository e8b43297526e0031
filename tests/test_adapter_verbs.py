"""The extension points the detection, SR and RL adapters build on (DESIGN "How an adapter plugs in"), through
the public API only: scoped conversion, output layers from the graph, frozen / synchronised BN, weight norm,
per-channel modules, the iterator form of MultiWidthStep and its loss rules, calibration verbs, the dispatcher."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slim_plugins as slim


# ---- scoped conversion ---------------------------------------------------------------------------------------
class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())

    def forward(self, x):
        f1 = self.stem(x)
        return f1, self.stage(f1)


class _Neck(nn.Module):
    def __init__(self):
        super().__init__()
        self.lateral_convs = nn.ModuleList([nn.Conv2d(16, 8, 1), nn.Conv2d(32, 8, 1)])


class MiniDetector(nn.Module):
    """backbone -> FPN-style lateral convs -> a shared head (only the first two are slimmable)."""

    def __init__(self):
        super().__init__()
        self.backbone, self.neck, self.head = _Backbone(), _Neck(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        feats = self.backbone(x)
        return [self.head(lat(f)) for lat, f in zip(self.neck.lateral_convs, feats)]


def test_scoped_conversion_one_width_state(mad):
    model = slim.convert(MiniDetector(), slim.WidthSpec.range(0.25, 1.0),
                         scope=["backbone", "neck.lateral_convs"], fixed=["neck.lateral_convs.*"]).eval()
    assert type(model.head) is nn.Conv2d  # outside the scope: untouched
    assert slim.width_spec(model) == slim.WidthSpec.range(0.25, 1.0)
    assert slim.channel_groups(model) == {"backbone.stem.0": ["backbone.stem.0"],
                                          "backbone.stage.0": ["backbone.stage.0"]}  # headless: nothing fixed
    slim.calibrate_bn(model, [torch.randn(4, 3, 16, 16)], widths=[0.5])
    x = torch.randn(2, 3, 16, 16)
    slim.set_width(model, 0.5)  # one default for every converted part
    with torch.no_grad():
        outs = model(x)
        f1, f2 = model.backbone(x)
    assert f1.shape[1] == 8 and f2.shape[1] == 16 and all(o.shape[1] == 4 for o in outs)
    lat = model.neck.lateral_convs[1]
    assert mad(outs[1], model.head(F.conv2d(f2, lat.weight[:, :16], lat.bias))) <= 1e-6
    plain = slim.export(model, 0.5, example_input=x[:1])
    with torch.no_grad():
        assert all(mad(a, b) <= 1e-5 for a, b in zip(plain(x), outs))
    assert plain.neck.lateral_convs[1].in_channels == 16 and type(plain.head) is nn.Conv2d


def test_scope_must_name_a_submodule():
    with pytest.raises(slim.UnknownLayerError, match="scope 'backbon'"):
        slim.convert(MiniDetector(), slim.WidthSpec.range(0.25, 1.0), scope=["backbon"])


# ---- output layers from the graph ----------------------------------------------------------------------------
def test_headless_backbone_fixes_nothing():
    import timm

    model = slim.convert(timm.create_model("resnet18", num_classes=0), slim.WidthSpec.range(0.25, 1.0)).eval()
    slim.calibrate_bn(model, [torch.randn(2, 3, 32, 32)], widths=[0.5])
    with torch.no_grad(), slim.width(0.5):
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 256)  # features slim with the width


class ActorCritic(nn.Module):
    def __init__(self, actions=18):
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 8, 4)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.pi, self.v = nn.Linear(64, actions), nn.Linear(64, 1)

    def forward(self, x):
        h = torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1)))
        return self.pi(h), self.v(h)


def test_every_head_of_a_two_head_model_is_fixed():
    model = slim.convert(ActorCritic(), slim.WidthSpec.range(0.25, 1.0), example_input=torch.zeros(1, 4, 20, 20))
    with torch.no_grad(), slim.width(0.5):
        logits, value = model(torch.randn(2, 4, 20, 20))
    assert logits.shape == (2, 18) and value.shape == (2, 1)
    assert sorted(slim.channel_groups(model)) == ["conv", "fc"]


# ---- BN: frozen, synchronised ---------------------------------------------------------------------------------
def _bn_net(bn=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), bn(16), nn.ReLU(), nn.Conv2d(16, 4, 1))


def test_s_net_checkpoint_loads_into_frozen_form(tmp_path, mad):
    spec = slim.WidthSpec.switches([0.5, 1.0])
    trained = slim.convert(_bn_net(), spec).train()
    for w in (0.5, 1.0):  # per-switch statistics that differ
        with torch.no_grad(), slim.width(w):
            trained(torch.randn(8, 3, 8, 8) * (2 if w == 0.5 else 1) + w)
    path = slim.save_checkpoint(str(tmp_path / "s.pth"), trained)
    frozen = slim.convert(_bn_net(), spec, frozen_bn=True)
    slim.load_checkpoint(path, frozen)
    bn = frozen[1]
    before = bn.running_mean.clone()
    x = torch.randn(4, 3, 8, 8)
    frozen.train()
    with torch.no_grad(), slim.width(0.5):
        y_train = frozen(x)
    frozen.eval()
    trained.eval()
    with torch.no_grad(), slim.width(0.5):
        assert mad(y_train, frozen(x)) == 0 and mad(y_train, trained(x)) == 0  # per-switch stats, train mode
    assert torch.equal(bn.running_mean, before) and bn.frozen
    assert slim.freeze_bn(frozen, False) == 1 and not bn.frozen


def test_us_frozen_uses_max_statistics_where_a_width_has_none(mad):
    model = slim.convert(_bn_net(), slim.WidthSpec.range(0.25, 1.0), frozen_bn=True).train()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = bn.running_mean.clone()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad(), slim.width(0.6):
        h = model[0](x)
        y = model[1](h)
    c = h.shape[1]
    want = F.batch_norm(h, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c], False, 0, bn.eps)
    assert mad(y, want) <= 1e-6 and torch.equal(bn.running_mean, before)


def test_sync_batchnorm_converts_and_exports(mad):
    model = slim.convert(_bn_net(nn.SyncBatchNorm), slim.WidthSpec.switches([0.5, 1.0]))
    model.train()
    with slim.width(0.5):  # single process on CPU: behaves like BN
        model(torch.randn(4, 3, 8, 8)).sum().backward()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        y = model(x)
    plain = slim.export(model, 0.5, example_input=x[:1])
    assert type(plain[1]) is nn.SyncBatchNorm and plain[1].num_features == 8
    with torch.no_grad():
        assert mad(plain(x), y) <= 1e-6


# ---- weight norm, per-channel modules --------------------------------------------------------------------------
def test_weight_norm_conv_slices_g_and_v(mad):
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    wn = weight_norm(nn.Conv2d(16, 32, 3, padding=1))
    net = nn.Sequential(nn.Conv2d(3, 16, 1), wn, nn.Conv2d(32, 3, 1))
    keys = set(net.state_dict())
    model = slim.convert(net, slim.WidthSpec.range(0.25, 1.0))
    assert set(model.state_dict()) == keys  # weight_norm's own parameters, same checkpoint keys
    g, v = wn.parametrizations.weight.original0, wn.parametrizations.weight.original1
    h = torch.randn(2, 8, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        y = model[1](h)
    want = F.conv2d(h, torch._weight_norm(v[:16, :8], g[:16], 0), wn.bias[:16], padding=1)
    assert mad(y, want) <= 1e-6  # the norm over the active inputs, not a slice of the full normalised weight
    plain = slim.export(model, 0.5, example_input=torch.zeros(1, 3, 8, 8))
    assert parametrize.is_parametrized(plain[1], "weight")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        assert mad(plain(x), model(x)) <= 1e-5


def test_per_channel_modules_convert_or_are_refused(mad):
    from torchvision.ops.misc import FrozenBatchNorm2d

    net = nn.Sequential(nn.Conv2d(3, 16, 3), FrozenBatchNorm2d(16), nn.PReLU(16), nn.Conv2d(16, 4, 1))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[2].weight.uniform_(0, 0.5)
    model = slim.convert(net, slim.WidthSpec.range(0.25, 1.0))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        y = model(x)
    plain = slim.export(model, 0.5, example_input=x[:1])
    assert type(plain[1]) is FrozenBatchNorm2d and plain[1].weight.shape == (8,) and plain[2].num_parameters == 8
    with torch.no_grad():
        assert mad(plain(x), y) <= 1e-6

    class ChannelScale(nn.Module):  # per-channel state in a buffer, unknown to slim_plugins: the forward reads it
        def __init__(self, c):
            super().__init__()
            self.register_buffer("scale", torch.rand(c) + 0.5)

        def forward(self, x):
            return x * self.scale.view(1, -1, 1, 1)

    model = slim.convert(nn.Sequential(nn.Conv2d(3, 16, 3), ChannelScale(16), nn.Conv2d(16, 4, 1)),
                         slim.WidthSpec.range(0.25, 1.0))
    plain = slim.export(model, 0.5, example_input=x[:1])
    assert plain[1].scale.shape == (8,)  # the buffer follows the channels it scales
    with torch.no_grad():
        with slim.width(0.5):
            y = model(x)
        assert mad(plain(x), y) <= 1e-6

    class ChannelStats(nn.Module):  # per-channel state the forward never reads: the analysis cannot follow it
        def __init__(self, c):
            super().__init__()
            self.register_buffer("ema", torch.zeros(c))

        def forward(self, x):
            return x

    with pytest.raises(slim.UnsupportedModuleError, match="'1'.*ChannelStats"):
        slim.convert(nn.Sequential(nn.Conv2d(3, 16, 3), ChannelStats(16), nn.Conv2d(16, 4, 1)),
                     slim.WidthSpec.range(0.25, 1.0))


# ---- MultiWidthStep ----------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return slim.convert(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5)), slim.WidthSpec.range(0.25, 1.0))


def test_iterator_form_equals_call_form(mad):
    a, b = _mlp(), _mlp()
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    sa = slim.MultiWidthStep(a, distill="kl", seed=3)
    ra = sa(lambda: a(x), lambda out: F.cross_entropy(out, y))
    sb = slim.MultiWidthStep(b, distill="kl", seed=3)
    for p in sb.iterate():
        with p:
            out = b(x)
            p.loss(out, lambda o: F.cross_entropy(o, y)).backward()
    rb = sb.last
    assert rb.widths == ra.widths and all(torch.is_tensor(v) for v in rb.losses.values())
    assert all(mad(pa.grad, pb.grad) <= 1e-6 for pa, pb in zip(a.parameters(), b.parameters()))
    assert [r.distilled for r in rb.results] == [False, True, True, True]


def test_distillation_added_to_a_dict_task_loss_on_one_key():
    model = _mlp()
    x = torch.randn(16, 8)
    target = torch.randn(16, 1)

    def fwd():
        z = model(x)
        return {"logits": z, "value": z[:, :1]}

    def task(out):
        return {"loss_value": F.mse_loss(out["value"], target), "acc": torch.tensor(0.5)}  # 'acc' is not a loss

    step = slim.MultiWidthStep(model, distill="kl", distill_mode="add", distill_weight=0.5, distill_on="logits")
    res = step(fwd, task, keep_outputs=True)
    teacher = res.outputs[1.0]["logits"]
    for r in res.results[1:]:
        kl = slim.train.kl_divergence(res.outputs[r.width]["logits"], teacher)
        assert set(r.parts) == {"loss_value", "distill"}
        assert r.parts["distill"] == pytest.approx(kl.item(), rel=1e-5)
        assert r.loss == pytest.approx((r.parts["loss_value"] + 0.5 * kl).item(), rel=1e-5)
    assert "w1/loss_value" in res.log_vars()


def test_distribution_teacher_is_detached():
    """SB3-style: the policy is a torch Distribution; KL(teacher || student) with a stop-gradient teacher."""
    model = _mlp()
    x = torch.randn(16, 8)
    step = slim.MultiWidthStep(model, distill="policy_kl", distill_mode="add",
                               distill_on=lambda out: out["dist"])
    res = step(lambda: {"dist": torch.distributions.Categorical(logits=model(x))},
               lambda out: -out["dist"].entropy().mean())  # backward per width: a live teacher graph would fail
    assert all("distill" in r.parts for r in res.results[1:]) and res.results[0].parts.keys() == {"task"}


def test_loss_dict_without_loss_keys():
    model = _mlp()
    x = torch.randn(4, 8)
    step = slim.MultiWidthStep(model)
    with pytest.raises(slim.LossError, match=r"'l_pix'.*loss_keys"):
        step(lambda: model(x), lambda out: {"l_pix": out.abs().mean()})
    step = slim.MultiWidthStep(model, loss_keys=["l_pix"])
    res = step(lambda: model(x), lambda out: {"l_pix": out.abs().mean()})
    assert all(set(r.parts) == {"l_pix"} for r in res.results)


def test_width_schedule_resumes_and_keeps_repeated_widths():
    model = slim.convert(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2)), slim.WidthSpec.switches([0.5, 1.0]))
    a = slim.MultiWidthStep(model, rule="random", num_widths=4, seed=7)
    for _ in range(3):
        res = a(lambda: model(torch.randn(4, 8)), lambda out: out.pow(2).mean())
    assert len(res.results) == 4 and len(set(res.widths)) < 4  # a width drawn twice keeps both entries
    b = slim.MultiWidthStep(model, rule="random", num_widths=4, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.widths(b.iteration) == a.widths(3) and b.iteration == 3
    with pytest.raises(slim.WidthError, match="rule"):
        slim.MultiWidthStep(model).load_state_dict(a.state_dict())


# ---- calibration verbs, dispatcher ------------------------------------------------------------------------------
def test_calibrated_widths_and_clear_statistics():
    model = slim.convert(_bn_net(), slim.WidthSpec.range(0.25, 1.0))
    slim.calibrate_bn(model, [torch.randn(4, 3, 8, 8)], widths=[0.5, 0.7])
    assert slim.calibrated_widths(model) == ["0.5", "0.7", "1"]
    assert slim.calibrated_widths(model, [0.5, 0.6, 1.0]) == [0.5, 1.0]
    assert slim.clear_statistics(model) == 1
    assert slim.calibrated_widths(model, [0.5, 1.0]) == [1.0]


def test_dispatcher_finds_frameworks_through_entry_points(tmp_path):
    from slim_plugins import cli

    assert "timm" in cli.frameworks() and hasattr(cli._integration("timm"), "cmd_train")
    assert cli.framework_of_config("x.yaml", {"framework": "timm"}) == "timm"
    assert cli.framework_of_config("x.yaml", {"model": "resnet18"}) == "timm"
    with pytest.raises(cli.ConfigError, match="no trainer for framework 'nope'.*timm"):
        cli._integration("nope")
    (tmp_path / "c.py").write_text("model = dict()\n")
    if not any(getattr(ep.load(), "CONFIG_SUFFIXES", ()) for ep in cli.frameworks().values()
               if ep.name != "timm"):
        with pytest.raises(cli.ConfigError, match="no installed adapter reads"):
            cli.framework_of_config(str(tmp_path / "c.py"), None)
