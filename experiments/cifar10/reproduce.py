"""Reproduce the classification claims of Slimmable Networks and Universally Slimmable Networks on CIFAR-10.

One command per experiment (``--schedule cpu`` on a CPU, ``gpu`` = the full schedule of ``base.yaml``)::

    python experiments/cifar10/reproduce.py exp1 --schedule cpu   # naive training vs switchable BN (S-Nets Fig. 2)
    python experiments/cifar10/reproduce.py exp2 --schedule cpu   # S-Net vs individual nets, shared gamma/beta,
                                                                  # 8 switches (S-Nets Tables 3, 4, 6)
    python experiments/cifar10/reproduce.py exp3 --schedule cpu   # US-Net vs S-Net vs individual nets at 27 widths
                                                                  # (US-Nets Table 1, Figs. 3, 11)
    python experiments/cifar10/reproduce.py exp4 --schedule cpu   # sampling rules, inplace distillation, n, width
                                                                  # lower bound, divisor (US Table 2, Figs. 6-9)
    python experiments/cifar10/reproduce.py exp5 --schedule cpu   # BN post-statistics (US-Nets Table 3)
    python experiments/cifar10/reproduce.py all --schedule cpu --jobs 2
    python experiments/cifar10/reproduce.py --check inet_035 usnet --jobs 2   # retrain runs, compare with the CSVs
    python experiments/report.py                                   # CSVs -> docs/reproduction.md + plots

Every training run is one ``python experiments/cifar10/train.py`` (``slim train``'s trainer plus this experiment's
hooks: image cache, learning curves, individual nets) of ``base.yaml`` (+ ``cpu.yaml``) + the run's method keys
below; its config is written to ``<runs>/<run>/run_config.yaml`` and the run can be repeated with that command.
A run shared by several experiments (e.g. the 4-switch S-Net) trains once; finished
runs are reused (``--retrain`` forces). Evaluation beyond the trainer's own (untrained widths of S-Nets and
individual nets, BN post-statistics variants) uses the library's public verbs: ``slim.export``, ``slim.convert``,
``slim.calibrate_bn``, ``slim.count_mflops`` and the trainer's ``validate``.

Outputs (``results/cifar10/<schedule>/``): ``<exp>.csv``, one row per (run, width, protocol) with hardware,
schedule, epochs, wall time, seed, MFLOPs (multiply-adds) and top-1 error (%); ``exp1_curves.csv`` with the
training and test error curves. Checkpoints stay under ``output/reproduce/`` (not committed).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import csv
import fcntl
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
_spec = importlib.util.spec_from_file_location("cifar10_train", HERE / "train.py")
EXP_TRAIN = importlib.util.module_from_spec(_spec)  # the run trainer: slim train + the experiment's hooks
_spec.loader.exec_module(EXP_TRAIN)
SWITCHES4 = [0.35, 0.5, 0.75, 1.0]
SWITCHES8 = [0.35, 0.4, 0.5, 0.6, 0.7, 0.75, 0.85, 1.0]  # the 4 switches plus 4 more (S-Nets Table 4 style)
FINE_STEP = 0.025  # US-Nets Fig. 3/11: every width 0.35..1.0 in steps of 0.025 (27 widths)
CALIB_SIZES = {"exact_all": ("exact", None), "moving_all": ("moving", None), "exact_1k": ("exact", 1000),
               "exact_2k": ("exact", 2000)}  # US-Nets Table 3


def _us(**kw):
    base = {"model": "us_mobilenetv2_100", "width_range": [0.35, 1.0], "num_widths": 4, "sample_rule": "sandwich",
            "inplace_distill": True, "eval_widths": 0.05}
    base.update(kw)
    return base


def _snet(widths, **kw):
    return {"model": "s_mobilenetv2_100", "widths": widths, "calib_samples": 0, "eval_widths": None, **kw}


def _inet(w):
    return {"model": "mobilenetv2_100", "slimmable": False, "widths": [w], "calib_samples": 0, "eval_widths": None,
            "export_widths": [w],
            "curve_interval": None}


#: run name -> (method label, the run's `slim train` keys on top of base.yaml)
RUNS: dict = {
    "naive4": ("Naive training, shared BN", _snet(SWITCHES4, bn="naive")),
    "snet4": ("S-Net 4-switch (S-BN)", _snet(SWITCHES4)),
    "snet4_shared": ("S-Net 4-switch, shared gamma/beta", _snet(SWITCHES4, bn="switchable_shared",
                                                                curve_interval=None)),
    "snet8": ("S-Net 8-switch", _snet(SWITCHES8, curve_interval=None)),
    # diagnostic: 8 summed losses double the shared weights' gradient of the 4-switch net at the same lr
    "snet8_lr": ("S-Net 8-switch, lr halved", _snet(SWITCHES8, lr_scale=0.5, curve_interval=None)),
    **{f"inet_{int(w * 100):03d}": (f"Individual {w:g}x", _inet(w)) for w in SWITCHES4},
    "usnet": ("US-Net (sandwich n=4, distill)", _us(eval_widths=FINE_STEP)),
    "us_nodistill": ("US-Net without inplace distillation", _us(inplace_distill=False, curve_interval=None)),
    **{f"us_n3_{rule}": (f"n=3, {label}, no distillation",
                         _us(num_widths=3, sample_rule=rule, inplace_distill=False, curve_interval=None))
       for rule, label in (("random", "3 random"), ("min_random", "min + 2 random"),
                           ("max_random", "max + 2 random"), ("sandwich", "min + max + 1 random"))},
    "us_n3": ("US-Net n=3", _us(num_widths=3, curve_interval=None)),
    "us_n5": ("US-Net n=5", _us(num_widths=5, curve_interval=None)),
    "us_k0_005": ("US-Net k0=0.05", _us(width_range=[0.05, 1.0], curve_interval=None)),
    "us_k0_025": ("US-Net k0=0.25", _us(width_range=[0.25, 1.0], curve_interval=None)),
    "us_d1": ("US-Net divisor 1", _us(divisor=1, curve_interval=None)),
    # seed repeats: the run-to-run spread that a difference between methods must exceed
    "snet4_seed1": ("S-Net 4-switch (S-BN), seed 1", _snet(SWITCHES4, seed=1, curve_interval=None)),
    "usnet_seed1": ("US-Net (sandwich n=4, distill), seed 1", _us(seed=1, curve_interval=None)),
}

#: experiment -> (title, runs it needs)
EXPERIMENTS: dict = {
    "exp1": ("Naive training vs switchable BN (S-Nets Sec. 3.1, Fig. 2)", ["naive4", "snet4"]),
    "exp2": ("S-Net vs individual nets; private vs shared gamma/beta; 8 switches (S-Nets Tables 3, 4, 6)",
             ["inet_035", "inet_050", "inet_075", "inet_100", "snet4", "snet4_shared", "snet8",
              "snet8_lr"]),
    "exp3": ("US-Net vs S-Net vs individual nets at every width, after BN calibration (US-Nets Table 1, Figs. 3, "
             "11)", ["usnet", "snet4", "inet_035", "inet_050", "inet_075", "inet_100"]),
    "exp4": ("Sampling rules, inplace distillation, n, width lower bound, divisor (US-Nets Table 2, Figs. 6-9)",
             ["us_n3_random", "us_n3_min_random", "us_n3_max_random", "us_n3_sandwich", "usnet", "us_nodistill",
              "us_n3", "us_n5", "us_k0_005", "us_k0_025", "us_d1"]),
    "exp5": ("BN post-statistics: moving vs exact average, all vs 1k vs 2k samples (US-Nets Table 3)", ["usnet"]),
    "noise": ("Seed-to-seed spread of the S-Net and the US-Net (how large a difference must be to count)",
              ["snet4", "snet4_seed1", "usnet", "usnet_seed1"]),
}

#: tiny settings for tests (`--smoke`): every run trains a few updates on a few hundred images
SMOKE = {"train_num_samples": 256, "val_num_samples": 200, "batch_size": 32, "epochs": 1, "workers": 0,
         "curve_samples": 64, "warmup_epochs": 0, "sched_on_updates": True}
SMOKE_CURVE_INTERVAL = 4
SMOKE_CALIB = 64

FIELDS = ["experiment", "run", "method", "protocol", "width", "trained_width", "mflops", "top1_err", "top1",
          "calib_samples", "schedule", "epochs", "train_samples", "wall_time_s", "seed", "hardware"]
CURVE_FIELDS = ["run", "method", "iteration", "epoch", "width", "train_err", "test_err", "schedule", "hardware"]


# ---- configs ---------------------------------------------------------------------------------------------------
def run_config(name: str, schedule: str, runs_dir: Path, smoke: bool = False, epochs: int | None = None) -> dict:
    """The ``slim train`` config of run ``name``: base.yaml, then cpu.yaml (``schedule="cpu"``), then the run's
    keys, then ``epochs`` (a longer or shorter variant of the schedule), then the smoke overrides."""
    cfg = yaml.safe_load((HERE / "base.yaml").read_text())
    if schedule == "cpu":
        cfg.update(yaml.safe_load((HERE / "cpu.yaml").read_text()))
    elif schedule != "gpu":
        raise SystemExit(f"unknown schedule {schedule!r}; allowed: cpu, gpu")
    keys = copy.deepcopy(RUNS[name][1])
    if "curve_interval" in keys and keys["curve_interval"] is None:
        cfg.pop("curve_interval", None)
        keys.pop("curve_interval")
    scale = keys.pop("lr_scale", None)
    cfg.update(keys)
    if scale is not None:  # relative to the schedule's lr, so one run key serves both schedules
        for k in ("lr", "warmup_lr", "min_lr"):
            if cfg.get(k):
                cfg[k] = cfg[k] * scale
    if epochs is not None:
        cfg["epochs"] = int(epochs)
    if smoke:
        cfg.update(SMOKE)
        if cfg.get("curve_interval"):
            cfg["curve_interval"] = SMOKE_CURVE_INTERVAL
        if cfg.get("calib_samples"):
            cfg["calib_samples"] = SMOKE_CALIB
        if cfg.get("eval_widths") is not None:
            cfg["eval_widths"] = 0.1625  # lo, ~mid, hi
    cfg["output"] = str(runs_dir / name)
    return cfg


def hardware() -> str:
    """The device that runs training, in words (GPU name, or CPU model and core count)."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {os.cpu_count()} cores (torch {torch.__version__})"


# ---- training runs ---------------------------------------------------------------------------------------------
def train_run(name: str, schedule: str, runs_dir: Path, smoke: bool, threads: int, retrain: bool = False,
              log=print, epochs: int | None = None) -> dict:
    """Train run ``name`` with experiments/cifar10/train.py in a subprocess (reused when finished with the same config).

    Returns the run record (``done.json``): config, wall time, hardware. Raises RuntimeError when training fails.
    """
    run = runs_dir / name
    run.mkdir(parents=True, exist_ok=True)
    cfg = run_config(name, schedule, runs_dir, smoke, epochs)
    with open(runs_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another invocation training the same run: wait for it, then reuse
        done = run / "done.json"
        if done.exists() and not retrain:
            rec = json.loads(done.read_text())
            if rec.get("config") == cfg:
                log(f"[{name}] reusing the finished run in {run}")
                return rec
        for stale in ("summary.csv", "curves.csv", "spectrum.csv", "done.json"):
            (run / stale).unlink(missing_ok=True)
        cfg_path = run / "run_config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, str(HERE / "train.py"), str(cfg_path)]
        log(f"[{name}] {' '.join(cmd)}  (OMP_NUM_THREADS={threads})")
        t0 = time.time()
        with open(run / "train.log", "w") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        wall = time.time() - t0
        if rc != 0:
            tail = (run / "train.log").read_text()[-3000:]
            raise RuntimeError(f"run {name} failed (exit {rc}); last lines of {run / 'train.log'}:\n{tail}")
        rec = {"name": name, "config": cfg, "wall_time_s": round(wall, 1), "hardware": hardware(),
               "threads": threads, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, done)
        log(f"[{name}] done in {wall:.0f}s")
        return rec


def train_all(names, schedule, runs_dir, smoke, jobs, threads, retrain=False, epochs=None) -> dict:
    """Train ``names`` with ``jobs`` runs at a time; returns ``{name: record}``."""
    out = {}
    if names:  # decode the image cache once, before parallel runs would race to build it
        _datasets(run_config(names[0], schedule, runs_dir, smoke, epochs))
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = {pool.submit(train_run, n, schedule, runs_dir, smoke, threads, retrain, epochs=epochs): n
                for n in names}
        for f in cf.as_completed(futs):
            out[futs[f]] = f.result()
    return out


# ---- reading and evaluating runs -------------------------------------------------------------------------------
def _trainer_config(cfg: dict) -> dict:
    """A run config without the experiment's own keys (see train.py), resolved by the trainer."""
    from slim_plugins.integrations.timm.train import resolve_config

    return resolve_config({k: v for k, v in cfg.items() if k not in EXP_TRAIN.EXPERIMENT_KEYS})


def _datasets(cfg: dict) -> dict:
    from slim_plugins.integrations.timm.train import build_datasets

    fn = EXP_TRAIN.cached_datasets if cfg.get("cache_images") else build_datasets
    return fn(_trainer_config(cfg), ("train", "val"), lambda *a: None)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _base_row(exp, name, rec, schedule) -> dict:
    cfg = rec["config"]
    return {"experiment": exp, "run": name, "method": RUNS[name][0], "schedule": schedule,
            "epochs": cfg["epochs"], "train_samples": cfg.get("train_num_samples") or 50000,
            "wall_time_s": rec["wall_time_s"], "seed": cfg["seed"],
            "hardware": f"{rec['hardware']}, {rec['threads']} thread(s) per run"}


def _trained(cfg, w) -> bool:
    if cfg.get("width_range"):
        lo, hi = cfg["width_range"]
        return lo - 1e-9 <= w <= hi + 1e-9
    return any(abs(w - s) < 1e-9 for s in cfg["widths"])


def spectrum_protocol(calib_samples) -> str:
    calib_samples = int(calib_samples or 0)
    return f"BN calibrated ({calib_samples} samples, exact)" if calib_samples else "own BN (running statistics)"


def spectrum_rows(exp, name, rec, schedule, runs_dir) -> list[dict]:
    """The trainer's own evaluation of a run (spectrum.csv): S-Nets / individual nets with the running BN
    statistics of training, US-Nets after BN calibration."""
    cfg = rec["config"]
    rows = []
    for r in _read_csv(runs_dir / name / "spectrum.csv"):
        w = float(r["width"])
        protocol = spectrum_protocol(cfg.get("calib_samples"))
        rows.append({**_base_row(exp, name, rec, schedule), "protocol": protocol, "width": w,
                     "trained_width": _trained(cfg, w), "mflops": round(float(r["mflops"]), 3),
                     "top1": round(float(r["top1"]), 3), "top1_err": round(100 - float(r["top1"]), 3),
                     "calib_samples": cfg.get("calib_samples") or 0})
    return rows


class _Evaluator:
    """Loads a run's checkpoint and the CIFAR-10 splits once; calibrates and evaluates at any width."""

    def __init__(self, cfg: dict, device: str = "cpu"):
        self.cfg = _trainer_config(cfg)
        self.device = device
        self.data = _datasets(cfg)

    def loaders(self, calib_samples):
        from slim_plugins.integrations.timm.data import subset_indices
        from slim_plugins.integrations.timm.train import make_loader

        cfg = self.cfg
        train_idx = subset_indices(len(self.data["train"]), cfg["train_num_samples"], cfg["seed"])
        n = len(train_idx) if calib_samples is None else min(calib_samples, len(train_idx))
        calib_idx = train_idx[subset_indices(len(train_idx), n, cfg["seed"] + 1)]
        val_idx = subset_indices(len(self.data["val"]), cfg["val_num_samples"], cfg["seed"])
        bs = 256
        return (make_loader(cfg, self.data["train"], calib_idx, batch_size=bs, device=self.device),
                make_loader(cfg, self.data["val"], val_idx, batch_size=bs, device=self.device))

    def calibrate_and_evaluate(self, model, widths, calib_samples=2000, method="exact") -> dict:
        """``{width: top-1 %}`` after BN post-statistics of every width (US-Nets Eq. 8 / Eq. 5)."""
        import torch

        import slim_plugins as slim
        from slim_plugins.integrations.timm.train import validate

        calib, val = self.loaders(calib_samples)
        cl = self.cfg["channels_last"]

        def fwd(m, b):
            x = b[0].to(self.device)
            return m(x.contiguous(memory_format=torch.channels_last) if cl else x)

        slim.calibrate_bn(model, calib, widths=widths, num_samples=calib_samples, method=method, forward=fwd)
        ev = validate(model, val, widths, torch.device(self.device), cl)
        return {w: ev[w]["top1"] for w in widths}

    def mflops(self, model, w) -> float:
        import torch

        import slim_plugins as slim

        x = torch.zeros(1, *self.cfg["input_size"])
        with slim.width(w):
            return slim.count_mflops(model, x)


def _load(runs_dir: Path, name: str):
    import slim_plugins as slim
    from slim_plugins.integrations.timm.cli import model_from_checkpoint

    return model_from_checkpoint(slim.read_checkpoint(str(runs_dir / name / "last.pth.tar")))


def as_universal(model, cfg, width_range=(0.35, 1.0)):
    """A trained S-Net / individual net at every width of ``width_range``: its widest network exported as a plain
    timm model (``slim.export``), converted to a US-Net (``slim.convert``, shared gamma/beta of the widest net);
    BN statistics must then be calibrated per width (US-Nets Appendix A, "Naturally slimmable?")."""
    import torch

    import slim_plugins as slim
    from slim_plugins.integrations.timm import fixed_layers, set_expansion_units

    x = torch.zeros(1, *cfg["input_size"])
    w_max = max(cfg["widths"])
    plain = slim.export(model, w_max, example_input=x)
    us = slim.convert(plain, slim.WidthSpec.range(*width_range, divisor=cfg["divisor"]), fixed=fixed_layers(plain),
                      bn="us")
    set_expansion_units(us)
    us.eval()
    if cfg["channels_last"]:
        us.to(memory_format=torch.channels_last)
    return us


def fine_widths(lo=0.35, hi=1.0, step=FINE_STEP, smoke=False):
    if smoke:
        return [0.35, 0.6, 1.0]
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 4) for i in range(n + 1)]


# ---- experiments -----------------------------------------------------------------------------------------------
def exp_rows_exp1(recs, schedule, runs_dir, smoke, log):
    rows = []
    for name in ("naive4", "snet4"):
        rows += spectrum_rows("exp1", name, recs[name], schedule, runs_dir)
    # The paper's conjecture: naive training fails because one shared BN holds statistics of mixed widths.
    # Calibrating the naive model's BN per width (post-statistics) tests it.
    rec = recs["naive4"]
    model, cfg = _load(runs_dir, "naive4")
    ev = _Evaluator(rec["config"])
    n_cal = SMOKE_CALIB if smoke else 2000
    for w in cfg["widths"]:
        top1 = ev.calibrate_and_evaluate(model, [w], calib_samples=n_cal)[w]
        rows.append({**_base_row("exp1", "naive4", rec, schedule), "protocol": f"BN calibrated at this width "
                     f"({n_cal} samples, exact)", "width": w, "trained_width": True,
                     "mflops": round(ev.mflops(model, w), 3), "top1": round(top1, 3),
                     "top1_err": round(100 - top1, 3), "calib_samples": n_cal})
    curves = []
    for name in ("naive4", "snet4"):
        rec = recs[name]
        path = runs_dir / name / "curves.csv"
        for r in _read_csv(path):
            for w in rec["config"]["widths"]:
                k = f"{w:g}"
                curves.append({"run": name, "method": RUNS[name][0], "iteration": int(r["iteration"]),
                               "epoch": float(r["epoch"]), "width": w,
                               "train_err": round(100 - float(r[f"train_top1_w{k}"]), 3),
                               "test_err": round(100 - float(r[f"test_top1_w{k}"]), 3), "schedule": schedule,
                               "hardware": rec["hardware"]})
    return rows, curves


def exp_rows_exp2(recs, schedule, runs_dir, smoke, log):
    rows = []
    for name in EXPERIMENTS["exp2"][1]:
        rows += spectrum_rows("exp2", name, recs[name], schedule, runs_dir)
    return rows, None


def exp_rows_exp3(recs, schedule, runs_dir, smoke, log):
    rows = spectrum_rows("exp3", "usnet", recs["usnet"], schedule, runs_dir)
    for name in ("snet4", *(f"inet_{int(w * 100):03d}" for w in SWITCHES4)):  # own BN at the trained widths
        rows += spectrum_rows("exp3", name, recs[name], schedule, runs_dir)
    widths = fine_widths(smoke=smoke)
    n_cal = SMOKE_CALIB if smoke else 2000
    for name in ("snet4", "inet_100"):  # US-Nets Fig. 11: every width after calibration
        rec = recs[name]
        model, cfg = _load(runs_dir, name)
        us = as_universal(model, cfg)
        ev = _Evaluator(rec["config"])
        t0 = time.time()
        top1 = ev.calibrate_and_evaluate(us, widths, calib_samples=n_cal)
        log(f"[exp3] {name} at {len(widths)} widths after calibration ({time.time() - t0:.0f}s)")
        for w in widths:
            rows.append({**_base_row("exp3", name, rec, schedule),
                         "protocol": f"widest net's weights at any width, BN calibrated ({n_cal} samples, exact)",
                         "width": w, "trained_width": _trained(cfg, w), "mflops": round(ev.mflops(us, w), 3),
                         "top1": round(top1[w], 3), "top1_err": round(100 - top1[w], 3), "calib_samples": n_cal})
    return rows, None


def exp_rows_exp4(recs, schedule, runs_dir, smoke, log):
    rows = []
    for name in EXPERIMENTS["exp4"][1]:
        rows += spectrum_rows("exp4", name, recs[name], schedule, runs_dir)
    return rows, None


def exp_rows_exp5(recs, schedule, runs_dir, smoke, log):
    rec = recs["usnet"]
    model, cfg = _load(runs_dir, "usnet")
    ev = _Evaluator(rec["config"])
    widths = [0.35, 0.5, 0.75, 1.0]
    rows = []
    for protocol, (method, n) in CALIB_SIZES.items():
        if smoke and n is not None:
            n = min(n, 128)
        t0 = time.time()
        top1 = ev.calibrate_and_evaluate(model, widths, calib_samples=n, method=method)
        used = n if n is not None else len(ev.data["train"]) if not rec["config"].get("train_num_samples") \
            else rec["config"]["train_num_samples"]
        log(f"[exp5] {protocol}: {used} samples, {time.time() - t0:.0f}s")
        for w in widths:
            rows.append({**_base_row("exp5", "usnet", rec, schedule),
                         "protocol": f"{method} average, {'all training images' if n is None else f'{n} samples'}",
                         "width": w, "trained_width": True, "mflops": round(ev.mflops(model, w), 3),
                         "top1": round(top1[w], 3), "top1_err": round(100 - top1[w], 3), "calib_samples": used})
    return rows, None


def exp_rows_noise(recs, schedule, runs_dir, smoke, log):
    rows = []
    for name in EXPERIMENTS["noise"][1]:
        rows += [r for r in spectrum_rows("noise", name, recs[name], schedule, runs_dir)
                 if name.startswith("snet") or any(abs(r["width"] - w) < 1e-9 for w in (*SWITCHES4, 0.6))]
    return rows, None


ANALYSES = {"noise": exp_rows_noise, "exp1": exp_rows_exp1, "exp2": exp_rows_exp2, "exp3": exp_rows_exp3,
            "exp4": exp_rows_exp4,
            "exp5": exp_rows_exp5}


def _write_csv(path: Path, rows: list[dict], fields: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def run_experiment(exp, schedule, runs_dir, results_dir, smoke=False, jobs=1, threads=None, retrain=False,
                   log=print, epochs=None) -> Path:
    """Train what ``exp`` needs, evaluate, write ``results_dir/<exp>.csv`` (+ ``exp1_curves.csv``)."""
    import torch

    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    title, names = EXPERIMENTS[exp]
    log(f"== {exp}: {title} ({schedule} schedule{', smoke' if smoke else ''}) ==")
    recs = train_all(names, schedule, runs_dir, smoke, jobs, threads, retrain, epochs)
    torch.set_num_threads(max(1, threads * max(1, jobs)))
    rows, curves = ANALYSES[exp](recs, schedule, runs_dir, smoke, log)
    out = results_dir / f"{exp}.csv"
    _write_csv(out, rows, FIELDS)
    if curves is not None:
        _write_csv(results_dir / f"{exp}_curves.csv", curves, CURVE_FIELDS)
    log(f"wrote {out} ({len(rows)} rows)")
    return out


def check_runs(names, schedule, runs_dir, results_dir, threads, log=print) -> dict:
    """Train ``names`` again from scratch and compare the trainer's own per-width top-1 (spectrum.csv) with the rows
    recorded in ``results_dir``. Returns ``{run: (mean difference, largest |difference|)}`` in top-1 points."""
    recorded = {}
    for f in sorted(results_dir.glob("*.csv")):
        for r in _read_csv(f):
            if r.get("run") in names and r.get("protocol") == spectrum_protocol(r.get("calib_samples")):
                recorded[(r["run"], float(r["width"]))] = float(r["top1"])
    out = {}
    for name in names:
        rec = train_run(name, schedule, runs_dir, False, threads, retrain=True, log=log)
        diffs = []
        for r in spectrum_rows("check", name, rec, schedule, runs_dir):
            old = recorded.get((name, r["width"]))
            if old is None:
                raise SystemExit(f"no recorded row for run {name} at width {r['width']} in {results_dir}")
            diffs.append(r["top1"] - old)
            log(f"[check] {name} width {r['width']:g}: top-1 {r['top1']:.2f} (recorded {old:.2f}, {diffs[-1]:+.2f})")
        out[name] = (sum(diffs) / len(diffs), max(abs(d) for d in diffs))
        log(f"[check] {name}: mean difference {out[name][0]:+.2f}, largest {out[name][1]:.2f} points over "
            f"{len(diffs)} widths ({rec['wall_time_s']:.0f}s)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="*", help=f"any of {', '.join([*EXPERIMENTS, 'all'])}")
    ap.add_argument("--schedule", choices=["cpu", "gpu"], default="cpu",
                    help="cpu: the short schedule of cpu.yaml; gpu: the full schedule of base.yaml")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at a time (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    ap.add_argument("--results", default=None, help="CSV folder (default results/cifar10/<schedule>)")
    ap.add_argument("--runs", default=None, help="run folder (default output/reproduce/cifar10_<schedule>)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="train this many epochs instead of the schedule's (results go to <schedule>_<N>ep)")
    ap.add_argument("--smoke", action="store_true", help="a few updates on a few hundred images (tests)")
    ap.add_argument("--train-only", action="store_true",
                    help="train the runs and stop (another invocation evaluates; runs in progress are waited for)")
    ap.add_argument("--retrain", action="store_true", help="train again even if a finished run exists")
    ap.add_argument("--check", nargs="+", metavar="RUN", default=None,
                    help="train these runs again and compare their top-1 per width with the recorded CSVs "
                         "(e.g. `--check inet_035 usnet`); exits 1 if a run's mean differs by more than --tolerance")
    ap.add_argument("--tolerance", type=float, default=2.0,
                    help="allowed |width-averaged top-1 difference| in points (--check; default: the 1-epoch "
                         "seed-to-seed spread)")
    a = ap.parse_args(argv)
    if a.check:
        unknown = sorted(set(a.check) - set(RUNS))
        if unknown:
            raise SystemExit(f"unknown runs {unknown}; allowed: {sorted(RUNS)}")
        tag = a.schedule + (f"_{a.epochs}ep" if a.epochs is not None else "")
        runs = Path(a.runs or ROOT / "output" / "reproduce" / f"cifar10_{tag}_check")
        jobs = max(1, min(a.jobs, len(a.check)))
        threads = a.threads or max(1, (os.cpu_count() or 1) // jobs)
        results = Path(a.results or ROOT / "results" / "cifar10" / tag)
        with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
            found = {}
            for r in pool.map(lambda n: check_runs([n], a.schedule, runs, results, threads), a.check):
                found.update(r)
        bad = {n: m for n, (m, _) in found.items() if abs(m) > a.tolerance}
        print("width-averaged top-1 difference to the recorded numbers: "
              + ", ".join(f"{n} {m:+.2f}" for n, (m, _) in found.items())
              + f" (tolerance {a.tolerance:g}: {'exceeded by ' + ', '.join(bad) if bad else 'met'})")
        return int(bool(bad))
    if not a.experiments or set(a.experiments) - {*EXPERIMENTS, "all"}:
        ap.error(f"name experiments ({', '.join([*EXPERIMENTS, 'all'])}) or --check RUN ...; got {a.experiments}")
    exps = list(EXPERIMENTS) if "all" in a.experiments else list(dict.fromkeys(a.experiments))
    tag = a.schedule + (f"_{a.epochs}ep" if a.epochs is not None else "") + ("_smoke" if a.smoke else "")
    results = Path(a.results or ROOT / "results" / "cifar10" / tag)
    runs = Path(a.runs or ROOT / "output" / "reproduce" / f"cifar10_{tag}")
    if a.train_only or (len(exps) > 1 and a.jobs > 1):  # train the union of runs first so that `jobs` stays busy
        names = list(dict.fromkeys(n for e in exps for n in EXPERIMENTS[e][1]))
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
        train_all(names, a.schedule, runs, a.smoke, a.jobs, threads, a.retrain, a.epochs)
        a.retrain = False
        if a.train_only:
            return 0
    for e in exps:
        run_experiment(e, a.schedule, runs, results, a.smoke, a.jobs, a.threads, a.retrain, epochs=a.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
