"""BN post-statistics (US-Nets, Section 3.2, Eq. 8): statistics of every width computed after training."""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from .context import _calibration, find_state, width as width_ctx
from .errors import EmptyLoaderError
from .nn.norm import SlimBatchNorm2d


class _Acc:
    """Sample-weighted sums of per-batch means and unbiased variances of one BN layer."""

    __slots__ = ("n", "mean", "var", "momentum")

    def __init__(self):
        self.n, self.mean, self.var = 0, None, None

    def add(self, n, m, v):
        if self.mean is None:
            self.mean, self.var = m.double() * n, v.double() * n
        else:
            self.mean += m.double() * n
            self.var += v.double() * n
        self.n += n

    def result(self):
        return (self.mean / self.n).float(), (self.var / self.n).float()


def _default_forward(model, batch):
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(x)


def _batch_size(batch) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, dict):
        x = next(iter(x.values()))
    return len(x)


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, batches: Iterable, widths: Sequence | None = None,
                 num_samples: int | None = 2000, forward: Callable | None = None,
                 method: str = "exact", momentum: float = 0.1) -> dict:
    """Compute BN statistics of each width after training (post-statistics).

    For every width, runs the model in eval mode (dropout off) with BN layers normalising by batch statistics and
    accumulating them; ``method="exact"`` stores the exact (sample-weighted) average of the per-batch means and
    unbiased variances (US-Nets Eq. 8, ``m = (t-1)/t``), ``method="moving"`` the momentum average of Eq. 5.
    Under ``torch.distributed`` the sums are all-reduced so every rank stores identical statistics.

    Args:
        model: a converted model (DDP wrappers are looked through).
        batches: an iterable of input tensors ``(N, C, H, W)`` or ``(inputs, targets)`` tuples, or anything
            ``forward(model, batch)`` accepts. Re-iterated once per width; a one-shot iterator is cached.
        widths: widths to calibrate (default: every switch for S-Nets, ``[min, max]`` for US-Nets). Dict widths
            (nonuniform) are allowed.
        num_samples: samples per width in total across ranks (the paper's 2k subset); ``None`` = all.
        forward: ``forward(model, batch)`` for frameworks whose batches are not plain tensors.

    Returns:
        ``{width key: number of samples used}``.

    Raises:
        EmptyLoaderError: ``batches`` yields nothing. WidthError: a width not allowed by the spec.
    The model's statistics are only written after every width succeeded.
    """
    state = find_state(model)
    spec = state.spec
    widths = list(widths) if widths is not None else (list(spec.widths) if spec.is_switches else [spec.min, spec.max])
    actives = [state.resolve(w) for w in widths]  # validates every width before any work
    if method not in ("exact", "moving"):
        raise ValueError(f"method must be 'exact' or 'moving', got {method!r}")
    forward = forward or _default_forward
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d) and m.bn_mode != "frozen"]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    local_target = None if num_samples is None else -(-int(num_samples) // world)
    if iter(batches) is batches:
        batches = list(itertools.islice(batches, 10 ** 9)) if local_target is None else _take(batches, local_target)
    was_training = model.training
    results: dict = {}
    pending = []
    try:
        model.eval()
        for w, a in zip(widths, actives):
            accs = {bn: _MovingAcc(momentum) if method == "moving" else _Acc() for bn in bns}
            token = _calibration.set(accs)
            seen = 0
            try:
                with width_ctx(w):
                    for batch in batches:
                        n = _batch_size(batch)
                        if local_target is not None and seen + n > local_target:
                            batch = _truncate(batch, local_target - seen)
                            n = local_target - seen
                        if n <= 0:
                            break
                        forward(model, batch)
                        seen += n
                        if local_target is not None and seen >= local_target:
                            break
            finally:
                _calibration.reset(token)
            total = _all_reduce_accs(accs, seen, world)
            if total == 0:
                raise EmptyLoaderError(f"calibration data yielded no samples for width {a.key}; give a "
                                       "non-empty loader of training images")
            pending.append((a, accs))
            results[a.key] = total
    finally:
        model.train(was_training)
    for a, accs in pending:
        for bn, acc in accs.items():
            if acc.mean is not None:
                bn.store_statistics(a, *acc.result())
    return results


def _take(it, n):
    out, seen = [], 0
    for b in it:
        out.append(b)
        seen += _batch_size(b)
        if seen >= n:
            break
    return out


def _truncate(batch, n):
    if isinstance(batch, (tuple, list)):
        return type(batch)(_truncate(b, n) if torch.is_tensor(b) else b for b in batch)
    return batch[:n] if torch.is_tensor(batch) else batch


class _MovingAcc(_Acc):
    """Momentum moving average (US-Nets Eq. 5), the baseline of Table 3."""

    def __init__(self, momentum):
        super().__init__()
        self.momentum = momentum

    def add(self, n, m, v):
        if self.mean is None:
            self.mean, self.var = torch.zeros_like(m, dtype=torch.float64), torch.ones_like(v, dtype=torch.float64)
        self.mean.mul_(1 - self.momentum).add_(m.double() * self.momentum)
        self.var.mul_(1 - self.momentum).add_(v.double() * self.momentum)
        self.n += n

    def result(self):
        return self.mean.float(), self.var.float()


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
