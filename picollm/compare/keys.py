"""What the `compare` parent run logs, as metrics (the headline numbers) and as MLflow tables (the tails).

MLflow draws one chart per metric key and groups the charts into sections by the key's prefix (all
but the last `/` part), and the run page gets slow with thousands of keys. So the parent holds a
bounded set of keys, each named metric first and variant last, so that every variant and the differences
sit side by side in one section. With two variants (baseline softmax, variant linear):

    eval/test/accuracy/softmax     eval/test/accuracy/softmax_ci_low   ...softmax_ci_high
    eval/test/accuracy/linear      eval/test/accuracy/linear_ci_low    ...linear_ci_high
    eval/test/accuracy/diff        eval/test/accuracy/diff_ci_low      ...diff_ci_high
    eval/test/accuracy/p           eval/test/accuracy/p_tost

With more (`compact`), means, differences and p only, for the `COMPACT_HEADLINE` metrics:

    eval/test/accuracy/<variant>   eval/test/accuracy/<variant>_diff   eval/test/accuracy/<variant>_p

for every headline metric (`stats.headline_keys`), the per-family test accuracy (`.../<family>/<variant>`),
the mean position curves (step = position), the efficiency sweep (step = length), the parameter counts
and the embedding summaries. Everything else (every metric of every split, family and length, with
its interval and test) goes to tables (`log_table` JSON, shown as tables in the artifact view) and
to the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from picollm.compare.stats import MODELS, Aggregate, Difference, SeqIntervals, band
from picollm.compare.table import Comparisons

MAX_PARENT_KEYS = 150  # the readable budget of the parent run (its chart view renders every key)
# With more than two variants the parent keeps these headline metrics (and the last headline row: the
# largest recall set, or the longest length); the others are in the tables and the report.
COMPACT_HEADLINE = ("eval/test/loss", "eval/test/accuracy", "eval/test/accuracy_predictable")

Columns = dict[str, list[Any]]


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def compact(variants: Sequence[str]) -> bool:
    """More than two variants: the parent keeps means, differences and p only (intervals go to tables)."""
    return len(variants) > 2


def diff_key(metric: str, variant: str, variants: Sequence[str], what: str = "diff") -> str:
    """The parent key of `variant` - baseline (`what`: diff, diff_ci_low, diff_ci_high, p or p_tost):
    `<metric>/<what>` with two variants (the one difference), `<metric>/<variant>_<what>` with more."""
    return f"{metric}/{what}" if len(variants) == 2 else f"{metric}/{variant}_{what}"


def headline_metrics(
    agg: Aggregate,
    diffs: Comparisons | dict[str, Difference],
    keys: Iterable[str],
    seq_ci: SeqIntervals | None = None,
    variants: Sequence[str] = MODELS,
) -> dict[str, float]:
    """Means with intervals of each variant and each variant's difference from the baseline (`variants[0]`)
    with its tests, for `keys`. `diffs`: variant -> metric -> Difference (a flat metric -> Difference is the
    two-model form, linear - softmax). More than two variants (`compact`): means, differences and p only."""
    if diffs and all(isinstance(d, Difference) for d in diffs.values()):
        diffs = {variants[-1]: diffs}  # type: ignore[dict-item]
    small = not compact(variants)
    base = variants[0]
    out: dict[str, float] = {}
    for k in keys:
        for att in variants:
            iv = agg.get(att, {}).get(k)
            if iv is not None:
                out[f"{k}/{att}"] = iv.mean
                if small:
                    out |= {f"{k}/{att}_ci_low": iv.low, f"{k}/{att}_ci_high": iv.high}
        for v in variants[1:]:
            if k in agg.get(base, {}) and k in agg.get(v, {}):
                out[diff_key(k, v, variants)] = agg[v][k].mean - agg[base][k].mean
            if (d := diffs.get(v, {}).get(k)) is not None:  # type: ignore[union-attr]
                out |= {diff_key(k, v, variants): d.mean, diff_key(k, v, variants, "p"): d.p}
                if small:
                    out |= {
                        diff_key(k, v, variants, "diff_ci_low"): d.low,
                        diff_key(k, v, variants, "diff_ci_high"): d.high,
                    }
                    out[diff_key(k, v, variants, "p_tost")] = d.p_tost
        if small:
            for name, per in (seq_ci or {}).items():  # single runs: sequence-bootstrap intervals instead
                side_name = "diff" if name.startswith("diff") else name
                if (iv := per.get(k)) is not None:
                    out |= {f"{k}/{side_name}_seq_ci_low": iv.low, f"{k}/{side_name}_seq_ci_high": iv.high}
    return _finite(out)


def holm_metrics(
    adjusted: dict[tuple[str, str], tuple[float, float]], primaries: Sequence[str], variants: Sequence[str]
) -> dict[str, float]:
    """The headline's Holm-adjusted p of each (variant, metric), the key naming its family:
    `<metric>/p_holm_primary` or `<metric>/p_holm_secondary` (more than two variants: `<metric>/<variant>_p_holm_
    primary`, primaries only, within the parent's key budget). `adjusted`: table.holm_families."""
    out = {}
    for (v, k), (p, _) in adjusted.items():
        role = "primary" if k in primaries else "secondary"
        if role == "primary" or not compact(variants):
            out[diff_key(k, v, variants, f"p_holm_{role}")] = p
    return _finite(out)


def family_metrics(
    agg: Aggregate, families: list[str], prefix: str = "eval/test/accuracy", variants: Sequence[str] = MODELS
) -> dict[str, float]:
    """Per-family means of each variant and their difference from the baseline: `<prefix>/<family>/<variant>`
    and (two variants only) `<prefix>/<family>/diff`."""
    out: dict[str, float] = {}
    for fam in families:
        k = f"{prefix}/{fam}"
        means = {att: agg[att][k].mean for att in variants if k in agg.get(att, {})}
        out |= {f"{k}/{att}": v for att, v in means.items()}
        if len(variants) == 2 and len(means) == 2:
            out[f"{k}/diff"] = means[variants[1]] - means[variants[0]]
    return _finite(out)


def curve_steps(
    curves: dict[str, dict[str, list[np.ndarray]]], names: Iterable[str]
) -> list[tuple[int, dict[str, float]]]:
    """The mean over runs of each variant's curve `name` as `<name>/<variant>`, one (step, values) per
    position (1-based): a line chart per curve, both variants in its section."""
    points: dict[int, dict[str, float]] = {}
    for name in names:
        for att, runs in curves.items():
            if name not in runs or not runs[name]:
                continue
            mean, _, _ = band(runs[name], 0.95)  # the mean only: the bands go to the curves table
            for i, v in enumerate(mean):
                if math.isfinite(v):
                    points.setdefault(i + 1, {})[f"{name}/{att}"] = float(v)
    return sorted(points.items())


def child_split(metrics: dict[str, float], families: list[str]) -> tuple[dict[str, float], Columns]:
    """A child run's evaluation: the metrics it logs (every overall number, and the test accuracy per family)
    and the table of all of them (`tables/evaluation.json`), per-family tails of every split and length included."""
    fams = set(families)
    logged = {
        k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] not in fams or k.startswith("eval/test/accuracy/")
    }
    items = sorted(metrics.items())
    return logged, {"metric": [k for k, _ in items], "value": [v for _, v in items]}


# --------------------------------------------------------------------------------------------------
# Tables


def summary_table(agg: Aggregate) -> Columns:
    """Every metric of every variant: mean, interval, spread and number of runs."""
    rows = [(att, k, iv) for att, per in agg.items() for k, iv in sorted(per.items())]
    return {
        "metric": [k for _, k, _ in rows],
        "model": [att for att, _, _ in rows],
        "mean": [iv.mean for _, _, iv in rows],
        "ci_low": [iv.low for _, _, iv in rows],
        "ci_high": [iv.high for _, _, iv in rows],
        "std": [iv.std for _, _, iv in rows],
        "n": [iv.n for _, _, iv in rows],
    }


def differences_table(diffs: Comparisons) -> Columns:
    """Every variant - baseline of every metric: interval, the test used and its p-values (unadjusted)."""
    items = [(k, d) for per in diffs.values() for k, d in sorted(per.items())]
    return {
        "metric": [k for k, _ in items],
        "variant": [v for v, per in diffs.items() for _ in per],
        "test": [d.test for _, d in items],
        "diff": [d.mean for _, d in items],
        "ci_low": [d.low for _, d in items],
        "ci_high": [d.high for _, d in items],
        "p": [d.p for _, d in items],
        "p_tost": [d.p_tost for _, d in items],
        "margin": [d.margin for _, d in items],
        "welch_p": [d.welch_p for _, d in items],
        "n": [d.n for _, d in items],
    }


def curves_table(curves: dict[str, dict[str, list[np.ndarray]]], confidence: float) -> Columns:
    """Every position curve of every variant: mean over runs with its band, per position."""
    out: Columns = {k: [] for k in ("curve", "model", "position", "mean", "ci_low", "ci_high")}
    for att, runs in curves.items():
        for name, per_run in sorted(runs.items()):
            mean, low, high = band(per_run, confidence)
            for i, (m, lo, hi) in enumerate(zip(mean, low, high, strict=True)):
                for col, v in zip(out, (name, att, i + 1, m, lo, hi), strict=True):
                    out[col].append(v)
    return out


def coverage_table(coverage: dict[str, dict[str, float]]) -> Columns:
    """How much of each evaluation set's values and transitions occur in training."""
    keys = sorted({k for c in coverage.values() for k in c})
    return {"set": list(coverage), **{k: [c.get(k, math.nan) for c in coverage.values()] for k in keys}}


def table_json_safe(columns: Columns) -> Columns:
    """NaN and infinities as None: MLflow's table JSON (and the UI) cannot show them otherwise."""
    return {k: [None if isinstance(v, float) and not math.isfinite(v) else v for v in vs] for k, vs in columns.items()}
