"""BN post-statistics (US-Nets, Section 3.2, Eq. 8): statistics of every width computed after training."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from .context import _calibration, find_state, width as width_ctx, width_key
from .errors import EmptyLoaderError, InvalidArgumentError, WidthError
from .nn.norm import SlimBatchNorm2d


class _Acc:
    """Sample-weighted sums of per-batch means and unbiased variances of one BN layer."""

    __slots__ = ("n", "mean", "var", "momentum", "_mv")

    def __init__(self):
        self.n, self.mean, self.var, self._mv = 0, None, None, None

    def add(self, n, m, v):
        self.add_stacked(n, torch.stack((m.double(), v.double())))

    def add_stacked(self, n, mv):
        """Add one batch's ``(2, C)`` float64 ``[mean, unbiased var]`` weighted by its ``n`` samples."""
        if self._mv is None:
            self._mv = mv * n
            self.mean, self.var = self._mv[0], self._mv[1]
        else:
            self._mv.add_(mv, alpha=n)
        self.n += n

    def result(self):
        return self.mean / self.n, self.var / self.n


def _default_forward(model, batch):
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(x)


def _batch_size(batch) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, Mapping):  # mmengine style: {"inputs": ..., "data_samples": [...]}
        x = x.get("inputs", next(iter(x.values())))
    return len(x)


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, batches: Iterable, widths: Sequence | None = None,
                 num_samples: int | None = 2000, forward: Callable | None = None,
                 method: str = "exact", momentum: float = 0.1) -> dict:
    """Compute BN statistics of each width after training (post-statistics).

    One pass over ``batches`` feeds every width: for each batch the model runs once per width in eval mode
    (dropout off) with BN layers normalising by batch statistics and accumulating them; ``method="exact"`` stores
    the exact (sample-weighted) average of the per-batch means and unbiased variances (US-Nets Eq. 8,
    ``m = (t-1)/t``), ``method="moving"`` the momentum average of Eq. 5. Under ``torch.distributed`` the sums are
    all-reduced so every rank stores identical statistics. Accumulation is in float64; statistics are stored in
    the BN layer's dtype; it runs under ``torch.autocast`` too.

    Args:
        model: a converted model (DDP wrappers are looked through).
        batches: an iterable (a DataLoader, a list, a generator) of input tensors ``(N, C, H, W)``,
            ``(inputs, targets)`` tuples or mmengine-style dicts, or anything ``forward(model, batch)`` accepts.
            Read once, however many widths.
        widths: widths to calibrate (default: every switch for S-Nets, ``[min, max]`` for US-Nets). Dict widths
            (nonuniform) are allowed.
        num_samples: samples per width in total across ranks (the paper's 2k subset); ``None`` = all. The last
            batch is truncated to it (tensors, tuples, and lists/tensors inside dicts).
        forward: ``forward(model, batch)`` for frameworks whose batches are not plain tensors.

    Returns:
        ``{width key: number of samples used}`` (0 for every width of a model without BN layers, whose norms
        keep no running statistics: nothing runs).

    Raises:
        EmptyLoaderError: ``batches`` yields nothing. WidthError: a width not allowed by the spec.
        InvalidArgumentError: ``num_samples`` not a positive integer or ``None``; unknown ``method``; empty
            ``widths``.
    The model's statistics are only written after every width succeeded.
    """
    state = find_state(model, adopt=True)
    spec = state.spec
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples <= 0):
        raise InvalidArgumentError(f"num_samples must be a positive integer or None (all), got {num_samples!r}")
    if method not in ("exact", "moving"):
        raise InvalidArgumentError(f"method must be 'exact' or 'moving', got {method!r}")
    if isinstance(widths, (str, bytes)):
        raise WidthError(f"widths must be a list of width multipliers such as [0.25, 0.5], got {widths!r}")
    widths = list(widths) if widths is not None else (list(spec.widths) if spec.is_switches else [spec.min, spec.max])
    if not widths:
        raise InvalidArgumentError("widths is empty: name the widths to calibrate (None: every switch / min and max)")
    actives = [state.resolve(w) for w in widths]  # validates every width before any work
    forward = forward or _default_forward
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d) and not m.frozen]
    if not bns:  # LayerNorm / GroupNorm / RMSNorm only: no running statistics, every width is ready as it is
        return {a.key: 0 for a in actives}
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    local_target = None if num_samples is None else -(-int(num_samples) // world)
    was_training = model.training
    accs = [{bn: _MovingAcc(momentum) if method == "moving" else _Acc() for bn in bns} for _ in widths]
    seen = 0
    try:
        model.eval()
        for batch in batches:
            n = _batch_size(batch)
            if local_target is not None and seen + n > local_target:
                batch = _truncate(batch, n, local_target - seen)
                n = local_target - seen
            if n <= 0:
                break
            for w, acc in zip(widths, accs):
                token = _calibration.set(acc)
                try:
                    with width_ctx(w):
                        forward(model, batch)
                finally:
                    _calibration.reset(token)
            seen += n
            if local_target is not None and seen >= local_target:
                break
    finally:
        model.train(was_training)
    results: dict = {}
    pending = []
    for a, acc in zip(actives, accs):
        total = _all_reduce_accs(acc, seen, world)
        if total == 0:
            raise EmptyLoaderError(f"calibration data yielded no samples for width {a.key}; give a "
                                   "non-empty loader of training images")
        pending.append((a, acc))
        results[a.key] = total
    for a, acc in pending:
        for bn, ac in acc.items():
            if ac.mean is not None:
                bn.store_statistics(a, *ac.result())
    return results


def _truncate(batch, n_total: int, n: int):
    """The first ``n`` samples of a batch of ``n_total``: tensors and lists of that length are cut."""
    if isinstance(batch, Mapping):
        return type(batch)({k: _truncate(v, n_total, n) for k, v in batch.items()})
    if torch.is_tensor(batch):
        return batch[:n] if batch.dim() and batch.shape[0] == n_total else batch
    if isinstance(batch, (tuple, list)):
        if len(batch) == n_total and not any(torch.is_tensor(b) and b.dim() and b.shape[0] == n_total
                                             for b in batch):
            return type(batch)(batch[:n])  # a list of per-sample items (mmengine data samples, images)
        return type(batch)(_truncate(b, n_total, n) for b in batch)
    return batch


class _MovingAcc(_Acc):
    """Momentum moving average (US-Nets Eq. 5), the baseline of Table 3."""

    def __init__(self, momentum):
        super().__init__()
        self.momentum = momentum

    def add_stacked(self, n, mv):
        self.add(n, mv[0], mv[1])

    def add(self, n, m, v):
        if self.mean is None:
            self.mean, self.var = torch.zeros_like(m, dtype=torch.float64), torch.ones_like(v, dtype=torch.float64)
        self.mean.mul_(1 - self.momentum).add_(m.double() * self.momentum)
        self.var.mul_(1 - self.momentum).add_(v.double() * self.momentum)
        self.n += n

    def result(self):
        return self.mean, self.var


def _all_reduce_accs(accs: dict, seen: int, world: int) -> int:
    if world == 1:
        return seen
    # One flat all-reduce: [count, then per layer: n, sum of mean*n, sum of var*n]. Moving averages enter with
    # weight 1, so every rank ends with the mean of the ranks' moving averages.
    parts = [torch.tensor([float(seen)], dtype=torch.float64)]
    layout = []
    for bn, acc in accs.items():
        if acc.mean is None:
            continue
        weight = 1.0 if isinstance(acc, _MovingAcc) else float(acc.n)
        parts += [torch.tensor([weight], dtype=torch.float64), acc.mean.cpu(), acc.var.cpu()]
        layout.append((bn, acc, acc.mean.numel()))
    flat = torch.cat(parts)
    dev = next((acc.mean.device for acc in accs.values() if acc.mean is not None), torch.device("cpu"))
    if dist.get_backend() == "nccl":
        flat = flat.to(dev)
    dist.all_reduce(flat)
    flat = flat.cpu()
    i = 1
    for bn, acc, c in layout:
        n = flat[i].item()
        acc.mean = flat[i + 1: i + 1 + c].to(dev)
        acc.var = flat[i + 1 + c: i + 1 + 2 * c].to(dev)
        if isinstance(acc, _MovingAcc):
            acc.mean, acc.var = acc.mean / n, acc.var / n
        else:
            acc.n = int(n)
        i += 1 + 2 * c
    return int(flat[0].item())


def _us_bns(model):
    return [m for m in model.modules() if isinstance(m, SlimBatchNorm2d) and m.bn_mode == "us"
            and m.track_running_stats and not m.frozen]


def calibrated_widths(model, widths: Sequence | None = None) -> list:
    """The widths at which every BN layer has statistics (evaluation runs there without ``calibrate_bn``).

    Args:
        widths: widths to check; default: report the stored ones.

    Returns:
        With ``widths``: the subset of ``widths`` that has statistics, in order. Without: the width keys with
        statistics (US-Nets: the max width, the min width once tracked in training, and every calibrated width;
        S-Nets and other BN modes: every switch / the whole spec, since their statistics live in their buffers).

    Raises:
        WidthError: a width not allowed by the spec.
    """
    state = find_state(model)
    bns = _us_bns(model)
    spec = state.spec
    if widths is not None:
        out = []
        for w in widths:
            a = state.resolve(w)
            if all(a.key in bn._post or a.is_max or (a.is_min and int(bn.min_tracked) > 0) for bn in bns):
                out.append(w)
        return out
    if not bns:
        return [width_key(w) for w in spec.widths]
    keys = None
    for bn in bns:
        k = set(bn._post)
        k.add(width_key(spec.max))
        if int(bn.min_tracked) > 0:
            k.add(width_key(spec.min))
        keys = k if keys is None else keys & k
    return sorted(keys, key=lambda k: (not k[0].isdigit(), float(k) if k[0].isdigit() else 0, k))


def clear_statistics(model) -> int:
    """Drop every width's BN post-statistics (US-Nets; e.g. after further training made them stale).

    Returns:
        the number of BN layers cleared. The max / min running statistics of training are kept.
    """
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    for bn in bns:
        bn.clear_statistics()
    return len(bns)


def freeze_bn(model, frozen: bool = True, layers: str | Iterable[str] = "*") -> int:
    """Freeze (or unfreeze) BN layers: a frozen layer normalises with its stored statistics (per switch / per
    width) in training mode too and never updates them (mmdet ``norm_eval``, detection fine-tuning; DESIGN
    rule 3). Orthogonal to the BN mode: an S-Net keeps its per-switch statistics.

    Args:
        layers: ``fnmatch`` pattern(s) of BN layer names (default all).

    Returns:
        the number of layers set.

    Raises:
        UnknownLayerError: a pattern matching no BN layer.
    """
    import fnmatch

    from .errors import UnknownLayerError

    pats = [layers] if isinstance(layers, str) else list(layers)
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, SlimBatchNorm2d)]
    for p in pats:
        if not any(fnmatch.fnmatchcase(n, p) for n, _ in named):
            raise UnknownLayerError(f"BN pattern {p!r} matches no slimmable BN layer; e.g. {[n for n, _ in named[:5]]}")
    count = 0
    for n, m in named:
        if any(fnmatch.fnmatchcase(n, p) for p in pats):
            m.frozen = bool(frozen)
            m._eval_cache = {}
            count += 1
    return count
