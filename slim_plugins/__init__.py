"""slim-plugins: make existing vision and RL models slimmable (S-Nets and US-Nets).

Public verbs (DESIGN.md)::

    import slim_plugins as slim
    spec  = slim.WidthSpec.range(0.25, 1.0)
    model = slim.convert(model, spec)
    slim.set_width(model, 0.5)
    with slim.width(0.5): y = model(x)
    slim.calibrate_bn(model, batches, widths=[...])
    plain = slim.export(model, width=0.5)
    table = slim.profile(model, x, widths=[...])
    step  = slim.MultiWidthStep(model, spec, num_widths=4, distill="kl")
    ctl   = slim.WidthController(model, budget_ms=20.0, latency_ms=table); y = ctl(x)
"""
from .calibrate import calibrate_bn, calibrated_widths, clear_statistics, freeze_bn
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .context import (active_channels, checkpoint, checkpoint_context_fn, get_width, set_width, width,
                      width_spec)
from .control import CallRecord, ControllerReport, WidthController
from .convert import channel_groups, check_widths, convert, slim_layers
from .errors import (ChannelGroupError, CheckpointError, ConfigError, EmptyLoaderError, ExampleInputError, InvalidArgumentError, LossError,
                     NotExactError, NotSlimmableError, SlimError, UncalibratedWidthError, UnknownLayerError,
                     UnsupportedModuleError, WidthError, WidthSpecMismatchError)
from .export import export, export_onnx
from .profile import ProfileTable, WidthProfile, count_mflops, measure_latency, profile
from .registry import register
from .train import MultiWidthStep, StepResult, WidthPass, WidthResult, reduce_loss
from .width import WidthSpec, make_divisible

__version__ = "0.1.0"

__all__ = [
    "WidthSpec", "make_divisible", "convert", "check_widths", "channel_groups", "slim_layers", "set_width", "get_width", "width",
    "active_channels", "width_spec", "measure_latency", "checkpoint", "checkpoint_context_fn", "NotExactError", "CheckpointError", "LossError", "InvalidArgumentError",
    "calibrate_bn", "calibrated_widths", "clear_statistics", "freeze_bn", "MultiWidthStep", "StepResult", "WidthPass", "WidthResult", "reduce_loss", "export", "export_onnx", "profile", "ProfileTable",
    "WidthProfile", "count_mflops", "register", "save_checkpoint", "load_checkpoint", "read_checkpoint",
    "SlimError", "ExampleInputError", "ConfigError", "WidthError", "UncalibratedWidthError", "EmptyLoaderError", "WidthSpecMismatchError",
    "NotSlimmableError", "UnsupportedModuleError", "ChannelGroupError", "UnknownLayerError",
    "WidthController", "ControllerReport", "CallRecord",
]
