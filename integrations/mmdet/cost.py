"""Cost of a width: MFLOPs of backbone + FPN at the test image size and params of the detector."""
from __future__ import annotations

import math

import torch

import slim_plugins as slim

from .model import _module

__all__ = ["width_cost", "detector_input_size"]


def width_cost(runner, w, x: torch.Tensor | None = None) -> dict:
    """MFLOPs (multiply-adds) of backbone + FPN for ``x`` (default: one image at the test size), and the params (M)
    of the whole detector at width ``w`` (heads are shared: every width's cost differs only there)."""
    cache = runner.__dict__.setdefault("_slim_cost", {})
    key = (w, None if x is None else tuple(x.shape))
    if key not in cache:
        from torch.utils.flop_counter import FlopCounterMode

        module = _module(runner.model)
        if x is None:
            h, wd = detector_input_size(runner.cfg)
            x = torch.zeros(1, 3, h, wd, device=next(module.parameters()).device)
        was = module.training
        module.eval()
        try:
            with torch.no_grad(), slim.width(w), FlopCounterMode(display=False) as fc:
                module.extract_feat(x)
        finally:
            module.train(was)
        params = sum(int(t.numel()) for t in _width_params(module, w))
        cache[key] = {"mflops": fc.get_total_flops() / 2e6, "params_m": params / 1e6}
    return cache[key]


def _width_params(module, w):
    """The parameter tensors of the plain detector at width ``w`` (exported weights, no BN statistics)."""
    from .export import _example_input

    plain = slim.export(module, w, example_input=_example_input(module))
    return [p for p in plain.parameters()]


def detector_input_size(cfg) -> tuple[int, int]:
    """``(H, W)`` of the test pipeline's ``Resize`` scale (long side, short side as mmdet writes it), rounded up to
    the data preprocessor's ``pad_size_divisor``; ``(800, 1333)`` if the config has none."""
    scale = None
    try:
        for t in cfg.test_dataloader.dataset.pipeline:
            if str(t.get("type")).split(".")[-1] in ("Resize", "KeypointResize") and t.get("scale"):
                scale = t["scale"]
    except (AttributeError, KeyError, TypeError):
        pass
    long_side, short_side = (max(scale), min(scale)) if scale else (1333, 800)
    div = int(cfg.model.get("data_preprocessor", {}).get("pad_size_divisor", 32) or 1)
    up = lambda v: int(math.ceil(v / div) * div)  # noqa: E731
    return up(short_side), up(long_side)
