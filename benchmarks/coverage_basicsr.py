"""BasicSR arch coverage of the BasicSR adapter, measured (issue 24's table).

For each single-image SR arch BasicSR ships (EDSR, MSRResNet, RCAN, RRDBNet = ESRGAN's generator,
SRVGGNetCompact = Real-ESRGAN's compact net, SwinIR, ECBSR) and our WDSR, at a tiny size: a BasicSR options file
with ``model_type: SlimSRModel``, that ``network_g`` and ``slimmable: {width_range: [0.5, 1.0]}``, then

1. BasicSR's own ``train_pipeline`` (``python -m slim_plugins.integrations.basicsr.train``, in process): 2
   iterations on ``$SLIM_DATA/sr/train_hr`` (LR by MATLAB bicubic), validation on Set5 at widths 0.5 and 1.0
   (the per-width PSNR lines of the log are read back);
2. ``slim export <ckpt> --width 0.5`` and ``--width 0.75``: the exported options' ``network_g`` must name the arch
   BasicSR registers (not ours, except WDSR) at that width; the stock class built from it loads the exported
   weights with ``strict=True``; its output on a random LR input equals the slimmable net's at that width;
3. BasicSR's stock ``test_pipeline`` (a fresh process that imports only ``basicsr``, as ``python -m basicsr.test``
   does) and ours (``python -m slim_plugins.integrations.basicsr.test``) on the width-0.5 export's options: exit
   status and the Set5 PSNR of their log, which must equal the training validation's PSNR at width 0.5.

Verdict per arch: ``exact`` (steps 1-2 passed, max |diff| <= 1e-5), a typed refusal (``refused (<ErrorType>)``,
with the message) or ``FAIL``. Writes ``benchmarks/coverage_basicsr.csv``::

    SLIM_DATA=/path/to/data OMP_NUM_THREADS=1 python benchmarks/coverage_basicsr.py [--only edsr swinir]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _coverage import record_failure, write_table  # noqa: E402

import yaml

REPO = Path(__file__).resolve().parents[1]
EXPORT_WIDTHS = (0.5, 0.75)
TOL = 1e-5

#: (arch, tiny network_g): BasicSR's single-image SR archs, x2
ARCHS = [
    ("EDSR", {"type": "EDSR", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 16, "num_block": 2, "upscale": 2,
              "res_scale": 1, "img_range": 255.0}),
    ("MSRResNet", {"type": "MSRResNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 16, "num_block": 2,
                   "upscale": 2}),
    ("RCAN", {"type": "RCAN", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 16, "num_group": 2, "num_block": 2,
              "squeeze_factor": 4, "upscale": 2, "res_scale": 1, "img_range": 255.0}),
    ("RRDBNet", {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, "scale": 2, "num_feat": 16, "num_block": 2,
                 "num_grow_ch": 8}),
    # BasicSR registers it with a suffix (Real-ESRGAN registers its own SRVGGNetCompact)
    ("SRVGGNetCompact", {"type": "SRVGGNetCompact_basicsr", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 16, "num_conv": 4,
                         "upscale": 2, "act_type": "prelu"}),
    # window 2: SRModel validates the whole image without padding (BasicSR's SwinIRModel pads); Set5's LR sides are
    # all even, not all multiples of 4 or 8
    ("SwinIR", {"type": "SwinIR", "upscale": 2, "in_chans": 3, "img_size": 16, "window_size": 2, "img_range": 1.0,
                "depths": [2, 2], "embed_dim": 32, "num_heads": [4, 4], "mlp_ratio": 2,
                "upsampler": "pixelshuffle", "resi_connection": "1conv"}),
    ("ECBSR", {"type": "ECBSR", "num_in_ch": 3, "num_out_ch": 3, "num_block": 2, "num_channel": 16,
               "with_idt": False, "act_type": "prelu", "scale": 2}),
    ("WDSR (ours)", {"type": "WDSR", "num_feat": 16, "num_block": 2, "upscale": 2}),
]


def options(arch_name: str, net_g: dict, data: str, iters: int = 2) -> dict:
    """The BasicSR options a user writes for ``net_g`` under ``SlimSRModel`` (shrunk for a CPU)."""
    sr = os.path.join(data, "sr")
    return {
        "name": f"cov_{net_g['type'].lower().replace('_basicsr', '')}", "model_type": "SlimSRModel", "scale": 2, "num_gpu": 0,
        "manual_seed": 0,
        "slimmable": {"width_range": [0.5, 1.0], "num_widths": 2, "eval_widths": [0.5, 1.0]},
        "datasets": {
            "train": {"name": "train_hr", "type": "BicubicHRDataset", "dataroot_gt": f"{sr}/train_hr",
                      "io_backend": {"type": "disk"}, "gt_size": 32, "use_hflip": True, "use_rot": True,
                      "num_worker_per_gpu": 0, "batch_size_per_gpu": 2, "dataset_enlarge_ratio": 1,
                      "prefetch_mode": None},
            "val_1": {"name": "Set5", "type": "PairedImageDataset", "dataroot_gt": f"{sr}/Set5/HR",
                      "dataroot_lq": f"{sr}/Set5/LR_bicubic/X2", "filename_tmpl": "{}x2",
                      "io_backend": {"type": "disk"}},
        },
        "network_g": dict(net_g),
        "path": {"pretrain_network_g": None, "strict_load_g": True, "resume_state": None},
        "train": {"ema_decay": 0, "optim_g": {"type": "Adam", "lr": 1e-4, "weight_decay": 0, "betas": [0.9, 0.99]},
                  "scheduler": {"type": "MultiStepLR", "milestones": [100000], "gamma": 0.5},
                  "total_iter": iters, "warmup_iter": -1,
                  "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0, "reduction": "mean"}},
        "val": {"val_freq": iters, "save_img": False,
                "metrics": {"psnr": {"type": "calculate_psnr", "crop_border": 2, "test_y_channel": True}}},
        "logger": {"print_freq": 1, "save_checkpoint_freq": iters, "use_tb_logger": False,
                   "wandb": {"project": None, "resume_id": None}},
        "dist_params": {"backend": "gloo", "port": 29500},
    }


def _log_psnr(log: str) -> dict:
    """``{width: psnr}`` from SlimSRModel's "Validation Set5 per width" block."""
    return {float(w): float(p) for w, p in re.findall(r"width ([0-9.]+)[^\n]*?MFLOPs: psnr: ([0-9.]+)", log)}


def _run_test_entry(code: str, opts: str, cwd: Path) -> tuple[int, float | None, str]:
    """A fresh Python process running ``code`` with ``-opt opts`` in ``cwd``: (exit status, Set5 PSNR of the
    test log it wrote under ``cwd/results``, last error line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cwd.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, *code, "-opt", opts], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    logs = sorted(cwd.glob("results/*/test_*.log"))
    m = re.search(r"# psnr: ([0-9.]+)", logs[-1].read_text()) if logs else None
    err = (p.stderr.strip().splitlines() or [""])[-1][:200] if p.returncode else ""
    return p.returncode, float(m.group(1)) if m else None, err


#: BasicSR's stock test entry point, in a process that imports nothing of ours (``python -m basicsr.test`` would
#: put ``results/`` next to the installed ``basicsr`` package: its root is the package's parent folder)
STOCK_TEST = ["-c", "import os; from basicsr.test import test_pipeline; test_pipeline(os.getcwd())"]
SLIM_TEST = ["-m", "slim_plugins.integrations.basicsr.test"]


def measure(arch_name: str, net_g: dict, data: str, work: Path, test_entries: bool = True) -> dict:
    import torch

    import slim_plugins as slim
    from slim_plugins.cli import main as slim_main
    from slim_plugins.integrations.basicsr.model import parse_slimmable
    from slim_plugins.integrations.basicsr.stock import convert_kwargs
    from slim_plugins.integrations.basicsr.train import run_pipeline

    row = {"arch": arch_name, "network_g": json.dumps({k: v for k, v in net_g.items() if k != "type"}),
           "verdict": "", "val_psnr_w0.5": "", "val_psnr_w1": "", "exported_network_g": "", "strict_load": "",
           "export_max_diff": "", "stock_basicsr_test": "", "slim_test_entry": "", "seconds": 0.0, "detail": ""}
    t0 = time.time()
    try:
        opt = options(arch_name, net_g, data)
        work.mkdir(parents=True, exist_ok=True)
        cfg = work / f"{opt['name']}.yml"
        cfg.write_text(yaml.safe_dump(opt, sort_keys=False))
        run_pipeline(str(cfg), root_path=str(work))  # BasicSR's train_pipeline: experiments/<name>/
        exp = work / "experiments" / opt["name"]
        log = next(exp.glob("train_*.log")).read_text()
        psnr = _log_psnr(log)
        row["val_psnr_w0.5"], row["val_psnr_w1"] = psnr.get(0.5, ""), psnr.get(1.0, "")
        ckpt = exp / "models" / f"net_g_{opt['train']['total_iter']}.pth"

        import basicsr.archs  # noqa: F401
        from basicsr.utils.registry import ARCH_REGISTRY

        settings = parse_slimmable(opt["slimmable"])
        stock_cls = ARCH_REGISTRY.get(net_g["type"])
        dyn = stock_cls(**{k: v for k, v in net_g.items() if k != "type"})
        dyn = slim.convert(dyn, settings.spec, **convert_kwargs(net_g, dyn))
        dyn.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["params"])
        dyn.eval()
        x = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
        worst, strict, exported, tests = 0.0, [], [], {}
        for w in EXPORT_WIDTHS:
            rc = slim_main(["export", str(ckpt), "--width", f"{w:g}", "--out", str(work / "exported" / f"w{w:g}.pth")])
            if rc != 0:
                raise RuntimeError(f"slim export --width {w:g} exited {rc}")
            test_opt = yaml.safe_load((work / "exported" / f"w{w:g}_test.yml").read_text())
            ng = test_opt["network_g"]
            cls = ARCH_REGISTRY.get(ng["type"])
            if cls is not stock_cls:
                raise RuntimeError(f"the exported options name {ng['type']!r}, not {net_g['type']!r}")
            changed = {k: v for k, v in ng.items() if net_g.get(k) != v}
            exported.append(f"{w:g}: {json.dumps(changed)}")
            stock = cls(**{k: v for k, v in ng.items() if k != "type"}).eval()
            missing = stock.load_state_dict(torch.load(work / "exported" / f"w{w:g}.pth", weights_only=True)["params"],
                                            strict=True)
            strict.append(not missing.missing_keys and not missing.unexpected_keys)
            with torch.no_grad():
                with slim.width(w):
                    y = dyn(x)
                worst = max(worst, float((stock(x) - y).abs().max()))
            if w == 0.5 and test_entries:
                yml = str(work / "exported" / "w0.5_test.yml")
                tests["stock"] = _run_test_entry(STOCK_TEST, yml, work / "stock_test")
                tests["slim"] = _run_test_entry(SLIM_TEST, yml, work / "slim_test")
        row["exported_network_g"] = "; ".join(exported)
        row["strict_load"] = "ok" if all(strict) else "FAIL"
        row["export_max_diff"] = f"{worst:.2e}"
        for key, col in (("stock", "stock_basicsr_test"), ("slim", "slim_test_entry")):
            if key in tests:
                rc, p, err = tests[key]
                same = p is not None and psnr.get(0.5) is not None and abs(p - psnr[0.5]) <= 1e-3
                row[col] = (f"exit 0, Set5 psnr {p:.4f}" + ("" if same else " (differs from validation)")
                            if rc == 0 and p is not None else f"exit {rc}: {err}")
        ok = all(strict) and worst <= TOL and set(psnr) >= {0.5, 1.0}
        row["verdict"] = "exact" if ok else "FAIL"
        if not ok:
            row["detail"] = f"strict {strict}, diff {worst:.2e}, widths in log {sorted(psnr)}"
    except Exception as e:  # noqa: BLE001  the table records every outcome
        record_failure(row, e)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", help="archs whose name contains one of these (case-insensitive)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "coverage_basicsr.csv"))
    args = p.parse_args(argv)
    data = os.environ.get("SLIM_DATA", str(REPO.parent / "shared" / "data"))
    archs = [a for a in ARCHS if not args.only or any(o.lower() in a[0].lower() for o in args.only)]
    rows = []
    for name, net_g in archs:
        with tempfile.TemporaryDirectory(prefix="cov-basicsr-") as tmp:
            r = measure(name, net_g, data, Path(tmp))
        print(json.dumps(r), flush=True)
        rows.append(r)
    if not args.only:
        write_table(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
