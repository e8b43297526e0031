"""Transformers and modern CNNs (issue 21): norms without running statistics, channels on the last dim, tied
parameters (tokens, position embeddings, layer scales), attention slimmed by heads, exports into the stock timm
classes; and the three conversion bugs (the analysis changed the model, a head got slimmed, example_input not
used by export)."""
from __future__ import annotations

import copy
import functools
import subprocess
import sys

import pytest
import torch
from torch import nn

import slim_plugins as slim

RANGE = slim.WidthSpec.range(0.25, 1.0)


def _same(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


def _export_matches(model, x, widths, tol=1e-5):
    """The dynamic model at each width equals its plain export; returns the exports."""
    model.eval()
    out = {}
    for w in widths:
        with slim.width(w), torch.no_grad():
            y = model(x)
        p = slim.export(model, w)
        assert not any(type(m).__module__.startswith("slim_plugins") for m in p.modules()), \
            [type(m) for m in p.modules() if type(m).__module__.startswith("slim_plugins")]
        with torch.no_grad():
            _same(p(x), y, tol)
        out[w] = p
    return out


def _convert_keeps_width_one(model, x):
    """Convert ``model`` over ``RANGE`` on ``x``; width 1.0 gives the original outputs exactly."""
    with torch.no_grad():
        ref = model(x)
    slim.convert(model, RANGE, example_input=x)
    with torch.no_grad(), slim.width(1.0):
        _same(model(x), ref, 0)


# ---- the layers equal the stock layer of that width ----------------------------------------------------------
class TokenMLP(nn.Module):
    """(N, L, 8) tokens -> Linear -> norm -> GELU -> Linear (5 classes per token)."""

    def __init__(self, norm, c=32):
        super().__init__()
        self.fc1, self.norm, self.act, self.fc2 = nn.Linear(8, c), norm, nn.GELU(), nn.Linear(c, 5)

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_token_norm_equals_stock_norm_of_that_width(norm):
    make = {"layernorm": lambda c: nn.LayerNorm(c), "rmsnorm": lambda c: nn.RMSNorm(c, eps=1e-6)}[norm]
    net = TokenMLP(make(32))
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        if getattr(net.norm, "bias", None) is not None:
            net.norm.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(net)
    x = torch.randn(2, 7, 8)
    slim.convert(net, RANGE, example_input=x)
    # the hand-built narrow net: the first 16 hidden channels of every layer
    stock = TokenMLP(make(16), 16)
    with torch.no_grad():
        stock.fc1.weight.copy_(ref.fc1.weight[:16])
        stock.fc1.bias.copy_(ref.fc1.bias[:16])
        stock.norm.weight.copy_(ref.norm.weight[:16])
        if getattr(stock.norm, "bias", None) is not None:
            stock.norm.bias.copy_(ref.norm.bias[:16])
        stock.fc2.weight.copy_(ref.fc2.weight[:, :16])
        stock.fc2.bias.copy_(ref.fc2.bias)
    with slim.width(0.5), torch.no_grad():
        _same(net(x), stock(x))
    with torch.no_grad():
        _same(net(x), ref(x))  # width 1.0 is the original
    p = _export_matches(net, x, [0.25, 0.5, 1.0])[0.5]
    assert type(p.norm) is type(ref.norm) and tuple(p.norm.normalized_shape) == (16,)


class ChannelsLastBlock(nn.Module):
    """ConvNeXt-style: conv stem, then a residual block computed channels-last (permute, LayerNorm, Linear MLP,
    layer scale as a plain parameter), global pool and a head."""

    def __init__(self, c=32):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.gn = nn.GroupNorm(4, c)
        self.head = nn.Linear(c, 6)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2) * self.gamma.reshape(1, -1, 1, 1)
        return self.head(self.gn(x).mean((2, 3)))


def test_channels_last_block_with_layer_scale_and_groupnorm():
    net = ChannelsLastBlock()
    ref = copy.deepcopy(net).eval()
    x = torch.randn(2, 3, 12, 12)
    keys = {k: v.shape for k, v in net.state_dict().items()}
    slim.convert(net, RANGE, example_input=x)
    net.eval()
    assert {k: v.shape for k, v in net.state_dict().items()} == keys  # stock checkpoints still load
    assert isinstance(net, ChannelsLastBlock) and net.gamma.shape == (32,)
    with torch.no_grad():
        _same(net(x), ref(x))
    exports = _export_matches(net, x, [0.25, 0.5, 0.75, 1.0])
    p = exports[0.5]
    assert type(p) is ChannelsLastBlock and p.gamma.shape == (16,) and p.gn.num_channels == 16
    # GroupNorm keeps its 4 groups and slims each alike: the stem's kept channels are 4 of each group of 8
    stem_out = slim.active_channels(net, 0.5)["stem"][1]
    assert stem_out.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
    # the exported GroupNorm is the stock layer of that width
    gn = nn.GroupNorm(4, 16)
    gn.load_state_dict(p.gn.state_dict())
    z = torch.randn(2, 16, 5, 5)
    _same(gn(z), p.gn(z))


def test_batchnorm1d_switchable_and_calibrated():
    net = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(64, 10)
    slim.convert(net, slim.WidthSpec.switches([0.5, 1.0]))
    net.train()
    for w in (0.5, 1.0):
        with slim.width(w):
            net(x)
    assert net[1].running_mean.shape == (2, 32)  # private statistics per switch (S-Nets Sec. 3.2)
    p = _export_matches(net, x, [0.5, 1.0])[0.5]
    assert type(p[1]) is nn.BatchNorm1d and p[1].num_features == 16


def test_bn_free_model_needs_no_post_statistics():
    net = TokenMLP(nn.LayerNorm(32))
    x = torch.randn(2, 3, 8)
    slim.convert(net, RANGE, example_input=x)
    assert slim.calibrated_widths(net, [0.3, 0.55, 1.0]) == [0.3, 0.55, 1.0]
    net.eval()
    with slim.width(0.55), torch.no_grad():
        net(x)  # no UncalibratedWidthError
    assert slim.calibrate_bn(net, [x], widths=[0.3]) is not None


class TokenMixer(nn.Module):
    """MLP-Mixer style: a Linear across the tokens (dim -1 of (N, C, L)) keeps its size; channels pass through."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.mix = nn.Linear(9, 9)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # (N, 9, 4)
        t = self.embed(x).transpose(1, 2)          # (N, 16, 9): channels on dim 1
        t = self.mix(t).transpose(1, 2)            # token mixing
        return self.head(t.mean(1))


def test_token_mixing_linear_stays_whole():
    net = TokenMixer()
    x = torch.randn(2, 9, 4)
    slim.convert(net, RANGE, example_input=x)
    assert net.mix.fixed_out and not net.embed.fixed_out
    p = _export_matches(net, x, [0.5])[0.5]
    assert p.mix.in_features == 9 and p.mix.out_features == 9 and p.embed.out_features == 8


# ---- bug 1: the analysis never changes the model ---------------------------------------------------------------
def test_forward_attribute_assignment_does_not_leak_into_the_model():
    """BasicSR's stock EDSR assigns ``self.mean = self.mean.type_as(x)`` in forward: after convert the attribute
    is still a tensor (it was an fx Proxy) and the model runs at every width."""
    from basicsr.archs.edsr_arch import EDSR

    net = EDSR(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=2).eval()
    mean = net.mean
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
    slim.convert(net, slim.WidthSpec.range(0.5, 1.0))
    assert net.mean is mean or torch.equal(net.mean, mean)
    assert type(net.mean) is torch.Tensor
    with torch.no_grad():
        _same(net(x), ref)
    p = _export_matches(net, x, [0.5, 0.75, 1.0])[0.5]
    stock = EDSR(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=2).eval()
    stock.load_state_dict(p.state_dict(), strict=True)
    with slim.width(0.5), torch.no_grad():
        _same(stock(x), net(x))


class Assigns(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)
        self.head = nn.Linear(32, 2)
        self.seen = None

    def forward(self, x):
        self.seen = x.shape[0]  # a forward that writes an attribute
        y = self.conv(x)
        return self.head(torch.cumsum(y, 1).mean((2, 3)))  # cumsum over channels: not slimmable


def test_a_failed_convert_leaves_the_model_as_it_was():
    net = Assigns()
    before = dict(net.__dict__)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(slim.NotExactError, match="cumsum"):
        slim.convert(net, RANGE, example_input=torch.randn(2, 3, 10, 10))
    assert net.__dict__.keys() == before.keys() and net.seen is None
    assert type(net.conv) is nn.Conv2d and type(net.head) is nn.Linear
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in sd.items())


# ---- bug 2: output layers come from the graph; a failed shape pass is a typed error ----------------------------
class ActorCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(4, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 3, 1), nn.ReLU())
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64 * 18 * 18, 512)
        self.actor = nn.Linear(512, 18)
        self.critic = nn.Linear(512, 1)

    def forward(self, x):
        h = torch.relu(self.fc(self.flatten(self.trunk(x))))
        return self.actor(h), self.critic(h)


def test_heads_are_never_slimmed_without_example_input():
    net = ActorCritic()
    with pytest.raises(slim.ExampleInputError, match="example_input"):
        slim.convert(net, RANGE)  # the default 64x64 input cannot reach the 18x18 flatten
    assert type(net.actor) is nn.Linear and not hasattr(net, "_slim_state")
    x = torch.zeros(2, 4, 84, 84)
    slim.convert(net, RANGE, example_input=x)
    assert net.actor.fixed_out and net.critic.fixed_out and not net.fc.fixed_out
    with slim.width(0.5), torch.no_grad():
        logits, value = net(torch.randn(1, 4, 84, 84))
    assert logits.shape == (1, 18) and value.shape == (1, 1)


# ---- bug 3: export and profile use the example input convert analysed -------------------------------------------
def test_export_uses_the_convert_example_input():
    timm = pytest.importorskip("timm")
    net = timm.create_model("inception_v3", num_classes=5, aux_logits=False).eval()
    x = torch.randn(2, 3, 96, 96)  # inception_v3's stem cannot take 64x64
    slim.convert(net, slim.WidthSpec.switches([0.5, 1.0]), example_input=x)
    p = _export_matches(net, x, [0.5], tol=1e-4)[0.5]  # export() with no example_input
    assert p.Conv2d_1a_3x3.conv.out_channels == 16
    table = slim.profile(net, x[:1], widths=[0.5, 1.0], latency=False)
    assert table[0].mflops < table[1].mflops


# ---- timm transformers: exports load strictly into the stock class ----------------------------------------------
@pytest.mark.parametrize("name,kw,size", [
    ("deit_tiny_patch16_224", dict(img_size=32, patch_size=4), 32),
    ("convnext_atto", {}, 64),
    ("test_vit", {}, 160),  # dynamic_img_size: the position embedding goes through resample_abs_pos_embed
    ("swin_tiny_patch4_window7_224", dict(img_size=112, window_size=7, depths=(2, 2, 2, 2)), 112),
])
def test_timm_transformer_exports_load_into_the_stock_model(name, kw, size):
    timm = pytest.importorskip("timm")
    import slim_plugins.integrations.timm as st

    model = st.create_slim_model(name, width_range=[0.25, 1.0], num_classes=7, **kw).eval()
    x = torch.randn(2, 3, size, size)
    exports = _export_matches(model, x, [0.25, 0.5, 0.75, 1.0], tol=1e-4)
    for w, p in exports.items():
        args = st.stock_kwargs(p)
        stock = timm.create_model(name, num_classes=7, **{**kw, **args}).eval()
        stock.load_state_dict(p.state_dict(), strict=True)
        with slim.width(w), torch.no_grad():
            _same(stock(x), model(x), 1e-4)
    assert st.stock_kwargs(exports[0.25]) != st.stock_kwargs(exports[1.0])


# Found by benchmarks/coverage.py: single-head stages (PVT v2) and BEiT's cat'ed q/k/v bias with a zero k buffer
# went untyped / refused when a view of an always-whole attention output was read as a constant.
@pytest.mark.parametrize("name,kw,size", [
    ("pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 64),
    ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4), 32),
])
def test_timm_models_from_coverage_convert_exactly(name, kw, size):
    timm = pytest.importorskip("timm")
    import slim_plugins.integrations.timm  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **kw).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    slim.convert(model, RANGE, example_input=x)
    with torch.no_grad():
        _same(model(x), ref, 0.0)
    exports = _export_matches(model, x, [0.25, 0.5], tol=1e-4)
    n = sum(p.numel() for p in exports[0.5].parameters())
    assert n < sum(p.numel() for p in model.parameters())


def test_attention_keeps_head_dim_and_drops_whole_heads():
    pytest.importorskip("timm")
    import slim_plugins.integrations.timm as st

    model = st.create_slim_model("deit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=3).eval()
    p = slim.export(model, 0.5)
    attn = p.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.scale) == (2, 64, 64 ** -0.5)
    assert p.cls_token.shape == (1, 1, 128) and p.pos_embed.shape == (1, 65, 128)
    # the kept heads are q/k/v heads 0 and 1 of the full qkv
    full = model.blocks[0].attn.qkv.weight.detach()
    torch.testing.assert_close(attn.qkv.weight[:128], full[:128, :128])
    torch.testing.assert_close(attn.qkv.weight[128:256], full[192:320, :128])


def test_registered_us_entry_points():
    timm = pytest.importorskip("timm")
    import slim_plugins.integrations.timm  # noqa: F401

    vit = timm.create_model("us_deit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10).eval()
    cnx = timm.create_model("us_convnext_atto", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    for m in (vit, cnx):
        assert slim.width_spec(m).min == 0.25
        with slim.width(0.25), torch.no_grad():
            assert m(x).shape == (1, 10)


class LiteralView(nn.Module):
    """``x.view(n, 32, h * w)``: a literal channel count that is wrong at every narrower width."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x, mask=None):
        if mask is not None:  # a branch on an optional argument: traced at its default (None)
            x = x * mask
        n, _, h, w = x.shape
        y = self.conv(x).view(n, 32, h * w)
        return self.head(y.mean(2))


def test_literal_channel_reshape_is_refused_and_optional_args_traced_at_default():
    net = LiteralView()
    with pytest.raises(slim.NotExactError, match="literal channel count 32"):
        slim.convert(net, RANGE, example_input=torch.randn(2, 3, 8, 8))
    assert type(net.conv) is nn.Conv2d
    ok = slim.convert(LiteralView(), slim.WidthSpec.switches([1.0]), example_input=torch.randn(2, 3, 8, 8))
    assert ok(torch.randn(1, 3, 8, 8)).shape == (1, 4)


@pytest.mark.parametrize("layer", ["LayerNormAct2d", "GroupNormAct", "RmsNormAct2d"])
def test_timm_norm_act_layers_equal_their_export(layer):
    na = pytest.importorskip("timm.layers.norm_act")

    import slim_plugins.integrations.timm  # noqa: F401

    cls = getattr(na, layer)
    norm = cls(16, num_groups=4, act_layer=nn.GELU) if layer == "GroupNormAct" else cls(16, act_layer=nn.GELU)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), norm, nn.Conv2d(16, 5, 1))
    x = torch.randn(2, 3, 9, 9)
    slim.convert(net, RANGE, example_input=x)
    p = _export_matches(net, x, [0.25, 0.5, 1.0])[0.5]
    assert type(p[1]) is cls and isinstance(p[1].act, nn.GELU)


def test_torchvision_swin_window_attention_and_patch_merging():
    tv = pytest.importorskip("torchvision")
    net = tv.models.swin_t(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    slim.convert(net, RANGE, example_input=x)
    exports = _export_matches(net, x, [0.25, 0.5, 1.0], tol=1e-4)
    attn = exports[0.5].features[1][0].attn
    assert type(attn) is tv.models.swin_transformer.ShiftedWindowAttention
    assert (attn.num_heads, attn.qkv.in_features, attn.relative_position_bias_table.shape[1]) == (2, 64, 2)
    # patch merging concatenates four blocks of the active channels: its norm sees 4 x the stage width
    assert exports[0.5].features[2].norm.normalized_shape == (4 * 64,)


def test_torchvision_swin_v2_exports_load_into_the_stock_model():
    """Swin V2's ``ShiftedWindowAttentionV2`` (cosine attention: per-head ``logit_scale``, continuous position bias
    from ``cpb_mlp`` with one output per head) keeps whole heads; at width 1/3 every stage is whole heads of 32, so
    the export loads strictly into torchvision's own Swin V2 built with ``embed_dim=32, num_heads=[1, 2, 4, 8]``
    and gives its outputs. It was refused (the traced forward zeroes a third of the qkv bias by a computed
    length)."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models import swin_transformer as tvswin

    torch.manual_seed(0)
    net = tv.models.swin_v2_t(num_classes=5).eval()
    with torch.no_grad():  # away from the init (cpb_mlp / logit_scale columns that would be alike)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(1, 3, 64, 64)
    _convert_keeps_width_one(net, x)
    exports = _export_matches(net, x, [0.25, 0.5, 1 / 3], tol=1e-5)
    attn = exports[0.5].features[1][0].attn
    assert type(attn) is tvswin.ShiftedWindowAttentionV2
    assert (attn.num_heads, attn.logit_scale.shape[0], attn.cpb_mlp[-1].out_features) == (2, 2, 2)
    stock = tvswin.SwinTransformer([4, 4], 32, [2, 2, 6, 2], [1, 2, 4, 8], [8, 8], num_classes=5,
                                   block=tvswin.SwinTransformerBlockV2,
                                   downsample_layer=tvswin.PatchMergingV2).eval()
    stock.load_state_dict(exports[1 / 3].state_dict())
    with torch.no_grad(), slim.width(1 / 3):
        _same(stock(x), net(x))


def test_torchvision_video_swin_exports_load_into_the_stock_model():
    """torchvision's video Swin (``ShiftedWindowAttention3d``: windows over frames x height x width, a relative
    bias table of ``(2Wd-1)(2Wh-1)(2Ww-1)`` rows, one column per head) keeps whole heads of 32; at width 0.5 the
    export loads strictly into ``SwinTransformer3d(embed_dim=32, num_heads=[1, 2])`` and gives its outputs. It was
    refused (the functional attention reads ``qkv.weight``), and before that its analysis forward failed (fx hands
    ``_get_window_and_shift_size`` an immutable list, which it fills in place)."""
    pytest.importorskip("torchvision")
    from torchvision.models.video import swin_transformer as tvswin3d

    def build(dim, heads):
        return tvswin3d.SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=dim, depths=[2, 2], num_heads=heads,
                                          window_size=[2, 4, 4], stochastic_depth_prob=0.0, num_classes=5).eval()

    torch.manual_seed(0)
    net = build(64, [2, 4])
    x = torch.randn(1, 3, 4, 32, 32)
    _convert_keeps_width_one(net, x)
    exports = _export_matches(net, x, [0.25, 0.5, 1.0])
    attn = exports[0.5].features[0][0].attn
    assert type(attn) is tvswin3d.ShiftedWindowAttention3d
    assert (attn.num_heads, attn.qkv.in_features, attn.relative_position_bias_table.shape[1]) == (1, 32, 1)
    stock = build(32, [1, 2])
    stock.load_state_dict(exports[0.5].state_dict())
    with torch.no_grad(), slim.width(0.5):
        _same(stock(x), net(x))


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_video_mvit_exports_load_into_the_stock_model(v2):
    """torchvision's video MViT (v1: absolute position embeddings; v2: decomposed relative positions, residual
    pooling, projection after attention): its ``MultiscaleAttention`` widens ``dim -> dim_out`` at a stage's first
    block and pools per-head tensors; slimmed by heads (``head_dim`` 32 kept), the residual stream's max-pool skip
    followed through ``_unsqueeze`` / ``B, N, C = x.shape[:3]`` / ``reshape(B, N, C, -1)``, every width equals its
    export, and at 0.5 the export loads strictly into ``MViT`` built with half the channels and heads. It was
    refused (``_unsqueeze`` in ``attn.pool_k``); with the attention counterpart alone its stream stayed whole."""
    pytest.importorskip("torchvision")
    from torchvision.models.video import mvit as tvmvit

    def build(c, heads):
        cfg = [tvmvit.MSBlockConfig(heads[0], c, c, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
               tvmvit.MSBlockConfig(heads[1], c, 2 * c, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1]),
               tvmvit.MSBlockConfig(heads[1], 2 * c, 2 * c, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 1, 1])]
        return tvmvit.MViT((32, 32), 4, cfg, residual_pool=v2, residual_with_cls_embed=False, rel_pos_embed=v2,
                           proj_after_attn=v2, dropout=0.0, attention_dropout=0.1,
                           num_classes=5).eval()  # (attention_dropout: project = [Linear, Dropout])

    torch.manual_seed(0)
    net = build(64, [2, 4])
    with torch.no_grad():  # away from the zero init of the position tables / class token
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(2, 3, 4, 32, 32)
    _convert_keeps_width_one(net, x)
    exports = _export_matches(net, x, [0.25, 0.5, 1.0])
    last = exports[0.5].blocks[2].attn
    assert type(last) is tvmvit.MultiscaleAttention
    assert (last.num_heads, last.output_dim, last.head_dim) == (2, 64, 32)  # the second stage: half its heads
    assert last.embed_dim == last.qkv.in_features and isinstance(last.project[1], nn.Dropout)
    if not v2:
        # v1's absolute position embedding (``repeat_interleave`` of its temporal table, concatenated with the class
        # position) is read whole by the analysis, so the first stage's stream stays whole (exact, less slimmed)
        assert exports[0.5].blocks[0].attn.output_dim == 64
        return
    attn = exports[0.5].blocks[1].attn
    assert (attn.num_heads, attn.output_dim, attn.qkv.in_features) == (2, 64, 32)
    stock = build(32, [1, 2])
    stock.load_state_dict(exports[0.5].state_dict())
    with torch.no_grad(), slim.width(0.5):
        _same(stock(x), net(x))


@pytest.mark.parametrize("layer", ["StdConv2d", "StdConv2dSame", "ScaledStdConv2d"])
def test_weight_standardised_conv_equals_stock_conv_of_that_width(layer):
    layers = pytest.importorskip("timm.layers")
    import slim_plugins.integrations.timm  # noqa: F401

    cls = getattr(layers, layer)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), cls(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 1))
    with torch.no_grad():
        if hasattr(net[1], "gain"):
            net[1].gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 11, 11)
    slim.convert(net, RANGE, example_input=x)
    p = _export_matches(net, x, [0.25, 0.5, 1.0])[0.5]
    stock = cls(8, 16, 3)  # built by its own constructor: standardises over its own (narrow) fan-in
    stock.load_state_dict(p[1].state_dict())
    z = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        _same(stock(z), p[1](z))


def test_subclass_keeping_its_base_forward_uses_the_base_counterpart():
    class NoBiasLN(nn.LayerNorm):  # timm's LayerNormNoBias pattern: only __init__ differs
        def __init__(self, c):
            super().__init__(c)
            self.bias = None

    class ScaledConv(nn.Conv2d):  # a forward of its own: not a plain conv, its weights are not sliced blindly
        def forward(self, x):
            return super().forward(x) * 2.0

    from slim_plugins import registry
    from slim_plugins.nn.norm import SlimLayerNorm

    assert registry.lookup(NoBiasLN) is SlimLayerNorm and registry.lookup(ScaledConv) is None
    net = TokenMLP(NoBiasLN(32))
    x = torch.randn(2, 3, 8)
    slim.convert(net, RANGE, example_input=x)
    p = _export_matches(net, x, [0.5])[0.5]
    assert type(p.norm) is NoBiasLN and p.norm.weight.shape == (16,)
    conv = nn.Sequential(nn.Conv2d(3, 16, 3), ScaledConv(16, 16, 3), nn.Conv2d(16, 2, 1))
    with pytest.raises(slim.NotExactError, match="conv2d"):
        slim.convert(conv, RANGE, example_input=torch.randn(1, 3, 9, 9))


def test_auxiliary_heads_of_a_training_forward_are_output_layers():
    """GoogLeNet returns a namedtuple (logits, aux2, aux1) in training mode only: the analysis traces the model
    in its own mode, so every head is found from the graph and keeps its classes at every width."""
    tv = pytest.importorskip("torchvision")
    net = tv.models.googlenet(aux_logits=True, init_weights=True, num_classes=100).train()
    x = torch.randn(2, 3, 96, 96)
    slim.convert(net, RANGE, example_input=x)
    assert net.fc.fixed_out and net.aux1.fc2.fixed_out and net.aux2.fc2.fixed_out
    assert not net.aux1.fc1.fixed_out
    with slim.width(0.25):
        out = net(x)
    assert [tuple(o.shape) for o in out] == [(2, 100)] * 3


def test_eval_caches_follow_data_writes_of_tied_parameters_and_norms():
    """An EMA that writes ``p.data`` (BasicSR's) must not leave a stale cached selection (DESIGN rule 7)."""
    net = ChannelsLastBlock().eval()
    x = torch.randn(1, 3, 8, 8)
    slim.convert(net, RANGE, example_input=x)
    net.eval()
    with torch.no_grad(), slim.width(0.5):
        net(x)  # fills the caches
        for name in ("gamma", "norm.weight", "gn.weight"):  # the parameters themselves, as an EMA reaches them
            net.get_parameter(name).data.mul_(3.0)          # (net.gamma inside a width reads the active channels)
        y = net(x)
    with slim.width(0.5), torch.no_grad():
        _same(slim.export(net, 0.5)(x), y)
        # outside the forward the module's attribute is the parameter itself (optimizers, EMA, get_parameter)
        assert net.gamma is net.get_parameter("gamma") and net.gamma.shape == (32,)
    # a new parameter object (load_state_dict with assign=True) with the old one's write count, another width
    old, new = net.gamma, nn.Parameter(torch.randn(32))
    with torch.no_grad():
        while new._version < old._version:
            new.add_(0.0)
    assert new._version == old._version
    net.gamma = new
    with torch.no_grad():
        for w in (0.5, 0.25):
            with slim.width(w):
                _same(slim.export(net, w)(x), net(x))


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm", "layernorm_no_affine"])
def test_norm_eval_fast_path_misses_on_width_writes_and_new_parameters(norm):
    """The norms' one-entry eval fast path (batch-1 latency) must miss on another width or input, an in-place
    write and a new parameter object with the old one's write count; each call equals the export of that width
    (the stock norm holding the active entries)."""
    c = 32
    layer = {"layernorm": nn.LayerNorm(c), "groupnorm": nn.GroupNorm(4, c),
             "layernorm_no_affine": nn.LayerNorm(c, elementwise_affine=False)}[norm]
    if norm != "layernorm_no_affine":
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1.0, 1.0)
    tokens = norm != "groupnorm"
    net = nn.Sequential(nn.Linear(3, c), layer) if tokens else nn.Sequential(nn.Conv2d(3, c, 1), layer)
    x = torch.randn(2, 5, 3) if tokens else torch.randn(2, 3, 4, 4)
    slim.convert(net, RANGE, example_input=x)
    net.eval()
    slim_norm = net[1]

    def stock(w):  # the plain export of that width (GroupNorm keeps C_active / G channels of each group)
        return slim.export(net, w)(x)

    with torch.no_grad():
        for w in (0.5, 0.25, 0.5, 1.0, 0.5):
            with slim.width(w):
                y = net(x)
                entry = slim_norm.__dict__["_slim_fast"]
                assert torch.equal(net(x), y)
                assert slim_norm.__dict__["_slim_fast"] is entry  # the second call took the fast path
                _same(y, stock(w))
        if norm == "layernorm_no_affine":
            return
        with slim.width(0.5):
            net(x)
            slim_norm.weight.mul_(2.0)  # an in-place write (optimizer step, EMA)
            _same(net(x), stock(0.5))
            slim_norm.weight.data = torch.rand(c) + 0.5  # a storage swap: a cached view of the old one is stale
            _same(net(x), stock(0.5))
            old, new = slim_norm.bias, nn.Parameter(torch.randn(c))
            while new._version < old._version:
                new.add_(0.0)
            assert new._version == old._version
            slim_norm.bias = new  # a new object with the old one's write count
            _same(net(x), stock(0.5))


def test_attention_eval_fast_path_misses_on_width_writes_and_new_parameters():
    """The attention counterparts' one-entry eval fast path (batch-1 latency) must miss on another width, an
    in-place write to qkv and a new proj parameter with the old one's write count; every call equals the export."""
    pytest.importorskip("timm")
    from timm.layers import Attention

    import slim_plugins.integrations.timm  # noqa: F401

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 64), Attention(64, num_heads=4), nn.Linear(64, 5))
    x = torch.randn(2, 7, 3)
    slim.convert(net, RANGE, example_input=x)
    net.eval()
    attn = net[1]
    with torch.no_grad():
        for w in (0.5, 0.25, 0.5, 1.0, 0.5):
            with slim.width(w):
                y = net(x)
                assert torch.equal(net(x), y)  # the second call takes the fast path
                _same(y, slim.export(net, w)(x))
        with slim.width(0.5):
            net(x)
            attn.qkv.weight.mul_(1.5)  # an in-place write (optimizer step, EMA)
            _same(net(x), slim.export(net, 0.5)(x))
            old, new = attn.proj.bias, nn.Parameter(torch.randn(64))
            while new._version < old._version:
                new.add_(0.0)
            attn.proj.bias = new  # a new object with the old one's write count
            y = net(x)
            _same(y, slim.export(net, 0.5)(x))
            assert (y - net[2](attn(net[0](x)))).abs().max() == 0


class TokenScale(nn.Module):
    """Tokens: Linear, LayerNorm, a layer scale held as a plain parameter, a head (prefix selections)."""

    def __init__(self, c=32):
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(3, c), nn.LayerNorm(c), nn.Linear(c, 4)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)) * self.gamma)


def test_copies_after_in_place_writes_of_cached_parameters():
    """Eval caches hold selections of the parameters (views where they are prefixes); after an in-place write
    under no_grad (an EMA, a manual rescale) ``copy.deepcopy`` and ``export`` must still work (the caches are not
    copied) and equal the dynamic model."""
    net = TokenScale().eval()
    x = torch.randn(2, 5, 3)
    slim.convert(net, RANGE, example_input=x)
    net.eval()
    with torch.no_grad():
        with slim.width(0.5):
            net(x)  # fills the caches of the norm, the layer scale and the layers
        for name in ("gamma", "norm.weight", "norm.bias", "fc.weight"):
            net.get_parameter(name).mul_(1.5)
        twin = copy.deepcopy(net)
        with slim.width(0.5):
            y = net(x)
            _same(twin(x), y)
        _same(slim.export(net, 0.5)(x), y)


def test_hosted_parameters_survive_pickling_into_a_fresh_process(tmp_path):
    """A hosted module's class is recreated by name in a fresh process; its layer scale must still read the active
    channels there (the descriptors that serve hosted names are restored on unpickling)."""
    timm = pytest.importorskip("timm")
    import slim_plugins.integrations.timm  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("us_convnext_atto", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), slim.width(0.5):
        y = model(x)
    torch.save({"model": model, "x": x, "y": y}, tmp_path / "m.pt")
    code = ("import torch, slim_plugins as slim\n"
            f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
            "m = d['model']\n"
            "assert any(type(b).__name__ == 'ConvNeXtBlock' and 'gamma' in type(b).__dict__ for b in m.modules())\n"
            "with torch.no_grad(), slim.width(0.5):\n"
            "    assert torch.equal(m(d['x']), d['y'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


class PosHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 9, 32))


class ReadsChildParam(nn.Module):
    """The root forward reads a parameter of a child that is never called (``self.pos.table``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 32)
        self.pos = PosHolder()
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head((self.embed(x) + self.pos.table).mean(1))


def test_tied_parameter_read_by_an_ancestor_forward():
    net = ReadsChildParam()
    x = torch.randn(2, 9, 4)
    slim.convert(net, RANGE, example_input=x)
    p = _export_matches(net, x, [0.25, 0.5, 1.0])[0.5]
    assert type(p) is ReadsChildParam and type(p.pos) is PosHolder and p.pos.table.shape == (1, 9, 16)


def test_training_at_a_width_reaches_only_the_active_channels_of_tied_parameters():
    pytest.importorskip("timm")
    import slim_plugins.integrations.timm as st

    model = st.create_slim_model("deit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=3).train()
    x = torch.randn(2, 3, 32, 32)
    with slim.width(0.5):
        model(x).sum().backward()
    for p in (model.pos_embed, model.cls_token):
        assert p.grad.shape == p.shape
        assert p.grad[..., 128:].abs().max() == 0 and p.grad[..., :128].abs().max() > 0
    assert model.blocks[0].attn.qkv.weight.grad[:, 128:].abs().max() == 0


# ---- attention without a counterpart: the module's own forward at the active head count -----------------------
class UserAttention(nn.Module):
    """A user's attention (no registered counterpart): fused qkv, ``self.num_heads`` in the reshape."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class UserCrossAttention(nn.Module):
    """Separate q and kv projections, SDPA, the head dim computed as ``C // self.num_heads`` (CaiT's style)."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.num_heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class UserRelBiasAttention(UserAttention):
    """A per-head bias from an MLP over token offsets, viewed to ``self.bias_shape = (N, N, heads)`` (timm's
    ``RelPosMlp`` style): the head count inside a tuple attribute."""

    def __init__(self, dim=64, heads=4, tokens=16):
        super().__init__(dim, heads)
        self.register_buffer("coords", torch.randn(tokens * tokens, 2))
        self.bias_mlp = nn.Linear(2, heads)
        self.bias_shape = (tokens, tokens, heads)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.bias_mlp(self.coords).view(self.bias_shape).permute(2, 0, 1).unsqueeze(0)
        attn = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class PythonHeads(UserAttention):
    """Computes with ``num_heads`` in Python: the analysis cannot see what that decides."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class TinyTokenNet(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.embed = nn.Conv2d(3, 64, 4, stride=4)
        self.norm1, self.attn = nn.LayerNorm(64), attn
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(64), nn.Linear(64, 128), nn.Linear(128, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


@pytest.mark.parametrize("attn", [UserAttention, UserCrossAttention, UserRelBiasAttention])
def test_attention_without_counterpart_runs_its_own_forward_at_the_active_heads(attn):
    torch.manual_seed(0)
    net = TinyTokenNet(attn())
    ref = copy.deepcopy(net).eval()
    x = torch.randn(2, 3, 16, 16)
    model = slim.convert(net, RANGE, example_input=x).eval()
    with torch.no_grad():
        _same(model(x), ref(x))
        exports = _export_matches(model, x, [0.25, 0.5, 0.75, 1.0])
    from slim_plugins.graph import AttrInt

    assert not any(isinstance(v, AttrInt) for m in model.modules() for v in vars(m).values())  # tags stay in the trace
    a = model.attn
    assert isinstance(a, attn) and a.num_heads == 4 and type(vars(a).get("num_heads", 4)) is int
    for w, heads in ((0.25, 1), (0.5, 2), (1.0, 4)):
        p = exports[w].attn
        assert type(p) is attn and p.num_heads == heads
        assert p.proj.in_features == heads * 16  # the head dim is kept: whole heads are dropped
        if attn is UserRelBiasAttention:
            assert p.bias_shape == (16, 16, heads) and p.bias_mlp.out_features == heads
    # the kept heads are heads 0, 1 of q, k and v of the full projection
    if attn is UserAttention:
        full = model.attn.qkv.weight.detach()
        kept = exports[0.5].attn.qkv.weight
        torch.testing.assert_close(kept[32:64], full[64:96, :kept.shape[1]])


def test_attention_computing_with_its_head_count_in_python_is_refused():
    net = TinyTokenNet(PythonHeads())
    with pytest.raises(slim.NotExactError, match="literal size 64|num_heads"):
        slim.convert(net, RANGE, example_input=torch.randn(2, 3, 16, 16))
    assert type(net.attn) is PythonHeads and type(net.attn.num_heads) is int


class CachedScale(nn.Module):
    """A layer scale whose forward keeps ``gamma * 2`` in a dict (as timm's ``attention_bias_cache`` does)."""

    def __init__(self, cache: str, c=32):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.cache = cache
        setattr(self, cache, {})

    def forward(self, x):
        memo = getattr(self, self.cache)
        if "k" not in memo:
            memo["k"] = self.gamma * 2
        return x * memo["k"]


class CachedNet(nn.Module):
    def __init__(self, cache):
        super().__init__()
        self.fc1, self.scale, self.fc2 = nn.Linear(8, 32), CachedScale(cache), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.scale(self.fc1(x))))


def test_a_forward_cache_of_width_dependent_tensors_is_refused_or_emptied_per_forward():
    from slim_plugins import registry

    x = torch.randn(3, 8)
    net = CachedNet("memo")
    net(x)  # the cache holds a full-width tensor before convert
    with pytest.raises(slim.UnsupportedModuleError, match="'memo'.*register_forward_cache"):
        slim.convert(net, RANGE, example_input=x)
    assert type(net.scale) is CachedScale and set(net.scale.memo) == {"k"}
    registry.register_forward_cache("slim_test_cache")
    net = CachedNet("slim_test_cache")
    net(x)
    model = slim.convert(net, RANGE, example_input=x).eval()
    for w in (0.5, 1.0, 0.25, 0.5):  # each forward recomputes the cached tensor at its own width
        with slim.width(w), torch.no_grad():
            _same(model(x), slim.export(model, w)(x))


class PartialConvNet(nn.Module):
    """FasterNet's partial convolution: ``torch.split(x, [self.dim_conv, self.dim_untouched])`` with sizes the
    module holds, a 3x3 conv on the first piece only."""

    def __init__(self, c=32):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dim_conv, self.dim_untouched = c // 4, c - c // 4
        self.pconv = nn.Conv2d(c // 4, c // 4, 3, padding=1, bias=False)
        self.pw = nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        x = x + self.pw(torch.cat((self.pconv(x1), x2), 1))
        return self.head(x.mean((2, 3)))


def test_split_with_module_held_sizes_follows_the_width():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    net = PartialConvNet()
    ref = copy.deepcopy(net).eval()
    model = slim.convert(net, RANGE, example_input=x).eval()
    with torch.no_grad():
        _same(model(x), ref(x))
    exports = _export_matches(model, x, [0.25, 0.5, 0.75, 1.0])
    for w in (0.25, 0.5, 1.0):
        p = exports[w]
        assert p.dim_conv + p.dim_untouched == p.stem.out_channels
        assert p.pconv.in_channels == p.dim_conv >= 1 and p.dim_conv <= 8
    assert exports[0.5].stem.out_channels < 32 and exports[0.5].dim_conv < 8  # each piece narrows with the width


class CrossStageNet(nn.Module):
    """CSPNet's cross stage: ``x.split(self.expand_chs // 2, dim=1)``, a size computed from a module attribute."""

    def __init__(self, c=32):
        super().__init__()
        self.expand_chs = c
        self.conv_exp = nn.Conv2d(3, c, 3, padding=1)
        self.block = nn.Conv2d(c // 2, c // 2, 3, padding=1)
        self.transition = nn.Conv2d(c, 24, 1)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        return self.head(self.transition(torch.cat([xs, self.block(xb)], 1)).mean((2, 3)))


class ComputedSize(CrossStageNet):
    def forward(self, x):  # the attribute also used unscaled elsewhere: two values, so refused
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        y = torch.cat([xs, self.block(xb)], 1).reshape(x.shape[0], self.expand_chs, -1)
        return self.head(self.transition(y.unsqueeze(-1)).mean((2, 3)))


def test_split_size_computed_from_a_module_attribute():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = slim.convert(CrossStageNet(), RANGE, example_input=x).eval()
    exports = _export_matches(model, x, [0.25, 0.5, 1.0])
    assert exports[0.5].expand_chs == exports[0.5].conv_exp.out_channels < 32
    assert model.expand_chs == 32  # outside a forward: the attribute itself
    with pytest.raises(slim.NotExactError, match="expand_chs"):
        slim.convert(ComputedSize(), RANGE, example_input=x)


class ShapeBranch(nn.Module):
    """Pads to a multiple of its window when the input needs it: a branch on a shape (fx alone cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.window = 4
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool_proj = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.shape[-1] % self.window:
            x = nn.functional.pad(x, (0, self.window - x.shape[-1] % self.window))
        x = self.pool_proj(nn.functional.avg_pool2d(x, self.window))
        return self.head(x.mean((2, 3)))


def test_branch_on_a_shape_is_traced_as_the_example_input_takes_it():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 10)  # 10 % 4: the padding branch
    net = ShapeBranch()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(net)  # plain fx fails on the branch
    model = slim.convert(net, RANGE, example_input=x).eval()
    _export_matches(model, x, [0.25, 0.5, 1.0])


class TorchMHANet(nn.Module):
    """Tokens through ``nn.MultiheadAttention`` (self-attention; ``batch_first`` either way), then an MLP."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, 64, 4, stride=4)
        self.norm = nn.LayerNorm(64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=batch_first)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)        # (N, L, C)
        if not self.batch_first:
            x = x.transpose(0, 1)                            # (L, N, C)
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return self.fc(x.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_multihead_attention_is_slimmed_by_heads(batch_first):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    net = TorchMHANet(batch_first)
    ref = copy.deepcopy(net).eval()
    model = slim.convert(net, RANGE, example_input=x).eval()
    with torch.no_grad():
        _same(model(x), ref(x))
    exports = _export_matches(model, x, [0.25, 0.5, 0.75, 1.0])
    for w, heads in ((0.25, 1), (0.5, 2), (1.0, 4)):
        a = exports[w].attn
        assert type(a) is nn.MultiheadAttention and (a.num_heads, a.head_dim, a.batch_first) == (heads, 16, batch_first)


class PartialShortcut(nn.Module):
    """ReXNet's shortcut into the first ``self.in_channels`` channels of a wider output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.in_channels = 16
        self.conv = nn.Conv2d(16, 24, 3, padding=1)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        s = self.stem(x)
        y = self.conv(s)
        y = torch.cat([y[:, 0:self.in_channels] + s, y[:, self.in_channels:]], dim=1)
        return self.head(y.mean((2, 3)))


def test_channel_slice_at_a_module_attribute():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = slim.convert(PartialShortcut(), RANGE, example_input=x).eval()
    exports = _export_matches(model, x, [0.25, 0.5, 0.75, 1.0])
    p = exports[0.5]
    assert p.in_channels == p.stem.out_channels < 16 and p.conv.out_channels < 24


class MultiQueryAttention(nn.Module):
    """One key / value head shared by every query head (multi-query attention): k and v keep the head dim."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * (dim // heads)), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).unsqueeze(1).chunk(2, dim=-1)            # (B, 1, N, head_dim) each
        y = nn.functional.scaled_dot_product_attention(q, k, v)    # broadcast over the query heads
        return self.proj(y.transpose(1, 2).reshape(B, N, -1))


def test_multi_query_attention_keeps_its_single_key_value_head_whole():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = slim.convert(TinyTokenNet(MultiQueryAttention()), RANGE, example_input=x).eval()
    exports = _export_matches(model, x, [0.25, 0.5, 1.0])
    p = exports[0.5].attn
    assert p.num_heads == 2 and p.kv.out_features == 32 and p.q.out_features == 32


class _Times1(nn.Module):
    def forward(self, t):
        return t * 1.0


def test_tied_parameter_cannot_be_parametrized_or_deleted_after_convert():
    """``torch.nn.utils.parametrize`` on a tied parameter (or ``del``) would put a whole tensor in front of the
    sliced reads: refused with a typed error, the model unchanged (it recursed without end); before convert the
    parametrized tensor is refused by convert."""
    from torch.nn.utils import parametrize

    net = ReadsChildParam().eval()
    x = torch.randn(2, 9, 4)
    slim.convert(net, RANGE, example_input=x)
    with torch.no_grad(), slim.width(0.5):
        y = net(x)
    cls = type(net.pos)
    for attempt in (lambda: parametrize.register_parametrization(net.pos, "table", _Times1()),
                    lambda: delattr(net.pos, "table")):
        with pytest.raises(slim.UnsupportedModuleError, match="table"):
            attempt()
    assert type(net.pos) is cls and not parametrize.is_parametrized(net.pos)
    with torch.no_grad(), slim.width(0.5):
        assert torch.equal(net(x), y)
    fresh = ReadsChildParam()
    parametrize.register_parametrization(fresh.pos, "table", _Times1())
    with pytest.raises(slim.UnsupportedModuleError, match="parametrizations.table"):
        slim.convert(fresh, RANGE, example_input=x)
    assert not any(hasattr(m, "slim_name") for m in fresh.modules())


def test_torchvision_maxvit_attention_keeps_whole_heads_and_the_full_logit_scale():
    """torchvision's MaxViT attention (``to_qkv`` / ``merge``, two einsums, relative bias per head) runs the kept
    heads; its logit scale is ``feat_dim ** -0.5`` of the full model, which the export keeps as its
    ``scale_factor``. It was refused (``einsum mixes channels``)."""
    pytest.importorskip("torchvision")
    from torchvision.models import maxvit as tvmaxvit

    torch.manual_seed(0)
    net = tvmaxvit.MaxVit((64, 64), 16, 4, [32, 64], [1, 1], head_dim=16, stochastic_depth_prob=0.0,
                          num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    _convert_keeps_width_one(net, x)
    slim.calibrate_bn(net, [torch.randn(4, 3, 64, 64)], widths=[0.25, 0.5])
    exports = _export_matches(net, x, [0.25, 0.5])
    attn = exports[0.5].get_submodule("blocks.1.layers.0.layers.window_attention.attn_layer.1")
    assert type(attn) is tvmaxvit.RelativePositionalMultiHeadAttention
    assert (attn.n_heads, attn.to_qkv.in_features, attn.relative_position_bias_table.shape[1]) == (2, 32, 2)
    assert attn.scale_factor == 64 ** -0.5


def _calls_at(model, layer, x, widths) -> dict:
    """``{w: (input, output)}`` of ``layer``'s call in ``model(x)`` at each width (no autograd)."""
    seen = []
    hook = layer.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    out = {}
    try:
        for w in widths:
            with slim.width(w), torch.no_grad():
                model(x)
            out[w] = seen[-1]
    finally:
        hook.remove()
    return out


def _fan_in_init(model):
    """Weights of scale 1 / sqrt(fan-in), vectors of scale 0.1: away from timm's init (std 0.02, zero biases, which
    leaves some outputs near 0), so a wrong row or column shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1 / max(1, p[0].numel()) ** 0.5) if p.dim() > 1 else p.normal_(0, 0.1)


# Found by benchmarks/coverage.py: FocalNet's modulation splits its packed f conv by the literal sizes
# [dim, dim, focal_level + 1], which the channel analysis refuses; its counterpart selects the three parts.
@pytest.mark.parametrize("post_norm", [False, True])
def test_focal_modulation_keeps_its_gates_and_exports_into_the_stock_focalnet(post_norm):
    pytest.importorskip("timm")
    from timm.models.focalnet import FocalNet

    import slim_plugins.integrations.timm  # noqa: F401

    kw = dict(depths=(1, 1, 1, 1), focal_levels=(2,) * 4, focal_windows=(3,) * 4, num_classes=7,
              use_post_norm_in_modulation=post_norm, normalize_modulator=post_norm)
    torch.manual_seed(0)
    model = FocalNet(embed_dim=32, **kw).eval()
    _fan_in_init(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    slim.convert(model, RANGE, example_input=x)
    mod = model.layers[0].blocks[0].modulation
    assert type(mod).__name__ == "SlimFocalModulation"
    with torch.no_grad():
        _same(model(x), ref, 0.0)
    exports = _export_matches(model, x, [0.25, 0.5, 1.0], tol=1e-5)
    for w, p in exports.items():
        assert not [k for k in p.layers[0].blocks[0].modulation.__dict__ if "cache" in k]  # no selections carried
        c = p.layers[0].blocks[0].modulation.dim
        assert c == round(32 * w) and p.layers[0].blocks[0].modulation.f.out_channels == 2 * c + 3
        stock = FocalNet(embed_dim=c, **kw).eval()
        stock.load_state_dict(p.state_dict(), strict=True)
        with slim.width(w), torch.no_grad():
            _same(stock(x), model(x), 1e-5)
    # training at 0.5 reaches q's, ctx's active rows and every gate row of f, nothing else
    model.train()
    f = mod.f
    with slim.width(0.5):
        model(x).sum().backward()
    rows = f.weight.grad.abs().sum((1, 2, 3)) > 0
    want = torch.zeros(2 * 32 + 3, dtype=torch.bool)
    want[:16] = want[32:48] = want[64:] = True
    assert torch.equal(rows, want)
    assert (f.weight.grad[:, 16:] == 0).all() and (f.weight.grad[:, :16] != 0).any()
    # the eval cache sees an in-place write to a child's weight
    model.eval()
    seen = []
    mod.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    with slim.width(0.5), torch.no_grad():
        model(x)
        mod.f.weight[16:32].mul_(3)  # q of channels that width 0.5 does not run: no effect
        model(x)
        mod.f.weight[:16].mul_(3)  # q of the active channels
        y = model(x)
        _same(seen[1][1], seen[0][1], 0.0)
        assert (seen[2][1] - seen[0][1]).abs().max() > 1e-2
        p = slim.export(model, 0.5)
        _same(p.layers[0].blocks[0].modulation(seen[2][0]), seen[2][1], 1e-5)
        _same(y, p(x), 1e-5)


# Found by benchmarks/coverage.py --set timm-variants: MobileViT v2's LinearSelfAttention splits its packed qkv_proj
# by the literal sizes [1, dim, dim]; its counterpart keeps the query row and selects key / value.
def test_linear_self_attention_keeps_its_query_row_and_exports_into_the_stock_layer():
    timm = pytest.importorskip("timm")
    from timm.models.mobilevit import LinearSelfAttention

    import slim_plugins.integrations.timm  # noqa: F401
    from slim_plugins.errors import InvalidArgumentError

    torch.manual_seed(0)
    model = timm.create_model("mobilevitv2_050", num_classes=7).eval()
    _fan_in_init(model)
    x = torch.randn(2, 3, 64, 64)
    _convert_keeps_width_one(model, x)
    mod = model.stages[2][1].transformer[0].attn
    assert type(mod).__name__ == "SlimLinearSelfAttention" and mod.embed_dim == 64
    slim.calibrate_bn(model, [torch.randn(4, 3, 64, 64)], widths=[0.25, 0.5])
    exports = _export_matches(model, x, [0.25, 0.5, 1.0], tol=1e-5)
    calls = _calls_at(model, mod, x, exports)
    for w, p in exports.items():
        xin, out = calls[w]
        a = p.stages[2][1].transformer[0].attn
        c = xin.shape[1]
        assert type(a) is LinearSelfAttention and a.embed_dim == c and a.qkv_proj.out_channels == 2 * c + 1
        assert c < 64 or w == 1.0
        stock = LinearSelfAttention(embed_dim=c).eval()
        stock.load_state_dict(a.state_dict(), strict=True)
        with torch.no_grad():
            _same(stock(xin), out, 1e-5)
    # training at 0.5 reaches the query row and active key / value rows of qkv_proj (a channel whose ReLU(value)
    # is 0 everywhere passes no gradient to its key), nothing else
    model.train()
    with slim.width(0.5):
        model(x).sum().backward()
    c = calls[0.5][0].shape[1]
    rows = mod.qkv_proj.weight.grad.abs().sum((1, 2, 3)) > 0
    want = torch.zeros(2 * 64 + 1, dtype=torch.bool)
    want[:1 + c] = want[65:65 + c] = True
    assert not (rows & ~want).any() and rows[0] and rows[1:1 + c].any() and rows[65:65 + c].any()
    assert (mod.qkv_proj.weight.grad[:, c:] == 0).all() and (mod.out_proj.weight.grad[c:] == 0).all()
    with pytest.raises(InvalidArgumentError, match="x_prev"):
        mod(calls[0.25][0], calls[0.25][0])


# Found by benchmarks/coverage.py: VOLO's outlook attention unfolds its value map (C x k^2 rows per window) and its
# class attention reshapes by the literal head count; both counterparts run the kept heads.
def test_volo_outlook_and_class_attention_run_whole_heads_and_export_into_the_stock_layers():
    timm = pytest.importorskip("timm")
    from timm.models.volo import ClassAttention, OutlookAttention

    import slim_plugins.integrations.timm  # noqa: F401
    from slim_plugins.errors import NotExactError

    torch.manual_seed(0)
    model = timm.create_model("volo_d1_224", num_classes=7, img_size=64).eval()
    _fan_in_init(model)
    x = torch.randn(2, 3, 64, 64)
    _convert_keeps_width_one(model, x)
    outlook, cls_attn = model.network[0][0].attn, model.post_network[0].attn
    assert (type(outlook).__name__, type(cls_attn).__name__) == ("SlimOutlookAttention", "SlimVoloClassAttention")
    slim.calibrate_bn(model, [torch.randn(4, 3, 64, 64)], widths=[0.25, 0.5])
    exports = _export_matches(model, x, [0.25, 0.5, 1.0], tol=1e-5)
    calls = {"outlook": _calls_at(model, outlook, x, exports), "cls": _calls_at(model, cls_attn, x, exports)}
    heads = []
    for w, p in exports.items():
        for name, stock_cls, plain in (("outlook", OutlookAttention, p.network[0][0].attn),
                                       ("cls", ClassAttention, p.post_network[0].attn)):
            xin, out = calls[name][w]
            c = xin.shape[-1]
            assert type(plain) is stock_cls and plain.num_heads * 32 == c  # head_dim 32 kept
            kw = dict(kernel_size=plain.kernel_size, padding=plain.padding, stride=plain.stride,
                      qkv_bias=plain.v.bias is not None) if name == "outlook" else dict(qkv_bias=plain.q.bias is not None)
            stock = stock_cls(c, num_heads=c // 32, **kw).eval()
            stock.load_state_dict(plain.state_dict(), strict=True)
            with torch.no_grad():
                _same(stock(xin), out, 1e-5)
            heads.append(plain.num_heads)
    assert heads == [2, 3, 3, 6, 6, 12]  # 0.25 / 0.5 / 1.0 of 6 and 12 heads, rounded up to whole heads
    # training at 0.5 reaches the rows of the kept heads only: 3 of 6 heads x 3^4 aggregation weights; k and v of
    # 6 of 12 heads
    model.train()
    with slim.width(0.5):
        model(x).sum().backward()
    rows = outlook.attn.weight.grad.abs().sum(1) > 0
    assert rows[:3 * 81].all() and not rows[3 * 81:].any()
    rows = cls_attn.kv.weight.grad.abs().sum(1) > 0
    want = torch.zeros(2 * 384, dtype=torch.bool)
    want[:192] = want[384:576] = True
    assert not (rows & ~want).any() and rows[:192].any() and rows[384:576].any()
    model.eval()
    with pytest.raises(NotExactError, match="whole heads of 32"):
        outlook(torch.randn(1, 8, 8, 48))  # 48 channels at full width: 1.5 heads


# Found by benchmarks/coverage.py: HaloNet's HaloAttn and BoTNet's BottleneckAttn merge their heads into the batch
# dim by the literal head count.
@pytest.mark.parametrize("kind,stride", [("halo", 1), ("halo", 2), ("bottleneck", 1), ("bottleneck", 2)])
def test_conv_heads_attention_runs_whole_heads_and_exports_into_the_stock_layer(kind, stride):
    pytest.importorskip("timm")
    from timm.layers.bottleneck_attn import BottleneckAttn
    from timm.layers.halo_attn import HaloAttn

    import slim_plugins.integrations.timm  # noqa: F401
    from slim_plugins.errors import NotExactError

    # head dims qk 4 / v 8, so a head's q, k and v rows differ in number
    if kind == "halo":
        def make(c, heads):
            return HaloAttn(c, num_heads=heads, dim_head=4, block_size=4, halo_size=1, stride=stride, qkv_bias=True)
    else:
        def make(c, heads):
            return BottleneckAttn(c, feat_size=(16, 16), num_heads=heads, dim_head=4, stride=stride, qkv_bias=True)

    class Attnlet(nn.Module):
        def __init__(self, c=32):
            super().__init__()
            self.stem = nn.Conv2d(3, c, 3, padding=1)
            self.attn = make(c, 4)
            self.head = nn.Linear(c, 5)

        def forward(self, x):
            return self.head(self.attn(self.stem(x).relu()).mean((2, 3)))

    torch.manual_seed(0)
    model = Attnlet().eval()
    _fan_in_init(model)
    x = torch.randn(2, 3, 16, 16)
    _convert_keeps_width_one(model, x)
    assert type(model.attn).__name__ == {"halo": "SlimHaloAttn", "bottleneck": "SlimBottleneckAttn"}[kind]
    exports = _export_matches(model, x, [0.25, 0.5, 0.75, 1.0], tol=1e-5)
    calls = _calls_at(model, model.attn, x, exports)
    for w, p in exports.items():
        xin, out = calls[w]
        h = xin.shape[1] // 8
        assert type(p.attn) is type(make(8, 1)) and p.attn.num_heads == h == round(4 * w) and out.shape[1] == 8 * h
        stock = make(8 * h, h).eval()
        stock.load_state_dict(p.attn.state_dict(), strict=True)
        with torch.no_grad():
            _same(stock(xin), out, 1e-5)
    # training at 0.5 reaches the rows of the first 2 of 4 heads
    model.train()
    with slim.width(0.5):
        model(x).sum().backward()
    if kind == "halo":  # q rows 0-7; kv rows 0-23 ([k 4, v 8] per head)
        rows = {"q": [True] * 8 + [False] * 8, "kv": [True] * 24 + [False] * 24}
    else:  # qkv = [q 16 | k 16 | v 32]: q 0-7, k 16-23, v 32-47
        rows = {"qkv": ([True] * 8 + [False] * 8) * 2 + [True] * 16 + [False] * 16}
    for name, want in rows.items():
        assert (getattr(model.attn, name).weight.grad.abs().sum((1, 2, 3)) > 0).tolist() == want, name
    with pytest.raises(NotExactError, match="whole blocks of 4" if kind == "halo" else "position embedding"):
        model.attn(torch.randn(1, 32, 6, 6))


# Found by benchmarks/coverage.py: Sequencer's LSTM2d holds nn.LSTMs, which had no counterpart.
@pytest.mark.parametrize("union,bidirectional", [("cat", True), ("add", True), ("cat", False), ("vertical", True)])
def test_lstm2d_runs_the_hidden_units_of_its_width_and_exports_into_the_stock_layer(union, bidirectional):
    pytest.importorskip("timm")
    from timm.models.sequencer import LSTM2d

    import slim_plugins.integrations.timm  # noqa: F401
    from slim_plugins.errors import NotExactError

    class Seqlet(nn.Module):
        def __init__(self, c=32):
            super().__init__()
            self.stem = nn.Linear(3, c)
            self.rnn = LSTM2d(c, c // 4, union=union, bidirectional=bidirectional)
            self.head = nn.Linear(c, 5)

        def forward(self, x):  # x: (N, H, W, 3)
            x = self.stem(x).relu()
            return self.head((x + self.rnn(x)).mean((1, 2)))

    torch.manual_seed(0)
    model = Seqlet().eval()
    _fan_in_init(model)
    x = torch.randn(2, 5, 6, 3)
    _convert_keeps_width_one(model, x)
    assert type(model.rnn).__name__ == "SlimLSTM2d"
    exports = _export_matches(model, x, [0.25, 0.5, 0.75, 1.0], tol=1e-5)
    calls = _calls_at(model, model.rnn, x, exports)
    for w, p in exports.items():
        xin, out = calls[w]
        c = xin.shape[-1]
        assert c == round(32 * w) and type(p.rnn) is LSTM2d and p.rnn.hidden_size == c // 4
        stock = LSTM2d(c, c // 4, union=union, bidirectional=bidirectional).eval()
        stock.load_state_dict(p.rnn.state_dict(), strict=True)
        with torch.no_grad():
            _same(stock(xin), out, 1e-5)
    # training at 0.5 (16 channels, 4 of 8 hidden units) reaches the first 4 units of each gate
    model.train()
    with slim.width(0.5):
        model(x).sum().backward()
    want = ([True] * 4 + [False] * 4) * 4  # gates i, f, g, o
    for name in ("weight_ih_l0", "weight_hh_l0") + (("weight_ih_l0_reverse",) if bidirectional else ()):
        assert (getattr(model.rnn.rnn_v, name).grad.abs().sum(1) > 0).tolist() == want, name
    assert (model.rnn.rnn_v.weight_ih_l0.grad[:, 16:] == 0).all()
    with pytest.raises(NotExactError, match="multiple of 4"):
        model.rnn(torch.randn(1, 2, 2, 30))


def test_every_registered_counterpart_pickles_by_name(tmp_path):
    """``torch.save(model)`` pickles each layer's class by its module and qualified name: a counterpart defined
    inside a registering function (it needs its framework imported) was not found (torchvision Swin / MaxViT, timm
    Swin window attention)."""
    import pickle

    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    import slim_plugins.integrations.timm  # noqa: F401
    import slim_plugins.integrations.torchvision  # noqa: F401
    from slim_plugins import registry

    classes = set(registry.converters().values())
    assert len(classes) > 20
    for cls in classes:
        assert pickle.loads(pickle.dumps(cls)) is cls, cls.__qualname__
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer([4, 4], 32, [1, 1], [2, 4], [4, 4], num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    slim.convert(model, RANGE, example_input=x)
    torch.save(model, tmp_path / "swin.pt")
    back = torch.load(tmp_path / "swin.pt", weights_only=False)
    with slim.width(0.5), torch.no_grad():
        _same(back(x), model(x), 0.0)


# Found by benchmarks/coverage.py: MViTv2's pooling attention folds its heads into the batch dim for the pooling
# convs (reshape_pre_pool by the literal head count), and at a stage's first block it widens (dim -> dim_out).
@pytest.mark.parametrize("cls_token,mode", [(False, "conv"), (True, "conv"), (False, "max")])
def test_mvit_pooling_attention_widens_in_whole_heads_and_exports_into_the_stock_layer(cls_token, mode):
    pytest.importorskip("timm")
    from timm.models.mvitv2 import MultiScaleAttention, MultiScaleVit, MultiScaleVitCfg

    import slim_plugins.integrations.timm  # noqa: F401

    torch.manual_seed(0)
    cfg = MultiScaleVitCfg(depths=(1, 2, 2), embed_dim=32, num_heads=2, use_cls_token=cls_token, mode=mode)
    model = MultiScaleVit(cfg, img_size=32, num_classes=5).eval()  # head_dim 16 in every stage
    _fan_in_init(model)
    x = torch.randn(2, 3, 32, 32)
    _convert_keeps_width_one(model, x)
    attn = model.stages[1].blocks[0].attn  # 32 -> 64 channels, 4 heads at full width
    assert type(attn).__name__ == "SlimMultiScaleAttention"
    exports = _export_matches(model, x, [0.25, 0.5, 1.0], tol=1e-5)
    seen = []
    hook = attn.register_forward_hook(lambda m, i, o: seen.append((i[0], o[0])))
    dims = []
    try:
        for w, p in exports.items():
            with slim.width(w), torch.no_grad():
                model(x)
            xin, out = seen[-1]
            plain = p.stages[1].blocks[0].attn
            c_in, c_out = xin.shape[-1], out.shape[-1]
            assert type(plain) is MultiScaleAttention and plain.num_heads * 16 == c_out  # head_dim kept
            q, k = plain.pool_q, plain.pool_k
            stock = MultiScaleAttention(c_in, c_out, (8, 8), num_heads=c_out // 16, mode=mode,
                                        kernel_q=tuple(q.kernel_size), kernel_kv=tuple(k.kernel_size),
                                        stride_q=tuple(q.stride), stride_kv=tuple(k.stride),
                                        has_cls_token=cls_token,
                                        norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps)).eval()
            stock.load_state_dict(plain.state_dict(), strict=True)
            with torch.no_grad():
                y, size = stock(xin, [8, 8])
            _same(y, out, 1e-5)
            assert size == [4, 4]
            dims.append((c_in, c_out))
    finally:
        hook.remove()
    assert dims == [(16, 16), (16, 32), (32, 64)]  # 1 / 2 / 4 heads; stage 0 keeps one whole head of 16
    # training at 0.5 reaches the rows of the 2 kept heads of q, k and v only, and the columns of stage 0's 16
    model.train()
    with slim.width(0.5):
        model(x).sum().backward()
    g = attn.qkv.weight.grad.view(3, 64, 32).abs()
    assert (g[:, :32, :16].sum(-1) > 0).all() and g[:, 32:].sum() == 0 and g[:, :, 16:].sum() == 0


@pytest.mark.parametrize("name", ["vit", "focalnet"])
def test_widening_a_model_with_attention_or_focal_modulation_is_refused(name):
    """Above width 1.0 a counterpart that selects from its own child layers (qkv / proj, FocalNet's f / h / proj)
    would read past their rows (an untyped IndexError / shape error at the first wide forward); convert refuses
    it, typed, and leaves the model as it was."""
    timm = pytest.importorskip("timm")
    import slim_plugins.integrations.timm  # noqa: F401

    from slim_plugins.errors import WidthError

    torch.manual_seed(0)
    if name == "vit":
        model = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8,
                                  class_token=False, pos_embed="none", global_pool="avg").eval()
    else:
        from timm.models.focalnet import FocalNet

        model = FocalNet(depths=(1, 1, 1, 1), embed_dim=32, focal_levels=(2,) * 4, focal_windows=(3,) * 4,
                         num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    with pytest.raises(WidthError, match="above 1.0.*select from their own child layers"):
        slim.convert(model, slim.WidthSpec.range(0.5, 1.5), example_input=x)
    assert not any(type(m).__module__.startswith("slim_plugins") for m in model.modules())
    with torch.no_grad():
        _same(model(x), ref, 0.0)


def _set_fused(model, fused: bool):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def _away_from_init(model, fused: bool):
    """Random weights of scale 0.2 (timm's init leaves biases / tables at 0) and the attention path ``fused``."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    _set_fused(model, fused)


# Found by benchmarks/coverage.py: the SAM image encoder's attention (channels-last windows, decomposed relative
# position tables per head dim) was refused at its head reshape.
@pytest.mark.parametrize("kw,fused", [(dict(use_rel_pos=True, qk_norm=True), True),
                                      (dict(use_rel_pos=True), False),
                                      (dict(use_rope=True), True)])
def test_sam_attention_is_slimmed_by_heads_and_exports_into_the_stock_encoder(kw, fused):
    pytest.importorskip("timm")
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    import slim_plugins.integrations.timm  # noqa: F401

    arch = dict(img_size=64, patch_size=8, depth=3, window_size=4, global_attn_indexes=(1,), num_classes=7, **kw)
    torch.manual_seed(0)
    model = VisionTransformerSAM(embed_dim=64, num_heads=4, neck_chans=32, **arch).eval()
    _away_from_init(model, fused)  # (timm's init: zero relative tables, near-zero outputs)
    x = torch.randn(2, 3, 64, 64)
    _convert_keeps_width_one(model, x)
    attn = model.blocks[1].attn
    assert type(attn).__name__ == "SlimSamAttention"
    exports = _export_matches(model, x, [0.25, 0.5, 0.75], tol=1e-5)
    for w, p in exports.items():
        heads = round(4 * w)
        a = p.blocks[1].attn
        assert (a.num_heads, a.head_dim, a.qkv.in_features) == (heads, 16, 16 * heads)
        if kw.get("use_rel_pos"):  # per head dim, shared by the heads: whole
            assert torch.equal(a.rel_pos_h, attn.rel_pos_h.detach())
        stock = VisionTransformerSAM(embed_dim=16 * heads, num_heads=heads, neck_chans=round(32 * w), **arch).eval()
        _set_fused(stock, fused)
        stock.load_state_dict(p.state_dict(), strict=True)
        with slim.width(w), torch.no_grad():
            _same(stock(x), model(x), 1e-5)


# Found trying timm's rotary ViTs / EVA-02 beyond the smallest model per family: EvaAttention adds its qkv bias
# through F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias)), which kept every head of every block whole.
@pytest.mark.parametrize("kw,fused", [(dict(use_rot_pos_emb=True), True),
                                      (dict(use_rot_pos_emb=True, scale_attn_inner=True, qk_norm=True), False),
                                      (dict(use_rot_pos_emb=False, class_token=False, global_pool="avg",
                                            qkv_bias=False), True),
                                      (dict(use_rot_pos_emb=True, attn_type="rope", init_values=1e-1), False),
                                      (dict(use_rot_pos_emb=True, attn_type="rope", scale_attn_inner=True), True)])
def test_eva_attention_is_slimmed_by_heads_and_exports_into_the_stock_model(kw, fused):
    pytest.importorskip("timm")
    from timm.models.eva import Eva

    import slim_plugins.integrations.timm  # noqa: F401

    arch = dict(img_size=32, patch_size=8, depth=2, num_classes=5, swiglu_mlp=True, ref_feat_shape=(4, 4), **kw)
    torch.manual_seed(0)
    model = Eva(embed_dim=64, num_heads=4, **arch).eval()
    _away_from_init(model, fused)  # (timm's init: zero biases)
    x = torch.randn(2, 3, 32, 32)
    _convert_keeps_width_one(model, x)
    attn = model.blocks[0].attn
    assert type(attn).__name__ == ("SlimAttentionRope" if kw.get("attn_type") == "rope" else "SlimEvaAttention")
    exports = _export_matches(model, x, [0.25, 0.5, 0.75], tol=1e-5)
    for w, p in exports.items():
        heads = round(4 * w)
        a = p.blocks[0].attn
        assert (a.num_heads, a.head_dim, a.qkv.in_features, a.qkv.out_features) == (heads, 16, 16 * heads, 48 * heads)
        stock = Eva(embed_dim=16 * heads, num_heads=heads, **arch).eval()
        _set_fused(stock, fused)
        stock.load_state_dict(p.state_dict(), strict=True)
        with slim.width(w), torch.no_grad():
            _same(stock(x), model(x), 1e-5)
    # the eval cache sees an in-place write to a kept head's v bias
    v_bias = getattr(attn, "v_bias", None)
    if v_bias is None and attn.qkv.bias is not None:  # AttentionRope: qkv's own bias
        v_bias = attn.qkv.bias[128:]
    if v_bias is not None:
        with slim.width(0.5), torch.no_grad():
            y0 = model(x)
            v_bias[16:].add_(torch.randn(48))  # heads 1..3: width 0.5 runs heads 0 and 1
            y1 = model(x)
            _same(y1, slim.export(model, 0.5)(x), 1e-5)
            assert (y1 - y0).abs().max() > 1e-3


def test_grouped_query_rope_attention_is_refused_typed():
    """``AttentionRope`` with grouped-query k / v (separate projections) has no counterpart yet: convert traces
    into it as before and refuses the ``repeat_interleave`` of the kv heads, typed, leaving the model as it was."""
    pytest.importorskip("timm")
    from timm.models.eva import Eva

    import slim_plugins.integrations.timm  # noqa: F401

    torch.manual_seed(0)
    model = Eva(img_size=32, patch_size=8, depth=1, num_classes=5, embed_dim=64, num_heads=4, num_kv_heads=2,
                qkv_fused=False, attn_type="rope", ref_feat_shape=(4, 4)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    with pytest.raises(slim.NotExactError, match="repeat_interleave"):
        slim.convert(model, RANGE, example_input=x)
    assert type(model.blocks[0].attn).__name__ == "AttentionRope"
    with torch.no_grad():
        _same(model(x), ref, 0.0)


def test_lambda_layer_head_count_is_refused_naming_it():
    """timm's ``LambdaLayer`` (LambdaNets) reads ``num_heads`` where q (heads x dim_qk) and the output (heads x
    dim_v) are sized: two channel sets of different widths at one head count. Refused, typed, naming the head
    count and its module (the message said "layer 'lam.num_heads' is called at several places"), the model left as
    it was."""
    pytest.importorskip("timm")
    from timm.layers.lambda_layer import LambdaLayer

    import slim_plugins.integrations.timm  # noqa: F401

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1),
                          LambdaLayer(32, num_heads=4, dim_head=8, r=None, feat_size=(8, 8)), nn.Conv2d(32, 5, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    with pytest.raises(slim.NotExactError, match=r"'num_heads' of module '1' \(a parameter or head count"):
        slim.convert(model, RANGE, example_input=x)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is LambdaLayer and model[1].num_heads == 4
    with torch.no_grad():
        _same(model(x), ref, 0.0)


@pytest.mark.parametrize("dim,heads,pool_heads,stream_050", [(64, 4, 8, 32), (48, 3, 2, 48)])
def test_attention_pool_heads_and_block_heads_share_the_stream_units(dim, heads, pool_heads, stream_050):
    """An attention pool (``global_pool='map'``) merges its heads back into the token stream that the blocks'
    attention reads in whole heads: both head sizes are units of the stream. Found on Perception Encoder (pool
    heads of 24, block heads of 64): the units did not pass back through the merge of heads, so the plan gave
    the stream 48 channels, not whole block heads, and the forward raised at width 0.25."""
    pytest.importorskip("timm")
    from timm.models.eva import Eva

    import slim_plugins.integrations.timm  # noqa: F401

    torch.manual_seed(0)
    model = Eva(img_size=32, patch_size=8, depth=1, num_classes=5, embed_dim=dim, num_heads=heads,
                global_pool="map", attn_pool_num_heads=pool_heads, class_token=False).eval()
    x = torch.randn(2, 3, 32, 32)
    _convert_keeps_width_one(model, x)
    exports = _export_matches(model, x, [0.25, 0.5, 0.75], tol=1e-5)
    assert exports[0.5].blocks[0].attn.qkv.in_features == stream_050
    for p in exports.values():
        assert p.blocks[0].attn.qkv.in_features % (dim // heads) == 0
        assert p.blocks[0].attn.qkv.in_features % (dim // pool_heads) == 0
