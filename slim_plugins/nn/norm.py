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
        new._eval_cache = {}
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
        calib = _calibration.get()
        if calib is not None and self in calib:
            return self._calibrate_forward(x, *self._affine(a, c), calib[self])
        use_batch = self.training and self.bn_mode != "frozen"
        if not use_batch:
            w, b, mean, var = self._eval_params(a, c)
            return F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)
        w, b = self._affine(a, c)
        mean, var, tracked = self._stats(a, c, for_update=True)
        momentum = 0.0
        if mean is not None:
            tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked)
        return F.batch_norm(x, mean, var, w, b, True, momentum, self.eps)

    def _eval_params(self, a, c):
        """``(weight, bias, mean, var)`` for normalising with stored statistics at ``a``, ``c`` channels.

        Without autograd the sliced views are cached per configuration (DESIGN rule 7: four slices cost more
        than the BN kernel itself at batch 1). A hit is used only while the same statistics entry and the same
        parameter / buffer objects are in place; ``.to()``-style casts and ``load_state_dict`` drop the cache
        (in-place updates need nothing: the views share storage).
        """
        if torch.is_grad_enabled():
            w, b = self._affine(a, c)
            return (w, b, *self._stats(a, c, for_update=False)[:2])
        post = self._post.get(a.key) if self._post else None
        p, bufs = self._parameters, self._buffers
        hit = self._eval_cache.get(a)
        if (hit is not None and hit[0] == c and hit[1] is post and hit[2] is p["weight"] and hit[3] is p["bias"]
                and hit[4] is bufs["running_mean"] and hit[5] is bufs["running_var"]):
            return hit[6]
        w, b = self._affine(a, c)
        vals = (w, b, *self._stats(a, c, for_update=False)[:2])
        if len(self._eval_cache) >= 64:
            self._eval_cache.clear()
        self._eval_cache[a] = (c, post, p["weight"], p["bias"], bufs["running_mean"], bufs["running_var"], vals)
        return vals

    def _calibrate_forward(self, x, w, b, acc):
        c = x.shape[1]
        stats = _batch_stats(x) if x.device.type == "cpu" and x.dim() > 2 and x.numel() > c else None
        if stats is not None:  # normalise by the biased batch variance, as BN in training mode does
            mean, var_u = stats
            total = x.numel() // c
            normed = torch.stack((mean, var_u * ((total - 1) / total))).to(x.dtype)
            y = F.batch_norm(x, normed[0], normed[1], w, b, False, 0.0, self.eps)
            acc.add(x.shape[0], mean, var_u)
            return y
        # momentum=1 makes F.batch_norm write the batch mean / unbiased var into tmp in the same kernel.
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

    def _apply(self, fn, *args, **kwargs):
        # The post-statistics cache is a plain dict: move/cast it with the module (.to(device), .half(), ...).
        out = super()._apply(fn, *args, **kwargs)
        self._post = {k: (fn(m), fn(v)) for k, (m, v) in self._post.items()}
        self._eval_cache = {}  # parameters may have been changed through `.data`: drop views of the old storage
        return out

    def clear_statistics(self):
        """Drop every calibrated width ("us" mode)."""
        self._post.clear()

    def __getstate__(self):  # copies and pickles drop the view cache
        d = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        d["_eval_cache"] = {}
        return d

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
        self._eval_cache = {}  # load_state_dict(assign=True) swaps the tensors
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        optional = {prefix + k for k in ("_extra_state", "min_mean", "min_var", "min_tracked")}
        missing_keys[:] = [k for k in missing_keys if k in before or k not in optional]


def _batch_stats(x: torch.Tensor):
    """Per-channel batch ``(mean, unbiased var)`` (float64, shape ``(C,)``) of ``(N, C, ...)`` input, or ``None``
    when float32 sums of squares would be too inexact for it.

    For calibration on CPU, where the statistics pass of the training-mode BN kernel (scalar double loops) costs
    several times a whole eval-mode BN: two vectorised reductions over each sample's feature map (sum, sum of
    squares), added up across samples in float64. The float32 sums of squares lose about
    ``4e-8 * sum(x^2) / sum((x - mean)^2)`` of the variance; above ``_MAX_COND`` that ratio the caller uses the
    exact kernel instead.
    """
    n, c = x.shape[0], x.shape[1]
    rows = x.reshape(n, c, -1)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    sums = torch.stack((rows.sum(2, dtype=dt), torch.linalg.vector_norm(rows, dim=2, dtype=dt).square_()))
    s1, s2 = sums.sum(1, dtype=torch.float64)  # (C,) each
    total = rows.shape[0] * rows.shape[2]
    mean = s1 / total
    centred = torch.addcmul(s2, s1, mean, value=-1)
    if dt == torch.float32 and bool((s2 > centred * _MAX_COND).any()):  # also catches centred < 0
        return None
    return mean, centred / max(total - 1, 1)


# Largest sum(x^2) / sum((x - mean)^2) of a channel for float32 sums (variance error <= ~3e-6 relative).
_MAX_COND = 64.0


def load_bn(p: nn.BatchNorm2d, w, b, mean, var):
    with torch.no_grad():
        if w is not None:
            p.weight.copy_(w)
            p.bias.copy_(b)
        if mean is not None and p.running_mean is not None:
            p.running_mean.copy_(mean)
            p.running_var.copy_(var)
