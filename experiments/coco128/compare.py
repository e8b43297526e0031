"""S-Net Faster R-CNN vs four individually trained Faster R-CNNs (ResNet-50 0.25/0.5/0.75/1.0x) on coco128, the
same schedule for every run (S-Nets Table 5 at smoke scale: 100 train / 100 val images, from scratch, CPU).

Each run is mmengine's Runner on the repository's configs: `configs/mmdet/faster-rcnn_r50_fpn_s-net_coco128.py`
(SlimRunner, every switch per iteration) and `configs/mmdet/faster-rcnn_r50_fpn_coco128.py` with
`base_channels = 64 w` (a plain mmdet detector per width). Box AP on the 100 val images (and, since a few CPU
epochs from scratch detect little on unseen images, on the training images too) goes to
`results/coco128/<tag>.csv` and a markdown table on stdout.

    SLIM_DATA=... .venv/bin/python experiments/coco128/compare.py --epochs 2 --scale 320 192 --tag cpu_2ep
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs", "mmdet")
WIDTHS = [0.25, 0.5, 0.75, 1.0]


def _cfg(name, work_dir, args, width=None):
    from mmengine.config import Config

    cfg = Config.fromfile(os.path.join(CONFIGS, name))
    cfg.work_dir = work_dir
    cfg.visualizer.name = f"vis:{work_dir}"
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=args.epochs, val_interval=10_000)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=50)]
    cfg.optim_wrapper.optimizer.lr = args.lr
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=args.epochs)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=25)
    cfg.randomness = dict(seed=args.seed)
    for key in ("train_dataloader", "test_dataloader"):
        dl = cfg[key]
        dl.num_workers, dl.persistent_workers = 0, False
        if args.images:
            dl.dataset.indices = args.images
        for t in dl.dataset.pipeline:
            if t["type"] == "Resize":
                t["scale"] = tuple(args.scale)
    if width is not None:  # the individually trained detector of this width: an mmdet ResNet with base 64 w
        c = int(64 * width)
        cfg.model.backbone.base_channels = c
        cfg.model.neck.in_channels = [4 * c, 8 * c, 16 * c, 32 * c]
    return cfg


def _runner(cfg):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    return RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)  # as mmdet's tools/train.py


def _test(cfg, split: str) -> dict:
    """mmengine metrics of the trained checkpoint on the val images or on the training images."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.load_from = os.path.join(cfg.work_dir, f"epoch_{cfg.train_cfg.max_epochs}.pth")
    cfg.visualizer.name = f"vis:{cfg.work_dir}:{split}"
    if split == "train":
        t = cfg.test_dataloader.dataset
        t.type, t.ann_file, t.data_prefix = "CocoDataset", "annotations/instances_train2017.json", dict(
            img="train2017/")
    return _runner(cfg).test()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--scale", type=int, nargs=2, default=(320, 192), help="Resize scale (long, short)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=None, help="first N images of each split (a quick check)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", default=os.path.join(REPO, "results", "coco128"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import slim_plugins.integrations.mmdet  # noqa: F401

    root = os.path.join(REPO, "work_dirs", "coco128_compare", args.tag)
    runs = [("S-Net", None, "faster-rcnn_r50_fpn_s-net_coco128.py", "s-net")]
    runs += [("individual", w, "faster-rcnn_r50_fpn_coco128.py", f"individual_{w:g}") for w in WIDTHS]
    rows = []
    for model, width, name, sub in runs:
        t0 = time.time()
        cfg = _cfg(name, os.path.join(root, sub), args, width=width)
        _runner(cfg).train()
        train_s = time.time() - t0
        res = {s: _test(cfg, s) for s in ("val", "train")}
        for w in (WIDTHS if width is None else [width]):
            key = f"w{w:g}/coco/bbox_mAP" if width is None else "coco/bbox_mAP"
            rows.append({"model": model, "width": w, "train_s": round(train_s, 1),
                         **{f"{s}_bbox_AP": 100 * res[s].get(key, 0.0) for s in res}})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.csv")
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"# {args.epochs} epochs, scale {args.scale}, lr {args.lr}, seed {args.seed}, {args.threads} threads")
    print("| width | S-Net val AP | individual val AP | S-Net train-image AP | individual train-image AP |")
    print("|---|---|---|---|---|")
    for w in WIDTHS:
        s = next(r for r in rows if r["model"] == "S-Net" and r["width"] == w)
        i = next(r for r in rows if r["model"] == "individual" and r["width"] == w)
        print(f"| {w:g} | {s['val_bbox_AP']:.1f} | {i['val_bbox_AP']:.1f} | {s['train_bbox_AP']:.1f} | "
              f"{i['train_bbox_AP']:.1f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
