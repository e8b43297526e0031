"""Target 3: one 4-width training step <= 1.05x the sum of the 4 plain steps.

Slim side: ``slim.MultiWidthStep`` at the fixed widths [1.0, 0.75, 0.5, 0.25] (US-Net: the sandwich rule with its
two random widths pinned to 0.75 and 0.5; S-Net: rule "all" over the switches), cross-entropy for every width,
one backward per width, gradients accumulated. Plain side: the stock timm models of the same channels (carrying
the exported weights), each one forward + the same loss + backward. Both sides zero their gradients
(set_to_none) inside the timed region; the optimizer step is excluded from both. Train mode throughout.

    python benchmarks/bench_train_step.py [--models mobilenetv2 resnet50] [--batch 32] [--size 128]
"""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

import slim_plugins as slim
from _common import (WIDTHS, base_parser, calibrate, interleaved, med, min_ratio, paired_ratio, plain_pair, setup,
                     slim_model, table, verdict)


class FixedWidthStep(slim.MultiWidthStep):
    """The sandwich step with its random widths pinned, so both sides run the same four widths."""

    def __init__(self, model, widths, **kw):
        super().__init__(model, **kw)
        self._fixed = sorted(widths, reverse=True)

    def widths(self, iteration):
        return list(self._fixed)


def main():
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--distill", default=None, help="e.g. soft_ce: inplace distillation for the narrower widths")
    args = p.parse_args()
    setup(args)
    rows = []
    for arch in args.models:
        model = slim_model(arch, args.kind)
        model.eval()
        calibrate(model)
        x = torch.randn(args.batch, 3, args.size, args.size)
        y = torch.randint(0, 1000, (args.batch,))
        plains = {w: plain_pair(model, arch, w, x)[0].train() for w in WIDTHS}
        model.train()
        if args.kind == "us":
            step = FixedWidthStep(model, WIDTHS, distill=args.distill)
        else:
            step = slim.MultiWidthStep(model, rule="all", distill=args.distill)
        assert step.widths(0) == sorted(WIDTHS, reverse=True), step.widths(0)

        def slim_step():
            for q in model.parameters():
                q.grad = None
            step(lambda: model(x), lambda out: F.cross_entropy(out, y))

        def plain_step(m):
            for q in m.parameters():
                q.grad = None
            F.cross_entropy(m(x), y).backward()

        fns = {"slim": slim_step, "plain (sum of 4)": lambda: [plain_step(m) for m in plains.values()]}
        fns.update({f"plain {w}": (lambda m=m: plain_step(m)) for w, m in plains.items()})
        t = interleaved(fns, rounds=args.rounds, inner=1, warmup=1)
        r = {"model": arch, "kind": args.kind, "batch x size": f"{args.batch}x{args.size}",
             "distill": args.distill or "-", "slim step s": med(t["slim"]),
             "sum of plain s": med(t["plain (sum of 4)"]),
             **{f"plain {w} s": med(t[f"plain {w}"]) for w in WIDTHS},
             "ratio": paired_ratio(t["slim"], t["plain (sum of 4)"]),
             "ratio (min)": min_ratio(t["slim"], t["plain (sum of 4)"]), "rounds": args.rounds}
        r["target 3 (<=1.05)"] = verdict(r["ratio"], 1.05)
        rows.append(r)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
        del model, plains, step
        gc.collect()
    print()
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
