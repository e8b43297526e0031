"""Dynamic US-WDSR vs the plain weight-normed WDSR exported at the same width, same process, interleaved.

At n = 32 / 48 / 64 (US range 0.5-1.0 of ``WDSR(num_feat=64, num_block=8)``, US-Nets Section 5.1) on one
256x256 LR image (x2 -> 512x512), eval mode, ``torch.inference_mode``:
dynamic latency / exported-plain latency                                                   target <= 1.02x
The plain network is ``WDSR(num_feat=n)`` (BasicSR's ``ARCH_REGISTRY`` entry) loaded with the exported
state dict; its weight norm is a torch parametrization, so both sides recompute ``g v / ||v||`` per forward
unless cached: the dynamic side caches its sliced weights per width (DESIGN rule 7), the plain side does not,
and the same plain module under ``torch.nn.utils.parametrize.cached()`` is printed as a third column.

    python benchmarks/bench_basicsr.py [--threads 1 --clock thread] [--rounds 7] [--size 256]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn.utils import parametrize

sys.path.insert(0, os.path.dirname(__file__))
from _common import CLOCK, env_line, interleaved, med, min_ratio, paired_ratio, table, verdict  # noqa: E402

import slim_plugins as slim  # noqa: E402
from slim_plugins.integrations.basicsr import WDSR  # noqa: E402

NS = [64, 48, 32]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "thread"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--size", type=int, default=256, help="LR side (px)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise SystemExit("--clock thread needs --threads 1")
    CLOCK[0] = args.clock
    torch.manual_seed(0)
    print(env_line(), flush=True)
    print("# " + " ".join(sys.argv), flush=True)

    model = slim.convert(WDSR(num_feat=64, num_block=8), slim.WidthSpec.range(0.5, 1.0, divisor=1)).eval()
    x = torch.rand(1, 3, args.size, args.size)
    rows = []
    with torch.inference_mode():
        for n in NS:
            w = n / 64
            plain = WDSR(num_feat=n, num_block=8).eval()
            plain.load_state_dict(slim.export(model, w, example_input=x[:, :, :32, :32]).state_dict())
            with slim.width(w):
                diff = (model(x) - plain(x)).abs().max().item()

            def dyn(w=w):
                with slim.width(w):
                    return model(x)

            def plain_cached(plain=plain):
                with parametrize.cached():
                    return plain(x)

            t = interleaved({"dyn": dyn, "plain": lambda plain=plain: plain(x), "cached": plain_cached}, args.rounds)
            r = paired_ratio(t["dyn"], t["plain"])
            rows.append({"n": n, "plain ms": med(t["plain"]) * 1e3, "plain cached ms": med(t["cached"]) * 1e3,
                         "dynamic ms": med(t["dyn"]) * 1e3, "dyn/plain": r,
                         "min ratio": min_ratio(t["dyn"], t["plain"]),
                         "dyn/cached": paired_ratio(t["dyn"], t["cached"]), "max |diff|": diff,
                         "<= 1.02": verdict(r, 1.02)})
    print(f"\n## US-WDSR x2, LR {args.size}x{args.size}, batch 1\n" + table(rows, list(rows[0])), flush=True)


if __name__ == "__main__":
    main()
