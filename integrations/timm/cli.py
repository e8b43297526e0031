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
from slim_plugins.errors import ConfigError

from slim_plugins.config import parse_overrides
from slim_plugins.spectrum import plot_spectrum, print_table, write_spectrum_csv
from .config import resolve_config, resolve_widths
from .data import build_datasets, make_loader, subset_indices
from .outputs import save_plain, write_yaml
from .train import _resolve_device, _to_input, build_model, calibration_line, train, validate

__all__ = ["model_from_checkpoint", "uncalibrated_widths", "save_plain", "write_yaml", "cmd_train", "cmd_eval",
           "cmd_calibrate", "cmd_export", "cmd_profile", "cmd_serve"]


def uncalibrated_widths(model, widths) -> list[float]:
    """The widths of ``widths`` that have no BN statistics yet (US-Nets; always empty for S-Nets)."""
    have = slim.calibrated_widths(model, widths)
    return [w for w in widths if w not in have]


class _Log:
    def __init__(self):
        from rich.console import Console

        self.console = Console(highlight=False)

    def __call__(self, *msg):
        self.console.print(*msg, soft_wrap=True)


def _open(args):
    """``(log, device, model, cfg, spec)`` of the checkpoint a command names (``--data-dir`` etc. applied)."""
    device = torch.device(_resolve_device(args.device))
    model, cfg = model_from_checkpoint(args.payload, device)
    return _Log(), device, model, _cmd_cfg(cfg, args), slim.width_spec(model)


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
    user = file_cfg if args.config else None
    train(user, overrides, resume=args.resume, default=bool(args.default) or (user is None and not args.resume))
    return 0


def cmd_eval(args) -> int:
    """``slim eval CKPT [--widths ...|--step S] [--data DIR] [--csv PATH]``: top-1/top-5 per width."""
    log, device, model, cfg, spec = _open(args)
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
    loader = make_loader(cfg, val, idx, device=device)
    t0 = time.time()
    res = validate(model, loader, widths, device, cfg["channels_last"])
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
    log, device, model, cfg, spec = _open(args)
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
    extra = {k: v for k, v in args.payload.items() if k not in ("model", "width_spec", "bn_mode")}
    extra["calibrated"] = sorted(set(extra.get("calibrated") or []) | set(widths))
    slim.save_checkpoint(out, model.cpu(), **extra)
    log(f"wrote {out} (calibrated widths {[f'{w:g}' for w in extra['calibrated']]})")
    return 0


def cmd_export(args) -> int:
    """``slim export CKPT --width W [--onnx] [--fuse-bn] [--out PATH]``: a plain timm model at width W."""
    log, device, model, cfg, spec = _open(args)
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
                          f"width_{w:g}{'_fused' if args.fuse_bn else ''}.pth")
    save_plain(plain, cfg, w, out, fused=args.fuse_bn)
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

    log, device, model, cfg, spec = _open(args)
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
    log, device, model, cfg, spec = _open(args)
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
