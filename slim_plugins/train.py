"""One multi-width training step for any framework (DESIGN rule 5).

S-Nets (Algorithm 1 of Slimmable Networks): every switch, losses summed by accumulating gradients.
US-Nets (Algorithm 1 of Universally Slimmable Networks): the sandwich rule (max, min, n-2 random widths) and
inplace distillation (the max width's detached output is the target of the others, computed in train mode).
The caller's optimizer steps once afterwards; each width's graph is freed by its own backward, so peak memory is
that of one width.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from .context import find_state, width as width_ctx
from .errors import WidthError
from .width import WidthSpec, as_spec


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy against the teacher's soft probabilities (US-Nets Section 4.2), ``(N, K)`` logits -> scalar.

    Scaled by ``T**2`` so gradients keep their magnitude across temperatures (Hinton et al.).
    """
    t = temperature
    p = F.softmax(teacher / t, dim=-1)
    return -(p * F.log_softmax(student / t, dim=-1)).sum(-1).mean() * (t * t)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(teacher || student)`` on ``(N, K)`` logits with temperature, ``batchmean``, times ``T**2``."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                    log_target=True) * (t * t)


DISTILL_LOSSES: dict[str, Callable] = {
    "soft_ce": soft_cross_entropy,
    "kl": kl_divergence,
    "l1": lambda s, t, temperature=1.0: F.l1_loss(s, t),
    "l2": lambda s, t, temperature=1.0: F.mse_loss(s, t),
}


@dataclasses.dataclass
class StepResult:
    """What one :class:`MultiWidthStep` call did.

    Attributes:
        widths: the widths trained, widest first.
        losses: ``{width: loss value (float)}``, the distillation loss for distilled widths.
        loss: sum of ``losses`` (the S-Net objective, Slimmable Networks Section 3.3).
        outputs: ``{width: detached output}`` when ``keep_outputs`` was set, else empty.
    """

    widths: list
    losses: dict
    loss: float
    outputs: dict = dataclasses.field(default_factory=dict)


def _sum_losses(loss) -> torch.Tensor:
    # mmengine/mmdet style: a dict of named losses; keys containing "loss" are summed.
    if isinstance(loss, Mapping):
        vals = [v for k, v in loss.items() if "loss" in k]
        flat = []
        for v in vals:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return sum(v.sum() if v.dim() else v for v in flat)
    return loss


def _detach(out):
    if torch.is_tensor(out):
        return out.detach()
    if isinstance(out, Mapping):
        return type(out)({k: _detach(v) for k, v in out.items()})
    if isinstance(out, (list, tuple)):
        return type(out)(_detach(v) for v in out)
    return out


class MultiWidthStep:
    """Run forward/backward at several widths and accumulate gradients; the caller steps the optimizer.

    Args:
        model: the converted model (may be wrapped in DDP; gradients are synchronised on the last width only).
        spec: its :class:`WidthSpec` (default: the model's own).
        num_widths: widths per step for a range spec (n of the sandwich rule; the paper uses 4).
        rule: ``"all"`` (default for switches), ``"sandwich"`` (default for a range), ``"random"``,
            ``"min_random"``, ``"max_random"`` (US-Nets Table 2).
        distill: ``None`` (ground truth for every width), ``"kl"``, ``"soft_ce"``, ``"l1"``, ``"l2"``, or a callable
            ``(student_output, teacher_output) -> loss``: inplace distillation, the max width's detached output as
            the target of the other widths (US-Nets Section 4.2). Needs a rule that trains the max width first.
        temperature: softmax temperature of the classification distillation losses.
        seed: width sampling is seeded by ``(seed, iteration)``: every DDP rank draws the same widths.
        backward: ``backward(loss)``; default ``loss.backward()`` (pass a GradScaler's scale-and-backward for AMP).

    Raises:
        WidthError: ``spec`` differs from the model's, an unknown rule, or distillation without the max width.
    """

    def __init__(self, model, spec: WidthSpec | None = None, num_widths: int = 4, rule: str | None = None,
                 distill: str | Callable | None = None, temperature: float = 1.0, seed: int = 0,
                 backward: Callable | None = None):
        state = find_state(model)
        spec = as_spec(spec) if spec is not None else state.spec
        if spec != state.spec:
            raise WidthError(f"spec {spec} differs from the model's {state.spec}")
        rule = rule or ("all" if spec.is_switches else "sandwich")
        spec.sample(0, num_widths, rule, seed)  # validates rule / num_widths
        if distill is not None and rule not in ("all", "sandwich", "max_random"):
            raise WidthError(f"inplace distillation needs the max width in every step; rule {rule!r} does not "
                             "train it (use 'sandwich', 'max_random' or 'all')")
        if isinstance(distill, str):
            if distill not in DISTILL_LOSSES:
                raise WidthError(f"unknown distill loss {distill!r}; allowed: {sorted(DISTILL_LOSSES)} or a callable")
        self.model, self.spec, self.num_widths, self.rule = model, spec, num_widths, rule
        self.distill, self.temperature, self.seed = distill, temperature, seed
        self.backward = backward or (lambda loss: loss.backward())
        self.iteration = 0

    def widths(self, iteration: int) -> list:
        """The widths trained at ``iteration`` (widest first)."""
        return self.spec.sample(iteration, self.num_widths, self.rule, self.seed)

    def distill_loss(self, student, teacher) -> torch.Tensor:
        if callable(self.distill):
            return self.distill(student, teacher)
        return DISTILL_LOSSES[self.distill](student, teacher, temperature=self.temperature)

    def __call__(self, forward: Callable[[], Any], loss_fn: Callable[[Any], Any], iteration: int | None = None,
                 keep_outputs: bool = False) -> StepResult:
        """One step: for each width, ``out = forward()``, ``loss = loss_fn(out)`` (or the distillation loss
        against the max width's detached output), ``backward(loss)``.

        ``forward`` runs inside ``slim.width(w)``; ``loss_fn`` may return a tensor or a dict of losses (keys with
        "loss" are summed, as mmengine does). Gradients accumulate in ``.grad``; call ``optimizer.step()`` after.
        """
        it = self.iteration if iteration is None else iteration
        self.iteration = it + 1
        widths = self.widths(it)
        teacher = None
        losses, outputs = {}, {}
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync, width_ctx(w):
                out = forward()
                if self.distill is not None and teacher is not None:
                    loss = self.distill_loss(out, teacher)
                else:
                    loss = _sum_losses(loss_fn(out))
                self.backward(loss)
            if self.distill is not None and teacher is None and w == self.spec.max:
                teacher = _detach(out)  # stop-gradient target, computed in train mode (Section 4.2)
            if keep_outputs:
                outputs[w] = _detach(out)
            losses[w] = float(loss.detach())
            del out, loss  # free this width's graph before the next forward
        return StepResult(widths, losses, sum(losses.values()), outputs)
