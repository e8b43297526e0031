"""The timm trainer (integrations/timm/train.py, data.py): config resolution, model and data building, exact resume,
width-spec checks on resume, DDP via torchrun, and a short real CIFAR-10 run."""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slim_plugins as slim
from slim_plugins.errors import ConfigError
from slim_plugins.config import expand_env
from slim_plugins.integrations.timm import data as D
from slim_plugins.integrations.timm import train as T

BIN = Path(sys.executable).parent


def run_cli(*args, cwd, timeout=900, tool="slim"):
    """Run the installed console script (``slim`` / ``torchrun``) the way a user does."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = os.environ.get("SLIM_TEST_THREADS", "1")  # see conftest: shared 2-core machine
    env.pop("SLIM_DEBUG", None)
    exe = shutil.which(tool, path=str(BIN)) or tool
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# Small digits job: 384 training images, 6 steps per epoch; constant LR so a 2-epoch run resumed to 3 epochs must
# equal a straight 3-epoch run.
SMALL = ["--default", "--set", "train_num_samples=384", "--set", "val_num_samples=120", "--set",
         "eval_widths=[0.35,1.0]", "--set", "tensorboard=false", "--set", "sched=step", "--set", "decay_epochs=100",
         "--set", "calib_samples=256"]


# ---- config ----------------------------------------------------------------------------------------------------
def test_resolve_config_defaults_and_aliases():
    cfg = T.resolve_config({"model": "s_mobilenetv2_100", "img_size": 32, "data": "/x", "drop_rate": 0.1,
                            "inplace_distill": True, "widths": [0.5, 1.0]})
    assert cfg["input_size"] == [3, 32, 32]
    assert cfg["data_dir"] == "/x" and cfg["drop"] == 0.1
    assert cfg["inplace_distill"] == "soft_ce"  # US-Nets: soft CE against the max width
    assert cfg["opt"] == "sgd" and cfg["calib_samples"] == 2000  # timm / paper defaults
    assert T.resolve_config({"inplace_distill": "kl"})["inplace_distill"] == "kl"
    assert T.resolve_config({"inplace_distill": False})["inplace_distill"] is None
    assert T.resolve_config({"img_size": [32, 48]})["input_size"] == [3, 32, 48]
    d = T.resolve_config(None, default=True)
    assert d["dataset"] == "digits" and d["width_range"] == [0.35, 1.0]


@pytest.mark.parametrize("bad, match", [
    ({"lrr": 0.1}, "did you mean"),
    ({"widths": [0.5, 1.0], "width_range": [0.25, 1.0]}, "either widths"),
    ({"sample_rule": "sandwhich"}, "sample_rule"),
    ({"inplace_distill": "mse"}, "inplace_distill"),
    ({"epochs": "ten"}, "epochs"),
    ({"scale": [0.5]}, "scale"),
    ({"torchscript": True}, "torchscript=True cannot apply to a slimmable run: torch.jit.script"),
    ({"kd_model_name": "resnet50"}, "inplace_distill"),
    ({"aug_splits": 3}, "switchable BN"),
    ({"slimmable": False}, "plain model"),
    ({"dist_bn": "all"}, "dist_bn"),
    ({"pretrained": "yes"}, "pretrained must be true or false"),
    ({"val_interval": 0}, "val_interval must be >= 1"),
    ({"checkpoint_hist": 0}, "checkpoint_hist must be >= 1"),
    ({"device_modules": "torch"}, "device_modules must be a list"),
    ({"epochs": float("inf")}, "epochs must be an integer"),
    ({"amp_dtype": "bf16"}, "amp_dtype"),
    ({"val_split": ""}, "val_split is empty"),
    ({"calib_samples": -1}, "calib_samples must be >= 0"),
])
def test_resolve_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        T.resolve_config(bad)


def test_env_expansion(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIM_DATA", str(tmp_path))
    assert expand_env("${SLIM_DATA}/cifar10") == f"{tmp_path}/cifar10"
    monkeypatch.delenv("SLIM_DATA")
    with pytest.raises(ConfigError, match="SLIM_DATA is not set"):  # data roots come from the user
        expand_env("${SLIM_DATA}/cifar10")
    assert expand_env("${NOPE_NOT_SET:-/d}/x") == "/d/x"
    with pytest.raises(ConfigError, match="NOPE_NOT_SET"):
        expand_env("${NOPE_NOT_SET}/x")


def test_resolve_widths():
    us = slim.WidthSpec.range(0.35, 1.0)
    ws = T.resolve_widths(us, 0.05)
    assert ws[0] == 0.35 and ws[-1] == 1.0 and len(ws) == 14
    assert T.resolve_widths(us, [1.0, 0.5, 0.5]) == [0.5, 1.0]
    with pytest.raises(slim.WidthError):
        T.resolve_widths(us, [0.2])
    s = slim.WidthSpec.switches([0.25, 0.5, 1.0])
    assert T.resolve_widths(s, None) == [0.25, 0.5, 1.0]


# ---- model -----------------------------------------------------------------------------------------------------
def test_build_model_kinds():
    us = T.build_model(T.resolve_config({"model": "us_mobilenetv2_100", "num_classes": 10, "cifar_stem": True,
                                         "width_range": [0.35, 1.0]}))
    assert slim.context.find_state(us).spec == slim.WidthSpec.range(0.35, 1.0)
    assert us.conv_stem.stride == (1, 1)
    sn = T.build_model(T.resolve_config({"model": "s_mobilenetv2_100", "num_classes": 10}))
    assert slim.context.find_state(sn).spec == slim.WidthSpec.switches([0.35, 0.5, 0.75, 1.0])  # paper switches
    # any timm CNN: converted with create_slim_model; a widths list makes it an S-Net
    rn = T.build_model(T.resolve_config({"model": "resnet18", "num_classes": 10, "widths": [0.5, 1.0],
                                         "cifar_stem": True}))
    assert slim.context.find_state(rn).bn_mode == "switchable"
    with slim.width(0.5):
        assert rn.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # one width (the experiments' individually trained baseline): a one-switch S-Net with the same rounding
    base = T.build_model(T.resolve_config({"model": "mobilenetv2_100", "num_classes": 10, "widths": [0.5]}))
    assert slim.context.find_state(base).spec == slim.WidthSpec.switches([0.5])
    x = torch.zeros(1, 3, 224, 224)
    assert [p.shape for p in slim.export(base, 0.5, example_input=x).parameters()] == \
        [p.shape for p in slim.export(sn, 0.5, example_input=x).parameters()]
    # zero-initialised classifier: uniform predictions at start (CE = ln 10)
    z = T.build_model(T.resolve_config({"model": "us_mobilenetv2_100", "num_classes": 10, "head_init_scale": 0.0}))
    assert z.get_classifier().weight.abs().max() == 0


# ---- data ------------------------------------------------------------------------------------------------------
def test_digits_datasets_are_deterministic_and_stratified():
    tr, te = D.digits_datasets(size=16)
    tr2, te2 = D.digits_datasets(size=16)
    assert len(tr) + len(te) == 1797 and len(te) == 360
    assert np.array_equal(tr.images, tr2.images) and np.array_equal(te.targets, te2.targets)
    assert tr.images.shape[1:] == (16, 16, 3) and tr.images.dtype == np.uint8
    assert np.bincount(te.targets).min() >= 30  # every class in the test split
    img, t = tr[0]
    assert isinstance(img, Image.Image) and img.size == (16, 16) and 0 <= t < 10


def _make_tar(path: Path, split: str, n_per_class=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tf:
        for c in ("cat", "dog"):
            for i in range(n_per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{split}/{c}/{i:04d}.png")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)


def test_archive_extracted_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ds"
    root.mkdir()
    _make_tar(root / "train.tar.gz", "train")
    folder = D.prepare_split(str(root), "train")
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["cat", "dog"]
    assert not list(folder.parent.glob(".extract-*"))  # temporary folders are gone
    first = (folder / "cat" / "0000.png").read_bytes()
    mtime = folder.stat().st_mtime_ns
    assert D.prepare_split(str(root), "train") == folder and folder.stat().st_mtime_ns == mtime  # no extraction
    # a changed archive is extracted again
    _make_tar(root / "train.tar.gz", "train", n_per_class=4, seed=1)
    os.utime(root / "train.tar.gz", (1e9, 1e9))
    folder2 = D.prepare_split(str(root), "train")
    assert len(list((folder2 / "cat").iterdir())) == 4 and (folder2 / "cat" / "0000.png").read_bytes() != first
    with pytest.raises(FileNotFoundError, match="no split 'validation'"):
        D.prepare_split(str(root), "validation")


# ---- training runs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """The small digits job stopped after 2 epochs (its checkpoint is the resume point)."""
    root = tmp_path_factory.mktemp("two")
    r = run_cli("train", *SMALL, "--epochs", "2", "--output", root / "b", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "b"


def test_resume_continues_exactly(two_epoch_run, tmp_path):
    """2 epochs + resume to 3 == a straight 3-epoch run, bit for bit (model, optimizer, RNG, width schedule)."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(two_epoch_run, b)
    assert slim.read_checkpoint(b / "last.pth.tar")["epoch"] == 2
    r = run_cli("train", *SMALL, "--epochs", "3", "--output", a, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--resume", b / "last.pth.tar", "--epochs", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 epochs from 2" in r.stdout
    ca, cb = slim.read_checkpoint(a / "last.pth.tar"), slim.read_checkpoint(b / "last.pth.tar")
    assert ca["epoch"] == cb["epoch"] == 3 and ca["iteration"] == cb["iteration"] == 18
    diff = [k for k, v in ca["model"].items() if torch.is_tensor(v) and not torch.equal(v, cb["model"][k])]
    assert diff == []
    assert ca["results"] == cb["results"]
    rows_a, rows_b = read_csv(a / "summary.csv"), read_csv(b / "summary.csv")
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]  # one row per epoch, no repeats


def test_resume_with_another_width_spec_raises(two_epoch_run, tmp_path):
    ck = two_epoch_run / "last.pth.tar"
    before = ck.stat().st_mtime_ns
    # in process: the typed error, nothing written to the new output folder
    with pytest.raises(slim.WidthSpecMismatchError, match=r"cannot resume from .*'switches'"):
        T.train(None, {"width_range": None, "widths": [0.5, 1.0], "output": str(tmp_path / "s")}, resume=str(ck),
                default=True)
    assert not (tmp_path / "s").exists() and ck.stat().st_mtime_ns == before
    # through the CLI: one clear line, exit status 2
    r = run_cli("train", "--default", "--set", "width_range=null", "--set", "widths=[0.5,1.0]", "--resume", ck,
                "--output", tmp_path / "s2", cwd=tmp_path)
    assert r.returncode == 2
    assert "WidthSpecMismatchError" in r.stderr and "range" in r.stderr and "switches" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "s2").exists()


def test_ddp_torchrun_two_ranks(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU): one epoch, DistributedSampler, rank 0 writes the checkpoint."""
    out = tmp_path / "ddp"
    r = run_cli("--nproc_per_node", "2", "-m", "slim_plugins.cli", "train", *SMALL, "--epochs", "1",
                "--output", out, cwd=tmp_path, tool="torchrun")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ck = slim.read_checkpoint(out / "last.pth.tar")
    assert ck["epoch"] == 1 and ck["finished"]
    # 384 images / (64 per rank x 2 ranks) = 3 steps per epoch (each rank sees half the data)
    assert ck["iteration"] == 3
    assert "bs=64x2" in r.stdout
    assert (out / "spectrum.csv").is_file() and len(read_csv(out / "spectrum.csv")) == 2


@pytest.mark.slow
def test_cifar10_short_run_above_chance(tmp_path, slim_data):
    """Real CIFAR-10: the shipped US-MobileNetV2 config (sandwich n=4, inplace distillation, post-statistics) on 8k
    training images for 2 epochs (batch 32: more steps for the same compute), 1k test images. ~6 min on 2 cores."""
    if not (slim_data / "cifar10" / "train.tar.gz").is_file():
        pytest.skip(f"CIFAR-10 not found under {slim_data}/cifar10 (set SLIM_DATA to the shared data folder)")
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "cifar"
    r = run_cli("train", repo / "configs" / "timm" / "cifar10_us_mobilenetv2.yaml", "--epochs", "2",
                "--data-dir", slim_data / "cifar10", "--output", out, "--set", "train_num_samples=8000",
                "--set", "val_num_samples=1000", "--set", "eval_widths=[0.35,0.5,0.75,1.0]", "--set",
                "warmup_epochs=0", "--set", "lr=0.03", "--batch-size", "32", "--set", "tensorboard=false", cwd=tmp_path,
                timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_csv(out / "spectrum.csv")
    assert [float(x["width"]) for x in rows] == [0.35, 0.5, 0.75, 1.0]
    for row in rows:
        assert float(row["top1"]) > 25.0, rows  # chance is 10%
    mflops = [float(x["mflops"]) for x in rows]
    assert mflops == sorted(mflops) and mflops[-1] > 4 * mflops[0]
