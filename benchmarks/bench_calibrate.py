"""Target 6: BN calibration over 2,000 images <= 1.1x the forward-only time over the same images.

``slim.calibrate_bn(model, batches, widths=[w], num_samples=2000)`` against the stock timm model of the same
channels running eval-mode forwards (``torch.no_grad()``) over the same 2,000 images; the dynamic model's own
forward-only pass at ``w`` is shown too. Interleaved rounds, medians of paired ratios.

    python benchmarks/bench_calibrate.py [--models mobilenetv2 resnet50] [--size 64] [--batch 100]
"""
from __future__ import annotations

import gc

import torch

import slim_plugins as slim
from _common import (base_parser, calibrate, interleaved, med, min_ratio, paired_ratio, plain_pair, setup,
                     slim_model, table, verdict)


def main():
    p = base_parser(__doc__)
    p.add_argument("--widths", nargs="+", type=float, default=[0.5])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    setup(args)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(min(args.batch, args.images - i), 3, args.size, args.size, generator=g)
               for i in range(0, args.images, args.batch)]
    rows = []
    for arch in args.models:
        model = slim_model(arch, args.kind).eval()
        calibrate(model)
        for w in args.widths:
            stock, _ = plain_pair(model, arch, w, batches[0])
            slim.set_width(model, w)

            def calib():
                res = slim.calibrate_bn(model, batches, widths=[w], num_samples=args.images)
                assert sum(res.values()) == args.images, res

            @torch.no_grad()
            def fwd(m):
                for b in batches:
                    m(b)

            t = interleaved({"calibrate": calib, "plain fwd": lambda: fwd(stock), "dynamic fwd": lambda: fwd(model)},
                            rounds=args.rounds, inner=1, warmup=1)
            r = {"model": arch, "kind": args.kind, "width": w, "images": f"{args.images} @ {args.size}x{args.size}",
                 "batch": args.batch, "calibrate s": med(t["calibrate"]), "plain fwd s": med(t["plain fwd"]),
                 "dynamic fwd s": med(t["dynamic fwd"]),
                 "calib/plain fwd": paired_ratio(t["calibrate"], t["plain fwd"]),
                 "calib/plain fwd (min)": min_ratio(t["calibrate"], t["plain fwd"]),
                 "calib/dynamic fwd": paired_ratio(t["calibrate"], t["dynamic fwd"]), "rounds": args.rounds}
            r["target 6 (<=1.1)"] = verdict(r["calib/plain fwd"], 1.1)
            rows.append(r)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
            del stock
            gc.collect()
        del model
        gc.collect()
    print()
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
