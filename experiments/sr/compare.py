"""US-WDSR (with and without inplace distillation) vs individually trained WDSRs at n = 32 and n = 64 (US-Nets
Section 5.1, Fig. 4, scaled to $SLIM_DATA/sr and the machine at hand).

Every run is BasicSR's own ``train_pipeline`` on `configs/basicsr/us_wdsr_x2_sr.yml` with the same iterations,
batch, patch size, optimizer, cosine schedule and seed: the US runs through ``SlimSRModel`` (``distill: l1`` in
``replace`` mode (the paper's) and ``add`` mode (the shipped config's), ``distill: null``), the individual ones through BasicSR's plain ``SRModel`` on ``WDSR(num_feat=n)``. EMA is off
(``ema_decay: 0``: over a few hundred iterations BasicSR's 0.999 would still weigh the random initialisation);
afterwards the final weights of each are evaluated on Set5 and Set14 (PSNR / SSIM on Y, crop border 2, BasicSR's
metrics) at
n = 32, 40, 48, 56, 64 (US) or at their own n; bicubic upsampling (MATLAB-style) is the reference row.
Writes ``results/sr/<tag>.csv`` (model, n, width, mflops, params_m, Set5/psnr, ...; train_s) and
``docs/results/sr/<tag>.png`` (PSNR vs MFLOPs at a 48x48 LR input), prints a markdown table.

    SLIM_DATA=... .venv/bin/python experiments/sr/compare.py --iters 600 --batch 8 --tag cpu_600it
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "basicsr", "us_wdsr_x2_sr.yml")
WIDTHS = [0.5, 0.625, 0.75, 0.875, 1.0]  # n = 32, 40, 48, 56, 64
RUNS = {  # name: overrides of the options file
    "us_wdsr_distill": {"slimmable.distill": "l1", "slimmable.distill_mode": "replace"},  # the paper's form
    "us_wdsr_distill_add": {"slimmable.distill": "l1", "slimmable.distill_mode": "add"},  # the shipped config's
    "us_wdsr_no_distill": {"slimmable.distill": None, "slimmable.distill_mode": None},
    "wdsr_n32": {"model_type": "SRModel", "slimmable": None, "network_g.num_feat": 32},
    "wdsr_n64": {"model_type": "SRModel", "slimmable": None, "network_g.num_feat": 64},
}


def _overrides(name, args) -> dict:
    o = {"name": name, "path.experiments_root": os.path.abspath(args.work_dir), "train.total_iter": args.iters,
         "train.scheduler.periods": [args.iters], "logger.save_checkpoint_freq": args.iters + 1,
         "logger.print_freq": max(1, args.iters // 10), "logger.use_tb_logger": False, "val": None,
         "datasets.train.batch_size_per_gpu": args.batch, "datasets.train.gt_size": args.gt_size,
         "manual_seed": args.seed, "train.ema_decay": 0, "num_gpu": 0 if args.device == "cpu" else "auto"}
    o.update(RUNS[name])
    return o


def _val_loaders(opt):
    from basicsr.data import build_dataloader, build_dataset

    loaders = []
    for phase, d in opt["datasets"].items():
        if phase.startswith("val"):
            d = dict(d, phase="val", scale=opt["scale"])
            loaders.append((d["name"], build_dataloader(build_dataset(d), d, num_gpu=0, dist=False)))
    return loaders


def _net(name, opt, device, work_dir):
    import slim_plugins as slim
    from basicsr.archs import build_network
    from slim_plugins.integrations.basicsr import parse_slimmable

    net_opt = dict(opt["network_g"])
    if name.startswith("wdsr_n"):
        net_opt["num_feat"] = int(name[len("wdsr_n"):])
    net = build_network(net_opt)
    if name.startswith("us_"):
        net = slim.convert(net, parse_slimmable(opt["slimmable"]).spec)
    ck = torch.load(os.path.join(work_dir, name, "models", "net_g_latest.pth"), map_location="cpu",
                    weights_only=True)
    net.load_state_dict(ck.get("params_ema", ck["params"]))
    return net.to(device).eval()


def _bicubic(loaders, metrics):
    """Bicubic x2 upsampling (MATLAB-style ``imresize``) of the LR files: the reference every SR net must beat."""
    from basicsr.metrics import calculate_metric
    from basicsr.utils import tensor2img
    from basicsr.utils.matlab_functions import imresize

    row = {}
    for dname, loader in loaders:
        sums, count = {m: 0.0 for m in metrics}, 0
        for data in loader:
            up = imresize(data["lq"][0], 2).clamp(0, 1)
            sr, gt = tensor2img([up]), tensor2img([data["gt"]])
            for m, mopt in metrics.items():
                sums[m] += calculate_metric({"img": sr, "img2": gt}, mopt)
            count += 1
        row.update({f"{dname}/{m}": round(v / count, 4) for m, v in sums.items()})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gt-size", type=int, default=48, dest="gt_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS),
                   help="runs to train (every run with a checkpoint in --work-dir is evaluated)")
    p.add_argument("--work-dir", default=os.path.join(REPO, "work_dirs", "sr_compare"), dest="work_dir")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoints already in --work-dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default=None)
    p.add_argument("--widths", nargs="+", type=float, default=WIDTHS, help="US widths evaluated")
    args = p.parse_args(argv)
    tag = args.tag or f"{args.device}_{args.iters}it"

    import slim_plugins as slim
    from slim_plugins.config import load_yaml_config
    from slim_plugins.integrations.basicsr.model import evaluate_widths
    from slim_plugins.integrations.basicsr.train import run_pipeline

    times = {}
    timing_file = os.path.join(args.work_dir, "train_seconds.csv")
    if os.path.exists(timing_file):
        with open(timing_file) as f:
            times = {r["run"]: float(r["train_s"]) for r in csv.DictReader(f)}
    if not args.eval_only:
        for name in args.runs:
            t0 = time.time()
            run_pipeline(CONFIG, overrides=_overrides(name, args), root_path=REPO)
            times[name] = round(time.time() - t0, 1)
            os.makedirs(args.work_dir, exist_ok=True)
            with open(timing_file, "w") as f:
                w = csv.writer(f)
                w.writerow(["run", "train_s"])
                w.writerows(times.items())

    opt = load_yaml_config(CONFIG)
    metrics = opt["val"]["metrics"]
    device = torch.device(args.device)
    loaders = _val_loaders(opt)
    rows = [dict(model="bicubic", n="", width="", mflops=0.0, params_m=0.0, **_bicubic(loaders, metrics))]
    x = torch.zeros(1, 3, 48, 48, device=device)
    for name in [r for r in RUNS if os.path.exists(os.path.join(args.work_dir, r, "models", "net_g_latest.pth"))]:
        net = _net(name, opt, device, args.work_dir)
        widths = args.widths if name.startswith("us_") else [None]
        res: dict = {w: {} for w in widths}
        for dname, loader in loaders:
            for w, vals in evaluate_widths(net, loader, widths, metrics, device).items():
                res[w].update({f"{dname}/{m}": round(v, 4) for m, v in vals.items()})
        for w in widths:
            n = int(round(64 * w)) if w is not None else int(name[len("wdsr_n"):])
            if w is None:
                mflops = slim.count_mflops(net, x)
                params = sum(q.numel() for q in net.parameters()) / 1e6
            else:
                with slim.width(w):
                    mflops = slim.count_mflops(net, x)
                params = sum(q.numel() for q in slim.export(net, w, example_input=x).parameters()) / 1e6
            rows.append(dict(model=name, n=n, width="" if w is None else w, mflops=round(mflops, 1),
                             params_m=round(params, 4), **res[w], train_s=times.get(name, "")))

    out = os.path.join(REPO, "results", "sr", f"{tag}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(out + ".tmp", out)
    _plot(rows, os.path.join(REPO, "docs", "results", "sr", f"{tag}.png"), args)
    cols = [c for c in fields if "/" in c]
    print("| model | n | MFLOPs (48x48 LR) | " + " | ".join(cols) + " | train s |")
    print("|---" * (len(cols) + 4) + "|")
    for r in rows:
        print(f"| {r['model']} | {r['n']} | {r['mflops']:.0f} | " + " | ".join(str(r.get(c, "")) for c in cols)
              + f" | {r.get('train_s', '')} |")
    print(f"wrote {out}")
    return 0


def _plot(rows, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, dname in zip(axes, ("Set5", "Set14")):
        key = f"{dname}/psnr"
        for model, style in (("us_wdsr_distill", "o-"), ("us_wdsr_distill_add", "^-"), ("us_wdsr_no_distill", "s--")):
            pts = [(r["mflops"], r[key]) for r in rows if r["model"] == model]
            if pts:
                ax.plot(*zip(*pts), style, label=model.replace("_", " "))
        ind = [(r["mflops"], r[key]) for r in rows if str(r["model"]).startswith("wdsr_n")]
        if ind:
            ax.plot(*zip(*ind), "k*", markersize=12, label="individual WDSR (n=32, 64)")
        bic = [r[key] for r in rows if r["model"] == "bicubic"]
        if bic:
            ax.axhline(bic[0], color="grey", lw=1, ls=":", label="bicubic")
        ax.set_xlabel("MFLOPs (multiply-adds) at a 48x48 LR input")
        ax.set_ylabel(f"PSNR on {dname} (dB, Y)")
        ax.set_title(f"{dname} x2")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"US-WDSR vs individual WDSR, {args.iters} iterations, batch {args.batch}, "
                 f"{args.gt_size}x{args.gt_size} HR patches ({args.device})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
