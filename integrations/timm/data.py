"""Datasets of the timm trainer: timm ImageFolder trees (extracted once from ``<split>.tar.gz``) and the embedded
scikit-learn digits job (in memory as uint8 arrays).

Every dataset here returns ``(PIL image, class index)`` with no transform; :class:`TransformSubset` applies the
timm transform of one loader (``timm.data.create_loader`` sets its ``transform``), so the training split can
feed a training loader (augmentation) and a calibration loader (eval transform) at once.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from slim_plugins.errors import ConfigError

from slim_plugins.config import default_data_root
__all__ = ["ArrayImageDataset", "TransformSubset", "cache_root", "prepare_split", "build_datasets", "make_loader",
           "digits_datasets", "subset_indices", "DIGITS_MEAN", "DIGITS_STD"]

_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def cache_root() -> Path:
    """``$SLIM_CACHE`` or ``~/.cache/slim_plugins``: extracted archives and decoded image caches live here."""
    return Path(os.environ.get("SLIM_CACHE") or Path.home() / ".cache" / "slim_plugins")


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images held in memory as a uint8 array ``(N, H, W, 3)`` (or a read-only memory map of a ``.npy`` file).

    ``dataset[i]`` is ``(PIL.Image RGB, int target)``: timm's PIL transforms then run unchanged, at a few
    microseconds per 32x32 image instead of a JPEG decode.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: Sequence[str]):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets, self.classes = images, np.asarray(targets, dtype=np.int64), list(classes)
        self.transform = None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(np.ascontiguousarray(self.images[i]))
        return (self.transform(img) if self.transform is not None else img), int(self.targets[i])


class TransformSubset(torch.utils.data.Dataset):
    """``base[indices[i]]`` with this view's own ``transform`` (the base dataset must return PIL images).

    ``timm.data.create_loader`` assigns ``.transform``; two views of one base never share a transform.
    """

    def __init__(self, base, indices: Sequence[int] | None = None, transform=None):
        self.base = base
        self.indices = np.arange(len(base)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, target = self.base[int(self.indices[i])][:2]
        return (self.transform(img) if self.transform is not None else img), target


def subset_indices(n: int, num: int | None, seed: int = 0) -> np.ndarray:
    """A deterministic random subset of ``range(n)`` of size ``num`` (all of it, in order, when ``num`` is None or
    >= n), sorted so that the image cache is read in order."""
    if num is None or num >= n:
        return np.arange(n)
    if num <= 0:
        raise ValueError(f"subset size must be positive, got {num}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[:num])


# ---- ImageFolder trees from archives ---------------------------------------------------------------------------
def _archive(data_dir: Path, split: str) -> Path | None:
    for suf in _TAR_SUFFIXES:
        p = data_dir / f"{split}{suf}"
        if p.is_file():
            return p
    return None


def _cache_dir_for(data_dir: Path) -> Path:
    key = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:10]
    return cache_root() / f"{data_dir.resolve().name or 'data'}-{key}"


def prepare_split(data_dir: str, split: str) -> Path:
    """The ImageFolder folder of ``split`` (``<class>/<image>``) under ``data_dir``.

    ``data_dir/<split>/`` is used as it is; otherwise ``data_dir/<split>.tar.gz`` (``.tgz``, ``.tar``) is extracted
    once into ``cache_root()/<data_dir name>-<hash>/<split>`` (into a temporary folder, then renamed: a crash never
    leaves a half tree). A changed archive (size or mtime) is extracted again.

    Raises:
        FileNotFoundError: neither the folder nor an archive exists (the message lists what was looked for).
    """
    root = Path(data_dir)
    folder = root / split
    if folder.is_dir():
        return folder
    arc = _archive(root, split)
    if arc is None:
        raise FileNotFoundError(
            f"no split {split!r} under data_dir {str(root)!r}: expected a folder {split}/<class>/<image> or an "
            f"archive {split}.tar.gz; set data_dir (or $SLIM_DATA) to the dataset root")
    dest_root = _cache_dir_for(root)
    dest = dest_root / split
    stamp = dest_root / f".{split}.source"
    st = arc.stat()
    source = f"{arc.resolve()} {st.st_size} {int(st.st_mtime)}"
    if dest.is_dir() and stamp.is_file() and stamp.read_text() == source:
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_root, prefix=f".extract-{split}-"))
    try:
        with tarfile.open(arc) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # Python < 3.11.4
                tf.extractall(tmp)  # noqa: S202
        inner = tmp / split if (tmp / split).is_dir() else tmp
        if dest.is_dir():  # stale copy of an older archive: replace it and its decoded cache
            shutil.rmtree(dest, ignore_errors=True)
            for p in dest_root.glob(f"{split}_*"):
                p.unlink()
        try:
            os.rename(inner, dest)
        except OSError:
            if not dest.is_dir():  # another process won the race: use its copy
                raise
        _atomic_write_text(stamp, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _atomic_write_text(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- the embedded default: scikit-learn digits -----------------------------------------------------------------
DIGITS_MEAN = (0.2, 0.2, 0.2)  # the upsampled digits are mostly black background
DIGITS_STD = (0.33, 0.33, 0.33)


def digits_datasets(size: int = 16, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's handwritten digits (1797 grey 8x8 images, 10 classes, shipped with the package: no
    download), upsampled bilinearly to ``size`` x ``size`` RGB uint8, split stratified and deterministically.

    Returns:
        ``(train, test)`` :class:`ArrayImageDataset` (1437 / 360 images at the default fraction).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    grey = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey])
    rgb = np.repeat(up[..., None], 3, axis=-1)
    idx = np.arange(len(rgb))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)
    classes = [str(c) for c in range(10)]
    tr, te = np.sort(tr), np.sort(te)
    return (ArrayImageDataset(rgb[tr], d.target[tr], classes), ArrayImageDataset(rgb[te], d.target[te], classes))


# ---- the trainer's datasets and loaders ------------------------------------------------------------------------------
def build_datasets(cfg: dict, splits=("train", "val"), log=print) -> dict:
    """``{"train"|"val": dataset of (PIL image, target)}``: the embedded digits (``dataset: digits``), an
    ImageFolder under ``data_dir`` (``<split>/`` or ``<split>.tar.gz``, extracted once into the cache), or any
    other ``timm.data.create_dataset`` name.

    Raises:
        FileNotFoundError: no data root / split (names what was looked for).
    """
    from timm.data import create_dataset

    if cfg["dataset"].lower() == "digits":
        train, val = digits_datasets(size=cfg["input_size"][1] if cfg["input_size"] else 16, seed=0)
        return {s: {"train": train, "val": val}[s] for s in splits}
    data_dir = cfg["data_dir"] or os.path.join(default_data_root(), "cifar10")
    if not os.path.isdir(data_dir) and not cfg["dataset_download"]:
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist; set data_dir in the config or $SLIM_DATA "
                                "(or run `slim train --default` for the embedded digits job)")
    out = {}
    for s in splits:
        split = cfg["train_split"] if s == "train" else cfg["val_split"]
        mode = cfg["input_img_mode"] or ("L" if (cfg["input_size"] or [cfg["in_chans"] or 3])[0] == 1 else "RGB")
        kw = dict(class_map=cfg["class_map"], download=cfg["dataset_download"], input_img_mode=mode,
                  input_key=cfg["input_key"], target_key=cfg["target_key"],
                  trust_remote_code=cfg["dataset_trust_remote_code"])
        if cfg["dataset"] in ("", "folder", "imagefolder"):
            alternatives = {"validation": ("val", "test"), "val": ("validation", "test"), "test": ("val",)}
            for i, cand in enumerate((split, *alternatives.get(split, ()))):
                try:
                    root = prepare_split(data_dir, cand)
                    break
                except FileNotFoundError:
                    if i == len(alternatives.get(split, ())):
                        raise
            out[s] = create_dataset("", root=str(root), search_split=False, **kw)
        else:
            out[s] = create_dataset(cfg["dataset"], root=data_dir, split=split, is_training=s == "train", **kw)
        if isinstance(out[s], torch.utils.data.IterableDataset):
            raise ConfigError(f"dataset {cfg['dataset']!r} is iterable (a stream); the trainer subsets, calibrates "
                              "and evaluates per width on map-style datasets (ImageFolder, torch/..., hfds/...)")
    return out


def _data_config(cfg: dict, model) -> dict:
    from timm.data import resolve_data_config

    dc = resolve_data_config({k: cfg[k] for k in ("input_size", "in_chans", "interpolation", "mean", "std",
                                                  "crop_pct", "crop_mode")}, model=model)
    return {"input_size": [int(x) for x in dc["input_size"]], "interpolation": dc["interpolation"],
            "mean": [float(x) for x in dc["mean"]], "std": [float(x) for x in dc["std"]],
            "crop_pct": float(dc["crop_pct"]), "crop_mode": dc["crop_mode"]}


def make_loader(cfg: dict, dataset, indices=None, training: bool = False, batch_size: int | None = None,
                device="cpu", distributed: bool = False, workers: int | None = None):
    """A ``timm.data.create_loader`` over ``dataset[indices]`` with the resolved config's transforms: training
    augmentation and shuffling (``training=True``), or the eval transform in order. Batches are
    ``(x: (B, C, H, W) float32, y: (B,) int64)``."""
    from timm.data import create_loader

    view = TransformSubset(dataset, np.arange(len(dataset)) if indices is None else indices)
    kw = dict(input_size=tuple(cfg["input_size"]), batch_size=batch_size or cfg["validation_batch_size"] or
              cfg["batch_size"], is_training=training, use_prefetcher=False, interpolation=cfg["interpolation"],
              mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"],
              num_workers=cfg["workers"] if workers is None else workers, distributed=distributed,
              pin_memory=cfg["pin_mem"], device=torch.device(device), worker_seeding=cfg["worker_seeding"],
              use_multi_epochs_loader=cfg["use_multi_epochs_loader"] and training,
              persistent_workers=False)  # fresh workers seeded from the restored RNG: resume is exact
    if training:  # timm train.py's training loader arguments
        kw.update(no_aug=cfg["no_aug"], re_prob=cfg["reprob"], re_mode=cfg["remode"], re_count=cfg["recount"],
                  scale=tuple(cfg["scale"]), ratio=tuple(cfg["ratio"]), hflip=cfg["hflip"], vflip=cfg["vflip"],
                  color_jitter=cfg["color_jitter"], color_jitter_prob=cfg["color_jitter_prob"],
                  grayscale_prob=cfg["grayscale_prob"], gaussian_blur_prob=cfg["gaussian_blur_prob"],
                  auto_augment=cfg["aa"], num_aug_repeats=cfg["aug_repeats"], train_crop_mode=cfg["train_crop_mode"],
                  interpolation=cfg["interpolation"] if cfg["no_aug"] or not cfg["train_interpolation"]
                  else cfg["train_interpolation"])
    return create_loader(view, **kw)
