"""The ``slim`` command: train / eval / calibrate / export / profile / serve / spectrum.

Framework-free: argument parsing and dispatch to the adapter each framework registers under the entry-point
group ``slim_plugins.frameworks`` (imported only when a command needs it; the protocol: :mod:`slim_plugins.adapter`).
Every option given is checked against what that adapter reads and every value validated before any work; the
checkpoint verbs are written once, in :mod:`slim_plugins.commands`. The framework comes from the config (its ``framework:`` key, or the
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

Errors of the library (:class:`~slim_plugins.errors.SlimError`), bad configs, bad arguments, missing files and
failed writes (``OSError``: disk full, permission) print one line ``error: <Type>: <message>`` on stderr and exit
with status 2 (``SLIM_DEBUG=1`` shows the traceback); nothing is written then.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from .config import load_yaml_config
from .errors import ConfigError, SlimError
from .spectrum import plot_spectrum


# ---- argument parsing ------------------------------------------------------------------------------------------
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: UsageError: ...``, exit status 2) like every other refusal."""

    def error(self, message):
        self.exit(2, f"error: UsageError: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="slim", description="Train, evaluate, calibrate, export and profile "
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
    c.add_argument("--method", choices=("exact", "moving"), help="post-statistics average (default exact)")
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
    pr.add_argument("--batch-size", "-b", type=int, dest="batch_size", help="default 1")
    pr.add_argument("--no-latency", action="store_true", dest="no_latency")
    pr.add_argument("--repeats", type=int, help="timed calls per width (default 20)")
    pr.add_argument("--csv", help="write the table as CSV (width, mflops, params_m, latency_ms)")
    pr.add_argument("--device", help="default cpu")
    pr.add_argument("--config", help="framework config when the checkpoint does not carry one (mmengine)")

    sv = sub.add_parser("serve", help="serve a checkpoint under a latency budget, switching width as the machine's "
                        "speed changes (live display; PNG of latency and width over time)")
    sv.add_argument("checkpoint")
    sv.add_argument("--budget-ms", type=float, required=True, dest="budget_ms", help="latency budget per call (ms)")
    sv.add_argument("--percentile", type=float, help="the budget holds for this percentile (default 95)")
    sv.add_argument("--calls", type=int, help="default 500")
    sv.add_argument("--widths", nargs="+", help="widths it may use (default: the calibrated ones)")
    sv.add_argument("--step", type=float)
    sv.add_argument("--table", help="profile CSV (slim profile --csv) instead of profiling now")
    sv.add_argument("--input-size", nargs="+", type=int, dest="input_size",
                    help="H, H W or C H W (default: the config's input size)")
    sv.add_argument("--batch-size", "-b", type=int, dest="batch_size", help="default 1")
    sv.add_argument("--plot", help="PNG of latency and width over time (default serve.png)")
    sv.add_argument("--csv", help="write every call (t_s, width, latency_ms, expected_ms, budget_ms)")
    sv.add_argument("--no-live", action="store_true", dest="no_live", help="no live display")
    sv.add_argument("--device", help="default cpu")
    sv.add_argument("--config", help="framework config when the checkpoint does not carry one (mmengine)")

    s = sub.add_parser("spectrum", help="plot the FLOPs-accuracy spectrum of one or more spectrum CSVs")
    s.add_argument("csv", nargs="+")
    s.add_argument("-o", "--out", default="spectrum.png")
    s.add_argument("--labels", nargs="+")
    s.add_argument("--title")
    s.add_argument("--x", choices=("mflops", "width", "params_m"), default="mflops")
    s.add_argument("--metric", help="metric column to plot (default: the first: top1, bbox_AP, psnr, ...)")
    return p


#: Entry-point group through which each framework adapter registers its commands module (the adapter protocol of
#: :mod:`slim_plugins.adapter`: ``HONOURS``, ``cmd_train(args, cfg)``, ``open_checkpoint(args)`` and optionally
#: ``CONFIG_SUFFIXES``, ``claims_config(path, cfg)``, ``claims_checkpoint(path)``).
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


def _spectrum(args) -> int:
    from .commands import check_output_path

    check_output_path(args.out, "-o/--out")
    out = plot_spectrum(args.csv, args.out, labels=args.labels, title=args.title, x=args.x, metric=args.metric)
    print(f"wrote {out}")
    return 0


def _framework_of_train(args) -> tuple[str, dict | None]:
    if args.config and args.default:
        raise ConfigError("give either CONFIG or --default, not both")
    if not args.config:
        if args.resume and not args.default:  # the checkpoint says which framework continues
            if not os.path.isfile(args.resume):
                raise FileNotFoundError(f"--resume {args.resume!r} is not a file")
            return _framework_of_file(args.resume)[0], None
        return "timm", {}
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"config file {str(args.config)!r} does not exist")
    cfg = load_yaml_config(args.config) if Path(args.config).suffix.lower() in (".yaml", ".yml") else None
    return framework_of_config(args.config, cfg), cfg


def _framework_of_file(path: str) -> tuple[str, dict | None]:
    """``(framework, payload)`` of a checkpoint: a ``slim_plugins`` checkpoint names its framework (``timm`` when
    it does not); another format is the adapter's whose ``claims_checkpoint`` accepts it (payload ``None``).

    Raises:
        CheckpointError: neither.
    """
    from .checkpoint import read_checkpoint
    from .errors import CheckpointError

    try:
        payload = read_checkpoint(path)
        return payload.get("framework", "timm"), payload
    except CheckpointError:
        framework = _checkpoint_claimed(path)  # another framework's checkpoint format
        if framework is None:
            raise
        return framework, None


def _framework_of_checkpoint(args) -> str:
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist (or is not a file)")
    framework, args.payload = _framework_of_file(args.checkpoint)
    return framework


def _dispatch(args) -> int:
    from .commands import VERBS, check_options, check_values

    if args.command == "spectrum":
        return _spectrum(args)
    for attr in ("widths",):
        if getattr(args, attr, None) is not None:
            setattr(args, attr, _width_list(getattr(args, attr)))
    verb = args.command
    if verb == "train":
        framework, cfg = _framework_of_train(args)
    else:
        framework, cfg = _framework_of_checkpoint(args), None
    mod = _integration(framework)
    check_options(mod, framework, verb, args)  # every option given is read by this adapter, or refused
    check_values(args, verb)  # every value valid, before any work
    if verb == "train":
        return int(mod.cmd_train(args, cfg) or 0)
    op = mod.open_checkpoint(args)
    try:
        return int(VERBS[verb](op, args) or 0)
    finally:
        op.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slim`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (SlimError, OSError, ValueError) as e:  # OSError: a missing file, disk full, permission, ...
        if os.environ.get("SLIM_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
