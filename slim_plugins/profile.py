"""FLOPs / params / latency per width, and the width that fits a budget."""
from __future__ import annotations

import csv
import math
import os
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

    def to_csv(self, path: str) -> str:
        """``width, mflops, params_m, latency_ms`` per width, written atomically (an unmeasured latency is an empty
        cell); the format :meth:`from_csv` and ``slim serve --table`` read."""
        import io

        from .checkpoint import atomic_write

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["width", "mflops", "params_m", "latency_ms"])
        for r in self:
            lat = "" if r.latency_ms is None or math.isnan(r.latency_ms) else f"{r.latency_ms:.4f}"
            w.writerow([f"{r.width:g}", f"{r.mflops:.3f}", f"{r.params_m:.4f}", lat])
        return atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")

    @classmethod
    def from_csv(cls, path: str) -> "ProfileTable":
        """Read a table written by :meth:`to_csv` (``slim profile --csv``) or a spectrum CSV with ``latency_ms``.

        Raises:
            FileNotFoundError: no such file. ConfigError: a missing column, an empty or non-numeric cell (but
            ``latency_ms``, which reads as NaN when not measured), no rows.
        """
        from .errors import ConfigError

        if not os.path.isfile(path):
            raise FileNotFoundError(f"profile table {path!r} does not exist")
        need = ("width", "mflops", "params_m", "latency_ms")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in need if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"{path!r} lacks column(s) {missing}; a profile table (slim profile --csv) has "
                                  f"{list(need)}")
            out = cls()
            for line, r in enumerate(reader, start=2):
                try:
                    if None in r:
                        raise ValueError("more cells than columns")
                    lat = r["latency_ms"]
                    out.append(WidthProfile(float(r["width"]), float(r["mflops"]), float(r["params_m"]),
                                            float("nan") if lat in ("", None) else float(lat)))
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{path!r} line {line}: {e} (every row needs numbers in {list(need)}; "
                                      "an empty latency cell reads as NaN)") from None
        if not out:
            raise ConfigError(f"{path!r} has no rows")
        return out


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

    state = find_state(model, adopt=True)
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
