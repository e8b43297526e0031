"""One multi-width training step for any framework (DESIGN rule 5).

S-Nets (Algorithm 1 of Slimmable Networks): every switch, losses summed by accumulating gradients.
US-Nets (Algorithm 1 of Universally Slimmable Networks): the sandwich rule (max, min, n-2 random widths) and
inplace distillation (the max width's detached output is the target of the others, computed in train mode).
The caller's optimizer (or optim wrapper) steps once afterwards; each width's graph is freed by its own backward,
so peak memory is that of one width.

Two forms, one code path: ``step(forward, loss_fn)`` runs the whole step; ``for p in step.iterate(): with p: ...``
hands each width to a loop the framework owns (mmengine's ``train_step``, SB3's minibatch loop), which does its
own forward and backward.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from .context import find_state, width as width_ctx
from .errors import LossError, WidthError
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


def policy_kl(student, teacher, temperature: float = 1.0) -> torch.Tensor:
    """``KL(teacher || student)`` of two policies, averaged over the batch: torch ``Distribution`` objects (any
    pair ``torch.distributions.kl_divergence`` knows) or ``(N, A)`` action logits. A factorised distribution with
    batch shape ``(N, A)`` (SB3's diagonal Gaussian and Bernoulli) sums the KL over its action dimensions, as the
    log-probability of a joint action sums them."""
    if isinstance(student, torch.distributions.Distribution):
        kl = torch.distributions.kl_divergence(teacher, student)
        return kl.reshape(kl.shape[0], -1).sum(1).mean() if kl.dim() > 1 else kl.mean()
    return kl_divergence(student, teacher, temperature)


DISTILL_LOSSES: dict[str, Callable] = {
    "soft_ce": soft_cross_entropy,
    "kl": kl_divergence,
    "policy_kl": policy_kl,
    "l1": lambda s, t, temperature=1.0: F.l1_loss(s, t),
    "l2": lambda s, t, temperature=1.0: F.mse_loss(s, t),
}
DISTILL_MODES = ("replace", "add")


@dataclasses.dataclass
class WidthResult:
    """What one width of a step did.

    Attributes:
        width: the width multiplier. loss: the (detached, 0-d) loss backpropagated at this width.
        parts: ``{name: detached 0-d tensor}``: the task loss terms (per key of a loss dict) and ``"distill"``.
        distilled: this width was trained against the teacher (inplace distillation).
    """

    width: float
    loss: torch.Tensor
    parts: dict
    distilled: bool = False


@dataclasses.dataclass
class StepResult:
    """What one :class:`MultiWidthStep` step did.

    Attributes:
        widths: the widths trained, widest first (a width drawn twice appears twice).
        results: one :class:`WidthResult` per trained width, in training order.
        losses: ``{width: loss}`` (detached 0-d tensors; a width drawn twice sums its entries).
        loss: sum of the losses (the S-Net objective, Slimmable Networks Section 3.3), a detached 0-d tensor.
        outputs: ``{width: detached output}`` when ``keep_outputs`` was set, else empty.
    Losses stay tensors on the model's device: nothing synchronises with the host per width.
    """

    widths: list
    losses: dict
    loss: torch.Tensor
    outputs: dict = dataclasses.field(default_factory=dict)
    results: list = dataclasses.field(default_factory=list)

    def log_vars(self) -> dict:
        """Flat ``{name: float}`` for loggers (mmengine ``log_vars`` style): ``loss``, then per width
        ``w<width>/<term>``. Synchronises with the device once."""
        out = {"loss": float(self.loss)}
        for i, r in enumerate(self.results):
            tag = f"w{r.width:g}" + (f"#{i}" if self.widths.count(r.width) > 1 else "")
            out[f"{tag}/loss"] = float(r.loss)
            for k, v in r.parts.items():
                out[f"{tag}/{k}"] = float(v)
        return out


def reduce_loss(loss, loss_keys: Iterable[str] | Callable[[str], bool] | None = None):
    """One scalar from a task loss and its named terms (detached) for logging.

    A tensor is used as it is (a non-scalar is averaged). A dict is reduced like mmengine's ``parse_losses``:
    the terms whose key contains ``"loss"`` (or those ``loss_keys`` names / accepts), each tensor averaged and
    each list of tensors summed, are added up.

    Returns:
        ``(total, {key: detached term})``.

    Raises:
        LossError: a dict none of whose keys is a loss (BasicSR's ``l_pix``: pass ``loss_keys=["l_pix"]`` or
            ``loss_keys=lambda k: k.startswith("l_")``), or a value that is not a tensor / list of tensors.
    """
    if torch.is_tensor(loss):
        total = loss if loss.dim() == 0 else loss.mean()
        return total, {}
    if not isinstance(loss, Mapping):
        raise LossError(f"a loss must be a tensor or a dict of tensors, got {type(loss).__name__}")
    if loss_keys is None:
        pick = lambda k: "loss" in k  # noqa: E731  mmengine's rule
    elif callable(loss_keys):
        pick = loss_keys
    else:
        names = set(loss_keys)
        unknown = names - set(loss)
        if unknown:
            raise LossError(f"loss_keys {sorted(unknown)} are not in the loss dict; its keys: {list(loss)}")
        pick = names.__contains__
    terms, parts = [], {}
    for k, v in loss.items():
        if not pick(k):
            continue
        if torch.is_tensor(v):
            t = v.mean()
        elif isinstance(v, (list, tuple)) and v and all(torch.is_tensor(x) for x in v):
            t = sum(x.mean() for x in v)
        else:
            raise LossError(f"loss term {k!r} must be a tensor or a list of tensors, got {type(v).__name__}")
        terms.append(t)
        parts[k] = t.detach()
    if not terms:
        raise LossError(f"the loss dict has no loss term: keys {list(loss)}; keys containing 'loss' are summed "
                        "(mmengine), or name them with MultiWidthStep(..., loss_keys=[...]) (e.g. BasicSR's "
                        "'l_pix')")
    return sum(terms), parts


def _detach(out):
    if torch.is_tensor(out):
        return out.detach()
    if isinstance(out, torch.distributions.Distribution):
        return _detach_distribution(out)
    if isinstance(out, Mapping):
        return type(out)({k: _detach(v) for k, v in out.items()})
    if isinstance(out, (list, tuple)):
        return type(out)(_detach(v) for v in out)
    return out


def _detach_distribution(d):
    """A copy of torch distribution ``d`` built from detached parameters (a stop-gradient teacher)."""
    D = torch.distributions
    if isinstance(d, D.Independent):
        return D.Independent(_detach_distribution(d.base_dist), d.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(d, (D.Categorical, D.Bernoulli, D.Binomial, D.Multinomial, D.OneHotCategorical)):
        extra = {"total_count": d.total_count} if hasattr(d, "total_count") else {}
        if isinstance(d, D.Multinomial):
            extra = {"total_count": d.total_count}
        return type(d)(logits=d.logits.detach(), validate_args=False, **extra)
    params = {k: d.__dict__[k] for k in d.arg_constraints if k in d.__dict__}
    if not params:
        raise LossError(f"cannot detach a {type(d).__name__} teacher; pass distill_on=callable returning tensors")
    try:
        return type(d)(**{k: v.detach() if torch.is_tensor(v) else v for k, v in params.items()},
                       validate_args=False)
    except TypeError as e:
        raise LossError(f"cannot rebuild a detached {type(d).__name__} teacher ({e}); pass distill_on=callable "
                        "returning tensors") from None


class WidthPass:
    """One width of a step in the iterator form: a context manager (``slim.width(w)``, and DDP ``no_sync`` on all
    widths but the last) plus :meth:`loss`, which applies the distillation rule and records the result."""

    def __init__(self, step: "MultiWidthStep", width: float, index: int, last: bool, run: dict):
        self.step, self.width, self.index, self.last, self._run = step, width, index, last, run
        self._stack = None
        self.loss_value = None

    @property
    def is_teacher(self) -> bool:
        """This width provides the inplace-distillation target (the max width, trained first)."""
        return self.step.distill is not None and self._run["teacher"] is None and self.width == self.step.spec.max

    @property
    def distilled(self) -> bool:
        """This width is trained against the teacher (so a task loss is not needed in ``"replace"`` mode)."""
        return self.step.distill is not None and self._run["teacher"] is not None

    def __enter__(self):
        model = self.step.model
        self._stack = contextlib.ExitStack()
        if not self.last and hasattr(model, "no_sync"):
            self._stack.enter_context(model.no_sync())
        self._stack.enter_context(width_ctx(self.width))
        return self

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc)

    def loss(self, output, task=None) -> torch.Tensor:
        """The loss to backpropagate at this width.

        Args:
            output: the model output at this width (the teacher's when this is the max width).
            task: the task loss (a tensor or a loss dict), or a callable ``task(output)`` computing it. In
                ``"replace"`` distillation mode it is not needed (not called) for distilled widths.
        Returns:
            a scalar tensor with its graph.
        Raises:
            LossError: no task loss where one is needed, or a loss dict without loss terms.
        """
        st, run = self.step, self._run
        parts: dict = {}
        total = None
        distilled = self.distilled
        if not distilled or st.distill_mode == "add":
            t = task(output) if callable(task) else task
            if t is None:
                raise LossError(f"width {self.width:g} needs a task loss (pass loss(output, task))")
            total, parts = reduce_loss(t, st.loss_keys)
            if not parts:
                parts = {"task": total.detach()}
        if distilled:
            d = st.distill_loss(st.target(output), run["teacher"])
            parts["distill"] = d.detach()
            total = d if total is None else total + st.distill_weight * d
        if self.is_teacher:
            run["teacher"] = _detach(st.target(output))  # stop-gradient target, computed in train mode
        self.loss_value = total
        run["results"].append(WidthResult(self.width, total.detach(), parts, distilled))
        if run["keep_outputs"]:
            run["outputs"][self.width] = _detach(output)
        return total


class MultiWidthStep:
    """Run forward/backward at several widths and accumulate gradients; the caller steps the optimizer.

    Args:
        model: the converted model (may be wrapped in DDP; gradients are synchronised on the last width only).
        spec: its :class:`WidthSpec` (default: the model's own).
        num_widths: widths per step for a range spec (n of the sandwich rule; the paper uses 4).
        rule: ``"all"`` (default for switches), ``"sandwich"`` (default for a range), ``"random"``,
            ``"min_random"``, ``"max_random"`` (US-Nets Table 2).
        distill: ``None`` (ground truth for every width), ``"kl"``, ``"soft_ce"``, ``"l1"``, ``"l2"``,
            ``"policy_kl"`` (torch ``Distribution`` or logits), or a callable ``(student, teacher) -> loss``:
            inplace distillation, the max width's detached output as the target of the other widths (US-Nets
            Section 4.2). Needs a rule that trains the max width first.
        distill_mode: ``"replace"`` (the paper: distilled widths use only the distillation loss) or ``"add"``
            (task loss + ``distill_weight`` x distillation, e.g. RL: value loss + policy KL).
        distill_on: what of the output is distilled: ``None`` (the output), a dict key / attribute name (``"logits"``,
            ``"distribution"``), or a callable ``output -> tensor or Distribution``.
        loss_keys: which keys of a loss dict are summed (default: keys containing ``"loss"``, as mmengine).
        temperature: softmax temperature of the classification distillation losses.
        seed: width sampling is seeded by ``(seed, iteration)``: every DDP rank draws the same widths.
        backward: ``backward(loss)``; default ``loss.backward()`` (pass a GradScaler's scale-and-backward for AMP).

    Raises:
        WidthError: ``spec`` differs from the model's, an unknown rule / mode, or distillation without the max
            width.
    """

    def __init__(self, model, spec: WidthSpec | None = None, num_widths: int = 4, rule: str | None = None,
                 distill: str | Callable | None = None, temperature: float = 1.0, seed: int = 0,
                 backward: Callable | None = None, distill_mode: str = "replace", distill_weight: float = 1.0,
                 distill_on: str | Callable | None = None,
                 loss_keys: Iterable[str] | Callable[[str], bool] | None = None):
        state = find_state(model, adopt=True)
        spec = as_spec(spec) if spec is not None else state.spec
        if spec != state.spec:
            raise WidthError(f"spec {spec} differs from the model's {state.spec}")
        rule = rule or ("all" if spec.is_switches else "sandwich")
        spec.sample(0, num_widths, rule, seed)  # validates rule / num_widths
        if distill is not None and rule not in ("all", "sandwich", "max_random"):
            raise WidthError(f"inplace distillation needs the max width in every step; rule {rule!r} does not "
                             "train it (use 'sandwich', 'max_random' or 'all')")
        if isinstance(distill, str) and distill not in DISTILL_LOSSES:
            raise WidthError(f"unknown distill loss {distill!r}; allowed: {sorted(DISTILL_LOSSES)} or a callable")
        if distill_mode not in DISTILL_MODES:
            raise WidthError(f"unknown distill_mode {distill_mode!r}; allowed: {list(DISTILL_MODES)}")
        self.model, self.spec, self.num_widths, self.rule = model, spec, num_widths, rule
        self.distill, self.temperature, self.seed = distill, temperature, seed
        self.distill_mode, self.distill_weight, self.distill_on = distill_mode, float(distill_weight), distill_on
        self.loss_keys = loss_keys
        self.backward = backward or (lambda loss: loss.backward())
        self.iteration = 0
        self.last: StepResult | None = None

    # ---- schedule -----------------------------------------------------------------------------------------
    def widths(self, iteration: int) -> list:
        """The widths trained at ``iteration`` (widest first)."""
        return self.spec.sample(iteration, self.num_widths, self.rule, self.seed)

    def state_dict(self) -> dict:
        """The width schedule's state (save it with the checkpoint; the sequence resumes where it stopped)."""
        return {"iteration": self.iteration, "seed": self.seed, "rule": self.rule, "num_widths": self.num_widths}

    def load_state_dict(self, state: dict) -> None:
        """Resume the width sequence of :meth:`state_dict`.

        Raises:
            WidthError: the saved rule or width count differs from this step's (another schedule).
        """
        for k in ("rule", "num_widths"):
            if k in state and state[k] != getattr(self, k):
                raise WidthError(f"saved width schedule has {k}={state[k]!r}, this step {getattr(self, k)!r}")
        self.iteration = int(state["iteration"])
        self.seed = int(state.get("seed", self.seed))

    # ---- losses -------------------------------------------------------------------------------------------
    def target(self, output):
        """The part of an output that is distilled (``distill_on``)."""
        on = self.distill_on
        if on is None:
            return output
        if callable(on):
            return on(output)
        if isinstance(output, Mapping):
            return output[on]
        return getattr(output, on)

    def distill_loss(self, student, teacher) -> torch.Tensor:
        if callable(self.distill):
            return self.distill(student, teacher)
        return DISTILL_LOSSES[self.distill](student, teacher, temperature=self.temperature)

    # ---- the two forms ------------------------------------------------------------------------------------
    def iterate(self, iteration: int | None = None, keep_outputs: bool = False):
        """Yield one :class:`WidthPass` per width of this step, for loops the framework owns::

            for p in step.iterate():
                with p:                                   # slim.width(w), DDP no_sync but on the last width
                    out = model(x)
                    loss = p.loss(out, criterion(out, y))  # or p.loss(out, lambda o: criterion(o, y))
                    loss.backward()                        # or the framework's own backward
            optimizer.step(); result = step.last

        ``step.last`` holds the :class:`StepResult` once the loop ends.
        """
        it = self.iteration if iteration is None else iteration
        self.iteration = it + 1
        widths = self.widths(it)
        run = {"teacher": None, "results": [], "outputs": {}, "keep_outputs": keep_outputs}
        self.last = None
        for i, w in enumerate(widths):
            p = WidthPass(self, w, i, i == len(widths) - 1, run)
            yield p
            if p.loss_value is None:
                raise LossError(f"width {w:g}: call pass.loss(output, ...) inside the width block")
            p.loss_value = None  # free this width's graph before the next forward
        losses: dict = {}
        for r in run["results"]:
            losses[r.width] = r.loss if r.width not in losses else losses[r.width] + r.loss
        total = None
        for r in run["results"]:
            total = r.loss if total is None else total + r.loss
        self.last = StepResult(widths, losses, total, run["outputs"], run["results"])

    def __call__(self, forward: Callable[[], Any], loss_fn: Callable[[Any], Any], iteration: int | None = None,
                 keep_outputs: bool = False) -> StepResult:
        """One step: for each width, ``out = forward()``, the loss (``loss_fn(out)``, or the distillation loss
        against the max width's detached output), ``backward(loss)``.

        ``forward`` runs inside ``slim.width(w)``; ``loss_fn`` may return a tensor or a dict of losses (see
        :func:`reduce_loss`). Gradients accumulate in ``.grad``; call ``optimizer.step()`` after.
        """
        for p in self.iterate(iteration, keep_outputs):
            with p:
                out = forward()
                loss = p.loss(out, loss_fn)
                self.backward(loss)
                del out, loss
        return self.last
