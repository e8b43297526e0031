"""Train with BasicSR's own ``train_pipeline`` after registering the slim types (Real-ESRGAN's ``train.py`` shape)::

    python -m slim_plugins.integrations.basicsr.train -opt configs/basicsr/us_wdsr_x2_sr.yml [--auto_resume] ...

Arguments are BasicSR's (``-opt``, ``--launcher``, ``--auto_resume``, ``--debug``, ``--force_yml``). Experiments
go to ``./experiments/<name>`` (BasicSR's layout, the current directory as its root) unless ``path.experiments_root``
is set. ``${VAR}`` / ``$VAR`` in the options (``$SLIM_DATA/sr/...``, ``$DIV2K_ROOT``) are expanded first: the
expanded copy is what BasicSR reads and copies into the experiment folder.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable, Sequence


def expanded_options(path: str, tmpdir: str, overrides: dict | None = None) -> str:
    """Write ``path`` with environment variables expanded (and dotted ``overrides`` such as
    ``{"train.total_iter": 100}`` applied) to ``tmpdir/<same name>``; returns the new path.

    Raises:
        FileNotFoundError: no such file. ConfigError: bad YAML, an unset variable, an override of a missing
            section.
    """
    import yaml

    from slim_plugins.errors import ConfigError

    from slim_plugins.config import load_yaml_config
    opt = load_yaml_config(path)
    for key, value in (overrides or {}).items():
        node, parts = opt, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {key!r}: the options have no section {p!r} there")
            node = node[p]
        node[parts[-1]] = value
    out = os.path.join(tmpdir, os.path.basename(path))
    with open(out, "w") as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return out


def validate_options(opt: dict) -> None:
    """Check BasicSR options as far as can be done without writing anything: what ``train_pipeline`` would only
    find out after creating (or archiving) the experiment folder.

    Raises:
        ConfigError: not a mapping, no ``model_type`` / ``network_g`` / ``datasets.train``, an unregistered model,
            arch or dataset type, a network the arch cannot build, a missing data folder, a bad ``total_iter``.
        SlimError: a bad ``slimmable`` block, or a generator ``convert`` refuses.
    """
    import slim_plugins as slim
    from slim_plugins.errors import ConfigError

    import slim_plugins.integrations.basicsr  # noqa: F401  registers WDSR, BicubicHRDataset, SlimSRModel
    import basicsr.archs  # noqa: F401  fills the registries, as train_pipeline does
    import basicsr.data  # noqa: F401
    import basicsr.models  # noqa: F401
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

    if not isinstance(opt, dict):
        raise ConfigError(f"BasicSR options must be a mapping, got {type(opt).__name__}")
    for key in ("model_type", "network_g", "datasets", "scale"):
        if key not in opt:
            raise ConfigError(f"the options have no {key!r} (BasicSR needs model_type, scale, network_g, datasets)")
    if opt["model_type"] not in MODEL_REGISTRY:
        raise ConfigError(f"model_type {opt['model_type']!r} is not registered; known: {sorted(MODEL_REGISTRY._obj_map)}")
    if not isinstance(opt["scale"], int) or isinstance(opt["scale"], bool) or opt["scale"] < 1:
        raise ConfigError(f"scale must be a positive integer, got {opt['scale']!r}")
    net_g = opt["network_g"]
    if not isinstance(net_g, dict) or net_g.get("type") not in ARCH_REGISTRY:
        known = sorted(ARCH_REGISTRY._obj_map)
        raise ConfigError(f"network_g.type {net_g.get('type') if isinstance(net_g, dict) else net_g!r} is not a "
                          f"registered arch; known: {known}")
    try:
        net = ARCH_REGISTRY.get(net_g["type"])(**{k: v for k, v in net_g.items() if k != "type"})
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"network_g {net_g}: {e}") from None
    if opt.get("slimmable"):
        from .model import parse_slimmable

        settings = parse_slimmable(opt["slimmable"], seed=int(opt.get("manual_seed") or 0))
        from .stock import convert_kwargs

        slim.convert(net, settings.spec, **convert_kwargs(net_g, net))  # the refusals of SlimSRModel, up front
    datasets = opt["datasets"]
    if not isinstance(datasets, dict) or "train" not in datasets:
        raise ConfigError("the options have no datasets.train")
    for phase, d in datasets.items():
        if not isinstance(d, dict) or d.get("type") not in DATASET_REGISTRY:
            raise ConfigError(f"datasets.{phase}.type {d.get('type') if isinstance(d, dict) else d!r} is not a "
                              f"registered dataset; known: {sorted(DATASET_REGISTRY._obj_map)}")
        for k, v in d.items():
            if k.startswith("dataroot") and isinstance(v, str) and d.get("io_backend", {}).get("type", "disk") == \
                    "disk" and not os.path.exists(v):
                raise ConfigError(f"datasets.{phase}.{k} {v!r} does not exist")
    total = (opt.get("train") or {}).get("total_iter")
    if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float)) or total < 1):
        raise ConfigError(f"train.total_iter must be a positive number, got {total!r}")


def _reset_basicsr_logger() -> None:
    """BasicSR's ``get_root_logger`` sets up the ``basicsr`` logger once per process (the first caller wins): a
    second ``train_pipeline`` in one process (an experiment running several trainings, a test session) would get
    neither its own log file nor INFO messages. Closing its handlers and forgetting the set-up lets every run
    configure it as a fresh process would."""
    import logging

    from basicsr.utils import logger as basicsr_logger

    log = logging.getLogger("basicsr")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    basicsr_logger.initialized_logger.pop("basicsr", None)


def run_basicsr(pipeline: Callable[[str], Any], opt_path: str, extra_args: Sequence[str] = (),
                root_path: str | None = None, overrides: dict | None = None, validate: bool = True) -> None:
    """BasicSR's ``pipeline(root_path)`` (``train_pipeline`` / ``test_pipeline``, which read ``-opt`` from
    ``sys.argv``) on ``opt_path`` env-expanded (``overrides`` applied), with the slim types registered; ``validate``:
    the options are checked (:func:`validate_options`) before BasicSR creates or archives any folder."""
    import slim_plugins.integrations.basicsr  # noqa: F401  registers WDSR, BicubicHRDataset, SlimSRModel

    with tempfile.TemporaryDirectory(prefix="slim-basicsr-") as tmp:
        opt = expanded_options(opt_path, tmp, overrides)
        if validate:
            from slim_plugins.config import load_yaml_config

            validate_options(load_yaml_config(opt))
        argv = sys.argv
        sys.argv = [argv[0], "-opt", opt, *extra_args]  # BasicSR's parse_options reads sys.argv
        _reset_basicsr_logger()
        try:
            pipeline(os.path.abspath(root_path or os.getcwd()))
        finally:
            sys.argv = argv
            _reset_basicsr_logger()  # closes this run's log file


def run_pipeline(opt_path: str, extra_args: Sequence[str] = (), root_path: str | None = None,
                 overrides: dict | None = None) -> None:
    """``basicsr.train.train_pipeline`` on ``opt_path`` (env-expanded), with the slim types registered."""
    from basicsr.train import train_pipeline

    run_basicsr(train_pipeline, opt_path, extra_args, root_path, overrides)


def opt_main(run: Callable[[str, Sequence[str]], None], doc: str, argv: Sequence[str] | None = None) -> int:
    """BasicSR's command line (``-opt X.yml`` plus BasicSR's own flags, passed through) for ``run(opt, rest)``."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=doc.split("\n")[0], add_help=True)
    p.add_argument("-opt", required=True)
    args, rest = p.parse_known_args(argv)
    run(args.opt, rest)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return opt_main(run_pipeline, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
