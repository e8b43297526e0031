"""Test with BasicSR's own ``test_pipeline`` after registering the slim types (Real-ESRGAN's ``test.py`` shape)::

    python -m slim_plugins.integrations.basicsr.test -opt experiments/<name>/exported/net_g_n32_test.yml

Arguments are BasicSR's (``-opt``, ``--launcher``, ``--force_yml``). It imports
``slim_plugins.integrations.basicsr`` (``WDSR``, ``BicubicHRDataset``, ``SlimSRModel`` join BasicSR's registries)
and calls ``basicsr.test.test_pipeline`` with the current directory as BasicSR's root: results go to
``./results/<name>/`` (``test_<name>_<time>.log`` with the metrics, ``visualization/<dataset>/``) unless
``path.results_root`` is set. ``${VAR}`` / ``$VAR`` in the options are expanded first, as for training.

The options ``slim export`` writes name ``model_type: SRModel`` and the stock arch at the exported width; for a
BasicSR arch (EDSR, RCAN, ...) with BasicSR datasets, BasicSR's own ``python -m basicsr.test -opt`` runs them too
(its root is the folder above the ``basicsr`` package). ``WDSR`` and ``BicubicHRDataset`` are ours: options naming
them need this entry point (or any script that imports ``slim_plugins.integrations.basicsr`` first).
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Sequence


def run_test_pipeline(opt_path: str, extra_args: Sequence[str] = (), root_path: str | None = None) -> None:
    """``basicsr.test.test_pipeline`` on ``opt_path`` (env-expanded), with the slim types registered."""
    import slim_plugins.integrations.basicsr  # noqa: F401  registers WDSR, BicubicHRDataset, SlimSRModel
    from basicsr.test import test_pipeline

    from .train import _reset_basicsr_logger, expanded_options

    with tempfile.TemporaryDirectory(prefix="slim-basicsr-test-") as tmp:
        opt = expanded_options(opt_path, tmp)
        argv = sys.argv
        sys.argv = [argv[0], "-opt", opt, *extra_args]  # BasicSR's parse_options reads sys.argv
        _reset_basicsr_logger()
        try:
            test_pipeline(os.path.abspath(root_path or os.getcwd()))
        finally:
            sys.argv = argv
            _reset_basicsr_logger()  # closes this run's log file


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    p.add_argument("-opt", required=True)
    args, rest = p.parse_known_args(argv)
    run_test_pipeline(args.opt, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
