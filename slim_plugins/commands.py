"""The checkpoint verbs of the ``slim`` command, written once for every adapter: ``eval``, ``calibrate``,
``export``, ``profile``, ``serve`` (the adapter protocol: :mod:`slim_plugins.adapter`).

Order of work in every verb: the options are checked against what the adapter honours and every value is
validated (:func:`check_options`, :func:`check_values`) before the checkpoint is opened; output paths are checked
before any computation; every file is written atomically (a temporary file in the same folder, then
``os.replace``), so a refused or failed command leaves no new, partial or changed file.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

from .adapter import CORE_OPTIONS, VERB_OPTIONS, NotApplicableError, OpenedCheckpoint
from .errors import ConfigError, WidthError

#: Default values of options the parser leaves as ``None`` (so that "given" can be told from "default").
DEFAULTS = {"batch_size": 1, "repeats": 20, "percentile": 95.0, "calls": 500, "method": "exact"}


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_options(args, verb: str) -> list[str]:
    """The options of ``verb`` given on the command line (a value other than the parser's ``None`` / ``False``
    / ``[]``)."""
    out = []
    for name in VERB_OPTIONS[verb]:
        v = getattr(args, name, None)
        if v is None or v is False or (isinstance(v, list) and not v and name == "set"):
            continue
        out.append(name)
    return out


def check_options(adapter, framework: str, verb: str, args) -> None:
    """Refuse every given option that the adapter does not read for ``verb`` (no silent fallback).

    Raises:
        NotApplicableError: the adapter has no such verb, or an option it does not honour was given (the message
            names each and, where the adapter says, why).
    """
    honours = getattr(adapter, "HONOURS", None)
    why_not = (getattr(adapter, "NOT_APPLICABLE", None) or {}).get(verb)
    if why_not:
        raise NotApplicableError(f"`slim {verb}` does not apply to {framework} checkpoints: {why_not}")
    if honours is None or verb not in honours:
        raise NotApplicableError(f"the {framework!r} adapter has no `slim {verb}`")
    ok = set(honours[verb]) | (set(CORE_OPTIONS[verb]) if verb != "train" else {"set"})
    reasons = getattr(adapter, "REFUSALS", {}) or {}
    bad = [n for n in given_options(args, verb) if n not in ok]
    if bad:
        why = "; ".join(f"{option_flag(n)}: {reasons[n]}" for n in bad if n in reasons)
        raise NotApplicableError(
            f"{', '.join(option_flag(n) for n in bad)} {'does' if len(bad) == 1 else 'do'} not apply to "
            f"`slim {verb}` on a {framework} {'config' if verb == 'train' else 'checkpoint'}"
            + (f" ({why})" if why else "") + f"; it reads {sorted(option_flag(n) for n in ok)}")


# ---- values -------------------------------------------------------------------------------------------------------
def _positive_int(args, name: str, minimum: int = 1) -> None:
    v = getattr(args, name, None)
    if v is not None and v < minimum:
        raise ConfigError(f"{option_flag(name)} must be >= {minimum}, got {v}")


def _positive_float(args, name: str, upper: float | None = None) -> None:
    v = getattr(args, name, None)
    if v is None:
        return
    if not (math.isfinite(v) and v > 0 and (upper is None or v <= upper)):
        rng = f"in (0, {upper:g}]" if upper is not None else "a positive number"
        raise ConfigError(f"{option_flag(name)} must be {rng}, got {v}")


def check_device(device: str | None) -> None:
    """Raises ConfigError: ``device`` is not a torch device of this machine (``cpu``, ``cuda``, ``cuda:N``)."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise ConfigError(f"--device {device!r}: only cpu and cuda devices are supported")
    n = torch.cuda.device_count()
    if n == 0 or (d.index is not None and d.index >= n):
        raise ConfigError(f"--device {device!r}: this machine has {n} CUDA device(s)")


def check_output_path(path: str | None, option: str) -> None:
    """Raises ConfigError: ``path`` is an existing folder, or a folder on its way is a file."""
    if path is None:
        return
    if path == "" or os.path.isdir(path):
        raise ConfigError(f"{option} {path!r} is a folder (or empty); give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"{option} {path!r}: {parent!r} is a file, not a folder")


def check_values(args, verb: str) -> None:
    """Validate every given value of ``verb`` before any work.

    Raises:
        ConfigError / WidthError: an empty or non-numeric width list, a width or step outside (0, 1], a
            non-positive size or count, an unknown device, an output path that is a folder, a missing input file.
    """
    widths = getattr(args, "widths", None)
    if widths is not None:
        if not widths:
            raise WidthError("--widths is empty; give width multipliers such as 0.5 1.0")
        for w in widths:
            if not (math.isfinite(w) and 0 < w <= 1):
                raise WidthError(f"--widths: {w:g} is not a width multiplier in (0, 1]")
    if getattr(args, "step", None) is not None and not (math.isfinite(args.step) and 0 < args.step <= 1):
        raise ConfigError(f"--step must be in (0, 1], got {args.step:g}")
    if getattr(args, "widths", None) and getattr(args, "step", None) is not None:
        raise ConfigError("give --widths or --step, not both")
    if getattr(args, "width", None) is not None and not (math.isfinite(args.width) and 0 < args.width <= 1):
        raise WidthError(f"--width {args.width:g} is not a width multiplier in (0, 1]")
    for name in ("batch_size", "repeats", "calls", "num_samples", "calib_samples", "val_num_samples", "epochs"):
        _positive_int(args, name)
    _positive_int(args, "workers", 0)
    _positive_int(args, "seed", 0)
    _positive_float(args, "lr")
    _positive_float(args, "budget_ms")
    _positive_float(args, "percentile", 100.0)
    size = getattr(args, "input_size", None)
    if size is not None and (not 1 <= len(size) <= 3 or any(v <= 0 for v in size)):
        raise ConfigError(f"--input-size takes H, H W or C H W of positive sizes, got {size}")
    check_device(getattr(args, "device", None))
    for name in ("csv", "plot"):
        check_output_path(getattr(args, name, None), option_flag(name))
    if getattr(args, "no_latency", False) and getattr(args, "repeats", None) is not None:
        raise ConfigError("--repeats times the latency, which --no-latency skips; give one of them")
    if getattr(args, "no_calibrate", False) and getattr(args, "calib_samples", None) is not None:
        raise ConfigError("--calib-samples sizes the calibration that --no-calibrate forbids; give one of them")
    if getattr(args, "in_place", False) and getattr(args, "out", None):
        raise ConfigError("give --out or --in-place, not both")
    for name in ("table", "config", "resume"):
        v = getattr(args, name, None)
        if v is not None and not os.path.isfile(v):
            raise FileNotFoundError(f"{option_flag(name)} {v!r} is not a file")
    d = getattr(args, "data_dir", None)
    if d is not None and not os.path.isdir(d):
        raise FileNotFoundError(f"--data-dir {d!r} is not a folder")


# ---- the verbs ----------------------------------------------------------------------------------------------------
def widths_of(op: OpenedCheckpoint, args) -> list[float]:
    """``--widths`` (each checked against the spec), a ``--step`` sweep (min..max, max included), or the
    checkpoint's eval widths; sorted, narrowest first.

    Raises:
        WidthError: a width the spec does not allow.
    """
    spec = op.spec
    if getattr(args, "widths", None):
        return sorted({spec.validate(w) for w in args.widths})
    if getattr(args, "step", None) is not None:
        ws = spec.grid(args.step)
        return ws if ws[-1] == spec.max else [*ws, spec.max]
    return sorted(set(op.eval_widths))


def _log(console, *msg):
    if console is not None:
        console.print(*msg, soft_wrap=True, highlight=False)
    else:
        print(*msg)


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _merge_costs(op: OpenedCheckpoint, rows: list[dict]) -> list[dict]:
    need = [r["width"] for r in rows if "mflops" not in r]
    if need:
        cost = {c["width"]: c for c in op.costs(need, op.example_input(1))}
        rows = [{**cost.get(r["width"], {}), **r} for r in rows]
    return [{"width": r["width"], "mflops": r["mflops"], "params_m": r["params_m"],
             **{k: v for k, v in r.items() if k not in ("width", "mflops", "params_m")}} for r in rows]


def _refuse_calib_samples_on_switches(op: OpenedCheckpoint, args) -> None:
    if getattr(args, "calib_samples", None) is not None and op.spec.is_switches:
        raise NotApplicableError("--calib-samples does not apply to an S-Net: each switch keeps its own BN "
                                 "statistics from training (switchable BN), nothing is calibrated")


def cmd_eval(op: OpenedCheckpoint, args) -> int:
    """``slim eval``: the framework's metric at each width, a table, the spectrum CSV and plot."""
    from .spectrum import plot_spectrum, print_table, write_spectrum_csv

    console = _console()
    _refuse_calib_samples_on_switches(op, args)
    widths = widths_of(op, args)
    for name in ("csv", "plot"):
        check_output_path(getattr(args, name), option_flag(name))
    op.prepare_eval(widths, args)
    rows = _merge_costs(op, op.evaluate(widths, args))
    cols = [*op.cost_columns, *op.metric_columns]
    print_table(rows, title=op.title, columns=[c for c in cols if c[0] in rows[0]] or None, console=console)
    out = args.csv or op.default_eval_csv
    if out:
        write_spectrum_csv(rows, out)
        _log(console, f"wrote {out}")
    if args.plot:
        plot_spectrum([rows], args.plot, labels=[op.title])
        _log(console, f"wrote {args.plot}")
    return 0


def cmd_calibrate(op: OpenedCheckpoint, args) -> int:
    """``slim calibrate``: BN post-statistics for the widths, written to a new checkpoint (atomically; the input
    is untouched unless ``--in-place``)."""
    out = op.path if args.in_place else (args.out or op.default_calibrated_path())
    check_output_path(out, "--out")
    widths = widths_of(op, args)
    n = op.calibrate(widths, args.num_samples or 2000, args.method or DEFAULTS["method"])
    op.save_calibrated(out, widths)
    print(f"wrote {out} (widths {[f'{w:g}' for w in widths]} calibrated on {n} samples)")
    return 0


def cmd_export(op: OpenedCheckpoint, args) -> int:
    """``slim export --width W``: the plain fixed-width model (and ONNX with ``--onnx``)."""
    _refuse_calib_samples_on_switches(op, args)
    w = op.spec.validate(args.width)
    out = args.out or op.default_export_path(w, bool(args.fuse_bn))
    if op.export_to_folder:
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError(f"--out {out!r} is a file; this adapter exports into a folder")
        check_output_path(os.path.join(out, "x"), "--out")  # no file on the way to the folder
    else:
        check_output_path(out, "--out")
    if op.uncalibrated([w]):
        op.calibrate([w], args.calib_samples or 2000, "exact")
    paths = op.export(w, out, bool(args.onnx), bool(args.fuse_bn))
    print("wrote " + " and ".join(paths))
    return 0


def profile_rows(op: OpenedCheckpoint, widths: Sequence[float], inputs: tuple, latency: bool,
                 repeats: int) -> list[dict]:
    """Cost rows (``width, mflops, params_m`` and ``latency_ms`` with ``latency``) of ``op`` for ``inputs``."""
    import torch

    from .context import width as width_ctx
    from .profile import measure_latency

    missing = op.uncalibrated(widths)
    if missing:
        op.calibrate_for_profiling(missing, inputs)
    rows = op.costs(widths, inputs)
    if latency:
        call = op.call(inputs)
        with torch.no_grad():
            for w in widths:  # warm every width up first, as slim.profile does
                with width_ctx(w):
                    call()
            for r in rows:
                with width_ctx(r["width"]):
                    r["latency_ms"] = measure_latency(call, repeats=repeats, device=op.device)
    return rows


def _table_of(rows):
    from .profile import ProfileTable, WidthProfile

    return ProfileTable(WidthProfile(r["width"], r["mflops"], r["params_m"], r.get("latency_ms", float("nan")))
                        for r in rows)


def cmd_profile(op: OpenedCheckpoint, args) -> int:
    """``slim profile``: MFLOPs (multiply-adds), params and latency per width; ``--csv`` writes the table that
    ``slim serve --table`` and :meth:`~slim_plugins.ProfileTable.from_csv` read back."""
    from .spectrum import print_table

    widths = widths_of(op, args)
    bs = args.batch_size or DEFAULTS["batch_size"]
    inputs = op.example_input(bs, args.input_size)
    rows = profile_rows(op, widths, inputs, not args.no_latency, args.repeats or DEFAULTS["repeats"])
    shape = list(inputs[0].shape[1:]) if inputs and hasattr(inputs[0], "shape") else "?"
    cols = [*op.cost_columns, ("latency_ms", "latency (ms)", "{:.3f}")]
    print_table(rows, title=f"{op.title} @ input {shape} batch {bs} on {op.device}",
                columns=[c for c in cols if c[0] in rows[0]])
    if args.csv:
        _table_of(rows).to_csv(args.csv)
        print(f"wrote {args.csv}")
    return 0


def cmd_serve(op: OpenedCheckpoint, args) -> int:
    """``slim serve --budget-ms B``: call after call under a :class:`~slim_plugins.WidthController` that picks the
    widest width whose latency fits the budget; live display, PNG (and CSV) of latency and width per call."""
    from .control import WidthController, serve_command
    from .profile import ProfileTable

    bs = args.batch_size or DEFAULTS["batch_size"]
    if args.table:
        table = ProfileTable.from_csv(args.table)
        for r in table:
            op.spec.validate(r.width)
            if not (math.isfinite(r.latency_ms) and r.latency_ms > 0):
                raise ConfigError(f"--table {args.table!r}: width {r.width:g} has no latency (profiled with "
                                  "--no-latency?); serve needs measured latencies")
        if args.widths or args.step is not None:
            keep = set(widths_of(op, args))
            table = ProfileTable(r for r in table if r.width in keep)
            if not table:
                raise WidthError(f"none of the widths {sorted(keep)} is in {args.table!r}")
        widths = [r.width for r in table]
    else:
        widths = widths_of(op, args)
        if not (args.widths or args.step is not None):
            from .calibrate import calibrated_widths

            widths = calibrated_widths(op.model, widths) or widths
    inputs = op.example_input(bs, args.input_size)
    op.prepare_serving(widths)
    if not args.table:
        print(f"profiling widths {[f'{w:g}' for w in widths]} on {op.device}")
        table = _table_of(profile_rows(op, widths, inputs, True, 5))
    ctl = WidthController(op.model, args.budget_ms, table, percentile=args.percentile or DEFAULTS["percentile"],
                          fn=op.call(inputs))
    serve_command(ctl, lambda i: (), args.calls or DEFAULTS["calls"], live=not args.no_live, csv_path=args.csv,
                  plot_path=args.plot or "serve.png", title=f"{op.title}, batch {bs}")
    return 0


VERBS = {"eval": cmd_eval, "calibrate": cmd_calibrate, "export": cmd_export, "profile": cmd_profile,
         "serve": cmd_serve}

__all__ = ["DEFAULTS", "VERBS", "check_device", "check_options", "check_output_path", "check_values",
           "given_options", "profile_rows", "widths_of", "NotApplicableError"]
