"""``PlainMessageHubHook``: checkpoints that load with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import numpy as np
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = ["PlainMessageHubHook"]

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
