"""Regression tests for the bugs found by trying the core from outside (each failed before its fix)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slim_plugins as slim
from slim_plugins import measure_latency

from conftest import REPO


def _net(c=16, bn_kw=None):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c, **(bn_kw or {})), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c, **(bn_kw or {})), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))


def test_switchable_bn_cumulative_average_counts_per_switch():
    """momentum=None: each switch's running mean is the cumulative average of its own batches."""
    model = slim.convert(_net(bn_kw={"momentum": None}), slim.WidthSpec.switches([0.5, 1.0])).train()
    xs = [torch.randn(4, 3, 8, 8) + i for i in range(3)]
    means = []
    for x in xs:
        with torch.no_grad(), slim.width(0.5):
            h = model[0](x)
            means.append(h.mean((0, 2, 3)))
            model[1](h)
        with torch.no_grad(), slim.width(1.0):
            model[1](model[0](x))  # the other switch also trains: it must not advance switch 0.5's count
    bn = model[1]
    assert torch.allclose(bn.running_mean[0, :8], torch.stack(means).mean(0), atol=1e-5)
    assert bn.num_batches_tracked.tolist() == [3, 3]


@pytest.mark.parametrize("write", ["data_mul", "polyak_out"])
def test_eval_cache_sees_in_place_data_writes(write, mad):
    """BasicSR's EMA (``p.data.mul_().add_()``) and SB3's Polyak update (``torch.add(..., out=p.data)``)."""
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0)).eval()
    slim.calibrate_bn(model, [torch.randn(8, 3, 8, 8)], widths=[0.5])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        y0 = model(x)
    other = [torch.randn_like(p) for p in model.parameters()]
    with torch.no_grad():
        for p, q in zip(model.parameters(), other):
            if write == "data_mul":
                p.data.mul_(0.5).add_(q.data, alpha=0.5)
            else:
                torch.add(p.data, q.data, alpha=0.5, out=p.data)
    conv = model[3]  # reads 8 of 16 input channels: its cached slice is a copy, not a view
    fresh = copy.deepcopy(model)  # copies drop the caches
    with torch.no_grad(), slim.width(0.5):
        y1 = model(x)
        h = conv(torch.ones(2, 8, 8, 8))
        assert mad(y1, fresh(x)) == 0
    assert mad(h, F.conv2d(torch.ones(2, 8, 8, 8), conv.weight[:8, :8], conv.bias[:8], padding=1)) <= 1e-5
    assert mad(y0, y1) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_calibration_statistics_follow_the_model_dtype(dtype):
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0)).to(dtype).eval()
    x = torch.randn(8, 3, 8, 8, dtype=dtype)
    slim.calibrate_bn(model, [x], widths=[0.5])
    assert model[1].state_dict()["post_mean"].dtype == dtype
    with torch.no_grad(), slim.width(0.5):
        assert model(x).dtype == dtype


def test_calibration_under_cpu_autocast():
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0)).eval()
    x = torch.randn(8, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slim.calibrate_bn(model, [x], widths=[0.5])
    with torch.no_grad(), slim.width(0.5):
        y = model(x)
    slim.calibrate_bn(model, [x], widths=[0.6])  # float32 reference
    assert model[1].state_dict()["post_mean"].dtype == torch.float32
    assert torch.isfinite(y).all()


def test_measure_latency_synchronises_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    measure_latency(lambda: None, warmup=1, repeats=5, device="cuda")
    assert len(calls) == 10  # before and after every timed call
    calls.clear()
    measure_latency(lambda: None, warmup=1, repeats=5, device="cpu")
    assert calls == []


class _CountingLoader:
    """An iterable that counts how often it is iterated (a DataLoader spawns workers each time)."""

    def __init__(self, batches):
        self.batches, self.iters = batches, 0

    def __iter__(self):
        self.iters += 1
        return iter(self.batches)


def test_calibration_reads_the_loader_once_for_every_width():
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0))
    loader = _CountingLoader([torch.randn(4, 3, 8, 8) for _ in range(3)])
    res = slim.calibrate_bn(model, loader, widths=[0.3, 0.5, 0.7], num_samples=None)
    assert loader.iters == 1 and res == {"0.3": 12, "0.5": 12, "0.7": 12}
    gen = (torch.randn(4, 3, 8, 8) for _ in range(2))  # a one-shot iterator feeds every width too
    assert slim.calibrate_bn(model, gen, widths=[0.3, 0.5], num_samples=None) == {"0.3": 8, "0.5": 8}


def test_calibration_truncates_dict_batches():
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0))
    seen = []

    def forward(m, batch):
        seen.append((batch["inputs"].shape[0], len(batch["data_samples"])))
        return m(batch["inputs"])

    batches = [{"inputs": torch.randn(4, 3, 8, 8), "data_samples": list(range(4))} for _ in range(2)]
    res = slim.calibrate_bn(model, batches, widths=[0.5], num_samples=6, forward=forward)
    assert res == {"0.5": 6} and seen == [(4, 4), (2, 2)]


def test_num_samples_zero_is_a_bad_argument():
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0))
    with pytest.raises(slim.InvalidArgumentError, match="num_samples"):
        slim.calibrate_bn(model, [torch.randn(2, 3, 8, 8)], widths=[0.5], num_samples=0)


def test_calibrated_us_model_saves_with_safetensors(tmp_path, mad):
    from safetensors.torch import load_model, save_model

    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0)).eval()
    slim.calibrate_bn(model, [torch.randn(8, 3, 8, 8)], widths=[0.5, 0.7])
    save_model(model, str(tmp_path / "m.safetensors"))
    fresh = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0)).eval()
    load_model(fresh, str(tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 8, 8)
    for w in (0.5, 0.7):
        with torch.no_grad(), slim.width(w):
            assert mad(fresh(x), model(x)) == 0
    assert slim.calibrated_widths(fresh) == ["0.5", "0.7", "1"]


def test_checkpointed_block_recomputes_at_the_forward_width(mad):
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0)).train()
    x = torch.randn(4, 3, 8, 8)
    body, head = model[:6], model[6:]
    with slim.width(0.5):
        y = head(slim.checkpoint(body, x))
    y.sum().backward()  # outside the width block: the recomputation must still run at 0.5
    g_ckpt = model[0].weight.grad.clone()
    model.zero_grad()
    with slim.width(0.5):
        head(body(x)).sum().backward()
    assert mad(g_ckpt, model[0].weight.grad) <= 1e-5 and g_ckpt[8:].abs().sum() == 0


def _replicate_on_cpu(model):
    """What ``torch.nn.parallel.replicate`` does to modules (without broadcasting to GPUs)."""
    memo = {m: m._replicate_for_data_parallel() for m in model.modules()}
    for m, r in memo.items():
        for name, child in m._modules.items():
            r._modules[name] = memo[child] if child is not None else None
        for key, p in m._parameters.items():  # replicas hold non-leaf copies as plain attributes
            setattr(r, key, None if p is None else p.view_as(p))
    return memo[model]


def test_data_parallel_replicas_keep_the_callers_width(mad):
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0)).eval()
    slim.calibrate_bn(model, [torch.randn(8, 3, 8, 8)], widths=[0.5])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), slim.width(0.5):
        want = model(x)
        replica = _replicate_on_cpu(model)  # DataParallel replicates in the caller's thread
    got = []
    t = threading.Thread(target=lambda: got.append(replica(x)))  # and runs each replica on a worker thread
    with torch.no_grad():
        t.start()
        t.join()
    assert mad(got[0], want) == 0


def test_load_checkpoint_with_another_head_leaves_the_model_unchanged(tmp_path):
    spec = slim.WidthSpec.range(0.25, 1.0)
    src = slim.convert(_net(), spec)
    net = _net()
    net[-1] = nn.Linear(16, 7)  # another classifier head
    dst = slim.convert(net, spec)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    path = slim.save_checkpoint(str(tmp_path / "ck.pth"), src)
    with pytest.raises(slim.CheckpointError, match=r"8\.weight.*\(5, 16\).*\(7, 16\)"):
        slim.load_checkpoint(path, dst)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "slim_plugins.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_truncated_checkpoint_and_bad_widths_exit_2(tmp_path):
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0))
    path = slim.save_checkpoint(str(tmp_path / "ck.pth"), model, framework="timm")
    data = open(path, "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    r = _cli("eval", tmp_path / "cut.pth", "--widths", "0.5", cwd=tmp_path)
    assert r.returncode == 2 and "CheckpointError" in r.stderr and "Traceback" not in r.stderr
    r = _cli("eval", path, "--widths", "half", cwd=tmp_path)
    assert r.returncode == 2 and "'half' is not a number" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("bad", ["0.5", True, None, [0.5]])
def test_widths_must_be_numbers(bad):
    model = slim.convert(_net(), slim.WidthSpec.range(0.25, 1.0))
    with pytest.raises(slim.WidthError, match="must be a number"):
        slim.set_width(model, bad)
    with pytest.raises(slim.WidthError):
        with slim.width(bad):
            model(torch.randn(1, 3, 8, 8))
    assert slim.get_width(model) == 1.0


def test_range_bounds_must_be_numbers():
    with pytest.raises(slim.WidthError, match="lower bound must be a number.*'a'"):
        slim.WidthSpec.range("a", 1)
    with pytest.raises(slim.WidthError, match="must be a number"):
        slim.WidthSpec.switches([0.5, "x"])


def test_conflicting_ratios_for_one_channel_group_raise(make_tiny_cnn):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    groups = slim.channel_groups(model)
    tied = next(v for v in groups.values() if len(v) > 1)  # conv2 and pw, tied by the residual add
    with pytest.raises(slim.WidthError, match="conflicting ratios"):
        slim.set_width(model, {tied[0]: 0.5, tied[1]: 0.75})
    slim.set_width(model, {tied[0]: 0.5, tied[1]: 0.5})  # the same ratio twice is fine
