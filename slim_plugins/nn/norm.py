"""Width-switchable BatchNorm2d in the forms of both papers.

Modes (DESIGN rule 3):

- ``"switchable"``: S-BN, private ``gamma, beta, mean, var`` per switch, keyed by switch index (Slimmable Networks
  Section 3.2). ``"switchable_shared"``: private statistics, shared ``gamma, beta`` (Table 6 ablation).
- ``"us"``: shared ``gamma, beta`` sliced ``[:C]``; running statistics tracked during training for the max width
  (the stock ``running_mean/var``) and the min width only; any other width uses post-statistics from
  ``calibrate_bn`` (US-Nets Section 3.2), kept in a per-width cache saved with the model.
- ``"naive"``: one shared BN, statistics updated at every width (Slimmable Networks Section 3.1 ablation).
- ``"frozen"``: slices and never updates (mmdet ``norm_eval`` / frozen BN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..context import _calibration
from ..errors import UncalibratedWidthError
from ..registry import register

_SWITCHABLE = ("switchable", "switchable_shared")


@register(nn.BatchNorm2d)
class SlimBatchNorm2d(nn.BatchNorm2d):
    """Width-switchable ``nn.BatchNorm2d``: input and output ``(N, C_active, H, W)``, ``C_active`` read from input.

    Raises:
        UncalibratedWidthError: evaluation (or export) at a width with no statistics ("us" mode).
    """

    @classmethod
    def from_module(cls, m: nn.BatchNorm2d, name, state, fixed_out=False):
        new = cls.__new__(cls)
        new.__dict__.update(m.__dict__)
        new._slim_state = state
        new.slim_name = name
        new.bn_mode = state.bn_mode
        new._post = {}
        c = m.num_features
        if new.bn_mode in _SWITCHABLE:
            s = len(state.spec.widths)
            if new.track_running_stats:
                new._buffers["running_mean"] = m.running_mean.detach().expand(s, c).clone()
                new._buffers["running_var"] = m.running_var.detach().expand(s, c).clone()
            if new.affine and new.bn_mode == "switchable":
                new._parameters["weight"] = nn.Parameter(m.weight.detach().expand(s, c).clone())
                new._parameters["bias"] = nn.Parameter(m.bias.detach().expand(s, c).clone())
        elif new.bn_mode == "us":
            ref = m.running_mean if m.running_mean is not None else torch.zeros(c)
            new.register_buffer("min_mean", torch.zeros_like(ref))
            new.register_buffer("min_var", torch.ones_like(ref))
            new.register_buffer("min_tracked", torch.zeros((), dtype=torch.long))
        return new

    # ---- parameter / statistic selection ------------------------------------------------------------------
    def _affine(self, a, c):
        if not self.affine:
            return None, None
        if self.bn_mode == "switchable":
            return self.weight[a.switch, :c], self.bias[a.switch, :c]
        return self.weight[:c], self.bias[:c]

    def _stats(self, a, c, for_update: bool):
        """``(mean, var, num_tracked)`` views for configuration ``a``; ``None`` where there are none."""
        mode = self.bn_mode
        if not self.track_running_stats:
            return None, None, None
        if mode in _SWITCHABLE:
            return self.running_mean[a.switch, :c], self.running_var[a.switch, :c], self.num_batches_tracked
        if mode in ("naive", "frozen"):
            return self.running_mean[:c], self.running_var[:c], self.num_batches_tracked
        # US mode
        if not for_update:
            hit = self._post.get(a.key)
            if hit is not None:
                return hit[0][:c], hit[1][:c], None
        if a.is_max:
            return self.running_mean[:c], self.running_var[:c], self.num_batches_tracked
        if a.is_min and (for_update or int(self.min_tracked) > 0):
            return self.min_mean[:c], self.min_var[:c], self.min_tracked
        if for_update:
            return None, None, None
        raise UncalibratedWidthError(
            f"layer {self.slim_name!r} has no BN statistics for width {a.key}; statistics exist for "
            f"{self.calibrated_widths()}. Run slim.calibrate_bn(model, batches, widths=[...]) first "
            "(US-Nets, Section 3.2: post-statistics).")

    def calibrated_widths(self) -> list[str]:
        """Width keys with statistics ("max"/"min" = tracked during training)."""
        keys = sorted(self._post)
        if self.bn_mode == "us":
            keys = ["max"] + (["min"] if int(self.min_tracked) > 0 else []) + keys
        return keys

    def bn_params(self, a, c):
        """Eval-mode ``(weight, bias, mean, var)`` at configuration ``a`` for ``c`` channels (for export)."""
        w, b = self._affine(a, c)
        mean, var, _ = self._stats(a, c, for_update=False)
        return w, b, mean, var

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x):
        a = self._slim_state.active()
        c = x.shape[1]
        w, b = self._affine(a, c)
        calib = _calibration.get()
        if calib is not None and self in calib:
            return self._calibrate_forward(x, w, b, calib[self])
        use_batch = self.training and self.bn_mode != "frozen"
        if not use_batch:
            mean, var, _ = self._stats(a, c, for_update=False)
            return F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)
        mean, var, tracked = self._stats(a, c, for_update=True)
        momentum = 0.0
        if mean is not None:
            tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked)
        return F.batch_norm(x, mean, var, w, b, True, momentum, self.eps)

    def _calibrate_forward(self, x, w, b, acc):
        # momentum=1 makes F.batch_norm write the batch mean / unbiased var into tmp in the same kernel.
        c = x.shape[1]
        tmp_m = torch.zeros(c, dtype=x.dtype, device=x.device)
        tmp_v = torch.zeros(c, dtype=x.dtype, device=x.device)
        y = F.batch_norm(x, tmp_m, tmp_v, w, b, True, 1.0, self.eps)
        acc.add(x.shape[0], tmp_m, tmp_v)
        return y

    def store_statistics(self, a, mean, var):
        """Write calibrated statistics for configuration ``a`` (called by ``calibrate_bn``)."""
        c = mean.shape[0]
        if self.bn_mode == "frozen" or not self.track_running_stats:
            return
        if self.bn_mode == "us":
            self._post[a.key] = (mean.detach().clone(), var.detach().clone())
            return
        m, v, _ = self._stats(a, c, for_update=True)
        with torch.no_grad():
            m.copy_(mean)
            v.copy_(var)

    def clear_statistics(self):
        """Drop every calibrated width ("us" mode)."""
        self._post.clear()

    # ---- export -------------------------------------------------------------------------------------------
    def record(self, x, y):
        return {"in": x.shape[1], "out": x.shape[1]}

    def plain_state(self, rec, a):
        c = rec["in"]
        w, b, mean, var = self.bn_params(a, c)
        clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return clone(w), clone(b), clone(mean), clone(var)

    def to_plain(self, rec, a) -> nn.Module:
        w, b, mean, var = self.plain_state(rec, a)
        p = nn.BatchNorm2d(rec["in"], self.eps, self.momentum, self.affine, self.track_running_stats,
                           device=self._dev(), dtype=self._dtype())
        load_bn(p, w, b, mean, var)
        return p

    def _dev(self):
        t = self.weight if self.affine else self.running_mean
        return t.device if t is not None else None

    def _dtype(self):
        t = self.weight if self.affine else self.running_mean
        return t.dtype if t is not None else None

    # ---- state dict: per-width cache + loading stock checkpoints ------------------------------------------
    def get_extra_state(self):
        return {"post": {k: (m.cpu(), v.cpu()) for k, (m, v) in self._post.items()}, "mode": self.bn_mode}

    def set_extra_state(self, state):
        dev = self.running_mean.device if self.running_mean is not None else None
        self._post = {k: (m.to(dev), v.to(dev)) for k, (m, v) in state.get("post", {}).items()}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A stock BN checkpoint (1-D weights/statistics) loads into S-BN by broadcasting to every switch.
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = prefix + name
            own = self._parameters.get(name, self._buffers.get(name))
            if key in state_dict and own is not None and own.dim() == 2 and state_dict[key].dim() == 1:
                state_dict[key] = state_dict[key].expand_as(own)
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        optional = {prefix + k for k in ("_extra_state", "min_mean", "min_var", "min_tracked")}
        missing_keys[:] = [k for k in missing_keys if k in before or k not in optional]


def load_bn(p: nn.BatchNorm2d, w, b, mean, var):
    with torch.no_grad():
        if w is not None:
            p.weight.copy_(w)
            p.bias.copy_(b)
        if mean is not None and p.running_mean is not None:
            p.running_mean.copy_(mean)
            p.running_var.copy_(var)
