"""A catalogue of bad inputs to the ``slim`` command (issue 22), for the four adapters (timm, mmdet, BasicSR, SB3).

Every case calls :func:`slim_plugins.cli.main` in-process and asks what a user wants from a refused command:

* exit status 2 (a returned 2, or ``SystemExit(2)``);
* exactly one non-empty line on stderr, starting with ``error:`` (no traceback, no argparse usage block, no
  progress bars or warnings around it), naming the option where the case says so;
* no file written, changed, renamed or removed: the case's working folder (the current directory, so default
  output paths land there) and the fixture run folders (checkpoints, configs) are snapshotted before and after
  (path, kind, size, mtime and, below 2 MB, sha256), directories included.

The fixtures are small and real, built once per module and only when a selected case needs them: a digits US-Net
(the embedded ``slim train`` job, 1 epoch on 64 images), a ResNet-18 S-Net Faster R-CNN trained 1 iteration on one
coco128 image (``tests/mmdet_utils.small_cfg``), a 2-block US-WDSR trained 2 iterations by BasicSR's own
``train_pipeline``, a SlimmablePPO CartPole zip + its rl-zoo ``config.yml``; plus one config file per adapter (copies
of ``configs/timm/cifar10_us_mobilenetv2.yaml``, ``configs/mmdet/faster-rcnn_r50_fpn_s-net_coco128.py``,
``configs/basicsr/us_wdsr_x2_sr.yml``, ``configs/sb3/breakout_us_ppo.yaml`` shrunk to a few samples, their outputs
relative to the current directory). They are built through the library (not the command under test).

"Disk full" cases patch ``open`` / ``io.open`` / ``os.write`` / ``os.fsync`` / ``os.sendfile`` / ``torch.save`` so
that every write into the case's ``full/`` folder fails with ``OSError(ENOSPC)``; the target must keep its previous
contents and no temporary file may be left.

In-process limits: output a library prints once per process (an import warning, the ALE banner) is triggered by the
fixtures, not seen by a case; logging state a fresh process would not have (log files of the fixture runs, BasicSR's
configured root logger, mmengine's singletons) is reset before every case, and handlers set up by an earlier case are
pointed at this case's stderr.

Environment:
  ``SLIM_CATALOGUE_REPORT=path.jsonl`` appends one JSON line per case (what happened), read by
  ``benchmarks/cli_catalogue.py`` to print the classification (clean / wrote files / wrong exit status /
  traceback or more than one line). ``SLIM_CATALOGUE_TIMEOUT`` (seconds, default 120): a case that runs longer is
  stopped and reported as a failure (today's code sometimes does the whole job before failing).
"""
from __future__ import annotations

import builtins
import contextlib
import copy
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = float(os.environ.get("SLIM_CATALOGUE_TIMEOUT", "120"))
REPORT = os.environ.get("SLIM_CATALOGUE_REPORT")
HASH_LIMIT = 2 << 20


def _data_root() -> Path:
    return Path(os.environ.get("SLIM_DATA", REPO.parent / "shared" / "data")).resolve()


# =====================================================================================================================
# cases
# =====================================================================================================================
@dataclass
class Case:
    group: str
    id: str
    argv: list
    setup: Callable | None = None  # setup(cwd: Path, P: dict) -> None, run in the case folder before the snapshot
    full: bool = False  # writes into ./full fail with ENOSPC
    needle: str | None = None  # the error line must name this (an option that does not apply)
    needs: tuple = ()  # fixtures the setup needs beyond the tokens in argv

    @property
    def name(self) -> str:
        return f"{self.group}-{self.id}"


CASES: list[Case] = []


def case(group, id, argv, setup=None, full=False, needle=None, needs=()):
    CASES.append(Case(group, id, list(argv), setup, full, needle, tuple(needs)))


ADAPTERS = ("timm", "mmdet", "basicsr", "sb3")
CK = {"timm": "@T_CKPT", "mmdet": "@M_CKPT", "basicsr": "@B_CKPT", "sb3": "@S_CKPT"}
CFG = {"timm": "@T_CFG", "mmdet": "@M_CFG", "basicsr": "@B_CFG", "sb3": "@S_CFG"}
SERVE = ["--budget-ms", "1000", "--calls", "3", "--no-live"]  # what every serve case adds (unless it is the subject)


def verb_argv(adapter, verb, *extra):
    """``[verb, CKPT or CONFIG, <verb's required options>, *extra]``."""
    if verb == "train":
        return ["train", CFG[adapter], *extra]
    argv = [verb, CK[adapter]]
    if verb == "export" and "--width" not in extra:
        argv += ["--width", "0.5"]
    if verb == "serve":
        argv += SERVE
    return argv + list(extra)


# ---- setup helpers -------------------------------------------------------------------------------------------------
def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else str(data).encode())


def s_dir(*names):
    def f(cwd, P):
        for n in names:
            (cwd / n).mkdir(parents=True, exist_ok=True)
    return f


def s_file(name, data="this is a text file, not what the command expects\n"):
    return lambda cwd, P: _write(cwd / name, data)


def s_all(*fns):
    def f(cwd, P):
        for fn in fns:
            fn(cwd, P)
    return f


def s_table(name, widths, latency=True):
    """A profile table (what `slim profile --csv` writes) of ``widths``; without latencies: --no-latency's."""
    rows = "".join(f"{w:g},{10 * w:.3f},{w:.4f},{f'{1 + w:.4f}' if latency else ''}\n" for w in widths)
    return s_file(name, "width,mflops,params_m,latency_ms\n" + rows)


GOOD_SPECTRUM = "width,mflops,params_m,top1\n0.5,1.000,0.5000,50.0000\n1,3.000,1.5000,70.0000\n"


def s_truncated(adapter):
    """A copy of the adapter's checkpoint cut to 64 KiB, laid out as the adapter expects (BasicSR: an experiment
    folder with the options file; SB3: the zip next to its config.yml). Returns (setup, path relative to cwd)."""
    rel = {"timm": "trunc/last.pth.tar", "mmdet": "trunc/iter_1.pth", "basicsr": "bexp/models/net_g_latest.pth",
           "sb3": "srun/CartPole-v1.zip"}[adapter]

    def f(cwd, P):
        src = Path(P[CK[adapter][1:]])
        with open(src, "rb") as fh:
            _write(cwd / rel, fh.read(64 << 10))
        if adapter == "basicsr":
            for y in Path(P["B_EXP"]).glob("*.yml"):
                shutil.copyfile(y, cwd / "bexp" / y.name)
        if adapter == "sb3":
            shutil.copyfile(Path(P["S_RUN"]) / "config.yml", cwd / "srun" / "config.yml")
    return f, rel


# ---- widths --------------------------------------------------------------------------------------------------------
WIDTH_BAD = [("empty", ""), ("abc", "abc"), ("zero", "0"), ("neg", "-0.5"), ("gt1", "1.5"), ("nan", "nan"),
             ("inf", "inf"), ("outside_spec", "0.01")]
STEP_BAD = [("zero", "0"), ("neg", "-0.1"), ("gt1", "2"), ("nan", "nan")]

for a in ADAPTERS:
    for tag, v in WIDTH_BAD:
        case("widths", f"eval-{a}-widths_{tag}", verb_argv(a, "eval", "--widths", v))
    for tag, v in STEP_BAD:
        case("widths", f"eval-{a}-step_{tag}", verb_argv(a, "eval", "--step", v))
    for tag, v in [("empty", ""), ("gt1", "1.5"), ("nan", "nan"), ("outside_spec", "0.01")]:
        case("widths", f"profile-{a}-widths_{tag}", verb_argv(a, "profile", "--widths", v))
    case("widths", f"profile-{a}-step_zero", verb_argv(a, "profile", "--step", "0"))
for a in ADAPTERS:
    for tag, v in [("abc", "abc"), ("zero", "0"), ("inf", "inf")]:
        case("widths", f"serve-{a}-widths_{tag}", verb_argv(a, "serve", "--widths", v))
    case("widths", f"serve-{a}-step_neg", verb_argv(a, "serve", "--step", "-0.1"))
for tag, v in [("zero", "0"), ("gt1", "1.5"), ("nan", "nan"), ("outside_spec", "0.01")]:
    case("widths", f"calibrate-timm-widths_{tag}", verb_argv("timm", "calibrate", "--widths", v))
case("widths", "calibrate-timm-step_zero", verb_argv("timm", "calibrate", "--step", "0"))

# export --width
for tag, v in WIDTH_BAD:
    case("width", f"export-timm-width_{tag}", verb_argv("timm", "export", "--width", v))
for tag, v in [("abc", "abc"), ("zero", "0"), ("gt1", "1.5"), ("nan", "nan"), ("outside_spec", "0.01"),
               ("not_a_switch", "0.3")]:
    case("width", f"export-mmdet-width_{tag}", verb_argv("mmdet", "export", "--width", v))
for tag, v in [("abc", "abc"), ("zero", "0"), ("neg", "-0.5"), ("inf", "inf"), ("outside_spec", "0.01")]:
    case("width", f"export-basicsr-width_{tag}", verb_argv("basicsr", "export", "--width", v))
for tag, v in [("empty", ""), ("zero", "0"), ("gt1", "1.5"), ("nan", "nan"), ("outside_spec", "0.01")]:
    case("width", f"export-sb3-width_{tag}", verb_argv("sb3", "export", "--width", v))

# ---- sizes and counts ----------------------------------------------------------------------------------------------
for a, v in [("timm", "eval"), ("timm", "calibrate"), ("timm", "profile"), ("timm", "serve"), ("timm", "train"),
             ("mmdet", "eval"), ("mmdet", "profile"), ("mmdet", "train"), ("basicsr", "profile"),
             ("basicsr", "serve"), ("basicsr", "train"), ("sb3", "profile"), ("sb3", "train")]:
    for tag, n in [("zero", "0"), ("neg", "-1")]:
        case("sizes", f"{v}-{a}-batch_size_{tag}", verb_argv(a, v, "--batch-size", n))
for a, v in [("timm", "profile"), ("timm", "serve"), ("mmdet", "profile"), ("basicsr", "profile"),
             ("basicsr", "serve")]:
    for tag, s in [("zero", ["0"]), ("four_values", ["1", "2", "3", "4"]), ("neg", ["-3"])]:
        case("sizes", f"{v}-{a}-input_size_{tag}", verb_argv(a, v, "--input-size", *s))
case("sizes", "profile-timm-input_size_channels_1_for_rgb",
     verb_argv("timm", "profile", "--input-size", "1", "16", "16"))
case("sizes", "profile-basicsr-input_size_channels_1_for_rgb",
     verb_argv("basicsr", "profile", "--input-size", "1", "24", "24"))
for a in ADAPTERS:
    case("sizes", f"profile-{a}-repeats_zero", verb_argv(a, "profile", "--repeats", "0"))
case("sizes", "profile-timm-repeats_neg", verb_argv("timm", "profile", "--repeats", "-1"))
for a in ADAPTERS:
    case("sizes", f"serve-{a}-calls_zero", ["serve", CK[a], "--budget-ms", "1000", "--no-live", "--calls", "0"])
case("sizes", "serve-timm-calls_neg", ["serve", CK["timm"], "--budget-ms", "1000", "--no-live", "--calls", "-5"])
for tag, n in [("zero", "0"), ("neg", "-5")]:
    case("sizes", f"calibrate-timm-num_samples_{tag}", verb_argv("timm", "calibrate", "--num-samples", n))
case("sizes", "eval-timm-calib_samples_zero", verb_argv("timm", "eval", "--widths", "0.6", "--calib-samples", "0"))
case("sizes", "eval-timm-calib_samples_neg", verb_argv("timm", "eval", "--calib-samples", "-1"))
case("sizes", "eval-mmdet-calib_samples_zero", verb_argv("mmdet", "eval", "--calib-samples", "0"))
case("sizes", "export-timm-calib_samples_zero", verb_argv("timm", "export", "--width", "0.6", "--calib-samples", "0"))
for tag, n in [("zero", "0"), ("neg", "-1")]:
    case("sizes", f"eval-timm-val_num_samples_{tag}", verb_argv("timm", "eval", "--val-num-samples", n))
for a, v in [("timm", "eval"), ("mmdet", "eval"), ("timm", "calibrate"), ("timm", "train"), ("mmdet", "train"),
             ("basicsr", "train")]:
    case("sizes", f"{v}-{a}-workers_neg", verb_argv(a, v, "--workers", "-1"))
case("sizes", "train-timm-epochs_zero", verb_argv("timm", "train", "--epochs", "0"))
case("sizes", "train-timm-epochs_neg", verb_argv("timm", "train", "--epochs", "-1"))
case("sizes", "train-mmdet-epochs_zero", verb_argv("mmdet", "train", "--epochs", "0"))
for a in ADAPTERS:
    for tag, v in [("zero", "0"), ("neg", "-1"), ("nan", "nan")]:
        case("sizes", f"train-{a}-lr_{tag}", verb_argv(a, "train", "--lr", v))
for a in ADAPTERS:
    for tag, v in [("zero", "0"), ("neg", "-5"), ("nan", "nan")]:
        case("sizes", f"serve-{a}-budget_ms_{tag}", ["serve", CK[a], "--calls", "3", "--no-live", "--budget-ms", v])
    for tag, v in [("zero", "0"), ("over_100", "101")]:
        case("sizes", f"serve-{a}-percentile_{tag}", verb_argv(a, "serve", "--percentile", v))

# ---- devices -------------------------------------------------------------------------------------------------------
DEVICES = [("tpu9", "tpu9"), ("cuda7", "cuda:7"), ("empty", "")]  # no machine here has 8 GPUs
for a, verbs in [("timm", ("eval", "calibrate", "export", "profile", "serve", "train")),
                 ("basicsr", ("eval", "profile", "train")), ("sb3", ("eval", "profile", "serve", "train")),
                 ("mmdet", ("profile",))]:
    for v in verbs:
        for tag, d in DEVICES:
            case("device", f"{v}-{a}-device_{tag}", verb_argv(a, v, "--device", d))

# ---- bad checkpoint files ------------------------------------------------------------------------------------------
BAD_CKPTS = [("missing", "missing.pth.tar", None), ("folder", "ckpt_dir", s_dir("ckpt_dir")),
             ("empty_file", "empty.pth", s_file("empty.pth", b"")),
             ("garbage", "garbage.pth", s_file("garbage.pth", bytes((i * 7919 + 13) % 256 for i in range(4096)))),
             ("text_file", "notes.txt", s_file("notes.txt"))]
for v in ("eval", "calibrate", "export", "profile", "serve"):
    for tag, path, setup in BAD_CKPTS:
        extra = (["--width", "0.5"] if v == "export" else []) + (SERVE if v == "serve" else [])
        case("checkpoint", f"{v}-{tag}", [v, path, *extra], setup=setup)
for a in ADAPTERS:
    setup, rel = s_truncated(a)
    for v in ("eval", "export", "profile"):
        case("checkpoint", f"{v}-{a}-truncated", [v, rel, *(["--width", "0.5"] if v == "export" else [])],
             setup=setup, needs=(CK[a],))
case("checkpoint", "train-config_missing", ["train", "missing.yaml"])
case("checkpoint", "train-config_unknown_suffix", ["train", "notes.txt"], setup=s_file("notes.txt"))

# ---- output paths: an existing folder, or under a regular file ----------------------------------------------------
AFILE = s_file("afile")
ADIR = s_dir("adir")
for a in ADAPTERS:
    case("outpath", f"eval-{a}-csv_is_folder", verb_argv(a, "eval", "--csv", "adir"), setup=ADIR)
    case("outpath", f"eval-{a}-plot_is_folder", verb_argv(a, "eval", "--plot", "adir"), setup=ADIR)
    case("outpath", f"eval-{a}-csv_under_file", verb_argv(a, "eval", "--csv", "afile/x.csv"), setup=AFILE)
    case("outpath", f"profile-{a}-csv_is_folder", verb_argv(a, "profile", "--csv", "adir"), setup=ADIR)
    case("outpath", f"profile-{a}-csv_under_file", verb_argv(a, "profile", "--csv", "afile/x.csv"), setup=AFILE)
    if a == "mmdet":  # mmdet's --out is a folder (config.py + model.pth): an existing file cannot be one
        case("outpath", "export-mmdet-out_is_file", verb_argv(a, "export", "--out", "afile"), setup=AFILE)
    else:
        case("outpath", f"export-{a}-out_is_folder", verb_argv(a, "export", "--out", "adir"), setup=ADIR)
    case("outpath", f"export-{a}-out_under_file", verb_argv(a, "export", "--out", "afile/x.pth"), setup=AFILE)
case("outpath", "calibrate-timm-out_is_folder", verb_argv("timm", "calibrate", "--out", "adir"), setup=ADIR)
case("outpath", "calibrate-timm-out_under_file", verb_argv("timm", "calibrate", "--out", "afile/x.pth.tar"),
     setup=AFILE)
for a in ADAPTERS:
    case("outpath", f"serve-{a}-csv_is_folder", verb_argv(a, "serve", "--csv", "adir"), setup=ADIR)
    case("outpath", f"serve-{a}-plot_is_folder", verb_argv(a, "serve", "--plot", "adir"), setup=ADIR)
case("outpath", "serve-timm-plot_under_file", verb_argv("timm", "serve", "--plot", "afile/x.png"), setup=AFILE)
case("outpath", "spectrum-out_is_folder", ["spectrum", "good.csv", "-o", "adir"],
     setup=s_all(ADIR, s_file("good.csv", GOOD_SPECTRUM)))
case("outpath", "spectrum-out_under_file", ["spectrum", "good.csv", "-o", "afile/x.png"],
     setup=s_all(AFILE, s_file("good.csv", GOOD_SPECTRUM)))

# ---- serve --table -------------------------------------------------------------------------------------------------
BAD_TABLES = [("missing", None),
              ("lacking_mflops", "width,params_m,latency_ms\n0.5,0.4,0.5\n1,1.2,0.9\n"),
              ("header_only", "width,mflops,params_m,latency_ms\n"),
              ("ragged", "width,mflops,params_m,latency_ms\n0.5,1.0,0.4,0.5,9\n1,3.0,1.2,0.9\n")]
for a in ADAPTERS:
    for tag, text in BAD_TABLES:
        setup = None if text is None else s_file("table.csv", text)
        case("table", f"serve-{a}-table_{tag}", verb_argv(a, "serve", "--table", "table.csv"), setup=setup)
    case("table", f"serve-{a}-table_width_outside_spec", verb_argv(a, "serve", "--table", "table.csv"),
         setup=s_table("table.csv", (0.01, 1.0)))
case("table", "serve-timm-table_without_latency", verb_argv("timm", "serve", "--table", "table.csv"),
     setup=s_table("table.csv", (0.35, 1.0), latency=False))
case("table", "serve-timm-table_non_numeric",
     verb_argv("timm", "serve", "--table", "table.csv"),
     setup=s_file("table.csv", "width,mflops,params_m,latency_ms\n0.5,abc,0.4,0.5\n"))

# ---- --config ------------------------------------------------------------------------------------------------------
OTHER_CFG = {"mmdet": "@T_CFG", "basicsr": "@M_CFG", "sb3": "@B_CFG"}  # another framework's config
for a in ("mmdet", "basicsr", "sb3"):
    for v in ("eval", "profile"):
        case("config", f"{v}-{a}-config_missing", verb_argv(a, v, "--config", "missing_config.yml"))
    for v in ("eval", "export", "profile"):
        case("config", f"{v}-{a}-config_of_other_framework", verb_argv(a, v, "--config", OTHER_CFG[a]))

# ---- --data-dir /nonexistent ---------------------------------------------------------------------------------------
for a, v in [("timm", "eval"), ("timm", "calibrate"), ("timm", "export"), ("timm", "train"), ("mmdet", "eval"),
             ("basicsr", "eval"), ("sb3", "eval"), ("mmdet", "train"), ("basicsr", "train"), ("sb3", "train")]:
    case("datadir", f"{v}-{a}-data_dir_nonexistent", verb_argv(a, v, "--data-dir", "/nonexistent/slim-data"))

# ---- train --resume ------------------------------------------------------------------------------------------------
OTHER_CK = {"timm": "@M_CKPT", "mmdet": "@T_CKPT", "basicsr": "@T_CKPT", "sb3": "@T_CKPT"}
for a in ADAPTERS:
    case("resume", f"train-{a}-resume_nonexistent", verb_argv(a, "train", "--resume", "missing.pth"))
    case("resume", f"train-{a}-resume_other_framework", verb_argv(a, "train", "--resume", OTHER_CK[a]))

# ---- misc: conflicting options, argparse-level errors, verbs an adapter does not have -------------------------------
case("misc", "calibrate-timm-out_and_in_place", verb_argv("timm", "calibrate", "--out", "cal.pth.tar",
                                                               "--in-place"), needle="--in-place")
case("misc", "calibrate-timm-method_unknown", verb_argv("timm", "calibrate", "--method", "fast"))
case("misc", "export-timm-width_missing", ["export", CK["timm"]])
case("misc", "serve-timm-budget_missing", ["serve", CK["timm"], "--calls", "3", "--no-live"])
for a in ("mmdet", "basicsr", "sb3"):  # adapters without `slim calibrate` (no BN post-statistics to compute)
    case("misc", f"calibrate-{a}-no_such_verb", ["calibrate", CK[a], "--widths", "0.5"])

# ---- options the adapter does not honour (must be refused, naming the option) --------------------------------------
# What each adapter's commands read before the rewrite decided "applies"; an option given but never read must be
# refused rather than silently ignored. The --no-calibrate / --no-latency pairs and mmdet export --calib-samples on
# an S-Net checkpoint are options made unused by the other options or the checkpoint at hand.
def na(adapter, verb, option, *values, extra=()):
    tag = option.lstrip("-").replace("-", "_")
    case("not_applicable", f"{verb}-{adapter}-{tag}", verb_argv(adapter, verb, *extra, option, *values),
         needle=option)


for v in ("eval", "export", "profile", "serve"):
    na("timm", v, "--config", "@M_CFG")
na("timm", "eval", "--calib-samples", "100", extra=("--no-calibrate",))  # --no-calibrate: nothing is calibrated
for a in ADAPTERS:
    na(a, "profile", "--repeats", "5", extra=("--no-latency",))  # --no-latency: nothing is timed
for a in ("sb3", "basicsr"):
    na(a, "eval", "--data-dir", "@DATA")
    na(a, "eval", "--batch-size", "4")
    na(a, "eval", "--workers", "0")
    na(a, "eval", "--calib-samples", "10")
    na(a, "eval", "--no-calibrate")
    na(a, "eval", "--val-num-samples", "5")
    na(a, "export", "--data-dir", "@DATA")
    na(a, "export", "--calib-samples", "10")
    na(a, "train", "--epochs", "0")
na("sb3", "profile", "--input-size", "3", "32", "32")
na("sb3", "serve", "--input-size", "3", "32", "32")
na("sb3", "train", "--workers", "1")
na("mmdet", "eval", "--data-dir", "@DATA")
na("mmdet", "eval", "--no-calibrate")
na("mmdet", "eval", "--val-num-samples", "5")
na("mmdet", "eval", "--device", "cpu")
na("mmdet", "export", "--data-dir", "@DATA")
na("mmdet", "export", "--calib-samples", "10")  # the fixture is an S-Net: per-switch BN, nothing to calibrate
na("mmdet", "export", "--device", "cpu")
na("mmdet", "serve", "--input-size", "64", "64")
na("mmdet", "serve", "--batch-size", "2")
na("mmdet", "serve", "--device", "cpu")
na("mmdet", "profile", "--device", "cpu")
na("mmdet", "train", "--data-dir", "@DATA")
na("mmdet", "train", "--device", "cpu")


# ---- train configs -------------------------------------------------------------------------------------------------
def s_yaml(adapter, mutate, name="bad.yaml", raw=None, pre_existing=None):
    """Write the adapter's config copy, changed by ``mutate(dict)`` (or ``raw`` text), to ``name``;
    ``pre_existing``: a folder (relative to cwd) to create with a file in it before the run."""
    def f(cwd, P):
        if raw is not None:
            _write(cwd / name, raw)
        else:
            d = copy.deepcopy(P[f"{adapter[0].upper()}_CFG_DICT"])
            mutate(d)
            _write(cwd / name, yaml.safe_dump(d, sort_keys=False))
        if pre_existing:
            _write(cwd / pre_existing / "train_previous.log", "an earlier run's log\n")
    return f


def _set(d, dotted, value):
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d[p]
    if value is _DEL:
        d.pop(parts[-1], None)
    else:
        d[parts[-1]] = value


_DEL = object()


def mut(*pairs):
    def m(d):
        for k, v in pairs:
            _set(d, k, v)
    return m


for tag, setup in [
    ("empty_yaml", s_yaml("timm", None, raw="")),
    ("yaml_list", s_yaml("timm", None, raw="- model: us_mobilenetv2_100\n- epochs: 1\n")),
    ("unknown_model", s_yaml("timm", mut(("model", "no_such_model_xyz")))),
    ("unknown_dataset", s_yaml("timm", mut(("dataset", "no_such_dataset")))),
    ("num_classes_zero", s_yaml("timm", mut(("num_classes", 0)))),
    ("widths_empty", s_yaml("timm", mut(("width_range", _DEL), ("widths", []), ("eval_widths", _DEL)))),
    ("widths_not_numbers", s_yaml("timm", mut(("width_range", _DEL), ("widths", ["a", "b"]),
                                              ("eval_widths", _DEL)))),
    ("widths_zero", s_yaml("timm", mut(("width_range", _DEL), ("widths", [0.0, 1.0]), ("eval_widths", _DEL)))),
    ("widths_over_1", s_yaml("timm", mut(("width_range", _DEL), ("widths", [0.5, 1.5]), ("eval_widths", _DEL)))),
    ("width_range_over_1", s_yaml("timm", mut(("width_range", [0.5, 2.0]), ("eval_widths", _DEL)))),
]:
    case("train_config", f"train-timm-{tag}", ["train", "bad.yaml"], setup=setup, needs=("@T_CFG",))


def s_mmdet(mutate):
    def f(cwd, P):
        from mmengine.config import Config

        d = Config.fromfile(P["M_CFG"]).to_dict()
        mutate(d)
        Config(d).dump(str(cwd / "bad.py"))
    return f


for tag, m in [("no_model", mut(("model", _DEL))),
               ("slimmable_widths_empty", mut(("slimmable", {"widths": []}))),
               ("slimmable_widths_not_numbers", mut(("slimmable", {"widths": ["a", "b"]}))),
               ("slimmable_widths_zero", mut(("slimmable", {"widths": [0.0, 1.0]}))),
               ("slimmable_widths_over_1", mut(("slimmable", {"widths": [0.5, 1.5]}))),
               ("slimmable_not_a_mapping", mut(("slimmable", "yes")))]:
    case("train_config", f"train-mmdet-{tag}", ["train", "bad.py"], setup=s_mmdet(m), needs=("@M_CFG",))

B_TRAIN_NAME = "bsr_catalogue_train"  # the copy's `name`: BasicSR writes experiments/<name> under the cwd
for tag, m in [("unknown_arch", mut(("network_g.type", "NoSuchArch"))),
               ("width_range_over_1", mut(("slimmable.width_range", [0.5, 2.0]))),
               ("slimmable_widths_empty", mut(("slimmable", {"widths": []}))),
               ("slimmable_unknown_key", mut(("slimmable.widht_range", [0.5, 1.0]))),
               ("slimmable_bad_distill", mut(("slimmable.distill", "kl")))]:
    case("train_config", f"train-basicsr-{tag}", ["train", "bad.yml"], needs=("@B_CFG",),
         setup=s_yaml("basicsr", m, name="bad.yml", pre_existing=f"experiments/{B_TRAIN_NAME}"))
S_ENV = "BreakoutNoFrameskip-v4"
for tag, m in [("n_timesteps_abc", mut((f"{S_ENV}.n_timesteps", "abc"))),
               ("n_envs_zero", mut((f"{S_ENV}.n_envs", 0))),
               ("policy_kwargs_unknown_key", mut((f"{S_ENV}.policy_kwargs.no_such_kwarg", 1))),
               ("eval_widths_empty", mut((f"{S_ENV}.policy_kwargs.slimmable.eval_widths", []))),
               ("width_range_zero", mut((f"{S_ENV}.policy_kwargs.slimmable.width_range", [0.0, 1.0])))]:
    case("train_config", f"train-sb3-{tag}", ["train", "bad.yaml"], setup=s_yaml("sb3", m), needs=("@S_CFG",))
for a in ADAPTERS:
    case("train_config", f"train-{a}-set_without_value", verb_argv(a, "train", "--set", "novalue"))
    case("train_config", f"train-{a}-set_without_key", verb_argv(a, "train", "--set", "=3"))

# ---- spectrum ------------------------------------------------------------------------------------------------------
for tag, text, extra in [
    ("missing_csv", None, []),
    ("empty_file", "", []),
    ("header_only", "width,mflops,params_m,top1\n", []),
    ("ragged", "width,mflops,params_m,top1\n0.5,1.0,0.5,50,7\n1,3.0,1.5,70\n", []),
    ("missing_cell", "width,mflops,params_m,top1\n0.5,,0.5,50\n1,3.0,1.5,70\n", []),
    ("non_numeric_cell", "width,mflops,params_m,top1\n0.5,abc,0.5,50\n", []),
    ("lacking_metric", "width,mflops,params_m\n0.5,1.0,0.5\n1,3.0,1.5\n", []),
    ("labels_count_mismatch", GOOD_SPECTRUM, ["--labels", "a", "b"]),
    ("metric_not_in_csv", GOOD_SPECTRUM, ["--metric", "psnr"]),
    ("x_unknown", GOOD_SPECTRUM, ["--x", "depth"]),
    ("x_column_missing", "width,mflops,top1\n0.5,1.0,50\n1,3.0,70\n", ["--x", "params_m"]),
]:
    case("spectrum", f"spectrum-{tag}", ["spectrum", "s.csv", "-o", "s.png", *extra],
         setup=None if text is None else s_file("s.csv", text))

# ---- disk full: every write into ./full fails with ENOSPC ---------------------------------------------------------
OLD = "previous contents, must survive\n"


def full_case(id, argv, target, present, extra_setup=None):
    def setup(cwd, P):
        (cwd / "full").mkdir()
        if present:
            _write(cwd / target, OLD)
        if extra_setup:
            extra_setup(cwd, P)
    case("disk_full", f"{id}-{'target_present' if present else 'target_absent'}", argv, setup=setup, full=True)


for present in (False, True):
    full_case("calibrate-timm-out", verb_argv("timm", "calibrate", "--widths", "0.6", "--out", "full/c.pth.tar"),
              "full/c.pth.tar", present)
    full_case("export-timm-out", verb_argv("timm", "export", "--out", "full/w.pth"), "full/w.pth", present)
    full_case("eval-timm-csv", verb_argv("timm", "eval", "--widths", "0.5", "--csv", "full/e.csv"), "full/e.csv",
              present)
    full_case("profile-timm-csv", verb_argv("timm", "profile", "--csv", "full/p.csv"), "full/p.csv", present)
    full_case("spectrum-out", ["spectrum", "good.csv", "-o", "full/s.png"], "full/s.png", present,
              s_file("good.csv", GOOD_SPECTRUM))
full_case("eval-timm-plot", verb_argv("timm", "eval", "--widths", "0.5", "--plot", "full/e.png"), "full/e.png", True)
full_case("serve-timm-csv", verb_argv("timm", "serve", "--csv", "full/calls.csv", "--plot", "full/serve.png"),
          "full/calls.csv", True)
for a in ("mmdet", "basicsr", "sb3"):
    full_case(f"eval-{a}-csv", verb_argv(a, "eval", "--csv", "full/e.csv"), "full/e.csv", True)
    full_case(f"profile-{a}-csv", verb_argv(a, "profile", "--csv", "full/p.csv"), "full/p.csv", True)
    out = "full/exp" if a == "mmdet" else "full/w.pth"
    full_case(f"export-{a}-out", verb_argv(a, "export", "--out", out), out, False)

assert len({c.name for c in CASES}) == len(CASES), "case ids must be unique"


# =====================================================================================================================
# fixtures: small real checkpoints and configs (built through the library, not the command under test)
# =====================================================================================================================
_TRACKED: dict = {}  # live folder -> pristine copy (restored after a case that changed it)


def _track(live: Path, pristine_root: Path) -> None:
    pristine = pristine_root / live.name
    shutil.copytree(live, pristine, symlinks=True)
    _TRACKED[live] = pristine


@pytest.fixture(scope="module")
def catalogue_root(tmp_path_factory):
    _remember_streams()
    root = tmp_path_factory.mktemp("catalogue")
    (root / "live").mkdir()
    (root / "pristine").mkdir()
    yield root
    _TRACKED.clear()


@contextlib.contextmanager
def _quiet_chdir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def timm_run(catalogue_root):
    """The embedded digits job (``slim train --default``): 1 epoch on 64 images, 32 validation images."""
    _remember_streams()
    import torch

    from slim_plugins.integrations.timm.train import train

    run = catalogue_root / "live" / "timm_run"
    with _quiet_chdir(catalogue_root):
        torch.manual_seed(0)
        train(None, {"output": str(run), "epochs": 1, "train_num_samples": 64, "val_num_samples": 32,
                     "calib_samples": 64, "export_widths": []}, default=True)
    assert (run / "last.pth.tar").is_file()
    _track(run, catalogue_root / "pristine")
    return {"T_RUN": str(run), "T_CKPT": str(run / "last.pth.tar")}


@pytest.fixture(scope="module")
def mmdet_run(catalogue_root):
    """A ResNet-18 S-Net Faster R-CNN (switches 0.25-1.0) trained 1 iteration on one coco128 image at 64x64."""
    _remember_streams()
    pytest.importorskip("mmdet")
    from mmdet_utils import small_cfg
    from mmengine.registry import RUNNERS

    import slim_plugins.integrations.mmdet  # noqa: F401  registers SlimRunner

    run = catalogue_root / "live" / "mmdet_run"
    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", run, n_train=1, n_val=1, iters=1, depth=18,
                    scale=(64, 64))
    cfg.train_dataloader.batch_size = 1
    with _quiet_chdir(catalogue_root):
        RUNNERS.build(cfg).train()
    assert (run / "iter_1.pth").is_file()
    _track(run, catalogue_root / "pristine")
    return {"M_RUN": str(run), "M_CKPT": str(run / "iter_1.pth")}


def _basicsr_options(name: str, **extra) -> dict:
    opt = yaml.safe_load((REPO / "configs" / "basicsr" / "us_wdsr_x2_sr.yml").read_text())
    del opt["datasets"]["val_2"]  # Set5 only
    opt["name"] = name
    opt["num_gpu"] = 0
    opt["network_g"].update(num_feat=16, num_block=1)
    opt["slimmable"]["eval_widths"] = [0.5, 1.0]
    tr = opt["datasets"]["train"]
    tr.update(batch_size_per_gpu=2, gt_size=32, num_worker_per_gpu=0, dataset_enlarge_ratio=1)
    opt["train"]["total_iter"] = 2
    opt["train"]["scheduler"]["periods"] = [2]
    opt["val"]["val_freq"] = 100000
    opt["logger"].update(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False)
    opt.update(extra)
    return opt


@pytest.fixture(scope="module")
def basicsr_run(catalogue_root):
    """A US-WDSR (n=16, 1 block, widths 0.5-1.0) trained 2 iterations by BasicSR's own train_pipeline."""
    _remember_streams()
    pytest.importorskip("basicsr")
    from slim_plugins.integrations.basicsr.train import run_pipeline

    exp_root = catalogue_root / "live" / "experiments"
    opt = _basicsr_options("bsr_catalogue")
    src = catalogue_root / "bsr_fixture_options" / "us_wdsr_x2_sr.yml"
    _write(src, yaml.safe_dump(opt, sort_keys=False))
    with _quiet_chdir(catalogue_root):
        run_pipeline(str(src), overrides={"path.experiments_root": str(exp_root)})
    exp = exp_root / "bsr_catalogue"
    assert (exp / "models" / "net_g_latest.pth").is_file()
    _track(exp_root, catalogue_root / "pristine")
    return {"B_EXP": str(exp), "B_CKPT": str(exp / "models" / "net_g_latest.pth")}


@pytest.fixture(scope="module")
def sb3_run(catalogue_root):
    """A SlimmablePPO (US-Net 0.25-1.0) on CartPole, 64 steps, saved as ``slim train`` lays it out: ``<env>.zip`` and
    the rl-zoo ``config.yml`` of the hyperparameters used."""
    _remember_streams()
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.env_util import make_vec_env

    from slim_plugins.integrations.sb3 import SlimmablePPO

    run = catalogue_root / "live" / "sb3_run"
    run.mkdir()
    hp = {"policy": "MlpPolicy", "n_envs": 1, "n_timesteps": 64, "n_steps": 32, "batch_size": 32, "n_epochs": 1,
          "eval_freq": 1000000, "n_eval_episodes": 1,
          "policy_kwargs": {"slimmable": {"width_range": [0.25, 1.0], "eval_widths": [0.25, 0.5, 1.0]}}}
    kw = {k: v for k, v in hp.items() if k in ("n_steps", "batch_size", "n_epochs", "policy_kwargs")}
    model = SlimmablePPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), seed=0, verbose=0, **kw)
    model.learn(64)
    model.save(str(run / "CartPole-v1.zip"))
    (run / "config.yml").write_text(yaml.safe_dump({"CartPole-v1": dict(hp, seed=0)}))
    _track(run, catalogue_root / "pristine")
    return {"S_RUN": str(run), "S_CKPT": str(run / "CartPole-v1.zip")}


@pytest.fixture(scope="module")
def configs(catalogue_root):
    """One config file per adapter, copied from configs/ and shrunk; outputs relative to the current directory."""
    _remember_streams()
    d = catalogue_root / "live" / "configs"
    d.mkdir()
    t = yaml.safe_load((REPO / "configs" / "timm" / "cifar10_us_mobilenetv2.yaml").read_text())
    t.update(output="output/cifar10_catalogue", epochs=1, train_num_samples=64, val_num_samples=32, batch_size=32,
             workers=0, calib_samples=32, eval_widths=[0.35, 1.0], export_widths=[], warmup_epochs=0,
             tensorboard=False)
    (d / "cifar10_us_mobilenetv2.yaml").write_text(yaml.safe_dump(t, sort_keys=False))

    s = yaml.safe_load((REPO / "configs" / "sb3" / "breakout_us_ppo.yaml").read_text())
    s[S_ENV].update(n_envs=1, n_steps=32, batch_size=32, n_epochs=1, n_timesteps=64, eval_freq=1000000,
                    n_eval_episodes=1)
    (d / "breakout_us_ppo.yaml").write_text(yaml.safe_dump(s, sort_keys=False))
    with contextlib.suppress(Exception):  # the ALE prints its banner on stderr once per process: not in a case
        import ale_py  # noqa: F401
        import gymnasium

        gymnasium.make(S_ENV).close()

    b = _basicsr_options(B_TRAIN_NAME)
    (d / "us_wdsr_x2_sr.yml").write_text(yaml.safe_dump(b, sort_keys=False))

    out = {"T_CFG": str(d / "cifar10_us_mobilenetv2.yaml"), "S_CFG": str(d / "breakout_us_ppo.yaml"),
           "B_CFG": str(d / "us_wdsr_x2_sr.yml"), "T_CFG_DICT": t, "S_CFG_DICT": s, "B_CFG_DICT": b}
    try:
        from mmdet_utils import small_cfg

        m = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", "work_dirs/faster-rcnn_catalogue", n_train=1,
                      n_val=1, iters=1, depth=18, scale=(64, 64))
        m.train_dataloader.batch_size = 1
        m.dump(str(d / "faster-rcnn_r50_fpn_s-net_coco128.py"))
        out["M_CFG"] = str(d / "faster-rcnn_r50_fpn_s-net_coco128.py")
    except ImportError:
        pass
    _track(d, catalogue_root / "pristine")
    return out


_TOKEN_FIXTURE = {"T": "timm_run", "M": "mmdet_run", "B": "basicsr_run", "S": "sb3_run"}


def _fixture_of(token: str) -> str | None:
    name = token.lstrip("@")
    if name == "DATA":
        return None
    if name.endswith("_CFG") or name.endswith("_CFG_DICT"):
        return "configs"
    return _TOKEN_FIXTURE[name[0]]


def _tokens(c: Case) -> set:
    out = set(c.needs)
    for a in c.argv:
        if a.startswith("@"):
            out.add(a.split("/")[0])
    return out


def _paths(request, c: Case) -> dict:
    P = {"DATA": str(_data_root() / "sr")}
    for tok in sorted(_tokens(c)):
        fx = _fixture_of(tok)
        if fx is not None:
            P.update(request.getfixturevalue(fx))
    for tok in _tokens(c):
        if tok.lstrip("@") not in P:
            pytest.skip(f"{tok} is not available here (framework not installed)")
    return P


def _fill(arg: str, P: dict) -> str:
    if arg.startswith("@"):
        head, _, rest = arg[1:].partition("/")
        return P[head] + ("/" + rest if rest else "")
    return arg


# =====================================================================================================================
# snapshots, disk full, running one case
# =====================================================================================================================
def snapshot(root: Path) -> dict:
    """``{relative path: (kind, size, mtime_ns, sha256 or None)}`` of everything under ``root`` (folders too)."""
    out = {}
    root = Path(root)
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                digest = None
                if st.st_size <= HASH_LIMIT:
                    digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", st.st_size, st.st_mtime_ns, digest)
            else:
                out[rel] = ("other", st.st_mode)
    return out


def diff(before: dict, after: dict) -> list[str]:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return [f"new {k}" for k in new] + [f"removed {k}" for k in gone] + [f"changed {k}" for k in changed]


def _restore(live: Path, pristine: Path) -> None:
    """Put a fixture folder back as it was built (a case that failed may have written into it)."""
    want, have = snapshot(pristine), snapshot(live)
    for rel in sorted(set(have) - set(want), key=len, reverse=True):
        p = live / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for rel in sorted(want):
        if want[rel][0] == "dir":
            (live / rel).mkdir(parents=True, exist_ok=True)
        elif have.get(rel) != want[rel]:
            if (live / rel).is_dir():
                shutil.rmtree(live / rel)
            shutil.copy2(pristine / rel, live / rel)


class _NoSpaceFile:
    """A file object opened for writing on a full disk: every write fails with ENOSPC."""

    def __init__(self, f, path):
        self._f, self._path = f, path

    def _fail(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    write = writelines = truncate = _fail

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __iter__(self):
        return iter(self._f)


@contextlib.contextmanager
def disk_full(root: Path):
    """Every write into ``root`` fails with ``OSError(ENOSPC)`` (files can still be created, empty; folders too)."""
    import _io

    import torch

    root = os.path.realpath(root)

    def under(path) -> bool:
        try:
            p = os.path.realpath(path)
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + os.sep)

    def fd_path(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None

    def path_of(file):
        if isinstance(file, int):
            return fd_path(file)
        if isinstance(file, _NoSpaceFile):
            return file._path
        if isinstance(file, (str, bytes, os.PathLike)):
            return os.fsdecode(os.fspath(file))
        try:
            return fd_path(file.fileno())
        except Exception:
            return getattr(file, "name", None) if isinstance(getattr(file, "name", None), str) else None

    real_open, real_write, real_fsync, real_save = io.open, os.write, os.fsync, torch.save
    real_sendfile, real_cfr = getattr(os, "sendfile", None), getattr(os, "copy_file_range", None)

    def nospace(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def open_(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if any(c in mode for c in "wax+"):
            p = path_of(file)
            if p and under(p):
                return _NoSpaceFile(f, p)
        return f

    def write_(fd, data):
        p = fd_path(fd)
        if p and under(p) and len(data):
            raise nospace(p)
        return real_write(fd, data)

    def fsync_(fd):
        p = fd_path(fd if isinstance(fd, int) else fd.fileno())
        if p and under(p):
            raise nospace(p)
        return real_fsync(fd)

    def sendfile_(out_fd, in_fd, *a, **k):
        p = fd_path(out_fd)
        if p and under(p):
            raise nospace(p)
        return real_sendfile(out_fd, in_fd, *a, **k)

    def cfr_(src, dst, *a, **k):
        p = fd_path(dst)
        if p and under(p):
            raise nospace(p)
        return real_cfr(src, dst, *a, **k)

    def save_(obj, f, *a, **k):
        p = path_of(f)
        if p and under(p):
            if isinstance(f, (str, bytes, os.PathLike)):
                real_open(f, "wb").close()  # created, nothing fits in it
            raise nospace(p)
        return real_save(obj, f, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", open_)
        mp.setattr(io, "open", open_)
        with contextlib.suppress(AttributeError, TypeError):
            mp.setattr(_io, "open", open_)
        mp.setattr(os, "write", write_)
        mp.setattr(os, "fsync", fsync_)
        if real_sendfile is not None:
            mp.setattr(os, "sendfile", sendfile_)
        if real_cfr is not None:
            mp.setattr(os, "copy_file_range", cfr_)
        mp.setattr(torch, "save", save_)
        mp.setattr(torch.serialization, "save", save_)
        yield


_KNOWN_STREAMS: dict = {}  # id -> (stream object, "out" | "err"): every sys.stdout / sys.stderr seen


def _remember_streams() -> None:
    for obj, kind in ((sys.stdout, "out"), (sys.stderr, "err")):
        _KNOWN_STREAMS[id(obj)] = (obj, kind)


def _rebind_log_streams() -> None:
    """Point logging handlers made in an earlier case (or fixture) at this case's stdout / stderr.

    A library logger is set up once per process (BasicSR's root logger, mmengine's MMLogger instances) with the
    ``sys.stderr`` of that moment; in one pytest process that is an earlier capture, closed since, so its records
    would end as "--- Logging error ---" tracebacks (or be lost) instead of the line a fresh ``slim`` process
    prints. The handler keeps its level and format; only its stream is today's."""
    import logging

    _remember_streams()
    cur = {"out": sys.stdout, "err": sys.stderr}
    for lg in _all_loggers():
        for h in getattr(lg, "handlers", ()):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                known = _KNOWN_STREAMS.get(id(h.stream))
                if known is not None and known[0] is h.stream and h.stream is not cur[known[1]]:
                    h.stream = cur[known[1]]


def _all_loggers() -> list:
    """Every logger of this process: the stdlib ones and mmengine's MMLogger instances."""
    import logging

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    mm = sys.modules.get("mmengine.logging")
    if mm is not None and hasattr(mm, "MMLogger"):
        loggers += list(getattr(mm.MMLogger, "_instance_dict", {}).values())
    return loggers


def _all_subclasses(cls):
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def _fresh_process_state() -> None:
    """Undo what the fixtures and earlier cases left in this process that a fresh ``slim`` process would not have:
    log files still open (an mmengine runner's log in a run folder: a later message would be written into it),
    BasicSR's root logger configured (level INFO after a training: a fresh process shows no INFO lines),
    mmengine's per-name singletons (loggers, visualizers, message hubs, the default scope)."""
    import logging

    for lg in _all_loggers():
        for h in list(getattr(lg, "handlers", ())):
            if isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
                h.close()
    bl = sys.modules.get("basicsr.utils.logger")
    if bl is not None:
        lg = logging.getLogger("basicsr")
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.setLevel(logging.NOTSET)
        lg.propagate = True
        getattr(bl, "initialized_logger", {}).pop("basicsr", None)
    manager = sys.modules.get("mmengine.utils.manager")
    if manager is not None:
        for cls in _all_subclasses(manager.ManagerMixin):
            d = cls.__dict__.get("_instance_dict")
            if d:
                d.clear()


class _CaseTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _CaseTimeout()


@contextlib.contextmanager
def _deadline(seconds: float):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _console_warnings():
    """Warnings as a fresh ``slim`` process shows them (printed on stderr), not recorded by pytest."""
    import warnings

    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", cat)
        warnings.showwarning = getattr(warnings, "_showwarning_orig", warnings.showwarning)
        yield


def run_main(argv: list) -> dict:
    """Call ``slim_plugins.cli.main(argv)``; what happened (return value / SystemExit / exception / timeout)."""
    from slim_plugins.cli import main

    res = {"rc": None, "raised": None, "timeout": False}
    t0 = time.time()
    try:
        with _deadline(TIMEOUT), _console_warnings():
            res["rc"] = main(argv)
    except _CaseTimeout:
        res["timeout"] = True
    except SystemExit as e:
        code = e.code
        res["rc"] = 0 if code is None else (code if isinstance(code, int) else 1)
        res["system_exit"] = True
    except BaseException as e:  # noqa: BLE001  what a console script would show as a traceback
        res["raised"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["traceback"] = traceback.format_exc()[-2000:]
    res["seconds"] = round(time.time() - t0, 2)
    return res


def classify(res: dict, err: str, changes: list, needle: str | None) -> dict:
    """Which checks failed: ``status`` (not 2), ``output`` (not one ``error:`` line), ``wrote`` (files)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    problems = {}
    if res["timeout"]:
        problems["status"] = "timeout"
    elif res["raised"]:
        problems["status"] = "raised"
    elif res["rc"] != 2:
        problems["status"] = "exit 0" if res["rc"] == 0 else f"exit {res['rc']}"
    out = []
    if res["raised"] or "Traceback (most recent call last)" in err:
        out.append("traceback")
    if any(ln.startswith("usage:") for ln in lines):
        out.append("usage block")
    if len(lines) > 1:
        out.append(f"{len(lines)} lines")
    if not lines:
        out.append("no line")
    elif not lines[0].startswith("error:"):
        out.append("not error:")
    if needle and not any(needle in ln for ln in lines[:1]):
        out.append(f"does not name {needle}")
    if out:
        problems["output"] = ", ".join(out)
    if changes:
        problems["wrote"] = changes[:12]
    return problems


def primary_cause(problems: dict) -> str:
    """One cause per failing case, for grouping: timeout, traceback, exit 0, exit other, wrote files, output."""
    if not problems:
        return "clean"
    st = problems.get("status")
    if st == "timeout":
        return "timeout (did the work)"
    if st == "raised" or "traceback" in problems.get("output", ""):
        return "traceback"
    if st == "exit 0":
        return "exit 0 (accepted)"
    if st:
        return "exit status not 2"
    if "wrote" in problems:
        return "wrote files"
    if "usage block" in problems.get("output", ""):
        return "argparse usage block"
    if "does not name" in problems.get("output", ""):
        return "does not name the option"
    return "more than one line / not error:"


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(c: Case, request, tmp_path, monkeypatch, capfd):
    P = _paths(request, c)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLIM_DEBUG", raising=False)
    if c.setup:
        c.setup(tmp_path, P)
    argv = [_fill(a, P) for a in c.argv]
    roots = [tmp_path, *_TRACKED]
    before = {r: snapshot(r) for r in roots}
    _fresh_process_state()
    _rebind_log_streams()
    capfd.readouterr()
    with disk_full(tmp_path / "full") if c.full else contextlib.nullcontext():
        res = run_main(argv)
    out, err = capfd.readouterr()
    changes = []
    for r in roots:
        d = diff(before[r], snapshot(r))
        changes += [f"{x} (in {'cwd' if r == tmp_path else r.name})" for x in d]
        if d and r in _TRACKED:
            _restore(r, _TRACKED[r])
    problems = classify(res, err, changes, c.needle)
    if REPORT:
        import slim_plugins

        rec = {"id": c.name, "group": c.group, "argv": argv, "cause": primary_cause(problems),
               "problems": problems, "rc": res["rc"], "raised": res["raised"], "seconds": res["seconds"],
               "stderr_tail": err[-600:], "slim_plugins": slim_plugins.__file__}
        with open(REPORT, "a") as f:
            f.write(json.dumps(rec) + "\n")
    detail = f"argv={argv}\nproblems={problems}\nstderr (tail):\n{err[-1500:]}"
    if res.get("traceback"):
        detail += f"\nraised:\n{res['traceback']}"
    assert not problems, detail
