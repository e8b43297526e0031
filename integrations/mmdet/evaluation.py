"""Per-width evaluation: BN post-statistics, one val / test pass per width, AP (0 when nothing is detected) and the
spectrum CSV; the val / test loops that run it."""
from __future__ import annotations

import os
from typing import Sequence

from mmengine.registry import LOOPS
from mmengine.runner import BaseLoop, TestLoop, ValLoop

import slim_plugins as slim

from .cost import width_cost
from .model import SlimSettings, _module, slim_settings

__all__ = ["calibrate_widths", "evaluate_widths", "SlimValLoop", "SlimTestLoop"]


def _wtag(w) -> str:
    return f"w{w:g}"


def calibrate_widths(runner, model, widths: Sequence[float], settings: SlimSettings) -> None:
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
    calibrate_widths(runner, model, widths, settings)
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
        rows.append({"width": w, **width_cost(runner, w), **_ap_columns(m)})
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


class _SlimEval:
    def run(self) -> dict:
        # RNG-neutral: calibration reads augmented training batches; training continues with the states it had,
        # so a run resumed from a checkpoint written before this evaluation draws the same numbers
        from .hooks import plain_rng_state, set_plain_rng_state

        rng = plain_rng_state()
        try:
            return self._run()
        finally:
            set_plain_rng_state(rng)

    def _run(self) -> dict:
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
