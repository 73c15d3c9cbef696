"""The `reference:` section of a training config: the results a run of the shipped config should reproduce
(the numbers the docs quote), each with the tolerance the seeds' spread allows, and where they came from."""

from __future__ import annotations

from pydantic import Field

from picollm.config.base import StrictModel


class ReferenceMetric(StrictModel):
    """One reference number: a run reproduces it when |its value - value| <= tolerance."""

    value: float
    """the metric of the reference run (the config as shipped, its default seed)"""
    tolerance: float = Field(gt=0)
    """how far a run may land from `value` and still match: set from the spread over seeds (see `tolerance_from`),
    so it holds on any machine, CPU or GPU, whose runs differ only as seeds do"""


class ReferenceResults(StrictModel):
    """The results a run of this config should reproduce. Every run of a config with this section ends with a
    verdict (matches, or the metrics that drifted), printed and logged as the run's tag `reproduced`
    (true / false / partial) and `reproduced.<metric>` (true / false / missing); a config without it gets
    no check."""

    metrics: dict[str, ReferenceMetric] = Field(min_length=1)
    """metric name as logged (e.g. test/accuracy, val/loss) -> its value and tolerance"""
    source: str = Field(min_length=1)
    """where the values came from: the command, commit and date of the reference run"""
    tolerance_from: str = Field("")
    """how the tolerances were set: the seeds run and the rule, e.g. max(3 sd, ...) over train.seed 0-4"""
