"""`slim train` plus what only the CIFAR-10 reproduction needs, as hooks into the timm trainer::

    python experiments/cifar10/train.py RUN_CONFIG.yaml

Keys of a run config on top of the trainer's (timm train.py + slimmable keys):

- ``cache_images: true``: decode every image once into a uint8 ``.npy`` cache and memory-map it (a 32x32 JPEG
  decode costs more than the CPU schedule's augmentation).
- ``curve_interval: N`` / ``curve_samples: M``: every N updates, top-1 on the training batches since the last point
  and on M test images, per tracked width -> ``curves.csv`` (S-Nets Fig. 2); the epoch's training-batch top-1 per
  width goes to summary.csv (``train_top1_w<width>``).
- ``slimmable: false`` with ``widths: [w]``: the individually trained network at width w, with the slimmable
  net's channel rounding (a one-switch S-Net, so its architecture equals the S-Net's switch).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

EXPERIMENT_KEYS = {"cache_images": False, "curve_interval": None, "curve_samples": 2000, "slimmable": True}


def load_image_cache(folder: Path, log=print):
    """Every image of an ImageFolder tree decoded once (timm's ``ImageDataset``) into a uint8 ``.npy`` cache next to
    the extracted tree, memory-mapped: an ``ArrayImageDataset`` of ``(PIL image, target)``.

    Raises:
        ValueError: the images do not all have the same size.
    """
    from timm.data import create_dataset

    from slim_plugins.integrations.timm.data import ArrayImageDataset, cache_root

    folder = Path(folder)
    if cache_root() in folder.resolve().parents:
        cdir = folder.parent
    else:
        key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
        cdir = cache_root() / f"{folder.parent.name}-{folder.name}-{key}"
    img_p, tgt_p, cls_p = (cdir / f"{folder.name}_images.npy", cdir / f"{folder.name}_targets.npy",
                           cdir / f"{folder.name}_classes.json")
    if not (img_p.is_file() and tgt_p.is_file() and cls_p.is_file()):
        ds = create_dataset("", root=str(folder), search_split=False, is_training=False)
        log(f"decoding {len(ds)} images of {folder} into {img_p} (once)")
        first = np.asarray(ds[0][0])
        images = np.empty((len(ds), *first.shape), dtype=np.uint8)
        targets = np.empty(len(ds), dtype=np.int64)
        for i in range(len(ds)):
            img, t = ds[i][:2]
            a = np.asarray(img)
            if a.shape != first.shape:
                raise ValueError(f"image {i} of {str(folder)!r} is {a.shape}, the first is {first.shape}: the cache "
                                 "needs equal sizes; set cache_images: false")
            images[i], targets[i] = a, t
        classes = sorted(ds.reader.class_to_idx, key=ds.reader.class_to_idx.get)
        cdir.mkdir(parents=True, exist_ok=True)
        for path, write in ((img_p, lambda f: np.save(f, images)), (tgt_p, lambda f: np.save(f, targets)),
                            (cls_p, lambda f: f.write(json.dumps(classes).encode()))):
            fd, tmp = tempfile.mkstemp(dir=cdir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
    return ArrayImageDataset(np.load(img_p, mmap_mode="r"), np.load(tgt_p), json.loads(cls_p.read_text()))


def cached_datasets(cfg, splits, log):
    """The trainer's ImageFolder splits, decoded into the image cache."""
    from slim_plugins.integrations.timm.data import prepare_split

    return {s: load_image_cache(prepare_split(cfg["data_dir"], cfg["train_split" if s == "train" else "val_split"]),
                                log=log) for s in splits}


class Curves:
    """Learning curves (S-Nets Fig. 2): every ``interval`` updates, top-1 of each tracked width on the training
    batches since the last point and on ``samples`` test images -> ``curves.csv``; per epoch the training-batch
    top-1 -> summary.csv."""

    keep_outputs = True

    def __init__(self, interval, samples, datasets):
        self.interval, self.samples, self.datasets = interval, samples, datasets
        self.loader, self.since, self.epoch_hits = None, {}, {}

    def after_update(self, run, result, target):
        from slim_plugins.integrations.timm.data import subset_indices
        from slim_plugins.integrations.timm.train import make_loader

        if target.ndim == 1:  # (mixup gives soft targets: no hits)
            for w in run.tracked_widths:
                out = result.outputs.get(w)
                if out is not None:
                    hit = int((out.argmax(-1) == target).sum())
                    for acc in (self.since, self.epoch_hits):
                        h, n = acc.get(w, (0, 0))
                        acc[w] = (h + hit, n + len(target))
        if not self.interval or not run.tracked_widths or run.num_updates % self.interval:
            return
        if self.loader is None:
            cfg, val = run.cfg, self.datasets()["val"]
            val_idx = subset_indices(len(val), cfg["val_num_samples"], cfg["seed"])
            idx = val_idx[subset_indices(len(val_idx), min(self.samples, len(val_idx)), cfg["seed"] + 2)]
            self.loader = make_loader(cfg, val, idx[run.rank::run.world], device=run.device)
        ev = run.validate(run.tracked_widths, self.loader)
        if run.main:
            row = {"iteration": run.num_updates, "epoch": round(run.num_updates / run.updates_per_epoch, 4),
                   "lr": run.lr(),
                   **{f"train_top1_w{w:g}": round(100.0 * h / max(1, n), 3) for w, (h, n) in self.since.items()},
                   **{f"test_top1_w{w:g}": round(ev[w]["top1"], 3) for w in run.tracked_widths}}
            path = Path(run.output) / "curves.csv"
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
        self.since = {}

    def epoch_metrics(self, run):
        out = {f"top1_w{w:g}": round(100.0 * h / n, 3) for w, (h, n) in sorted(self.epoch_hits.items()) if n}
        self.epoch_hits = {}
        return out


def main(argv=None) -> int:
    from slim_plugins.config import parse_overrides
    from slim_plugins.integrations.timm.train import build_datasets, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    cfg = {**yaml.safe_load(Path(a.config).read_text()), **parse_overrides(a.set)}
    exp = {k: cfg.pop(k, v) for k, v in EXPERIMENT_KEYS.items()}
    if not exp["slimmable"] and len(cfg.get("widths") or []) != 1:
        raise SystemExit(f"slimmable: false trains one width; give widths: [w], got {cfg.get('widths')}")
    loaded = {}

    def datasets(c=None, splits=("train", "val"), log=print):
        if not loaded:
            loaded.update((cached_datasets if exp["cache_images"] else build_datasets)(c, splits, log))
        return loaded

    hooks = [Curves(exp["curve_interval"], exp["curve_samples"], datasets)] if exp["curve_interval"] else []
    train(cfg, hooks=hooks, datasets_fn=datasets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
