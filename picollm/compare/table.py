"""The comparison tables: every variant against the baseline (the first variant), metric by metric.

`differences_vs_baseline` tests each variant's runs against the baseline's (paired by seed, or Welch:
`stats.differences`); `comparison_rows` turns them into table rows, one per (metric, variant other than the
baseline), with p and p TOST Holm-adjusted within their family and the verdict of `verdicts.verdict`. In the
headline the families are the declared primaries (compare.primaries, every variant's tests of them) and the
rest (secondary); elsewhere a table is one family. `summary_rows` is the two-model form (softmax, linear) of
the same table. Formatting of intervals and p-values lives here too. Only numpy and math, like `stats`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from typing import Any

from picollm.compare.stats import MODELS, Aggregate, Difference, Interval, SeqIntervals, differences, holm
from picollm.compare.verdicts import NA_PAIRS, NA_RUNS, verdict

PRIMARY, SECONDARY = "primary", "secondary"

Comparisons = dict[str, dict[str, Difference]]  # variant -> metric -> variant - baseline


def diff_side(variant: str) -> str:
    """The `SeqIntervals` key of the sequence-bootstrap interval of `variant` - baseline."""
    return f"diff_{variant}"


def differences_vs_baseline(runs: dict[str, list[dict[str, float]]], **options: Any) -> Comparisons:
    """`stats.differences` (its `options`: confidence, margin, margins, test, paired) of every variant but the
    first (the baseline, the first key of `runs`) against it."""
    baseline, *others = list(runs)
    return {v: differences(runs, **options, baseline=baseline, variant=v) for v in others}


def headline_keys(factors: list[int]) -> list[tuple[str, str, bool]]:
    """(metric, label, higher is better) of the summary table."""
    rows = [
        ("eval/test/loss", "test loss (NLL)", False),
        ("eval/test/accuracy", "test accuracy", True),
        ("eval/test/accuracy_predictable", "test acc. (predictable pos.)", True),
        ("eval/test/accuracy_vs_ceiling", "test acc. / Bayes ceiling", True),
        ("eval/test/ece", "test ECE", False),
    ]
    for f in sorted(factors):
        if f > 1:
            rows.append((f"lengen/x{f}/beyond/accuracy", f"acc. beyond train length, {f}x", True))
    return rows


SHORT_LABELS = {  # the terminal's table (80 columns): a label of at most 15 characters per headline metric
    "eval/test/loss": "test loss",
    "eval/test/accuracy": "test acc.",
    "eval/test/accuracy_predictable": "acc. predict.",
    "eval/test/accuracy_vs_ceiling": "acc. / ceiling",
    "eval/test/ece": "test ECE",
}


def short_label(key: str, label: str) -> str:
    """A headline metric's label for the terminal: SHORT_LABELS, beyond-length and MQAR rows, else `label`."""
    if key in SHORT_LABELS:
        return SHORT_LABELS[key]
    if m := re.fullmatch(r"lengen/x(\d+)/beyond/accuracy", key):
        return f"beyond {m[1]}x acc."
    if m := re.fullmatch(r"recall/pairs(\d+)/accuracy", key):
        return f"MQAR {m[1]} pairs"
    return label


def fmt_interval(iv: Interval | None, digits: int = 3, sign: str = "") -> str:
    """mean ± half-width (symmetric) or mean [low, high]; `sign="+"` for differences."""
    if iv is None or not math.isfinite(iv.mean):
        return "-"
    f = f"{sign}.{digits}f"
    if not math.isfinite(iv.low):
        return f"{iv.mean:{f}}"
    if abs(iv.mean - (iv.low + iv.high) / 2) < 1e-9 * max(1.0, abs(iv.mean)):
        return f"{iv.mean:{f}} ± {iv.half_width:.{digits}f}"
    return f"{iv.mean:{f}} [{iv.low:{f}}, {iv.high:{f}}]"


def fmt_p(p: float) -> str:
    return "-" if not math.isfinite(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def diff_cells(
    d: Difference | None,
    adjusted: tuple[float, float] | None,
    alpha: float,
    higher_better: bool,
    fallback: Interval | None = None,
    names: tuple[str, str] = MODELS,
    untested: str = NA_RUNS,
) -> dict[str, str]:
    """Table cells of a difference: "diff" (mean with its interval), "p" and "p_tost" (as adjusted),
    "test", "margin" and "verdict" (`names` = (baseline, variant)). Untested (`d` None): the `fallback`
    interval (e.g. a sequence bootstrap) or point, and the verdict `untested` (why there is no test)."""
    if d is None or adjusted is None:
        cells = {"diff": fmt_interval(fallback, sign="+"), "p": "-", "p_tost": "-", "test": "-", "margin": "-"}
        return {**cells, "verdict": untested}
    p, p_tost = adjusted
    return {
        "diff": fmt_interval(Interval(d.mean, d.low, d.high, d.se, d.n), sign="+"),
        "p": fmt_p(p),
        "p_tost": fmt_p(p_tost),
        "test": d.test,
        "margin": f"{d.margin:g}",
        "verdict": verdict(d.mean, p, p_tost, d.margin, alpha, higher_better, names),
    }


def side(agg: Aggregate, seq_ci: SeqIntervals | None, att: str, key: str) -> Interval | None:
    """The interval of a model's metric: over its runs, or its sequence bootstrap when it has one run."""
    iv = agg.get(att, {}).get(key)
    boot = (seq_ci or {}).get(att, {}).get(key)
    return boot if iv is not None and iv.n == 1 and boot is not None else iv


def holm_grid(diffs: Comparisons, keys: Sequence[str]) -> dict[tuple[str, str], tuple[float, float]]:
    """(p, p_TOST) of every tested (variant, metric) of `keys`, each Holm-adjusted over the whole table."""
    tested = [(v, k) for v, per in diffs.items() for k in dict.fromkeys(keys) if k in per]
    p = holm([diffs[v][k].p for v, k in tested])
    p_tost = holm([diffs[v][k].p_tost for v, k in tested])
    return {vk: (p[i], p_tost[i]) for i, vk in enumerate(tested)}


def holm_families(
    diffs: Comparisons, keys: Sequence[str], primaries: Collection[str]
) -> dict[tuple[str, str], tuple[float, float]]:
    """`holm_grid` over the declared primaries of `keys` (every variant's tests of them) and, separately, over
    the rest (secondary): a primary's correction does not grow with the secondary metrics of the table."""
    return holm_grid(diffs, [k for k in keys if k in primaries]) | holm_grid(
        diffs, [k for k in keys if k not in primaries]
    )


def untested_reason(agg: Aggregate, base: str, variant: str, key: str) -> str:
    """Why a metric both sides may report has no test: fewer than 2 runs with a value on a side, else (paired)
    fewer than 2 seeds with a value on both sides."""
    n = [iv.n if (iv := agg.get(v, {}).get(key)) is not None else 0 for v in (base, variant)]
    return NA_RUNS if min(n) < 2 else NA_PAIRS


def comparison_rows(
    agg: Aggregate,
    diffs: Comparisons,
    keys: list[tuple[str, str, bool]],
    alpha: float,
    seq_ci: SeqIntervals | None = None,
    variants: Sequence[str] | None = None,
    primaries: Collection[str] = (),
) -> list[dict[str, str]]:
    """One row per (metric, variant other than the baseline `variants[0]`): "metric" (label), "short" (its
    terminal label), "key", "role" (primary or secondary), "variant", "baseline", "value" and "base_value" (also
    under the two names), "diff", "p", "p_tost" (Holm-adjusted within the row's family: the `primaries`, or the
    rest), "test", "margin" and "verdict". Primaries first, each family in the order of `keys`; metrics no
    variant reports are left out."""
    names = list(variants or agg)
    base, others = names[0], names[1:]
    present = [(k, label, hb) for k, label, hb in keys if any(k in agg.get(v, {}) for v in names)]
    present.sort(key=lambda item: item[0] not in primaries)  # stable: primaries first
    adjusted = holm_families(diffs, [k for k, _, _ in present], primaries)
    rows = []
    for key, label, higher in present:
        a = side(agg, seq_ci, base, key)
        for v in others:
            b = side(agg, seq_ci, v, key)
            fallback = (seq_ci or {}).get(diff_side(v), {}).get(key)
            if fallback is None and a is not None and b is not None:
                fallback = Interval(b.mean - a.mean, math.nan, math.nan, math.nan, 1)
            why = untested_reason(agg, base, v, key)
            d = diffs.get(v, {}).get(key)
            cells = diff_cells(d, adjusted.get((v, key)), alpha, higher, fallback, (base, v), why)
            values = {base: fmt_interval(a), v: fmt_interval(b)}
            role = PRIMARY if key in primaries else SECONDARY
            rows.append(
                {"metric": label, "short": short_label(key, label), "key": key, "role": role, "variant": v}
                | {"baseline": base, **values, **cells, "value": values[v], "base_value": values[base]}
                | {"base_mean": _mean(a), "mean": _mean(b)}
            )
    return rows


def _mean(iv: Interval | None) -> str:
    return "-" if iv is None or not math.isfinite(iv.mean) else f"{iv.mean:.3f}"


def summary_rows(
    agg: Aggregate,
    diffs: dict[str, Difference],
    keys: list[tuple[str, str, bool]],
    alpha: float,
    seq_ci: SeqIntervals | None = None,
    primaries: Collection[str] = (),
) -> list[dict[str, str]]:
    """The two-model headline table (MODELS, the reference pair: `diffs` = variant - baseline): one row per
    metric with "metric", the two names, "diff", "p", "p_tost" (Holm-adjusted within the row's family),
    "test", "margin", "role" and "verdict"."""
    seq = dict(seq_ci or {})
    if "diff" in seq:  # the two-model name of the difference's sequence bootstrap
        seq[diff_side(MODELS[1])] = seq.pop("diff")
    return comparison_rows(agg, {MODELS[1]: diffs}, keys, alpha, seq, MODELS, primaries)
