"""The ``slim`` command end to end: the embedded digits job through ``slim train`` (subprocess), then ``eval``,
``calibrate``, ``export``, ``profile`` and ``spectrum`` on the checkpoint it wrote, and the error paths."""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import slim_plugins as slim
from slim_plugins.cli import main
from slim_plugins.spectrum import plot_spectrum, read_spectrum_csv, write_spectrum_csv
from slim_plugins.integrations.timm import cli as C
from slim_plugins.integrations.timm import train as T

BIN = Path(sys.executable).parent
EPOCHS = 4


def run_slim(*args, cwd, timeout=900):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = os.environ.get("SLIM_TEST_THREADS", "1")  # see conftest: shared 2-core machine
    env.pop("SLIM_DEBUG", None)
    exe = shutil.which("slim", path=str(BIN)) or "slim"
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """`slim train --default` (scikit-learn digits, cifar-stem US-MobileNetV2 0.35-1.0x, sandwich n=4, inplace
    distillation) for a few epochs; the run folder and the CLI's stdout."""
    root = tmp_path_factory.mktemp("digits")
    out = root / "run"
    r = run_slim("train", "--epochs", EPOCHS, "--output", out, cwd=root)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return out, r.stdout


def test_train_default_job_writes_everything(digits_run):
    out, stdout = digits_run
    for name in ("last.pth.tar", "config.yaml", "args.yaml", "summary.csv", "spectrum.csv", "spectrum.png",
                 "model_best.pth.tar", *(f"checkpoint-{e}.pth.tar" for e in range(EPOCHS))):  # timm's layout
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    rows = read_csv(out / "spectrum.csv")
    assert [float(r["width"]) for r in rows] == [0.35, 0.5, 0.75, 1.0]
    for r in rows:  # chance is 10%
        assert float(r["top1"]) > 25.0, rows
        assert (out / "exported" / f"width_{float(r['width']):g}.pth").is_file()
    mflops = [float(r["mflops"]) for r in rows]
    params = [float(r["params_m"]) for r in rows]
    assert mflops == sorted(mflops) and params == sorted(params) and mflops[-1] > 3 * mflops[0]
    assert len(read_csv(out / "summary.csv")) == EPOCHS
    assert "top-1 %" in stdout and "MFLOPs" in stdout  # the rich per-width table
    ck = slim.read_checkpoint(out / "last.pth.tar")
    assert ck["epoch"] == EPOCHS and ck["finished"] and ck["framework"] == "timm"
    assert ck["width_spec"] == {"kind": "range", "widths": [0.35, 1.0], "divisor": 8}
    assert sorted(ck["calibrated"]) == [0.35, 0.5, 0.75, 1.0]
    assert {"optimizer", "scheduler", "rng", "config", "iteration"} <= set(ck)
    png = (out / "spectrum.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_exported_models_are_plain_and_equal_the_dynamic_model(digits_run):
    out, _ = digits_run
    model, cfg = C.model_from_checkpoint(slim.read_checkpoint(out / "last.pth.tar"))
    x = torch.randn(6, *cfg["input_size"], generator=torch.Generator().manual_seed(0))
    for w in (0.35, 0.75, 1.0):
        blob = torch.load(out / "exported" / f"width_{w:g}.pth", weights_only=False)
        plain = blob["model"].eval()
        assert blob["arch"]["width"] == w and blob["arch"]["model"] == "us_mobilenetv2_100"
        assert not [m for m in plain.modules() if type(m).__module__.startswith("slim_plugins")]
        with torch.no_grad(), slim.width(w):
            ref = model(x)
        torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)
        # the state_dict alone loads into the pickled architecture too
        plain.load_state_dict(blob["state_dict"])


def test_eval_matches_training_results_and_writes_csv(digits_run, tmp_path):
    out, _ = digits_run
    csv_path = tmp_path / "ev.csv"
    r = run_slim("eval", out / "last.pth.tar", "--widths", "0.35", "0.6", "1.0", "--csv", csv_path,
                 "--plot", tmp_path / "ev.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "calibrated BN post-statistics of widths ['0.6']" in r.stdout  # only the uncalibrated width
    rows = {float(x["width"]): x for x in read_csv(csv_path)}
    assert sorted(rows) == [0.35, 0.6, 1.0]
    res = slim.read_checkpoint(out / "last.pth.tar")["results"]
    for w in (0.35, 1.0):  # same weights, same stored post-statistics, same test split
        assert float(rows[w]["top1"]) == pytest.approx(res[f"{w:g}"]["top1"], abs=0.01)
    assert float(rows[0.6]["top1"]) > 25.0
    assert (tmp_path / "ev.png").is_file()


def test_calibrate_writes_new_checkpoint(digits_run, tmp_path):
    out, _ = digits_run
    src = out / "last.pth.tar"
    before = sha(src)
    dst = tmp_path / "cal.pth.tar"
    # without post-statistics, width 0.6 is refused when calibration is switched off
    r = run_slim("eval", src, "--widths", "0.6", "--no-calibrate", cwd=tmp_path)
    assert r.returncode == 2 and "UncalibratedWidthError" in r.stderr and "0.6" in r.stderr
    r = run_slim("calibrate", src, "--widths", "0.6", "0.9", "--num-samples", "500", "--out", dst, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sha(src) == before  # input untouched
    ck = slim.read_checkpoint(dst)
    assert 0.6 in ck["calibrated"] and 0.9 in ck["calibrated"] and ck["config"]["model"] == "us_mobilenetv2_100"
    model, _ = C.model_from_checkpoint(ck)
    assert slim.calibrated_widths(model, [0.35, 0.6, 0.9, 1.0]) == [0.35, 0.6, 0.9, 1.0]
    assert slim.calibrated_widths(model, [0.7]) == []
    r = run_slim("eval", dst, "--widths", "0.6", "--no-calibrate", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(tmp_path.glob("*.tmp"))


def test_export_with_onnx_and_fused_bn(digits_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out, _ = digits_run
    path = tmp_path / "w05.pth"
    r = run_slim("export", out / "last.pth.tar", "--width", "0.5", "--onnx", "--fuse-bn", "--out", path,
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    blob = torch.load(path, weights_only=False)
    plain = blob["model"].eval()
    assert blob["arch"]["fused_bn"] and not [m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model, cfg = C.model_from_checkpoint(slim.read_checkpoint(out / "last.pth.tar"))
    x = torch.randn(5, *cfg["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), slim.width(0.5):
        ref = model(x)
        torch.testing.assert_close(plain(x), ref, atol=1e-4, rtol=1e-4)
    sess = ort.InferenceSession(str(path.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-4)
    # a width outside the US-Net range: typed error, nothing written
    r = run_slim("export", out / "last.pth.tar", "--width", "0.2", "--out", tmp_path / "bad.pth", cwd=tmp_path)
    assert r.returncode == 2 and "WidthError" in r.stderr and "[0.35, 1.0]" in r.stderr
    assert not (tmp_path / "bad.pth").exists()


def test_profile_table_and_csv(digits_run, tmp_path):
    out, _ = digits_run
    r = run_slim("profile", out / "last.pth.tar", "--widths", "0.35", "0.7", "1.0", "--input-size", "32",
                 "--csv", tmp_path / "p.csv", "--repeats", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "latency (ms)" in r.stdout
    rows = read_csv(tmp_path / "p.csv")
    assert [float(x["width"]) for x in rows] == [0.35, 0.7, 1.0]
    mf = [float(x["mflops"]) for x in rows]
    # 32x32 input: 4x the MFLOPs of the 16x16 training size recorded in the spectrum
    spec = {float(x["width"]): float(x["mflops"]) for x in read_csv(out / "spectrum.csv")}
    assert mf == sorted(mf) and mf[0] == pytest.approx(4 * spec[0.35], rel=0.02)
    assert all(float(x["latency_ms"]) > 0 for x in rows)


def test_serve_under_a_budget_writes_plot_and_calls(digits_run, tmp_path):
    """`slim serve`: a budget between the narrowest and the widest width's latency (from a profile CSV) is served
    below the widest width; every call is in the CSV; an impossible budget is refused with both numbers named."""
    out, _ = digits_run
    prof = tmp_path / "p.csv"
    r = run_slim("profile", out / "last.pth.tar", "--csv", prof, "--repeats", "5", "-b", "32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lat = {float(x["width"]): float(x["latency_ms"]) for x in read_csv(prof)}
    budget = (min(lat.values()) + max(lat.values())) / 2
    r = run_slim("serve", out / "last.pth.tar", "--budget-ms", f"{budget:.4f}", "--table", prof, "-b", "32",
                 "--calls", "60", "--csv", tmp_path / "calls.csv", "--plot", tmp_path / "serve.png", "--no-live",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = read_csv(tmp_path / "calls.csv")
    assert len(calls) == 60 and {float(c["width"]) for c in calls} <= set(lat)
    assert min(float(c["width"]) for c in calls) < max(lat)
    assert (tmp_path / "serve.png").stat().st_size > 0
    r = run_slim("serve", out / "last.pth.tar", "--budget-ms", "1e-6", "--table", prof, "--no-live", cwd=tmp_path)
    assert r.returncode == 2 and "no width fits the budget" in r.stderr and "1e-06 ms" in r.stderr


def test_spectrum_plot_of_several_runs(digits_run, tmp_path):
    out, _ = digits_run
    other = tmp_path / "other.csv"
    write_spectrum_csv([{"width": 0.5, "mflops": 2.0, "params_m": 0.7, "top1": 50.0, "top5": 90.0},
                        {"width": 1.0, "mflops": 6.0, "params_m": 2.2, "top1": 80.0, "top5": 99.0}], str(other))
    assert read_spectrum_csv(str(other))[1]["top1"] == 80.0
    r = run_slim("spectrum", out / "spectrum.csv", other, "-o", tmp_path / "s.png", "--labels", "US", "other",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["spectrum", str(bad), "-o", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.pth.tar")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: FileNotFoundError") and "missing.pth.tar" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: us_mobilenetv2_100\nlearning_rate: 0.1\n")
    assert main(["train", str(cfg)]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err
    cfg.write_text("- not a mapping\n")
    assert main(["train", str(cfg)]) == 2
    assert "ConfigError" in capsys.readouterr().err
    # a checkpoint without a training config (written by slim.save_checkpoint from Python)
    m = T.build_model(T.resolve_config({"num_classes": 10}))
    slim.save_checkpoint(str(tmp_path / "bare.pth.tar"), m)
    assert main(["eval", str(tmp_path / "bare.pth.tar")]) == 2
    assert "holds no training config" in capsys.readouterr().err


def test_plot_spectrum_from_rows(tmp_path):
    rows = [{"width": w, "mflops": 10 * w, "params_m": w, "top1": 50 + 40 * w, "top5": 99.0} for w in (0.25, 1.0)]
    p = plot_spectrum([rows], str(tmp_path / "r.png"), labels=["a"], x="width")
    assert Path(p).read_bytes()[:4] == b"\x89PNG"
