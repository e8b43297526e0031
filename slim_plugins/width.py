"""Width specifications: a list of switches (S-Nets) or a continuous range (US-Nets).

A *width* is a width multiplier (ratio of active to base channels, base = the model's channels at 1.0x).
Channel counts at a width are rounded with :func:`make_divisible` (TF-slim / timm semantics).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import random
from typing import Iterable, Mapping, Sequence

from .errors import InvalidArgumentError, WidthError

#: Width-sampling rules of ``MultiWidthStep`` (US-Nets paper, Section 4.1 and Table 2).
SAMPLING_RULES = ("all", "sandwich", "random", "min_random", "max_random")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of ``divisor`` (TF-slim / timm ``make_divisible``).

    Rounds to the nearest multiple, never below ``min_value`` (default ``divisor``), and adds one ``divisor``
    when rounding down lost more than ``1 - round_limit`` of ``v``. ``divisor=1`` rounds to the nearest integer.

    Returns:
        int: the rounded channel count (>= 1).
    """
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return int(new_v)


def _canon(w: float) -> float:
    # Widths are compared and used as dict keys after rounding away float noise (0.1 + 0.2 style).
    return round(float(w), 6)


def _number(w, what: str = "width") -> float:
    """``w`` as a canonical float; strings, booleans and non-numbers raise :class:`WidthError`."""
    if isinstance(w, (bool, str, bytes)) or not isinstance(w, numbers.Real):
        if not (hasattr(w, "item") and getattr(w, "ndim", 1) == 0 and not isinstance(w, (bool, str))):
            raise WidthError(f"{what} must be a number (a width multiplier such as 0.5), got {w!r}")
        w = w.item()
        if isinstance(w, bool):
            raise WidthError(f"{what} must be a number (a width multiplier such as 0.5), got {w!r}")
    return _canon(w)


@dataclasses.dataclass(frozen=True)
class WidthSpec:
    """The set of widths a slimmable model can run at.

    Build with :meth:`switches` (S-Nets: a fixed list, switchable BN) or :meth:`range` (US-Nets: any width in
    ``[lo, hi]``, BN post-statistics). Instances are immutable and hashable; ``to_dict``/``from_dict`` round-trip
    them through checkpoints.

    Attributes:
        kind: ``"switches"`` or ``"range"``.
        widths: the sorted switch list (switches) or ``(lo, hi)`` (range).
        divisor: channel rounding divisor for :func:`make_divisible`.
    """

    kind: str
    widths: tuple
    divisor: int = 8

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def switches(cls, widths: Iterable[float], divisor: int = 8) -> "WidthSpec":
        """S-Net spec: a fixed list of width multipliers (Slimmable Networks, Section 3).

        Raises:
            WidthError: empty list, duplicates, or a non-positive width.
        """
        try:
            ws = [_number(w, "switch width") for w in widths]
        except TypeError:
            raise WidthError(f"switches must be a list of width multipliers, got {widths!r}") from None
        if not ws:
            raise WidthError("switch list is empty; give at least one width multiplier, e.g. [0.25, 0.5, 1.0]")
        bad = [w for w in ws if not (w > 0 and math.isfinite(w))]
        if bad:
            raise WidthError(f"switch widths must be positive finite numbers, got {bad}")
        canon = sorted(_canon(w) for w in ws)
        if len(set(canon)) != len(canon):
            raise WidthError(f"switch list has duplicates: {ws}")
        _check_divisor(divisor)
        return cls("switches", tuple(canon), int(divisor))

    @classmethod
    def range(cls, lo: float, hi: float, divisor: int = 8) -> "WidthSpec":
        """US-Net spec: any width multiplier in ``[lo, hi]`` (Universally Slimmable Networks, Section 3).

        ``hi`` need not be 1.0 (e.g. 0.35-1.5): base channels are always the model's 1.0x channels.

        Raises:
            WidthError: ``lo`` not in ``(0, hi]``.
        """
        lo, hi = _number(lo, "range lower bound"), _number(hi, "range upper bound")
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise WidthError(f"width range must satisfy 0 < lo <= hi, got lo={lo}, hi={hi}")
        _check_divisor(divisor)
        return cls("range", (lo, hi), int(divisor))

    @classmethod
    def from_dict(cls, d: dict) -> "WidthSpec":
        """Inverse of :meth:`to_dict`."""
        if d.get("kind") == "switches":
            return cls.switches(d["widths"], d.get("divisor", 8))
        if d.get("kind") == "range":
            lo, hi = d["widths"]
            return cls.range(lo, hi, d.get("divisor", 8))
        raise WidthError(f"unknown width spec {d!r}; expected kind 'switches' or 'range'")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "widths": list(self.widths), "divisor": self.divisor}

    # ---- queries ------------------------------------------------------------------------------------------
    @property
    def is_switches(self) -> bool:
        return self.kind == "switches"

    @property
    def min(self) -> float:
        return self.widths[0]

    @property
    def max(self) -> float:
        return self.widths[-1]

    def validate(self, w: float) -> float:
        """Return the canonical form of width ``w``.

        Raises:
            WidthError: ``w`` is not in the switch list / outside the range.
        """
        c = _number(w)
        if self.is_switches:
            if c not in self.widths:
                raise WidthError(f"width {w} is not a switch of this S-Net; allowed switches: {list(self.widths)}")
        elif not (self.min <= c <= self.max):
            raise WidthError(f"width {w} is outside the range [{self.min}, {self.max}] of this US-Net")
        return c

    def switch_index(self, w: float) -> int:
        """Index of switch ``w`` (S-Nets); raises :class:`WidthError` for a width not in the list."""
        return self.widths.index(self.validate(w))

    def channels(self, base: int, w: float, multiple: int = 1) -> int:
        """Active channels of a layer with ``base`` channels at 1.0x, at width ``w``: ``make_divisible(base * w)``
        with the spec's divisor, or ``lcm(divisor, multiple)`` where the count must split into equal runs.

        ``w == 1.0`` returns ``base`` exactly, so the 1.0x network equals the original even when ``base`` is not
        a multiple of ``divisor``.
        """
        if w == 1.0:
            return base
        return make_divisible(base * w, math.lcm(self.divisor, int(multiple)))

    def grid(self, step: float) -> list[float]:
        """Evenly spaced widths from min to max (inclusive) for evaluation sweeps (US paper, Fig. 3)."""
        if self.is_switches:
            return list(self.widths)
        n = int(round((self.max - self.min) / step))
        return [_canon(self.min + i * step) for i in range(n + 1) if self.min + i * step <= self.max + 1e-9]

    def sample(self, iteration: int, num_widths: int = 4, rule: str = "sandwich", seed: int = 0) -> list[float]:
        """Widths to train at one iteration, widest first.

        ``rule``: ``"all"`` (every switch; S-Nets, Algorithm 1), ``"sandwich"`` (max, min and n-2 random; US-Nets
        Section 4.1), ``"random"`` (n random), ``"min_random"`` / ``"max_random"`` (Table 2 variants). Random widths
        are drawn from a generator seeded by ``(seed, iteration)`` so every DDP rank draws the same widths without
        communication.

        Raises:
            WidthError: unknown rule, or ``num_widths`` too small for the rule.
        """
        if rule not in SAMPLING_RULES:
            raise WidthError(f"unknown sampling rule {rule!r}; allowed: {list(SAMPLING_RULES)}")
        if rule == "all":
            return sorted(self.widths, reverse=True)
        need = {"sandwich": 2, "min_random": 1, "max_random": 1, "random": 1}[rule]
        if num_widths < need:
            raise WidthError(f"rule {rule!r} needs num_widths >= {need}, got {num_widths}")
        rng = random.Random(_mix(seed, iteration))
        n_rand = num_widths - (2 if rule == "sandwich" else 1 if rule in ("min_random", "max_random") else 0)
        if self.is_switches:
            rand = [rng.choice(self.widths) for _ in range(n_rand)]
        else:
            rand = [_canon(rng.uniform(self.min, self.max)) for _ in range(n_rand)]
        fixed = {"sandwich": [self.max, self.min], "min_random": [self.min], "max_random": [self.max]}.get(rule, [])
        return sorted(fixed + rand, reverse=True)


def _check_divisor(divisor: int) -> None:
    if int(divisor) != divisor or divisor < 1:
        raise WidthError(f"divisor must be a positive integer, got {divisor!r}")


def _mix(seed: int, iteration: int) -> int:
    # Deterministic across processes (no hash randomisation for ints); distinct seeds give distinct streams.
    return (int(seed) * 0x9E3779B1 + int(iteration)) & 0xFFFFFFFFFFFF


def as_spec(spec_or_widths) -> WidthSpec:
    """Accept a WidthSpec, a list of switches, or a ``(lo, hi)`` range dict."""
    if isinstance(spec_or_widths, WidthSpec):
        return spec_or_widths
    if isinstance(spec_or_widths, dict):
        return WidthSpec.from_dict(spec_or_widths)
    if isinstance(spec_or_widths, Sequence) and not isinstance(spec_or_widths, (str, bytes)):
        return WidthSpec.switches(spec_or_widths)
    raise WidthError(f"expected a WidthSpec (WidthSpec.range(lo, hi) / WidthSpec.switches([...])) or a list of "
                     f"switches, got {spec_or_widths!r}")


def spec_from_config(cfg, divisor: int = 8, allowed: Iterable[str] | None = None) -> WidthSpec:
    """The :class:`WidthSpec` of an adapter's ``slimmable`` config block: exactly one of ``widths: [...]``
    (S-Net switches) or ``width_range: [lo, hi]`` (US-Net), and an optional ``divisor`` (default ``divisor``).
    With ``allowed``, the block must be a mapping holding only those keys.

    Raises:
        InvalidArgumentError: not a mapping, a key outside ``allowed``, both or neither of ``widths`` /
            ``width_range``, or a range that is not ``[lo, hi]``.
        WidthError: a bad switch list or range, or a width above 1.
    """
    if allowed is not None:
        if not isinstance(cfg, Mapping):
            raise InvalidArgumentError(f"slimmable must be true or a mapping of keys, got {cfg!r}")
        unknown = sorted(set(cfg) - set(allowed))
        if unknown:
            raise InvalidArgumentError(f"unknown slimmable key(s) {unknown}; allowed: {list(allowed)}")
    if ("widths" in cfg) == ("width_range" in cfg):
        raise InvalidArgumentError("slimmable needs exactly one of widths=[...] (S-Net switches) or "
                                   f"width_range=[lo, hi] (US-Net), got keys {sorted(cfg)}")
    divisor = cfg.get("divisor", divisor)
    if "widths" in cfg:
        spec = WidthSpec.switches(cfg["widths"], divisor)
    else:
        rng = cfg["width_range"]
        if not isinstance(rng, Sequence) or isinstance(rng, str) or len(rng) != 2:
            raise InvalidArgumentError(f"width_range must be [lo, hi], got {rng!r}")
        spec = WidthSpec.range(rng[0], rng[1], divisor)
    if spec.max > 1:  # a converted model has the channels of width 1.0 at most
        key = "widths" if "widths" in cfg else "width_range"
        raise WidthError(f"{key} {cfg[key]!r}: width multipliers of a slimmable model are in (0, 1] (1.0: the "
                         "model's own channels)")
    return spec


def schedule_from_config(cfg) -> tuple:
    """``(rule, num_widths)`` of an adapter's ``slimmable`` block: ``rule`` one of :data:`SAMPLING_RULES` or
    ``None`` (the default of the spec kind), ``num_widths`` a positive integer (default 4).

    Raises:
        InvalidArgumentError: an unknown rule or a bad width count.
    """
    rule = cfg.get("rule")
    if rule is not None and rule not in SAMPLING_RULES:
        raise InvalidArgumentError(f"unknown sampling rule {rule!r}; allowed: {list(SAMPLING_RULES)}")
    num_widths = cfg.get("num_widths", 4)
    if isinstance(num_widths, bool) or not isinstance(num_widths, int) or num_widths < 1:
        raise InvalidArgumentError(f"num_widths must be a positive integer, got {num_widths!r}")
    return rule, num_widths


def distill_from_config(cfg, spec: WidthSpec, allowed: Sequence, range_default) -> str | None:
    """The ``distill`` entry of an adapter's ``slimmable`` block: one of ``allowed``; default ``range_default``
    for a US-Net range (inplace distillation, US-Nets §4.2) and ``None`` for S-Net switches (each switch trains on
    the task loss, S-Nets §3).

    Raises:
        InvalidArgumentError: a value outside ``allowed``.
    """
    distill = cfg.get("distill", None if spec.is_switches else range_default)
    if distill not in allowed:
        raise InvalidArgumentError(f"distill must be one of {list(allowed)}, got {distill!r}")
    return distill


def check_distill_weight(weight) -> float:
    """The ``distill_weight`` entry of an adapter's ``slimmable`` block (the weight of the inplace-distillation loss
    added to a width's task loss), as a float.

    Raises:
        InvalidArgumentError: not a finite number >= 0 (booleans and strings included).
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight >= 0):
        raise InvalidArgumentError(f"distill_weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def eval_widths_from_config(cfg, spec: WidthSpec, count: int) -> tuple:
    """The ``eval_widths`` entry of an adapter's ``slimmable`` block, each checked against ``spec``, sorted and
    deduplicated; default: the switches, or ``count`` evenly spaced widths from ``spec.min`` to ``spec.max``.

    Raises:
        WidthError: a width outside ``spec``.
    """
    if cfg.get("eval_widths") is not None:
        return tuple(sorted({spec.validate(w) for w in cfg["eval_widths"]}))
    if spec.is_switches:
        return tuple(spec.widths)
    return tuple(spec.grid((spec.max - spec.min) / (count - 1)) if spec.max > spec.min and count > 1
                 else [spec.max])
