"""``PlainMessageHubHook``: checkpoints that load with ``torch.load(weights_only=True)``; ``ResumeRNGHook``: the
random streams a resumed run continues."""
from __future__ import annotations

import numpy as np
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = ["PlainMessageHubHook", "ResumeRNGHook", "plain_rng_state", "set_plain_rng_state"]

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


def plain_rng_state() -> dict:
    """:func:`slim_plugins.checkpoint.rng_state` as data ``torch.load(weights_only=True)`` reads (NumPy's key array
    as a tensor)."""
    import torch

    from slim_plugins.checkpoint import rng_state

    st = rng_state()
    name, keys, pos, has_gauss, cached = st["numpy"]
    st["numpy"] = [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                   float(cached)]
    st["python"] = [st["python"][0], list(st["python"][1]), st["python"][2]]
    return st


def set_plain_rng_state(st: dict) -> None:
    """Restore :func:`plain_rng_state`."""
    from slim_plugins.checkpoint import set_rng_state

    name, keys, pos, has_gauss, cached = st["numpy"]
    py = st["python"]
    set_rng_state(dict(st, numpy=(name, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
                       python=(py[0], tuple(py[1]), py[2])))


@HOOKS.register_module()
class ResumeRNGHook(Hook):
    """Saves the Python / NumPy / torch random states in every checkpoint (``meta.slim_rng``) and, when the run
    resumes from one, hands them to the slimmable train loop, which restores them right before the first batch it
    loads (after the batches an iteration-based loop skips), so a resumed run draws what the uninterrupted run drew
    (data augmentation, RPN / RoI sampling). Evaluation in between is RNG-neutral (the val / test loops restore the
    states they found). ``SlimRunner`` registers it."""

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["slim_rng"] = plain_rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        rng = (checkpoint.get("meta") or {}).get("slim_rng")
        if rng is not None and getattr(runner, "_resume", False):
            runner._slim_pending_rng = rng
