"""Active width: model default (set_width) vs per-call override (slim.width), thread and task isolation."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import slim_plugins as slim


@pytest.fixture
def s_net(make_tiny_cnn):
    """An S-Net in eval mode: every switch has statistics, so any switch runs without calibration."""
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.switches([0.25, 0.5, 0.75, 1.0]))
    x = torch.randn(8, 3, 16, 16)
    slim.calibrate_bn(model, [x])
    return model.eval()


def _ref(model, x, w):
    with torch.no_grad(), slim.width(w):
        return model(x)


def test_precedence_default_then_context(s_net, mad):
    x = torch.randn(2, 3, 16, 16)
    ref = {w: _ref(s_net, x, w) for w in (0.25, 0.5, 1.0)}
    assert mad(ref[0.25], ref[1.0]) > 1e-3  # widths really differ
    with torch.no_grad():
        assert torch.equal(s_net(x), ref[1.0])  # default: the spec's max
        slim.set_width(s_net, 0.5)
        assert slim.get_width(s_net) == 0.5
        assert torch.equal(s_net(x), ref[0.5])
        with slim.width(0.25):  # the per-call override wins over the model default
            assert torch.equal(s_net(x), ref[0.25])
            with slim.width(1.0):  # nested: innermost wins
                assert torch.equal(s_net(x), ref[1.0])
            assert torch.equal(s_net(x), ref[0.25])
        assert torch.equal(s_net(x), ref[0.5])  # restored on exit
        with pytest.raises(RuntimeError, match="boom"), slim.width(0.25):
            raise RuntimeError("boom")
        assert torch.equal(s_net(x), ref[0.5])  # restored after an exception too
        assert slim.get_width(s_net) == 0.5  # the context never touches the default


def test_context_is_per_thread(s_net):
    x = torch.randn(2, 3, 16, 16)
    ref = {w: _ref(s_net, x, w) for w in (0.5, 1.0)}
    slim.set_width(s_net, 0.5)
    out = {}
    with slim.width(1.0):
        t = threading.Thread(target=lambda: out.setdefault("y", _ref_default(s_net, x)))
        t.start()
        t.join()
        mine = _ref_default(s_net, x)
    assert torch.equal(out["y"], ref[0.5])  # another thread sees the model default, not my override
    assert torch.equal(mine, ref[1.0])


def _ref_default(model, x):
    with torch.no_grad():
        return model(x)


def test_two_threads_two_widths_concurrently(s_net):
    """One model, two threads, two widths, many interleaved calls: outputs equal the sequential ones."""
    xs = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    widths = (0.25, 1.0)
    ref = {(w, i): _ref(s_net, x, w) for w in widths for i, x in enumerate(xs)}
    barrier = threading.Barrier(2)
    errors, mismatches, calls = [], [], [0, 0]

    def worker(k):
        w = widths[k]
        try:
            barrier.wait()
            for it in range(60):
                i = it % len(xs)
                with torch.no_grad(), slim.width(w):
                    y = s_net(xs[i])
                calls[k] += 1
                if not torch.allclose(y, ref[(w, i)], atol=1e-5, rtol=0):
                    mismatches.append((w, it))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls == [60, 60]
    assert not mismatches, mismatches[:5]


def test_two_threads_us_net(make_tiny_cnn, warm):
    """Same on a US-Net with calibrated widths (BN post-statistics are read concurrently)."""
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    x = torch.randn(8, 3, 16, 16)
    warm(model, x, [1.0, 0.25])
    slim.calibrate_bn(model, [x], widths=[0.4, 0.7])
    model.eval()
    ref = {w: _ref(model, x, w) for w in (0.4, 0.7)}
    bad = []

    def worker(w):
        for _ in range(40):
            with torch.no_grad(), slim.width(w):
                if not torch.allclose(model(x), ref[w], atol=1e-5, rtol=0):
                    bad.append(w)

    threads = [threading.Thread(target=worker, args=(w,)) for w in (0.4, 0.7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_asyncio_tasks_isolated(s_net):
    x = torch.randn(2, 3, 16, 16)
    ref = {w: _ref(s_net, x, w) for w in (0.25, 0.75)}

    async def run(w):
        with slim.width(w):
            await asyncio.sleep(0)  # let the other task enter its own context
            with torch.no_grad():
                return s_net(x)

    async def main():
        return await asyncio.gather(run(0.25), run(0.75))

    a, b = asyncio.run(main())
    assert torch.equal(a, ref[0.25]) and torch.equal(b, ref[0.75])


def test_context_width_validated_against_each_model(s_net):
    with slim.width(0.6), pytest.raises(slim.WidthError, match=r"0\.6"):
        s_net(torch.randn(1, 3, 16, 16))


def test_set_width_invalid_leaves_default(s_net):
    slim.set_width(s_net, 0.75)
    with pytest.raises(slim.WidthError, match=r"0\.3.*\[0\.25, 0\.5, 0\.75, 1\.0\]"):
        slim.set_width(s_net, 0.3)
    assert slim.get_width(s_net) == 0.75


def test_get_width_needs_converted_model():
    with pytest.raises(slim.NotSlimmableError, match="Sequential"):
        slim.get_width(torch.nn.Sequential(torch.nn.Linear(2, 2)))
