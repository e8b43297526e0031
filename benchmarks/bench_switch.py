"""Target 5: switching width costs < 1 ms.

Eval mode, ``torch.inference_mode()``, batch 1. Measured:

* ``slim.set_width(model, w)`` and entering + leaving ``with slim.width(w):`` (microseconds per call);
* the extra latency of the first forward after a switch over a steady-state forward, with the slice cache
  holding the widths in use (the case of a deployed model hopping between its operating points): rounds of
  ``set_width(w); t1 = forward; t2 = forward`` over a cycle of widths, median of ``t1 - t2``; the same with
  ``set_width`` to the width already set gives the noise floor;
* for information, the one-time cost of the first forward at a width never used before (the slice cache fills):
  fresh, calibrated US widths, ``t_first - t_steady``.

    python benchmarks/bench_switch.py [--models mobilenetv2 resnet50] [--size 224]
"""
from __future__ import annotations

import gc
import statistics
import timeit

import torch

import slim_plugins as slim
from _common import WIDTHS, base_parser, calibrate, now, setup, slim_model, table, verdict


def _t(f):
    t0 = now()
    f()
    return now() - t0


def main():
    p = base_parser(__doc__)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    setup(args)
    rows = []
    for arch in args.models:
        model = slim_model(arch, args.kind).eval()
        fresh = [0.3, 0.35, 0.4, 0.45, 0.55, 0.6, 0.65, 0.7] if args.kind == "us" else []
        calibrate(model, widths=[0.25, 0.5, 0.75] + fresh)
        x = torch.randn(1, 3, args.size, args.size)
        n = 20000
        cyc = WIDTHS * (n // len(WIDTHS))
        it = iter(cyc)
        t_set = min(timeit.repeat(lambda: slim.set_width(model, next(it)), number=n // 5, repeat=5)) / (n // 5)

        def ctx():
            with slim.width(0.5):
                pass

        t_ctx = min(timeit.repeat(ctx, number=n // 5, repeat=5)) / (n // 5)
        with torch.inference_mode():
            for w in WIDTHS:  # warm the slice caches of the widths in use
                slim.set_width(model, w)
                model(x)
                model(x)
            switch, same = [], []
            for r in range(args.rounds):
                for i, w in enumerate(WIDTHS):
                    slim.set_width(model, w)  # a real switch (the previous forward ran at another width)
                    t1, t2 = _t(lambda: model(x)), _t(lambda: model(x))
                    switch.append(t1 - t2)
                    slim.set_width(model, w)  # no switch: noise floor of the same measurement
                    t1, t2 = _t(lambda: model(x)), _t(lambda: model(x))
                    same.append(t1 - t2)
            cold = []
            for w in fresh:
                slim.set_width(model, w)
                t1 = _t(lambda: model(x))
                steady = statistics.median(_t(lambda: model(x)) for _ in range(3))
                cold.append(t1 - steady)
            slim.set_width(model, 1.0)
            steady_ms = statistics.median(_t(lambda: model(x)) for _ in range(5)) * 1e3
        r = {"model": arch, "kind": args.kind, "input": f"1x{args.size}",
             "set_width us": t_set * 1e6, "with slim.width us": t_ctx * 1e6,
             "steady fwd ms (1.0)": steady_ms,
             "1st fwd after switch, extra ms": statistics.median(switch) * 1e3,
             "same-width control, extra ms": statistics.median(same) * 1e3,
             "switch total ms": t_set * 1e3 + statistics.median(switch) * 1e3,
             "cold width (cache fill), extra ms": statistics.median(cold) * 1e3 if cold else float("nan")}
        r["target 5 (<1 ms)"] = verdict(r["switch total ms"], 1.0 - 1e-9)
        rows.append(r)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
        del model
        gc.collect()
    print()
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
