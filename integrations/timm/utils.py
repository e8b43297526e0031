"""Slim versions of the ``timm.utils`` pieces the trainer uses: timm's ``CheckpointSaver`` writing slim checkpoints,
``distribute_bn`` that also covers the US-Net min width's statistics, and the RNG state an exact resume needs."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

import slim_plugins as slim

__all__ = ["rng_state", "set_rng_state", "distribute_bn", "checkpoint_saver"]


def rng_state() -> dict:
    """The torch, numpy, Python (and CUDA) generator states."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


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
