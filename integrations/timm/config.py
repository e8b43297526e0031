"""Config of the timm trainer: timm ``train.py``'s argument set (``timm_train_args.yaml``) plus the slimmable keys.

A timm user's ``args.yaml`` (written by timm's own ``train.py``) loads as it is: every timm key is accepted with its
timm meaning, or, where a slimmable run cannot honour it, a non-default value is refused with one line saying why
(:data:`REJECTED`). Keys at their timm default are always accepted. Two keys differ from timm: ``output`` is the run
folder itself (timm: the parent of ``<experiment>``), and ``device`` defaults to ``auto`` (CUDA when available).
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml

import slim_plugins as slim
from slim_plugins.errors import ConfigError
from slim_plugins.config import expand_env
from slim_plugins.train import DISTILL_LOSSES
from slim_plugins.width import SAMPLING_RULES, WidthSpec

from .data import DIGITS_MEAN, DIGITS_STD

__all__ = ["TIMM_ARGS", "SLIM_KEYS", "DEFAULTS", "REJECTED", "DIGITS_JOB", "resolve_config", "resolve_widths",
           "config_widths"]

_SPEC = yaml.safe_load((Path(__file__).with_name("timm_train_args.yaml")).read_text())
#: timm train.py's defaults (172 keys), see timm_train_args.yaml for the source.
TIMM_ARGS: dict = {k: v["default"] for k, v in _SPEC.items()}
_TYPES = {k: v["type"] for k, v in _SPEC.items() if k != "img_size"}  # img_size: an int or [H, W]

#: The slimmable keys (Slimmable Networks: ``widths``; US-Nets: ``width_range``, ``num_widths`` (sandwich rule),
#: ``inplace_distill``, ``calib_samples`` (BN post-statistics)) and the outputs of a slimmable run.
SLIM_KEYS: dict = {
    "framework": "timm", "slimmable": True, "widths": None, "width_range": None, "divisor": 8, "bn": "auto",
    "output_averaging": False, "cifar_stem": False, "fixed_layers": [], "num_widths": 4, "sample_rule": None,
    "inplace_distill": False, "distill_temperature": 1.0, "eval_widths": None, "export_widths": None,
    "calib_samples": 2000, "calib_method": "exact", "onnx": False, "fuse_bn": False, "tensorboard": True,
    "crop_mode": None,  # the eval crop, as timm's validate.py names it (resolved from the model like crop_pct)
    "num_threads": None,  # torch CPU threads for the run (None: torch's default); results depend on it on CPU
}
_TYPES.update({"divisor": "int", "num_widths": "int", "distill_temperature": "float", "calib_samples": "int",
               "onnx": "bool", "fuse_bn": "bool", "tensorboard": "bool", "output_averaging": "bool",
               "cifar_stem": "bool", "warmup_epochs": "float", "decay_epochs": "float", "widths": "list",
               "width_range": "list", "num_threads": "int"})

#: Every key with its default: timm's, except ``device: auto`` (CUDA when there is one; timm's default is cuda).
DEFAULTS: dict = {**TIMM_ARGS, "device": "auto", **SLIM_KEYS}

_SPLIT_BN = ("split BN keeps BN statistics per augmentation split; switchable BN keeps them per width, the two do "
             "not compose")
_KD = ("distillation from a separate teacher; a slimmable run distils in place (inplace_distill: the widest width "
       "is the teacher, US-Nets Sec. 4.2)")
_VARSIZE = "variable-size / NaFlex batches are for ViT-style models; slimmable widths apply to CNN channels"
#: timm keys a slimmable run refuses when set to a non-default value, with the reason.
REJECTED: dict = {
    "torchscript": "torch.jit.script cannot script the width context (a ContextVar); use torchcompile",
    "fuser": "a TorchScript fuser only acts on scripted models (see torchscript)",
    "model_dtype": "BN post-statistics and the per-width losses are kept in float32; use amp / amp_dtype",
    "aug_splits": _SPLIT_BN, "split_bn": _SPLIT_BN, "resplit": _SPLIT_BN,
    "jsd_loss": "the JSD loss needs aug_splits (" + _SPLIT_BN + ")",
    "tta": "test-time-augmentation averaging is not part of the per-width evaluation",
    "log_wandb": "wandb is not a dependency; per-width curves are in TensorBoard (tb/) and summary.csv",
    "kd_model_name": _KD, "kd_distill_type": _KD, "kd_loss_type": _KD, "distill_loss_weight": _KD,
    "task_loss_weight": _KD, "kd_temperature": _KD, "kd_student_feature_dim": _KD, "kd_teacher_feature_dim": _KD,
    "kd_token_distill_type": _KD,
    "epoch_repeats": "epoch repeats apply to timm's iterable (webdataset / HF stream) readers, not to map datasets",
    **{k: _VARSIZE for k in ("train_img_sizes", "train_batch_sizes", "train_size_probs", "train_size_schedule",
                             "train_size_schedule_spread", "train_size_random_mix", "train_batches_per_epoch",
                             "variable_batch_loss_scale", "naflex_loader", "naflex_train_seq_lens",
                             "naflex_max_seq_len", "naflex_patch_sizes", "naflex_patch_size_probs",
                             "naflex_loss_scale", "naflex_patchify_channels_first")},
    "slimmable": "slimmable: false trains a plain model; use timm's train.py, or widths: [w] for one width with "
                 "the slimmable channel rounding",
}

_ALIASES = {"data": "data_dir", "drop_rate": "drop", "drop_path_rate": "drop_path", "re_prob": "reprob"}

#: The embedded default job: scikit-learn digits at 16x16, a cifar-stem US-MobileNetV2 0.35-1.0x trained with the
#: sandwich rule (n=4) and inplace distillation. About 3 minutes on 2 CPU cores. One torch thread: a CPU float sum
#: is split across threads, so another thread count gives (slightly) different weights and accuracies.
DIGITS_JOB: dict = {
    "dataset": "digits", "model": "us_mobilenetv2_100", "num_classes": 10, "cifar_stem": True,
    "width_range": [0.35, 1.0], "num_widths": 4, "inplace_distill": True, "eval_widths": [0.35, 0.5, 0.75, 1.0],
    "input_size": [3, 16, 16], "mean": list(DIGITS_MEAN), "std": list(DIGITS_STD), "interpolation": "bilinear",
    "train_interpolation": "bilinear", "crop_pct": 1.0, "scale": [0.7, 1.0], "ratio": [0.85, 1.15], "hflip": 0.0,
    "color_jitter": 0.0, "head_init_scale": 0.0, "channels_last": True, "opt": "adamw", "lr": 4e-3,
    "weight_decay": 0.02, "sched": "cosine", "warmup_epochs": 0, "min_lr": 1e-5, "epochs": 10, "batch_size": 64,
    "smoothing": 0.0, "workers": 0, "log_interval": 11, "calib_samples": 2000, "seed": 0, "num_threads": 1,
}


def _canon_keys(cfg: dict, where: str) -> dict:
    out = {}
    for k, v in cfg.items():
        k = _ALIASES.get(str(k).replace("-", "_"), str(k).replace("-", "_"))
        if k not in DEFAULTS:
            close = difflib.get_close_matches(k, list(DEFAULTS), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"unknown config key {k!r} in {where}{hint} (keys: timm train.py's arguments plus the "
                              f"slimmable keys {sorted(SLIM_KEYS)})")
        if k == "data" or (k == "data_dir" and v is None and out.get("data_dir")):
            continue  # timm: `data` (positional) is the old name of data_dir
        out[k] = v
    return out


def _coerce(k, v):
    t = _TYPES.get(k)
    if v is None or t in (None, "str"):
        return v
    try:
        if t == "bool":
            if not isinstance(v, bool):
                raise TypeError
            return v
        if t == "int":
            if float(v) != int(float(v)):
                raise ValueError
            return int(float(v))
        if t == "float":
            return float(v)
        if t == "list":
            if isinstance(v, str):
                raise TypeError
            v = [v] if isinstance(v, (int, float)) else list(v)
            return [float(x) for x in v] if all(isinstance(x, (int, float)) for x in v) else v
        if t == "dict" and not isinstance(v, dict):
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        what = {"list": "a list", "dict": "a mapping", "int": "an integer", "float": "a number",
                "bool": "true or false"}.get(t, t)
        raise ConfigError(f"{k} must be {what}, got {v!r}") from None
    return v


def resolve_config(user: dict | None = None, overrides: dict | None = None, default: bool = False) -> dict:
    """Merge :data:`DEFAULTS`, the digits job (``default=True``), a user config and overrides; check and normalise.

    Raises:
        ConfigError: an unknown key (with close matches), a value of the wrong type, a timm key of
            :data:`REJECTED` set to a non-default value (with the reason), widths and width_range both given, an
            unknown sampling rule or distillation loss.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if default:
        cfg.update(copy.deepcopy(DIGITS_JOB))
    user = _canon_keys(dict(user or {}), "the config")
    if user.get("device") == "cuda":  # timm writes its default into every args.yaml: read as auto (CPU-only too)
        user["device"] = "auto"
    cfg.update(user)
    cfg.update(_canon_keys(dict(overrides or {}), "the overrides"))
    for k, reason in REJECTED.items():
        if cfg[k] != DEFAULTS[k] and not (k == "slimmable" and cfg[k] is True):
            raise ConfigError(f"{k}={cfg[k]!r} cannot apply to a slimmable run: {reason}")
    for k in cfg:
        cfg[k] = _coerce(k, cfg[k])
    for k in ("batch_size", "grad_accum_steps", "val_interval", "log_interval", "checkpoint_hist", "num_widths",
              "train_num_samples", "val_num_samples", "validation_batch_size"):
        if cfg[k] is not None and cfg[k] < 1:
            raise ConfigError(f"{k} must be >= 1, got {cfg[k]}")
    for k in ("epochs", "calib_samples", "workers"):
        if cfg[k] is not None and cfg[k] < 0:
            raise ConfigError(f"{k} must be >= 0, got {cfg[k]}")
    if not cfg["val_split"]:
        raise ConfigError("val_split is empty: the trainer evaluates every width on a validation split; name one")
    if cfg["amp_dtype"] not in ("float16", "bfloat16"):
        raise ConfigError(f"amp_dtype must be float16 or bfloat16 (timm), got {cfg['amp_dtype']!r}")
    for k in ("width_range", "scale", "ratio"):
        if cfg[k] is not None and len(cfg[k]) != 2:
            raise ConfigError(f"{k} must have 2 numbers, got {cfg[k]!r}")
    if cfg["input_size"] is not None:
        if len(cfg["input_size"]) != 3:
            raise ConfigError(f"input_size must be [C, H, W], got {cfg['input_size']}")
        cfg["input_size"] = [int(x) for x in cfg["input_size"]]
    if cfg["img_size"] is not None:  # timm: an int; [H, W] accepted too
        s = cfg["img_size"] if isinstance(cfg["img_size"], (list, tuple)) else [cfg["img_size"]]
        if len(s) not in (1, 2):
            raise ConfigError(f"img_size must be an int or [H, W], got {cfg['img_size']!r}")
        cfg["input_size"] = cfg["input_size"] or [int(cfg["in_chans"] or 3), int(s[0]), int(s[-1])]
        cfg["img_size"] = None
    for k in ("widths", "width_range"):
        bad = [w for w in cfg[k] or [] if not isinstance(w, (int, float)) or not 0 < w <= 1]
        if bad:
            raise ConfigError(f"{k} {cfg[k]!r}: {bad} not width multipliers in (0, 1] (1.0: the model's own "
                              "channels)")
    if cfg["widths"] is not None and cfg["width_range"] is not None:
        raise ConfigError("give either widths (S-Net switches) or width_range (US-Net), not both")
    if cfg["sample_rule"] is not None and cfg["sample_rule"] not in SAMPLING_RULES:
        raise ConfigError(f"sample_rule {cfg['sample_rule']!r} is not one of {list(SAMPLING_RULES)}")
    d = cfg["inplace_distill"]
    if d is True:
        d = "soft_ce"  # US-Nets Section 4.2: cross-entropy against the max width's soft predictions
    elif d in (False, None, "none", "None", ""):
        d = None
    elif not isinstance(d, str) or d not in DISTILL_LOSSES:
        raise ConfigError(f"inplace_distill must be true/false or one of {sorted(DISTILL_LOSSES)}, got {d!r}")
    cfg["inplace_distill"] = d
    for k in ("eval_widths", "export_widths"):
        if cfg[k] is not None and not isinstance(cfg[k], (int, float)):
            cfg[k] = _coerce("mean", cfg[k])
    if cfg["eval_widths"] is not None and not isinstance(cfg["eval_widths"], (int, float)) and \
            not cfg["eval_widths"]:
        raise ConfigError("eval_widths is empty: name the widths to evaluate (or leave it out: every switch / a 0.05 "
                          "sweep of the range)")
    if cfg["num_classes"] is not None and cfg["num_classes"] < 1:
        raise ConfigError(f"num_classes must be >= 1 (the classifier's outputs), got {cfg['num_classes']}")
    _check_model_and_dataset(cfg)
    if cfg["dist_bn"] not in ("", "broadcast", "reduce"):
        raise ConfigError(f"dist_bn must be '', 'broadcast' or 'reduce' (timm), got {cfg['dist_bn']!r}")
    if cfg["eval_metric"] not in ("top1", "top5", "loss"):
        raise ConfigError(f"eval_metric must be top1, top5 or loss, got {cfg['eval_metric']!r}")
    for k in ("data_dir", "output", "initial_checkpoint", "resume", "pretrained_path"):
        if cfg[k]:
            cfg[k] = str(Path(expand_env(str(cfg[k]))).resolve())
    cfg["fixed_layers"] = list(cfg["fixed_layers"] or [])
    for k in ("model_kwargs", "opt_kwargs"):
        if not isinstance(cfg[k] or {}, dict):
            raise ConfigError(f"{k} must be a mapping, got {cfg[k]!r}")
        cfg[k] = dict(cfg[k] or {})
    return cfg


#: timm ``create_dataset`` name prefixes (``torch/cifar10``, ``hfds/...``); bare names: the folders and digits.
_DATASET_PREFIXES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")
_DATASET_NAMES = ("", "folder", "imagefolder", "digits")


def _check_model_and_dataset(cfg: dict) -> None:
    """A model timm can create and a dataset name ``build_datasets`` reads, before anything is built or written."""
    import timm

    import slim_plugins.integrations.timm  # noqa: F401  registers the slimmable model names (us_mobilenetv2_100)

    name = str(cfg["model"] or "")
    bare = [name] + [name[len(p):] for p in ("us_", "s_") if name.startswith(p)]  # the adapter's entry points
    if ":" not in name and not any(timm.is_model(n) for n in bare):  # hf-hub: / local-dir: are timm's to resolve
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(f"model {name!r} is not a timm model" + (f"; did you mean {close}?" if close else "")
                          + " (timm.list_models() lists them)")
    ds = str(cfg["dataset"] or "")
    if ds.lower() not in _DATASET_NAMES and not ds.startswith(_DATASET_PREFIXES):
        raise ConfigError(f"dataset {ds!r} is not one slim train reads: {list(_DATASET_NAMES[1:])} or a timm "
                          f"create_dataset name with a prefix {list(_DATASET_PREFIXES)} (e.g. torch/cifar10)")


def resolve_widths(spec: WidthSpec, widths, default_step: float = 0.05) -> list[float]:
    """Widths to evaluate: a list (validated), a step for a min..max sweep, or None (every switch / a
    ``default_step`` sweep of the range). Sorted, narrowest first.

    Raises:
        WidthError: a width outside the spec. ConfigError: a step that is not positive.
    """
    if widths is None:
        widths = default_step
    if isinstance(widths, (int, float)) and not isinstance(widths, bool):
        if spec.is_switches:
            return list(spec.widths)
        if not widths > 0:
            raise ConfigError(f"a width step must be positive, got {widths}")
        ws = spec.grid(float(widths))
        return ws if ws[-1] == spec.max else [*ws, spec.max]
    return sorted({spec.validate(w) for w in widths})


def config_widths(spec, cfg: dict, key: str) -> list[float]:
    """:func:`resolve_widths` of config key ``key``; a bad width names the key (WidthError)."""
    try:
        return resolve_widths(spec, cfg[key])
    except slim.WidthError as e:
        raise slim.WidthError(f"{key}: {e}") from None
