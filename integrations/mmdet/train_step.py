"""The multi-width train step (every width of one iteration, one optimizer step) and the train loops that run it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmengine.optim import OptimWrapper
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

import slim_plugins as slim
from slim_plugins.errors import InvalidArgumentError

from .model import SlimSettings, _module, slim_settings

__all__ = ["build_step", "multi_width_train_step", "log_vars", "SlimEpochBasedTrainLoop", "SlimIterBasedTrainLoop"]


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


    def _restore_rng(self) -> None:
        """The random states of the checkpoint this run resumed from (:class:`~.hooks.ResumeRNGHook`), once."""
        rng = getattr(self.runner, "_slim_pending_rng", None)
        if rng is not None:
            from .hooks import set_plain_rng_state

            set_plain_rng_state(rng)
            self.runner._slim_pending_rng = None


class _RestoreBeforeBatch:
    """The loop's infinite dataloader iterator, restoring the resumed random states right before batch ``at`` is
    loaded (mmengine's iteration-based loop first skips the batches already trained on, drawing augmentations)."""

    def __init__(self, it, at: int, restore):
        self.it, self.at, self.restore, self.n = it, at, restore, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.n == self.at and self.restore is not None:
            self.restore()
            self.restore = None
        self.n += 1
        return next(self.it)

    def __getattr__(self, name):
        return getattr(self.it, name)


@LOOPS.register_module()
class SlimEpochBasedTrainLoop(_SlimTrain, EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` whose iterations train every width (S-Nets) or the sandwich widths (US-Nets)."""

    def run(self):
        self._restore_rng()  # a resumed run starts at an epoch boundary, where the checkpoint was written
        return super().run()

    def run_iter(self, idx, data_batch) -> None:
        self._slim_iter(data_batch, batch_idx=idx)


@LOOPS.register_module()
class SlimIterBasedTrainLoop(_SlimTrain, IterBasedTrainLoop):
    """``IterBasedTrainLoop`` whose iterations train every width (S-Nets) or the sandwich widths (US-Nets)."""

    def run(self):
        if getattr(self.runner, "_slim_pending_rng", None) is not None:
            self.dataloader_iterator = _RestoreBeforeBatch(self.dataloader_iterator, self._iter, self._restore_rng)
        return super().run()

    def run_iter(self, data_batch) -> None:
        self._slim_iter(data_batch, batch_idx=self._iter)
