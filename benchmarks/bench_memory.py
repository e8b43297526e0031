"""Target 4: peak training memory of the 4-width step <= 1.1x that of one max-width step.

Two measures, each for (a) one step of the slimmable model at width 1.0, (b) the 4-width ``MultiWidthStep``
(widths 1.0, 0.75, 0.5, 0.25), (c) one step of the stock timm model (reference), (d) one step of each of the
four stock models of those widths in turn (what the allocator does with four different sizes, without us):

1. peak bytes of live autograd-saved tensors, counted with ``torch.autograd.graph.saved_tensors_hooks``
   (distinct storages; parameters excluded: they exist once whatever the number of widths) -- deterministic;
2. peak RSS growth in a fresh subprocess per configuration (VmHWM reset through /proc/self/clear_refs after the
   model is built, so only the training steps count; parameters' .grad buffers are included), once with glibc's
   default malloc (its dynamic mmap threshold keeps freed activations in the heap, so the peak also measures
   fragmentation) and once with ``MALLOC_MMAP_THRESHOLD_=131072`` (large blocks go back to the OS when freed:
   RSS follows live memory).

    python benchmarks/bench_memory.py [--models mobilenetv2 resnet50] [--batch 32] [--size 128]
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import slim_plugins as slim
from _common import WIDTHS, base_parser, setup, slim_model, stock_timm, table, verdict
from bench_train_step import FixedWidthStep


CONFIGS = ("single", "multi", "plain", "plain4")
MALLOC = {"glibc default": {}, "mmap>=128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


class SavedTensorPeak:
    """Peak bytes of distinct storages held by autograd for backward (a ``saved_tensors_hooks`` pair)."""

    def __init__(self, exclude_storages=()):
        self.exclude = set(exclude_storages)
        self.live: dict[int, list] = {}
        self.cur = self.peak = 0

    def pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.exclude or st.nbytes() == 0:
            return t
        ent = self.live.get(ptr)
        if ent is None:
            self.live[ptr] = [1, st.nbytes()]
            self.cur += st.nbytes()
            self.peak = max(self.peak, self.cur)
        else:
            ent[0] += 1
        return _Handle(self, ptr, t)

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Handle) else h

    def release(self, ptr):
        ent = self.live[ptr]
        ent[0] -= 1
        if ent[0] == 0:
            self.cur -= ent[1]
            del self.live[ptr]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Handle:
    __slots__ = ("owner", "ptr", "t")

    def __init__(self, owner, ptr, t):
        self.owner, self.ptr, self.t = owner, ptr, t

    def __del__(self):
        self.owner.release(self.ptr)


def build(arch, kind, config, batch, size):
    """``(step function, model)`` of one configuration: "single", "multi", "plain" or "plain4" (the four stock
    models of the widths, one step each, one after the other: the allocator's share of "multi")."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    if config == "plain4":
        models = torch.nn.ModuleList(stock_timm(arch, w).train() for w in WIDTHS)

        def run():
            for m in models:
                F.cross_entropy(m(x), y).backward()
        return run, models
    if config == "plain":
        model = stock_timm(arch, 1.0).train()
    else:
        model = slim_model(arch, kind).train()
    if config == "multi":
        step = FixedWidthStep(model, WIDTHS) if kind == "us" else slim.MultiWidthStep(model, rule="all")

        def run():
            step(lambda: model(x), lambda out: F.cross_entropy(out, y))
    else:
        def run():
            F.cross_entropy(model(x), y).backward()
    return run, model


def saved_peak(arch, kind, config, batch, size) -> int:
    run, model = build(arch, kind, config, batch, size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tr = SavedTensorPeak(params)
    with tr.hooks():
        run()
    assert tr.cur == 0, f"saved tensors still alive after the step: {tr.cur} bytes"
    return tr.peak


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(arch, kind, config, batch, size, steps) -> dict:
    run, model = build(arch, kind, config, batch, size)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    base = _rss_kb("VmRSS")
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        run()
    return {"base_mb": base / 1024, "peak_mb": _rss_kb("VmHWM") / 1024, "delta_mb": (_rss_kb("VmHWM") - base) / 1024,
            "hwm_reset": reset}


def main():
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="training steps per RSS subprocess")
    p.add_argument("--repeats", type=int, default=3, help="RSS subprocesses per configuration (median)")
    p.add_argument("--child", default=None, help=argparse_suppress())
    args = p.parse_args()
    if args.child:
        arch, config = args.child.split(":")
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(child(arch, args.kind, config, args.batch, args.size, args.steps)))
        return
    setup(args)
    rows = []
    for arch in args.models:
        saved = {c: saved_peak(arch, args.kind, c, args.batch, args.size) for c in CONFIGS}
        gc.collect()
        rss = {}
        for rep in range(args.repeats):
            for malloc, extra_env in MALLOC.items():
                for c in CONFIGS:
                    cmd = [sys.executable, __file__, "--child", f"{arch}:{c}", "--kind", args.kind,
                           "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps)]
                    if args.threads:
                        cmd += ["--threads", str(args.threads)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                         env={**os.environ, **extra_env}).stdout.strip().splitlines()[-1]
                    rss.setdefault((malloc, c), []).append(json.loads(out)["delta_mb"])
        med = {k: sorted(v)[len(v) // 2] for k, v in rss.items()}
        r = {"model": arch, "kind": args.kind, "batch x size": f"{args.batch}x{args.size}",
             "saved MB single": saved["single"] / 2**20, "saved MB multi": saved["multi"] / 2**20,
             "saved MB plain": saved["plain"] / 2**20, "saved MB plain4": saved["plain4"] / 2**20,
             "saved multi/single": saved["multi"] / saved["single"]}
        for malloc in MALLOC:
            for c in CONFIGS:
                r[f"RSS+ MB {c} ({malloc})"] = med[(malloc, c)]
            r[f"RSS multi/single ({malloc})"] = med[(malloc, "multi")] / med[(malloc, "single")]
            r[f"RSS plain4/plain ({malloc})"] = med[(malloc, "plain4")] / med[(malloc, "plain")]
        # Live memory decides (saved tensors, RSS with freed blocks returned); the glibc-default RSS is shown
        # because that is what a user sees, fragmentation included.
        r["target 4 (<=1.1)"] = verdict(max(r["saved multi/single"], r["RSS multi/single (mmap>=128k)"]), 1.1)
        rows.append(r)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
              "rss runs:", rss, flush=True)
    print()
    print(table(rows, list(rows[0])))


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
