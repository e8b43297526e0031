"""The CIFAR-10 reproduction (experiments/cifar10/reproduce.py, experiments/report.py): every experiment runs end to
end for a few updates on real CIFAR-10 images (``--smoke``), its CSV has the recorded fields, architectures match
across methods, and the report renders every section and plot."""
from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import slim_plugins as slim

REPO = Path(__file__).resolve().parents[1]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


R = _module(REPO / "experiments" / "cifar10" / "reproduce.py", "reproduce")
REPORT = _module(REPO / "experiments" / "report.py", "report")


# The smoke runs of every experiment take ~3 min on 2 cores: run in CI's slow suite, not the README's test command.
SMOKE = pytest.mark.slow


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, slim_data):
    if not (slim_data / "cifar10").is_dir():
        pytest.skip(f"no CIFAR-10 under {slim_data}")
    os.environ.setdefault("SLIM_DATA", str(slim_data))
    tmp = tmp_path_factory.mktemp("repro")
    results, runs = tmp / "results" / "cpu", tmp / "runs"
    assert R.main(["all", "--smoke", "--jobs", "2", "--threads", "1", "--results", str(results),
                   "--runs", str(runs)]) == 0
    return tmp, results, runs


@SMOKE
def test_every_experiment_writes_its_csv(smoke):
    _, results, _ = smoke
    for exp, (_, runs) in R.EXPERIMENTS.items():
        rows = read(results / f"{exp}.csv")
        assert rows and list(rows[0]) == R.FIELDS
        assert {r["run"] for r in rows} == set(runs) if exp != "exp5" else {"usnet"}
        for r in rows:  # what every run records
            assert r["hardware"].startswith(("CPU", "NVIDIA")) and "thread" in r["hardware"]
            assert r["schedule"] == "cpu" and int(r["epochs"]) == 1
            assert int(r["seed"]) == (1 if r["run"].endswith("_seed1") else 0)
            assert float(r["wall_time_s"]) > 0 and float(r["mflops"]) > 0
            assert abs(float(r["top1_err"]) + float(r["top1"]) - 100) < 1e-6
            assert 0 <= float(r["top1"]) <= 100


@SMOKE
def test_same_width_same_architecture_across_methods(smoke):
    """Individual nets, S-Net switches, US-Net widths and converted nets have the same FLOPs at one width."""
    _, results, _ = smoke
    rows = [r for e in ("exp2", "exp3") for r in read(results / f"{e}.csv")]
    by_width = {}
    for r in rows:
        by_width.setdefault(float(r["width"]), set()).add(float(r["mflops"]))
    for w in (0.35, 0.5, 0.75, 1.0):
        assert len(by_width[w]) == 1, (w, by_width[w])
    assert min(by_width[0.35]) < min(by_width[1.0])


@SMOKE
def test_fig11_protocol_covers_untrained_widths(smoke):
    _, results, _ = smoke
    rows = read(results / "exp3.csv")
    anyw = [r for r in rows if r["protocol"].startswith("widest net's weights")]
    assert {r["run"] for r in anyw} == {"snet4", "inet_100"}
    flags = {(r["run"], float(r["width"])): r["trained_width"] for r in anyw}
    assert flags[("snet4", 0.6)] == "False" and flags[("snet4", 0.35)] == "True"
    assert flags[("inet_100", 0.6)] == "False" and flags[("inet_100", 1.0)] == "True"


@SMOKE
def test_exp1_curves_and_exp5_protocols(smoke):
    _, results, _ = smoke
    curves = read(results / "exp1_curves.csv")
    assert {c["run"] for c in curves} == {"naive4", "snet4"}
    assert {float(c["width"]) for c in curves} == {0.35, 0.5, 0.75, 1.0}
    assert sorted({int(c["iteration"]) for c in curves}) == [4, 8]  # 256 images / batch 32 = 8 updates
    rows = read(results / "exp5.csv")
    protos = {r["protocol"] for r in rows}
    assert any(p.startswith("moving average, all") for p in protos)
    assert any(p.startswith("exact average, all") for p in protos)
    assert {int(r["calib_samples"]) for r in rows if "all" in r["protocol"]} == {256}  # the whole (smoke) train set


@SMOKE
def test_finished_runs_are_reused(smoke, capsys):
    _, results, runs = smoke
    before = (runs / "snet4" / "done.json").stat().st_mtime
    R.run_experiment("exp2", "cpu", runs, results, smoke=True, jobs=1, threads=1)
    assert (runs / "snet4" / "done.json").stat().st_mtime == before
    assert "reusing the finished run" in capsys.readouterr().out


@SMOKE
def test_converted_widest_net_equals_the_trained_one(smoke):
    """as_universal (export + convert) keeps the widest net's function exactly before any calibration."""
    _, _, runs = smoke
    model, cfg = R._load(runs, "snet4")
    us = R.as_universal(model, cfg)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with slim.width(1.0):
            ref = model(x)
            got = us(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(slim.UncalibratedWidthError):
        with torch.no_grad(), slim.width(0.6):
            us(x)


@SMOKE
def test_report_renders_every_section(smoke):
    tmp, results, _ = smoke
    out = tmp / "docs" / "reproduction.md"
    assert REPORT.main(["--results", str(results.parent), "--out", str(out)]) == 0
    text = out.read_text()
    for title in REPORT.EXP_TITLES.values():
        assert title in text
    assert "## CPU schedule" in text and "## GPU schedule" not in text
    for png in ("exp1_curves.png", "exp2_spectrum.png", "exp3_spectrum.png", "exp4_ablations.png"):
        assert (out.parent / "reproduction" / "cpu" / png).stat().st_size > 1000
        assert f"reproduction/cpu/{png}" in text
    assert text.count("**holds**") + text.count("**does not hold**") + text.count("**not separated**") >= 10


def test_report_without_results_raises(tmp_path):
    with pytest.raises(SystemExit, match="no results"):
        REPORT.main(["--results", str(tmp_path), "--out", str(tmp_path / "r.md")])


def test_failed_run_names_its_log(tmp_path, monkeypatch, slim_data):
    if not (slim_data / "cifar10").is_dir():
        pytest.skip("no CIFAR-10")
    monkeypatch.setitem(R.RUNS, "bad", ("bad", {"model": "us_mobilenetv2_100", "width_range": [0.35, 1.0],
                                                "export_widths": [0.2]}))  # 0.2 is outside the range
    with pytest.raises(RuntimeError, match=r"run bad failed .*train\.log[\s\S]*0\.2"):
        R.train_run("bad", "cpu", tmp_path, smoke=True, threads=1)
    assert not (tmp_path / "bad" / "done.json").exists()


def test_verdict_rule():
    assert "holds" in REPORT.verdict(2.0, 1.0) and "does not hold" in REPORT.verdict(-2.0, 1.0)
    assert "not separated" in REPORT.verdict(0.5, 1.0) and REPORT.verdict(None, 1.0) == "not measured"
    assert "**holds**" in REPORT.at_least(-1.5, 2.0) and "does not hold" in REPORT.at_least(-2.5, 2.0)


@pytest.mark.parametrize("schedule", ["cpu", "gpu"])
def test_lr_scale_is_relative_to_the_schedule(schedule, tmp_path):
    full, half = (R.run_config(n, schedule, tmp_path) for n in ("snet8", "snet8_lr"))
    assert "lr_scale" not in half and half["widths"] == full["widths"]
    assert half["lr"] == pytest.approx(full["lr"] / 2) and half["warmup_lr"] == pytest.approx(full["warmup_lr"] / 2)


@pytest.mark.parametrize("rule, tracked", [("random", []), ("min_random", ["0.35"]), ("sandwich", ["0.35", "1"])])
def test_learning_curve_hook_tracks_the_widths_the_rule_trains(tmp_path, rule, tracked):
    """experiments/cifar10/train.py's Curves hook: every N updates, training-batch and test top-1 of the widths the
    rule trains every step (a US-Net trained with 'random' has no running statistics at min/max: nothing to track,
    no error); per epoch the training-batch top-1 in summary.csv."""
    from slim_plugins.integrations.timm import train as T

    loaded = {}

    def datasets(cfg=None, splits=("train", "val"), log=print):
        if not loaded:
            loaded.update(T.build_datasets(cfg, splits, log))
        return loaded

    out = tmp_path / "c"
    T.train(None, {"train_num_samples": 384, "val_num_samples": 120, "eval_widths": [0.35, 1.0], "epochs": 1,
                   "tensorboard": False, "calib_samples": 256, "sample_rule": rule, "num_widths": 3,
                   "inplace_distill": rule == "sandwich", "output": str(out)}, default=True,
            hooks=[R.EXP_TRAIN.Curves(2, 60, datasets)], datasets_fn=datasets)
    summary = read(out / "summary.csv")[0]
    assert sorted(k[len("train_top1_w"):] for k in summary if k.startswith("train_top1_w")) == tracked
    assert sorted(k[len("eval_top1_w"):] for k in summary if k.startswith("eval_top1_w")) == tracked
    if tracked:
        curves = read(out / "curves.csv")
        assert [int(c["iteration"]) for c in curves] == [2, 4, 6]  # 384 / 64 = 6 updates
        for c in curves:
            for w in tracked:
                assert 0 <= float(c[f"train_top1_w{w}"]) <= 100 and 0 <= float(c[f"test_top1_w{w}"]) <= 100
    else:
        assert not (out / "curves.csv").exists()
    assert len(read(out / "spectrum.csv")) == 2  # calibrated and evaluated at the end either way


def test_image_cache_decodes_once(tmp_path, monkeypatch):
    """cache_images: an ImageFolder tree decoded once into a memory-mapped uint8 array, read (not decoded) again."""
    import numpy as np
    from PIL import Image

    from slim_plugins.integrations.timm import data as D

    monkeypatch.setenv("SLIM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "ds-0" / "train"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i + (c == "dog"), np.uint8)).save(folder / c / f"{i}.png")
    ds = R.EXP_TRAIN.load_image_cache(folder, log=lambda *a: None)
    assert isinstance(ds, D.ArrayImageDataset) and ds.images.shape == (6, 8, 8, 3)
    assert list(ds.targets) == [0, 0, 0, 1, 1, 1] and ds.classes == ["cat", "dog"]
    assert int(ds.images[4][0, 0, 0]) == 41  # dog/1.png
    mtime = (folder.parent / "train_images.npy").stat().st_mtime_ns
    assert R.EXP_TRAIN.load_image_cache(folder, log=lambda *a: None).images.shape == (6, 8, 8, 3)
    assert (folder.parent / "train_images.npy").stat().st_mtime_ns == mtime  # read, not decoded again
