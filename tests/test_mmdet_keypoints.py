"""Keypoint R-CNN in mmdet on real COCO person images ($SLIM_DATA/coco_kpts): the head's targets, loss and decoding,
keypoint transforms, COCO keypoint AP on mmpose's official-format JSON, multi-width training through mmengine's
Runner, per-width keypoint AP, export to a plain mmdet detector."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import RUNNERS, init_default_scope  # noqa: E402

import slim_plugins as slim  # noqa: E402
from slim_plugins.spectrum import read_spectrum_csv  # noqa: E402
from slim_plugins.errors import InvalidArgumentError  # noqa: E402
from slim_plugins.integrations import mmdet as smd  # noqa: E402
from mmdet_utils import CONFIGS, small_cfg  # noqa: E402

SWITCHES = [0.25, 0.5, 0.75, 1.0]
COCO_NAMES = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
              "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
              "right_knee", "left_ankle", "right_ankle"]


def kpt_cfg(name, work_dir, head_channels: int = 64, **kw):
    """A small config: a narrower keypoint head (2 x 64 channels instead of 8 x 512: the shared head is the same
    code at any size and dominates a CPU step at full size) and the 20 best boxes per image (COCO keypoint AP
    counts 20)."""
    cfg = small_cfg(name, work_dir, **kw)
    cfg.model.roi_head.keypoint_head.update(conv_out_channels=head_channels, num_convs=2)
    cfg.model.test_cfg.rcnn.max_per_img = 20
    return cfg


# ---- the head ------------------------------------------------------------------------------------------------------
def test_head_is_the_paper_head():
    """8 x (conv3x3, 512) + 4x4 stride-2 deconv + x2 bilinear: (R, 256, 14, 14) -> (R, 17, 56, 56)."""
    head = smd.KeypointRCNNHead()
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(256, 512, (3, 3))] + [
        (512, 512, (3, 3))] * 7
    assert head(torch.randn(3, 256, 14, 14)).shape == (3, 17, 56, 56)
    with pytest.raises(InvalidArgumentError, match="num_convs must be a positive integer, got 0"):
        smd.KeypointRCNNHead(num_convs=0)


def _target_cells(kp, rois, size=56):
    from torchvision.models.detection.roi_heads import keypoints_to_heatmap

    return keypoints_to_heatmap(kp, rois, size)


def test_target_decodes_back_to_the_keypoint_within_one_cell():
    """A heatmap peaked at a keypoint's target cell decodes to that keypoint within one heatmap cell (RoIs of at
    least 56 pixels a side, so a cell is not finer than the pixel grid the decoder's arg-max runs on)."""
    g = torch.Generator().manual_seed(0)
    rois = torch.tensor([[10.0, 20.0, 130.0, 260.0], [5.0, 5.0, 90.0, 70.0]])
    wh = rois[:, 2:] - rois[:, :2]
    kp = torch.cat([rois[:, None, :2] + torch.rand(2, 17, 2, generator=g) * wh[:, None], torch.full((2, 17, 1), 2.)],
                   dim=2)
    cells, valid = _target_cells(kp, rois)
    assert valid.all()
    logits = torch.zeros(2, 17, 56 * 56)
    logits.scatter_(2, cells[..., None], 20.0)
    got, scores = smd.KeypointRCNNHead.predict_by_feat(logits.view(2, 17, 56, 56), [rois])
    cell = wh / 56  # one heatmap cell in pixels, per RoI (x, y)
    err = (got[0] - kp[..., :2]).abs()
    assert (err <= cell[:, None, :] + 1e-4).all(), (err / cell[:, None, :]).max()
    assert (scores[0] > 10).all()


def test_loss_is_near_zero_at_the_target_and_large_elsewhere():
    head = smd.KeypointRCNNHead()
    rois = torch.tensor([[0.0, 0.0, 112.0, 112.0]])
    kp = torch.tensor([[[30.0, 40.0, 2.0]] * 16 + [[0.0, 0.0, 0.0]]])  # the last keypoint is not labelled
    cells, valid = _target_cells(kp, rois)
    right = torch.zeros(1, 17, 56 * 56).scatter_(2, cells[..., None], 30.0).view(1, 17, 56, 56)
    wrong = torch.zeros(1, 17, 56 * 56).scatter_(2, (cells[..., None] + 500) % 3136, 30.0).view(1, 17, 56, 56)
    matched = [torch.tensor([0])]
    near = head.loss(right, [rois], [kp], matched)["loss_keypoint"]
    far = head.loss(wrong, [rois], [kp], matched)["loss_keypoint"]
    assert near < 1e-6 and far > 25.0, (near, far)
    uniform = head.loss(torch.zeros(1, 17, 56, 56), [rois], [kp], matched)["loss_keypoint"]
    assert abs(float(uniform) - math.log(56 * 56)) < 1e-4  # a flat heatmap: cross-entropy log(S^2)
    none = head.loss(right.requires_grad_(), [rois], [torch.zeros(1, 17, 3)], matched)["loss_keypoint"]
    assert float(none) == 0.0 and none.requires_grad  # no visible keypoint: zero, graph kept for DDP


# ---- data ---------------------------------------------------------------------------------------------------------
def test_flip_indices_pair_left_and_right():
    idx = smd.flip_indices(COCO_NAMES)
    assert idx == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    with pytest.raises(InvalidArgumentError, match="'left_eye' has no mirror keypoint 'right_eye'"):
        smd.flip_indices(["nose", "left_eye"])


def test_flip_swaps_left_and_right_keypoints_and_mirrors_x():
    from mmdet.structures.bbox import HorizontalBoxes

    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform(0, 100, (2, 17, 2)), rng.integers(0, 3, (2, 17, 1))], axis=2).astype(np.float32)
    kp[kp[..., 2] == 0] = 0.0
    results = {"img": np.zeros((60, 100, 3), np.uint8), "gt_keypoints": kp.copy(),
               "gt_bboxes": HorizontalBoxes(torch.tensor([[10.0, 5.0, 50.0, 40.0]] * 2)),
               "flip_indices": smd.flip_indices(COCO_NAMES)}
    flip = smd.KeypointRandomFlip(prob=1.0)
    out = flip.transform(copy.deepcopy(results))["gt_keypoints"]
    le, re_ = COCO_NAMES.index("left_eye"), COCO_NAMES.index("right_eye")
    # the new left eye is the old right eye, mirrored; visibility travels with it
    np.testing.assert_allclose(out[:, le, 2], kp[:, re_, 2])
    vis = kp[:, re_, 2] > 0
    np.testing.assert_allclose(out[vis, le, 0], 100 - kp[vis, re_, 0])
    np.testing.assert_allclose(out[:, le, 1], kp[:, re_, 1])
    assert (out[out[..., 2] == 0] == 0).all()  # unlabelled keypoints stay at (0, 0, 0)
    twice = flip.transform(flip.transform(copy.deepcopy(results)))["gt_keypoints"]
    np.testing.assert_allclose(twice, kp, atol=1e-4)
    with pytest.raises(InvalidArgumentError, match="horizontally only"):
        smd.KeypointRandomFlip(prob=1.0, direction="vertical")


def test_dataset_and_pipeline_carry_keypoints(slim_data):
    """Real images: the packed keypoints are the JSON's, scaled like the boxes, visibility kept."""
    from mmdet.registry import DATASETS

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIGS / "keypoint-rcnn_r50_fpn_s-net_coco-kpts.py"))
    ds_cfg = cfg.train_dataloader.dataset
    ds_cfg.pipeline = [t for t in ds_cfg.pipeline if t["type"] != "KeypointRandomFlip"]
    ds = DATASETS.build(ds_cfg)
    assert ds.metainfo["keypoint_names"] == COCO_NAMES and len(ds) == 4
    raw = json.loads((slim_data / "coco_kpts/annotations/person_keypoints_train.json").read_text())
    sample = ds[0]["data_samples"]
    info = ds.get_data_info(0)
    anns = [a for a in raw["annotations"] if a["image_id"] == info["img_id"]]
    gt = sample.gt_instances
    assert gt.keypoints.shape == (len(anns), 17, 3)
    sx, sy = sample.metainfo["scale_factor"]
    ref = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).view(-1, 17, 3)
    torch.testing.assert_close(gt.keypoints[..., 2], ref[..., 2])
    torch.testing.assert_close(gt.keypoints[..., :2], ref[..., :2] * torch.tensor([sx, sy]), atol=1e-3, rtol=1e-5)
    x, y, w, h = anns[0]["bbox"]
    torch.testing.assert_close(gt.bboxes.tensor[0], torch.tensor([x * sx, y * sy, (x + w) * sx, (y + h) * sy]),
                               atol=1e-3, rtol=1e-5)


# ---- the metric on mmpose's official-format JSON ------------------------------------------------------------------
def _official(slim_data):
    path = slim_data / "coco_kpts/mmpose_val/test_coco.json"
    return path, json.loads(path.read_text())


def _samples_from(anns, images, shift=0.0, seed=0):
    """Data samples whose predictions are the ground truth persons with labelled keypoints (moved by ``shift``
    pixels); persons without any (COCO ignores them in keypoint AP) are not predicted."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        mine = [a for a in anns if a["image_id"] == img["id"] and a["num_keypoints"] > 0]
        kp = np.asarray([a["keypoints"] for a in mine], np.float32).reshape(-1, 17, 3)
        box = np.asarray([a["bbox"] for a in mine], np.float32).reshape(-1, 4)
        box[:, 2:] += box[:, :2]
        pred = InstanceData(bboxes=torch.from_numpy(box), scores=torch.ones(len(mine)),
                            labels=torch.zeros(len(mine), dtype=torch.long),
                            keypoints=torch.from_numpy(kp[..., :2] + rng.normal(0, shift, kp[..., :2].shape)
                                                       .astype(np.float32)),
                            keypoint_scores=torch.ones(len(mine), 17))
        s = DetDataSample(metainfo=dict(img_id=img["id"], ori_shape=(img["height"], img["width"])))
        s.pred_instances = pred
        out.append(s.to_dict())
    return out


def test_metric_on_the_official_json_scores_ground_truth_1_and_matches_pycocotools(slim_data):
    from mmdet.registry import METRICS
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path, off = _official(slim_data)
    init_default_scope("mmdet")

    def evaluate(shift):
        metric = METRICS.build(dict(type="CocoKeypointMetric", ann_file=str(path)))
        metric.dataset_meta = {"classes": ("person",)}
        metric.process({}, _samples_from(off["annotations"], off["images"], shift=shift))
        return metric.evaluate(len(off["images"]))

    perfect = evaluate(0.0)
    assert perfect["coco/keypoints_mAP"] == 1.0
    assert 0.7 < perfect["coco/bbox_mAP"] < 1.0  # 12 of the 14 boxes: the 2 persons without keypoints are missed
    noisy = evaluate(4.0)
    assert 0.0 < noisy["coco/keypoints_mAP"] < 1.0
    # the same detections scored by pycocotools directly (its default sigmas are COCO's 17)
    gt = COCO(str(path))
    dets = []
    for s in _samples_from(off["annotations"], off["images"], shift=4.0):
        p = s["pred_instances"]
        for kp, sc in zip(p["keypoints"], p["scores"]):
            dets.append({"image_id": s["img_id"], "category_id": 1, "score": float(sc),
                         "keypoints": np.concatenate([kp.numpy(), np.ones((17, 1))], 1).reshape(-1).tolist()})
    ev = COCOeval(gt, gt.loadRes(dets), "keypoints")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert noisy["coco/keypoints_mAP"] == pytest.approx(round(ev.stats[0], 3), abs=1e-9)


def test_metric_ground_truth_from_the_dataset_when_no_ann_file(slim_data, tmp_path):
    """``ann_file=None``: the ground truth (keypoints included) comes from the packed ``instances``."""
    from mmdet.registry import DATASETS, METRICS

    path, off = _official(slim_data)
    init_default_scope("mmdet")
    ds = DATASETS.build(dict(type="CocoKeypointDataset", data_root=str(path.parent), ann_file=path.name,
                             data_prefix=dict(img=""), test_mode=True, pipeline=[]))
    assert sum(len(ds.get_data_info(i)["instances"]) for i in range(len(ds))) == 14
    metric = METRICS.build(dict(type="CocoKeypointMetric", ann_file=None, metric="keypoints"))
    metric.dataset_meta = ds.metainfo
    samples = _samples_from(off["annotations"], off["images"])
    for s in samples:
        i = next(i for i in range(len(ds)) if ds.get_data_info(i)["img_id"] == s["img_id"])
        s["instances"] = ds.get_data_info(i)["instances"]
    metric.process({}, samples)
    res = metric.evaluate(len(samples))
    assert res["coco/keypoints_mAP"] == 1.0 and "coco/bbox_mAP" not in res
    # the converted ground truth pairs each annotation with its own instance's keypoints
    gts = [{"img_id": s["img_id"], "width": 1, "height": 1, "anns": s["instances"]} for s in samples]
    conv = json.loads(Path(metric.gt_to_coco_json(gts, str(tmp_path / "gt"))).read_text())["annotations"]
    flat = [inst for g in gts for inst in g["anns"]]
    assert len(conv) == len(flat) == 14
    for a, inst in zip(conv, flat):
        assert a["keypoints"] == np.asarray(inst["keypoints"]).reshape(-1).tolist()
        assert a["num_keypoints"] == int((np.asarray(inst["keypoints"])[:, 2] > 0).sum())
    with pytest.raises(InvalidArgumentError, match="positive"):
        METRICS.build(dict(type="CocoKeypointMetric", sigmas=[0.1, -1.0]))


# ---- slimmable keypoint detector ----------------------------------------------------------------------------------
def _scalars(work_dir: Path) -> list[dict]:
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


def test_every_switch_trains_and_is_evaluated_with_keypoint_ap(tmp_path):
    cfg = kpt_cfg("keypoint-rcnn_r50_fpn_s-net_coco-kpts.py", tmp_path, iters=2, depth=18)
    runner = RUNNERS.build(cfg)
    runner.train()
    train = [r for r in _scalars(tmp_path) if "loss" in r]
    assert len(train) == 2
    for w in SWITCHES:  # every switch, each with a keypoint loss (log S^2 = 8.04 at the start)
        assert all(0.5 < r[f"w{w:g}/loss_keypoint"] < 9.0 for r in train), train[0]
    # the converted detector at each switch is that width's plain backbone; heads shared
    assert runner.model.roi_head.keypoint_head.predictor.kps_score_lowres.in_channels == 64
    metrics = runner.test()
    for w in SWITCHES:
        assert {f"w{w:g}/coco/keypoints_mAP", f"w{w:g}/coco/bbox_mAP"} <= set(metrics)
    rows = read_spectrum_csv(str(tmp_path / "spectrum.csv"))
    assert [r["width"] for r in rows] == SWITCHES
    assert all("keypoints_AP" in r and "bbox_AP" in r for r in rows)
    assert all(a["mflops"] < b["mflops"] for a, b in zip(rows, rows[1:]))


def test_export_is_a_plain_keypoint_rcnn_with_equal_outputs(tmp_path, slim_data):
    from mmdet.apis import inference_detector, init_detector

    cfg = kpt_cfg("keypoint-rcnn_r50_fpn_s-net_coco-kpts.py", tmp_path, iters=1, depth=18)
    cfg.model.test_cfg.rcnn.score_thr = 0.0  # keep low-score boxes: an untrained detector's keypoints compared
    runner = RUNNERS.build(cfg)
    runner.train()
    model = smd.init_slim_detector(runner.cfg, str(tmp_path / "iter_1.pth"))
    out = smd.export_detector(model, runner.cfg, 0.5, str(tmp_path / "w0.5"))
    text = Path(out["config"]).read_text()
    assert not any(k in text for k in ("SlimRunner", "slimmable", "SlimTestLoop"))
    assert "'slim_plugins.integrations.mmdet'" in text  # the keypoint head's registration: the only import
    plain = init_detector(out["config"], out["checkpoint"], device="cpu")
    assert not any("slim_plugins" in type(m).__module__ for m in plain.backbone.modules())
    assert type(plain).__name__ == "KeypointRCNN" and plain.backbone.base_channels == 32
    img = str(sorted((slim_data / "coco_kpts/val").glob("*.jpg"))[0])
    ref = inference_detector(plain, img).pred_instances
    with slim.width(0.5):
        got = inference_detector(model, img).pred_instances
    assert len(ref) == len(got) > 0
    torch.testing.assert_close(got.bboxes, ref.bboxes, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got.keypoints, ref.keypoints, atol=1e-2, rtol=1e-4)
    torch.testing.assert_close(got.keypoint_scores, ref.keypoint_scores, atol=1e-3, rtol=1e-4)


def test_predictions_are_rescaled_to_the_original_image(tmp_path):
    """``rescale=True``: boxes and keypoints are divided by mmdet's ``scale_factor`` = (w_scale, h_scale)."""
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample

    init_default_scope("mmdet")
    cfg = kpt_cfg("keypoint-rcnn_r50_fpn_coco-kpts.py", tmp_path, depth=18)
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    torch.manual_seed(0)
    det = MODELS.build(cfg.model).eval()
    x = torch.randn(1, 3, 96, 128)
    out = {}
    for sf in ((1.0, 1.0), (2.0, 0.5)):
        meta = dict(img_shape=(96, 128), ori_shape=(96, 128), pad_shape=(96, 128), batch_input_shape=(96, 128),
                    scale_factor=sf)
        with torch.no_grad():
            out[sf] = det.predict(x, [DetDataSample(metainfo=meta)], rescale=True)[0].pred_instances
    a, b = out[(1.0, 1.0)], out[(2.0, 0.5)]
    assert len(a) > 0
    torch.testing.assert_close(b.bboxes, a.bboxes / torch.tensor([2.0, 0.5, 2.0, 0.5]))
    torch.testing.assert_close(b.keypoints, a.keypoints / torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(b.keypoint_scores, a.keypoint_scores)


def test_mask_branch_is_refused():
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIGS / "keypoint-rcnn_r50_fpn_coco-kpts.py"))
    roi = copy.deepcopy(cfg.model.roi_head)
    roi.mask_head = dict(type="FCNMaskHead")
    with pytest.raises(InvalidArgumentError, match="mask_head must be None"):
        MODELS.build(roi)


# ---- learning at every width --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_width_learns_the_keypoints_of_its_training_images(tmp_path):
    """Overfit check: an S-Net Keypoint R-CNN (ResNet-18 depth, 2 x 64-channel keypoint head, 256x192) trained on
    the 4 coco_kpts training images (7 persons) finds their keypoints at every switch: keypoint AP > 0 at 0.25,
    0.5, 0.75 and 1.0 on those images."""
    cfg = kpt_cfg("keypoint-rcnn_r50_fpn_s-net_coco-kpts.py", tmp_path, depth=18, scale=(256, 192))
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=OVERFIT_EPOCHS, val_interval=10_000)
    cfg.train_dataloader.dataset.indices = None
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=OVERFIT_EPOCHS)
    cfg.optim_wrapper.optimizer.lr = 0.01
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=20)]
    cfg.model.test_cfg.rcnn.score_thr = 0.01
    test = cfg.test_dataloader.dataset  # evaluate on the training images
    test.ann_file, test.data_prefix, test.indices = "annotations/person_keypoints_train.json", dict(img="train/"), None
    cfg.test_evaluator.ann_file = cfg.test_evaluator.ann_file.replace("_val.json", "_train.json")
    torch.set_num_threads(2)
    try:
        runner = RUNNERS.build(cfg)
        runner.train()
        metrics = runner.test()
    finally:
        torch.set_num_threads(int(os.environ.get("SLIM_TEST_THREADS", "1")))
    for w in SWITCHES:
        assert metrics[f"w{w:g}/coco/keypoints_mAP"] > 0.0, metrics


OVERFIT_EPOCHS = 60
