"""Targets 1 and 2: dynamic eval latency <= 1.02x plain, exported model 1.00x plain.

For each model, batch size and width: the stock timm model of the same channels (timm's own builders, carrying
the exported weights), ``slim.export(model, w)`` and the dynamic slimmable model after ``slim.set_width(model, w)``
run interleaved under ``torch.inference_mode()`` in eval mode. Ratios are medians of per-round paired ratios.

    python benchmarks/bench_latency.py [--models mobilenetv2 resnet50] [--batches 1 32] [--size 224]
    python benchmarks/bench_latency.py --models s_shufflenet densenet121    # index-gathered selections
"""
from __future__ import annotations

import gc

import torch

import slim_plugins as slim
from _common import (base_parser, calibrate, interleaved, med, min_ratio, now, paired_ratio, plain_pair, setup,
                     slim_model, table, verdict, widths_of)


def main():
    p = base_parser(__doc__)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--widths", nargs="+", type=float, default=None,
                   help="default: 1.0 0.75 0.5 0.25 (S-ShuffleNet: its switches 2.0 1.0 0.5)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=None, help="default: 21 (batch 1), 7 (larger batches)")
    p.add_argument("--sample-s", type=float, default=0.15, help="min. seconds per timed sample (sets inner calls)")
    args = p.parse_args()
    setup(args)
    rows = []
    for arch in args.models:
        model = slim_model(arch, args.kind).eval()
        calibrate(model)
        for w in args.widths or widths_of(arch):
            for bs in args.batches:
                x = torch.randn(bs, 3, args.size, args.size)
                stock, exported = plain_pair(model, arch, w, x)
                slim.set_width(model, w)
                with torch.inference_mode():
                    # Same numbers from all three (the comparison is between equal computations).
                    err = max((exported(x) - model(x)).abs().max().item(), (stock(x) - exported(x)).abs().max().item())
                    t0 = now()
                    stock(x)
                    one = now() - t0
                    inner = max(1, round(args.sample_s / one))
                    rounds = args.rounds or (21 if bs == 1 else 7)
                    t = _timed(stock, exported, model, x, rounds, inner)
                rows.append({
                    "model": arch, "batch": bs, "width": w,
                    "plain ms": med(t["plain"]) * 1e3, "export ms": med(t["export"]) * 1e3,
                    "dynamic ms": med(t["dynamic"]) * 1e3,
                    "dyn-plain ms": med([d - q for d, q in zip(t["dynamic"], t["plain"])]) * 1e3,
                    "dyn/plain": paired_ratio(t["dynamic"], t["plain"]),
                    "dyn/plain (min)": min_ratio(t["dynamic"], t["plain"]),
                    "dyn/export": paired_ratio(t["dynamic"], t["export"]),
                    "export/plain": paired_ratio(t["export"], t["plain"]),
                    "export/plain (min)": min_ratio(t["export"], t["plain"]),
                    "rounds x inner": f"{rounds}x{inner}", "max |diff|": f"{err:.1e}",
                })
                r = rows[-1]
                r["target 1 (<=1.02)"] = verdict(r["dyn/plain"], 1.02)
                r["target 2 (<=1.00, +-1% noise)"] = verdict(r["export/plain"], 1.01)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                      flush=True)
                del stock, exported
                gc.collect()
        del model
        gc.collect()
    cols = ["model", "batch", "width", "plain ms", "export ms", "dynamic ms", "dyn-plain ms", "dyn/plain",
            "dyn/plain (min)",
            "dyn/export", "export/plain", "export/plain (min)", "rounds x inner", "max |diff|",
            "target 1 (<=1.02)", "target 2 (<=1.00, +-1% noise)"]
    print()
    print(table(rows, cols))


def _timed(stock, exported, model, x, rounds, inner):
    return interleaved({"plain": lambda: stock(x), "export": lambda: exported(x), "dynamic": lambda: model(x)},
                       rounds=rounds, inner=inner, warmup=2)


if __name__ == "__main__":
    main()
