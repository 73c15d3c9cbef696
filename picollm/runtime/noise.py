"""Timings that carry their noise: every timing is a set of repeats (min, median, max) taken with the
machine's load at the time, and one set of rules (`NoiseRules`) says when a timing, or a curve of timings,
is not to be read as the cost of the work.

The reported value of a timing is the **minimum** of its repeats. Interference (other processes, the
scheduler, page faults, a frequency drop) only ever adds time to a repeat, never removes it, so the fastest
repeat is the closest to what the work itself costs and the one a neighbour moves least; the median and max
say how much the noise added. A machine that stays busy slows every repeat, the minimum included: that is
what the load rule is for.

The rules, each a one-line warning (`NoiseRules`, defaults below):
- spread: a timing's `spread`, its median repeat over its fastest, above `max_spread`: fewer than half the repeats
  corroborate the reported minimum. Slow outliers alone do not count: on a quiet 2-core machine (2026-12-04,
  load 0.8) single decode steps among 16 took up to 30× the others (5.7 vs 0.21 ms at context 4096) while the
  median stayed within 1.1× of the fastest; a busy machine slows most repeats (the issue's 15,975 µs per token
  at context 4096 was a median; 0.19 ms in isolation).
- load: the 1-minute load average (os.getloadavg), at the start or the end of the timings, above the core
  count + `max_load_over_cores`: more threads wanted to run than there were cores, so timings waited. This
  process's own threads count too, but torch uses at most one per core, so a machine with nothing else running
  stays at about the count (2.00 and 1.93 around a 2-core run on 2026-12-04); the margin absorbs the odd
  housekeeping thread, not another job (a busy loop adds 1).
- curve: a time that cannot fall as the length grows (per-token generation and prefill vs context; a training
  step vs sequence length at a fixed token budget: softmax grows, linear attention stays flat) falls by more
  than a factor `max_drop` from a shorter length to a longer one.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Repeats of one measurement (ms, or any one unit); `value` (the minimum) is the reported figure."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a timing needs at least one repeat")

    @classmethod
    def of(cls, samples: list[float] | tuple[float, ...]) -> Timing:
        return cls(tuple(float(s) for s in samples))

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def value(self) -> float:
        """The reported figure: the fastest repeat (see the module docstring)."""
        return self.min

    @property
    def spread(self) -> float:
        """The median repeat over the fastest (1 for one repeat, whose noise is not measured; inf for a
        non-positive min): outliers do not count, a busy machine that slows most repeats does."""
        return self.median / self.min if self.min > 0 else math.inf

    def scaled(self, factor: float) -> Timing:
        """The same repeats in another unit (ms -> µs: 1000)."""
        return Timing(tuple(s * factor for s in self.samples))

    def cell(self, digits: int = 1) -> str:
        """`min – max` for a report table (the min alone for a single repeat)."""
        if self.n == 1:
            return f"{self.min:,.{digits}f}"
        return f"{self.min:,.{digits}f} – {self.max:,.{digits}f}"


def time_repeats(fn: Callable[[], object], warmup: int, repeats: int) -> Timing:
    """Wall time of `fn` in ms, `repeats` times after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return Timing.of(times)


# --------------------------------------------------------------------------------------------------
# The machine's load


def load_average() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return math.nan


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Load:
    """The 1-minute load average at the start and the end of a set of timings, and the core count."""

    start: float
    end: float
    cpus: int

    @classmethod
    def since(cls, start: float) -> Load:
        """The load from `start` (a `load_average()` taken before the timings) to now."""
        return cls(start, load_average(), cpu_count())

    @property
    def peak(self) -> float:
        return max(self.start, self.end)

    def params(self, prefix: str) -> dict[str, float | int]:
        return {
            f"{prefix}.load_avg_1m_start": round(self.start, 2),  # /proc/loadavg's own precision
            f"{prefix}.load_avg_1m_end": round(self.end, 2),
            f"{prefix}.cpus": self.cpus,
        }

    def text(self) -> str:
        return f"load average (1 min) {self.start:.2f} at the start, {self.end:.2f} at the end, on {self.cpus} core(s)"


# --------------------------------------------------------------------------------------------------
# The rules


@dataclass(frozen=True)
class NoiseRules:
    """When a timing is flagged as noisy (the module docstring explains each rule)."""

    max_spread: float = 2.0
    """a timing's spread (median repeat / fastest) above this: its repeats disagree"""
    max_load_over_cores: float = 0.5
    """the load average above cores + this: other work competed for the CPU (a margin for the odd
    housekeeping thread: our own torch threads alone fill every core, a load of exactly the core count)"""
    max_drop: float = 1.5
    """a time that cannot fall with length falling by more than this factor"""

    def text(self) -> str:
        """The rules in one line, for a report."""
        return (
            f"a timing's repeats within {self.max_spread:g}× (median / fastest), the load average at most "
            f"cores + {self.max_load_over_cores:g}, and no time that cannot fall with length falling by more than "
            f"{self.max_drop:g}×"
        )

    def spread(self, what: str, timings: Mapping[int, Timing], unit: str = "") -> str | None:
        """One warning for a measure's timings (keyed by length) whose `spread` exceeds `max_spread`."""
        bad = {n: t for n, t in timings.items() if t.n > 1 and t.spread > self.max_spread}
        if not bad:
            return None
        worst = max(bad, key=lambda n: bad[n].spread)
        t = bad[worst]
        at = ", ".join(str(n) for n in sorted(bad))
        return (
            f"{what}: repeats disagree by up to {t.spread:.1f}× (median / fastest, rule: > "
            f"{self.max_spread:g}×) at {at}; "
            f"worst at {worst}: {t.min:,.3g}–{t.max:,.3g}{unit}"
        )

    def load(self, load: Load) -> str | None:
        if not math.isfinite(load.peak) or load.peak <= load.cpus + self.max_load_over_cores:
            return None
        return (
            f"the machine was busy: {load.text()} (rule: above cores + {self.max_load_over_cores:g}); "
            "other work competed for the CPU, so every timing may be inflated"
        )

    def curve(self, what: str, values: Mapping[int, float], unit: str = "") -> str | None:
        """A warning when a value at a longer length is below the largest at a shorter one / `max_drop`."""
        points = sorted((n, v) for n, v in values.items() if math.isfinite(v))
        for i, (n, v) in enumerate(points[1:], 1):
            m, top = max(points[:i], key=lambda p: p[1])
            if v * self.max_drop < top:
                return (
                    f"{what} falls from {top:,.3g}{unit} at {m} to {v:,.3g}{unit} at {n} ({top / v:.1f}×, rule: "
                    f"> {self.max_drop:g}×), though it cannot fall with length: noise, not cost"
                )
        return None


RULES = NoiseRules()
