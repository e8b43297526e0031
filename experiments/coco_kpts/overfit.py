"""S-Net Keypoint R-CNN on $SLIM_DATA/coco_kpts: train on the 4 training images (7 persons), then box and keypoint
AP at every switch on those images and on the 4 validation images (14 persons). A smoke-scale check that every
width learns keypoints, not a reproduction of S-Nets Table 5 (no ImageNet weights, no COCO here).

It runs mmengine's Runner on `configs/mmdet/keypoint-rcnn_r50_fpn_s-net_coco-kpts.py` with the overrides below and
writes `results/coco_kpts/<tag>.csv` plus a markdown table on stdout.

    SLIM_DATA=... .venv/bin/python experiments/coco_kpts/overfit.py --epochs 60 --depth 18 --head 64 2 --tag cpu
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "mmdet", "keypoint-rcnn_r50_fpn_s-net_coco-kpts.py")
WIDTHS = [0.25, 0.5, 0.75, 1.0]


def _cfg(args, work_dir):
    from mmengine.config import Config

    cfg = Config.fromfile(CONFIG)
    cfg.work_dir = work_dir
    cfg.visualizer.name = f"vis:{work_dir}"
    if args.depth != 50:  # a BasicBlock ResNet: stage outputs 64..512
        cfg.model.backbone.depth = args.depth
        cfg.model.neck.in_channels = [64, 128, 256, 512]
    ch, n = args.head
    cfg.model.roi_head.keypoint_head.update(conv_out_channels=ch, num_convs=n)
    cfg.model.train_cfg.rcnn.sampler.num = 64  # 16 positives per image at most: the keypoint head's RoIs
    cfg.model.test_cfg.rcnn.update(max_per_img=20, score_thr=0.01)  # COCO keypoint AP counts the 20 best
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=args.epochs, val_interval=10_000)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=20)]
    cfg.optim_wrapper.optimizer.lr = args.lr
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=args.epochs)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=10)
    cfg.randomness = dict(seed=args.seed)
    for key in ("train_dataloader", "test_dataloader"):
        for t in cfg[key].dataset.pipeline:
            if t["type"] == "KeypointResize":
                t["scale"] = tuple(args.scale)
    return cfg


def _test(cfg, split: str) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.load_from = os.path.join(cfg.work_dir, f"epoch_{cfg.train_cfg.max_epochs}.pth")
    cfg.visualizer.name = f"vis:{cfg.work_dir}:{split}"
    if split == "train":
        cfg.test_dataloader.dataset.update(ann_file="annotations/person_keypoints_train.json",
                                           data_prefix=dict(img="train/"))
        cfg.test_evaluator.ann_file = cfg.test_evaluator.ann_file.replace("_val.json", "_train.json")
    from mmengine.registry import RUNNERS

    return RUNNERS.build(cfg).test()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60, help="2 iterations (batch 2) per epoch")
    p.add_argument("--depth", type=int, default=18, choices=(18, 34, 50))
    p.add_argument("--head", type=int, nargs=2, default=(64, 2), metavar=("CHANNELS", "CONVS"),
                   help="keypoint head conv width and depth (the paper's: 512 8)")
    p.add_argument("--scale", type=int, nargs=2, default=(256, 192), help="KeypointResize scale (long, short)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", default=os.path.join(REPO, "results", "coco_kpts"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import slim_plugins.integrations.mmdet  # noqa: F401
    from mmengine.registry import RUNNERS

    cfg = _cfg(args, os.path.join(REPO, "work_dirs", "coco_kpts_overfit", args.tag))
    t0 = time.time()
    RUNNERS.build(cfg).train()
    train_s = time.time() - t0
    res = {s: _test(cfg, s) for s in ("train", "val")}
    rows = [{"width": w, "train_s": round(train_s, 1),
             **{f"{s}_{k}_AP": 100 * res[s].get(f"w{w:g}/coco/{k}_mAP", 0.0) for s in res
                for k in ("keypoints", "bbox")}} for w in WIDTHS]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.csv")
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"# {args.epochs} epochs ({2 * args.epochs} iterations), ResNet-{args.depth}, keypoint head "
          f"{args.head[1]} x {args.head[0]}, scale {tuple(args.scale)}, lr {args.lr}, {args.threads} threads, "
          f"{train_s:.0f} s training")
    print("| width | keypoint AP, train images | box AP, train images | keypoint AP, val images | box AP, val images |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']:g} | {r['train_keypoints_AP']:.1f} | {r['train_bbox_AP']:.1f} | "
              f"{r['val_keypoints_AP']:.1f} | {r['val_bbox_AP']:.1f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
