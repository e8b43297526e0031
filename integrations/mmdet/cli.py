"""``slim train / eval / export / profile`` for mmdet configs (``.py``), registered under the entry-point group
``slim_plugins.frameworks`` as ``mmdet``. Each command builds mmengine's ``Runner`` (``SlimRunner``) from the
config exactly as mmdet's ``tools/train.py`` / ``tools/test.py`` do, so both paths give the same run.

    slim train configs/mmdet/faster-rcnn_r50_fpn_s-net_coco128.py --epochs 2 --set train_dataloader.batch_size=4
    slim eval work_dirs/faster-rcnn_r50_fpn_s-net_coco128/epoch_12.pth --widths 0.25 1.0
    slim export work_dirs/faster-rcnn_r50_fpn_s-net_coco128/epoch_12.pth --width 0.5
    slim profile work_dirs/faster-rcnn_r50_fpn_s-net_coco128/epoch_12.pth
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import torch

from slim_plugins.adapter import OpenedCheckpoint
from slim_plugins.errors import ConfigError
from slim_plugins.config import parse_overrides

CONFIG_SUFFIXES = (".py",)


def claims_config(path: str, cfg) -> bool:
    """mmengine configs are Python files."""
    return Path(path).suffix == ".py"


def claims_checkpoint(path: str) -> bool:
    """An mmengine checkpoint (``state_dict`` + ``meta`` holding the config text) of a slimmable detector."""
    try:
        ck = _load(path)
    except Exception:  # truncated, not a torch file, unsafe globals: not ours to claim; the caller reports it
        return False
    if not (isinstance(ck, dict) and "state_dict" in ck):
        return False
    text = str(ck.get("meta", {}).get("cfg", ""))
    return any(s in text for s in ("slimmable", "SlimResNet", "USResNet", "SlimDetector"))


@functools.lru_cache(maxsize=1)
def _load_cached(path: str, mtime: float):
    return torch.load(path, map_location="cpu", weights_only=True)


def _load(path: str):
    return _load_cached(os.path.abspath(path), os.path.getmtime(path))


def _config(path_or_text: str, from_checkpoint: bool = False):
    from mmengine.config import Config

    try:
        if from_checkpoint:
            return Config.fromstring(path_or_text, file_format=".py")
        return Config.fromfile(path_or_text)
    except (SyntaxError, NameError, ImportError, KeyError, TypeError, AttributeError) as e:
        where = "the checkpoint's config" if from_checkpoint else repr(path_or_text)
        raise ConfigError(f"{where} is not a valid mmengine config: {type(e).__name__}: {e}") from None


def _runner(cfg):
    from mmengine.registry import RUNNERS

    import slim_plugins.integrations.mmdet  # noqa: F401  registers SlimRunner and the model types

    cfg.runner_type = "SlimRunner"
    return RUNNERS.build(cfg)


def _apply_train_args(cfg, args) -> None:
    if args.output:
        cfg.work_dir = args.output
    elif cfg.get("work_dir") is None:  # mmdet tools/train.py's default layout
        cfg.work_dir = os.path.join("./work_dirs", Path(args.config).stem)
    if args.epochs is not None:
        if "max_epochs" not in cfg.train_cfg:
            raise ConfigError("--epochs needs an epoch-based train_cfg; set train_cfg.max_iters with --set")
        cfg.train_cfg.max_epochs = args.epochs
    if args.batch_size is not None:
        cfg.train_dataloader.batch_size = args.batch_size
    if args.lr is not None:
        cfg.optim_wrapper.optimizer.lr = args.lr
    if args.workers is not None:
        for k in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if cfg.get(k):
                cfg[k].num_workers = args.workers
                if args.workers == 0:
                    cfg[k].persistent_workers = False
    if args.seed is not None:
        cfg.randomness = dict(cfg.get("randomness", {}), seed=args.seed)
    if args.resume:
        if not claims_checkpoint(args.resume):
            from slim_plugins.errors import CheckpointError

            raise CheckpointError(f"--resume {args.resume!r} is not an mmengine checkpoint of a slimmable detector "
                                  "(give a work dir's epoch_N.pth / iter_N.pth)")
        cfg.resume, cfg.load_from = True, args.resume
    if args.set:
        cfg.merge_from_dict(parse_overrides(args.set))


def validate_config(cfg) -> None:
    """What the Runner would only find out after creating the work dir, its log and config dump.

    Raises:
        ConfigError: no ``model`` / an unregistered model type, no ``train_dataloader`` / ``train_cfg``.
        SlimError: a bad ``slimmable`` entry (:func:`~slim_plugins.integrations.mmdet.model.parse_slimmable`).
    """
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from .model import SLIM_DETECTOR, architecture_of, check_slimmable_entries

    register_all_modules(init_default_scope=False)
    model = cfg.get("model")
    if not isinstance(model, dict) or "type" not in model:
        raise ConfigError("the config has no `model` dict with a `type` (an mmdet detector config)")
    if MODELS.get(model["type"]) is None:
        raise ConfigError(f"model.type {model['type']!r} is not a registered mmdet model")
    if str(model["type"]).split(".")[-1] == SLIM_DETECTOR:
        det = architecture_of(model)["type"]
        if MODELS.get(det) is None:
            raise ConfigError(f"model.detector {det!r} is not a registered mmdet model")
    for key in ("train_dataloader", "train_cfg", "optim_wrapper"):
        if not cfg.get(key):
            raise ConfigError(f"the config has no {key!r}: `slim train` needs a training config")
    check_slimmable_entries(cfg)


def cmd_train(args, file_cfg) -> int:
    """``slim train CONFIG.py``: what ``tools/train.py CONFIG.py`` does, with the slimmable runner."""
    cfg = _config(args.config)
    _apply_train_args(cfg, args)
    validate_config(cfg)
    runner = _runner(cfg)
    runner.train()
    return 0


def _from_checkpoint(args):
    ck = _load(args.checkpoint)
    text = ck.get("meta", {}).get("cfg") if getattr(args, "config", None) is None else None
    cfg = _config(text, True) if text else _config(args.config)
    return ck, cfg


#: The options each verb reads (the adapter protocol, :mod:`slim_plugins.adapter`); the core refuses the others.
HONOURS = {
    "train": {"config", "resume", "output", "epochs", "batch_size", "lr", "workers", "seed", "set"},
    "eval": {"batch_size", "workers", "calib_samples", "config"},
    "calibrate": set(),
    "export": {"calib_samples", "config"},
    "profile": {"input_size", "batch_size", "config"},
    "serve": {"config"},
}
REFUSALS = {"default": "--default runs the embedded timm job", "onnx": "mmdeploy exports mmdet models",
            "fuse_bn": "mmdeploy exports mmdet models", "device": "mmengine's Runner places the model",
            "data_dir": "the config's data_root / ann_file name the data (--set)",
            "no_calibrate": "US detectors are calibrated from the training images at every evaluation",
            "val_num_samples": "the test dataloader's dataset decides (--set)",
            "input_size": "serve runs inference_detector on the first test image, at the test pipeline's size",
            "batch_size": "serve runs inference_detector on one image"}
NOT_APPLICABLE = {"calibrate": "a US detector's BN post-statistics are computed from the training images at every "
                  "evaluation (slim eval / export / serve) and not stored"}


class DetCheckpoint(OpenedCheckpoint):
    """An mmengine checkpoint of a slimmable detector; the ``SlimRunner`` is built on first use (it creates the
    work dir and its log), after every option and width was checked against the config."""

    framework = "mmdet"
    cost_columns = (("width", "width", "{:g}"), ("mflops", "MFLOPs", "{:.0f}"), ("params_m", "params (M)", "{:.2f}"))

    def __init__(self, args):
        from .cost import detector_input_size
        from .model import parse_slimmable, slimmable_entry

        self.ck, self.cfg = _from_checkpoint(args)
        if not isinstance(self.cfg.get("model"), dict):
            raise ConfigError(f"{getattr(args, 'config', None) or 'the checkpoint config'!r} is not an mmdet config "
                              "(no `model` dict)")
        declared = slimmable_entry(self.cfg)
        if not declared:
            raise ConfigError(f"the config of {args.checkpoint!r} has no `slimmable` entry nor a slimmable backbone")
        self.declared = dict(declared) if isinstance(declared, dict) else {"widths": [0.25, 0.5, 0.75, 1.0]}
        self.settings = parse_slimmable(declared)
        for w in (getattr(args, "widths", None) or []) + ([args.width] if getattr(args, "width", None) else []):
            self.settings.spec.validate(w)  # before the runner writes its work dir
        work_dir = self.cfg.get("work_dir") or os.path.dirname(os.path.abspath(args.checkpoint))
        super().__init__(args.checkpoint, None, self.settings.spec, self.settings.eval_widths, args.checkpoint,
                         work_dir)
        self.default_eval_csv = os.path.join(work_dir, "spectrum.csv")
        self.input_size = (3, *detector_input_size(self.cfg))
        self._runner, self._tmp = None, None
        self.args = args

    def _work_dir(self) -> str:
        """The Runner's work dir: a temporary folder (its logs and config dump are not what a command writes; the
        command's own outputs go where its options say)."""
        import tempfile

        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="slim-mmdet-")
        return self._tmp

    def close(self):
        import logging
        import shutil

        if self._tmp is None:
            return
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for h in list(getattr(logger, "handlers", [])):
                if str(getattr(h, "baseFilename", "")).startswith(self._tmp):
                    logger.removeHandler(h)
                    h.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    @property
    def runner(self):
        if self._runner is None:
            cfg = copy.deepcopy(self.cfg)  # self.cfg stays the checkpoint's (exported configs derive from it)
            cfg.work_dir = self._work_dir()
            self._runner = _runner(cfg)
            self._runner.load_checkpoint(self.path)
            self._runner.model.eval()
        return self._runner

    @property
    def model(self):
        return self.runner.model

    def prepare_eval(self, widths, args):  # the test loop calibrates US widths itself
        pass

    def prepare_serving(self, widths):
        from .evaluation import calibrate_widths

        if not self.settings.spec.is_switches:
            calibrate_widths(self.runner, self.model, widths, self.settings)  # from the training images

    def calibrate(self, widths, num_samples, method="exact"):
        from .evaluation import calibrate_widths

        if num_samples:
            self.settings.calib_samples = num_samples
        calibrate_widths(self.runner, self.model, widths, self.settings)
        return self.settings.calib_samples

    def evaluate(self, widths, args):
        """``tools/test.py`` with ``SlimRunner``: the test loop at every width, COCO AP (%) per width; the loop
        writes ``spectrum.csv`` in the work dir."""
        from slim_plugins.spectrum import read_spectrum_csv

        from .model import set_slimmable_entry

        cfg = copy.deepcopy(self.cfg)
        cfg.load_from = self.path
        cfg.work_dir = self._work_dir()
        entry = dict(self.declared, eval_widths=list(widths))
        if args.calib_samples:
            entry["calib_samples"] = args.calib_samples
        set_slimmable_entry(cfg, entry)
        if args.batch_size:
            cfg.test_dataloader.batch_size = args.batch_size
        if args.workers is not None:
            cfg.test_dataloader.num_workers = args.workers
        runner = _runner(cfg)
        if runner.test() is None:
            raise ConfigError("the test loop returned no metrics (is test_evaluator set?)")
        rows = read_spectrum_csv(os.path.join(runner.work_dir, "spectrum.csv"))
        self.metric_columns = [(k, k, "{:.1f}") for k in rows[0] if k.endswith(("_AP", "_AP50"))]
        return rows

    def example_input(self, batch_size, input_size=None):
        size = self.resolve_input_size(input_size)
        return (torch.zeros(batch_size, *size, device=next(self.model.parameters()).device),)

    def costs(self, widths, inputs):
        """MFLOPs (multiply-adds) of backbone + FPN for ``inputs``, params (M) of the whole plain detector."""
        from .cost import width_cost

        return [{"width": w, **width_cost(self.runner, w, inputs[0])} for w in widths]

    def calibrate_for_profiling(self, widths, inputs):
        import slim_plugins as slim

        from .model import _module

        slim.calibrate_bn(_module(self.model), [inputs[0]], widths=list(widths), num_samples=None,
                          forward=lambda m, b: m.extract_feat(b))

    def call(self, inputs):
        if self.args.command == "serve":  # the whole inference_detector call: pipeline, model, post-processing
            from mmdet.apis import inference_detector

            model = self.model
            model.cfg = self.cfg  # inference_detector builds its test pipeline from model.cfg
            img = self.runner.build_dataloader(self.cfg.test_dataloader).dataset.get_data_info(0)["img_path"]
            return lambda: inference_detector(model, img)
        module = self.model

        @torch.no_grad()
        def run():
            return module.extract_feat(inputs[0])

        return run

    export_to_folder = True

    def default_export_path(self, width, fuse_bn):
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), "exported", f"width_{width:g}")

    def export(self, w, out, onnx, fuse_bn):
        """A plain mmdet config + checkpoint of width ``w`` in the folder ``out``."""
        from .export import export_detector

        if not self.settings.spec.is_switches:
            self.calibrate([w], self.args.calib_samples)
        res = export_detector(self.model, self.cfg, w, out, dataset_meta=self.ck.get("meta", {}).get("dataset_meta"))
        print(f"width {w:g}: {res['channels']}")
        return [res["config"], res["checkpoint"]]


def open_checkpoint(args) -> DetCheckpoint:
    """The adapter protocol's loader: the checkpoint's config (``--config`` to give another)."""
    return DetCheckpoint(args)
