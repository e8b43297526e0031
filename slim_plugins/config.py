"""Config files of the ``slim`` command and the adapters: YAML with ``${ENV}`` expansion, ``KEY=VALUE``
overrides, and the data root (``$SLIM_DATA``).

Errors: :class:`~slim_plugins.errors.ConfigError` (malformed file or override), ``FileNotFoundError``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from .errors import ConfigError

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
        ConfigError: an item without ``=`` or without a key.
    """
    import yaml

    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. lr=0.05)")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ConfigError(f"override {item!r} has no key before '=' (KEY=VALUE, e.g. lr=0.05)")
        try:
            out[k.strip().replace("-", "_")] = _expand_all(yaml.safe_load(v))
        except yaml.YAMLError:
            out[k.strip().replace("-", "_")] = v
    return out


__all__ = ["ConfigError", "default_data_root", "expand_env", "load_yaml_config", "parse_overrides"]
