"""MMDetection adapter on real coco128 images: conversion (exact architecture per width), multi-width training
through mmengine's Runner, per-width COCO evaluation, export loaded by ``init_detector``, initialisation from a
``slim train`` checkpoint, resume under ``weights_only=True``, AMP/accumulation glue, errors."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402

import slim_plugins as slim  # noqa: E402
from slim_plugins.spectrum import read_spectrum_csv  # noqa: E402
from slim_plugins.errors import InvalidArgumentError, WidthError  # noqa: E402
from slim_plugins.integrations import mmdet as smd  # noqa: E402
from mmdet_utils import CONFIGS, REPO, small_cfg  # noqa: E402

SWITCHES = [0.25, 0.5, 0.75, 1.0]


def _build(cfg):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    return MODELS.build(smd.architecture_of(copy.deepcopy(cfg.model)))  # the plain detector (SlimDetector unwrapped)


def _image(slim_data):
    return str(sorted((slim_data / "coco128" / "val2017").glob("*.jpg"))[0])


# ---- config parsing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (dict(widths=[0.5, 1.0], width_range=[0.25, 1.0]), "exactly one"),
    (dict(), "exactly one"),
    (dict(widths=[0.5, 1.0], rule="most"), "unknown sampling rule 'most'"),
    (dict(widths=[0.5, 1.0], distill="kl"), "distill must be one of"),
    (dict(widths=[0.5, 1.0], num_widths=0), "num_widths must be a positive integer"),
    (dict(widths=[0.5, 1.0], switches=[1.0]), r"unknown slimmable key\(s\) \['switches'\]"),
    (dict(width_range=[0.25]), "width_range must be"),
    ("yes", "slimmable must be true or a mapping"),
    (dict(widths=[0.5, 1.0], distill_weight="abc"), "distill_weight must be a finite number >= 0, got 'abc'"),
    (dict(widths=[0.5, 1.0], seed="x"), "seed must be an integer >= 0, got 'x'"),
])
def test_bad_slimmable_config_names_the_value(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        smd.parse_slimmable(bad)


def test_bad_widths_raise_width_error():
    with pytest.raises(WidthError):
        smd.parse_slimmable(dict(widths=[0.5, -1.0]))
    with pytest.raises(WidthError, match="outside the range"):
        smd.parse_slimmable(dict(width_range=[0.25, 1.0], eval_widths=[0.1]))


# ---- conversion ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faster_cfg():
    return Config.fromfile(str(CONFIGS / "faster-rcnn_r50_fpn_s-net_coco128.py"))


def test_each_width_is_the_detector_of_that_width(faster_cfg):
    """Backbone and lateral inputs follow the width, FPN outputs and heads stay: at every switch the slimmable
    detector has the FLOPs and parameter count of a plain mmdet detector with ResNet base_channels = 64 w."""
    from torch.utils.flop_counter import FlopCounterMode

    det = smd.make_slimmable(_build(faster_cfg), smd.slimmable_entry(faster_cfg)).eval()
    x = torch.randn(1, 3, 128, 160)
    for w in SWITCHES:
        c = int(64 * w)
        plain_cfg = copy.deepcopy(faster_cfg.model)
        plain_cfg.backbone.base_channels = c
        plain_cfg.neck.in_channels = [4 * c, 8 * c, 16 * c, 32 * c]
        plain = _build(Config(dict(model=plain_cfg))).eval()
        with torch.no_grad(), slim.width(w):
            with FlopCounterMode(display=False) as f1:
                feats = det.extract_feat(x)
        with torch.no_grad(), FlopCounterMode(display=False) as f2:
            ref = plain.extract_feat(x)
        assert f1.get_total_flops() == f2.get_total_flops(), w
        assert [t.shape for t in feats] == [t.shape for t in ref]  # FPN outputs: 256 channels at every width
        exported = slim.export(det, w, example_input=smd.export._example_input(det))
        assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in plain.parameters())


def test_registered_backbone_type_has_the_same_effect(faster_cfg, tmp_path):
    cfg = copy.deepcopy(faster_cfg)
    cfg.model = smd.architecture_of(cfg.model)  # the plain FasterRCNN; the backbone names the widths instead
    cfg.model.backbone.type = "SlimResNet"
    cfg.model.backbone.widths = SWITCHES
    det = _build(cfg)
    with pytest.raises(slim.NotSlimmableError, match="SlimRunner"):
        det.backbone(torch.zeros(1, 3, 64, 64))
    smd.make_slimmable(det)
    assert slim.width_spec(det) == slim.WidthSpec.switches(SWITCHES)
    assert smd.slim_settings(det).spec == smd.parse_slimmable(smd.slimmable_entry(faster_cfg)).spec
    with pytest.raises(InvalidArgumentError, match="name the widths in one place"):
        smd.make_slimmable(_build(cfg), dict(widths=[0.5, 1.0]))


def test_make_slimmable_needs_widths(faster_cfg):
    det = _build(faster_cfg)
    with pytest.raises(InvalidArgumentError, match="nothing to make slimmable"):
        smd.make_slimmable(det, None)
    assert not any(isinstance(m, slim.nn.SlimConv2d) for m in det.modules())  # unchanged


# ---- training and evaluation through mmengine's Runner ----------------------------------------------------------
def _run(cfg):
    runner = RUNNERS.build(cfg)
    runner.train()
    return runner


@pytest.mark.parametrize("name", ["faster-rcnn_r50_fpn_s-net_coco128.py", "mask-rcnn_r50_fpn_s-net_coco128.py"])
def test_runner_trains_every_switch_and_evaluates_each(name, tmp_path):
    cfg = small_cfg(name, tmp_path, iters=2)
    runner = _run(cfg)
    log = _scalars(tmp_path)
    train = [r for r in log if "loss" in r]
    assert len(train) == 2
    for w in SWITCHES:  # S-Nets Algorithm 1: every switch at every iteration
        assert all(f"w{w:g}/loss_cls" in r for r in train), train[0].keys()
    assert all(abs(r["loss"] - sum(r[f"w{w:g}/loss"] for w in SWITCHES)) < 1e-3 * abs(r["loss"]) for r in train)
    metrics = runner.test()
    kinds = ["bbox", "segm"] if name.startswith("mask") else ["bbox"]
    for w in SWITCHES:
        for k in kinds:
            assert f"w{w:g}/coco/{k}_mAP" in metrics
    assert metrics["coco/bbox_mAP"] == metrics["w1/coco/bbox_mAP"]
    rows = read_spectrum_csv(str(tmp_path / "spectrum.csv"))
    assert [r["width"] for r in rows] == SWITCHES
    assert all(a["mflops"] < b["mflops"] and a["params_m"] < b["params_m"] for a, b in zip(rows, rows[1:]))
    assert all(f"{k}_AP" in r for r in rows for k in kinds)
    from slim_plugins.cli import main as slim_main

    assert slim_main(["spectrum", str(tmp_path / "spectrum.csv"), "-o", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_mmdet_init_detector_and_inferencer_build_the_slimmable_detector(tmp_path, slim_data):
    """mmdet's own entry points on the documented config (model type SlimDetector): init_detector and DetInferencer
    build the slimmable detector, the checkpoint of a SlimRunner run loads into it tensor for tensor (no size
    mismatch), and its detections at every switch are the runner model's."""
    from mmdet.apis import DetInferencer, inference_detector, init_detector

    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path / "run", iters=1, depth=18)
    runner = _run(cfg)
    path = tmp_path / "config.py"
    cfg.dump(str(path))
    ck = tmp_path / "run" / "iter_1.pth"
    det = init_detector(str(path), str(ck), device="cpu")
    assert smd.is_slimmable(det) and slim.width_spec(det) == slim.WidthSpec.switches(SWITCHES)
    saved = torch.load(ck, map_location="cpu", weights_only=True)["state_dict"]
    own = det.state_dict()
    assert saved.keys() == own.keys() and all(torch.equal(own[k], v) for k, v in saved.items())
    img = _image(slim_data)
    trained = runner.model.eval()
    trained.cfg = det.cfg
    for w in SWITCHES:
        with slim.width(w), torch.no_grad():
            a, b = inference_detector(det, img).pred_instances, inference_detector(trained, img).pred_instances
        assert torch.equal(a.bboxes, b.bboxes) and torch.equal(a.scores, b.scores), w
    inferencer = DetInferencer(model=str(path), weights=str(ck), device="cpu", show_progress=False)
    assert smd.is_slimmable(inferencer.model)
    assert all(torch.equal(inferencer.model.state_dict()[k], v) for k, v in saved.items())


def test_a_stock_runner_refuses_to_train_a_slim_detector(tmp_path):
    """Without runner_type='SlimRunner' mmengine's stock loop would call model.train_step and train the widest width
    only: the SlimDetector refuses that with a typed error naming the missing line, before any optimizer step."""
    from mmengine.runner import Runner

    from slim_plugins.errors import NotSlimmableError

    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path, iters=1, depth=18)
    cfg.pop("runner_type")
    runner = Runner.from_cfg(cfg)
    with pytest.raises(NotSlimmableError, match="runner_type = 'SlimRunner'"):
        runner.train()
    assert not runner.optim_wrapper.optimizer.state  # no optimizer step was taken
    twin = copy.deepcopy(runner.model)  # mmengine's EMA hooks copy the model: the refusal follows the copy
    with pytest.raises(NotSlimmableError):
        twin.train_step({}, None)


def test_retinanet_with_the_documented_lines_trains_and_exports_exactly(slim_data):
    """RetinaNet (FPN extra conv on C5, add_extra_convs='on_input': a neck layer reading a backbone output that
    the old name list missed): the config lines on mmdet's stock config, one SlimRunner iteration at every switch,
    per-width AP, each exported width loaded by init_detector equal to the dynamic model (benchmarks' measurer)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("coverage_mmdet", REPO / "benchmarks" / "coverage_mmdet.py")
    cov = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cov)
    row = cov.measure("RetinaNet", "retinanet/retinanet_r50_fpn_1x_coco.py", False, data=str(slim_data))
    assert row["verdict"] == "exact", row
    assert row["train_widths"] == row["ap_keys"] == "0.25 0.5 0.75 1" and float(row["export_max_diff"]) <= 1e-4


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A write that dies mid-way (disk full, a kill) leaves neither a partial iter_N.pth nor a temporary file, and
    last_checkpoint never names a missing file."""
    import mmengine.runner.runner as mr

    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path, iters=2, depth=18, ckpt_interval=1)
    real = mr.save_checkpoint
    calls = []

    def dies_on_second(checkpoint, filename, **kw):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real(checkpoint, filename, **kw)

    monkeypatch.setattr(mr, "save_checkpoint", dies_on_second)
    with pytest.raises(OSError):
        _run(cfg)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["iter_1.pth"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "last_checkpoint").read_text().strip().endswith("iter_1.pth")
    torch.load(tmp_path / "iter_1.pth", map_location="cpu", weights_only=True)


def _scalars(work_dir: Path) -> list[dict]:
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    assert files, list(work_dir.iterdir())
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


def test_us_net_sandwich_distillation_and_post_statistics(tmp_path):
    cfg = small_cfg("faster-rcnn_r50_fpn_us-net_coco128.py", tmp_path, iters=2, calib_samples=4,
                    eval_widths=[0.25, 0.6, 1.0], distill="l2")
    runner = _run(cfg)
    train = [r for r in _scalars(tmp_path) if "loss" in r]
    assert len(train) == 2
    for r in train:  # sandwich: max, min and 2 random widths, logged by role
        assert {"max/loss", "min/loss", "rand/loss", "max/loss_cls", "min/distill", "rand/distill"} <= set(r)
        assert "max/distill" not in r  # the widest width is the teacher (FPN-feature inplace distillation)
        assert not any(re.match(r"w[0-9.]+/", k) for k in r)
    assert runner.message_hub.get_info("slim_widths") == runner.train_loop.slim_step.widths(1)
    metrics = runner.test()
    assert {"w0.25/coco/bbox_mAP", "w0.6/coco/bbox_mAP", "w1/coco/bbox_mAP"} <= set(metrics)
    assert slim.calibrated_widths(runner.model, [0.6]) == [0.6]  # post-statistics before evaluation


# ---- export -------------------------------------------------------------------------------------------------------
def test_export_is_a_plain_mmdet_detector_with_equal_outputs(tmp_path, slim_data):
    from mmdet.apis import inference_detector, init_detector

    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path, iters=1)
    runner = _run(cfg)
    model = smd.init_slim_detector(runner.cfg, str(tmp_path / "iter_1.pth"))
    torch.testing.assert_close(model.backbone.conv1.weight, runner.model.backbone.conv1.weight)
    out = smd.export_detector(model, runner.cfg, 0.5, str(tmp_path / "w0.5"))
    text = Path(out["config"]).read_text()
    assert not any(k in text for k in ("SlimRunner", "slimmable", "SlimResNet", "SlimTestLoop", "SlimPretrained",
                                       "slim_plugins", "CocoDatasetUniqueIds"))
    # mmdet's own tools/test.py on the exported config, in a process that never imports this package; coco128's
    # repeated annotation ids are renumbered in the JSON copy the exported config names
    import mmdet

    tools = Path(mmdet.__file__).parent / ".mim" / "tools"
    r = subprocess.run([sys.executable, str(tools / "test.py"), out["config"], out["checkpoint"], "--work-dir",
                        str(tmp_path / "plain_test")], env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr  # after one iteration the detector may find nothing: CocoMetric then logs no AP
    assert re.search(r"Iter\(test\) \[(\d+)/\1\]", log) and "slim_plugins" not in log
    plain = init_detector(out["config"], out["checkpoint"], device="cpu")
    assert not any("slim_plugins" in type(m).__module__ for m in plain.modules())
    assert plain.backbone.base_channels == 32 and plain.neck.in_channels == [128, 256, 512, 1024]
    img = _image(slim_data)
    ref = inference_detector(plain, img).pred_instances
    with slim.width(0.5):
        got = inference_detector(model, img).pred_instances
    assert len(ref) == len(got)
    torch.testing.assert_close(got.bboxes, ref.bboxes, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-5, rtol=1e-4)


def test_export_of_a_width_no_resnet_config_can_hold_is_refused(tmp_path):
    cfg = small_cfg("faster-rcnn_r50_fpn_us-net_coco128.py", tmp_path)
    det = smd.make_slimmable(_build(cfg), smd.slimmable_entry(cfg))
    slim.calibrate_bn(det, [torch.randn(2, 3, 64, 64)], widths=[0.3], forward=lambda m, x: m.extract_feat(x))
    with pytest.raises(InvalidArgumentError, match="cannot be written as an mmdet ResNet"):
        smd.export_detector(det, cfg, 0.3, str(tmp_path / "x"))
    assert not (tmp_path / "x" / "model.pth").exists()


# ---- from classification to detection -----------------------------------------------------------------------------
def test_slim_train_resnet50_checkpoint_initialises_the_backbone(tmp_path):
    """A timm s_resnet50 written by ``slim.save_checkpoint`` (what ``slim train`` writes) loads into the detector's
    backbone through ``init_cfg=dict(type='SlimPretrained')``, per-switch BN statistics included."""
    import timm

    import slim_plugins.integrations.timm  # noqa: F401  registers s_resnet50

    cls = timm.create_model("s_resnet50", num_classes=10)
    with torch.no_grad():
        for m in cls.modules():
            if isinstance(m, slim.nn.SlimBatchNorm2d):
                for t in m.buffers():
                    if t.is_floating_point():
                        t.uniform_(0.5, 1.5)
    path = slim.save_checkpoint(str(tmp_path / "s_resnet50.pth.tar"), cls)
    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path)
    cfg.model.backbone.init_cfg = dict(type="SlimPretrained", checkpoint=path)
    det = smd.make_slimmable(_build(cfg), smd.slimmable_entry(cfg))
    det.init_weights()
    src = cls.state_dict()
    dst = det.backbone.state_dict()
    assert set(dst) <= set(src)
    for k in dst:
        torch.testing.assert_close(dst[k], src[k], msg=k)
    other = timm.create_model("us_resnet50", num_classes=10)
    bad = slim.save_checkpoint(str(tmp_path / "us.pth.tar"), other)
    cfg.model.backbone.init_cfg = dict(type="SlimPretrained", checkpoint=bad)
    det = smd.make_slimmable(_build(cfg), smd.slimmable_entry(cfg))
    with pytest.raises(slim.WidthSpecMismatchError):
        det.init_weights()


# ---- resume -------------------------------------------------------------------------------------------------------
def test_resume_continues_training_under_weights_only(tmp_path):
    cfg = small_cfg("faster-rcnn_r50_fpn_us-net_coco128.py", tmp_path, iters=2, depth=18)
    first = _run(cfg)
    w_first = first.model.backbone.conv1.weight.detach().clone()
    ck = torch.load(tmp_path / "iter_2.pth", weights_only=True)  # torch's default safe loader, nothing allow-listed
    assert ck["meta"]["iter"] == 2 and ck["message_hub"]["log_scalars"]
    cfg2 = small_cfg("faster-rcnn_r50_fpn_us-net_coco128.py", tmp_path, iters=3, depth=18)
    cfg2.resume = True
    runner = RUNNERS.build(cfg2)
    seen = []
    orig = smd.train_step.multi_width_train_step

    def spy(model, data, ow, step, iteration):
        seen.append((iteration, step.widths(iteration)))
        if not seen[1:]:
            torch.testing.assert_close(model.backbone.conv1.weight, w_first)
        return orig(model, data, ow, step, iteration)

    smd.train_step.multi_width_train_step = spy
    try:
        runner.train()
    finally:
        smd.train_step.multi_width_train_step = orig
    assert [i for i, _ in seen] == [2]  # iterations 0 and 1 were done; the width sequence continues at 2
    assert seen[0][1] == first.train_loop.slim_step.widths(2)


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """A US-Net run killed after its iter_2 checkpoint and resumed ends with the uninterrupted run's weights, tensor
    for tensor: width schedule, optimizer, data order and the random streams (flip augmentation, RPN / RoI
    sampling) continue where the checkpoint left them."""
    name = "faster-rcnn_r50_fpn_us-net_coco128.py"
    full = _run(small_cfg(name, tmp_path / "full", iters=4, depth=18, ckpt_interval=2))
    _run(small_cfg(name, tmp_path / "killed", iters=2, depth=18, ckpt_interval=2))  # the kill: nothing after iter 2
    cfg = small_cfg(name, tmp_path / "killed", iters=4, depth=18, ckpt_interval=2)
    cfg.resume = True
    resumed = _run(cfg)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_killed_epoch_based_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """The same for mmdet's usual epoch-based loop: killed after epoch_1.pth (shuffled data, flip augmentation),
    resumed, the final weights equal the uninterrupted run's."""
    name = "faster-rcnn_r50_fpn_s-net_coco128.py"

    def cfg(work, epochs):
        c = small_cfg(name, work, depth=18)
        c.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=10_000)
        c.train_dataloader.sampler = dict(type="DefaultSampler", shuffle=True)
        c.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, by_epoch=True)
        c.log_processor = dict(by_epoch=True)
        return c

    full = _run(cfg(tmp_path / "full", 2))
    _run(cfg(tmp_path / "killed", 1))
    c = cfg(tmp_path / "killed", 2)
    c.resume = True
    resumed = _run(c)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# ---- optim wrapper glue -------------------------------------------------------------------------------------------
def test_gradient_accumulation_counts_one_micro_step_per_iteration(tmp_path):
    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path, iters=4, depth=18)
    cfg.optim_wrapper.accumulative_counts = 2
    steps = []
    runner = RUNNERS.build(cfg)
    orig = torch.optim.SGD.step

    def count(self, *a, **k):
        steps.append(1)
        return orig(self, *a, **k)

    torch.optim.SGD.step = count
    try:
        runner.train()
    finally:
        torch.optim.SGD.step = orig
    assert len(steps) == 2  # 4 iterations x 4 widths, accumulating 2 iterations per optimizer step


def test_amp_optim_wrapper_scales_every_width(tmp_path):
    """AmpOptimWrapper's loss scaling reaches every width and counts one micro-step. Its constructor asserts CUDA,
    so it is bypassed here, and so is its CPU autocast (bfloat16 only, which mmcv's CPU NMS has no kernel for):
    what is tested is the loss scaler on every width and the one scaler step."""
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path)
    det = smd.make_slimmable(_build(cfg), smd.slimmable_entry(cfg))
    opt = torch.optim.SGD(det.parameters(), lr=0.0)
    ow = AmpOptimWrapper.__new__(AmpOptimWrapper)
    OptimWrapper.__init__(ow, opt)
    ow.loss_scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    ow.cast_dtype, ow._scale_update_param = torch.bfloat16, None
    ow.optim_context = lambda model: OptimWrapper.optim_context(ow, model)
    ow.initialize_count_status(det, 0, 1)
    from mmengine.runner import Runner  # noqa: F401

    runner = RUNNERS.build(cfg)
    batch = next(iter(runner.build_dataloader(cfg.train_dataloader)))
    step = smd.build_step(det, smd.slim_settings(det))
    scaled = []
    orig = ow.loss_scaler.scale
    ow.loss_scaler.scale = lambda t: scaled.append(float(t)) or orig(t)
    stepped = []
    orig_step = ow.loss_scaler.step
    ow.loss_scaler.step = lambda o, *a, **k: stepped.append(1) or orig_step(o, *a, **k)
    logs = smd.multi_width_train_step(det, batch, ow, step, 0)
    assert len(scaled) == 4 and "w0.25/loss" in logs
    assert ow.inner_count == 1 and stepped == [1]


def test_unsupported_optim_wrapper_is_named(tmp_path):
    from mmengine.optim import OptimWrapperDict

    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path)
    det = smd.make_slimmable(_build(cfg), smd.slimmable_entry(cfg))
    with pytest.raises(InvalidArgumentError, match="OptimWrapperDict"):
        smd.multi_width_train_step(det, {}, OptimWrapperDict(), smd.build_step(det, smd.slim_settings(det)), 0)


# ---- DDP ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_ranks_draw_the_same_widths_and_stay_in_sync(tmp_path):
    """2 gloo processes under torchrun (mmengine launcher='pytorch'): same sandwich widths on both ranks at every
    iteration, identical parameters after the optimizer steps."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "tests" / "mmdet_ddp_worker.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert a["wrapper"] == "MMDistributedDataParallel"
    assert len(a["widths"]) == 3 and a["widths"] == b["widths"]
    assert all(len(set(ws)) >= 2 and min(ws) == 0.25 and max(ws) == 1.0 for ws in a["widths"])
    assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-9)


# ---- the commands a user runs -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mmdet_tools_train_and_slim_commands(tmp_path, slim_data):
    """mmdet's own tools/train.py and tools/test.py, then `slim train / eval / export` on the same config file."""
    import mmdet

    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path / "unused", iters=1)
    path = tmp_path / "tiny_s-net.py"
    cfg.dump(str(path))
    tools = Path(mmdet.__file__).parent / ".mim" / "tools"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(tools / "train.py"), str(path), "--work-dir", str(tmp_path / "tools")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "w0.25/loss" in (r.stdout + r.stderr)
    ckpt = tmp_path / "tools" / "iter_1.pth"
    r = subprocess.run([sys.executable, str(tools / "test.py"), str(path), str(ckpt), "--work-dir",
                        str(tmp_path / "tools")], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "w0.25/coco/bbox_mAP" in (r.stdout + r.stderr)

    slim_bin = [sys.executable, "-m", "slim_plugins.cli"]
    r = subprocess.run(slim_bin + ["train", str(path), "--output", str(tmp_path / "slim")], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = tmp_path / "slim" / "iter_1.pth"
    r = subprocess.run(slim_bin + ["eval", str(ck), "--widths", "0.25", "1.0"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_spectrum_csv(str(tmp_path / "slim" / "spectrum.csv"))
    assert [x["width"] for x in rows] == [0.25, 1.0] and "bbox_AP" in rows[0]
    r = subprocess.run(slim_bin + ["export", str(ck), "--width", "0.75", "--out", str(tmp_path / "exp")], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from mmdet.apis import init_detector

    plain = init_detector(str(tmp_path / "exp" / "config.py"), str(tmp_path / "exp" / "model.pth"), device="cpu")
    assert plain.backbone.base_channels == 48
    r = subprocess.run(slim_bin + ["export", str(ck), "--width", "0.3"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "not a switch" in r.stderr
    # `slim profile --no-latency --csv`: the one table format, read back by ProfileTable.from_csv
    r = subprocess.run(slim_bin + ["profile", str(ck), "--no-latency", "--input-size", "320", "--csv",
                                   str(tmp_path / "prof.csv")], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from slim_plugins import ProfileTable

    table = ProfileTable.from_csv(str(tmp_path / "prof.csv"))
    assert [p.width for p in table] == [0.25, 0.5, 0.75, 1.0] and all(p.latency_ms != p.latency_ms for p in table)
    assert table[0].mflops < table[-1].mflops
    # `slim serve`: inference_detector under a budget every width meets: the widest serves every call
    r = subprocess.run(slim_bin + ["serve", str(ck), "--budget-ms", "1e9", "--widths", "0.25", "1.0", "--calls",
                                   "3", "--no-live", "--csv", str(tmp_path / "calls.csv"), "--plot",
                                   str(tmp_path / "serve.png")], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = (tmp_path / "calls.csv").read_text().splitlines()
    assert len(calls) == 4 and all(c.split(",")[1] == "1" for c in calls[1:])  # any budget: the widest width
    assert (tmp_path / "serve.png").stat().st_size > 0
    # the commands' Runner works in a temporary folder: no log folders or config dumps beside the checkpoint
    assert not list((tmp_path / "slim").glob("tmp*.py"))


# ---- learning at every width --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_width_learns_to_detect_its_training_images(tmp_path):
    """Overfit check: an S-Net Faster R-CNN (ResNet-18 depth, 192x160) trained 100 iterations on 2 coco128 images
    detects them at every switch: box AP > 0 at 0.25, 0.5, 0.75 and 1.0 (measured: 0.78-0.90 after about
    5 minutes with 2 threads on the 2-core VM)."""
    cfg = small_cfg("faster-rcnn_r50_fpn_s-net_coco128.py", tmp_path, n_train=2, n_val=2, depth=18, scale=(192, 160))
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=100, val_interval=10_000)  # 1 iteration per epoch
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=100)
    cfg.optim_wrapper.optimizer.lr = 0.005
    cfg.model.test_cfg.rcnn.score_thr = 0.01
    test = cfg.test_dataloader.dataset  # evaluate on the training images
    test.type, test.ann_file, test.data_prefix = "CocoDataset", "annotations/instances_train2017.json", dict(
        img="train2017/")
    torch.set_num_threads(2)
    try:
        runner = _run(cfg)
        metrics = runner.test()
    finally:
        torch.set_num_threads(int(os.environ.get("SLIM_TEST_THREADS", "1")))
    for w in SWITCHES:
        assert metrics[f"w{w:g}/coco/bbox_mAP"] > 0.1, metrics


def test_export_of_a_non_resnet_backbone_is_checked_by_building_its_config(tmp_path):
    """Found by ``coverage_mmdet.py``: RTMDet (CSPNeXt backbone, CSPNeXtPAFPN neck) trains and tests at every width,
    but its export read ``backbone.conv1`` (a ResNet's) and failed with an untyped ``AttributeError``. Now the
    backbone's own config argument (``widen_factor``) is used and the written config is built and compared with the
    export first: here its PAFPN builds its inner layers from ``in_channels``, so the export is refused, typed,
    naming the parts, with nothing written."""
    import mmdet

    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / "rtmdet" /
                              "rtmdet_tiny_8xb32-300e_coco.py"))
    cfg.model.backbone.init_cfg = None
    det = smd.make_slimmable(_build(cfg), dict(widths=[0.25, 0.5, 1.0])).eval()
    with pytest.raises(InvalidArgumentError, match=r"backbone: \d+, neck: \d+.*widen_factor.*CSPNeXtPAFPN"):
        smd.export_detector(det, cfg, 0.25, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    with slim.width(0.25), torch.no_grad():  # the slimmable detector itself runs at the width
        feats = det.extract_feat(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [96, 96, 96]
    out = smd.export_detector(det, cfg, 1.0, str(tmp_path / "full"))  # width 1.0 is the stock config
    assert out["channels"]["widen_factor"] == cfg.model.backbone.widen_factor
