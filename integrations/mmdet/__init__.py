"""MMDetection adapter: slimmable Faster / Mask / Keypoint R-CNN (Slimmable Networks Section 4.3, Appendix B).

Importing it (``custom_imports = dict(imports=['slim_plugins.integrations.mmdet'])``) registers:

- ``SlimDetector`` (mmdet ``MODELS``): ``model = dict(type='SlimDetector', detector='FasterRCNN',
  slimmable=dict(widths=[...]))`` merged into a stock config builds the detector already converted, so mmdet's own
  ``init_detector``, ``DetInferencer`` and tools get the slimmable model and load its checkpoints;
- ``SlimRunner`` (mmengine ``RUNNERS``): trains every width per iteration, evaluates every width
  (``runner_type = 'SlimRunner'``); it also converts a detector built plain (a top-level ``slimmable = dict(...)``,
  the runner-only form that ``init_detector`` does not see);
- ``SlimResNet`` / ``USResNet`` (mmdet ``MODELS``): ResNets that declare the widths instead of ``slimmable``;
- the loops ``SlimEpochBasedTrainLoop``, ``SlimIterBasedTrainLoop``, ``SlimValLoop``, ``SlimTestLoop``;
- ``PlainMessageHubHook`` (mmengine ``HOOKS``): checkpoints that load with ``torch.load(weights_only=True)``;
- ``CocoDatasetUniqueIds`` (mmdet ``DATASETS``): COCO JSONs whose annotation ids repeat (coco128's val split);
- ``SlimPretrained`` (mmengine ``WEIGHT_INITIALIZERS``): a backbone ``init_cfg`` reading a ``slim train``
  checkpoint (timm ``s_resnet50`` / ``us_resnet50``) with its per-switch BN statistics;
- Keypoint R-CNN, which mmdet lacks: ``KeypointRCNN``, ``KeypointRoIHead``, ``KeypointRCNNHead`` (``MODELS``),
  ``CocoKeypointDataset``, the keypoint transforms and ``CocoKeypointMetric`` (COCO keypoint AP).
"""
from .data import CocoDatasetUniqueIds
from .keypoint_data import (CocoKeypointDataset, CocoKeypointMetric, KeypointRandomFlip, KeypointResize,
                            LoadKeypointAnnotations, PackKeypointDetInputs, coco_keypoint_sigmas, flip_indices)
from .keypoints import KeypointRCNN, KeypointRCNNHead, KeypointRoIHead
from .export import export_detector, plain_config
from .model import (DEFAULT_SCOPE, SLIM_DETECTOR, SlimPretrainedInit, architecture_of, build_slim_detector,
                    set_slimmable_entry, slimmable_entry, init_slim_detector, SlimResNet, SlimSettings, USResNet, is_slimmable,
                    make_slimmable, parse_slimmable, slim_settings)
from .cost import detector_input_size, width_cost
from .evaluation import SlimTestLoop, SlimValLoop, calibrate_widths, evaluate_widths
from .hooks import PlainMessageHubHook
from .runner import SlimRunner
from .train_step import SlimEpochBasedTrainLoop, SlimIterBasedTrainLoop, build_step, multi_width_train_step

__all__ = ["SlimRunner", "CocoDatasetUniqueIds", "init_slim_detector", "SlimResNet", "USResNet", "SlimSettings", "SlimPretrainedInit", "make_slimmable",
           "parse_slimmable", "is_slimmable", "slim_settings", "export_detector", "plain_config",
           "SlimEpochBasedTrainLoop", "SlimIterBasedTrainLoop", "SlimValLoop", "SlimTestLoop", "build_step",
           "evaluate_widths", "calibrate_widths", "width_cost", "detector_input_size", "multi_width_train_step",
           "PlainMessageHubHook", "DEFAULT_SCOPE", "SLIM_DETECTOR", "build_slim_detector", "architecture_of",
           "slimmable_entry", "set_slimmable_entry",
           "KeypointRCNN", "KeypointRoIHead", "KeypointRCNNHead", "CocoKeypointDataset", "CocoKeypointMetric",
           "LoadKeypointAnnotations", "KeypointResize", "KeypointRandomFlip", "PackKeypointDetInputs",
           "coco_keypoint_sigmas", "flip_indices"]
