"""Typed errors raised by slim_plugins.

Every error names the bad value and what was allowed. Each subclasses a builtin (ValueError, RuntimeError, ...)
so callers that already catch those keep working.
"""


class SlimError(Exception):
    """Base class of every slim_plugins error."""


class WidthError(SlimError, ValueError):
    """A width outside the spec's range, or not in its switch list."""


class UnknownLayerError(WidthError):
    """A layer or group name (``fixed=``, ``groups=``, a nonuniform width dict) that matches no slimmable layer."""


class UncalibratedWidthError(SlimError, RuntimeError):
    """Evaluation at a width that has no BN statistics (run ``calibrate_bn`` first)."""


class EmptyLoaderError(SlimError, ValueError):
    """A data loader/iterable yielded no samples."""


class WidthSpecMismatchError(SlimError, ValueError):
    """A checkpoint was saved with a different width spec than the model's."""


class NotSlimmableError(SlimError, TypeError):
    """A model without slimmable layers was passed where a converted model is required."""


class UnsupportedModuleError(SlimError, TypeError):
    """``convert`` met a module with parameters whose type has no width-switchable counterpart."""


class ChannelGroupError(SlimError, RuntimeError):
    """Channel groups for nonuniform widths could not be derived (torch.fx failed) and none were declared."""


class NotExactError(WidthError):
    """A width at which the narrow net would not be a sub-network of the wide one with the model's own ops
    (DESIGN rule 1): names the operation (concatenation, split, shuffle, grouped conv) and the width."""


class CheckpointError(SlimError, RuntimeError):
    """A checkpoint file that cannot be read (truncated, not a checkpoint) or does not fit the model."""


class LossError(SlimError, ValueError):
    """A loss returned to ``MultiWidthStep`` that it cannot reduce to one scalar (e.g. a dict without loss keys)."""


class InvalidArgumentError(SlimError, ValueError):
    """An argument outside its allowed values (names the value and what was allowed)."""


class ConfigError(SlimError, ValueError):
    """A config file or command-line override is malformed: unknown key, wrong type, unreadable YAML."""


class ExampleInputError(SlimError, ValueError):
    """The channel analysis could not run the model once on its example input (the default ``(2, C, 64, 64)`` or
    the one given): ``convert`` needs every tensor's shape, so pass ``example_input=`` with an input the model
    accepts. Raised instead of converting with a guessed structure (DESIGN rule 10)."""
