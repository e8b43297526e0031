"""Run-time width control: hold a latency budget on a device whose speed changes (S-Nets Section 1, Table 1: a
slimmable network "can adjust its width on the fly according to on-device benchmarks and resource constraints").

:class:`WidthController` serves calls to a converted, calibrated model. It starts from each width's latency in an
offline profile table (at the caller's batch size), times every call it serves, and keeps one number for the device:
the ``percentile`` of ``measured / table latency`` over the last ``window`` calls (whatever width ran them). A
width's expected latency is its table latency times that factor, so a device that slows down as a whole (other
processes, thermal throttling, a shared GPU) moves every estimate at once. Each call runs at the widest width
expected to meet the budget:

- at once to the widest width expected within budget when the current width's estimate exceeds it;
- wider only when the wider width's estimate is within ``headroom`` x budget for ``hold`` consecutive calls
  (hysteresis, so it does not flap at a boundary);
- the calls at a narrow width keep measuring the device, so when the device gets faster the factor falls and the
  wider widths qualify again: every served call is a probe of the device's speed;
- a table row can be wrong (a noisy profile, a cold cache): on the first call after a switch, a ratio outside the
  range of the window is taken as that width's error, not the device's, and its cost is corrected by the excess,
  so a failed move up is not retried at once; the correction decays back to the table (halved in log every
  ``4 * window`` calls, twice as slowly each time the same width is corrected again), so one outlier cannot
  ban a width for good. Costs need not grow with width (channel
  counts that suit the kernels can make a wider width faster); when no width fits, the fastest one runs.

Usage (the framework's call is unchanged)::

    ctl = slim.WidthController.profiled(model, x, budget_ms=20.0)   # profile table measured now
    y = ctl(x)                                                      # model(x) at the chosen width
    detect = ctl.wrap(lambda img: inference_detector(det, img))     # any callable that runs the model
    with ctl.step():                                                # or a block
        action, _ = sb3_model.predict(obs)
    ctl.report().plot("serve.png")
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import csv
import dataclasses
import math
import threading
import time
from typing import Callable, Mapping, Sequence

from .calibrate import calibrated_widths
from .context import find_state, width as width_ctx
from .errors import InvalidArgumentError, UncalibratedWidthError

__all__ = ["WidthController", "ControllerReport", "CallRecord", "serve_stream", "serve_command"]


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """One served call. ``t``: seconds since the controller started; ``width``; ``latency_ms`` measured;
    ``expected_ms``: the controller's estimate for that width when it chose it."""

    t: float
    width: float
    latency_ms: float
    expected_ms: float


@dataclasses.dataclass
class ControllerReport:
    """What a controller did: its calls, the budget, and summaries.

    Attributes:
        records: the served calls (the most recent ``history`` of them), oldest first.
        budget_ms / percentile: the budget it held (``percentile`` of latency <= ``budget_ms``).
    """

    records: list
    budget_ms: float
    percentile: float

    @property
    def misses(self) -> int:
        """Calls slower than the budget."""
        return sum(r.latency_ms > self.budget_ms for r in self.records)

    def latency_percentile(self, q: float | None = None) -> float:
        """The ``q``-th percentile (default: the budget's) of the measured latencies (ms); ``nan`` if no calls."""
        return _percentile(sorted(r.latency_ms for r in self.records), self.percentile if q is None else q)

    def width_counts(self) -> dict:
        """``{width: number of calls}``, narrowest first."""
        c = collections.Counter(r.width for r in self.records)
        return dict(sorted(c.items()))

    def to_csv(self, path: str) -> None:
        """``t_s, width, latency_ms, expected_ms, budget_ms`` per call, written atomically."""
        from .checkpoint import atomic_write

        atomic_write(path, self._write_csv, mode="w")

    def _write_csv(self, f) -> None:
        w = csv.writer(f)
        w.writerow(["t_s", "width", "latency_ms", "expected_ms", "budget_ms"])
        for r in self.records:
            w.writerow([f"{r.t:.6f}", f"{r.width:g}", f"{r.latency_ms:.4f}", f"{r.expected_ms:.4f}",
                        f"{self.budget_ms:g}"])

    def draw(self, ax_latency, ax_width, shade: Sequence[tuple] = (), title: str | None = None) -> None:
        """Draw onto two matplotlib axes: latency per call with the budget line, and width over time.
        ``shade``: ``(t0, t1, label)`` spans to mark (e.g. while a competing load ran)."""
        t = [r.t for r in self.records]
        a, b = ax_latency, ax_width
        a.plot(t, [r.latency_ms for r in self.records], ".", ms=2.5, label="latency per call")
        a.axhline(self.budget_ms, color="r", lw=1.2, label=f"budget {self.budget_ms:.3g} ms (p{self.percentile:g})")
        a.set_ylabel("latency (ms)")
        b.step(t, [r.width for r in self.records], where="post")
        b.set_ylabel("width")
        b.set_xlabel("time (s)")
        for t0, t1, label in shade:
            for ax in (a, b):
                ax.axvspan(t0, t1, color="0.85", zorder=0, label=label if ax is a else None)
        a.legend(loc="upper right", fontsize=8)
        a.set_title(title or f"{len(t)} calls, {self.misses} over budget, p{self.percentile:g} "
                    f"{self.latency_percentile():.2f} ms", fontsize=10)

    def plot(self, path: str, title: str | None = None, shade: Sequence[tuple] = ()) -> str:
        """PNG at ``path``: :meth:`draw` on a figure of its own; returns ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        self.draw(a, b, shade, title)
        fig.tight_layout()
        from .checkpoint import atomic_write

        try:
            atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
        finally:
            plt.close(fig)
        return path


def _rank(q: float, n: int) -> int:
    """0-based nearest-rank index of the ``q``-th percentile of ``n`` values (``q * n / 100`` rounded up; the
    small tolerance keeps e.g. 7 % of 100 at rank 7, not 8, despite float rounding)."""
    return math.ceil(q * n / 100.0 - 1e-9) - 1


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (``nan`` when empty)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, _rank(q, len(sorted_values))))
    return sorted_values[k]


class WidthController:
    """Chooses, per call, the widest width expected to keep the ``percentile`` latency within ``budget_ms``.

    Args:
        model: a converted model (its spec validates the widths; BN statistics must exist at each of them).
        budget_ms: the latency budget per call, in ms, at the caller's batch size.
        latency_ms: ``{width: latency in ms}`` measured offline (a profile table: ``slim.profile`` /
            ``slim profile --csv``; a :class:`~slim_plugins.profile.ProfileTable` or a path to its CSV also work).
            Its widths are the ones the controller may use.
        percentile: the budget's percentile (95: p95 <= budget).
        window: calls over which the device's slowdown factor is taken (its ``percentile``).
        headroom: a wider width is chosen only when expected within ``headroom * budget_ms``.
        hold: ... for this many consecutive calls.
        fn: what a call runs (default: ``model``); it must run the model inside the call.
        clock: seconds, monotonic (default ``time.perf_counter``; tests inject a simulated one).
        sync: called before the clock stops (default: ``torch.cuda.synchronize`` for a model on CUDA).
        history: how many call records the report keeps.

    Raises:
        InvalidArgumentError: a bad budget / percentile / window / headroom / hold, an empty or non-positive table,
            or a budget that even the fastest width misses (the message names both).
        WidthError: a width the model's spec does not allow.
        UncalibratedWidthError: a width without BN statistics (calibrate it first: ``slim.calibrate_bn``).
    """

    def __init__(self, model, budget_ms: float, latency_ms, percentile: float = 95.0, window: int = 32,
                 headroom: float = 0.9, hold: int = 8, fn: Callable | None = None,
                 clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None,
                 history: int = 100_000) -> None:
        table = _as_latency_table(latency_ms)
        if not (isinstance(budget_ms, (int, float)) and budget_ms > 0 and math.isfinite(budget_ms)):
            raise InvalidArgumentError(f"budget_ms must be a positive number of milliseconds, got {budget_ms!r}")
        if not 0 < percentile <= 100:
            raise InvalidArgumentError(f"percentile must be in (0, 100], got {percentile!r}")
        if not (isinstance(window, int) and window >= 1):
            raise InvalidArgumentError(f"window must be a positive integer, got {window!r}")
        if not 0 < headroom <= 1:
            raise InvalidArgumentError(f"headroom must be in (0, 1], got {headroom!r}")
        if not (isinstance(hold, int) and hold >= 1):
            raise InvalidArgumentError(f"hold must be a positive integer, got {hold!r}")
        spec = find_state(model).spec
        widths = sorted(spec.validate(w) for w in table)
        missing = [w for w in widths if w not in calibrated_widths(model, widths)]
        if missing:
            raise UncalibratedWidthError(f"widths {missing} have no BN statistics; calibrate them "
                                         "(slim.calibrate_bn / slim calibrate) or leave them out of the table")
        base = [float(table[w]) for w in sorted(table)]  # not monotone in width: channel counts that suit the
        # kernels can make a wider width faster than a narrower one (measured on MobileNetV2 here)
        if min(base) > budget_ms:
            k = base.index(min(base))
            raise InvalidArgumentError(f"no width fits the budget: the fastest width {widths[k]:g} takes "
                                       f"{base[k]:.3f} ms, the budget is {budget_ms:g} ms")
        self.model, self.budget_ms, self.percentile = model, float(budget_ms), float(percentile)
        self.widths, self.base_ms = widths, base
        self._table = list(base)  # the offline costs; base_ms = table x a correction that decays back to 1
        self._corr = [1.0] * len(base)
        self._decay_every = [4 * window] * len(base)  # calls between halvings (in log) of a width's correction
        self._decay_at: list = [None] * len(base)
        self._next_decay = math.inf
        self._calls = 0
        self.headroom, self.hold = float(headroom), hold
        self.fn = fn if fn is not None else model
        self.clock = clock
        self.sync = sync if sync is not None else _default_sync(model)
        self._lock = threading.Lock()
        self._window = collections.deque(maxlen=window)  # ratios measured / table, oldest first
        self._sorted: list = []  # the same ratios, ascending (percentile without sorting per call)
        self._factor = 1.0
        self._index_costs()
        self._idx = self._widest_within(budget_ms)  # the offline table's choice
        self._up_streak = 0
        self._probe = None  # width index switched to whose first call has not been measured yet
        self._records = collections.deque(maxlen=history)
        self._t0 = clock()

    @classmethod
    def profiled(cls, model, example_input, budget_ms: float, widths: Sequence[float] | None = None,
                 repeats: int = 20, **kwargs) -> "WidthController":
        """A controller whose table is measured now by ``slim.profile(model, example_input, widths)`` (default
        widths: the calibrated ones of ``slim.profile``'s default list)."""
        from .profile import profile

        if widths is None:
            spec = find_state(model).spec
            cand = list(spec.widths) if spec.is_switches else sorted(
                {spec.min, spec.max, *[w / 20 for w in range(1, 21) if spec.min <= w / 20 <= spec.max]})
            widths = calibrated_widths(model, cand)
        table = profile(model, example_input, widths=widths, repeats=repeats)
        return cls(model, budget_ms, table, **kwargs)

    # ---- the decision ------------------------------------------------------------------------------------------
    @property
    def current_width(self) -> float:
        """The width the next call runs at."""
        return self.widths[self._idx]

    @property
    def slowdown(self) -> float:
        """The device's current slowdown factor (the window's percentile of measured / table latency)."""
        return self._factor

    def expected_ms(self, w: float | None = None) -> float:
        """Expected latency (ms) of width ``w`` (default: the current one) on the device as it is now."""
        i = self._idx if w is None else self.widths.index(w)
        return self.base_ms[i] * self._factor

    def _observe(self, i: int, latency_ms: float, expected: float, t: float) -> None:
        budget = self.budget_ms
        latency_ms = max(latency_ms, 1e-6)  # a coarse clock can read 0 ms
        with self._lock:
            self._records.append((t - self._t0, i, latency_ms, expected))  # CallRecords built in report()
            self._calls += 1
            if self._calls >= self._next_decay:
                self._decay()
            base = self.base_ms
            ratio = latency_ms / base[i]
            if i == self._probe:
                self._probe = None
                # first call after a switch: a ratio outside the range the window has seen is this width's table
                # error, not the device: correct its cost by the excess (a failed move up is then not retried
                # until the correction has decayed; each repeat doubles that time)
                ref = min(max(ratio, self._sorted[0]), self._sorted[-1]) if self._sorted else ratio
                if ref != ratio:
                    self._correct(i, ratio / ref)
                    ratio = ref
            if len(self._window) == self._window.maxlen:
                del self._sorted[bisect.bisect_left(self._sorted, self._window[0])]
            self._window.append(ratio)
            bisect.insort(self._sorted, ratio)
            s = self._sorted
            self._factor = f = s[max(0, min(len(s) - 1, _rank(self.percentile, len(s))))]
            cur = self._idx
            if base[cur] * f > budget:  # at once: the widest width expected within budget, else the fastest
                self._switch(self._widest_within(budget / f))
                return
            up = self._widest_within(self.headroom * budget / f)
            if up <= cur:
                self._up_streak = 0
                return
            self._up_streak += 1
            if self._up_streak >= self.hold:  # wider only after `hold` calls in a row that allow it
                self._switch(up)

    def _switch(self, j: int) -> None:
        if j != self._idx:
            self._idx, self._probe = j, j
        self._up_streak = 0

    def _correct(self, i: int, k: float) -> None:
        """Width ``i`` costs ``k`` x its current estimate (a correction that decays back to the table)."""
        if self._decay_at[i] is not None:  # corrected again before it decayed: wait twice as long
            self._decay_every[i] *= 2
        self._corr[i] *= k
        self._decay_at[i] = self._calls + self._decay_every[i]
        self._next_decay = min(a for a in self._decay_at if a is not None)
        self.base_ms[i] = self._table[i] * self._corr[i]
        self._index_costs()

    def _decay(self) -> None:
        for i, at in enumerate(self._decay_at):
            if at is not None and at <= self._calls:
                c = math.sqrt(self._corr[i])
                self._corr[i], self._decay_at[i] = (1.0, None) if abs(math.log(c)) < 0.01 else (
                    c, self._calls + self._decay_every[i])
                self.base_ms[i] = self._table[i] * self._corr[i]
        self._next_decay = min((a for a in self._decay_at if a is not None), default=math.inf)
        self._index_costs()

    def _index_costs(self) -> None:
        """Widths by cost, and for the k cheapest the widest among them: 'widest width costing <= x' by bisection."""
        order = sorted(range(len(self.base_ms)), key=self.base_ms.__getitem__)
        self._cost_sorted = [self.base_ms[i] for i in order]
        widest, self._widest_prefix = -1, []
        for i in order:
            widest = max(widest, i)
            self._widest_prefix.append(widest)
        self._fastest = order[0]

    def _widest_within(self, cost: float) -> int:
        """Index of the widest width whose estimated cost is <= ``cost``, else of the fastest width."""
        k = bisect.bisect_right(self._cost_sorted, cost)
        return self._widest_prefix[k - 1] if k else self._fastest

    # ---- serving -----------------------------------------------------------------------------------------------
    def _serve(self, fn, args, kwargs):
        i = self._idx
        expected = self.base_ms[i] * self._factor
        clock = self.clock
        with width_ctx(self.widths[i]):
            t0 = clock()
            out = fn(*args, **kwargs)
            if self.sync is not None:
                self.sync()
            t1 = clock()
        self._observe(i, (t1 - t0) * 1e3, expected, t1)
        return out

    @contextlib.contextmanager
    def step(self):
        """Run the block at the chosen width and time it; yields the width. Exceptions propagate unrecorded."""
        i = self._idx
        expected = self.base_ms[i] * self._factor
        with width_ctx(self.widths[i]):
            t0 = self.clock()
            yield self.widths[i]
            if self.sync is not None:
                self.sync()
            t1 = self.clock()
        self._observe(i, (t1 - t0) * 1e3, expected, t1)

    def __call__(self, *args, **kwargs):
        """``fn(*args, **kwargs)`` (default ``model(...)``) at the chosen width, timed."""
        return self._serve(self.fn, args, kwargs)

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` with the same signature, each call served by this controller (``fn`` must run the model)."""
        import functools

        @functools.wraps(fn)
        def served(*args, **kwargs):
            return self._serve(fn, args, kwargs)

        return served

    def report(self) -> ControllerReport:
        """A snapshot of what the controller did so far."""
        with self._lock:
            recs = list(self._records)
        w = self.widths
        return ControllerReport([CallRecord(t, w[i], lat, exp) for t, i, lat, exp in recs], self.budget_ms,
                                self.percentile)


def _as_latency_table(latency_ms) -> dict:
    """``{width: ms}`` from a mapping, a ProfileTable / list of rows with ``width`` and ``latency_ms``, or a CSV."""
    if isinstance(latency_ms, str):
        from .profile import ProfileTable

        latency_ms = ProfileTable.from_csv(latency_ms)
    try:
        if isinstance(latency_ms, Mapping):
            table = {float(w): float(v) for w, v in latency_ms.items()}
        else:
            table = {float(r.width): float(r.latency_ms) for r in latency_ms}
    except (TypeError, ValueError, AttributeError) as e:
        raise InvalidArgumentError(f"the latency table must map width multipliers to latencies (ms), or be a "
                                   f"profile table; got {latency_ms!r} ({e})") from None
    bad = {w: v for w, v in table.items() if not (v > 0 and math.isfinite(v))}
    if not table or bad:
        raise InvalidArgumentError(f"the latency table needs a positive latency (ms) per width, got "
                                   f"{bad or table!r}")
    return table


def _default_sync(model):
    try:
        import torch

        p = next(model.parameters())
        if p.is_cuda:
            dev = p.device
            return lambda: torch.cuda.synchronize(dev)
    except (StopIteration, AttributeError):
        pass
    return None


def serve_stream(ctl: WidthController, make_args: Callable[[int], tuple], calls: int, live: bool = True,
                 console=None, refresh_every: int = 10) -> ControllerReport:
    """Serve ``calls`` calls ``ctl(*make_args(i))`` one after another, with a live rich display of the width, the
    expected and measured latency (ms), the running percentile and the budget misses; returns the report.

    Raises:
        InvalidArgumentError: ``calls`` < 1.
    """
    if not (isinstance(calls, int) and calls >= 1):
        raise InvalidArgumentError(f"calls must be a positive integer, got {calls!r}")
    import torch
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def view(i: int):
        rep = ctl.report()
        last = rep.records[-1] if rep.records else None
        t = Table(title=f"budget p{ctl.percentile:g} <= {ctl.budget_ms:g} ms", show_header=False)
        t.add_column(justify="left")
        t.add_column(justify="right")
        t.add_row("calls", f"{i} / {calls}")
        t.add_row("width (next call)", f"{ctl.current_width:g}")
        t.add_row("device slowdown", f"{ctl.slowdown:.2f}x")
        t.add_row("expected (next call)", f"{ctl.expected_ms():.2f} ms")
        t.add_row("last call", f"{last.latency_ms:.2f} ms at {last.width:g}" if last else "-")
        t.add_row(f"p{ctl.percentile:g} so far", f"{rep.latency_percentile():.2f} ms")
        t.add_row("over budget", f"{rep.misses} ({100.0 * rep.misses / max(1, len(rep.records)):.1f} %)")
        return t

    console = console or Console()
    with torch.no_grad(), Live(view(0), console=console, refresh_per_second=4, transient=False,
                               auto_refresh=False) if live else contextlib.nullcontext() as lv:
        for i in range(calls):
            ctl(*make_args(i))
            if lv is not None and (i + 1) % refresh_every == 0:
                lv.update(view(i + 1), refresh=True)
        if lv is not None:
            lv.update(view(calls), refresh=True)
    return ctl.report()


def serve_command(ctl: WidthController, make_args: Callable[[int], tuple], calls: int, live: bool = True,
                  csv_path: str | None = None, plot_path: str | None = None, title: str | None = None,
                  log: Callable[[str], None] = print, console=None) -> ControllerReport:
    """What ``slim serve`` does once an adapter has built the controller: :func:`serve_stream`, a one-line summary
    (percentile, budget, misses, widths used) through ``log``, the per-call CSV and the PNG."""
    rep = serve_stream(ctl, make_args, calls, live=live, console=console)
    log(f"{len(rep.records)} calls: p{ctl.percentile:g} {rep.latency_percentile():.2f} ms (budget "
        f"{ctl.budget_ms:g} ms), {rep.misses} over budget; widths used {rep.width_counts()}")
    if csv_path:
        rep.to_csv(csv_path)
        log(f"wrote {csv_path}")
    if plot_path:
        stats = (f"{len(rep.records)} calls, {rep.misses} over budget, p{ctl.percentile:g} "
                 f"{rep.latency_percentile():.2f} ms")
        log(f"wrote {rep.plot(plot_path, title=f'{title}: {stats}' if title else None)}")
    return rep
