"""Inplace distillation in US-WDSR over a short schedule: PSNR vs iterations with and without it (US-Nets §4.2,
Fig. 4; issue 24: why does the shipped L1 distillation end below bicubic on CPU budgets?).

Every run is BasicSR's own ``train_pipeline`` on `configs/basicsr/us_wdsr_x2_sr.yml` with the same iterations, batch,
patch size, optimizer, cosine schedule and seed (as ``compare.py``), differing only in the ``slimmable`` distillation
keys (``RUNS``). A checkpoint every ``--every`` iterations is evaluated afterwards on Set5 and Set14 (PSNR on Y, crop
border 2, BasicSR's metrics) at the narrowest and widest widths; bicubic upsampling is the reference.
Writes ``results/sr/<tag>.csv`` (run, iter, width, Set5/psnr, Set14/psnr) and ``docs/results/sr/<tag>.png``.

    SLIM_DATA=... .venv/bin/python experiments/sr/distill_curve.py --iters 300 --every 50 --batch 8 --tag distill_300it
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import CONFIG, REPO, _bicubic, _overrides, _val_loaders  # noqa: E402

RUNS = {  # name: the slimmable keys that differ
    "no_distill": {"slimmable.distill": None, "slimmable.distill_mode": None},
    "distill_replace": {"slimmable.distill": "l1", "slimmable.distill_mode": "replace"},
    "distill_add": {"slimmable.distill": "l1", "slimmable.distill_mode": "add"},
    "distill_l2_replace": {"slimmable.distill": "l2", "slimmable.distill_mode": "replace"},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gt-size", type=int, default=48, dest="gt_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--work-dir", default=os.path.join(REPO, "work_dirs", "sr_distill"), dest="work_dir")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--widths", nargs="+", type=float, default=[0.5, 1.0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    tag = args.tag or f"distill_{args.iters}it"

    from basicsr.archs import build_network
    import slim_plugins as slim
    from slim_plugins.config import load_yaml_config
    from slim_plugins.integrations.basicsr.model import evaluate_widths, parse_slimmable
    from slim_plugins.integrations.basicsr.train import run_pipeline

    if not args.eval_only:
        for name in args.runs:
            o = _overrides("us_wdsr_distill", args)  # the US-WDSR recipe of compare.py
            o.update({"name": name, "logger.save_checkpoint_freq": args.every, **RUNS[name]})
            run_pipeline(CONFIG, overrides=o, root_path=REPO)

    opt = load_yaml_config(CONFIG)
    metrics = {"psnr": opt["val"]["metrics"]["psnr"]}
    loaders = _val_loaders(opt)
    bic = _bicubic(loaders, metrics)
    rows = [dict(run="bicubic", iter=0, width="", **bic)]
    device = torch.device(args.device)
    for name in RUNS:
        mdir = os.path.join(args.work_dir, name, "models")
        if not os.path.isdir(mdir):
            continue
        net = slim.convert(build_network(dict(opt["network_g"])), parse_slimmable(opt["slimmable"]).spec)
        for it in range(args.every, args.iters + 1, args.every):
            ck = os.path.join(mdir, f"net_g_{it}.pth")
            if not os.path.exists(ck):
                ck = os.path.join(mdir, "net_g_latest.pth") if it == args.iters else None
            if ck is None or not os.path.exists(ck):
                continue
            net.load_state_dict(torch.load(ck, map_location="cpu", weights_only=True)["params"])
            res: dict = {w: {} for w in args.widths}
            for dname, loader in loaders:
                for w, vals in evaluate_widths(net.to(device), loader, args.widths, metrics, device).items():
                    res[w].update({f"{dname}/{m}": round(v, 4) for m, v in vals.items()})
            for w in args.widths:
                rows.append(dict(run=name, iter=it, width=w, **res[w]))
                print(name, it, w, res[w], flush=True)

    out = os.path.join(REPO, "results", "sr", f"{tag}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out + ".tmp", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(rows)
    os.replace(out + ".tmp", out)
    _plot(rows, os.path.join(REPO, "docs", "results", "sr", f"{tag}.png"), args)
    print(f"wrote {out}")
    return 0


def _plot(rows, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"no_distill": "C0", "distill_replace": "C3", "distill_add": "C2", "distill_l2_replace": "C1"}
    for ax, dname in zip(axes, ("Set5", "Set14")):
        key = f"{dname}/psnr"
        for run, color in styles.items():
            for w, ls in ((min(args.widths), "--"), (max(args.widths), "-")):
                pts = [(r["iter"], r[key]) for r in rows if r["run"] == run and r["width"] == w]
                if pts:
                    ax.plot(*zip(*pts), ls, color=color, marker="o", ms=3, label=f"{run.replace('_', ' ')}, w={w:g}")
        bic = [r[key] for r in rows if r["run"] == "bicubic"]
        if bic:
            ax.axhline(bic[0], color="grey", lw=1, ls=":", label="bicubic")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"PSNR on {dname} (dB, Y)")
        ax.set_title(f"{dname} x2")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"US-WDSR inplace distillation, batch {args.batch}, {args.gt_size}x{args.gt_size} HR patches "
                 f"({args.device})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    sys.exit(main())
