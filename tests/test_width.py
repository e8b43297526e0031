"""WidthSpec, make_divisible and width sampling (US-Nets Section 4.1, Table 2), and a range with hi > 1."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import make_divisible as timm_make_divisible

import slim_plugins as slim
from slim_plugins import WidthSpec, make_divisible


# ---- make_divisible -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divisor", [1, 2, 3, 4, 8, 16, 32])
def test_make_divisible_equals_timm(divisor):
    values = [i * 0.37 for i in range(1, 3000)] + [float(i) for i in range(1, 2049)]
    values += [c * m for c in (16, 24, 32, 64, 96, 160, 320, 1280, 2048) for m in (0.25, 0.35, 0.5, 0.6, 0.75, 1.3)]
    for v in values:
        assert make_divisible(v, divisor) == timm_make_divisible(v, divisor), (v, divisor)
    for v in values[::97]:
        for mv in (None, 1, 16):
            assert make_divisible(v, divisor, min_value=mv) == timm_make_divisible(v, divisor, min_value=mv)
        assert make_divisible(v, divisor, round_limit=0.0) == timm_make_divisible(v, divisor, round_limit=0.0)


def test_channels_rounding():
    spec = WidthSpec.range(0.25, 1.0, divisor=8)
    assert spec.channels(30, 1.0) == 30  # 1.0x is the original network even when base % divisor != 0
    assert spec.channels(32, 0.5) == 16
    assert spec.channels(32, 0.6) == make_divisible(19.2) == 24  # rounding up beats losing > 10 %
    assert spec.channels(16, 0.25) == 8  # never below the divisor
    assert WidthSpec.range(0.25, 1.0, divisor=1).channels(30, 0.5) == 15


# ---- construction / validation -------------------------------------------------------------------------------
def test_switches_sorted_and_canonical():
    spec = WidthSpec.switches([1.0, 0.25, 0.1 + 0.2, 0.5])
    assert spec.widths == (0.25, 0.3, 0.5, 1.0)
    assert spec.is_switches and spec.min == 0.25 and spec.max == 1.0
    assert spec.validate(0.1 + 0.2) == 0.3
    assert spec.switch_index(0.5) == 2
    assert WidthSpec.from_dict(spec.to_dict()) == spec
    assert hash(spec) == hash(WidthSpec.switches([0.25, 0.3, 0.5, 1.0]))


@pytest.mark.parametrize("widths, needle", [([], "empty"), ([0.5, 0.5], "duplicates"), ([0.5, 0.5000000001], "dup"),
                                            ([0.0, 1.0], "positive"), ([-0.5], "positive"),
                                            ([float("nan")], "positive"), ([float("inf")], "positive")])
def test_switches_rejects(widths, needle):
    with pytest.raises(slim.WidthError, match=needle):
        WidthSpec.switches(widths)


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (-0.1, 1.0), (0.8, 0.5), (0.25, float("inf"))])
def test_range_rejects(lo, hi):
    with pytest.raises(slim.WidthError, match="lo"):
        WidthSpec.range(lo, hi)


@pytest.mark.parametrize("divisor", [0, -8, 2.5])
def test_divisor_rejected(divisor):
    with pytest.raises(slim.WidthError, match="divisor"):
        WidthSpec.range(0.25, 1.0, divisor=divisor)
    with pytest.raises(slim.WidthError, match="divisor"):
        WidthSpec.switches([0.5, 1.0], divisor=divisor)


def test_validate_names_value_and_allowed():
    r = WidthSpec.range(0.25, 1.0)
    assert r.validate(0.25) == 0.25 and r.validate(1.0) == 1.0 and r.validate(0.6) == 0.6
    with pytest.raises(slim.WidthError, match=r"1\.2.*\[0\.25, 1\.0\]"):
        r.validate(1.2)
    with pytest.raises(slim.WidthError, match=r"0\.2 .*range"):
        r.validate(0.2)
    with pytest.raises(slim.WidthError, match="number"):
        r.validate("wide")
    s = WidthSpec.switches([0.25, 0.5, 1.0])
    with pytest.raises(slim.WidthError, match=r"0\.6.*\[0\.25, 0\.5, 1\.0\]"):
        s.validate(0.6)
    assert isinstance(slim.WidthError("x"), ValueError)


def test_hi_above_one_allowed():
    spec = WidthSpec.range(0.35, 1.5)
    assert spec.max == 1.5 and spec.validate(1.3) == 1.3
    assert spec.grid(0.25) == [0.35, 0.6, 0.85, 1.1, 1.35]


# ---- sampling rules -------------------------------------------------------------------------------------------
def test_sample_all_is_every_switch_widest_first():
    spec = WidthSpec.switches([0.25, 0.5, 0.75, 1.0])
    for it in range(5):
        assert spec.sample(it, rule="all") == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_sample_sandwich(n):
    spec = WidthSpec.range(0.25, 1.0)
    seen_mid = set()
    for it in range(50):
        ws = spec.sample(it, n, "sandwich", seed=3)
        assert len(ws) == n
        assert ws[0] == 1.0 and ws[-1] == 0.25  # max and min every iteration
        assert ws == sorted(ws, reverse=True)
        assert all(0.25 <= w <= 1.0 for w in ws)
        seen_mid.update(ws[1:-1])
    if n > 2:  # the n-2 others are random, not a fixed set
        assert len(seen_mid) > 20 * (n - 2)


def test_sample_table2_variants():
    spec = WidthSpec.range(0.25, 1.0)
    for it in range(30):
        r = spec.sample(it, 4, "random", seed=1)
        assert len(r) == 4 and all(0.25 <= w <= 1.0 for w in r)
        mn = spec.sample(it, 4, "min_random", seed=1)
        assert len(mn) == 4 and mn[-1] == 0.25 and mn.count(1.0) == 0
        mx = spec.sample(it, 4, "max_random", seed=1)
        assert len(mx) == 4 and mx[0] == 1.0 and mx.count(0.25) == 0
    # "random" does not pin the ends: over 30 iterations the max is almost never drawn exactly
    assert sum(spec.sample(it, 4, "random")[0] == 1.0 for it in range(30)) == 0


def test_sample_switches_draws_switches():
    spec = WidthSpec.switches([0.25, 0.5, 0.75, 1.0])
    drawn = set()
    for it in range(40):
        ws = spec.sample(it, 4, "sandwich")
        assert ws[0] == 1.0 and ws[-1] == 0.25 and set(ws) <= set(spec.widths)
        drawn.update(ws[1:-1])
    assert drawn == {0.25, 0.5, 0.75, 1.0}


def test_sample_seeded_by_seed_and_iteration():
    spec = WidthSpec.range(0.35, 1.0)
    a = [spec.sample(it, 4, "sandwich", seed=7) for it in range(20)]
    b = [WidthSpec.range(0.35, 1.0).sample(it, 4, "sandwich", seed=7) for it in range(20)]
    assert a == b  # deterministic: no global RNG state involved
    torch.manual_seed(123)
    import random
    random.seed(999)
    assert [spec.sample(it, 4, "sandwich", seed=7) for it in range(20)] == a
    assert len({tuple(x) for x in a}) == 20  # iterations differ
    c = [spec.sample(it, 4, "sandwich", seed=8) for it in range(20)]
    assert c != a  # seeds differ
    assert spec.sample(5, 4, "sandwich", seed=7) == a[5]  # any iteration can be recomputed out of order


def test_sample_rejects_bad_rule_and_n():
    spec = WidthSpec.range(0.25, 1.0)
    with pytest.raises(slim.WidthError, match="'zigzag'"):
        spec.sample(0, 4, "zigzag")
    with pytest.raises(slim.WidthError, match="num_widths >= 2, got 1"):
        spec.sample(0, 1, "sandwich")


# ---- a range with hi > 1 ---------------------------------------------------------------------------------------
def test_range_above_one_converts_runs_and_exports(make_tiny_cnn, warm, mad):
    net = make_tiny_cnn()
    orig = copy.deepcopy(net)
    spec = WidthSpec.range(0.35, 1.5)
    model = slim.convert(net, spec)
    # Layers grow to the 1.5x channel count; the original weights stay in the first slice.
    assert model.conv1.weight.shape == (make_divisible(16 * 1.5), 3, 3, 3) == (24, 3, 3, 3)
    assert model.conv2.weight.shape == (48, 24, 3, 3)
    assert model.dw.weight.shape == (48, 1, 3, 3) and model.dw.groups == 48
    assert model.bn2.weight.shape == (48,)
    assert model.fc.weight.shape == (10, 48)  # output layer: classes fixed, inputs widened
    assert torch.equal(model.conv2.weight[:32, :16], orig.conv2.weight)
    assert torch.equal(model.fc.weight[:, :32], orig.fc.weight)

    x = torch.randn(6, 3, 16, 16)
    warm(model, x, [1.5, 0.35])
    model.eval()
    with torch.no_grad():
        for w, c2 in ((1.5, 48), (0.35, make_divisible(32 * 0.35))):
            with slim.width(w):
                y = model(x)
            assert y.shape == (6, 10) and torch.isfinite(y).all()
            plain = slim.export(model, w, example_input=x[:1])
            assert plain.conv2.weight.shape[0] == c2
            assert mad(plain(x), y) <= 1e-5
        # width 1.0 inside the range: after calibration it runs the original channel counts and weights
        slim.calibrate_bn(model, [x], widths=[1.0])
        p1 = slim.export(model, 1.0, example_input=x[:1])
        assert torch.equal(p1.conv2.weight, orig.conv2.weight) and p1.fc.weight.shape == (10, 32)
        with slim.width(1.0):
            assert mad(p1(x), model(x)) <= 1e-5
