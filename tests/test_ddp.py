"""torch.distributed on CPU (2 gloo processes): calibration all-reduce, same widths on every rank, DDP gradients.

The two ranks each see half of the data; the results must equal one process that sees all of it.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import slim_plugins as slim
from conftest import ConvBNNet, NoBNNet

WORLD = 2
SIZES = [3, 5, 4, 6, 2, 7]  # unequal batches: rank 0 gets 9 samples, rank 1 gets 18
CAL_WIDTHS = [0.25, 0.5, 0.6, 1.0]


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 8, 8, generator=g) * (1 + i % 3) + i * 0.3 for i, n in enumerate(SIZES)]


def _calib_model(spec):
    torch.manual_seed(0)
    model = slim.convert(ConvBNNet(), spec)
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
    return model


def _bn_stats(model, widths):
    """{(layer, width key): (mean, var)} as used in eval at each width."""
    state = slim.context.find_state(model)
    out = {}
    for w in widths:
        a = state.resolve(w)
        for name in ("bn1", "bn2"):
            bn = getattr(model, name)
            c = bn.num_features if w == 1.0 else slim.make_divisible(bn.num_features * w)
            _, _, m, v = bn.bn_params(a, c)
            out[(name, a.key)] = (m.clone(), v.clone())
    return out


def _grad_model():
    torch.manual_seed(0)
    return slim.convert(NoBNNet(), slim.WidthSpec.range(0.25, 1.0))


def _grad_data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = {}
        mine = _batches()[rank::WORLD]
        # 1. calibration on this rank's half: sums are all-reduced
        for kind, spec in (("us", slim.WidthSpec.range(0.25, 1.0)), ("s", slim.WidthSpec.switches(CAL_WIDTHS))):
            model = _calib_model(spec)
            counts = slim.calibrate_bn(model, mine, widths=CAL_WIDTHS, num_samples=None)
            res[f"cal_{kind}"] = (_bn_stats(model, CAL_WIDTHS), counts)
        model = _calib_model(slim.WidthSpec.range(0.25, 1.0))
        counts = slim.calibrate_bn(model, mine, widths=[0.5], num_samples=8)  # 4 per rank
        res["cal_subset"] = (_bn_stats(model, [0.5]), counts)
        # 2. widths drawn with no communication
        gm = _grad_model()
        step = slim.MultiWidthStep(DDP(gm), num_widths=4, seed=11)
        res["widths"] = [step.widths(it) for it in range(10)]
        # 3. a DDP-wrapped model through MultiWidthStep: gradients of the union batch
        ddp = DDP(_grad_model())
        x, y = _grad_data()
        xh, yh = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
        step = slim.MultiWidthStep(ddp, num_widths=3, distill="kl", seed=11)
        r = step(lambda: ddp(xh), lambda o: F.cross_entropy(o, yh), iteration=5)
        res["step_widths"] = r.widths
        res["grads"] = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_stats_equal(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k][0], b[k][0], atol=tol, rtol=tol, msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(a[k][1], b[k][1], atol=tol, rtol=tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["us", "s"])
def test_calibration_all_reduce_equals_union(ranks, kind):
    spec = slim.WidthSpec.range(0.25, 1.0) if kind == "us" else slim.WidthSpec.switches(CAL_WIDTHS)
    single = _calib_model(spec)
    counts = slim.calibrate_bn(single, _batches(), widths=CAL_WIDTHS, num_samples=None)
    want = _bn_stats(single, CAL_WIDTHS)
    assert set(counts.values()) == {sum(SIZES)}
    for r in range(WORLD):
        stats, rcounts = ranks[r][f"cal_{kind}"]
        assert rcounts == counts  # every rank reports the global sample count
        _assert_stats_equal(stats, want)
    # and not merely each rank's own half
    half = _calib_model(spec)
    slim.calibrate_bn(half, _batches()[0::2], widths=CAL_WIDTHS, num_samples=None)
    own = _bn_stats(half, CAL_WIDTHS)
    assert max((own[k][0] - want[k][0]).abs().max().item() for k in want) > 1e-3


def test_calibration_subset_split_across_ranks(ranks):
    b = _batches()
    # num_samples=8 in total: each rank takes its first 4 samples (rank 0: 3 + 1, rank 1: 4 of 5)
    union = [b[0], b[2][:1], b[1][:4]]
    single = _calib_model(slim.WidthSpec.range(0.25, 1.0))
    slim.calibrate_bn(single, union, widths=[0.5], num_samples=None)
    want = _bn_stats(single, [0.5])
    for r in range(WORLD):
        stats, counts = ranks[r]["cal_subset"]
        assert counts == {"0.5": 8}
        _assert_stats_equal(stats, want)


def test_same_widths_on_every_rank(ranks):
    w0, w1 = ranks[0]["widths"], ranks[1]["widths"]
    assert w0 == w1
    assert w0 == [slim.WidthSpec.range(0.25, 1.0).sample(it, 4, "sandwich", seed=11) for it in range(10)]
    assert len({tuple(w) for w in w0}) == 10
    assert ranks[0]["step_widths"] == ranks[1]["step_widths"]


def test_ddp_gradients_equal_single_process_union(ranks):
    model = _grad_model()
    x, y = _grad_data()
    step = slim.MultiWidthStep(model, num_widths=3, distill="kl", seed=11)
    res = step(lambda: model(x), lambda o: F.cross_entropy(o, y), iteration=5)
    assert res.widths == ranks[0]["step_widths"]
    for r in range(WORLD):
        g = ranks[r]["grads"]
        for n, p in model.named_parameters():
            torch.testing.assert_close(g[n], p.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"rank {r} {n}: {m}")
    # the halves alone give different gradients: the all-reduce really happened
    half = _grad_model()
    step_h = slim.MultiWidthStep(half, num_widths=3, distill="kl", seed=11)
    step_h(lambda: half(x[:4]), lambda o: F.cross_entropy(o, y[:4]), iteration=5)
    assert max((half.get_parameter(n).grad - p.grad).abs().max().item() for n, p in model.named_parameters()) > 1e-4
