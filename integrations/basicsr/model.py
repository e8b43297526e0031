"""``SlimSRModel``: BasicSR's ``SRModel`` with a slimmable ``net_g``, trained by the core ``MultiWidthStep``.

Options YAML (BasicSR's own keys, plus one block)::

    model_type: SlimSRModel
    network_g: {type: WDSR, num_feat: 64, num_block: 8, upscale: 2}
    slimmable:
      width_range: [0.5, 1.0]   # US-WDSR: body width n = 32 ... 64 (US-Nets Section 5.1); or widths: [...]
      num_widths: 4             # sandwich rule: max, min and 2 random widths per iteration
      distill: l1               # inplace distillation (l1 / l2 / null = every width on the ground truth)

Training (``optimize_parameters``): one ``MultiWidthStep`` per iteration, one backward per width, then BasicSR's
optimizer steps once and its EMA (``ema_decay``) updates; schedulers, warm-up, logger/TensorBoard, checkpoints and
resume are BasicSR's. Validation evaluates every ``eval_widths`` width with BasicSR's metrics (``calculate_psnr`` /
``calculate_ssim`` as configured in ``val.metrics``) on the EMA copy when there is one, logs them per width and
writes ``spectrum.csv`` next to the log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections import OrderedDict
from os import path as osp
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY

import slim_plugins as slim
from slim_plugins.spectrum import write_spectrum_csv
from slim_plugins.errors import InvalidArgumentError, NotSlimmableError
from slim_plugins.width import (WidthSpec, check_distill_weight, distill_from_config, eval_widths_from_config, schedule_from_config,
                                spec_from_config)

__all__ = ["SRSlimSettings", "parse_slimmable", "SlimSRModel", "evaluate_widths"]

_KEYS = ("widths", "width_range", "divisor", "num_widths", "rule", "distill", "distill_mode", "distill_weight",
         "eval_widths", "flops_lq_size", "seed")
_DISTILL_MODES = ("replace", "add")
_DISTILL = (None, "l1", "l2")


@dataclasses.dataclass(frozen=True)
class SRSlimSettings:
    """The ``slimmable`` options block, checked.

    Attributes:
        spec: a range (US-Net, e.g. ``[0.5, 1.0]`` = n 32 ... 64 for ``num_feat: 64``) or switches (S-Net).
        num_widths: widths per iteration for a range (the sandwich rule's n; US-Nets uses 4).
        rule: width sampling rule (``"all"`` for switches, ``"sandwich"`` for a range by default).
        distill: ``"l1"`` / ``"l2"``: inplace distillation, the widest prediction (detached) is the target of the
            other widths (US-Nets Section 4.2); ``None``: every width trains on the ground truth.
        distill_mode: ``"replace"`` (the paper: a distilled width's loss is only the distillation loss) or ``"add"``
            (its ground-truth loss + ``distill_weight`` x the distillation loss).
        distill_weight: weight of the distillation loss in ``"add"`` mode (refused in ``"replace"`` mode).
        eval_widths: widths validated (default: the switches, or 5 evenly spaced widths of the range).
        flops_lq_size: ``(h, w)`` of the LR input the MFLOPs column is counted at (48x48, US-Nets Fig. 4).
        seed: width sampling seed (default: the options' ``manual_seed``), drawn per ``(seed, iteration)``.
    """

    spec: WidthSpec
    num_widths: int = 4
    rule: str | None = None
    distill: str | None = "l1"
    distill_mode: str = "replace"
    distill_weight: float = 1.0
    eval_widths: tuple = ()
    flops_lq_size: tuple = (48, 48)
    seed: int = 0


def parse_slimmable(cfg: Mapping[str, Any] | bool, seed: int = 0) -> SRSlimSettings:
    """Check the ``slimmable`` options block.

    Accepted: ``true`` (US-WDSR: ``width_range: [0.5, 1.0]``, sandwich rule with 4 widths, L1 distillation),
    ``{widths: [...]}`` (S-Net) or ``{width_range: [lo, hi]}`` (US-Net) plus the keys of :class:`SRSlimSettings`.
    ``divisor`` (default 1: any channel count, as US-Nets' n in [32, 64]) rounds channels with ``make_divisible``.

    Raises:
        InvalidArgumentError: an unknown key, both or neither of ``widths`` / ``width_range``, a bad rule,
            distillation, width count or size (each names the bad value and what is allowed).
        WidthError: a bad width list or range, or an eval width outside it.
    """
    if cfg is True:
        cfg = {"width_range": [0.5, 1.0]}
    spec = spec_from_config(cfg, divisor=1, allowed=_KEYS)
    rule, num_widths = schedule_from_config(cfg)
    distill = distill_from_config(cfg, spec, _DISTILL, "l1")
    # null = not set (so `--set slimmable.distill=null slimmable.distill_mode=null` turns a shipped `add` off)
    mode = "replace" if cfg.get("distill_mode") is None else cfg["distill_mode"]
    if mode not in _DISTILL_MODES:
        raise InvalidArgumentError(f"distill_mode must be one of {list(_DISTILL_MODES)}, got {mode!r}")
    weight = 1.0 if cfg.get("distill_weight") is None else check_distill_weight(cfg["distill_weight"])
    for key, applies in (("distill_mode", distill is not None), ("distill_weight", mode == "add")):
        if cfg.get(key) is not None and not applies:
            raise InvalidArgumentError(f"{key} does not apply with distill: {distill!r}, distill_mode: {mode!r}; "
                                       f"remove it")
    eval_widths = eval_widths_from_config(cfg, spec, 5)
    size = cfg.get("flops_lq_size", (48, 48))
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise InvalidArgumentError(f"flops_lq_size must be [h, w] in pixels, got {size!r}")
    return SRSlimSettings(spec=spec, num_widths=num_widths, rule=rule, distill=distill, distill_mode=mode,
                          distill_weight=weight, eval_widths=eval_widths, flops_lq_size=tuple(size), seed=int(cfg.get("seed", seed)))


@torch.no_grad()
def evaluate_widths(net: nn.Module, dataloader, widths: Sequence, metrics: Mapping, device=None,
                    on_image: Callable | None = None) -> dict:
    """Mean of BasicSR metrics over ``dataloader`` at each width: ``{width: {metric: value}}``.

    Args:
        net: a slimmable SR network (or a plain one with ``widths=[None]``), run in eval mode.
        dataloader: BasicSR val loader (``{'lq': (1, 3, h, w), 'gt': (1, 3, s*h, s*w), 'lq_path'}``, [0, 1] RGB).
        metrics: BasicSR's ``val.metrics`` (e.g. ``{'psnr': {'type': 'calculate_psnr', 'crop_border': 2,
            'test_y_channel': True}}``): PSNR in dB, SSIM in [0, 1], on 8-bit images as BasicSR computes them.
        on_image: ``on_image(image name, width, sr image (H, W, 3) uint8 BGR)`` per image and width.
    Each image is loaded once and run at every width.
    """
    net.eval()
    device = device or next(net.parameters()).device
    sums = {w: {m: 0.0 for m in metrics} for w in widths}
    count = 0
    for data in dataloader:
        name = osp.splitext(osp.basename(data["lq_path"][0]))[0]
        lq = data["lq"].to(device)
        gt_img = tensor2img([data["gt"]]) if "gt" in data else None
        for w in widths:
            with (slim.width(w) if w is not None else contextlib.nullcontext()):
                out = net(lq)
            sr_img = tensor2img([out.detach().cpu()])
            for m, mopt in metrics.items():
                sums[w][m] += calculate_metric({"img": sr_img, "img2": gt_img}, mopt)
            if on_image is not None:
                on_image(name, w, sr_img)
        count += 1
    return {w: {m: v / count for m, v in sums[w].items()} for w in widths} if count else {}


def _bare(net: nn.Module) -> nn.Module:
    return net.module if isinstance(getattr(net, "module", None), nn.Module) else net


@MODEL_REGISTRY.register()
class SlimSRModel(SRModel):
    """BasicSR ``SRModel`` whose generator runs at any width of ``opt['slimmable']`` (see the module docstring).

    ``net_g`` (and ``net_g_ema``) are converted right after ``build_network``, before DDP wrapping and before
    ``pretrain_network_g`` loads (a plain checkpoint of the full-width network loads unchanged: the keys are the
    same). Per iteration the log has ``l_pix`` (the widest width's task loss), ``l_min`` (the narrowest width's
    loss, its distillation loss when distilling) and ``l_total``.

    Raises:
        InvalidArgumentError: a bad ``slimmable`` block (see :func:`parse_slimmable`).
        NotSlimmableError: ``opt`` has no ``slimmable`` block, or a US-Net generator has BN (its post-statistics
            would need the training loader inside validation; use switches or a BN-free arch).
    """

    def __init__(self, opt):
        if not opt.get("slimmable"):
            raise NotSlimmableError("model_type SlimSRModel needs a `slimmable` block in the options, e.g. "
                                    "slimmable: {width_range: [0.5, 1.0]}; use SRModel for a plain network")
        self.slim_settings = parse_slimmable(opt["slimmable"], seed=int(opt.get("manual_seed") or 0))
        self._profile = None
        self._spectrum: dict = {}
        super().__init__(opt)

    # ---- conversion ----------------------------------------------------------------------------------------
    def _convert(self, net: nn.Module) -> nn.Module:
        spec = self.slim_settings.spec
        if not spec.is_switches and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            raise NotSlimmableError(f"{type(net).__name__} has BatchNorm: a US-Net range needs BN post-statistics "
                                    "from the training data, which SlimSRModel's validation does not have; use "
                                    "widths: [...] (switchable BN) or a BN-free arch such as WDSR or EDSR")
        from .stock import convert_kwargs  # SwinIR: its analysis input and the upsampler it keeps at 64

        return slim.convert(net, spec, **convert_kwargs(self.opt["network_g"], net))

    def model_to_device(self, net):
        # SRModel.__init__ builds net_g and calls this once, before DDP wrapping and pretrained loading.
        if not slim.slim_layers(net):
            net = self._convert(net)
        return super().model_to_device(net)

    def init_training_settings(self):
        super().init_training_settings()  # builds net_g_ema (a copy of net_g's weights), losses, optimizer
        if hasattr(self, "net_g_ema"):
            self.net_g_ema = self._convert(self.net_g_ema)  # same parameters, same names: model_ema keeps working
            self.net_g_ema.eval()
        s = self.slim_settings
        self.width_step = slim.MultiWidthStep(self.net_g, s.spec, num_widths=s.num_widths, rule=s.rule,
                                              distill=s.distill, distill_mode=s.distill_mode,
                                              distill_weight=s.distill_weight, seed=s.seed,
                                              loss_keys=lambda k: k.startswith("l_"))

    # ---- training ------------------------------------------------------------------------------------------
    def _task_losses(self, output) -> dict:
        losses = OrderedDict()
        if self.cri_pix:
            losses["l_pix"] = self.cri_pix(output, self.gt)
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(output, self.gt)
            if l_percep is not None:
                losses["l_percep"] = l_percep
            if l_style is not None:
                losses["l_style"] = l_style
        return losses

    def optimize_parameters(self, current_iter):
        """One optimizer step over the widths of iteration ``current_iter`` (BasicSR counts from 1)."""
        self.optimizer_g.zero_grad()
        for p in self.width_step.iterate(current_iter - 1):
            with p:
                out = self.net_g(self.lq)
                loss = p.loss(out, self._task_losses)
                loss.backward()
                if p.width == self.slim_settings.spec.max:
                    self.output = out.detach()
                del out, loss
        self.optimizer_g.step()
        res = self.width_step.last
        widest, narrowest = res.results[0], res.results[-1]
        log = OrderedDict((k, v) for k, v in widest.parts.items() if k.startswith("l_"))
        log["l_min"] = narrowest.loss
        log["l_total"] = res.loss
        self.log_dict = self.reduce_loss_dict(log)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # ---- validation per width ------------------------------------------------------------------------------
    def width_profile(self) -> dict:
        """``{width: (MFLOPs, params M)}`` of the eval widths at ``flops_lq_size`` (multiply-adds, US-Nets Fig. 4)."""
        if self._profile is None:
            s = self.slim_settings
            net = _bare(self.net_g)
            x = torch.zeros(1, 3, *s.flops_lq_size, device=next(net.parameters()).device)
            table = slim.profile(net, x, widths=list(s.eval_widths), latency=False)
            self._profile = {r.width: (r.mflops, r.params_m) for r in table}
        return self._profile

    def active_feat(self, w: float) -> int:
        """Body width n at width multiplier ``w`` (``num_feat`` of the exported plain network)."""
        base = self.opt["network_g"].get("num_feat")
        return self.slim_settings.spec.channels(int(base), w) if base else -1

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """Every eval width on every image of ``dataloader`` with BasicSR's metrics (the EMA copy when there is
        one, as ``SRModel.test``); the widest width's values also go under BasicSR's own names (best-metric
        tracking, ``metrics/<dataset>/<metric>``)."""
        dataset_name = dataloader.dataset.opt["name"]
        metrics = self.opt["val"].get("metrics") or {}
        net = self.net_g_ema if hasattr(self, "net_g_ema") else self.net_g
        save = (lambda name, w, img: imwrite(img, self._image_path(dataset_name, name, current_iter, w))) \
            if save_img else None
        was = net.training
        results = evaluate_widths(net, dataloader, self.slim_settings.eval_widths, metrics, self.device, save)
        net.train(was)
        if not metrics or not results:
            return
        widest = max(results)
        self._initialize_best_metric_results(dataset_name)
        self.metric_results = dict(results[widest])
        for m, v in self.metric_results.items():
            self._update_best_metric_result(dataset_name, m, v, current_iter)
        self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
        self._log_widths(dataset_name, results, current_iter, tb_logger)

    def _image_path(self, dataset_name, img_name, current_iter, w) -> str:
        tag = f"n{self.active_feat(w)}" if self.active_feat(w) > 0 else f"w{w:g}"
        if self.opt["is_train"]:
            return osp.join(self.opt["path"]["visualization"], img_name, f"{img_name}_{current_iter}_{tag}.png")
        suffix = self.opt["val"].get("suffix") or self.opt["name"]
        return osp.join(self.opt["path"]["visualization"], dataset_name, f"{img_name}_{suffix}_{tag}.png")

    def _log_widths(self, dataset_name, results, current_iter, tb_logger) -> None:
        prof = self.width_profile()
        lines = [f"Validation {dataset_name} per width (MFLOPs at a {self.slim_settings.flops_lq_size[0]}x"
                 f"{self.slim_settings.flops_lq_size[1]} LR input)"]
        for w, vals in sorted(results.items()):
            n = self.active_feat(w)
            mflops, params = prof.get(w, (math.nan, math.nan))
            lines.append(f"\t width {w:g}" + (f" (n={n})" if n > 0 else "") + f", {mflops:.0f} MFLOPs: "
                         + ", ".join(f"{m}: {v:.4f}" for m, v in vals.items()))
            row = self._spectrum.setdefault(w, {"width": w, "mflops": round(mflops, 3), "params_m": round(params, 6)})
            for m, v in vals.items():
                row[f"{dataset_name}/{m}"] = round(v, 4)
                if tb_logger:
                    tb_logger.add_scalar(f"metrics/{dataset_name}/{m}_w{w:g}", v, current_iter)
        get_root_logger().info("\n".join(lines))
        root = self.opt["path"].get("experiments_root") or self.opt["path"].get("results_root")
        if root and self.opt.get("rank", 0) == 0:
            os.makedirs(root, exist_ok=True)
            write_spectrum_csv([self._spectrum[w] for w in sorted(self._spectrum)], osp.join(root, "spectrum.csv"))
