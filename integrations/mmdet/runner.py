"""mmengine glue: ``SlimRunner`` (converts the detector at build time), the multi-width train loops, per-width
val/test loops and checkpoint loading under ``torch.load(weights_only=True)``.

Everything here plugs into mmengine's registries (``RUNNERS``, ``LOOPS``); no mmdet or mmengine class is patched.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import HOOKS, LOOPS, RUNNERS
from mmengine.runner import BaseLoop, EpochBasedTrainLoop, IterBasedTrainLoop, Runner, TestLoop, ValLoop

import slim_plugins as slim
from slim_plugins.errors import InvalidArgumentError

from .model import SlimSettings, is_slimmable, make_slimmable, slim_settings

__all__ = ["SlimRunner", "SlimEpochBasedTrainLoop", "SlimIterBasedTrainLoop", "SlimValLoop", "SlimTestLoop",
           "multi_width_train_step", "log_vars", "build_step", "evaluate_widths", "PlainMessageHubHook"]


def _module(model):
    return model.module if is_model_wrapper(model) else model


# ---- training ---------------------------------------------------------------------------------------------------
def _feature_distill(kind: str):
    fn = F.l1_loss if kind == "l1" else F.mse_loss

    def loss(student, teacher):  # FPN outputs: a tuple of (N, 256, H_l, W_l), averaged over levels
        return sum(fn(s, t) for s, t in zip(student, teacher)) / len(student)

    return loss


def build_step(model, settings: SlimSettings) -> slim.MultiWidthStep:
    """The core :class:`~slim_plugins.MultiWidthStep` for a detector (DDP wrapper included): S-Net ``"all"`` or the
    sandwich rule, and optional inplace distillation of the FPN outputs added to the detection loss."""
    distill = _feature_distill(settings.distill) if settings.distill else None
    return slim.MultiWidthStep(model, settings.spec, num_widths=settings.num_widths, rule=settings.rule,
                               distill=distill, distill_mode="add", distill_weight=settings.distill_weight,
                               seed=settings.seed)


def _backward(optim_wrapper: OptimWrapper, loss: torch.Tensor, last: bool) -> None:
    # OptimWrapper.backward counts one micro-step per call (gradient accumulation, should_update): the widths of
    # one iteration are one micro-step, so only the last width goes through it; the others scale like it does.
    if last:
        optim_wrapper.backward(loss)
    elif getattr(optim_wrapper, "loss_scaler", None) is not None:  # AmpOptimWrapper
        optim_wrapper.loss_scaler.scale(loss).backward()
    else:
        loss.backward()


_SUPPORTED_WRAPPERS = ("OptimWrapper", "AmpOptimWrapper")


def _supported(ow) -> bool:
    from mmengine.optim import AmpOptimWrapper

    if isinstance(ow, AmpOptimWrapper):
        return type(ow).backward is AmpOptimWrapper.backward
    return isinstance(ow, OptimWrapper) and type(ow).backward is OptimWrapper.backward


def multi_width_train_step(model, data_batch, optim_wrapper: OptimWrapper, step: slim.MultiWidthStep,
                           iteration: int) -> dict:
    """One training iteration at several widths, in place of ``model.train_step`` (mmengine's
    ``BaseModel.train_step`` / ``MMDistributedDataParallel.train_step``).

    The batch is preprocessed once; for each width of ``step.widths(iteration)`` (S-Nets Algorithm 1: every switch;
    US-Nets: the sandwich rule) the detector computes its loss dict, the terms whose key contains ``"loss"`` are
    summed (mmengine's ``parse_losses`` rule) and backpropagated at once (peak memory of one width); DDP
    synchronises gradients on the last width only. Then the optim wrapper steps once: gradient clipping, AMP loss
    scaling and gradient accumulation (``accumulative_counts``) keep their meaning.

    Returns:
        ``log_vars`` for mmengine's logger (:func:`log_vars`).

    Raises:
        InvalidArgumentError: an optim wrapper other than ``OptimWrapper`` / ``AmpOptimWrapper`` (or a subclass
            with its own ``backward``, e.g. Apex / DeepSpeed, or an ``OptimWrapperDict``).
    """
    if not _supported(optim_wrapper):
        raise InvalidArgumentError(f"slimmable training supports the optim wrappers {list(_SUPPORTED_WRAPPERS)} "
                                   f"and subclasses that keep their backward, got {type(optim_wrapper).__name__}")
    module = _module(model)
    with optim_wrapper.optim_context(model):
        data = module.data_preprocessor(data_batch, True)
    feats: list = []
    hook = module.neck.register_forward_hook(lambda m, i, o: feats.append(o)) if step.distill else None
    try:
        for p in step.iterate(iteration):
            with p, optim_wrapper.optim_context(model):
                feats.clear()
                losses = model(**data, mode="loss")
                loss = p.loss(tuple(feats[-1]) if feats else None, losses)
            _backward(optim_wrapper, optim_wrapper.scale_loss(loss), p.last)
            del loss, losses
            feats.clear()
    finally:
        if hook is not None:
            hook.remove()
    if optim_wrapper.should_update():
        optim_wrapper.step()
        optim_wrapper.zero_grad()
    return log_vars(step)


def log_vars(step: slim.MultiWidthStep) -> dict:
    """Logged scalars of the last step: ``loss`` (sum over widths) and each width's loss terms, tagged by switch
    (``w0.25/loss_cls``) for an S-Net, by role for a US-Net (``max/``, ``min/``, ``rand/`` averaged over the random
    widths): a US-Net draws new widths every iteration, and a key per width value would grow without bound."""
    last = step.last
    if step.spec.is_switches:
        return last.log_vars()
    out: dict = {"loss": float(last.loss)}
    counts: dict = {}
    for r in last.results:
        tag = "max" if r.width == step.spec.max else "min" if r.width == step.spec.min else "rand"
        counts[tag] = counts.get(tag, 0) + 1
        for k, v in {"loss": r.loss, **r.parts}.items():
            out[f"{tag}/{k}"] = out.get(f"{tag}/{k}", 0.0) + float(v)
    for key in [k for k in out if k.startswith("rand/")]:
        out[key] /= counts["rand"]
    return out


class _SlimTrain:
    """Mixin of the train loops: ``run_iter`` runs :func:`multi_width_train_step` instead of
    ``model.train_step``; the width sequence follows the loop's iteration counter (so ``resume`` continues it)."""

    _slim_step = None

    @property
    def slim_step(self) -> slim.MultiWidthStep:
        if self._slim_step is None:
            self._slim_step = build_step(self.runner.model, slim_settings(self.runner.model))
        return self._slim_step

    def _slim_iter(self, data_batch, **hook_kw):
        self.runner.call_hook("before_train_iter", data_batch=data_batch, **hook_kw)
        outputs = multi_width_train_step(self.runner.model, data_batch, self.runner.optim_wrapper, self.slim_step,
                                         self._iter)
        self.runner.message_hub.update_info("slim_widths", list(self.slim_step.last.widths))
        self.runner.call_hook("after_train_iter", data_batch=data_batch, outputs=outputs, **hook_kw)
        self._iter += 1


@LOOPS.register_module()
class SlimEpochBasedTrainLoop(_SlimTrain, EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` whose iterations train every width (S-Nets) or the sandwich widths (US-Nets)."""

    def run_iter(self, idx, data_batch) -> None:
        self._slim_iter(data_batch, batch_idx=idx)


@LOOPS.register_module()
class SlimIterBasedTrainLoop(_SlimTrain, IterBasedTrainLoop):
    """``IterBasedTrainLoop`` whose iterations train every width (S-Nets) or the sandwich widths (US-Nets)."""

    def run_iter(self, data_batch) -> None:
        self._slim_iter(data_batch, batch_idx=self._iter)


# ---- evaluation -------------------------------------------------------------------------------------------------
def _wtag(w) -> str:
    return f"w{w:g}"


def _calibrate(runner, model, widths: Sequence[float], settings: SlimSettings) -> None:
    """BN post-statistics (US-Nets Section 3.3) of the widths that need them, from the training images."""
    module = _module(model)
    slim.clear_statistics(module)  # statistics from before the last training are stale
    missing = [w for w in widths if w not in slim.calibrated_widths(module, widths)]
    if not missing:
        return
    built = getattr(runner, "_train_loop", None)
    loader = built.dataloader if isinstance(built, BaseLoop) else runner.build_dataloader(
        runner.cfg.train_dataloader, seed=runner.seed)

    def forward(m, batch):
        data = m.data_preprocessor(batch, False)
        return m.extract_feat(data["inputs"])

    runner.logger.info(f"BN post-statistics for widths {[f'{w:g}' for w in missing]} from "
                       f"{settings.calib_samples} training images")
    slim.calibrate_bn(module, loader, widths=missing, num_samples=settings.calib_samples, forward=forward)


def evaluate_widths(loop, widths: Sequence[float] | None = None) -> dict:
    """Run ``loop`` (a val or test loop) once per width and return mmengine metrics: the widest width's under their
    usual keys (``coco/bbox_mAP`` ...) and every width's as ``w<width>/coco/bbox_mAP``. Writes the spectrum CSV
    (``width, mflops, params_m, bbox_AP, ...``; AP in %) to the work dir."""
    runner = loop.runner
    model = runner.model
    settings = slim_settings(model)
    widths = list(widths or settings.eval_widths)
    _calibrate(runner, model, widths, settings)
    metrics, rows = {}, []
    losses = loop.val_loss if hasattr(loop, "val_loss") else loop.test_loss
    for w in widths:
        losses.clear()
        with slim.width(w):
            for idx, data_batch in enumerate(loop.dataloader):
                loop.run_iter(idx, data_batch)
        m = _with_empty_ap(loop.evaluator.evaluate(len(loop.dataloader.dataset)), loop.evaluator, w, runner)
        metrics.update({f"{_wtag(w)}/{k}": v for k, v in m.items()})
        if w == max(widths):
            metrics.update(m)
        rows.append({"width": w, **_cost(runner, w), **_ap_columns(m)})
        runner.logger.info(f"width {w:g}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()
                                                         if isinstance(v, (int, float)) and "mAP" in k))
    from slim_plugins.spectrum import write_spectrum_csv

    if runner.rank == 0:
        write_spectrum_csv(rows, os.path.join(runner.work_dir, "spectrum.csv"))
    return metrics


_AP_KEYS = {"bbox": ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"),
            "keypoints": ("mAP", "mAP_50", "mAP_75", "mAP_m", "mAP_l", "AR")}


def _with_empty_ap(m: dict, evaluator, w, runner) -> dict:
    """mmdet's ``CocoMetric`` returns no AP at all when a model detects nothing (early in training, or a narrow
    width): that is AP 0, written as such so every width has its entries in the log and the spectrum."""
    m = dict(m)
    for metric in evaluator.metrics:
        prefix = getattr(metric, "prefix", None)
        kinds = list(getattr(metric, "metrics", None) or []) + (["keypoints"] if getattr(
            metric, "with_keypoints", False) else [])
        if prefix != "coco" or not kinds or getattr(metric, "format_only", False):
            continue
        for kind in kinds:
            if kind in ("bbox", "segm", "keypoints") and f"coco/{kind}_mAP" not in m:
                runner.logger.warning(f"width {w:g}: no {kind} detections on the evaluation images, AP = 0")
                m.update({f"coco/{kind}_{k}": 0.0 for k in _AP_KEYS.get(kind, _AP_KEYS["bbox"])})
    return m


def _ap_columns(m: dict) -> dict:
    out = {}
    for kind in ("bbox", "segm", "keypoints"):
        for suffix, col in (("mAP", "AP"), ("mAP_50", "AP50"), ("mAP_75", "AP75")):
            v = m.get(f"coco/{kind}_{suffix}")
            if isinstance(v, (int, float)) and v >= 0:
                out[f"{kind}_{col}"] = 100.0 * float(v)
    return out


def _cost(runner, w) -> dict:
    """MFLOPs (multiply-adds) of backbone + FPN at the test image size, and the params (M) of the whole detector at
    width ``w`` (heads are shared: every width's cost differs only there)."""
    cache = runner.__dict__.setdefault("_slim_cost", {})
    if w not in cache:
        from torch.utils.flop_counter import FlopCounterMode

        module = _module(runner.model)
        h, wd = detector_input_size(runner.cfg)
        x = torch.zeros(1, 3, h, wd, device=next(module.parameters()).device)
        was = module.training
        module.eval()
        try:
            with torch.no_grad(), slim.width(w), FlopCounterMode(display=False) as fc:
                module.extract_feat(x)
        finally:
            module.train(was)
        params = sum(int(t.numel()) for t in _width_params(module, w))
        cache[w] = {"mflops": fc.get_total_flops() / 2e6, "params_m": params / 1e6}
    return cache[w]


def _width_params(module, w):
    """The parameter tensors of the plain detector at width ``w`` (exported weights, no BN statistics)."""
    from .export import _example_input

    plain = slim.export(module, w, example_input=_example_input(module))
    return [p for p in plain.parameters()]


def detector_input_size(cfg) -> tuple[int, int]:
    """``(H, W)`` of the test pipeline's ``Resize`` scale (long side, short side as mmdet writes it), rounded up to
    the data preprocessor's ``pad_size_divisor``; ``(800, 1333)`` if the config has none."""
    scale = None
    try:
        for t in cfg.test_dataloader.dataset.pipeline:
            if str(t.get("type")).split(".")[-1] in ("Resize", "KeypointResize") and t.get("scale"):
                scale = t["scale"]
    except (AttributeError, KeyError, TypeError):
        pass
    long_side, short_side = (max(scale), min(scale)) if scale else (1333, 800)
    div = int(cfg.model.get("data_preprocessor", {}).get("pad_size_divisor", 32) or 1)
    up = lambda v: int(math.ceil(v / div) * div)  # noqa: E731
    return up(short_side), up(long_side)


class _SlimEval:
    def run(self) -> dict:
        kind = "val" if isinstance(self, ValLoop) else "test"
        self.runner.call_hook(f"before_{kind}")
        self.runner.call_hook(f"before_{kind}_epoch")
        self.runner.model.eval()
        metrics = evaluate_widths(self)
        self.runner.call_hook(f"after_{kind}_epoch", metrics=metrics)
        self.runner.call_hook(f"after_{kind}")
        return metrics


@LOOPS.register_module()
class SlimValLoop(_SlimEval, ValLoop):
    """``ValLoop`` evaluating every ``eval_widths`` width (after BN post-statistics for US widths)."""


@LOOPS.register_module()
class SlimTestLoop(_SlimEval, TestLoop):
    """``TestLoop`` evaluating every ``eval_widths`` width (after BN post-statistics for US widths)."""


# ---- checkpoints ------------------------------------------------------------------------------------------------
_HB = "__history_buffer__"


@HOOKS.register_module()
class PlainMessageHubHook(Hook):
    """Writes the message hub into checkpoints as plain Python data (``HistoryBuffer`` objects as lists, numpy
    scalars as floats) and rebuilds it on load, so the checkpoint loads with torch's default
    ``torch.load(weights_only=True)`` and nothing allow-listed: mmengine 0.10.7 pickles ``HistoryBuffer`` objects,
    whose pickles need ``getattr`` among the allowed globals, which would open the safe loader to arbitrary calls.

    ``SlimRunner`` registers it; a plain mmengine run gets the same with
    ``custom_hooks = [dict(type='PlainMessageHubHook')]``."""

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.logging import HistoryBuffer

        hub = checkpoint.get("message_hub")
        if not isinstance(hub, dict) or "log_scalars" not in hub:
            return
        plain = {}
        for k, v in hub["log_scalars"].items():
            if isinstance(v, HistoryBuffer):
                log, count = v.data
                v = {_HB: True, "log": [float(x) for x in log], "count": [int(c) for c in count],
                     "max_length": int(v.max_length)}
            plain[k] = v
        info = {k: v.item() if isinstance(v, np.generic) else v for k, v in hub.get("runtime_info", {}).items()}
        checkpoint["message_hub"] = dict(hub, log_scalars=plain, runtime_info=info)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.logging import HistoryBuffer

        hub = checkpoint.get("message_hub")
        if not isinstance(hub, dict) or "log_scalars" not in hub:
            return
        hub["log_scalars"] = {k: HistoryBuffer(list(v["log"]), list(v["count"]), v["max_length"])
                              if isinstance(v, dict) and v.get(_HB) else v for k, v in hub["log_scalars"].items()}


# ---- the runner -------------------------------------------------------------------------------------------------
_LOOP_MAP = {"EpochBasedTrainLoop": "SlimEpochBasedTrainLoop", "IterBasedTrainLoop": "SlimIterBasedTrainLoop",
             "ValLoop": "SlimValLoop", "TestLoop": "SlimTestLoop"}


def _slim_loop(loop):
    """A loop config with mmengine's stock loop type replaced by its slimmable counterpart (others kept)."""
    if isinstance(loop, dict):
        t = str(loop.get("type", "")).split(".")[-1]
        if t in _LOOP_MAP:
            loop = dict(copy.deepcopy(loop), type=_LOOP_MAP[t])
    return loop


@RUNNERS.register_module()
class SlimRunner(Runner):
    """mmengine ``Runner`` for slimmable detectors: ``runner_type = 'SlimRunner'`` plus a ``slimmable`` entry (or a
    :class:`~.model.SlimResNet` / :class:`~.model.USResNet` backbone) in an mmdet config.

    It converts the detector right after ``MODELS.build`` (before DDP wrapping, weight init and checkpoint
    loading), swaps mmengine's stock loops for the slimmable ones (multi-width training, per-width evaluation),
    and writes checkpoints that load with ``torch.load(weights_only=True)`` (:class:`PlainMessageHubHook`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(h, PlainMessageHubHook) for h in self.hooks):
            self.register_hook(PlainMessageHubHook())

    def setup_env(self, env_cfg: dict) -> None:
        # mmengine 0.10.7's `pytorch` launcher calls torch.cuda.set_device unconditionally; on a machine without
        # CUDA the process group is started here (gloo) and mmengine then finds it initialised.
        if (self.distributed and self.launcher == "pytorch" and not torch.cuda.is_available()
                and not torch.distributed.is_initialized()):
            dist_cfg = dict((env_cfg or {}).get("dist_cfg", {}))
            backend = dist_cfg.pop("backend", "gloo")
            if backend != "gloo":
                raise InvalidArgumentError(f"dist_cfg.backend={backend!r} needs CUDA; on CPU use backend='gloo'")
            dist_cfg.pop("init_backend", None)
            torch.distributed.init_process_group(backend="gloo", **dist_cfg)
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg, model):
        # DDP takes device_ids=None for CPU modules (mmengine passes [LOCAL_RANK], which only CUDA accepts)
        if self.distributed and not torch.cuda.is_available() and not is_model_wrapper(model):
            model_wrapper_cfg = dict(model_wrapper_cfg or {}, device_ids=None)
            model_wrapper_cfg.setdefault("broadcast_buffers", False)
            model_wrapper_cfg.setdefault("find_unused_parameters", self.cfg.get("find_unused_parameters", False))
        return super().wrap_model(model_wrapper_cfg, model)

    def build_model(self, model):
        model = super().build_model(model)
        if not is_slimmable(model):
            make_slimmable(model, self.cfg.get("slimmable", None))
        return model

    def build_train_loop(self, loop):
        if isinstance(loop, dict) and loop.get("type") is None:
            loop = dict(loop, type="EpochBasedTrainLoop" if "max_epochs" in loop else "IterBasedTrainLoop")
        return super().build_train_loop(_slim_loop(loop))

    def build_val_loop(self, loop):
        if isinstance(loop, dict) and loop.get("type") is None:
            loop = dict(loop, type="ValLoop")
        return super().build_val_loop(_slim_loop(loop))

    def build_test_loop(self, loop):
        if isinstance(loop, dict) and loop.get("type") is None:
            loop = dict(loop, type="TestLoop")
        return super().build_test_loop(_slim_loop(loop))
