"""The timm trainer behind ``slim train`` (and ``slim eval / calibrate / export / profile`` on its checkpoints).

Everything but the width machinery comes from timm and torch: ``timm.create_model`` (the adapter's ``s_`` / ``us_``
entry points or :func:`~slim_plugins.integrations.timm.create_slim_model`), ``timm.data.create_loader`` (timm
transforms, DistributedSampler), ``timm.optim.create_optimizer_v2``, ``timm.scheduler.create_scheduler_v2``,
``timm.loss`` and ``timm.data.Mixup``. The training step is :class:`slim_plugins.MultiWidthStep` (all switches for
S-Nets; sandwich rule + inplace distillation for US-Nets); after training, :func:`slim_plugins.calibrate_bn`
computes BN post-statistics on training images, every requested width is evaluated, profiled
(:func:`slim_plugins.count_mflops`, multiply-adds) and exported (:func:`slim_plugins.export`).

Run directory (``output``)::

    config.yaml        the resolved config          last.pth.tar     checkpoint (each epoch; calibrated at the end)
    summary.csv        per-epoch loss / lr / top-1  spectrum.csv     width, mflops, params_m, top1, top5
    spectrum.png       FLOPs-accuracy plot          exported/        width_<w>.pth (+ .onnx) plain timm models
    tb/                TensorBoard scalars per width
    curves.csv         (curve_interval set) every N updates: training-batch and test top-1 per tracked width

Config keys: :data:`DEFAULTS` (timm ``train.py`` names plus the slimmable keys); :data:`DIGITS_JOB` is the
embedded default job (scikit-learn digits). DDP: launch with ``torchrun --nproc_per_node N -m slim_plugins.cli
train CONFIG`` (gloo on CPU, nccl on GPU); only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import difflib
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import slim_plugins as slim
from slim_plugins.cli import (ConfigError, default_data_root, expand_env, parse_overrides, plot_spectrum,
                              print_table, write_spectrum_csv)
from slim_plugins.width import SAMPLING_RULES, WidthSpec

from . import PAPER_SWITCHES, create_slim_model, fixed_layers
from .data import (ArrayImageDataset, TransformSubset, digits_datasets, load_image_cache, prepare_split,
                   subset_indices, DIGITS_MEAN, DIGITS_STD)

__all__ = ["DEFAULTS", "DIGITS_JOB", "resolve_config", "build_model", "build_datasets", "make_loader",
           "resolve_widths",
           "train", "evaluate", "model_from_checkpoint", "cmd_train", "cmd_eval", "cmd_calibrate", "cmd_export",
           "cmd_profile", "cmd_serve"]

#: Every supported config key with its default (timm train.py names and defaults where timm has the key).
DEFAULTS: dict = {
    "framework": "timm",
    # run
    "output": None, "experiment": None, "seed": 42, "device": "auto", "log_interval": 50, "tensorboard": True,
    # data
    "dataset": "", "data_dir": None, "train_split": "train", "val_split": "validation", "cache_images": False,
    "train_num_samples": None, "val_num_samples": None, "workers": 4, "pin_mem": False,
    # model
    "model": "us_mobilenetv2_100", "pretrained": False, "num_classes": None, "in_chans": None, "drop": 0.0,
    "drop_path": None, "bn_momentum": None, "bn_eps": None, "model_kwargs": {}, "channels_last": False,
    "head_init_scale": None,
    # slimmable (S-Nets: widths; US-Nets: width_range)
    "slimmable": True, "widths": None, "width_range": None, "divisor": 8, "bn": "auto", "output_averaging": False,
    "cifar_stem": False, "fixed_layers": [], "num_widths": 4, "sample_rule": None, "inplace_distill": False,
    "distill_temperature": 1.0, "eval_widths": None, "export_widths": None, "calib_samples": 2000,
    "calib_method": "exact", "onnx": False, "fuse_bn": False,
    # learning curves: every curve_interval updates, top-1 of the tracked widths on curve_samples test images
    "curve_interval": None, "curve_samples": 2000,
    # input and augmentation
    "input_size": None, "img_size": None, "mean": None, "std": None, "interpolation": "", "crop_pct": None,
    "crop_mode": None, "train_crop_mode": None, "no_aug": False, "scale": [0.08, 1.0], "ratio": [0.75, 1.3333333],
    "hflip": 0.5, "vflip": 0.0, "color_jitter": 0.4, "aa": None, "reprob": 0.0, "remode": "pixel", "recount": 1,
    "mixup": 0.0, "cutmix": 0.0, "cutmix_minmax": None, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
    "mixup_mode": "batch", "mixup_off_epoch": 0, "smoothing": 0.1,
    # optimizer
    "opt": "sgd", "opt_eps": None, "opt_betas": None, "momentum": 0.9, "weight_decay": 2e-5, "clip_grad": None,
    "clip_mode": "norm", "lr": None, "lr_base": 0.1, "lr_base_size": 256, "lr_base_scale": "",
    "batch_size": 128, "validation_batch_size": None, "epochs": 300, "amp": False, "amp_dtype": "float16",
    # scheduler
    "sched": "cosine", "sched_on_updates": False, "min_lr": 0.0, "warmup_lr": 1e-5, "warmup_epochs": 5,
    "warmup_prefix": False, "cooldown_epochs": 0, "decay_epochs": 90, "decay_milestones": [90, 180, 270],
    "decay_rate": 0.1, "patience_epochs": 10,
}

_ALIASES = {"data": "data_dir", "drop_rate": "drop", "drop_path_rate": "drop_path", "re_prob": "reprob"}

#: The embedded default job: scikit-learn digits at 16x16, a cifar-stem US-MobileNetV2 0.35-1.0x trained with the
#: sandwich rule (n=4) and inplace distillation. About a minute on 2 CPU cores.
DIGITS_JOB: dict = {
    "dataset": "digits", "model": "us_mobilenetv2_100", "num_classes": 10, "cifar_stem": True,
    "width_range": [0.35, 1.0], "num_widths": 4, "inplace_distill": True, "eval_widths": [0.35, 0.5, 0.75, 1.0],
    "input_size": [3, 16, 16], "mean": list(DIGITS_MEAN), "std": list(DIGITS_STD), "interpolation": "bilinear",
    "crop_pct": 1.0, "scale": [0.7, 1.0], "ratio": [0.85, 1.15], "hflip": 0.0, "color_jitter": 0.0,
    "head_init_scale": 0.0, "channels_last": True, "opt": "adamw", "lr": 4e-3, "weight_decay": 0.02,
    "sched": "cosine", "warmup_epochs": 0, "min_lr": 1e-5, "epochs": 10, "batch_size": 64, "smoothing": 0.0,
    "workers": 0, "log_interval": 11, "calib_samples": 2000, "seed": 0,
}

_INT_KEYS = ("seed", "log_interval", "curve_samples", "workers", "batch_size", "epochs", "num_widths", "divisor", "recount",
             "lr_base_size", "patience_epochs", "cooldown_epochs", "mixup_off_epoch")
_FLOAT_KEYS = ("drop", "smoothing", "momentum", "weight_decay", "min_lr", "warmup_lr", "decay_rate", "hflip",
               "vflip", "reprob", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "lr_base",
               "distill_temperature", "decay_epochs", "warmup_epochs")


# ---- config ----------------------------------------------------------------------------------------------------
def _canon_keys(cfg: dict, where: str) -> dict:
    out = {}
    for k, v in cfg.items():
        k = str(k).replace("-", "_")
        k = _ALIASES.get(k, k)
        if k not in DEFAULTS and k not in ("width_spec",):
            close = difflib.get_close_matches(k, list(DEFAULTS), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"unknown config key {k!r} in {where}{hint} (supported keys: timm train.py names "
                              f"such as model, lr, epochs, batch_size, opt, sched, plus slimmable keys; see "
                              f"slim_plugins.integrations.timm.train.DEFAULTS)")
        out[k] = v
    return out


def _floats(v, key, n=None):
    if isinstance(v, (int, float)):
        v = [v]
    try:
        out = [float(x) for x in v]
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a list of numbers, got {v!r}") from None
    if n is not None and len(out) != n:
        raise ConfigError(f"{key} must have {n} numbers, got {v!r}")
    return out


def resolve_config(user: dict | None = None, overrides: dict | None = None, default: bool = False) -> dict:
    """Merge :data:`DEFAULTS`, the digits job (``default=True``), a user config and overrides; check and
    normalise every value.

    Raises:
        ConfigError: unknown key (with close matches), a value of the wrong type, widths and width_range both
            given, an unknown sampling rule or distillation loss.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if default:
        cfg.update(copy.deepcopy(DIGITS_JOB))
    cfg.update(_canon_keys(dict(user or {}), "the config"))
    cfg.update(_canon_keys(dict(overrides or {}), "the overrides"))
    cfg.pop("width_spec", None)
    for k in _INT_KEYS:
        if cfg[k] is not None:
            try:
                if float(cfg[k]) != int(float(cfg[k])):
                    raise ValueError
                cfg[k] = int(float(cfg[k]))
            except (TypeError, ValueError):
                raise ConfigError(f"{k} must be an integer, got {cfg[k]!r}") from None
    for k in _FLOAT_KEYS + ("lr", "clip_grad", "drop_path", "opt_eps", "bn_momentum", "bn_eps", "head_init_scale"):
        if cfg.get(k) is not None:
            try:
                cfg[k] = float(cfg[k])
            except (TypeError, ValueError):
                raise ConfigError(f"{k} must be a number, got {cfg[k]!r}") from None
    if cfg["batch_size"] < 1 or cfg["epochs"] < 0:
        raise ConfigError(f"batch_size must be >= 1 and epochs >= 0, got {cfg['batch_size']}, {cfg['epochs']}")
    for k in ("widths", "width_range", "scale", "ratio", "mean", "std", "input_size", "opt_betas"):
        if cfg[k] is not None:
            cfg[k] = _floats(cfg[k], k, 2 if k in ("width_range", "scale", "ratio") else None)
    if cfg["input_size"] is not None:
        if len(cfg["input_size"]) != 3:
            raise ConfigError(f"input_size must be [C, H, W], got {cfg['input_size']}")
        cfg["input_size"] = [int(x) for x in cfg["input_size"]]
    if cfg["img_size"] is not None:
        s = cfg["img_size"]
        if isinstance(s, (list, tuple)):
            if len(s) not in (1, 2):
                raise ConfigError(f"img_size must be an int or [H, W], got {s!r}")
            s = [int(x) for x in s]
        else:
            s = [int(s)]
        cfg["input_size"] = cfg["input_size"] or [int(cfg["in_chans"] or 3), s[0], s[-1]]
        cfg["img_size"] = None
    if cfg["widths"] is not None and cfg["width_range"] is not None:
        raise ConfigError("give either widths (S-Net switches) or width_range (US-Net), not both")
    rule = cfg["sample_rule"]
    if rule is not None and rule not in SAMPLING_RULES:
        raise ConfigError(f"sample_rule {rule!r} is not one of {list(SAMPLING_RULES)}")
    d = cfg["inplace_distill"]
    if d is True:
        d = "soft_ce"  # US-Nets Section 4.2: cross-entropy against the max width's soft predictions
    elif d in (False, None, "none", "None", ""):
        d = None
    elif not isinstance(d, str):
        raise ConfigError(f"inplace_distill must be true/false or a loss name (kl, soft_ce, l1, l2), got {d!r}")
    from slim_plugins.train import DISTILL_LOSSES

    if d is not None and d not in DISTILL_LOSSES:
        raise ConfigError(f"inplace_distill loss {d!r} is not one of {sorted(DISTILL_LOSSES)} (or true/false)")
    cfg["inplace_distill"] = d
    ew = cfg["eval_widths"]
    if ew is not None and not isinstance(ew, (int, float)):
        cfg["eval_widths"] = _floats(ew, "eval_widths")
    if cfg["export_widths"] is not None and not isinstance(cfg["export_widths"], (int, float)):
        cfg["export_widths"] = _floats(cfg["export_widths"], "export_widths")
    if cfg["calib_samples"] is not None:
        cfg["calib_samples"] = int(cfg["calib_samples"])
    if cfg["curve_interval"] is not None:
        try:
            cfg["curve_interval"] = int(cfg["curve_interval"])
            if cfg["curve_interval"] < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"curve_interval must be a positive number of updates, got "
                              f"{cfg['curve_interval']!r}") from None
    if cfg["data_dir"]:
        cfg["data_dir"] = str(Path(expand_env(str(cfg["data_dir"]))).resolve())
    if cfg["output"]:
        cfg["output"] = str(Path(expand_env(str(cfg["output"]))).resolve())
    for k in ("fixed_layers",):
        cfg[k] = list(cfg[k] or [])
    if cfg["model_kwargs"] is None:
        cfg["model_kwargs"] = {}
    if not isinstance(cfg["model_kwargs"], dict):
        raise ConfigError(f"model_kwargs must be a mapping, got {cfg['model_kwargs']!r}")
    return cfg


# ---- model -----------------------------------------------------------------------------------------------------
def _split_name(name: str):
    """``us_mobilenetv2_100`` -> ("us", "mobilenetv2_100") for the adapter's registered entry points."""
    for prefix in ("us_", "s_"):
        if name.startswith(prefix) and name[len(prefix):] in PAPER_SWITCHES:
            return prefix[:-1], name[len(prefix):]
    return None, name


def build_model(cfg: dict) -> nn.Module:
    """The converted (slimmable) timm model of a resolved config, on CPU.

    ``model: us_*/s_*`` uses the adapter's timm entry points; any other timm CNN is converted with
    ``create_slim_model``. ``slimmable: false`` trains one fixed width (``widths: [w]``, default 1.0): the
    individually trained baseline of the papers.

    Raises:
        WidthError: bad widths. RuntimeError (from timm): unknown model name.
    """
    model = _build_model(cfg)
    if cfg["head_init_scale"] is not None:
        # timm's EfficientNet-family init draws the classifier from U(+-1/sqrt(num_classes)): with 10 classes the
        # initial logits have std ~4 (CE ~6.6). Scaling it (0 = zero-init) starts from uniform predictions.
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if isinstance(head, nn.Linear):
            with torch.no_grad():
                head.weight.mul_(cfg["head_init_scale"])
                if head.bias is not None:
                    head.bias.mul_(cfg["head_init_scale"])
    return model


def _build_model(cfg: dict) -> nn.Module:
    import timm

    timm_kwargs = {"pretrained": bool(cfg["pretrained"]), "num_classes": cfg["num_classes"],
                   "in_chans": cfg["in_chans"] or (cfg["input_size"][0] if cfg["input_size"] else None),
                   "drop_rate": cfg["drop"], "drop_path_rate": cfg["drop_path"], "bn_momentum": cfg["bn_momentum"],
                   "bn_eps": cfg["bn_eps"]}
    timm_kwargs = {k: v for k, v in timm_kwargs.items() if v is not None}
    timm_kwargs.update(cfg["model_kwargs"] or {})
    kind, base = _split_name(cfg["model"])
    if not cfg["slimmable"]:
        ws = cfg["widths"] or [1.0]
        if len(ws) != 1 or cfg["width_range"] is not None:
            raise ConfigError(f"slimmable: false trains one width; give widths: [w] with one value, got {ws}")
        model = timm.create_model(base, **timm_kwargs)
        if cfg["cifar_stem"]:
            from . import apply_cifar_stem

            apply_cifar_stem(model)
        model = slim.convert(model, WidthSpec.switches(ws, cfg["divisor"]),
                             fixed=[*fixed_layers(model), *cfg["fixed_layers"]],
                             bn="switchable" if cfg["bn"] == "auto" else cfg["bn"])
        if ws[0] <= 1.0:  # same channel counts as the slimmable model's switch at this width
            from . import set_expansion_units

            set_expansion_units(model)
        return model
    slim_kwargs = dict(widths=cfg["widths"], width_range=cfg["width_range"], divisor=cfg["divisor"], bn=cfg["bn"],
                       output_averaging=cfg["output_averaging"], cifar_stem=cfg["cifar_stem"])
    if kind is not None and not cfg["fixed_layers"]:
        return timm.create_model(cfg["model"], **slim_kwargs, **timm_kwargs)
    if kind is None:
        kind = "s" if cfg["widths"] is not None else "us"
    if kind == "s" and cfg["widths"] is None and cfg["width_range"] is None:
        slim_kwargs["widths"] = PAPER_SWITCHES.get(base, [0.25, 0.5, 0.75, 1.0])
    return create_slim_model(base, fixed=cfg["fixed_layers"], kind="switches" if kind == "s" else "range",
                             **slim_kwargs, **timm_kwargs)


def resolve_widths(spec: WidthSpec, widths, default_step: float = 0.05) -> list[float]:
    """Widths to evaluate: a list (validated), a step for a min..max sweep, or None (every switch / a
    ``default_step`` sweep of the range). Always sorted, narrowest first.

    Raises:
        WidthError: a width outside the spec.
    """
    if widths is None:
        widths = default_step
    if isinstance(widths, (int, float)) and not isinstance(widths, bool):
        if spec.is_switches:
            return list(spec.widths)
        if not widths > 0:
            raise ConfigError(f"a width step must be positive, got {widths}")
        ws = spec.grid(float(widths))
        if ws[-1] != spec.max:
            ws.append(spec.max)
        return ws
    return sorted({spec.validate(w) for w in widths})


def _config_widths(spec, cfg, key):
    try:
        return resolve_widths(spec, cfg[key])
    except slim.WidthError as e:
        raise slim.WidthError(f"{key}: {e}") from None


# ---- data ------------------------------------------------------------------------------------------------------
_SPLIT_ALTERNATIVES = {"validation": ("val", "test"), "val": ("validation", "test"), "test": ("val", "validation")}


def _find_split(data_dir: str, split: str):
    last = None
    for cand in (split, *_SPLIT_ALTERNATIVES.get(split, ())):
        try:
            return prepare_split(data_dir, cand)
        except FileNotFoundError as e:
            last = last or e
    raise last


def build_datasets(cfg: dict, splits=("train", "val"), log=print):
    """``{split: dataset}`` returning ``(PIL image, target)`` for ``"train"`` / ``"val"``.

    ``dataset: digits`` is the embedded scikit-learn job; otherwise timm's ImageFolder over ``data_dir`` (archives
    ``<split>.tar.gz`` extracted once into the cache), decoded into memory when ``cache_images`` is set, or any
    other ``timm.data.create_dataset`` name (e.g. ``torch/cifar10`` with a local root).

    Raises:
        FileNotFoundError: no data root / split (names what was looked for).
    """
    name = (cfg["dataset"] or "").lower()
    if name == "digits":
        size = cfg["input_size"][1] if cfg["input_size"] else 16
        train, val = digits_datasets(size=size, seed=0)
        return {"train": train, "val": val}
    data_dir = cfg["data_dir"] or os.path.join(default_data_root(), "cifar10")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist; set data_dir in the config or $SLIM_DATA "
                                "(or run `slim train --default` for the embedded digits job)")
    out = {}
    for s in splits:
        split = cfg["train_split"] if s == "train" else cfg["val_split"]
        if name in ("", "folder", "imagefolder", "image_folder"):
            folder = _find_split(data_dir, split)
            if cfg["cache_images"]:
                out[s] = load_image_cache(folder, log=log)
            else:
                from timm.data import create_dataset

                out[s] = create_dataset("", root=str(folder), search_split=False)
        else:
            from timm.data import create_dataset

            out[s] = create_dataset(cfg["dataset"], root=data_dir, split=split, is_training=s == "train")
    return out


def _num_classes(ds) -> int | None:
    if isinstance(ds, ArrayImageDataset):
        return len(ds.classes)
    reader = getattr(ds, "reader", None)
    c2i = getattr(reader, "class_to_idx", None)
    return len(c2i) if c2i else None


def _data_config(cfg: dict, model) -> dict:
    from timm.data import resolve_data_config

    args = {k: cfg[k] for k in ("input_size", "in_chans", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    dc = resolve_data_config(args, model=model)
    return {"input_size": [int(x) for x in dc["input_size"]], "interpolation": dc["interpolation"],
            "mean": [float(x) for x in dc["mean"]], "std": [float(x) for x in dc["std"]],
            "crop_pct": float(dc["crop_pct"]), "crop_mode": dc["crop_mode"]}


def make_loader(cfg: dict, dataset, indices=None, training: bool = False, batch_size: int | None = None,
                device="cpu"):
    """A timm loader over ``dataset[indices]`` (default: all of it) with the resolved config's transforms.

    ``training=True`` gives the training augmentation and shuffling; ``False`` the eval transform in order (what
    the trainer uses for BN calibration and evaluation). Batches are ``(x: (B, C, H, W) float, y: (B,) int64)``.
    """
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    bs = batch_size or cfg["validation_batch_size"] or cfg["batch_size"]
    return _loader(cfg, dataset, idx, training, bs, torch.device(device))


def _loader(cfg, dataset, indices, training: bool, batch_size: int, device, distributed=False, workers=None):
    from timm.data import create_loader

    view = TransformSubset(dataset, indices)
    workers = cfg["workers"] if workers is None else workers
    kw = dict(input_size=tuple(cfg["input_size"]), batch_size=batch_size, is_training=training,
              use_prefetcher=False, interpolation=cfg["interpolation"], mean=tuple(cfg["mean"]),
              std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], num_workers=workers,
              distributed=distributed, pin_memory=cfg["pin_mem"], device=device,
              persistent_workers=False)  # fresh workers seeded from the restored RNG: resume is exact
    if training:
        kw.update(no_aug=cfg["no_aug"], re_prob=cfg["reprob"], re_mode=cfg["remode"], re_count=cfg["recount"],
                  scale=tuple(cfg["scale"]), ratio=tuple(cfg["ratio"]), hflip=cfg["hflip"], vflip=cfg["vflip"],
                  color_jitter=cfg["color_jitter"], auto_augment=cfg["aa"], train_crop_mode=cfg["train_crop_mode"])
    return create_loader(view, **kw)


# ---- distributed / device --------------------------------------------------------------------------------------
class _Dist:
    def __init__(self, rank=0, world=1, local_rank=0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def resolve_device(spec: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (or None): ``cuda:<local rank>`` when CUDA is available, else ``cpu``."""
    if spec in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available; use device: cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def _init_distributed(cfg) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(cfg["device"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg["device"], local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank, world, local_rank), device


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.cpu().tolist()


# ---- optimizer -------------------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float):
    # No weight decay on norm parameters (S-BN keeps one row per switch: 2-D) and biases, as timm does for 1-D.
    norm_ids = {id(p) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm,
                                                                 nn.LayerNorm)) for p in m.parameters(False)}
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or id(p) in norm_ids or n in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _learning_rate(cfg, world: int) -> float:
    if cfg["lr"] is not None:
        return cfg["lr"]
    global_batch = cfg["batch_size"] * world
    ratio = global_batch / cfg["lr_base_size"]
    scale = cfg["lr_base_scale"] or ("sqrt" if any(o in cfg["opt"].lower() for o in ("ada", "lamb")) else "linear")
    return cfg["lr_base"] * (ratio ** 0.5 if scale == "sqrt" else ratio)


def _optimizer(cfg, model, world):
    from timm.optim import create_optimizer_v2

    kw = {}
    if cfg["opt_eps"] is not None:
        kw["eps"] = cfg["opt_eps"]
    if cfg["opt_betas"] is not None:
        kw["betas"] = tuple(cfg["opt_betas"])
    lr = _learning_rate(cfg, world)
    return create_optimizer_v2(_param_groups(model, cfg["weight_decay"]), opt=cfg["opt"], lr=lr,
                               weight_decay=cfg["weight_decay"], momentum=cfg["momentum"], **kw), lr


def _scheduler(cfg, optimizer, updates_per_epoch):
    from timm.scheduler import create_scheduler_v2

    return create_scheduler_v2(
        optimizer, sched=cfg["sched"], num_epochs=cfg["epochs"], decay_epochs=cfg["decay_epochs"],
        decay_milestones=list(cfg["decay_milestones"] or []), cooldown_epochs=cfg["cooldown_epochs"],
        patience_epochs=cfg["patience_epochs"], decay_rate=cfg["decay_rate"], min_lr=cfg["min_lr"],
        warmup_lr=cfg["warmup_lr"], warmup_epochs=cfg["warmup_epochs"], warmup_prefix=cfg["warmup_prefix"],
        step_on_epochs=not cfg["sched_on_updates"], updates_per_epoch=updates_per_epoch)


# ---- evaluation ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, widths: Sequence[float], device, channels_last=False, amp=None,
             dist_info: _Dist | None = None) -> dict:
    """Top-1 / top-5 accuracy (%) at each width on ``loader`` (each batch runs every width: one pass of data).

    Under DDP each rank evaluates its shard and the counts are all-reduced.

    Returns:
        ``{width: {"top1": %, "top5": %, "n": samples}}``.

    Raises:
        UncalibratedWidthError: a US-Net width without BN statistics.
    """
    was = model.training
    model.eval()
    correct = {w: [0, 0] for w in widths}
    n = 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for w in widths:
                with slim.width(w), (amp() if amp else contextlib.nullcontext()):
                    out = model(x)
                k = min(5, out.shape[-1])
                top = out.topk(k, dim=-1).indices
                hit = top.eq(y[:, None])
                correct[w][0] += int(hit[:, :1].sum())
                correct[w][1] += int(hit.any(-1).sum())
            n += len(y)
    finally:
        model.train(was)
    if dist_info is not None and dist_info.world > 1:
        flat = _all_reduce_sum([float(n)] + [float(c) for w in widths for c in correct[w]], device)
        n = int(flat[0])
        for i, w in enumerate(widths):
            correct[w] = [int(flat[1 + 2 * i]), int(flat[2 + 2 * i])]
    if n == 0:
        raise slim.EmptyLoaderError("the evaluation loader yielded no samples")
    return {w: {"top1": 100.0 * c[0] / n, "top5": 100.0 * c[1] / n, "n": n} for w, c in correct.items()}


def uncalibrated_widths(model, widths) -> list[float]:
    """The widths of ``widths`` that have no BN statistics yet (US-Nets; always empty for S-Nets)."""
    have = slim.calibrated_widths(model, widths)
    return [w for w in widths if w not in have]


# ---- files -----------------------------------------------------------------------------------------------------
def _atomic_torch_save(obj, path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _yaml_plain(obj):
    if isinstance(obj, dict):
        return {str(k): _yaml_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_yaml_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def _write_yaml(obj, path):
    import yaml

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(_yaml_plain(obj), f, sort_keys=False)
    os.replace(tmp, path)


def _append_summary(path, row: dict):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _rng_state():
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st):
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def _wkey(w: float) -> str:
    return f"{w:g}"


class _Log:
    """rich console on rank 0 (progress bars when attached to a terminal, plain lines otherwise)."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.enabled = enabled
        self.console = Console(highlight=False)

    def __call__(self, *msg):
        if self.enabled:
            self.console.print(*msg, soft_wrap=True)  # one line per message in logs (no wrapping at 80 columns)

    @contextlib.contextmanager
    def progress(self, description: str, total: int):
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                          transient=True) as p:
                task = p.add_task(description, total=total, info="")
                yield lambda info="": p.update(task, advance=1, info=info)
        else:
            yield lambda info="": None


# ---- training --------------------------------------------------------------------------------------------------
def _default_output(cfg) -> str:
    name = cfg["experiment"] or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg['model']}-{cfg['dataset'] or 'folder'}"
    return str(Path("output", "train", name).resolve())


def train(user_cfg: dict | None = None, overrides: dict | None = None, resume: str | dict | None = None,
          default: bool = False) -> dict:
    """Train a slimmable timm classifier, then calibrate, evaluate, profile and export every requested width.

    Args:
        user_cfg: config keys (a YAML file's contents); see :data:`DEFAULTS`.
        overrides: keys applied on top (command-line ``--set`` / flags).
        resume: a checkpoint path or payload from an earlier run: model, optimizer, scheduler, epoch, iteration
            and RNG states are restored, so the run continues as if never interrupted (exactly, with
            ``workers: 0`` on CPU). Without ``user_cfg`` the checkpoint's own config is used.
        default: start from :data:`DIGITS_JOB` (the embedded scikit-learn digits job).

    Returns:
        ``{"output": run dir, "rows": [{width, mflops, params_m, top1, top5}], "checkpoint": path, ...}`` (rank 0;
        other ranks get the same keys without files).

    Raises:
        ConfigError: bad config. WidthSpecMismatchError: ``resume`` was saved with another width spec than the
        config builds (nothing is written). FileNotFoundError: missing data.
    """
    t_start = time.time()
    ck = None
    if resume is not None:
        ck = slim.read_checkpoint(resume) if isinstance(resume, (str, os.PathLike)) else resume
        if user_cfg is None and not default:
            user_cfg = ck.get("config")
            # continue in the checkpoint's own folder (it may have been moved since)
            if isinstance(resume, (str, os.PathLike)) and "output" not in (overrides or {}):
                overrides = {**(overrides or {}), "output": str(Path(resume).resolve().parent)}
    cfg = resolve_config(user_cfg, overrides, default=default or (user_cfg is None and resume is None))
    resume_name = str(resume) if isinstance(resume, (str, os.PathLike)) else None
    di, device = _init_distributed(cfg)
    log = _Log(di.main)
    try:
        return _train(cfg, ck, di, device, log, t_start, resume_name)
    finally:
        if di.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, ck, di: _Dist, device, log: _Log, t_start, resume_name=None) -> dict:
    from timm.utils import random_seed

    random_seed(cfg["seed"], di.rank)
    # Data first (rank 0 extracts / decodes once, the others then read the cache).
    if di.main:
        datasets = build_datasets(cfg, log=log)
    di.barrier()
    if not di.main:
        datasets = build_datasets(cfg, log=lambda *a: None)
    if cfg["num_classes"] is None:
        cfg["num_classes"] = _num_classes(datasets["train"])
        if cfg["num_classes"] is None:
            raise ConfigError("num_classes is not set and cannot be read from the dataset; set num_classes")
    model = build_model(cfg)
    spec = slim.width_spec(model)
    if ck is not None:
        try:
            slim.load_checkpoint(ck, model)  # before anything is written
        except slim.WidthSpecMismatchError as e:
            raise slim.WidthSpecMismatchError(f"cannot resume from {resume_name or 'the checkpoint'}: "
                                              f"{e}") from None
        slim.clear_statistics(model)  # post-statistics of the previous weights are stale once training goes on
    cfg.update(_data_config(cfg, model))
    eval_widths = _config_widths(spec, cfg, "eval_widths")
    export_widths = eval_widths if cfg["export_widths"] is None else _config_widths(spec, cfg, "export_widths")
    calib_widths = sorted(set(eval_widths) | set(export_widths))
    if not spec.is_switches and not cfg["calib_samples"] and cfg["calib_samples"] is not None:
        missing = [w for w in calib_widths if w not in (spec.min, spec.max)]
        if missing:
            raise ConfigError(f"calib_samples: 0 leaves US-Net widths {missing} without BN statistics; only "
                              f"{spec.min} and {spec.max} are tracked during training")
    rule = cfg["sample_rule"] or ("all" if spec.is_switches else "sandwich")
    if cfg["output"] is None:
        out = [_default_output(cfg)]
        if di.world > 1:
            dist.broadcast_object_list(out, src=0)
        cfg["output"] = out[0]
    run = Path(cfg["output"])

    model.to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    ddp = model
    if di.world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    train_idx = subset_indices(len(datasets["train"]), cfg["train_num_samples"], cfg["seed"])
    val_idx = subset_indices(len(datasets["val"]), cfg["val_num_samples"], cfg["seed"])
    if len(train_idx) < cfg["batch_size"] * di.world:
        raise ConfigError(f"the training set has {len(train_idx)} images, fewer than one global batch "
                          f"({cfg['batch_size']} x {di.world} ranks); lower batch_size")
    loader_train = _loader(cfg, datasets["train"], train_idx, True, cfg["batch_size"], device, di.world > 1)
    vbs = cfg["validation_batch_size"] or cfg["batch_size"]
    loader_val = _loader(cfg, datasets["val"], val_idx[di.rank::di.world], False, vbs, device)
    loader_curve = None
    if cfg["curve_interval"]:
        curve_idx = val_idx[subset_indices(len(val_idx), min(cfg["curve_samples"], len(val_idx)), cfg["seed"] + 2)]
        loader_curve = _loader(cfg, datasets["val"], curve_idx[di.rank::di.world], False, vbs, device)
    calib_n = len(train_idx) if cfg["calib_samples"] is None else min(cfg["calib_samples"], len(train_idx))
    calib_idx = train_idx[subset_indices(len(train_idx), calib_n, cfg["seed"] + 1)] if calib_n else train_idx[:0]
    loader_calib = _loader(cfg, datasets["train"], calib_idx[di.rank::di.world], False, vbs, device)

    optimizer, lr = _optimizer(cfg, model, di.world)
    scheduler, num_epochs = _scheduler(cfg, optimizer, len(loader_train))
    amp_on = bool(cfg["amp"]) and device.type == "cuda"
    amp_dtype = torch.bfloat16 if cfg["amp_dtype"] == "bfloat16" else torch.float16
    amp = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_on else None
    scaler = torch.amp.GradScaler("cuda") if amp_on and amp_dtype == torch.float16 else None
    backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else None
    step = slim.MultiWidthStep(ddp, num_widths=cfg["num_widths"], rule=rule, distill=cfg["inplace_distill"],
                               temperature=cfg["distill_temperature"], seed=cfg["seed"], backward=backward)
    mixup_fn, criterion = _mixup_and_loss(cfg)
    start_epoch, iteration = 0, 0
    if ck is not None:
        start_epoch, iteration = int(ck.get("epoch", 0)), int(ck.get("iteration", 0))
        if "optimizer" in ck:
            optimizer.load_state_dict(ck["optimizer"])
        if "scheduler" in ck and ck["scheduler"] is not None:
            scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if start_epoch > 0:
            if cfg["sched_on_updates"]:
                scheduler.step_update(start_epoch * len(loader_train))
            else:
                scheduler.step(start_epoch)

    writer = None
    if di.main:
        run.mkdir(parents=True, exist_ok=True)
        _write_yaml(cfg, run / "config.yaml")
        if cfg["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run / "tb"))
    # widths evaluated during training: every switch, or the US-Net bounds that the rule trains every step (only
    # those have running BN statistics before calibration)
    tracked = {"sandwich": (spec.min, spec.max), "min_random": (spec.min,), "max_random": (spec.max,)}.get(rule, ())
    epoch_widths = list(spec.widths) if spec.is_switches else sorted(set(tracked))
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"[bold]slim train[/bold] {cfg['model']} ({'S-Net switches' if spec.is_switches else 'US-Net range'} "
        f"{list(spec.widths)}, rule={rule}, n={cfg['num_widths']}, distill={cfg['inplace_distill']}) "
        f"{n_params:.2f}M params | data {cfg['dataset'] or cfg['data_dir']}: {len(train_idx)} train / "
        f"{len(val_idx)} val, input {cfg['input_size']} | {cfg['opt']} lr={lr:.4g} bs={cfg['batch_size']}x"
        f"{di.world} | {num_epochs} epochs from {start_epoch} | device {device} | output {run}")

    ckpt_path = str(run / "last.pth.tar")
    epoch_metrics = dict(ck.get("metrics") or {}) if ck is not None else {}
    rng_at_epoch_end = ck.get("rng") if ck is not None and ck.get("rng") is not None else _rng_state()
    if ck is not None:  # last, right before the loop: nothing else may draw from the restored generators
        if di.world == 1 and ck.get("rng") is not None:
            _set_rng_state(ck["rng"])
        elif di.world > 1:
            random_seed(cfg["seed"] + 1000 * start_epoch, di.rank)
    for epoch in range(start_epoch, num_epochs):
        if hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        if mixup_fn is not None and cfg["mixup_off_epoch"] and epoch >= cfg["mixup_off_epoch"]:
            mixup_fn.mixup_enabled = False
        t0 = time.time()
        ddp.train()
        loss_sum, loss_n, width_loss = 0.0, 0, {}
        train_hits = {w: [0, 0] for w in epoch_widths}  # top-1 on the (augmented) training batches, per width
        curve_hits = {w: [0, 0] for w in epoch_widths}
        with log.progress(f"epoch {epoch + 1}/{num_epochs}", len(loader_train)) as advance:
            for i, (x, y) in enumerate(loader_train):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cfg["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                if mixup_fn is not None:
                    x, y = mixup_fn(x, y)
                optimizer.zero_grad(set_to_none=True)

                def forward(x=x):
                    if amp is None:
                        return ddp(x)
                    with amp():
                        return ddp(x).float()

                res = step(forward, lambda out: criterion(out, y), iteration=iteration, keep_outputs=True)
                if mixup_fn is None:
                    for w, out in res.outputs.items():
                        if w in train_hits and torch.is_tensor(out):
                            hit = int((out.argmax(-1) == y).sum())
                            for acc in (train_hits[w], curve_hits[w]):
                                acc[0] += hit
                                acc[1] += len(y)
                if cfg["clip_grad"] is not None:
                    from timm.utils import dispatch_clip_grad

                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    dispatch_clip_grad(model.parameters(), cfg["clip_grad"], mode=cfg["clip_mode"])
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                iteration += 1
                step_losses = res.log_vars()  # one host sync per step, after every width ran
                loss_sum += step_losses["loss"]
                loss_n += 1
                for w, lv in ((w, float(v)) for w, v in res.losses.items()):
                    tag = "max" if w == spec.max else "min" if w == spec.min else None
                    if spec.is_switches:
                        tag = _wkey(w)
                    if tag is not None:
                        width_loss.setdefault(tag, []).append(lv)
                if cfg["sched_on_updates"]:
                    scheduler.step_update(num_updates=iteration, metric=loss_sum / loss_n)
                cur_lr = optimizer.param_groups[-1]["lr"]
                advance(f"loss {step_losses['loss']:.3f} lr {cur_lr:.3g}")
                if loader_curve is not None and epoch_widths and iteration % cfg["curve_interval"] == 0:
                    cv = evaluate(model, loader_curve, epoch_widths, device, cfg["channels_last"], amp, di)
                    if di.main:
                        _append_summary(run / "curves.csv", {
                            "iteration": iteration, "epoch": round(iteration / len(loader_train), 4),
                            "lr": cur_lr,
                            **{f"train_top1_w{_wkey(w)}": round(100.0 * h / max(1, n), 3)
                               for w, (h, n) in curve_hits.items()},
                            **{f"test_top1_w{_wkey(w)}": round(cv[w]["top1"], 3) for w in epoch_widths}})
                    curve_hits = {w: [0, 0] for w in epoch_widths}
                if writer is not None and iteration % max(1, cfg["log_interval"]) == 0:
                    writer.add_scalar("train/loss_sum", step_losses["loss"], iteration)
                    writer.add_scalar("train/lr", cur_lr, iteration)
                    for tag, vals in width_loss.items():
                        writer.add_scalar(f"train/loss_w{tag}", vals[-1], iteration)
                if di.main and not log.console.is_terminal and (i + 1) % max(1, cfg["log_interval"]) == 0:
                    log(f"  epoch {epoch + 1} [{i + 1}/{len(loader_train)}] loss {loss_sum / loss_n:.4f} "
                        f"lr {cur_lr:.4g} {(time.time() - t0) / (i + 1):.2f}s/it")
        train_time = time.time() - t0
        t1 = time.time()
        # the unwrapped model: shards differ by one batch, and DDP's forward would broadcast buffers per call
        ev = evaluate(model, loader_val, epoch_widths, device, cfg["channels_last"], amp, di) if epoch_widths else {}
        eval_time = time.time() - t1
        scheduler.step(epoch + 1, ev[max(ev)]["top1"] if ev else None)
        epoch_metrics = {"epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"],
                         "train_loss": loss_sum / max(1, loss_n), "train_time_s": round(train_time, 2),
                         "eval_time_s": round(eval_time, 2),
                         **{f"top1_w{_wkey(w)}": round(ev[w]["top1"], 3) for w in epoch_widths},
                         **{f"train_top1_w{_wkey(w)}": round(100.0 * h / n, 3)
                            for w, (h, n) in train_hits.items() if n}}
        log(f"epoch {epoch + 1}/{num_epochs}: loss {epoch_metrics['train_loss']:.4f} | "
            + " ".join(f"top-1@{_wkey(w)} {ev[w]['top1']:.2f}%" for w in epoch_widths)
            + f" | train {train_time:.1f}s ({train_time / max(1, len(loader_train)):.2f}s/it), eval {eval_time:.1f}s")
        if di.main:
            _append_summary(run / "summary.csv", epoch_metrics)
            if writer is not None:
                writer.add_scalar("epoch/train_loss", epoch_metrics["train_loss"], epoch + 1)
                for tag, vals in width_loss.items():
                    writer.add_scalar(f"epoch/train_loss_w{tag}", float(np.mean(vals)), epoch + 1)
                for w in epoch_widths:
                    writer.add_scalar(f"eval/top1_w{_wkey(w)}", ev[w]["top1"], epoch + 1)
                    writer.add_scalar(f"eval/top5_w{_wkey(w)}", ev[w]["top5"], epoch + 1)
        rng_at_epoch_end = _rng_state()
        if di.main:
            slim.save_checkpoint(ckpt_path, ddp, framework="timm", arch=cfg["model"], config=cfg, epoch=epoch + 1,
                                 iteration=iteration, optimizer=optimizer.state_dict(),
                                 scheduler=scheduler.state_dict(),
                                 scaler=scaler.state_dict() if scaler is not None else None,
                                 rng=rng_at_epoch_end, metrics=epoch_metrics, calibrated=[], finished=False)
    train_end = time.time()

    # ---- post-statistics, evaluation, spectrum, export -----------------------------------------------------
    if cfg["calib_samples"] != 0:
        t0 = time.time()
        slim.calibrate_bn(model, loader_calib, widths=calib_widths, num_samples=cfg["calib_samples"],
                          method=cfg["calib_method"],
                          forward=lambda m, b: m(_to_input(b[0], device, cfg["channels_last"])))
        log(f"calibrated BN post-statistics of {len(calib_widths)} widths on {calib_n} training images "
            f"({time.time() - t0:.1f}s)")
    results = evaluate(model, loader_val, eval_widths, device, cfg["channels_last"], amp, di)
    out = {"output": str(run), "checkpoint": ckpt_path, "eval_widths": eval_widths, "rows": [],
           "train_time_s": train_end - t_start, "total_time_s": None}
    if di.main:
        # RNG as at the end of the last epoch, so that resuming with more epochs equals one longer run
        payload = dict(framework="timm", arch=cfg["model"], config=cfg, epoch=num_epochs, iteration=iteration,
                       optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                       scaler=scaler.state_dict() if scaler is not None else None, rng=rng_at_epoch_end,
                       metrics=epoch_metrics, calibrated=calib_widths if cfg["calib_samples"] != 0 else [],
                       results={_wkey(w): r for w, r in results.items()}, finished=True)
        slim.save_checkpoint(ckpt_path, model, **payload)
        val_x = next(iter(loader_val))[0][:8].to(device)
        rows = _spectrum(model, cfg, eval_widths, export_widths, results, run, val_x, log, writer)
        out["rows"] = rows
        if writer is not None:
            writer.close()
        print_table(rows, title=f"{cfg['model']} on {cfg['dataset'] or Path(cfg['data_dir']).name}: "
                    f"{len(val_idx)} test images", console=log.console)
        out["total_time_s"] = time.time() - t_start
        log(f"done in {out['total_time_s']:.1f}s (training {train_end - t_start:.1f}s) -> {run}")
    di.barrier()
    return out


def _to_input(x, device, channels_last):
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _mixup_and_loss(cfg):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup_fn = None
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0 or cfg["cutmix_minmax"] is not None:
        mixup_fn = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], cutmix_minmax=cfg["cutmix_minmax"],
                         prob=cfg["mixup_prob"], switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"],
                         label_smoothing=cfg["smoothing"], num_classes=cfg["num_classes"])
        return mixup_fn, SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    if cfg["smoothing"]:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    return None, nn.CrossEntropyLoss()


def _spectrum(model, cfg, eval_widths, export_widths, results, run: Path, val_x, log, writer) -> list[dict]:
    """MFLOPs / params per width, spectrum CSV + PNG, exported plain models (rank 0)."""
    example = torch.zeros(1, *cfg["input_size"], device=val_x.device)
    if cfg["channels_last"]:
        example = example.contiguous(memory_format=torch.channels_last)
        val_x = val_x.contiguous(memory_format=torch.channels_last)
    rows = []
    for w in eval_widths:
        with slim.width(w):
            mflops = slim.count_mflops(model, example)
        export_this = w in export_widths
        plain = slim.export(model, w, example_input=example)
        params_m = sum(p.numel() for p in plain.parameters()) / 1e6
        if export_this and cfg["fuse_bn"]:
            plain = slim.export(model, w, fuse_bn=True, example_input=example)
        rows.append({"width": w, "mflops": mflops, "params_m": params_m, "top1": results[w]["top1"],
                     "top5": results[w]["top5"]})
        if export_this:
            path = run / "exported" / f"width_{_wkey(w)}.pth"
            with torch.no_grad():
                model.eval()
                with slim.width(w):
                    ref = model(val_x)
                diff = float((plain(val_x) - ref).abs().max())
            _save_plain(plain, cfg, w, str(path), fused=bool(cfg["fuse_bn"]))
            if cfg["onnx"]:
                slim.export_onnx(plain.cpu(), example.cpu().contiguous(), str(path.with_suffix(".onnx")))
            if diff > 1e-3:
                log(f"[yellow]warning[/yellow]: exported width {w:g} differs from the dynamic model by {diff:.2e}")
        if writer is not None:
            step = int(round(w * 1000))
            writer.add_scalar("final/top1", results[w]["top1"], step)
            writer.add_scalar("final/top5", results[w]["top5"], step)
            writer.add_scalar("final/mflops", mflops, step)
            writer.add_scalar(f"final/top1_w{_wkey(w)}", results[w]["top1"], 0)
    write_spectrum_csv(rows, str(run / "spectrum.csv"))
    plot_spectrum([rows], str(run / "spectrum.png"), labels=[cfg["model"]],
                  title=f"{cfg['model']}: FLOPs-accuracy spectrum")
    return rows


def _save_plain(plain, cfg, w, path, fused):
    arch = {"model": cfg["model"], "width": w, "num_classes": cfg["num_classes"], "input_size": cfg["input_size"],
            "mean": cfg["mean"], "std": cfg["std"], "interpolation": cfg["interpolation"],
            "crop_pct": cfg["crop_pct"], "cifar_stem": cfg["cifar_stem"], "fused_bn": fused}
    _atomic_torch_save({"model": plain, "state_dict": plain.state_dict(), "arch": arch, "framework": "timm"}, path)


# ---- commands on checkpoints -----------------------------------------------------------------------------------
def model_from_checkpoint(payload: dict, device="cpu"):
    """``(model, cfg)`` rebuilt from the config stored in a ``slim train`` checkpoint, weights loaded.

    Raises:
        ConfigError: the checkpoint holds no config (not written by ``slim train``).
        WidthSpecMismatchError: the rebuilt model's spec differs from the checkpoint's.
    """
    if "config" not in payload:
        raise ConfigError("this checkpoint holds no training config (it was not written by `slim train`); "
                          "rebuild the model in Python and use slim.load_checkpoint")
    cfg = resolve_config(payload["config"])
    model = build_model(cfg)
    slim.load_checkpoint(payload, model)
    model.to(device).eval()
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    return model, cfg


def _cmd_widths(args, spec, cfg):
    if getattr(args, "step", None) is not None:
        return resolve_widths(spec, args.step)
    if getattr(args, "widths", None):
        return resolve_widths(spec, args.widths)
    return resolve_widths(spec, cfg["eval_widths"])


def _cmd_cfg(cfg, args):
    for k in ("data_dir", "batch_size", "workers"):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = str(Path(v).resolve()) if k == "data_dir" else v
    return cfg


def _calibrate_from_data(model, cfg, widths, num_samples, device, log, method="exact"):
    ds = build_datasets(cfg, splits=("train",), log=log)["train"]
    train_idx = subset_indices(len(ds), cfg["train_num_samples"], cfg["seed"])
    n = len(train_idx) if num_samples is None else min(num_samples, len(train_idx))
    idx = train_idx[subset_indices(len(train_idx), n, cfg["seed"] + 1)]
    loader = _loader(cfg, ds, idx, False, cfg["validation_batch_size"] or cfg["batch_size"], device)
    t0 = time.time()
    slim.calibrate_bn(model, loader, widths=widths, num_samples=num_samples, method=method,
                      forward=lambda m, b: m(_to_input(b[0], device, cfg["channels_last"])))
    log(f"calibrated BN post-statistics of widths {[_wkey(w) for w in widths]} on {n} training images "
        f"({time.time() - t0:.1f}s)")
    return n


def cmd_train(args, file_cfg: dict | None) -> int:
    """``slim train [CONFIG] [--default] [--resume CKPT] [--epochs N] ... [--set KEY=VALUE]``."""
    overrides = parse_overrides(args.set)
    for k in ("output", "epochs", "batch_size", "lr", "workers", "seed", "device", "data_dir", "onnx"):
        v = getattr(args, k, None)
        if v is not None:
            overrides[k] = v
    user = file_cfg if args.config else None
    train(user, overrides, resume=args.resume, default=bool(args.default) or (user is None and not args.resume))
    return 0


def cmd_eval(args) -> int:
    """``slim eval CKPT [--widths ...|--step S] [--data DIR] [--csv PATH]``: top-1/top-5 per width."""
    log = _Log(True)
    device = resolve_device(args.device)
    model, cfg = model_from_checkpoint(args.payload, device)
    cfg = _cmd_cfg(cfg, args)
    spec = slim.width_spec(model)
    widths = _cmd_widths(args, spec, cfg)
    missing = uncalibrated_widths(model, widths)
    if missing:
        if args.no_calibrate:
            raise slim.UncalibratedWidthError(
                f"widths {missing} have no BN statistics in {args.checkpoint}; drop --no-calibrate or run "
                "`slim calibrate` first")
        n = args.calib_samples if args.calib_samples is not None else cfg["calib_samples"]
        _calibrate_from_data(model, cfg, missing, n or 2000, device, log)
    val = build_datasets(cfg, splits=("val",), log=log)["val"]
    n_val = args.val_num_samples or cfg["val_num_samples"]
    idx = subset_indices(len(val), n_val, cfg["seed"])
    loader = _loader(cfg, val, idx, False, cfg["validation_batch_size"] or cfg["batch_size"], device)
    t0 = time.time()
    res = evaluate(model, loader, widths, device, cfg["channels_last"])
    example = torch.zeros(1, *cfg["input_size"], device=device)
    rows = []
    for w in widths:
        with slim.width(w):
            mflops = slim.count_mflops(model, example)
        params_m = sum(p.numel() for p in slim.export(model, w, example_input=example).parameters()) / 1e6
        rows.append({"width": w, "mflops": mflops, "params_m": params_m, "top1": res[w]["top1"],
                     "top5": res[w]["top5"]})
    print_table(rows, title=f"{cfg['model']}: {len(idx)} images ({time.time() - t0:.1f}s)", console=log.console)
    if args.csv:
        write_spectrum_csv(rows, args.csv)
        log(f"wrote {args.csv}")
    if args.plot:
        plot_spectrum([rows], args.plot, labels=[cfg["model"]])
        log(f"wrote {args.plot}")
    return 0


def cmd_calibrate(args) -> int:
    """``slim calibrate CKPT [--widths ...] [--num-samples N] [--out PATH | --in-place]``: post-statistics,
    written to a new checkpoint atomically (the input is untouched unless ``--in-place``)."""
    log = _Log(True)
    device = resolve_device(args.device)
    payload = args.payload
    model, cfg = model_from_checkpoint(payload, device)
    cfg = _cmd_cfg(cfg, args)
    spec = slim.width_spec(model)
    widths = _cmd_widths(args, spec, cfg)
    n = args.num_samples if args.num_samples is not None else (cfg["calib_samples"] or 2000)
    if n <= 0:
        raise ConfigError(f"--num-samples must be positive, got {n}")
    _calibrate_from_data(model, cfg, widths, n, device, log, method=args.method)
    if args.in_place:
        out = args.checkpoint
    elif args.out:
        out = args.out
    else:
        p = Path(args.checkpoint)
        stem = p.name[:-len(".pth.tar")] if p.name.endswith(".pth.tar") else p.stem
        out = str(p.with_name(f"{stem}-calibrated.pth.tar"))
    extra = {k: v for k, v in payload.items() if k not in ("model", "width_spec", "bn_mode")}
    extra["calibrated"] = sorted(set(extra.get("calibrated") or []) | set(widths))
    slim.save_checkpoint(out, model.cpu(), **extra)
    log(f"wrote {out} (calibrated widths {[_wkey(w) for w in extra['calibrated']]})")
    return 0


def cmd_export(args) -> int:
    """``slim export CKPT --width W [--onnx] [--fuse-bn] [--out PATH]``: a plain timm model at width W."""
    log = _Log(True)
    device = resolve_device(args.device)
    model, cfg = model_from_checkpoint(args.payload, device)
    cfg = _cmd_cfg(cfg, args)
    spec = slim.width_spec(model)
    w = spec.validate(args.width)
    if uncalibrated_widths(model, [w]):
        n = args.calib_samples if args.calib_samples is not None else cfg["calib_samples"]
        _calibrate_from_data(model, cfg, [w], n or 2000, device, log)
    example = torch.zeros(1, *cfg["input_size"], device=device)
    plain = slim.export(model, w, fuse_bn=args.fuse_bn, example_input=example)
    x = torch.randn(4, *cfg["input_size"], generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), slim.width(w):
        diff = float((plain(x) - model(x)).abs().max())
    out = args.out or str(Path(args.checkpoint).resolve().parent / "exported" /
                          f"width_{_wkey(w)}{'_fused' if args.fuse_bn else ''}.pth")
    _save_plain(plain, cfg, w, out, fused=args.fuse_bn)
    params = sum(p.numel() for p in plain.parameters()) / 1e6
    log(f"wrote {out}: {type(plain).__name__} at width {w:g}, {params:.3f}M params, max |plain - dynamic| = "
        f"{diff:.2e}")
    if args.onnx:
        onnx_path = str(Path(out).with_suffix(".onnx"))
        slim.export_onnx(plain.cpu(), example.cpu(), onnx_path)
        msg = f"wrote {onnx_path}"
        try:
            import onnxruntime as ort

            sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            got = sess.run(None, {"input": x.cpu().numpy()})[0]
            with torch.no_grad():
                msg += f" (onnxruntime max |diff| = {float(np.abs(got - plain(x.cpu()).numpy()).max()):.2e})"
        except ImportError:
            pass
        log(msg)
    return 0


def _example_batch(args, cfg, device) -> torch.Tensor:
    """A random ``(batch_size, C, H, W)`` input of the config's size, or ``--input-size`` (H, H W or C H W)."""
    size = list(cfg["input_size"])
    if args.input_size:
        s = args.input_size
        if len(s) == 1:
            size = [size[0], s[0], s[0]]
        elif len(s) == 2:
            size = [size[0], *s]
        elif len(s) == 3:
            size = list(s)
        else:
            raise ConfigError(f"--input-size takes H, H W or C H W, got {s}")
    x = torch.randn(args.batch_size, *size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if cfg["channels_last"] else x


def cmd_serve(args) -> int:
    """``slim serve CKPT --budget-ms B``: serve random inputs of the config's size under a latency budget with a
    :class:`~slim_plugins.WidthController`; live display, PNG (and CSV) of latency and width over time."""
    from slim_plugins.control import serve_command

    log = _Log(True)
    device = resolve_device(args.device)
    model, cfg = model_from_checkpoint(args.payload, device)
    spec = slim.width_spec(model)
    x = _example_batch(args, cfg, device)
    if args.table:
        table = slim.ProfileTable.from_csv(args.table)
        if args.widths:
            table = [r for r in table if r.width in set(args.widths)]
    else:
        widths = _cmd_widths(args, spec, cfg)
        if not (args.widths or args.step):  # default: the config's eval widths that have BN statistics
            widths = slim.calibrated_widths(model, widths) or widths
        missing = uncalibrated_widths(model, widths)
        if missing:
            raise slim.UncalibratedWidthError(f"widths {missing} have no BN statistics in {args.checkpoint}; "
                                              "run `slim calibrate` for them first")
        log(f"profiling widths {[f'{w:g}' for w in widths]} at input {list(x.shape)} on {device}")
        table = slim.profile(model, x, widths=widths, repeats=20)
    ctl = slim.WidthController(model, args.budget_ms, table, percentile=args.percentile)
    serve_command(ctl, lambda i: (x,), args.calls, live=not args.no_live, csv_path=args.csv, plot_path=args.plot,
                  title=f"{cfg['model']}, batch {args.batch_size}", log=log, console=log.console)
    return 0


def cmd_profile(args) -> int:
    """``slim profile CKPT [--widths ...] [--input-size C H W] [--csv PATH]``: MFLOPs, params, latency."""
    log = _Log(True)
    device = resolve_device(args.device)
    model, cfg = model_from_checkpoint(args.payload, device)
    spec = slim.width_spec(model)
    widths = _cmd_widths(args, spec, cfg)
    x = _example_batch(args, cfg, device)
    size = list(x.shape[1:])
    missing = uncalibrated_widths(model, widths)
    if missing:
        # FLOPs, params and latency do not depend on BN statistics; noise statistics only let eval mode run.
        # They live in this process only (nothing is saved).
        slim.calibrate_bn(model, [torch.randn(8, *size, device=device)], widths=missing, num_samples=None)
    table = slim.profile(model, x, widths=widths, latency=not args.no_latency, repeats=args.repeats)
    rows = [{"width": r.width, "mflops": r.mflops, "params_m": r.params_m, "latency_ms": r.latency_ms}
            for r in table]
    print_table(rows, title=f"{cfg['model']} @ input {size} batch {args.batch_size} on {device}",
                columns=(("width", "width", "{:g}"), ("mflops", "MFLOPs", "{:.2f}"),
                         ("params_m", "params (M)", "{:.3f}"), ("latency_ms", "latency (ms)", "{:.3f}")),
                console=log.console)
    if args.csv:
        table.to_csv(args.csv)
        log(f"wrote {args.csv}")
    return 0
