"""BN post-statistics (US-Nets Section 3.2, Eq. 8) checked against statistics computed by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slim_plugins as slim
from slim_plugins import make_divisible


def _hand_stats(model, batches, w, method="exact", momentum=0.1):
    """Per-batch mean / unbiased var of the inputs of bn1 and bn2 at width ``w``, averaged by hand.

    During calibration the BN layers normalise with batch statistics (as in training), so bn2's input depends on
    bn1's batch normalisation: recompute the whole forward with plain torch ops.
    """
    c1 = make_divisible(16 * w) if w != 1.0 else 16
    c2 = make_divisible(24 * w) if w != 1.0 else 24
    W1, b1 = model.conv1.weight[:c1].detach(), model.conv1.bias[:c1].detach()
    W2 = model.conv2.weight[:c2, :c1].detach()
    g1, be1 = (t.detach() for t in model.bn1._affine(slim.context.find_state(model).resolve(w), c1))
    eps = model.bn1.eps
    per_batch = {"bn1": [], "bn2": []}
    for x in batches:
        h1 = F.conv2d(x.double(), W1.double(), b1.double(), padding=1)
        m1 = h1.mean((0, 2, 3))
        v1b = h1.var((0, 2, 3), unbiased=False)
        v1u = h1.var((0, 2, 3), unbiased=True)
        a1 = torch.relu((h1 - m1[None, :, None, None]) / (v1b[None, :, None, None] + eps).sqrt()
                        * g1.double()[None, :, None, None] + be1.double()[None, :, None, None])
        h2 = F.conv2d(a1, W2.double(), padding=1)
        per_batch["bn1"].append((len(x), m1, v1u))
        per_batch["bn2"].append((len(x), h2.mean((0, 2, 3)), h2.var((0, 2, 3), unbiased=True)))
    out = {}
    for name, rows in per_batch.items():
        if method == "exact":  # Eq. 8: the sample-weighted average of the batch statistics
            n = sum(r[0] for r in rows)
            out[name] = (sum(r[0] * r[1] for r in rows) / n, sum(r[0] * r[2] for r in rows) / n)
        else:  # Eq. 5: momentum average starting from (0, 1)
            m, v = torch.zeros_like(rows[0][1]), torch.ones_like(rows[0][2])
            for _, bm, bv in rows:
                m, v = (1 - momentum) * m + momentum * bm, (1 - momentum) * v + momentum * bv
            out[name] = (m, v)
    return out


def _stored(model, w):
    """Statistics the model uses at width ``w`` in eval mode."""
    a = slim.context.find_state(model).resolve(w)
    res = {}
    for name in ("bn1", "bn2"):
        bn = getattr(model, name)
        c = make_divisible(bn.num_features * w) if w != 1.0 else bn.num_features
        _, _, mean, var = bn.bn_params(a, c)
        res[name] = (mean, var)
    return res


def _assert_stats_close(got, want, tol=1e-5):
    for name in want:
        torch.testing.assert_close(got[name][0].double(), want[name][0], atol=tol, rtol=tol)
        torch.testing.assert_close(got[name][1].double(), want[name][1], atol=tol, rtol=tol)


@pytest.fixture
def us_net(make_convbn_net):
    model = slim.convert(make_convbn_net(), slim.WidthSpec.range(0.25, 1.0))
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.5, 0.5)
    return model


def _batches(sizes, shift=0.5):
    return [torch.randn(n, 3, 8, 8) * (1 + i) + shift * i for i, n in enumerate(sizes)]


@pytest.mark.parametrize("w", [0.25, 0.5, 0.6, 1.0])
def test_exact_average_matches_hand_computation(us_net, w):
    batches = _batches([3, 5, 8])  # unequal sizes: the average must be weighted by samples
    res = slim.calibrate_bn(us_net, batches, widths=[w], num_samples=None)
    assert res == {f"{w:g}": 16}
    want = _hand_stats(us_net, batches, w)
    _assert_stats_close(_stored(us_net, w), want)


def test_weighting_matters(us_net):
    batches = _batches([2, 14])
    slim.calibrate_bn(us_net, batches, widths=[0.5], num_samples=None)
    want = _hand_stats(us_net, batches, 0.5)
    per = [_hand_stats(us_net, [b], 0.5)["bn1"][0] for b in batches]
    plain_mean = (per[0] + per[1]) / 2
    got = _stored(us_net, 0.5)["bn1"][0].double()
    torch.testing.assert_close(got, want["bn1"][0], atol=1e-5, rtol=1e-5)
    assert (got - plain_mean).abs().max() > 1e-2


def test_num_samples_truncates(us_net):
    batches = _batches([8, 8, 8])
    res = slim.calibrate_bn(us_net, batches, widths=[0.5], num_samples=12)
    assert res == {"0.5": 12}
    want = _hand_stats(us_net, [batches[0], batches[1][:4]], 0.5)  # 8 + the first 4 of the second batch
    _assert_stats_close(_stored(us_net, 0.5), want)
    full = _hand_stats(us_net, batches, 0.5)
    assert (full["bn1"][0] - want["bn1"][0]).abs().max() > 1e-3


def test_one_shot_iterator_reused_for_every_width(us_net):
    batches = _batches([4, 4, 4])
    res = slim.calibrate_bn(us_net, (b for b in batches), widths=[0.5, 0.75], num_samples=None)
    assert res == {"0.5": 12, "0.75": 12}
    _assert_stats_close(_stored(us_net, 0.75), _hand_stats(us_net, batches, 0.75))


def test_tuple_batches_and_custom_forward(us_net):
    batches = _batches([4, 6])
    slim.calibrate_bn(us_net, [(x, torch.zeros(len(x))) for x in batches], widths=[0.5])
    _assert_stats_close(_stored(us_net, 0.5), _hand_stats(us_net, batches, 0.5))
    calls = []
    slim.calibrate_bn(us_net, [{"img": x} for x in batches], widths=[0.75],
                      forward=lambda m, b: calls.append(1) or m(b["img"]))
    assert len(calls) == 2
    _assert_stats_close(_stored(us_net, 0.75), _hand_stats(us_net, batches, 0.75))


def test_calibration_keeps_mode_and_training_stats(us_net):
    batches = _batches([4, 4])
    us_net.train()
    post = ("post_keys", "post_mean", "post_var")  # the calibrated statistics themselves
    before = {k: v.clone() for k, v in us_net.state_dict().items() if not k.endswith(post)}
    slim.calibrate_bn(us_net, batches, widths=[0.5])
    assert us_net.training
    after = us_net.state_dict()
    for k, v in before.items():  # running (max/min) statistics and parameters untouched
        assert torch.equal(after[k], v), k
    us_net.eval()
    with torch.no_grad(), slim.width(0.5):
        us_net(batches[0])  # runs: 0.5 has post-statistics
    with torch.no_grad(), slim.width(0.55), pytest.raises(slim.UncalibratedWidthError, match="0.55"):
        us_net(batches[0])


def test_max_and_min_can_be_recalibrated(us_net):
    batches = _batches([4, 4])
    slim.calibrate_bn(us_net, batches)  # default: [min, max]
    _assert_stats_close(_stored(us_net, 1.0), _hand_stats(us_net, batches, 1.0))
    _assert_stats_close(_stored(us_net, 0.25), _hand_stats(us_net, batches, 0.25))


def test_switchable_bn_calibration_writes_private_stats(make_convbn_net):
    spec = slim.WidthSpec.switches([0.25, 0.5, 1.0])
    model = slim.convert(make_convbn_net(), spec)
    assert model.bn1.running_mean.shape == (3, 16)
    before = model.bn1.running_mean.clone(), model.bn2.running_var.clone()
    batches = _batches([3, 5])
    slim.calibrate_bn(model, batches, widths=[0.5])
    want = _hand_stats(model, batches, 0.5)
    torch.testing.assert_close(model.bn1.running_mean[1, :8].double(), want["bn1"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.bn1.running_var[1, :8].double(), want["bn1"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.bn2.running_var[1, :make_divisible(12)].double(), want["bn2"][1],
                               atol=1e-5, rtol=1e-5)
    # the other switches' rows and the channels beyond the active ones are untouched
    assert torch.equal(model.bn1.running_mean[[0, 2]], before[0][[0, 2]])
    assert torch.equal(model.bn1.running_mean[1, 8:], before[0][1, 8:])
    assert torch.equal(model.bn2.running_var[[0, 2]], before[1][[0, 2]])
    # default widths: every switch
    assert set(slim.calibrate_bn(model, batches)) == {"0.25", "0.5", "1"}


def test_moving_average_differs_from_exact(us_net):
    batches = _batches([4, 4, 4, 4])
    slim.calibrate_bn(us_net, batches, widths=[0.5], method="moving", momentum=0.1)
    moving = _stored(us_net, 0.5)
    _assert_stats_close(moving, _hand_stats(us_net, batches, 0.5, method="moving", momentum=0.1))
    slim.calibrate_bn(us_net, batches, widths=[0.5], method="exact")
    exact = _stored(us_net, 0.5)
    assert (moving["bn1"][0] - exact["bn1"][0]).abs().max() > 1e-2
    assert (moving["bn2"][1] - exact["bn2"][1]).abs().max() > 1e-2


def test_empty_loader_leaves_model_unchanged(us_net):
    slim.calibrate_bn(us_net, _batches([4]), widths=[0.5])
    us_net.train()
    sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in us_net.state_dict().items()}
    post = {k: (m.clone(), v.clone()) for k, (m, v) in us_net.bn1._post.items()}
    for empty in ([], iter([])):
        with pytest.raises(slim.EmptyLoaderError, match="no samples"):
            slim.calibrate_bn(us_net, empty, widths=[0.5, 0.75])
    assert us_net.training
    after = us_net.state_dict()
    assert set(after) == set(sd)
    for k, v in sd.items():
        if torch.is_tensor(v):
            assert torch.equal(after[k], v), k
    assert set(us_net.bn1._post) == set(post)
    for k, (m, v) in post.items():
        assert torch.equal(us_net.bn1._post[k][0], m) and torch.equal(us_net.bn1._post[k][1], v)
    assert isinstance(slim.EmptyLoaderError("x"), ValueError)


def test_bad_width_checked_before_any_work(us_net):
    calls = []
    with pytest.raises(slim.WidthError, match=r"1\.5"):
        slim.calibrate_bn(us_net, [torch.randn(2, 3, 8, 8)], widths=[0.5, 1.5], forward=lambda m, b: calls.append(1))
    assert not calls and not us_net.bn1._post


def test_post_statistics_saved_with_the_model(us_net, tmp_path, make_convbn_net, mad):
    batches = _batches([4, 4])
    slim.calibrate_bn(us_net, batches, widths=[0.4, 0.6])
    path = slim.save_checkpoint(str(tmp_path / "ck.pt"), us_net, epoch=3)
    fresh = slim.convert(make_convbn_net(), slim.WidthSpec.range(0.25, 1.0))
    ck = slim.load_checkpoint(path, fresh)
    assert ck["epoch"] == 3
    us_net.eval()
    fresh.eval()
    x = batches[0]
    with torch.no_grad():
        for w in (0.4, 0.6):
            with slim.width(w):
                assert mad(fresh(x), us_net(x)) == 0
