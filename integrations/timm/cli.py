"""``slim train / eval / calibrate / export / profile / serve`` for timm checkpoints (the commands module the
``slim`` CLI dispatches to for ``framework: timm``; registered under the ``slim_plugins.frameworks`` entry point).

Training is :func:`slim_plugins.integrations.timm.train.train`; the other commands rebuild the model from the
config stored in a ``slim train`` checkpoint and use the core verbs (``calibrate_bn``, ``export``, ``profile``,
``WidthController``).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import slim_plugins as slim
from slim_plugins.adapter import OpenedCheckpoint
from slim_plugins.errors import ConfigError

from slim_plugins.config import parse_overrides
from .config import resolve_config, resolve_widths
from .data import build_datasets, make_loader, subset_indices
from .outputs import save_plain, write_yaml
from .train import _resolve_device, _to_input, build_model, calibration_line, train, validate

__all__ = ["HONOURS", "TimmCheckpoint", "model_from_checkpoint", "save_plain", "write_yaml",
           "cmd_train", "open_checkpoint"]


class _Log:
    def __init__(self):
        from rich.console import Console

        self.console = Console(highlight=False)

    def __call__(self, *msg):
        self.console.print(*msg, soft_wrap=True)


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
    # the checkpoint holds the weights: no pretrained download or initial checkpoint (they may be gone by now)
    model = build_model({**cfg, "pretrained": False, "initial_checkpoint": "", "pretrained_path": None})
    slim.load_checkpoint(payload, model)
    model.to(device).eval()
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    return model, cfg


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
    loader = make_loader(cfg, ds, idx, device=device)
    t0 = time.time()
    used = slim.calibrate_bn(model, loader, widths=widths, num_samples=num_samples, method=method,
                             forward=lambda m, b: m(_to_input(b[0], device, cfg)))
    log(calibration_line(used, f" of widths {[f'{w:g}' for w in widths]}", n, time.time() - t0))
    return n


def cmd_train(args, file_cfg: dict | None) -> int:
    """``slim train [CONFIG] [--default] [--resume CKPT] [--epochs N] ... [--set KEY=VALUE]``."""
    overrides = parse_overrides(args.set)
    for k in ("output", "epochs", "batch_size", "lr", "workers", "seed", "device", "data_dir", "onnx"):
        v = getattr(args, k, None)
        if v is not None:
            overrides[k] = v
    if args.config and not file_cfg:
        raise ConfigError(f"config file {args.config!r} is empty; give the keys of the run (model, dataset, widths "
                          "or width_range, ...) or run `slim train` alone for the embedded default job")
    user = file_cfg if args.config else None
    train(user, overrides, resume=args.resume, default=bool(args.default) or (user is None and not args.resume))
    return 0


#: The options each verb reads (the adapter protocol, :mod:`slim_plugins.adapter`); the core refuses the others.
HONOURS = {
    "train": {"config", "default", "resume", "output", "epochs", "batch_size", "lr", "workers", "seed", "device",
              "data_dir", "onnx", "set"},
    "eval": {"data_dir", "batch_size", "workers", "calib_samples", "no_calibrate", "val_num_samples", "device"},
    "calibrate": {"num_samples", "method", "data_dir", "batch_size", "workers", "device"},
    "export": {"onnx", "fuse_bn", "data_dir", "calib_samples", "device"},
    "profile": {"input_size", "batch_size", "device"},
    "serve": {"input_size", "batch_size", "device"},
}
REFUSALS = {"config": "a slim train checkpoint carries its config"}


class TimmCheckpoint(OpenedCheckpoint):
    """A ``slim train`` checkpoint: the timm model rebuilt from its stored config, weights loaded."""

    framework = "timm"
    metric_columns = (("top1", "top-1 %", "{:.2f}"), ("top5", "top-5 %", "{:.2f}"))

    def __init__(self, args, default_device: str):
        device = torch.device(_resolve_device(args.device or default_device))
        model, cfg = model_from_checkpoint(args.payload, device)
        self.cfg, self.payload, self.log = _cmd_cfg(cfg, args), args.payload, _Log()
        spec = slim.width_spec(model)
        super().__init__(args.checkpoint, model, spec, resolve_widths(spec, cfg["eval_widths"]), cfg["model"],
                         str(Path(args.checkpoint).resolve().parent), device)
        self.input_size = tuple(cfg["input_size"])

    def example_input(self, batch_size, input_size=None):
        x = torch.randn(batch_size, *self.resolve_input_size(input_size), generator=torch.Generator().manual_seed(0))
        return (_to_input(x, self.device, self.cfg),)

    def calibrate(self, widths, num_samples, method="exact"):
        n = num_samples if num_samples is not None else (self.cfg["calib_samples"] or 2000)
        return _calibrate_from_data(self.model, self.cfg, widths, n, self.device, self.log, method)

    def save_calibrated(self, out, widths):
        extra = {k: v for k, v in self.payload.items() if k not in ("model", "width_spec", "bn_mode")}
        extra["calibrated"] = sorted(set(extra.get("calibrated") or []) | set(widths))
        slim.save_checkpoint(out, self.model.cpu(), **extra)

    def evaluate(self, widths, args):
        cfg = self.cfg
        val = build_datasets(cfg, splits=("val",), log=self.log)["val"]
        idx = subset_indices(len(val), args.val_num_samples or cfg["val_num_samples"], cfg["seed"])
        t0 = time.time()
        res = validate(self.model, make_loader(cfg, val, idx, device=self.device), widths, self.device,
                       cfg["channels_last"])
        self.title = f"{cfg['model']}: {len(idx)} images ({time.time() - t0:.1f}s)"
        return [{"width": w, "top1": res[w]["top1"], "top5": res[w]["top5"]} for w in widths]

    def export(self, w, out, onnx, fuse_bn):
        cfg, model, device = self.cfg, self.model, self.device
        example = torch.zeros(1, *cfg["input_size"], device=device)
        plain = slim.export(model, w, fuse_bn=fuse_bn, example_input=example)
        x = torch.randn(4, *cfg["input_size"], generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad(), slim.width(w):
            diff = float((plain(x) - model(x)).abs().max())
        onnx_path = str(Path(out).with_suffix(".onnx"))
        save_plain(plain, cfg, w, out, fused=fuse_bn)
        msg = ""
        if onnx:
            slim.export_onnx(plain.cpu(), example.cpu(), onnx_path)
            msg = self._check_onnx(onnx_path, plain, x)
        params = sum(p.numel() for p in plain.parameters()) / 1e6
        self.log(f"{type(plain).__name__} at width {w:g}, {params:.3f}M params, max |plain - dynamic| = {diff:.2e}"
                 + (f"; {msg}" if onnx and msg else ""))
        return [out, onnx_path] if onnx else [out]

    @staticmethod
    def _check_onnx(path, plain, x) -> str:
        try:
            import onnxruntime as ort
        except ImportError:
            return ""
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.cpu().numpy()})[0]
        with torch.no_grad():
            return f"onnxruntime max |diff| = {float(np.abs(got - plain(x.cpu()).numpy()).max()):.2e}"


def open_checkpoint(args) -> TimmCheckpoint:
    """The adapter protocol's loader (``slim eval / calibrate / export / profile / serve``); profile and serve
    default to the CPU, the others to CUDA when available."""
    return TimmCheckpoint(args, "cpu" if args.command in ("profile", "serve") else None)
