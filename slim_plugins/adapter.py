"""The adapter protocol: what a framework adapter gives the ``slim`` command.

An adapter is the commands module a framework registers under the entry-point group ``slim_plugins.frameworks``
(``slim_plugins.integrations.timm.cli``, ...). It supplies training and loading; the verbs ``eval``,
``calibrate``, ``export``, ``profile`` and ``serve`` are written once, in :mod:`slim_plugins.commands`, against
the :class:`OpenedCheckpoint` the adapter returns. Module attributes:

``HONOURS``
    ``{verb: set of option names}``: the command-line options (argparse ``dest`` names) the adapter reads for
    each verb. An option given on the command line that the adapter at hand does not read is refused (exit 2,
    naming it) before any work; ``REFUSALS`` (``{option: reason}``, optional) says why in the message.
``cmd_train(args, cfg) -> int``
    Train from a config with the framework's own loop (``cfg``: the parsed YAML, or ``None`` for other formats).
``open_checkpoint(args) -> OpenedCheckpoint``
    The slimmable model of a checkpoint and what the verbs need of it.
``CONFIG_SUFFIXES``, ``claims_config(path, cfg)``, ``claims_checkpoint(path)`` (optional)
    Which config files / foreign-format checkpoints the adapter reads.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

#: The options each verb parses; every one an adapter does not list in ``HONOURS[verb]`` is refused when given.
VERB_OPTIONS = {
    "train": ("config", "default", "resume", "output", "epochs", "batch_size", "lr", "workers", "seed", "device",
              "data_dir", "onnx", "set"),
    "eval": ("widths", "step", "data_dir", "batch_size", "workers", "calib_samples", "no_calibrate",
             "val_num_samples", "csv", "plot", "device", "config"),
    "calibrate": ("widths", "step", "num_samples", "method", "data_dir", "batch_size", "workers", "out", "in_place",
                  "device"),
    "export": ("width", "onnx", "fuse_bn", "out", "data_dir", "calib_samples", "device", "config"),
    "profile": ("widths", "step", "input_size", "batch_size", "no_latency", "repeats", "csv", "device", "config"),
    "serve": ("budget_ms", "percentile", "calls", "widths", "step", "table", "input_size", "batch_size", "plot",
              "csv", "no_live", "device", "config"),
}

#: Options the core itself reads for a verb (width lists, output files, the profiling and serving knobs): every
#: adapter that has the verb honours them.
CORE_OPTIONS = {
    "train": ("config", "set"),
    "eval": ("widths", "step", "csv", "plot"),
    "calibrate": ("widths", "step", "out", "in_place"),
    "export": ("width", "out"),
    "profile": ("widths", "step", "no_latency", "repeats", "csv"),
    "serve": ("budget_ms", "percentile", "calls", "widths", "step", "table", "plot", "csv", "no_live"),
}


class NotApplicableError(ConfigError):
    """A verb or option that cannot apply to this adapter's checkpoints (e.g. ``calibrate`` on a BN-free net)."""


class OpenedCheckpoint:
    """A checkpoint opened by an adapter: the slimmable model and what the verbs need of it.

    Attributes:
        path: the checkpoint file. model: the converted (slimmable) model, eval mode, on ``device``.
        spec: its :class:`~slim_plugins.WidthSpec`. eval_widths: the widths the verbs use by default.
        title: a short name for tables and plots. run_dir: the folder default outputs go to.
        metric_columns: ``(key, header, format)`` of the metric columns ``evaluate`` returns.
        default_eval_csv: where ``slim eval`` writes its spectrum CSV without ``--csv`` (``None``: nowhere).
        cost_columns: ``(key, header, format)`` of the cost columns (``mflops``, ``params_m``, latency).

    Subclasses override what their framework can do; the defaults raise :class:`NotApplicableError` (a clear
    error naming the verb) or work on any ``nn.Module`` taking one image-like tensor.
    """

    framework = "?"
    metric_columns: Sequence[tuple] = ()
    default_eval_csv: str | None = None
    cost_columns: Sequence[tuple] = (("width", "width", "{:g}"), ("mflops", "MFLOPs", "{:.2f}"),
                                     ("params_m", "params (M)", "{:.3f}"))
    #: per-sample input size ``(C, H, W)`` the profile / serve input has by default (``None``: fixed by the model)
    input_size: tuple | None = None

    def __init__(self, path: str, model, spec, eval_widths: Sequence[float], title: str, run_dir: str,
                 device: str | torch.device = "cpu"):
        self.path, self._model, self.spec, self.title, self.run_dir = path, model, spec, title, run_dir
        self.eval_widths = list(eval_widths)
        self.device = torch.device(device)

    @property
    def model(self):
        """The converted (slimmable) model, eval mode."""
        return self._model

    def close(self) -> None:
        """Release what opening took (temporary folders); called by the ``slim`` command when the verb ends."""

    # ---- inputs ----------------------------------------------------------------------------------------------
    def resolve_input_size(self, given: Sequence[int] | None) -> tuple:
        """The per-sample input size: ``given`` as H, H W or C H W over :attr:`input_size`.

        Raises:
            ConfigError: more than 3 numbers, a non-positive one, or a channel count the model does not take.
        """
        if self.input_size is None:
            raise NotApplicableError(f"{self.framework} models have a fixed input; --input-size does not apply")
        size = list(self.input_size)
        if given:
            s = [int(v) for v in given]
            if len(s) > 3 or any(v <= 0 for v in s):
                raise ConfigError(f"--input-size takes H, H W or C H W of positive sizes, got {list(given)}")
            if len(s) == 3 and s[0] != size[0]:
                raise ConfigError(f"--input-size: the model takes {size[0]} input channels, got {s[0]}")
            size = [size[0], s[0], s[0]] if len(s) == 1 else [size[0], *s[-2:]]
        return tuple(size)

    def example_input(self, batch_size: int, input_size: Sequence[int] | None = None) -> tuple:
        """Positional arguments of one forward: a ``(batch_size, C, H, W)`` random batch by default."""
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch_size, *self.resolve_input_size(input_size), generator=g).to(self.device),)

    def call(self, inputs: tuple) -> Callable[[], Any]:
        """What one timed call runs (``profile`` latency, ``serve``): the model's forward on ``inputs``."""
        model = self.model

        @torch.no_grad()
        def run():
            return model(*inputs)

        return run

    # ---- statistics -------------------------------------------------------------------------------------------
    def uncalibrated(self, widths: Sequence[float]) -> list[float]:
        """The widths of ``widths`` without BN statistics (US-Nets; none for S-Nets or BN-free models)."""
        from .calibrate import calibrated_widths

        have = calibrated_widths(self.model, list(widths))
        return [w for w in widths if w not in have]

    def calibrate(self, widths: Sequence[float], num_samples: int | None, method: str = "exact") -> int:
        """BN post-statistics for ``widths`` from the training data, in place; returns the samples used."""
        raise NotApplicableError(f"{self.framework} checkpoints have no BN post-statistics to compute "
                                 "(`slim calibrate` does not apply)")

    def prepare_eval(self, widths: Sequence[float], args) -> None:
        """Before :meth:`evaluate`: statistics for the widths that lack them (``--calib-samples`` from the training
        data), or :class:`~slim_plugins.UncalibratedWidthError` with ``--no-calibrate``."""
        from .errors import UncalibratedWidthError

        missing = self.uncalibrated(widths)
        if missing and getattr(args, "no_calibrate", False):
            raise UncalibratedWidthError(f"widths {missing} have no BN statistics in {self.path}; drop "
                                         "--no-calibrate or run `slim calibrate` first")
        if missing:
            self.calibrate(missing, getattr(args, "calib_samples", None), "exact")

    def prepare_serving(self, widths: Sequence[float]) -> None:
        """Before ``slim serve``: every width it may switch to needs statistics.

        Raises:
            UncalibratedWidthError: a width without statistics (``slim calibrate`` it first).
        """
        from .errors import UncalibratedWidthError

        missing = self.uncalibrated(widths)
        if missing:
            raise UncalibratedWidthError(f"widths {missing} have no BN statistics in {self.path}; run "
                                         "`slim calibrate` for them first")

    def calibrate_for_profiling(self, widths: Sequence[float], inputs: tuple) -> None:
        """Statistics of random inputs so eval mode runs at uncalibrated widths: FLOPs, params and latency do not
        depend on them; they live in this process only (nothing is saved)."""
        from .calibrate import calibrate_bn

        calibrate_bn(self.model, [inputs], widths=list(widths), num_samples=None,
                     forward=lambda m, b: m(*b))

    def save_calibrated(self, out: str, widths: Sequence[float]) -> None:
        """Write the checkpoint with the new statistics to ``out`` (atomically)."""
        raise NotApplicableError(f"{self.framework} checkpoints cannot be re-written by `slim calibrate`")

    def default_calibrated_path(self) -> str:
        import os

        root, ext = os.path.splitext(self.path)
        if root.endswith(".pth"):
            root, ext = root[:-4], ".pth" + ext
        return f"{root}-calibrated{ext}"

    # ---- evaluation, cost, export ------------------------------------------------------------------------------
    def evaluate(self, widths: Sequence[float], args) -> list[dict]:
        """Metric rows, one per width: ``{"width": w, <metric>: value, ...}`` (``mflops``/``params_m`` optional)."""
        raise NotApplicableError(f"{self.framework} checkpoints cannot be evaluated by `slim eval`")

    def costs(self, widths: Sequence[float], inputs: tuple) -> list[dict]:
        """``{"width", "mflops", "params_m"}`` per width for ``inputs`` (MFLOPs = multiply-adds of the whole
        batch, params in millions of the exported plain net)."""
        from .profile import profile

        return [{"width": r.width, "mflops": r.mflops, "params_m": r.params_m}
                for r in profile(self.model, inputs[0] if len(inputs) == 1 else inputs, widths=list(widths),
                                 latency=False)]

    def default_export_path(self, width: float, fuse_bn: bool) -> str:
        import os

        return os.path.join(os.path.dirname(os.path.abspath(self.path)), "exported",
                            f"width_{width:g}{'_fused' if fuse_bn else ''}.pth")

    #: ``slim export --out`` names a folder (several files) rather than one file
    export_to_folder = False

    def export(self, width: float, out: str, onnx: bool, fuse_bn: bool) -> list[str]:
        """Write the plain fixed-width model (and its ONNX graph with ``onnx``); returns the paths written."""
        raise NotApplicableError(f"{self.framework} checkpoints cannot be exported")


__all__ = ["CORE_OPTIONS", "NotApplicableError", "OpenedCheckpoint", "VERB_OPTIONS"]
