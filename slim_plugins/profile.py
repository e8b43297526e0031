"""FLOPs / params / latency per width, and the width that fits a budget."""
from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .context import find_state, width as width_ctx
from .context import width_key


@dataclasses.dataclass
class WidthProfile:
    """One row of a profile table.

    Attributes:
        width: width multiplier. mflops: multiply-adds in millions (conv/linear, as the papers count).
        params_m: parameters of the exported sub-network in millions. latency_ms: median forward time in ms
        (``nan`` when not measured).
    """

    width: float
    mflops: float
    params_m: float
    latency_ms: float = float("nan")


class ProfileTable(list):
    """A list of :class:`WidthProfile` rows, narrowest first, with budget lookup and CSV output."""

    def width_for_budget(self, max_latency_ms: float | None = None, max_mflops: float | None = None) -> float:
        """The widest width whose latency (ms) and MFLOPs are within budget.

        Raises:
            ValueError: no budget given, or no width fits (the message names the cheapest width's cost).
        """
        if max_latency_ms is None and max_mflops is None:
            raise ValueError("give max_latency_ms and/or max_mflops")
        ok = [r for r in self if (max_latency_ms is None or r.latency_ms <= max_latency_ms)
              and (max_mflops is None or r.mflops <= max_mflops)]
        if not ok:
            cheapest = min(self, key=lambda r: r.mflops)
            raise ValueError(f"no width fits latency<={max_latency_ms} ms, MFLOPs<={max_mflops}; the narrowest "
                             f"width {cheapest.width} needs {cheapest.latency_ms:.3f} ms, {cheapest.mflops:.1f} MFLOPs")
        return max(ok, key=lambda r: r.width).width

    def to_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["width", "mflops", "params_m", "latency_ms"])
            for r in self:
                w.writerow([r.width, f"{r.mflops:.3f}", f"{r.params_m:.4f}", f"{r.latency_ms:.4f}"])

    @classmethod
    def from_csv(cls, path: str) -> "ProfileTable":
        with open(path) as f:
            return cls(WidthProfile(float(r["width"]), float(r["mflops"]), float(r["params_m"]),
                                    float(r["latency_ms"])) for r in csv.DictReader(f))


@torch.no_grad()
def count_mflops(model, example_input) -> float:
    """Multiply-adds (millions) of one forward of ``model`` on ``example_input`` via ``FlopCounterMode``
    (which counts 2 FLOPs per multiply-add)."""
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            model(example_input)
    finally:
        model.train(was)
    return fc.get_total_flops() / 2e6


@torch.no_grad()
def measure_latency(fn, warmup: int = 3, repeats: int = 20, device=None) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    On a CUDA ``device`` (default: CUDA whenever it is initialised) the device is synchronised before the clock
    starts and before it stops, so the time is that of the kernels, not of their launch.
    """
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() and torch.cuda.is_initialized() else torch.device("cpu"))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile(model, example_input: torch.Tensor, widths: Sequence | None = None, latency: bool = True,
            warmup: int = 3, repeats: int = 20) -> ProfileTable:
    """MFLOPs (multiply-adds), params (M) and median latency (ms) of ``model`` at each width.

    Args:
        example_input: e.g. ``(1, 3, 224, 224)``; FLOPs and latency are for this batch.
        widths: default: the switches, or 0.25-steps... of the range (min, max and the quarter points inside).

    Raises:
        WidthError: a width not allowed; UncalibratedWidthError: a width with no BN statistics.
    """
    from .export import export  # local: export imports profile users

    state = find_state(model)
    spec = state.spec
    if widths is None:
        widths = list(spec.widths) if spec.is_switches else sorted(
            {spec.min, spec.max, *[w for w in (0.25, 0.5, 0.75, 1.0) if spec.min <= w <= spec.max]})
    rows = ProfileTable()
    was = model.training
    model.eval()
    try:
        if latency:  # warm every width up first: the first widths timed would otherwise carry the process's warm-up
            with torch.no_grad():
                for _ in range(warmup):
                    for w in widths:
                        with width_ctx(spec.validate(w)):
                            model(example_input)
        for w in widths:
            w = spec.validate(w)
            with width_ctx(w):
                mflops = count_mflops(model, example_input)
                lat = measure_latency(lambda: model(example_input), warmup, repeats, example_input.device) \
                    if latency else float("nan")
            plain = export(model, w, example_input=example_input)
            params = sum(p.numel() for p in plain.parameters()) / 1e6
            rows.append(WidthProfile(w, mflops, params, lat))
    finally:
        model.train(was)
    return rows


__all__ = ["profile", "ProfileTable", "WidthProfile", "count_mflops", "measure_latency", "width_key"]
