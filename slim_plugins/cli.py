"""The ``slim`` command: train / eval / calibrate / export / profile / serve / spectrum.

Framework-free: argument parsing, config files (YAML with ``${ENV}`` expansion), the spectrum CSV and plot, and
dispatch to the commands module each adapter registers under the entry-point group ``slim_plugins.frameworks``,
imported only when a command needs it. The framework comes from the config (its ``framework:`` key, or the
adapter that claims the file, e.g. by suffix) or the checkpoint's ``"framework"`` entry (default ``timm``)::

    slim train configs/timm/cifar10_us_mobilenetv2.yaml      # timm-style YAML + slimmable keys
    slim train                                               # embedded default: sklearn digits, ~1 min on CPU
    slim train --resume output/run/last.pth.tar --epochs 20
    slim train configs/basicsr/us_wdsr_x2_sr.yml             # BasicSR options: its own train_pipeline
    slim eval output/run/last.pth.tar --widths 0.35 0.5 1.0
    slim calibrate output/run/last.pth.tar --widths 0.6 --num-samples 2000
    slim export output/run/last.pth.tar --width 0.5 --onnx --fuse-bn
    slim profile output/run/last.pth.tar --input-size 3 32 32 --csv profile.csv
    slim serve output/run/last.pth.tar --budget-ms 5 --calls 1000 --plot serve.png
    slim spectrum run_a/spectrum.csv run_b/spectrum.csv -o compare.png

Errors of the library (:class:`~slim_plugins.errors.SlimError`), bad configs and missing files print one line
``error: <Type>: <message>`` on stderr and exit with status 2 (``SLIM_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from .errors import SlimError

SPECTRUM_FIELDS = ("width", "mflops", "params_m", "top1", "top5")  # the classification columns


class ConfigError(SlimError, ValueError):
    """A config file or command-line override is malformed: unknown key, wrong type, unreadable YAML."""


# ---- config files ----------------------------------------------------------------------------------------------
def default_data_root() -> str:
    """``$SLIM_DATA``: the folder that holds the datasets (``cifar10/``, ``coco128/``, ``sr/``, ...).

    Raises:
        ConfigError: ``SLIM_DATA`` is not set (give the data root in the config, e.g. ``data_dir``, or set it).
    """
    env = os.environ.get("SLIM_DATA")
    if not env:
        raise ConfigError("SLIM_DATA is not set: set it to the folder that holds the datasets (cifar10/, "
                          "coco128/, sr/, ...) or give the data root in the config (data_dir / dataroot)")
    return env


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_env(value: str) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``$VAR`` (and ``~``).

    Raises:
        ConfigError: an unset variable without a default (``SLIM_DATA``: with what to set it to).
    """

    def sub(m):
        name = m.group(1) or m.group(3)
        if name in os.environ:
            return os.environ[name]
        if m.group(2) is not None:
            return m.group(2)
        if name == "SLIM_DATA":
            return default_data_root()  # raises with the hint
        raise ConfigError(f"environment variable {name!r} used in the config ({value!r}) is not set")

    return os.path.expanduser(_ENV.sub(sub, value))


def _expand_all(obj):
    if isinstance(obj, str):
        return expand_env(obj) if ("$" in obj or obj.startswith("~")) else obj
    if isinstance(obj, dict):
        return {k: _expand_all(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand_all(v) for v in obj]
    return obj


def load_yaml_config(path: str) -> dict:
    """Read a YAML config file into a dict, expanding environment variables in string values.

    Raises:
        FileNotFoundError: no such file. ConfigError: not YAML, or not a mapping at the top level.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return _expand_all(data)


def parse_overrides(items: Iterable[str]) -> dict:
    """``["lr=0.1", "widths=[0.5, 1.0]"]`` -> ``{"lr": 0.1, "widths": [0.5, 1.0]}`` (values parsed as YAML).

    Raises:
        ConfigError: an item without ``=``.
    """
    import yaml

    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. lr=0.05)")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = _expand_all(yaml.safe_load(v))
        except yaml.YAMLError:
            out[k.strip().replace("-", "_")] = v
    return out


# ---- spectrum CSV / table / plot -------------------------------------------------------------------------------
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
        return [{k: float(v) for k, v in r.items() if v not in (None, "")} for r in reader]


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
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, src in enumerate(sources):
        rows = read_spectrum_csv(src) if isinstance(src, (str, os.PathLike)) else list(src)
        rows = sorted(rows, key=lambda r: r[x])
        metric = metric or spectrum_metrics(rows)[0]
        if any(metric not in r for r in rows):
            raise ConfigError(f"metric {metric!r} is not in {src if isinstance(src, str) else 'the rows'}; it has "
                              f"{spectrum_metrics(rows)}")
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


# ---- argument parsing ------------------------------------------------------------------------------------------
def requested_widths(args, settings) -> list:
    """The widths an adapter's eval / profile / serve command works on: ``--widths`` (each checked against
    ``settings.spec``), else a ``--step`` sweep of the spec, else ``settings.eval_widths``.

    Raises:
        WidthError: a width outside the spec.
    """
    if getattr(args, "widths", None):
        return [settings.spec.validate(w) for w in args.widths]
    if getattr(args, "step", None):
        return settings.spec.grid(args.step)
    return list(settings.eval_widths)


def _width_list(values):
    from .errors import WidthError

    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(float(part))
            except ValueError:
                raise WidthError(f"--widths: {part!r} is not a number (give width multipliers such as 0.5 1.0)") \
                    from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slim", description="Train, evaluate, calibrate, export and profile "
                                "slimmable networks (S-Nets / US-Nets).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train from a config: timm args.yaml, mmdet .py, BasicSR options .yml",
                       description="Train from CONFIG: a timm YAML (the keys of timm train.py's args.yaml + the "
                       "slimmable keys), an "
                       "mmdet/mmengine .py config, or a BasicSR options .yml (model_type + network_g). Without "
                       "CONFIG (or with --default) runs the embedded default: sklearn handwritten digits, a small "
                       "US-Net.")
    t.add_argument("config", nargs="?", help="config file (see configs/timm, configs/mmdet, configs/basicsr)")
    t.add_argument("--default", action="store_true", help="run the embedded digits job (ignores CONFIG's data)")
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint written by slim train")
    t.add_argument("--output", help="run directory (default: config 'output', or the resumed checkpoint's folder)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", "-b", type=int, dest="batch_size")
    t.add_argument("--lr", type=float)
    t.add_argument("--workers", "-j", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    t.add_argument("--data-dir", dest="data_dir")
    t.add_argument("--onnx", action="store_true", default=None, help="also export ONNX per width")
    t.add_argument("--set", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, value parsed as YAML (repeatable)")

    e = sub.add_parser("eval", help="the framework's metric (top-1, COCO AP, PSNR/SSIM) at several widths")
    e.add_argument("checkpoint")
    e.add_argument("--widths", nargs="+", help="widths, or one step for a sweep with --step")
    e.add_argument("--step", type=float, help="evaluate min..max in this step (US-Nets)")
    e.add_argument("--data-dir", "--data", dest="data_dir", help="data root (default: the checkpoint's config)")
    e.add_argument("--batch-size", "-b", type=int, dest="batch_size")
    e.add_argument("--workers", "-j", type=int)
    e.add_argument("--calib-samples", type=int, dest="calib_samples",
                   help="post-statistics samples for uncalibrated widths (default: config calib_samples)")
    e.add_argument("--no-calibrate", action="store_true", help="fail on uncalibrated widths instead")
    e.add_argument("--val-num-samples", type=int, dest="val_num_samples", help="evaluate a subset")
    e.add_argument("--csv", help="write a spectrum CSV here")
    e.add_argument("--plot", help="write a spectrum PNG here")
    e.add_argument("--device")
    e.add_argument("--config", help="framework config when the checkpoint does not carry one (mmengine)")

    c = sub.add_parser("calibrate", help="BN post-statistics for widths; writes a new checkpoint atomically")
    c.add_argument("checkpoint")
    c.add_argument("--widths", nargs="+", help="widths to calibrate (default: the config's eval widths)")
    c.add_argument("--step", type=float)
    c.add_argument("--num-samples", type=int, dest="num_samples", help="training samples per width (default 2000)")
    c.add_argument("--method", choices=("exact", "moving"), default="exact")
    c.add_argument("--data-dir", "--data", dest="data_dir")
    c.add_argument("--batch-size", "-b", type=int, dest="batch_size")
    c.add_argument("--workers", "-j", type=int)
    c.add_argument("--out", help="output checkpoint (default: <name>-calibrated.pth.tar next to the input)")
    c.add_argument("--in-place", action="store_true", help="replace the input checkpoint (atomic)")
    c.add_argument("--device")

    x = sub.add_parser("export", help="plain fixed-width model (torch.save) and optionally ONNX")
    x.add_argument("checkpoint")
    x.add_argument("--width", required=True, type=float)
    x.add_argument("--onnx", action="store_true", help="also write an ONNX graph (dynamic batch)")
    x.add_argument("--fuse-bn", action="store_true", dest="fuse_bn", help="fold BN into the preceding conv")
    x.add_argument("--out", help="output .pth (default: <ckpt dir>/exported/width_<w>.pth)")
    x.add_argument("--data-dir", "--data", dest="data_dir", help="data for post-statistics if uncalibrated")
    x.add_argument("--calib-samples", type=int, dest="calib_samples")
    x.add_argument("--device")
    x.add_argument("--config", help="framework config when the checkpoint does not carry one (mmengine)")

    pr = sub.add_parser("profile", help="MFLOPs, params and latency per width (rich table; CSV)")
    pr.add_argument("checkpoint")
    pr.add_argument("--widths", nargs="+")
    pr.add_argument("--step", type=float)
    pr.add_argument("--input-size", nargs="+", type=int, dest="input_size",
                    help="H, H W or C H W (default: the config's input size)")
    pr.add_argument("--batch-size", "-b", type=int, default=1, dest="batch_size")
    pr.add_argument("--no-latency", action="store_true", dest="no_latency")
    pr.add_argument("--repeats", type=int, default=20)
    pr.add_argument("--csv", help="write the table as CSV (width, mflops, params_m, latency_ms)")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--config", help="framework config when the checkpoint does not carry one (mmengine)")

    sv = sub.add_parser("serve", help="serve a checkpoint under a latency budget, switching width as the machine's "
                        "speed changes (live display; PNG of latency and width over time)")
    sv.add_argument("checkpoint")
    sv.add_argument("--budget-ms", type=float, required=True, dest="budget_ms", help="latency budget per call (ms)")
    sv.add_argument("--percentile", type=float, default=95.0, help="the budget holds for this percentile (95)")
    sv.add_argument("--calls", type=int, default=500)
    sv.add_argument("--widths", nargs="+", help="widths it may use (default: the calibrated ones)")
    sv.add_argument("--step", type=float)
    sv.add_argument("--table", help="profile CSV (slim profile --csv) instead of profiling now")
    sv.add_argument("--input-size", nargs="+", type=int, dest="input_size",
                    help="H, H W or C H W (default: the config's input size)")
    sv.add_argument("--batch-size", "-b", type=int, default=1, dest="batch_size")
    sv.add_argument("--plot", default="serve.png", help="PNG of latency and width over time (serve.png)")
    sv.add_argument("--csv", help="write every call (t_s, width, latency_ms, expected_ms, budget_ms)")
    sv.add_argument("--no-live", action="store_true", dest="no_live", help="no live display")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--config", help="framework config when the checkpoint does not carry one (mmengine)")

    s = sub.add_parser("spectrum", help="plot the FLOPs-accuracy spectrum of one or more spectrum CSVs")
    s.add_argument("csv", nargs="+")
    s.add_argument("-o", "--out", default="spectrum.png")
    s.add_argument("--labels", nargs="+")
    s.add_argument("--title")
    s.add_argument("--x", choices=("mflops", "width", "params_m"), default="mflops")
    s.add_argument("--metric", help="metric column to plot (default: the first: top1, bbox_AP, psnr, ...)")
    return p


#: Entry-point group through which each framework adapter registers its commands module: a module with
#: ``cmd_train(args, cfg)``, ``cmd_eval(args)``, ... and optionally ``CONFIG_SUFFIXES`` (file suffixes it reads,
#: e.g. ``(".py",)`` for mmengine configs) and ``claims_config(path, cfg) -> bool``.
ENTRY_POINT_GROUP = "slim_plugins.frameworks"


def frameworks() -> dict:
    """``{framework name: entry point}`` of the installed adapters (``slim_plugins.frameworks`` group)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _integration(framework: str):
    eps = frameworks()
    ep = eps.get(framework)
    if ep is None:
        raise ConfigError(f"no trainer for framework {framework!r}; installed: {sorted(eps) or ['(none)']} "
                          f"(adapters register under the entry-point group {ENTRY_POINT_GROUP!r})")
    return ep.load()


def framework_of_config(path: str, cfg: dict | None) -> str:
    """The framework a config file belongs to: its ``framework:`` key, else the first adapter claiming the file
    (by suffix / ``claims_config``), else ``timm`` for YAML."""
    if cfg and cfg.get("framework"):
        return str(cfg["framework"])
    suffix = Path(path).suffix.lower()
    for name, ep in sorted(frameworks().items()):
        try:
            mod = ep.load()
        except ImportError:
            continue  # an adapter whose framework is not installed cannot claim anything
        suffixes = tuple(getattr(mod, "CONFIG_SUFFIXES", ()))
        claims = getattr(mod, "claims_config", None)
        if suffix in suffixes and (claims is None or claims(path, cfg)):
            return name
    if suffix in (".yaml", ".yml") or cfg is not None:
        return "timm"
    raise ConfigError(f"no installed adapter reads {path!r} (suffix {suffix!r}); installed: {sorted(frameworks())}")


def _checkpoint_claimed(path: str) -> str | None:
    """The adapter whose ``claims_checkpoint(path)`` accepts a checkpoint in its framework's own format (an
    mmengine checkpoint), or ``None``."""
    for name, ep in sorted(frameworks().items()):
        try:
            mod = ep.load()
        except ImportError:
            continue
        claims = getattr(mod, "claims_checkpoint", None)
        if claims is not None and claims(path):
            return name
    return None


def _dispatch(args) -> int:
    if args.command == "spectrum":
        out = plot_spectrum(args.csv, args.out, labels=args.labels, title=args.title, x=args.x, metric=args.metric)
        print(f"wrote {out}")
        return 0
    for attr in ("widths",):
        if getattr(args, attr, None) is not None:
            setattr(args, attr, _width_list(getattr(args, attr)))
    if args.command == "train":
        cfg = {}
        framework = "timm"
        if args.config and args.default:
            raise ConfigError("give either CONFIG or --default, not both")
        if args.config:
            if not os.path.isfile(args.config):
                raise FileNotFoundError(f"config file {str(args.config)!r} does not exist")
            cfg = load_yaml_config(args.config) if Path(args.config).suffix.lower() in (".yaml", ".yml") else None
            framework = framework_of_config(args.config, cfg)
    else:
        from .checkpoint import read_checkpoint
        from .errors import CheckpointError

        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
        try:
            args.payload = read_checkpoint(args.checkpoint)
            framework = args.payload.get("framework", "timm")
        except CheckpointError:
            framework = _checkpoint_claimed(args.checkpoint)  # another framework's checkpoint format
            if framework is None:
                raise
            args.payload = None
        cfg = None
    mod = _integration(framework)
    fn = getattr(mod, f"cmd_{args.command}", None)
    if fn is None:
        raise ConfigError(f"the {framework!r} integration has no `slim {args.command}` command")
    return int(fn(args, cfg) or 0) if args.command == "train" else int(fn(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slim`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (SlimError, FileNotFoundError, ValueError) as e:
        if os.environ.get("SLIM_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
