"""Holding a latency budget on a busy CPU: fixed width from the offline table vs ``slim.WidthController``.

The model is the US-MobileNetV2 (0.35-1.0x, CIFAR-10 input 32x32) of the README's CIFAR-10 run, built from its
recorded config (`docs/results/cifar10_us_mobilenetv2_cpu_5ep/config.yaml`; latency does not depend on the
weights, so they are random and BN statistics are noise); the accuracy a width costs is read from that run's
spectrum CSV. One process, in order:

1. profile every spectrum width on the idle machine (``slim.profile``: median of 30 calls, batch ``--batch``);
2. budget B = the midpoint of the 0.5x and 1.0x latencies (p95 <= B);
3. phase "fixed": a stream of calls for ``--seconds`` at the widest width the offline table allows for B; a
   competing CPU load (``--load`` processes, each busy ``--duty`` of the time, that this script starts and stops;
   each also exits by itself at its deadline) runs through the middle third;
4. phase "controller": the same stream and load schedule, each call at the controller's width;
5. the controller's own cost per call (``ctl(x)`` on a no-op vs the bare call, microseconds).

Writes `docs/results/width_control/serve.png` (both phases: latency per call, the budget, the width) and the
per-call CSVs next to it; the summary goes to stdout (`benchmarks/logs/issue13_control.txt`).

    python benchmarks/bench_controller.py [--seconds 48] [--load 3] [--duty 0.5] [--batch 256] [--threads 1]
"""
from __future__ import annotations

import argparse
import collections
import csv
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import env_line  # noqa: E402

import slim_plugins as slim  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "docs", "results", "cifar10_us_mobilenetv2_cpu_5ep")
OUT = os.path.join(REPO, "docs", "results", "width_control")


def _busy(deadline: float, duty: float) -> None:
    """A competing CPU load: busy for ``duty`` of every 10 ms until ``deadline`` (wall clock), then exit."""
    x = 0
    while time.time() < deadline:
        t_end = time.perf_counter() + 0.010 * duty
        while time.perf_counter() < t_end:
            x += 1
        if duty < 1.0:
            time.sleep(0.010 * (1.0 - duty))


class Load:
    """``n`` busy processes from ``start`` to ``stop`` seconds after ``t0``; started and stopped by :meth:`poll`,
    bounded by their own deadline and terminated in :meth:`close` whatever happens."""

    def __init__(self, n: int, start: float, stop: float, duty: float = 1.0):
        self.n, self.start, self.stop, self.duty, self.procs, self.t0 = n, start, stop, duty, [], None

    def poll(self, now: float) -> None:
        if self.t0 is None:
            self.t0 = now
        t = now - self.t0
        if not self.procs and self.start <= t < self.stop:
            deadline = time.time() + (self.stop - t)
            self.procs = [mp.Process(target=_busy, args=(deadline, self.duty), daemon=True) for _ in range(self.n)]
            for p in self.procs:
                p.start()
        if self.procs and t >= self.stop:
            self.close()

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(timeout=5)
        self.procs = [p for p in self.procs if p.is_alive()]
        assert not self.procs, "load processes did not stop"
        self.procs = []


def build_model():
    from slim_plugins.config import load_yaml_config
    from slim_plugins.integrations.timm.train import build_model, resolve_config

    cfg = resolve_config(load_yaml_config(os.path.join(RUN, "config.yaml")))
    model = build_model(cfg).eval()
    with open(os.path.join(RUN, "spectrum.csv")) as f:
        spectrum = {float(r["width"]): float(r["top1"]) for r in csv.DictReader(f)}
    widths = sorted(spectrum)
    slim.calibrate_bn(model, [torch.randn(64, *cfg["input_size"])], widths=widths, num_samples=None)
    return model, cfg, spectrum


def phase(ctl, x, seconds: float, load: Load):
    t0 = time.perf_counter()
    with torch.no_grad():
        while True:
            now = time.perf_counter()
            if now - t0 >= seconds:
                break
            load.poll(now)
            ctl(x)
    load.close()
    return ctl.report()


def summary(name, rep, load_span, spectrum):
    def p95(recs):
        return slim.ControllerReport(recs, rep.budget_ms, rep.percentile).latency_percentile()

    inside = [r for r in rep.records if load_span[0] <= r.t < load_span[1]]
    outside = [r for r in rep.records if not (load_span[0] <= r.t < load_span[1])]
    top1 = statistics.fmean(spectrum[r.width] for r in rep.records)
    top1_load = statistics.fmean(spectrum[r.width] for r in inside) if inside else float("nan")
    miss_load = sum(r.latency_ms > rep.budget_ms for r in inside)
    return {"phase": name, "calls": len(rep.records), "p95_ms": rep.latency_percentile(), "p95_quiet_ms": p95(outside),
            "p95_load_ms": p95(inside), "misses": rep.misses, "misses_load": miss_load, "calls_load": len(inside),
            "widths_quiet": sorted({r.width for r in outside}),
            "widths_load": dict(sorted(collections.Counter(r.width for r in inside).items())),
            "top1_mean": top1, "top1_load": top1_load}


def controller_cost(model, x, n: int = 20000) -> tuple[float, float]:
    """Microseconds per call of ``ctl(...)`` around a no-op, and of ``with slim.width(w)`` alone."""
    ctl = slim.WidthController(model, 1e9, {0.35: 1.0, 1.0: 2.0}, fn=lambda: None)
    t0 = time.perf_counter()
    for _ in range(n):
        ctl()
    served = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        with slim.width(1.0):
            pass
    ctx = (time.perf_counter() - t0) / n * 1e6
    return served, ctx


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=48.0, help="per phase; the load runs in the middle third")
    p.add_argument("--load", type=int, default=3, help="processes of the competing load")
    p.add_argument("--duty", type=float, default=0.5, help="fraction of each 10 ms a load process is busy")
    p.add_argument("--batch", type=int, default=256, help="256: compute, not per-layer overhead, sets the time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(env_line())
    model, cfg, spectrum = build_model()
    x = torch.randn(args.batch, *cfg["input_size"])
    widths = sorted(spectrum)
    table = slim.profile(model, x, widths=widths, repeats=30)
    lat = {r.width: r.latency_ms for r in table}
    budget = (lat[0.5] + lat[1.0]) / 2
    fixed_w = table.width_for_budget(max_latency_ms=budget)
    print(f"model {cfg['model']} {widths[0]:g}-{widths[-1]:g}x, input {list(x.shape)}, {args.threads} torch "
          f"thread(s); offline latency (ms): " + ", ".join(f"{w:g}: {v:.2f}" for w, v in lat.items()))
    print(f"budget p95 <= {budget:.2f} ms (midpoint of 0.5x and 1.0x); offline table's width: {fixed_w:g}")
    span = (args.seconds / 3, 2 * args.seconds / 3)
    reps = {}
    for name in ("fixed", "controller"):
        table_for = {fixed_w: lat[fixed_w]} if name == "fixed" else lat  # the fixed baseline: one width only
        ctl = slim.WidthController(model, budget, table_for)
        reps[name] = phase(ctl, x, args.seconds, Load(args.load, *span, duty=args.duty))
    served, ctx = controller_cost(model, x)
    os.makedirs(args.out, exist_ok=True)
    rows = [summary(n, r, span, spectrum) for n, r in reps.items()]
    for n, r in reps.items():
        r.to_csv(os.path.join(args.out, f"{n}.csv"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 5.5), sharex=True, sharey="row",
                             gridspec_kw={"height_ratios": [3, 2]})
    for j, (n, r) in enumerate(reps.items()):
        s = rows[j]
        title = (f"{'fixed width ' + format(fixed_w, 'g') if n == 'fixed' else 'WidthController'}: "
                 f"p95 {s['p95_ms']:.2f} ms, {s['misses']} of {s['calls']} over budget")
        r.draw(axes[0, j], axes[1, j], shade=[(*span, f"load: {args.load} processes {args.duty:.0%} busy")],
               title=title)
    fig.tight_layout()
    png = os.path.join(args.out, "serve.png")
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")
    print()
    print("| phase | calls | p95 ms (all) | p95 ms quiet | p95 ms under load | over budget (under load) | "
          "widths under load (calls) | mean top-1 of the widths served (under load) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in rows:
        print(f"| {s['phase']} | {s['calls']} | {s['p95_ms']:.2f} | {s['p95_quiet_ms']:.2f} | {s['p95_load_ms']:.2f} | "
              f"{s['misses']} ({s['misses_load']} of {s['calls_load']}) | "
              f"{', '.join(f'{w:g}: {c}' for w, c in s['widths_load'].items())} | "
              f"{s['top1_mean']:.2f} % ({s['top1_load']:.2f} %) |")
    c = rows[1]
    print(f"\nbudget {budget:.2f} ms; controller p95 / budget = {c['p95_ms'] / budget:.3f} (target <= 1.05); "
          f"fixed p95 / budget = {rows[0]['p95_ms'] / budget:.3f}")
    print(f"controller cost per call: {served:.2f} us (ctl() around a no-op), of which `with slim.width`: {ctx:.2f} us")


if __name__ == "__main__":
    sys.exit(main())
