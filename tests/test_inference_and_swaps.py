"""Tensors the user's process makes or swaps in ways our caches must follow, as the plain model does.

- Made under ``torch.inference_mode()`` (a serving process that builds or copies its model there): such tensors
  keep no in-place write counter, so nothing selected from them is reused, and convert's check that the
  analysis forward leaves the weights alone compares values instead. These tests failed before the fix with
  ``RuntimeError: Inference tensors do not track version counter``.
- Swapped by ``p.data = t`` or ``torch.utils.swap_tensors`` (``module.to()`` under
  ``torch.__future__.set_swap_module_params_on_conversion(True)``): no cached selection (nor the analysis'
  eager values) may hold a parameter's tensor, which swap_tensors refuses to swap while referenced. These failed
  with ``RuntimeError: _apply(): Couldn't swap ...``; a switchable BN reused views of the old storage after
  ``bn.weight.data = t``.
- Swapped keeping the parameter object (``swap_tensors`` by hand, ``.to()`` / ``load_state_dict`` under
  swap-on-conversion) with a tensor whose write counter equals the old one's: the stamps see the swap itself
  (the old selection was reused: the old output, or a dtype mismatch after ``.to(torch.float64)``), and the
  parameters stay SlimParameters (swap_tensors swaps their class as well).
- Put in or computed by torch's own utilities: ``torch.func.functional_call`` (other tensor objects in
  ``_parameters`` / ``_buffers``, without ``__setattr__``) and ``torch.nn.utils.parametrize`` registered on a
  converted layer (the tensor is computed at every read, and is no longer in ``_parameters``).
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import slim_plugins as slim


def _cnn(c=16):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))


def _vit():  # LayerNorm, attention heads, class token and position embedding (hosted reads)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)


@pytest.mark.parametrize("build", [_cnn, _vit], ids=["cnn_bn", "vit"])
def test_model_built_under_inference_mode_converts_and_runs(build, mad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        net = build().eval()
        assert next(net.parameters()).is_inference()
        ref = net(x)
        model = slim.convert(net, slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
        assert mad(model(x), ref) == 0  # the analysis left the model as it was
        for w in (0.5, 1.0, 0.5):  # twice at 0.5: a second call would reuse a selection if one were kept
            slim.set_width(model, w)
            exported = slim.export(model, w, example_input=x).eval()
            assert mad(model(x), exported(x)) == 0, w
            assert mad(model(x), exported(x)) == 0, w


def test_deepcopy_under_inference_mode_runs(mad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(_vit().eval(), slim.WidthSpec.range(0.25, 1.0), example_input=x).eval()
    slim.set_width(model, 0.5)
    with torch.inference_mode():
        y = model(x)
        twin = copy.deepcopy(model)
        assert next(twin.parameters()).is_inference()
        assert mad(twin(x), y) == 0
        assert mad(twin(x), y) == 0


def test_inference_tensor_assigned_to_data_after_a_cached_call(mad):
    """A selection cached from a normal parameter is not reused once ``.data`` holds an inference tensor."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(_vit().eval(), slim.WidthSpec.range(0.25, 1.0), example_input=x).eval()
    slim.set_width(model, 0.5)
    fc = model.blocks[0].mlp.fc1
    with torch.inference_mode():
        y0 = model(x)
        model(x)  # the selections are cached now
        for p in (fc.weight, model.pos_embed, model.blocks[0].attn.qkv.weight, model.blocks[0].norm1.weight):
            p.data = torch.randn(p.shape)
            assert p.is_inference()
        y1 = model(x)
        exported = slim.export(model, 0.5, example_input=x).eval()
        assert mad(y1, exported(x)) == 0
        assert mad(model(x), y1) == 0
        for p in (fc.weight, model.pos_embed, model.blocks[0].attn.qkv.weight, model.blocks[0].norm1.weight):
            p.mul_(-1)  # in place, inside inference mode: no write counter moves
        y2 = model(x)
        assert mad(y2, slim.export(model, 0.5, example_input=x).eval()(x)) == 0
    assert mad(y0, y1) > 1e-3 and mad(y1, y2) > 1e-3


@pytest.mark.parametrize("name", ["3.weight", "blocks.0.mlp.fc1.weight", "pos_embed", "blocks.0.attn.qkv.weight",
                                  "blocks.0.norm1.weight"])
def test_parameter_swapped_with_an_inference_tensor_after_a_cached_call(name, mad):
    """``torch.utils.swap_tensors`` with a tensor made under inference mode: the parameter object stays, its
    write counter is gone (reading it raises), and the cached selection is not reused."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    net = _cnn() if name == "3.weight" else _vit()
    model = slim.convert(net.eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    slim.set_width(model, 0.5)
    p = model.get_parameter(name)
    with torch.inference_mode():
        y0 = model(x)
        model(x)
        new = nn.Parameter(torch.randn(p.shape))
    torch.utils.swap_tensors(p, new)
    with torch.inference_mode():
        y1 = model(x)
        assert mad(y1, slim.export(model, 0.5, example_input=x).eval()(x)) == 0
    assert mad(y0, y1) > 1e-3


class _WritesWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        with torch.no_grad():
            self.conv.weight.mul_(0.5)  # a forward that changes its own weights
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("inference", [False, True], ids=["normal", "inference_tensors"])
def test_analysis_forward_writing_weights_is_refused(inference):
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode(inference):
        net = _WritesWeight()
        with pytest.raises(slim.ExampleInputError, match=r"wrote parameters \['weight'\] of Conv2d"):
            slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=x)
        assert type(net.conv) is nn.Conv2d  # refused before any module was replaced


def test_inference_tensor_model_holding_nan_converts():
    """A NaN parameter (a diverged checkpoint being inspected) is not a write: convert compares the values of
    inference tensors, and compared them with ``torch.equal`` (NaN != NaN) before the fix."""
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        net = _cnn().eval()
        net[8].bias[1] = float("nan")
        ref = net(x)
        model = slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=x).eval()
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0, equal_nan=True)
        assert ref[0, 1].isnan() and not ref[0, 0].isnan()


@pytest.mark.parametrize("build", [_cnn, _vit], ids=["cnn_bn", "vit"])
def test_to_with_swap_on_conversion_after_eval_calls(build, mad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(build().eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    with torch.no_grad():
        for w in (0.5, 0.5, 1.0):  # selections cached at 0.5
            with slim.width(w):
                model(x)
        y32 = {w: slim.export(model, w, example_input=x).eval()(x) for w in (0.5, 1.0)}
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    x64 = x.double()
    with torch.no_grad():
        for w in (0.5, 1.0):
            with slim.width(w):
                y = model(x64)
            assert y.dtype == torch.float64
            assert mad(y, slim.export(model, w, example_input=x64).eval()(x64)) == 0
            assert mad(y.float(), y32[w]) < 1e-4


def _shufflenet_bn():
    """ShuffleNetV2 as an S-Net at 0.5, one of its BNs whose selection is an index gather, and an input for it."""
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    net = torchvision.models.shufflenet_v2_x0_5(num_classes=5).eval()
    model = slim.convert(net, slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    slim.set_width(model, 0.5)
    name = "stage2.0.branch2.6"
    bn = model.get_submodule(name)
    h = torch.randn(2, slim.export(model, 0.5, example_input=x).get_submodule(name).num_features, 8, 8)
    return model, x, name, bn, h


def test_index_gathered_bn_weight_swapped_with_an_inference_tensor(mad):
    """ShuffleNetV2's channel shuffle makes BN selections index gathers (their own cache of selections)."""
    model, x, name, bn, h = _shufflenet_bn()
    with torch.inference_mode():
        model(x)
        y0 = bn(h)
        assert any(hit[1] is not None for hit in bn._eval_cache.values())  # a gathered selection is cached
        new = nn.Parameter(torch.randn(bn.weight.shape) + 1)
    torch.utils.swap_tensors(bn.weight, new)
    with torch.inference_mode():
        y1 = bn(h)
        plain = slim.export(model, 0.5, example_input=x).eval()
        assert mad(y1, plain.get_submodule(name)(h)) == 0
        assert mad(model(x), plain(x)) == 0
    assert mad(y0, y1) > 1e-3


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_switchable_bn_affine_data_swap_after_a_cached_call(name, mad):
    """``bn.weight.data = t`` (pruning / weight surgery code): the cached prefix views of the old storage are
    not reused (before the fix they were: a different network until the width changed)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(_cnn(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    slim.set_width(model, 0.5)
    p = getattr(model[1], name)
    with torch.no_grad():
        y0 = model(x)
        model(x)
        p.data = torch.randn(p.shape) + 3
        y1 = model(x)
        assert mad(y1, slim.export(model, 0.5, example_input=x).eval()(x)) == 0
    assert mad(y0, y1) > 1e-3


# ---- swaps that keep the parameter object: torch.utils.swap_tensors by hand, .to() / load_state_dict under
# swap-on-conversion. The object, and possibly its write counter, look the same; its tensor is another one.

def _swap_on_conversion(fn):
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return fn()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def _with_counter(t: torch.Tensor, count: int) -> torch.Tensor:
    """``t`` after in-place writes that leave its values alone, until its write counter reads ``count``."""
    with torch.no_grad():
        while t._version < count:
            t.mul_(1)
    assert t._version == count
    return t


@pytest.mark.parametrize("name", ["3.weight", "4.bias", "blocks.0.mlp.fc1.weight", "pos_embed", "cls_token",
                                  "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.0.norm1.weight"])
def test_hand_made_swap_with_an_equal_write_counter_is_seen(name, mad):
    """Before the fix the cached selection was reused when the new tensor's write counter equalled the old one's
    (the old output, silently): the stamps now also see the swap itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    net = _cnn() if name[0].isdigit() else _vit()
    model = slim.convert(net.eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    slim.set_width(model, 0.5)
    p = model.get_parameter(name)
    with torch.no_grad():
        y0 = model(x)
        model(x)  # cached now
        new = nn.Parameter(_with_counter(torch.randn(p.shape) + 2, p._version))
    torch.utils.swap_tensors(p, new)  # refused while a cached selection holds p's tensor (unbased)
    with torch.no_grad():
        y1 = model(x)
        assert mad(y1, slim.export(model, 0.5, example_input=x).eval()(x)) == 0
    assert mad(y0, y1) > 1e-3


def test_index_gathered_bn_running_statistic_swapped_by_hand(mad):
    """A gathered BN selection is a copy that includes the running statistics: a hand-made swap is seen."""
    model, x, name, bn, h = _shufflenet_bn()
    with torch.no_grad():
        model(x)
        y0 = bn(h)
        assert any(hit[1] is not None for hit in bn._eval_cache.values())  # a gathered selection is cached
        old = bn.running_var
        new = _with_counter(old.detach().clone() * 4, old._version)
    torch.utils.swap_tensors(old, new)
    with torch.no_grad():
        y1 = bn(h)
        plain = slim.export(model, 0.5, example_input=x).eval()
        assert mad(y1, plain.get_submodule(name)(h)) == 0
        assert mad(model(x), plain(x)) == 0
    assert mad(y0, y1) > 1e-3


@pytest.mark.parametrize("build", [_cnn, _vit], ids=["cnn_bn", "vit"])
def test_to_with_swap_on_conversion_after_deepcopy(build, mad):
    """A deep copy's tensors start with write counters of 0, as do the ones ``.to()`` swaps in: before the fix the
    float32 selection was reused after ``.to(torch.float64)`` (``RuntimeError``: dtype mismatch). The parameters
    stay SlimParameters (swap_tensors swaps their class too), so a later ``.data`` swap is still seen."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(build().eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    twin = copy.deepcopy(model)
    slim.set_width(twin, 0.5)
    with torch.no_grad():
        twin(x)
    _swap_on_conversion(lambda: twin.to(torch.float64))
    tracked = {n: type(p) for n, p in model.named_parameters()}
    assert {n: type(p) for n, p in twin.named_parameters()} == tracked
    x64 = x.double()
    with torch.no_grad():
        y = twin(x64)
        assert y.dtype == torch.float64
        assert mad(y, slim.export(twin, 0.5, example_input=x64).eval()(x64)) == 0
        p = twin.get_parameter("3.weight" if build is _cnn else "blocks.0.mlp.fc1.weight")
        p.data = torch.randn(p.shape, dtype=p.dtype)
        y1 = twin(x64)
        assert mad(y1, slim.export(twin, 0.5, example_input=x64).eval()(x64)) == 0
    assert mad(y, y1) > 1e-3


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("build", [_cnn, _vit], ids=["cnn_bn", "vit"])
def test_load_state_dict_under_swap_on_conversion(build, assign, mad):
    """torch's ``load_state_dict`` swaps every parameter under swap-on-conversion (``Tensor.module_load``); with
    ``assign=True`` the new tensors are the state dict's, whose write counters may equal the old ones."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    spec = slim.WidthSpec.switches([0.5, 1.0])
    model = slim.convert(build().eval(), spec, example_input=x).eval()
    other = slim.convert(build().eval(), spec, example_input=x).eval()  # other weights (another seed draw)
    slim.set_width(model, 0.5)
    slim.set_width(other, 0.5)
    with torch.no_grad():
        y0 = model(x)
        model(x)
    sd = {k: v.detach().clone() for k, v in other.state_dict().items()}
    tracked = {n: type(p) for n, p in model.named_parameters()}
    _swap_on_conversion(lambda: model.load_state_dict(sd, assign=assign))
    assert {n: type(p) for n, p in model.named_parameters()} == tracked
    with torch.no_grad():
        y1 = model(x)
        assert mad(y1, slim.export(model, 0.5, example_input=x).eval()(x)) == 0
        assert mad(y1, other(x)) == 0
    assert mad(y0, y1) > 1e-3


@pytest.mark.parametrize("build", [_cnn, _vit], ids=["cnn_bn", "vit"])
def test_pickled_model_counts_data_writes(build, mad):
    """``torch.save(model)`` / ``torch.load``: torch rebuilds every parameter as a plain ``Parameter``. Before the
    fix the norms, attention and hosted tensors stayed plain, so ``p.data.mul_()`` (EMA code) went unseen by
    their cached selections."""
    import io

    from slim_plugins.nn.layers import SlimParameter

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(build().eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    twin = torch.load(buf, weights_only=False)
    assert {n: type(p) for n, p in twin.named_parameters()} == {n: SlimParameter for n, _ in model.named_parameters()}
    slim.set_width(twin, 0.5)
    with torch.no_grad():
        y0 = twin(x)
        twin(x)  # cached now
        for p in twin.parameters():
            p.data.mul_(1.5)
        y1 = twin(x)
        assert mad(y1, slim.export(twin, 0.5, example_input=x).eval()(x)) == 0
    assert mad(y0, y1) > 1e-3


# ---- tensors torch's own utilities put in or compute: torch.func.functional_call (other objects in _parameters /
# _buffers, without __setattr__) and torch.nn.utils.parametrize (computed at every read)

def _convnext():  # LayerNorm2d, channels-last Linear MLP, hosted layer scale (gamma)
    return timm.create_model("convnext_atto", num_classes=5)


@pytest.mark.parametrize("build", [_cnn, _vit, _convnext], ids=["cnn_bn", "vit", "convnext"])
def test_functional_call_without_grad(build, mad):
    """Before the fix a no-grad ``functional_call`` at a narrow width reused selections cached from the module's own
    tensors (conv / linear weight copies and BN statistics: the caches trusted ``__setattr__``)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(build().eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    slim.set_width(model, 0.5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model(x)
        model(x)  # cached now
        tensors = {k: v * 1.5 for k, v in model.named_parameters()}
        tensors.update({k: v * 2 for k, v in model.named_buffers() if v.is_floating_point()})
        y = functional_call(model, tensors, (x,))
        for k, v in twin.named_parameters():
            v.mul_(1.5)
        for k, v in twin.named_buffers():
            if v.is_floating_point():
                v.mul_(2)
        ref = twin(x)
        assert mad(y, ref) == 0
        assert mad(model(x), ref) > 1e-3  # the module's own tensors again
        assert mad(functional_call(model, tensors, (x,)), ref) == 0


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.full((), 2.0))

    def forward(self, t):
        # (+ a ramp over the channels: timm initialises some biases to zero, and a LayerNorm removes a constant)
        return (t + torch.linspace(0, 1, t.shape[-1], dtype=t.dtype)) * self.s


@pytest.mark.parametrize("name", ["0.bias", "3.weight", "4.weight", "8.weight", "blocks.0.attn.qkv.weight",
                                  "blocks.0.attn.proj.bias", "blocks.0.norm1.weight"])
def test_parametrization_registered_after_convert(name, mad):
    """``torch.nn.utils.parametrize`` on a converted layer after cached calls: the tensor is computed at every read.
    Before the fix a parametrized bias or norm weight was dropped (read from ``_parameters``, where it no longer is),
    the attention failed with ``KeyError``, and a conv's selection of the computed weight was cached (a change of
    the parametrization's own parameter went unseen)."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    net = _cnn() if name[0].isdigit() else _vit()
    model = slim.convert(net.eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    slim.set_width(model, 0.5)
    owner, _, attr = name.rpartition(".")
    layer = model.get_submodule(owner)
    with torch.no_grad():
        y0 = model(x)
        model(x)  # cached now
        parametrize.register_parametrization(layer, attr, _Scale())
        y1 = model(x)
        assert mad(y1, slim.export(model, 0.5, example_input=x).eval()(x)) == 0
        layer.parametrizations[attr][0].s.fill_(-3.0)
        y2 = model(x)
        assert mad(y2, slim.export(model, 0.5, example_input=x).eval()(x)) == 0
    assert mad(y0, y1) > 1e-4 and mad(y1, y2) > 1e-4
    y3 = model(x)  # with autograd: the same network
    assert mad(y3, y2) == 0


def _data_write_is_seen(model, x, mad, params=None):
    """A cached call, ``p.data.mul_()`` on ``params`` (default: all; EMA code), then the output must be the
    export's."""
    with torch.no_grad():
        y0 = model(x)
        model(x)  # cached now
        for p in model.parameters() if params is None else params:
            p.data.mul_(1.5)
        y1 = model(x)
        assert mad(y1, slim.export(model, 0.5, example_input=x).eval()(x)) == 0
    assert mad(y0, y1) > 1e-3


@pytest.mark.parametrize("build", [_cnn, _vit], ids=["cnn_bn", "vit"])
def test_load_state_dict_assign_then_data_writes(build, mad):
    """``load_state_dict(assign=True)`` puts plain Parameters in (an attention's qkv / proj children too, loaded
    after the attention itself); before the fix their ``.data`` writes went unseen by the cached selections."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(build().eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    slim.set_width(model, 0.5)
    _data_write_is_seen(model, x, mad)


@pytest.mark.parametrize("name", ["3.weight", "4.weight", "8.weight", "pos_embed", "blocks.0.norm1.weight",
                                  "blocks.0.attn.qkv.weight"])
def test_parameter_assigned_after_convert_then_data_writes(name, mad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    net = _cnn() if name[0].isdigit() else _vit()
    model = slim.convert(net.eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    owner, _, attr = name.rpartition(".")
    layer = model.get_submodule(owner)
    setattr(layer, attr, nn.Parameter(getattr(layer, attr).detach() + 0.5))
    from slim_plugins.nn.layers import SlimParameter

    # tracked (cached selections stay possible), except in an attention's plain qkv / proj child: used uncached
    assert (type(model.get_parameter(name)) is SlimParameter) == ("attn.qkv" not in name)
    slim.set_width(model, 0.5)
    _data_write_is_seen(model, x, mad, [model.get_parameter(name)])


def test_functional_call_leaves_the_callers_parameters_alone(mad):
    """The tensors a ``functional_call`` puts in are the caller's (here another model's Parameters): they are used
    uncached and keep their class (a SlimParameter would refuse ``nn.Parameter(p)``)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(_cnn().eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    theirs = {k: nn.Parameter(v.detach() * 1.5) for k, v in model.named_parameters()}
    slim.set_width(model, 0.5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model(x)
        y = functional_call(model, theirs, (x,))
        functional_call(model, theirs, (x,))
        for p in theirs.values():
            p.data.mul_(2)  # unseen by any counter: nothing of theirs may be cached
        y2 = functional_call(model, theirs, (x,))
        for p in twin.parameters():
            p.mul_(3)
        assert mad(y2, twin(x)) == 0
    assert {type(p) for p in theirs.values()} == {nn.Parameter}
    nn.Parameter(theirs["0.weight"])  # raised for a SlimParameter
    assert mad(y, y2) > 1e-3


@pytest.mark.parametrize("call", ["to_cpu", "float", "channels_last"])
def test_no_op_conversion_under_swap_on_conversion(call, mad):
    """``.to()`` that changes nothing: torch wraps the parameter itself in ``nn.Parameter()``, which refused a
    SlimParameter (``_apply(): Couldn't swap``)."""
    from slim_plugins.nn.layers import SlimParameter

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(_cnn().eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
    slim.set_width(model, 0.5)
    with torch.no_grad():
        y0 = model(x)
    fn = {"to_cpu": lambda: model.to("cpu"), "float": model.float,
          "channels_last": lambda: model.to(memory_format=torch.channels_last)}[call]
    _swap_on_conversion(fn)
    assert {type(p) for p in model.parameters()} == {SlimParameter}
    with torch.no_grad():
        assert mad(model(x), y0) < 1e-5


def test_us_bn_min_width_statistics_after_training(mad):
    """US-Nets BN at the min width reads ``min_mean`` / ``min_var``, updated in place by training at the min width
    (sandwich rule); the gathered selection cached in eval did not check them (0.04 off the export)."""
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    net = torchvision.models.shufflenet_v2_x0_5(num_classes=5).eval()
    model = slim.convert(net, slim.WidthSpec.range(0.5, 1.0), example_input=x)

    def train_step():
        model.train()
        with slim.width(0.5):
            model(torch.randn(4, 3, 64, 64) * 3 + 1)
        model.eval()

    train_step()
    with torch.no_grad(), slim.width(0.5):
        y0 = model(x)
        model(x)  # cached now
    for _ in range(3):
        train_step()
    with torch.no_grad(), slim.width(0.5):
        y1 = model(x)
        assert mad(y1, slim.export(model, 0.5, example_input=x).eval()(x)) == 0
    assert mad(y0, y1) > 1e-3


def test_parametrized_rmsnorm_and_pruned_norm(mad):
    """A norm without a bias (RMSNorm) under a parametrization raised AttributeError; a norm pruned with
    ``torch.nn.utils.prune`` (its weight a plain attribute) ran without its weight."""
    import torch.nn.utils.prune as prune
    from torch.nn.utils import parametrize

    class Net(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.inp, self.norm, self.out = nn.Linear(8, 32), norm, nn.Linear(32, 5)
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 2)

        def forward(self, x):
            return self.out(self.norm(self.inp(x)).mean(1))

    x = torch.randn(2, 6, 8)
    for norm, edit in ((nn.RMSNorm(32), lambda n: parametrize.register_parametrization(n, "weight", _Scale())),
                       (nn.LayerNorm(32), lambda n: prune.l1_unstructured(n, "weight", amount=0.25))):
        torch.manual_seed(0)
        model = slim.convert(Net(norm).eval(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x).eval()
        slim.set_width(model, 0.5)
        twin = copy.deepcopy(model)
        edit(model.norm)
        with torch.no_grad():
            twin.norm.weight.copy_(model.norm.weight)
            ref = twin(x)
            assert mad(model(x), ref) == 0 and mad(model(x), ref) == 0
        assert mad(model(x), ref) == 0  # with autograd


def test_frozen_weights_trained_biases_get_gradients_at_a_narrow_width():
    """BitFit: weights frozen, biases trained. At 0.5 the bias selection came from the no-grad cache (no graph)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = slim.convert(_cnn(), slim.WidthSpec.switches([0.5, 1.0]), example_input=x)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    with slim.width(0.5):
        model(x).sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in ("0.bias", "3.bias", "8.bias"))
