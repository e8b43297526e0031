"""Width-switchable BatchNorm2d (and SyncBatchNorm) in the forms of both papers.

Modes (DESIGN rule 3):

- ``"switchable"``: S-BN, private ``gamma, beta, mean, var`` per switch, keyed by switch index (Slimmable Networks
  Section 3.2), with a private ``num_batches_tracked`` per switch. ``"switchable_shared"``: private statistics,
  shared ``gamma, beta`` (Table 6 ablation).
- ``"us"``: shared ``gamma, beta``; running statistics tracked during training for the max width (the stock
  ``running_mean/var``) and the min width only; any other width uses post-statistics from ``calibrate_bn``
  (US-Nets Section 3.2), kept per width in buffers (``post_keys``, ``post_mean``, ``post_var``) that
  ``torch.save`` and safetensors both hold.
- ``"naive"``: one shared BN, statistics updated at every width (Slimmable Networks Section 3.1 ablation).

**Frozen** (``frozen=True``, mmdet ``norm_eval`` / detection fine-tuning) is orthogonal to the mode: the layer
normalises with the statistics it has (per switch, per width) in training mode too and never updates them. US +
frozen at a width without its own statistics uses the max width's running statistics restricted to its active
channels (the statistics a pretrained checkpoint carries). ``bn="frozen"`` is the naive layout, frozen.

Every statistic and affine parameter is selected with the layer's channel selection at the width (a prefix is a
slice; the channel plan may give an index set, e.g. behind a concatenation). Statistics live in the model's dtype.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..context import CarriesWidth, _calibration
from ..errors import UncalibratedWidthError
from ..registry import register
from .layers import EvalFast, Geo, TracksParameters, _share, cached, plain_copy, stamps, unbased

_SWITCHABLE = ("switchable", "switchable_shared")


class BNGeo:
    """Channels of a norm layer at one width: ``c`` active, ``idx`` (numpy) where not a prefix."""

    __slots__ = ("c", "idx", "_dev")

    def __init__(self, c: int, idx=None):
        self.c, self.idx, self._dev = c, idx, {}

    def index(self, device):
        if self.idx is None:
            return None
        t = self._dev.get(device)
        if t is None:
            t = torch.as_tensor(self.idx, dtype=torch.long, device=device)
            self._dev[device] = t
        return t

    def pick(self, t):
        """``t[..., selection]``: a view for a prefix, a gathered copy otherwise."""
        return self.take(t, -1)

    def take(self, t, dim: int):
        """``t`` restricted to the selection along ``dim``: ``t`` itself when whole (no view to build: batch-1
        latency), a narrow view for a prefix, a gathered copy otherwise."""
        if t is None:
            return None
        if self.idx is None:
            return t if t.shape[dim] == self.c else t.narrow(dim, 0, self.c)
        return t.index_select(dim, self.index(t.device))


@register(nn.BatchNorm2d)
class SlimBatchNorm2d(TracksParameters, CarriesWidth, nn.BatchNorm2d):
    """Width-switchable ``nn.BatchNorm2d``: input and output ``(N, C_active, H, W)``.

    Raises:
        UncalibratedWidthError: evaluation (or export) at a width with no statistics ("us" mode, not frozen).
    """

    _slim_slot: int = -1
    frozen: bool = False

    @classmethod
    def from_module(cls, m: nn.BatchNorm2d, name, state, fixed_out=False):
        new = cls.__new__(cls)
        _share(new, m)
        new._slim_state = state
        new.slim_name = name
        new._slim_slot = -1
        mode = state.bn_mode
        new.frozen = bool(state.frozen_bn) or mode == "frozen"
        new.bn_mode = "naive" if mode == "frozen" else mode
        new._post = {}
        new._eval_cache = {}
        new._geo_cache = {}
        c = m.num_features
        if new.bn_mode in _SWITCHABLE:
            s = len(state.spec.widths)
            if new.track_running_stats:
                new._buffers["running_mean"] = m.running_mean.detach().expand(s, c).clone()
                new._buffers["running_var"] = m.running_var.detach().expand(s, c).clone()
                new._buffers["num_batches_tracked"] = m.num_batches_tracked.detach().expand(s).clone()
            if new.affine and new.bn_mode == "switchable":
                new._parameters["weight"] = nn.Parameter(m.weight.detach().expand(s, c).clone())
                new._parameters["bias"] = nn.Parameter(m.bias.detach().expand(s, c).clone())
        elif new.bn_mode == "us":
            ref = m.running_mean if m.running_mean is not None else torch.zeros(c)
            new.register_buffer("min_mean", torch.zeros_like(ref))
            new.register_buffer("min_var", torch.ones_like(ref))
            new.register_buffer("min_tracked", torch.zeros((), dtype=torch.long, device=ref.device))
        return new

    def channel_role(self) -> dict:
        return {"role": "norm"}

    # ---- channel selection ---------------------------------------------------------------------------------
    def geometry(self, a, c: int) -> BNGeo:
        geos = a.geo
        if geos is not None and self._slim_slot >= 0:
            g = geos[self._slim_slot]
            if g is not None and g.c == c:
                return g
        g = self._geo_cache.get(c)
        if g is None:
            g = BNGeo(c)
            if len(self._geo_cache) > 256:
                self._geo_cache.clear()
            self._geo_cache[c] = g
        return g

    def geometry_from_plan(self, ls, full_in: int) -> BNGeo:
        s = ls.sel_in
        return BNGeo(s.n, None if s.prefix else s.idx)

    # ---- parameter / statistic selection ------------------------------------------------------------------
    def _affine(self, a, g: BNGeo | int):
        if isinstance(g, int):
            g = self.geometry(a, g)
        if not self.affine:
            return None, None
        if self.bn_mode == "switchable":
            return g.pick(self.weight[a.switch]), g.pick(self.bias[a.switch])
        return g.pick(self.weight), g.pick(self.bias)

    def _full_stats(self, a, for_update: bool):
        """``(mean, var, num_tracked)`` full-size tensors for ``a``; ``(None, None, None)`` where there are none
        (``for_update``: the ones training mode would update)."""
        mode = self.bn_mode
        if not self.track_running_stats:
            return None, None, None
        if mode in _SWITCHABLE:
            s = a.switch
            return self.running_mean[s], self.running_var[s], self.num_batches_tracked[s:s + 1]
        if mode == "naive":
            return self.running_mean, self.running_var, self.num_batches_tracked
        # US mode
        if not for_update:
            hit = self._post.get(a.key)
            if hit is not None:
                return hit[0], hit[1], None
        if a.is_max:
            return self.running_mean, self.running_var, self.num_batches_tracked
        if a.is_min and (for_update or int(self.min_tracked) > 0):
            return self.min_mean, self.min_var, self.min_tracked
        if for_update:
            return None, None, None
        if self.frozen:  # documented policy: the pretrained (max width) statistics on the active channels
            return self.running_mean, self.running_var, None
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

    def bn_params(self, a, g: BNGeo):
        """Eval-mode ``(weight, bias, mean, var)`` at configuration ``a`` (for export); ``g``: a geometry or the
        active channel count."""
        if isinstance(g, int):
            g = self.geometry(a, g)
        w, b = self._affine(a, g)
        mean, var, _ = self._full_stats(a, for_update=False)
        return w, b, g.pick(mean), g.pick(var)

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x):
        a = self._slim_state.active(self._dp_width)
        geos, slot = a.geo, self._slim_slot
        g = geos[slot] if geos is not None and slot >= 0 else None
        if g is None or g.c != x.shape[1]:
            g = self.geometry(a, x.shape[1])
        calib = _calibration.get()
        if calib is not None and self in calib:
            return self._calibrate_forward(x, *self._affine(a, g), calib[self])
        if not self.training or self.frozen:
            w, b, mean, var = self._eval_params(a, g)
            return F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)
        w, b = self._affine(a, g)
        mean_f, var_f, tracked = self._full_stats(a, for_update=True)
        if mean_f is None:
            return self._norm_train(x, None, None, w, b, 0.0)
        tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked)
        i = g.index(mean_f.device)
        if i is None:  # prefix views: F.batch_norm updates the stored statistics in place
            return self._norm_train(x, mean_f[:g.c], var_f[:g.c], w, b, momentum)
        mean, var = mean_f.index_select(0, i), var_f.index_select(0, i)
        y = self._norm_train(x, mean, var, w, b, momentum)
        with torch.no_grad():
            mean_f.index_copy_(0, i, mean)
            var_f.index_copy_(0, i, var)
        return y

    def _norm_train(self, x, mean, var, w, b, momentum):
        """Batch-statistics normalisation (training mode); SyncBatchNorm overrides it."""
        return F.batch_norm(x, mean, var, w, b, True, momentum, self.eps)

    def _eval_params(self, a, g: BNGeo):
        """``(weight, bias, mean, var)`` for normalising with stored statistics.

        Without autograd the selections are cached per configuration (DESIGN rule 7: four slices cost more
        than the BN kernel itself at batch 1). Prefix selections are views of the stored tensors, valid while the
        affine parameters are unchanged (:func:`~slim_plugins.nn.layers.stamps`: in-place writes, ``.data`` swaps,
        ``swap_tensors``); gathered ones are copies, valid while all the tensors they were copied from are
        unchanged. Other tensor objects (assigned, or put in by ``torch.func.functional_call``), loading a state
        dict, moving the module and calibrating make a miss; parametrized tensors are not cached. Not seen:
        ``running_mean.data = t`` (a buffer counts no such swap), and a hand-made ``torch.utils.swap_tensors`` of a
        running statistic read through a prefix view (checking them would cost two reads per BN call).
        """
        if torch.is_grad_enabled():
            w, b = self._affine(a, g)
            mean, var, _ = self._full_stats(a, for_update=False)
            return w, b, g.pick(mean), g.pick(var)
        p, bufs = self._parameters, self._buffers
        # the same tensor objects: torch.func.functional_call puts others in the dicts without __setattr__
        cur = (p.get("weight"), p.get("bias"), bufs.get("running_mean"), bufs.get("running_var"),
               bufs.get("min_mean"), bufs.get("min_var"))  # (US mode: the min width reads min_mean / min_var)
        hit = self._eval_cache.get(a)
        c0 = hit[4] if hit is not None else None
        if hit is not None and hit[0] is g and c0[0] is cur[0] and c0[1] is cur[1] and c0[2] is cur[2] and \
                c0[3] is cur[3] and c0[4] is cur[4] and c0[5] is cur[5]:
            if hit[1] is None:
                return hit[3]
            for t, st in zip(hit[1], hit[2]):  # stamps(): unchanged
                if st[0]._version != st[1] or t.__dict__ is not st[2]:
                    break
            else:
                return hit[3]
        if "parametrizations" in self._modules:  # computed at every read (torch.nn.utils.parametrize): not cached
            w, b = self._affine(a, g)
            mean, var, _ = self._full_stats(a, for_update=False)
            return w, b, g.pick(mean), g.pick(var)
        if g.idx is not None:
            post = self._post.get(a.key)
            srcs = tuple(t for t in (*cur, *(post or ())) if t is not None)
        else:  # views follow in-place writes; a `.data` swap of the affine parameters counts as a write
            srcs = tuple(t for t in cur[:2] if t is not None) or None
        sts = None if srcs is None else stamps(srcs)  # before selecting (a concurrent write: a miss)
        w, b = self._affine(a, g)
        mean, var, _ = self._full_stats(a, for_update=False)
        vals = unbased((w, b, g.pick(mean), g.pick(var)))
        if srcs is not None and sts is None:  # an inference tensor: nothing to reuse
            return vals
        if len(self._eval_cache) >= 64:
            self._eval_cache.clear()
        self._eval_cache[a] = (g, srcs, sts, vals, cur)
        return vals

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in _CACHED and "_eval_cache" in self.__dict__:
            self._eval_cache = {}  # a new tensor object: selections of the old one are stale

    def _calibrate_forward(self, x, w, b, acc):
        c = x.shape[1]
        # Statistics of low-precision activations (a float16 model, autocast) are taken in float32.
        if x.dtype not in (torch.float32, torch.float64):
            xs = x.float()
            w = w.float() if w is not None else None
            b = b.float() if b is not None else None
        else:
            xs = x
        auto = torch.is_autocast_enabled(x.device.type)
        stats = _batch_stats(xs) if x.device.type == "cpu" and x.dim() > 2 and x.numel() > c else None
        if stats is not None:  # normalise by the biased batch variance, as BN in training mode does
            mv, normed = stats
            with torch.autocast(x.device.type, enabled=False) if auto else contextlib.nullcontext():
                y = F.batch_norm(xs, normed[0], normed[1], w, b, False, 0.0, self.eps)
            acc.add_stacked(x.shape[0], mv)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        # momentum=1 makes F.batch_norm write the batch mean / unbiased var into tmp in the same kernel.
        tmp_m = torch.zeros(c, dtype=xs.dtype, device=x.device)
        tmp_v = torch.zeros(c, dtype=xs.dtype, device=x.device)
        with torch.autocast(x.device.type, enabled=False) if auto else contextlib.nullcontext():
            y = F.batch_norm(xs, tmp_m, tmp_v, w, b, True, 1.0, self.eps)
        acc.add(x.shape[0], tmp_m, tmp_v)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def store_statistics(self, a, mean, var):
        """Write calibrated statistics ``(C_active,)`` for configuration ``a`` (called by ``calibrate_bn``)."""
        if self.frozen or not self.track_running_stats:
            return
        ref = self.running_mean
        g = self.geometry(a, mean.shape[0])
        mean, var = mean.detach().to(ref.dtype), var.detach().to(ref.dtype)
        self._eval_cache = {}
        if self.bn_mode == "us":
            full = ref.shape[-1]
            fm = torch.zeros(full, dtype=ref.dtype, device=ref.device)
            fv = torch.ones(full, dtype=ref.dtype, device=ref.device)
            self._scatter(fm, g, mean)
            self._scatter(fv, g, var)
            self._post[a.key] = (fm, fv)
            return
        m, v, _ = self._full_stats(a, for_update=True)
        self._scatter(m, g, mean)
        self._scatter(v, g, var)

    @staticmethod
    def _scatter(dst, g: BNGeo, src):
        with torch.no_grad():
            i = g.index(dst.device)
            if i is None:
                dst[:g.c].copy_(src)
            else:
                dst.index_copy_(0, i, src.to(dst.device))

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        # The post-statistics are a plain dict: move/cast them with the module (.to(device), .half(), ...).
        self._post = {k: (fn(m), fn(v)) for k, (m, v) in self._post.items()}
        return out

    def clear_statistics(self):
        """Drop every calibrated width ("us" mode; other modes keep their statistics in their buffers)."""
        self._post.clear()
        self._eval_cache = {}

    def __getstate__(self):  # copies and pickles drop the view caches
        d = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        d["_eval_cache"] = {}
        d["_geo_cache"] = {}
        return d

    # ---- export -------------------------------------------------------------------------------------------
    def plain_state(self, g: BNGeo, a):
        w, b, mean, var = self.bn_params(a, g)
        clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return clone(w), clone(b), clone(mean), clone(var)

    #: the class a plain export of this layer gets
    plain_class = nn.BatchNorm2d

    def to_plain(self, g: BNGeo, a) -> nn.Module:
        w, b, mean, var = self.plain_state(g, a)
        p = self.plain_class(g.c, self.eps, self.momentum, self.affine, self.track_running_stats,
                             device=self._dev(), dtype=self._dtype())
        load_bn(p, w, b, mean, var)
        return p

    def _dev(self):
        t = self.weight if self.affine else self.running_mean
        return t.device if t is not None else None

    def _dtype(self):
        t = self.weight if self.affine else self.running_mean
        return t.dtype if t is not None else None

    # ---- state dict: per-width statistics as tensors + loading stock checkpoints --------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.bn_mode == "us" and self.track_running_stats:
            keys = sorted(self._post)
            ref = self.running_mean
            enc = [k.encode() for k in keys]
            width = max([len(e) for e in enc] + [1])
            kt = torch.zeros(len(keys), width, dtype=torch.uint8)
            for i, e in enumerate(enc):
                kt[i, :len(e)] = torch.tensor(list(e), dtype=torch.uint8)
            c = ref.shape[-1]
            means = [self._post[k][0].to(ref.device) for k in keys]
            varis = [self._post[k][1].to(ref.device) for k in keys]
            destination[prefix + "post_keys"] = kt
            destination[prefix + "post_mean"] = torch.stack(means) if means else ref.new_zeros(0, c)
            destination[prefix + "post_var"] = torch.stack(varis) if varis else ref.new_zeros(0, c)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A stock BN checkpoint (1-D weights/statistics) loads into S-BN by broadcasting to every switch.
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            key = prefix + name
            own = self._parameters.get(name, self._buffers.get(name))
            if key in state_dict and own is not None and own.dim() == state_dict[key].dim() + 1:
                state_dict[key] = state_dict[key].expand_as(own)
        legacy = state_dict.pop(prefix + "_extra_state", None)
        pk, pm, pv = (state_dict.pop(prefix + k, None) for k in ("post_keys", "post_mean", "post_var"))
        before = set(missing_keys)
        self._eval_cache = {}  # load_state_dict(assign=True) swaps the tensors
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        optional = {prefix + k for k in ("min_mean", "min_var", "min_tracked")}
        missing_keys[:] = [k for k in missing_keys if k in before or k not in optional]
        ref = self.running_mean
        if pk is not None and pm is not None and pv is not None and ref is not None:
            if pm.shape[-1] != ref.shape[-1] or pv.shape != pm.shape or pk.shape[0] != pm.shape[0]:
                error_msgs.append(f"size mismatch for {prefix}post_mean: checkpoint {tuple(pm.shape)}, layer has "
                                  f"{ref.shape[-1]} channels")
                return
            keys = [bytes(row.tolist()).rstrip(b"\0").decode() for row in pk]
            self._post = {k: (pm[i].to(ref), pv[i].to(ref)) for i, k in enumerate(keys)}
        elif isinstance(legacy, dict) and ref is not None:  # checkpoints written before post_* buffers existed
            post = {}
            for k, (m, v) in legacy.get("post", {}).items():
                fm = torch.zeros_like(ref)
                fv = torch.ones_like(ref)
                fm[:m.shape[0]] = m.to(ref)
                fv[:v.shape[0]] = v.to(ref)
                post[k] = (fm, fv)
            self._post = post


@register(nn.SyncBatchNorm)
class SlimSyncBatchNorm(SlimBatchNorm2d):
    """Width-switchable ``nn.SyncBatchNorm`` (mmdet's ``SyncBN``): batch statistics are synchronised across the
    process group in training mode under ``torch.distributed`` (CUDA), as ``nn.SyncBatchNorm`` does; otherwise it
    behaves like :class:`SlimBatchNorm2d`. Exports as ``nn.SyncBatchNorm``."""

    plain_class = nn.SyncBatchNorm

    def _norm_train(self, x, mean, var, w, b, momentum):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and x.device.type != "cpu":
            from torch.nn.modules._functions import SyncBatchNorm as _SyncBN

            group = self.process_group or dist.group.WORLD
            world = dist.get_world_size(group)
            if world > 1:
                return _SyncBN.apply(x, w, b, mean, var, self.eps, momentum, group, world)
        return F.batch_norm(x, mean, var, w, b, True, momentum, self.eps)

    def to_plain(self, g: BNGeo, a) -> nn.Module:
        w, b, mean, var = self.plain_state(g, a)
        p = nn.SyncBatchNorm(g.c, self.eps, self.momentum, self.affine, self.track_running_stats,
                             process_group=self.process_group, device=self._dev(), dtype=self._dtype())
        load_bn(p, w, b, mean, var)
        return p


class SlimPerChannel(EvalFast, CarriesWidth, nn.Module):
    """Base for per-channel layers that only select their parameters (PReLU, frozen BN, LayerNorm, GroupNorm,
    RMSNorm): the output has the input's channels. ``channel_dim`` is the dim that holds them (1 for
    ``(N, C, ...)``, -1 for tokens ``(N, L, C)`` and channels-last maps).

    A norm whose width-dependent values are its own ``weight`` / ``bias`` gets them through :meth:`params_at`
    (without autograd: the one-entry fast path of :class:`slim_plugins.nn.layers.EvalFast`)."""

    _slim_slot: int = -1
    channel_dim: int = 1

    @classmethod
    def from_module(cls, m, name, state, fixed_out=False):
        new = cls.__new__(cls)
        _share(new, m)
        new._slim_state, new.slim_name, new._slim_slot = state, name, -1
        new._plain_cls = type(m)
        return new

    @classmethod
    def analysis_role(cls, m) -> dict:
        """How the channel analysis treats a module of the registered type (before conversion)."""
        return {"role": "norm", "dim": cls.channel_dim}

    def channel_role(self) -> dict:
        return type(self).analysis_role(self)

    def active_geometry(self, x) -> BNGeo:
        a = self._slim_state.active(self._dp_width)
        c = x.shape[self.channel_dim]
        geos = a.geo
        if geos is not None and self._slim_slot >= 0:  # (geometry() inlined: one call per layer call at batch 1)
            g = geos[self._slim_slot]
            if g is not None and g.c == c:
                return g
        return self.geometry(a, c)

    def __getstate__(self):  # copies and pickles start without the selections cached from these parameters
        d = dict(super().__getstate__())
        d.pop("_pick_cache", None)
        return d

    def _eval_values(self, a, c: int) -> tuple:
        geo = self.geometry(a, c)
        return (geo, *self.picked(geo, "weight", "bias"))

    def params_at(self, x) -> tuple:
        """``(geometry, weight, bias)`` of a call on ``x`` (channels on ``channel_dim``); ``bias`` is ``None`` for a
        norm without one."""
        if torch.is_grad_enabled():
            return self._eval_values(self._slim_state.active(self._dp_width), x.shape[self.channel_dim])
        return self._eval_fast(x.shape[self.channel_dim])

    def picked(self, g: BNGeo, *names):
        """The parameters ``names`` at the active channels ``g``. Without autograd the selections are cached per
        geometry while the parameters are unchanged (``stamps``; DESIGN rule 7: building the slices costs more
        than a batch-1 LayerNorm)."""
        d = self.__dict__
        if "parametrizations" in self._modules or any(n in d for n in names):
            # computed at every read (torch.nn.utils.parametrize), or held as plain attributes (a DataParallel
            # replica, torch.nn.utils.prune): read as the module's own class reads them, not cached
            return [g.pick(getattr(self, n, None)) for n in names]
        ps = self._parameters
        srcs = [ps.get(n) for n in names]
        if g.idx is None:
            for t in srcs:
                if t is not None and t.shape[-1] != g.c:
                    break
            else:
                return srcs  # the whole parameters: nothing to select
        if torch.is_grad_enabled():
            return [g.pick(t) for t in srcs]
        return cached(self, "_pick_cache", (g, names), srcs,
                      lambda: [None if t is None else g.pick(t).contiguous() for t in srcs])

    def plain_copy(self, tensors: dict, **attrs) -> nn.Module:
        """The module's own class holding ``tensors`` and ``attrs`` (:func:`slim_plugins.nn.layers.plain_copy`)."""
        return plain_copy(self, tensors, **attrs)

    def geometry(self, a, c):
        geos = a.geo
        if geos is not None and self._slim_slot >= 0:
            g = geos[self._slim_slot]
            if g is not None and g.c == c:
                return g
        return BNGeo(c)

    def geometry_from_plan(self, ls, full_in):
        s = ls.sel_in
        return BNGeo(s.n, None if s.prefix else s.idx)


class SlimComposite(SlimPerChannel):
    """Base of the counterparts whose forward selects from their own child layers (an attention's qkv / proj,
    FocalNet's modulation convs): a module configuration the counterpart does not cover is traced into instead
    (:meth:`accepts`), and widths above 1.0 are refused (widening does not grow the children)."""

    @classmethod
    def accepts(cls, m) -> bool:
        """Whether this counterpart covers module ``m`` (its :meth:`analysis_role` raises no
        ``UnsupportedModuleError``); ``convert`` traces into one it does not (its own forward then runs at the
        active channels, :mod:`slim_plugins.graph`)."""
        from ..errors import UnsupportedModuleError

        try:
            cls.analysis_role(m)
        except UnsupportedModuleError:
            return False
        return True


def _copy(v):
    return [t.detach().clone() for t in v] if type(v) is list else None if v is None else v.detach().clone()


def _contiguous(v):
    return [t.contiguous() for t in v] if type(v) is list else None if v is None else v.contiguous()


class SelectsFromChildren:
    """Mixin of the :class:`SlimComposite` counterparts that select their child layers' weights at the active
    channels themselves (FocalNet's modulation, VOLO's outlook attention, Sequencer's LSTM2d): a subclass gives
    ``_children()`` and ``_select(g)`` (a tuple of tensors / ``None`` / lists of tensors); without autograd the
    selection is reused per width while every parameter of the children is the same, unchanged object
    (``stamps``, DESIGN rule 7)."""

    def _children(self) -> list:
        raise NotImplementedError

    def _srcs(self):
        mods = self._children()
        if any("parametrizations" in m._modules or m.__dict__.get("_is_replica") or "weight" in m.__dict__
               or "bias" in m.__dict__ for m in mods):
            # computed at every read, or held as plain attributes (a DataParallel replica): not cached
            return None
        return tuple(t for m in mods for t in m._parameters.values())

    def selected(self, x) -> tuple:
        """``(geometry, selected weights)`` of a call on ``x``."""
        g = self.active_geometry(x)
        srcs = None if torch.is_grad_enabled() else self._srcs()
        if srcs is None:
            return g, self._select(g)
        return g, cached(self, "_slim_sel_cache", (g,), srcs, lambda: tuple(_contiguous(v) for v in self._select(g)),
                         size=8)

    def selected_copy(self, g: BNGeo) -> tuple:
        """Detached copies of ``_select(g)`` (for export)."""
        with torch.no_grad():
            return tuple(_copy(v) for v in self._select(g))

    def __getstate__(self):  # copies drop the weight cache
        d = dict(super().__getstate__())
        d.pop("_slim_sel_cache", None)
        return d


@register(nn.PReLU)
class SlimPReLU(SlimPerChannel, nn.PReLU):
    """Per-channel ``nn.PReLU(num_parameters=C)``: the slopes of the active channels. (``num_parameters=1`` is
    width-free and left unconverted.)"""

    def forward(self, x):
        g = self.geometry(self._slim_state.active(self._dp_width), x.shape[1])
        return F.prelu(x, g.pick(self.weight))

    def to_plain(self, g: BNGeo, a) -> nn.Module:
        w = g.pick(self.weight).detach().clone()
        p = nn.PReLU(g.c, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            p.weight.copy_(w)
        return p


@register(nn.BatchNorm1d)
class SlimBatchNorm1d(SlimBatchNorm2d):
    """Width-switchable ``nn.BatchNorm1d``: input ``(N, C_active)`` or ``(N, C_active, L)``, every BN mode of
    :class:`SlimBatchNorm2d` (switchable, US post-statistics, naive, frozen). Exports as ``nn.BatchNorm1d``."""

    plain_class = nn.BatchNorm1d


@register(nn.BatchNorm3d)
class SlimBatchNorm3d(SlimBatchNorm2d):
    """Width-switchable ``nn.BatchNorm3d``: input and output ``(N, C_active, D, H, W)``, every BN mode of
    :class:`SlimBatchNorm2d` (switchable, US post-statistics, naive, frozen). Exports as ``nn.BatchNorm3d``."""

    plain_class = nn.BatchNorm3d


def _norm_dims(m, name) -> int:
    shape = tuple(m.normalized_shape) if hasattr(m, "normalized_shape") else ()
    if len(shape) != 1:
        from ..errors import UnsupportedModuleError

        raise UnsupportedModuleError(f"{type(m).__name__} normalizes over {shape}: only a norm over the channel dim "
                                     "(normalized_shape of one int) can be slimmed")
    return shape[0]


class SlimLayerNorm(SlimPerChannel, nn.LayerNorm):
    """Width-switchable ``nn.LayerNorm`` over the channel dim, channels last: tokens ``(N, L, C_active)`` or a
    channels-last map ``(N, H, W, C_active)``. At a width it normalises over the active channels with their
    ``gamma``/``beta``, so it equals ``nn.LayerNorm(C_active)`` holding those entries. No running statistics: no
    post-statistics needed (US-Nets Sec. 3.2 concerns BN only). Exports as the module's own class."""

    channel_dim = -1

    @classmethod
    def analysis_role(cls, m) -> dict:
        _norm_dims(m, cls.__name__)
        return {"role": "norm", "dim": cls.channel_dim}

    def forward(self, x):
        g, w, b = self.params_at(x)
        return F.layer_norm(x, (g.c,), w, b, self.eps)

    def to_plain(self, g: BNGeo, a=None) -> nn.Module:
        return self.plain_copy({"weight": g.pick(self.weight), "bias": g.pick(self.bias)}, normalized_shape=(g.c,))


class SlimLayerNorm2d(SlimLayerNorm):
    """LayerNorm over the channels of ``(N, C_active, H, W)`` (timm's ``LayerNorm2d``: permute to channels-last,
    ``layer_norm``, permute back). Exports as the module's own class."""

    channel_dim = 1

    def forward(self, x):
        g, w, b = self.params_at(x)
        return F.layer_norm(x.permute(0, 2, 3, 1), (g.c,), w, b, self.eps).permute(0, 3, 1, 2)


register(nn.LayerNorm)(SlimLayerNorm)


@register(nn.GroupNorm)
class SlimGroupNorm(SlimPerChannel, nn.GroupNorm):
    """Width-switchable ``nn.GroupNorm``: input ``(N, C_active, ...)``, the group count kept, every group slimmed
    alike (the channel plan keeps ``C_active / G`` channels of each full group), so it equals
    ``nn.GroupNorm(G, C_active)``. ``num_groups == 1`` (timm's ``GroupNorm1``) normalises over all active
    channels. Exports as the module's own class."""

    @classmethod
    def analysis_role(cls, m) -> dict:
        if m.num_groups == 1:
            return {"role": "norm", "dim": 1}
        return {"role": "gnorm", "groups": m.num_groups, "dim": 1}

    def forward(self, x):
        _, w, b = self.params_at(x)
        return F.group_norm(x, self.num_groups, w, b, self.eps)

    def to_plain(self, g: BNGeo, a=None) -> nn.Module:
        return self.plain_copy({"weight": g.pick(self.weight), "bias": g.pick(self.bias)}, num_channels=g.c)


class SlimRMSNorm(SlimPerChannel, nn.Module):
    """Width-switchable RMSNorm over the channel dim (``nn.RMSNorm``, timm's ``RmsNorm`` channels last,
    ``RmsNorm2d`` on ``(N, C, H, W)``): the root mean square of the active channels scales them. Exports as the
    module's own class."""

    channel_dim = -1

    @classmethod
    def analysis_role(cls, m) -> dict:
        _norm_dims(m, cls.__name__)
        return {"role": "norm", "dim": cls.channel_dim}

    def forward(self, x):
        g, w, _ = self.params_at(x)  # no bias: picked as None
        eps = self.eps
        if self.channel_dim == 1:
            return F.rms_norm(x.permute(0, 2, 3, 1), (g.c,), w, eps).permute(0, 3, 1, 2)
        return F.rms_norm(x, (g.c,), w, eps)

    def to_plain(self, g: BNGeo, a=None) -> nn.Module:
        return self.plain_copy({"weight": g.pick(self.weight)}, normalized_shape=(g.c,))


class SlimRMSNorm2d(SlimRMSNorm):
    channel_dim = 1


register(nn.RMSNorm)(SlimRMSNorm)

_CACHED = ("weight", "bias", "running_mean", "running_var", "min_mean", "min_var")


def load_bn(p: nn.Module, w, b, mean, var):
    with torch.no_grad():
        if w is not None:
            p.weight.copy_(w)
            p.bias.copy_(b)
        if mean is not None and getattr(p, "running_mean", None) is not None:
            p.running_mean.copy_(mean)
            p.running_var.copy_(var)


def _batch_stats(x: torch.Tensor):
    """Per-channel batch ``[mean, unbiased var]`` (float64, shape ``(2, C)``) of ``(N, C, ...)`` input and the
    ``(2, C)`` mean / biased variance to normalise with (input dtype), or ``None`` when float32 sums of squares
    would be too inexact for it.

    For calibration on CPU, where the statistics pass of the training-mode BN kernel (scalar double loops) costs
    several times a whole eval-mode BN: two vectorised reductions over each sample's feature map (sum, sum of
    squares; as matrix products for maps of <= 16 pixels, where reductions over a short last dim are slow),
    added up across samples in float64. The float32 sums of squares lose about
    ``4e-8 * sum(x^2) / sum((x - mean)^2)`` of the variance; above ``_MAX_COND`` that ratio the caller uses the
    exact kernel instead.
    """
    n, c = x.shape[0], x.shape[1]
    rows = x.reshape(n, c, -1)
    hw = rows.shape[2]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if hw <= 16 and dt == torch.float32:
        ones = rows.new_ones(hw, 1)
        sums = torch.stack((torch.matmul(rows, ones), torch.matmul(rows.square(), ones)))[..., 0]
    else:
        sums = torch.stack((rows.sum(2, dtype=dt), torch.linalg.vector_norm(rows, dim=2, dtype=dt).square_()))
    s1, s2 = sums.sum(1, dtype=torch.float64)  # (C,) each
    total = n * hw
    mean = s1 / total
    centred = torch.addcmul(s2, s1, mean, value=-1)
    if dt == torch.float32 and bool((s2 > centred * _MAX_COND).any()):  # also catches centred < 0
        return None
    var_b = centred / total
    mv = torch.stack((mean, var_b * (total / max(total - 1, 1))))  # (2, C) float64: mean, unbiased var
    return mv, torch.stack((mean, var_b)).to(x.dtype)


# Largest sum(x^2) / sum((x - mean)^2) of a channel for float32 sums (variance error <= ~3e-6 relative).
_MAX_COND = 64.0

__all__ = ["SlimBatchNorm2d", "SlimBatchNorm1d", "SlimBatchNorm3d", "SlimSyncBatchNorm", "SlimPReLU", "SlimPerChannel", "SlimComposite", "SelectsFromChildren", "SlimLayerNorm",
           "SlimLayerNorm2d", "SlimGroupNorm", "SlimRMSNorm", "SlimRMSNorm2d", "BNGeo", "load_bn", "Geo"]
