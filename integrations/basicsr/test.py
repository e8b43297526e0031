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

import sys
from typing import Sequence

from .train import opt_main, run_basicsr


def run_test_pipeline(opt_path: str, extra_args: Sequence[str] = (), root_path: str | None = None) -> None:
    """``basicsr.test.test_pipeline`` on ``opt_path`` (env-expanded), with the slim types registered."""
    from basicsr.test import test_pipeline

    run_basicsr(test_pipeline, opt_path, extra_args, root_path, validate=False)


def main(argv: Sequence[str] | None = None) -> int:
    return opt_main(run_test_pipeline, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
