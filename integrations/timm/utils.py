"""Slim versions of the ``timm.utils`` pieces the trainer uses: timm's ``CheckpointSaver`` writing slim checkpoints,
``distribute_bn`` that also covers the US-Net min width's statistics; the RNG state an exact resume needs is the
core's (:func:`slim_plugins.checkpoint.rng_state`)."""
from __future__ import annotations

from types import SimpleNamespace

import torch.distributed as dist

import slim_plugins as slim
from slim_plugins.checkpoint import rng_state, set_rng_state

__all__ = ["rng_state", "set_rng_state", "distribute_bn", "checkpoint_saver"]


def distribute_bn(module, world, reduce):
    """timm's ``distribute_bn`` plus the US-Net min width's own running statistics (``min_mean`` / ``min_var``)."""
    from timm.utils import distribute_bn as timm_distribute_bn

    timm_distribute_bn(module, world, reduce)
    for name, buf in module.named_buffers():
        if name.endswith(("min_mean", "min_var")):
            if reduce:
                dist.all_reduce(buf)
                buf /= float(world)
            else:
                dist.broadcast(buf, 0)


def checkpoint_saver(model, optimizer, cfg, model_ema, loss_scaler, output, decreasing, payload):
    """timm's ``CheckpointSaver`` (last / checkpoint-<epoch> / model_best, ``checkpoint_hist``, recovery) writing
    slim checkpoints: the width spec, the config, the update count (the width schedule is drawn from it) and the RNG
    states (exact resume). ``payload()`` gives the run's entries at save time."""
    from timm.utils import CheckpointSaver

    class SlimSaver(CheckpointSaver):
        def _save(self, save_path, epoch, metric=None):
            extra = payload()
            if self.model_ema is not None:
                extra["state_dict_ema"] = self.model_ema.module.state_dict()
            slim.save_checkpoint(save_path, self.model, **extra, metric=metric, saver=self.state_dict(epoch, metric))

    return SlimSaver(model, optimizer, args=SimpleNamespace(**cfg), model_ema=model_ema, amp_scaler=loss_scaler,
                     checkpoint_dir=output, recovery_dir=output, decreasing=decreasing,
                     max_history=cfg["checkpoint_hist"])
