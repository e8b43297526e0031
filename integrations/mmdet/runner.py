"""``SlimRunner`` (mmengine ``RUNNERS``): converts the detector at build time, swaps mmengine's stock loops for the
slimmable ones (:mod:`.train_step`, :mod:`.evaluation`) and registers :class:`~.hooks.PlainMessageHubHook`.
No mmdet or mmengine class is patched."""
from __future__ import annotations

import copy
import os

import torch
from mmengine.dist import master_only
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from slim_plugins.errors import InvalidArgumentError

from .hooks import PlainMessageHubHook, ResumeRNGHook
from .model import check_slimmable_entries, is_slimmable, make_slimmable, parse_slimmable, slim_settings

__all__ = ["SlimRunner"]


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

    @classmethod
    def from_cfg(cls, cfg):
        # before Runner.__init__ creates the work dir, its log and its config dump: a bad `slimmable` entry (in a
        # SlimDetector model or at the top level) leaves no files behind
        check_slimmable_entries(cfg)
        return super().from_cfg(cfg)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(h, PlainMessageHubHook) for h in self.hooks):
            self.register_hook(PlainMessageHubHook())
        if not any(isinstance(h, ResumeRNGHook) for h in self.hooks):
            self.register_hook(ResumeRNGHook())

    @master_only  # as Runner.save_checkpoint: on other ranks nothing is written, so there is nothing to rename
    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs):
        # atomic: written under a temporary name in the same folder, then renamed, so a kill mid-write never leaves
        # a partial epoch_N.pth (nor a last_checkpoint pointing at one: CheckpointHook writes that afterwards)
        if not os.path.isdir(out_dir) or kwargs.get("backend_args") or kwargs.get("file_client_args"):
            return super().save_checkpoint(out_dir, filename, *args, **kwargs)  # remote storage: the backend's way
        tmp = f".{filename}.tmp"
        try:
            super().save_checkpoint(out_dir, tmp, *args, **kwargs)
            os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, filename))
        finally:
            if os.path.exists(os.path.join(out_dir, tmp)):
                os.remove(os.path.join(out_dir, tmp))

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
        top = self.cfg.get("slimmable", None)
        if not is_slimmable(model):  # the runner-only form: a top-level `slimmable` or a SlimResNet backbone
            make_slimmable(model, top)
        elif top not in (None, False) and parse_slimmable(top).spec != slim_settings(model).spec:
            raise InvalidArgumentError(f"the config's top-level slimmable {top} and its SlimDetector model "
                                       f"{slim_settings(model).spec.to_dict()} differ; name the widths in one place")
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
