"""Every bad input raises its typed error, names the bad value, and leaves the model / files unchanged."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import slim_plugins as slim


def _snapshot(model):
    sd = model.state_dict()
    return {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in sd.items()}


def _assert_same(model, snap, default=None):
    sd = model.state_dict()
    assert sd.keys() == snap.keys()
    for k, v in snap.items():
        if torch.is_tensor(v):
            assert torch.equal(sd[k], v), k
        else:
            assert repr(sd[k]) == repr(v), k
    if default is not None:
        assert slim.get_width(model) == default


def _structure(model):
    return [(n, type(m)) for n, m in model.named_modules()]


@pytest.fixture
def us(make_tiny_cnn):
    return slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))


@pytest.fixture
def s(make_tiny_cnn):
    return slim.convert(make_tiny_cnn(), slim.WidthSpec.switches([0.25, 0.5, 1.0]))


def test_all_errors_are_typed():
    for cls, builtin in [(slim.WidthError, ValueError), (slim.UncalibratedWidthError, RuntimeError),
                         (slim.EmptyLoaderError, ValueError), (slim.WidthSpecMismatchError, ValueError),
                         (slim.NotSlimmableError, TypeError), (slim.UnsupportedModuleError, TypeError),
                         (slim.ChannelGroupError, RuntimeError), (slim.UnknownLayerError, ValueError)]:
        assert issubclass(cls, slim.SlimError) and issubclass(cls, builtin)


def test_width_outside_range(us):
    snap = _snapshot(us)
    slim.set_width(us, 0.5)
    for bad in (1.2, 0.1, 0.0, -1.0):
        with pytest.raises(slim.WidthError, match=rf"{bad}.*\[0\.25, 1\.0\]"):
            slim.set_width(us, bad)
    _assert_same(us, snap, default=0.5)
    with slim.width(1.2), pytest.raises(slim.WidthError, match=r"1\.2"):
        us(torch.randn(1, 3, 8, 8))
    _assert_same(us, snap, default=0.5)


def test_width_not_a_switch(s):
    snap = _snapshot(s)
    with pytest.raises(slim.WidthError, match=r"0\.75.*allowed switches: \[0\.25, 0\.5, 1\.0\]"):
        slim.set_width(s, 0.75)
    with pytest.raises(slim.WidthError, match=r"0\.75"):
        slim.calibrate_bn(s, [torch.randn(2, 3, 8, 8)], widths=[0.75])
    with pytest.raises(slim.WidthError, match=r"0\.75"):
        slim.export(s, 0.75)
    _assert_same(s, snap, default=1.0)


def test_uncalibrated_width(us, warm):
    x = torch.randn(4, 3, 8, 8)
    warm(us, x, [1.0, 0.25])
    us.eval()
    snap = _snapshot(us)
    with torch.no_grad(), slim.width(0.6), pytest.raises(slim.UncalibratedWidthError,
                                                           match=r"'bn1'.*width 0\.6.*\['max', 'min'\].*calibrate_bn"):
        us(x)
    with pytest.raises(slim.UncalibratedWidthError, match="0.6"):
        slim.export(us, 0.6)
    _assert_same(us, snap, default=1.0)
    assert not us.training


def test_min_width_before_any_training_is_uncalibrated(us):
    us.eval()
    with torch.no_grad(), slim.width(0.25), pytest.raises(slim.UncalibratedWidthError, match="0.25"):
        us(torch.randn(1, 3, 8, 8))


def test_empty_loader(us):
    snap = _snapshot(us)
    with pytest.raises(slim.EmptyLoaderError, match="no samples"):
        slim.calibrate_bn(us, [], widths=[0.5])
    _assert_same(us, snap)


def test_checkpoint_from_another_spec(us, make_tiny_cnn, tmp_path):
    path = slim.save_checkpoint(str(tmp_path / "a.pt"), us)
    for other in (slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.35, 1.0)),
                  slim.convert(make_tiny_cnn(), slim.WidthSpec.switches([0.25, 1.0])),
                  slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0), bn="naive"),
                  slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0, divisor=4))):
        snap = _snapshot(other)
        with pytest.raises(slim.WidthSpecMismatchError, match=r"'widths': \[0\.25, 1\.0\]"):
            slim.load_checkpoint(path, other)
        _assert_same(other, snap)
    # a plain state_dict (no spec) is refused too
    with pytest.raises(slim.WidthSpecMismatchError, match="None"):
        slim.load_checkpoint({"model": us.state_dict()}, us)


def test_checkpoint_round_trip_and_atomic_write(us, make_tiny_cnn, tmp_path):
    path = tmp_path / "ck.pt"
    slim.save_checkpoint(str(path), us, epoch=1)
    good = path.read_bytes()
    ck = slim.read_checkpoint(str(path))
    assert ck["width_spec"] == {"kind": "range", "widths": [0.25, 1.0], "divisor": 8} and ck["epoch"] == 1
    # an unpicklable extra makes torch.save fail mid-write: the old file survives, no temp file is left
    with pytest.raises(Exception, match="pickle|lambda"):
        slim.save_checkpoint(str(path), us, epoch=2, hook=lambda: None)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    # a fresh path: nothing at all is left behind
    with pytest.raises(Exception, match="pickle|lambda"):
        slim.save_checkpoint(str(tmp_path / "new.pt"), us, hook=lambda: None)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    fresh = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    assert slim.load_checkpoint(str(path), fresh)["epoch"] == 1
    for k, v in us.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(fresh.state_dict()[k], v), k


def test_unsupported_module_named(make_tiny_cnn):
    class WithLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.norm = nn.InstanceNorm2d(8, affine=True)  # a torch module fx does not trace into
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).mean((2, 3)))

    net = WithLN()
    before = _structure(net)
    snap = _snapshot(net)
    with pytest.raises(slim.UnsupportedModuleError, match=r"'norm'.*InstanceNorm2d"):
        slim.convert(net, slim.WidthSpec.range(0.25, 1.0))
    assert _structure(net) == before and "_slim_state" not in net.__dict__
    _assert_same(net, snap)


def test_model_without_conv_or_linear():
    with pytest.raises(slim.NotSlimmableError, match="Sequential"):
        slim.convert(nn.Sequential(nn.ReLU()), slim.WidthSpec.range(0.25, 1.0))


def test_fixed_pattern_matching_nothing(make_tiny_cnn):
    net = make_tiny_cnn()
    before = _structure(net)
    with pytest.raises(slim.UnknownLayerError, match=r"'head\*'.*matches no"):
        slim.convert(net, slim.WidthSpec.range(0.25, 1.0), fixed=["conv1", "head*"])
    assert _structure(net) == before and "_slim_state" not in net.__dict__
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0))  # still convertible afterwards


def test_declared_group_naming_unknown_layer(make_tiny_cnn):
    net = make_tiny_cnn()
    before = _structure(net)
    with pytest.raises(slim.UnknownLayerError, match="'nope'"):
        slim.convert(net, slim.WidthSpec.range(0.25, 1.0), groups={"res": ["conv2", "nope"]})
    assert _structure(net) == before


def test_converting_twice(us):
    before = _structure(us)
    state = us._slim_state
    with pytest.raises(slim.WidthError, match="already slimmable"):
        slim.convert(us, slim.WidthSpec.range(0.35, 1.0))
    assert _structure(us) == before and us._slim_state is state


def test_bad_bn_mode(make_tiny_cnn):
    net = make_tiny_cnn()
    with pytest.raises(slim.WidthError, match="'batch'"):
        slim.convert(net, slim.WidthSpec.range(0.25, 1.0), bn="batch")
    with pytest.raises(slim.WidthError, match="'switchable'"):
        slim.convert(net, slim.WidthSpec.range(0.25, 1.0), bn="switchable")
    assert not any(hasattr(m, "slim_name") for m in net.modules())


def test_nonuniform_dict_on_snet(s):
    snap = _snapshot(s)
    with pytest.raises(slim.WidthError, match=r"nonuniform.*\[0\.25, 0\.5, 1\.0\]"):
        slim.set_width(s, {"conv1": 0.5})
    _assert_same(s, snap, default=1.0)


def test_nonuniform_dict_unknown_layer(us):
    with pytest.raises(slim.UnknownLayerError, match="'layer9'"):
        slim.set_width(us, {"layer9": 0.5})
    with pytest.raises(slim.WidthError, match=r"1\.5"):
        slim.set_width(us, {"conv1": 1.5})
    assert slim.get_width(us) == 1.0


def test_untraceable_without_groups(make_untraceable_net):
    """No channel graph: convert refuses (typed) instead of guessing the output layers with a warning."""
    net = make_untraceable_net()
    before = _structure(net)
    with pytest.raises(slim.ChannelGroupError, match=r"'block'.*groups="):
        slim.convert(net, slim.WidthSpec.range(0.25, 1.0))
    assert _structure(net) == before and "_slim_state" not in net.__dict__


def test_untraceable_with_range_above_one(make_untraceable_net):
    net = make_untraceable_net()
    before = _structure(net)
    with pytest.raises(slim.ChannelGroupError, match="'block'"):
        slim.convert(net, slim.WidthSpec.range(0.25, 1.5))  # widening needs the channel graph
    assert _structure(net) == before and net.stem.weight.shape == (16, 3, 3, 3)


def test_empty_calibration_widths_and_a_non_numeric_latency_table_are_typed_errors():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    m = slim.convert(net, slim.WidthSpec.range(0.25, 1.0), example_input=torch.zeros(1, 3, 8, 8))
    snap = _snapshot(m)
    with pytest.raises(slim.InvalidArgumentError, match="widths is empty"):
        slim.calibrate_bn(m, [torch.randn(4, 3, 8, 8)], widths=[])
    with pytest.raises(slim.InvalidArgumentError, match="'a'"):
        slim.WidthController(m, 10, {"a": 1.0})
    _assert_same(m, snap)


def test_wrong_argument_types_are_typed_errors(make_tiny_cnn, tmp_path):
    """A string where a spec / width list / flag goes, or a non-module model: a typed error naming the value (they
    were iterated character by character, taken as true, or failed with an AttributeError)."""
    net = make_tiny_cnn()
    with pytest.raises(slim.WidthError, match="'0.25-1.0'"):
        slim.convert(net, "0.25-1.0")
    with pytest.raises(slim.UnsupportedModuleError, match="nn.Module, got str"):
        slim.convert("model.pt", slim.WidthSpec.range(0.25, 1.0))
    assert not any(hasattr(m, "slim_name") for m in net.modules())
    slim.convert(net, slim.WidthSpec.range(0.25, 1.0))
    snap = _snapshot(net)
    with pytest.raises(slim.WidthError, match="'0.5'"):
        slim.calibrate_bn(net, [torch.randn(4, 3, 32, 32)], widths="0.5")
    with pytest.raises(slim.InvalidArgumentError, match="'yes'"):
        slim.export(net, 1.0, fuse_bn="yes")
    with pytest.raises(slim.NotSlimmableError, match="got str"):
        slim.export("model.pt", 0.5)
    _assert_same(net, snap)
