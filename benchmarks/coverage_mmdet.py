"""Detector-family coverage of the mmdet adapter, measured (issue 23's table).

For each mmdet detector family with a stock ResNet-50 config: the documented config lines on top of the stock
config (``model = dict(type='SlimDetector', detector=..., slimmable=...)``, ``runner_type = 'SlimRunner'``), data
switched to ``$SLIM_DATA/coco128`` at a small scale, then

1. one training iteration at every switch with ``SlimRunner`` (per-width losses ``w<w>/loss`` in the log);
2. the test loop at every switch on 2 val images (per-width AP keys ``w<w>/coco/bbox_mAP``);
3. ``slim`` export of every switch (a plain mmdet config + checkpoint) loaded by mmdet's own ``init_detector``;
   its backbone + neck features (a random image) and its ``inference_detector`` boxes / scores (a coco128 image)
   compared with the slimmable detector's at that width;
4. ``init_detector`` on the slimmable config with the trained checkpoint (the slimmable detector itself).

Verdict per family: ``exact`` (every step passed, export equal to the dynamic model within 1e-4), a typed refusal
(``<ErrorType>: message``) or ``FAIL`` (anything else). Writes ``benchmarks/coverage_mmdet.csv``::

    SLIM_DATA=/path/to/data OMP_NUM_THREADS=1 python benchmarks/coverage_mmdet.py [--only retinanet fcos]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _coverage import record_failure, write_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIDTHS = [0.25, 0.5, 0.75, 1.0]

#: (family, stock config under mmdet's .mim/configs, masks[, extra slimmable settings; "scale": image size])
FAMILIES = [
    ("Faster R-CNN", "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", False),
    ("Mask R-CNN", "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", True),
    ("Cascade R-CNN", "cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py", False),
    ("Cascade Mask R-CNN", "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py", True),
    ("RetinaNet", "retinanet/retinanet_r50_fpn_1x_coco.py", False),
    ("FCOS", "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py", False),
    ("ATSS", "atss/atss_r50_fpn_1x_coco.py", False),
    ("GFL", "gfl/gfl_r50_fpn_1x_coco.py", False),
    ("TOOD", "tood/tood_r50_fpn_1x_coco.py", False),
    ("PAA", "paa/paa_r50_fpn_1x_coco.py", False),
    ("Faster R-CNN + PAFPN", "pafpn/faster-rcnn_r50_pafpn_1x_coco.py", False),
    ("RetinaNet + NAS-FPN", "nas_fpn/retinanet_r50_nasfpn_crop640-50e_coco.py", False),
    ("DETR", "detr/detr_r50_8xb2-150e_coco.py", False),
    ("Deformable DETR", "deformable_detr/deformable-detr_r50_16xb2-50e_coco.py", False),
    # other backbones than ResNet-50 (added 2026-12-06)
    ("RTMDet-tiny (CSPNeXt)", "rtmdet/rtmdet_tiny_8xb32-300e_coco.py", False),
    ("YOLOX-tiny (CSPDarknet)", "yolox/yolox_tiny_8xb8-300e_coco.py", False),
    ("YOLOv3 (MobileNetV2)", "yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py", False),
    ("SSD300 (VGG16)", "ssd/ssd300_coco.py", False, {"scale": (320, 320)}),  # its extra layers need >= 300
]


def _pipelines(masks: bool, scale=(160, 128)):
    ann = dict(type="LoadAnnotations", with_bbox=True, with_mask=masks)
    train = [dict(type="LoadImageFromFile"), ann, dict(type="Resize", scale=scale, keep_ratio=True),
             dict(type="PackDetInputs")]
    test = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=scale, keep_ratio=True), ann,
            dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor",
                                                  "instances"))]
    return train, test


def family_config(stock: str, masks: bool, work: Path, data: str, extra: dict | None = None):
    """The stock config + the documented lines, written as a file (what a user writes), then shrunk for a CPU."""
    import mmdet
    from mmengine.config import Config

    base = Path(mmdet.__file__).parent / ".mim" / "configs" / stock
    detector = Config.fromfile(str(base)).model.type
    extra = dict(extra or {})
    scale = extra.pop("scale", (160, 128))
    text = (f"_base_ = {str(base)!r}\n"
            "custom_imports = dict(imports=['slim_plugins.integrations.mmdet'], allow_failed_imports=False)\n"
            f"model = dict(type='SlimDetector', detector={detector!r}, "
            f"slimmable=dict(widths={WIDTHS}{''.join(f', {k}={v!r}' for k, v in (extra or {}).items())}))\n"
            "runner_type = 'SlimRunner'\n")
    (work / "user_config.py").write_text(text)
    cfg = Config.fromfile(str(work / "user_config.py"))
    import inspect

    from mmdet.registry import MODELS

    accepts = inspect.signature(MODELS.get(cfg.model.backbone.type.split(".")[-1]).__init__).parameters
    cfg.model.backbone.update({k: v for k, v in dict(norm_eval=False, frozen_stages=-1, init_cfg=None).items()
                               if k in accepts})  # (SSD's VGG has no norm_eval / frozen_stages)
    train_p, test_p = _pipelines(masks, scale)
    root = os.path.join(data, "coco128") + "/"
    for key, n, split, pipe in (("train_dataloader", 4, "train2017", train_p), ("val_dataloader", 2, "val2017", test_p),
                                ("test_dataloader", 2, "val2017", test_p)):
        ds = dict(type="CocoDataset" if key == "train_dataloader" else "CocoDatasetUniqueIds", data_root=root,
                  ann_file=f"annotations/instances_{split}.json", data_prefix=dict(img=f"{split}/"), pipeline=pipe,
                  indices=n, filter_cfg=dict(filter_empty_gt=key == "train_dataloader", min_size=8))
        cfg[key] = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=ds,
                        sampler=dict(type="DefaultSampler", shuffle=False),
                        **({"batch_sampler": None} if key == "train_dataloader" else {}))
    metric = ["bbox", "segm"] if masks else ["bbox"]
    cfg.val_evaluator = cfg.test_evaluator = dict(type="CocoMetric", ann_file=None, metric=metric)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=1, val_interval=10_000)
    cfg.val_cfg, cfg.val_dataloader, cfg.val_evaluator = None, None, None
    cfg.test_cfg = dict(type="TestLoop")
    cfg.param_scheduler = None
    cfg.optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.001, momentum=0.9),
                             clip_grad=dict(max_norm=35, norm_type=2))
    cfg.default_hooks = dict(timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=1),
                             param_scheduler=dict(type="ParamSchedulerHook"),
                             checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=False),
                             sampler_seed=dict(type="DistSamplerSeedHook"))
    cfg.log_processor = dict(by_epoch=False)
    cfg.custom_hooks = []
    cfg.work_dir = str(work / "run")
    cfg.visualizer = dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")],
                          name=f"vis:{work}")
    cfg.randomness = dict(seed=0)
    cfg.env_cfg = dict(dist_cfg=dict(backend="gloo"))
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=16)
    return cfg


def measure(family: str, stock: str, masks: bool, extra: dict | None = None, *, data: str) -> dict:
    import torch
    from mmdet.apis import inference_detector, init_detector
    from mmengine.registry import RUNNERS

    import slim_plugins as slim
    from slim_plugins.integrations.mmdet import export_detector

    row = {"family": family, "config": stock + "".join(f" ({k}={v})" for k, v in (extra or {}).items()),
           "verdict": "", "train_widths": "", "ap_keys": "", "export_max_diff": "",
           "init_detector": "", "seconds": 0.0, "detail": ""}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="cov-mmdet-") as tmp:
        work = Path(tmp)
        try:
            cfg = family_config(stock, masks, work, data, extra)
            runner = RUNNERS.build(cfg)
            runner.train()
            scalars = sorted((work / "run").glob("*/vis_data/scalars.json"))
            logged = json.loads(scalars[-1].read_text().splitlines()[0]) if scalars else {}
            row["train_widths"] = " ".join(f"{w:g}" for w in WIDTHS if f"w{w:g}/loss" in logged)
            metrics = runner.test()
            row["ap_keys"] = " ".join(f"{w:g}" for w in WIDTHS if f"w{w:g}/coco/bbox_mAP" in metrics)
            det = runner.model.eval()
            det.cfg = cfg
            img = str(sorted(Path(data, "coco128", "val2017").glob("*.jpg"))[0])
            worst = 0.0
            for w in WIDTHS:
                out = work / f"exported_{w:g}"
                export_detector(det, cfg, w, str(out))
                plain = init_detector(str(out / "config.py"), str(out / "model.pth"), device="cpu")
                with torch.no_grad():
                    a = inference_detector(plain, img).pred_instances
                    with slim.width(w):
                        b = inference_detector(det, img).pred_instances
                x = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(0))
                with torch.no_grad():  # backbone + neck: the part the widths change
                    fa = plain.extract_feat(x)
                    with slim.width(w):
                        fb = det.extract_feat(x)
                worst = max(worst, max(float((p - q).abs().max()) for p, q in zip(fa, fb)))
                n = min(len(a.scores), len(b.scores), 20)
                if len(a.scores) != len(b.scores):
                    worst = float("inf")
                elif n:
                    worst = max(worst, float((a.bboxes[:n] - b.bboxes[:n]).abs().max()),
                                float((a.scores[:n] - b.scores[:n]).abs().max()))
            row["export_max_diff"] = f"{worst:.2e}"
            cfg_path = work / "slim_config.py"
            cfg.dump(str(cfg_path))
            ck = work / "run" / "iter_1.pth"
            again = init_detector(str(cfg_path), str(ck), device="cpu")
            row["init_detector"] = "slimmable" if any(
                type(m).__name__.startswith("Slim") for m in again.modules()) else "plain"
            ok = (row["train_widths"] == row["ap_keys"] == " ".join(f"{w:g}" for w in WIDTHS) and worst <= 1e-4
                  and row["init_detector"] == "slimmable")
            row["verdict"] = "exact" if ok else "FAIL"
            if not ok:
                row["detail"] = f"train {row['train_widths']!r}, AP {row['ap_keys']!r}, export diff {worst:.2e}"
        except Exception as e:  # noqa: BLE001  the table records every outcome
            record_failure(row, e)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", help="families whose name contains one of these (case-insensitive)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "coverage_mmdet.csv"))
    p.add_argument("--merge", action="store_true", help="with --only: update / add those rows of --out")
    args = p.parse_args(argv)
    data = os.environ.get("SLIM_DATA", str(REPO.parent / "shared" / "data"))
    fams = [f for f in FAMILIES if not args.only or any(o.lower() in f[0].lower() for o in args.only)]
    rows = []
    for fam in fams:
        r = measure(*fam, data=data)
        print(json.dumps(r), flush=True)
        rows.append(r)
    if not args.only:
        write_table(args.out, rows)
    elif args.merge:
        import csv

        with open(args.out, newline="") as f:
            old = list(csv.DictReader(f))
        fresh = {r["family"]: {k: str(v) for k, v in r.items()} for r in rows}
        merged = [fresh.pop(r["family"], r) for r in old] + list(fresh.values())
        write_table(args.out, merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
