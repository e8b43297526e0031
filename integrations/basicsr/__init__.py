"""BasicSR adapter: ``WDSR`` (``ARCH_REGISTRY``), ``BicubicHRDataset`` (``DATASET_REGISTRY``) and ``SlimSRModel``
(``MODEL_REGISTRY``). Importing this package registers them, as Real-ESRGAN's ``realesrgan/__init__.py`` does;
``python -m slim_plugins.integrations.basicsr.train -opt X.yml`` and ``slim train X.yml`` import it and run
BasicSR's own ``train_pipeline``.
"""
from .archs import WDSR, WideActBlock
from .data import BicubicHRDataset
from .model import SlimSRModel, SRSlimSettings, parse_slimmable

__all__ = ["WDSR", "WideActBlock", "BicubicHRDataset", "SlimSRModel", "SRSlimSettings", "parse_slimmable"]
