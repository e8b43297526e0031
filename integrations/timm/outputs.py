"""What a timm run writes (rank 0): the resolved config as YAML, plain exported models and the spectrum (CSV, plot,
exported widths), each file atomically. Shared by the trainer (:mod:`.train`) and the commands (:mod:`.cli`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import slim_plugins as slim
from slim_plugins.checkpoint import atomic_write
from slim_plugins.spectrum import plot_spectrum, write_spectrum_csv


def to_input(x, device, cfg):
    """A batch on ``device`` in the run's memory format (channels-last when ``cfg["channels_last"]``)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if cfg["channels_last"] else x


def _yaml_plain(obj):
    if isinstance(obj, dict):
        return {str(k): _yaml_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_yaml_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def write_yaml(obj, path) -> None:
    """``obj`` as YAML at ``path``, atomically."""
    import yaml

    atomic_write(str(path), lambda f: f.write(yaml.safe_dump(_yaml_plain(obj), sort_keys=False)), mode="w")


def save_plain(plain, cfg, w, path, fused) -> None:
    """A plain exported model with what it takes to run it (input size, normalisation), atomically."""
    arch = {"model": cfg["model"], "width": w, "num_classes": cfg["num_classes"], "input_size": cfg["input_size"],
            "mean": cfg["mean"], "std": cfg["std"], "interpolation": cfg["interpolation"],
            "crop_pct": cfg["crop_pct"], "cifar_stem": cfg["cifar_stem"], "fused_bn": fused}
    payload = {"model": plain, "state_dict": plain.state_dict(), "arch": arch, "framework": "timm"}
    atomic_write(path, lambda f: torch.save(payload, f))


def write_spectrum(model, cfg, eval_widths, export_widths, results, run: Path, val_x, log, writer, suffix="") -> list:
    """MFLOPs / params per width, ``spectrum<suffix>.csv`` + ``.png``, exported plain models (rank 0)."""
    dev = next(model.parameters()).device
    example = to_input(torch.zeros(1, *cfg["input_size"]), dev, cfg)
    rows = []
    for w in sorted(set(eval_widths) | set(export_widths)):
        plain = slim.export(model, w, example_input=example)
        if w in eval_widths:
            with slim.width(w):
                mflops = slim.count_mflops(model, example)
            rows.append({"width": w, "mflops": mflops, "params_m": sum(p.numel() for p in plain.parameters()) / 1e6,
                         "top1": results[w]["top1"], "top5": results[w]["top5"]})
        if w in export_widths:
            if cfg["fuse_bn"]:
                plain = slim.export(model, w, fuse_bn=True, example_input=example)
            path = run / "exported" / f"width_{w:g}.pth"
            x = to_input(val_x, dev, cfg)
            with torch.no_grad(), slim.width(w):
                model.eval()
                diff = float((plain(x) - model(x)).abs().max())
            save_plain(plain, cfg, w, str(path), fused=bool(cfg["fuse_bn"]))
            if cfg["onnx"]:
                slim.export_onnx(plain.cpu(), example.cpu().contiguous(), str(path.with_suffix(".onnx")))
            if diff > 1e-3:
                log(f"warning: exported width {w:g} differs from the dynamic model by {diff:.2e}")
        if writer is not None and w in eval_widths:
            for k in ("top1", "top5", "mflops"):
                writer.add_scalar(f"final/{k}", rows[-1][k], int(round(w * 1000)))
    write_spectrum_csv(rows, str(run / f"spectrum{suffix}.csv"))
    plot_spectrum([rows], str(run / f"spectrum{suffix}.png"), labels=[cfg["model"] + suffix],
                  title=f"{cfg['model']}{suffix}: FLOPs-accuracy spectrum")
    return rows


__all__ = ["to_input", "write_yaml", "save_plain", "write_spectrum"]
