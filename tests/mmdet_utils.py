"""Helpers of the mmdet tests: the repository's coco128 configs, shrunk to a few real images at a small scale so a
CPU runs several iterations of a ResNet-50 Faster / Mask R-CNN at every width in seconds."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "mmdet"


def small_cfg(name: str, work_dir, n_train: int = 4, n_val: int = 4, scale=(160, 128), iters: int = 2,
              depth: int = 50, ckpt_interval: int | None = None, **slimmable):
    """``configs/mmdet/<name>`` with ``n_train`` / ``n_val`` images, images resized to ``scale``, an iteration-based
    loop of ``iters`` iterations, no LR schedule, no workers, checkpoints every iteration into ``work_dir``, and a
    ResNet of ``depth``; a checkpoint at the end (or every ``ckpt_interval``), no validation during training."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(CONFIGS / name))
    if depth != 50:  # a BasicBlock ResNet: stage outputs 64..512
        cfg.model.backbone.depth = depth
        cfg.model.neck.in_channels = [64, 128, 256, 512]
    for key, n in (("train_dataloader", n_train), ("val_dataloader", n_val), ("test_dataloader", n_val)):
        dl = cfg[key]
        dl.num_workers, dl.persistent_workers, dl.dataset.indices = 0, False, n
        for t in dl.dataset.pipeline:
            if t["type"] in ("Resize", "KeypointResize"):
                t["scale"] = scale
        if key != "train_dataloader":
            dl.batch_size = 2
    # fewer proposals / sampled RoIs: the shared 1024-d box head dominates a CPU step at the stock 2000 / 512
    m = cfg.model
    m.train_cfg.rpn_proposal.update(nms_pre=300, max_per_img=100)
    m.train_cfg.rcnn.sampler.num = 64
    m.test_cfg.rpn.update(nms_pre=300, max_per_img=100)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=10_000)
    cfg.param_scheduler = None
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=ckpt_interval or iters, by_epoch=False,
                                        max_keep_ckpts=3)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # the tests call runner.test() where they evaluate
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.log_processor = dict(by_epoch=False)
    cfg.work_dir = str(work_dir)
    # mmengine's visualizer is a per-name singleton: a second runner in this process would write its scalars into
    # the first one's folder
    cfg.visualizer.name = f"visualizer:{work_dir}"
    cfg.randomness = dict(seed=0)
    if slimmable:
        from slim_plugins.integrations.mmdet.model import set_slimmable_entry, slimmable_entry

        set_slimmable_entry(cfg, dict(slimmable_entry(cfg), **slimmable))
    return cfg


def data_root() -> str:
    return os.environ.get("SLIM_DATA", str(REPO.parent / "shared" / "data"))
