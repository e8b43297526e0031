"""The spectrum: one row per width (``width``, ``mflops``, ``params_m`` and the task's metrics), written as an
atomic CSV that ``slim spectrum`` and :meth:`slim_plugins.profile.ProfileTable.from_csv` read back, a rich table,
and an accuracy-vs-MFLOPs plot (matplotlib).
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import ConfigError

SPECTRUM_FIELDS = ("width", "mflops", "params_m", "top1", "top5")  # the classification columns


def write_spectrum_csv(rows: Sequence[dict], path: str) -> str:
    """Write per-width rows to ``path`` atomically; returns ``path``.

    Columns: ``width, mflops, params_m`` (MFLOPs = multiply-adds, params in millions), then the metrics of the
    first row in its order: ``top1, top5`` (%) for classifiers, ``bbox_AP, bbox_AP50, ...`` (%) for detectors,
    ``psnr, ssim`` for SR, ... A metric a row lacks is left empty.
    """
    metrics = [k for k in (rows[0] if rows else {}) if k not in ("width", "mflops", "params_m")]
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".csv.tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["width", "mflops", "params_m", *metrics])
            for r in rows:
                w.writerow([f"{r['width']:g}", f"{r['mflops']:.3f}", f"{r['params_m']:.4f}",
                            *("" if r.get(k) is None else f"{r[k]:.4f}" for k in metrics)])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def spectrum_metrics(rows: Sequence[dict]) -> list[str]:
    """The metric columns of spectrum rows (all but ``width, mflops, params_m``, and latency)."""
    skip = {"width", "mflops", "params_m", "latency_ms"}
    return [k for k in (rows[0] if rows else {}) if k not in skip]


def read_spectrum_csv(path: str) -> list[dict]:
    """Rows of a spectrum CSV as dicts of floats.

    Raises:
        FileNotFoundError: no such file. ConfigError: ``width`` / ``mflops`` or every metric column is missing.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"spectrum CSV {path!r} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        names = list(reader.fieldnames or [])
        missing = [c for c in ("width", "mflops") if c not in names]
        if missing or not [c for c in names if c not in ("width", "mflops", "params_m", "latency_ms")]:
            raise ConfigError(f"{path!r} lacks column(s) {missing or ['<a metric>']}; a spectrum CSV has width, "
                              "mflops, params_m and metric columns (top1, bbox_AP, psnr, ...), written by "
                              "`slim train` and `slim eval --csv`")
        rows = []
        for line, r in enumerate(reader, start=2):
            if None in r:  # more cells than the header names
                raise ConfigError(f"{path!r} line {line}: {len(names) + len(r[None])} cells under {len(names)} "
                                  "columns")
            try:
                row = {k: float(v) for k, v in r.items() if v not in (None, "")}
            except ValueError as e:
                raise ConfigError(f"{path!r} line {line}: {e}") from None
            if "width" not in row or "mflops" not in row:
                raise ConfigError(f"{path!r} line {line}: the width / mflops cell is empty")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{path!r} has a header but no rows")
    return rows


_METRIC_LABELS = {"top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)", "bbox_AP": "box AP (%)",
                  "segm_AP": "mask AP (%)", "keypoints_AP": "keypoint AP (%)", "psnr": "PSNR (dB)"}


def plot_spectrum(sources: Sequence, out: str, labels: Sequence[str] | None = None, title: str | None = None,
                  x: str = "mflops", metric: str | None = None) -> str:
    """Plot a metric (default: the first metric column, e.g. top-1 %, box AP %) against MFLOPs (or ``x="width"``
    / ``"params_m"``) for one or more runs.

    Args:
        sources: spectrum CSV paths and/or lists of row dicts.
        out: PNG path (written atomically with matplotlib's Agg backend).
    Raises:
        ConfigError: an unknown axis, or ``metric`` missing from a source.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    xlabel = {"mflops": "MFLOPs (multiply-adds)", "width": "width multiplier", "params_m": "params (M)"}
    if x not in xlabel:
        raise ConfigError(f"x axis must be one of {sorted(xlabel)}, got {x!r}")
    if labels is not None and len(labels) != len(sources):
        raise ConfigError(f"{len(labels)} label(s) for {len(sources)} spectrum source(s); give one per source")
    # read and check every source before drawing anything
    tables = [read_spectrum_csv(src) if isinstance(src, (str, os.PathLike)) else list(src) for src in sources]
    for src, rows in zip(sources, tables):
        m = metric or (spectrum_metrics(rows) or [None])[0]
        if m is None or any(m not in r for r in rows) or any(x not in r for r in rows):
            raise ConfigError(f"metric {m!r} / axis {x!r} is not in every row of "
                              f"{src if isinstance(src, (str, os.PathLike)) else 'the rows'}; it has "
                              f"{spectrum_metrics(rows)}")
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, (src, rows) in enumerate(zip(sources, tables)):
        rows = sorted(rows, key=lambda r: r[x])
        metric = metric or spectrum_metrics(rows)[0]
        if labels and i < len(labels):
            label = labels[i]
        elif isinstance(src, (str, os.PathLike)):  # a run's spectrum.csv is named after its run folder
            label = Path(src).parent.name if Path(src).stem == "spectrum" else Path(src).stem
        else:
            label = f"run {i}"
        ax.plot([r[x] for r in rows], [r[metric] for r in rows], marker="o", ms=3.5, label=label)
        if len(rows) <= 16:
            for r in rows:
                ax.annotate(f"{r['width']:g}x", (r[x], r[metric]), textcoords="offset points", xytext=(3, -9),
                            fontsize=6.5, alpha=0.8)
    ax.set_xlabel(xlabel[x])
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    ax.set_title(title or "FLOPs-accuracy spectrum")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".png.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def print_table(rows: Sequence[dict], title: str = "", columns: Sequence[tuple] | None = None, console=None) -> None:
    """Print per-width rows as a rich table (columns: ``(key, header, format)``)."""
    from rich.console import Console
    from rich.table import Table

    columns = columns or (("width", "width", "{:g}"), ("mflops", "MFLOPs", "{:.2f}"),
                          ("params_m", "params (M)", "{:.3f}"), ("top1", "top-1 %", "{:.2f}"),
                          ("top5", "top-5 %", "{:.2f}"))
    table = Table(title=title or None)
    for _, head, _ in columns:
        table.add_column(head, justify="right")
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        table.add_row(*cells)
    (console or Console()).print(table)


__all__ = ["SPECTRUM_FIELDS", "write_spectrum_csv", "read_spectrum_csv", "spectrum_metrics", "plot_spectrum",
           "print_table"]
