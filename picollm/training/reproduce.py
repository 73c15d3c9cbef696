"""Did a run reproduce its config's reference results? A pure verdict: the run's metrics against the
`reference:` section (picollm/config/reference_results.py); the training run logs it as tags and the CLI prints
its line."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from picollm.config.reference_results import ReferenceResults

REPRODUCED_TAG = "reproduced"  # true / false / partial: filter the runs table with tags.reproduced = 'false'
Status = Literal["matches", "drifted", "missing"]


@dataclass(frozen=True)
class MetricCheck:
    name: str
    value: float | None  # the run's; None when the run did not log the metric
    reference: float
    tolerance: float

    @property
    def status(self) -> Status:
        if self.value is None or not math.isfinite(self.value):
            return "missing"
        # A hair of slack: a value exactly at the edge must not fail on the float rounding of |a - b|.
        return "matches" if abs(self.value - self.reference) <= self.tolerance * (1 + 1e-9) else "drifted"

    def describe(self) -> str:
        """`0.838 vs 0.838 ± 0.004` at the tolerance's precision."""
        digits = min(6, max(3, -math.floor(math.log10(self.tolerance))))  # to the first digit of the tolerance
        got = "not logged" if self.value is None else f"{self.value:.{digits}f}"
        return f"{got} vs {self.reference:.{digits}f} ± {self.tolerance:.{digits}f}"


@dataclass(frozen=True)
class Verdict:
    checks: list[MetricCheck]

    @property
    def outcome(self) -> Literal["true", "false", "partial"]:
        """`true` when every metric matches, `false` when none does, else `partial`."""
        matched = sum(c.status == "matches" for c in self.checks)
        return "true" if matched == len(self.checks) else "false" if matched == 0 else "partial"

    @property
    def line(self) -> str:
        """One line: `matches the reference (...)`, or the metrics that drifted (or were not logged)."""
        if self.outcome == "true":
            return "matches the reference (" + "; ".join(_named(c) for c in self.checks) + ")"
        bad = [c for c in self.checks if c.status != "matches"]
        drifted = "; ".join(f"{c.name} {c.describe().replace(' vs ', ' vs reference ')}: {c.status}" for c in bad)
        ok = len(self.checks) - len(bad)
        rest = f" ({ok} of {len(self.checks)} metrics match)" if ok else ""
        return f"does not match the reference: {drifted}{rest}"

    def tags(self) -> dict[str, str]:
        """The run's tags: `reproduced` and one `reproduced.<metric>` (true / false / missing) per metric."""
        per = {
            f"{REPRODUCED_TAG}.{c.name}": {"matches": "true", "drifted": "false"}.get(c.status, c.status)
            for c in self.checks
        }
        return {REPRODUCED_TAG: self.outcome, **per}


def _named(c: MetricCheck) -> str:
    return f"{c.name} {c.describe()}"


def check(metrics: dict[str, float], reference: ReferenceResults) -> Verdict:
    """The run's `metrics` (as logged: test/*, val/*) against `reference`, metric by metric, in its order."""
    return Verdict(
        [MetricCheck(name, metrics.get(name), ref.value, ref.tolerance) for name, ref in reference.metrics.items()]
    )
