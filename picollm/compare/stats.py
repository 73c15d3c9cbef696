"""Statistics over seeds: Student-t intervals and Welch's test (by hand: scipy is not a dependency),
aggregation of per-run metrics into intervals and p-values, pointwise bands of curves, and the plain-word
verdicts of the summary table.

Every comparison is softmax (the baseline, `a`) against linear (`b`); a difference is linear - softmax.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

MODELS = ("softmax", "linear")


# --------------------------------------------------------------------------------------------------
# Student t and Welch's test


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


@functools.lru_cache(maxsize=256)  # called per metric and per position with a handful of (p, df)
def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t (bisection on the CDF; 1e-12 accurate, plenty for intervals)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while 1.0 - t_sf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - t_sf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean of per-run values with a two-sided confidence interval (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    std: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high


def mean_ci(
    values: Sequence[float], confidence: float = 0.95, method: str = "t", n_boot: int = 10000, seed: int = 0
) -> Interval:
    """t interval mean +- t_{(1+c)/2, n-1} s / sqrt(n), or a percentile bootstrap of the mean."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, n)
    std = float(x.std(ddof=1))
    if method == "t":
        h = t_ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
        return Interval(mean, mean - h, mean + h, std, n)
    if method != "bootstrap":
        raise ValueError(f"unknown interval method {method!r}")
    means = x[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(mean, float(low), float(high), std, n)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's unequal-variance t-test; NaN with fewer than 2 values a side."""
    x = np.asarray([v for v in a if math.isfinite(v)], dtype=float)
    y = np.asarray([v for v in b if math.isfinite(v)], dtype=float)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    diff = float(y.mean() - x.mean())
    if vx + vy == 0:  # every seed gave the same value on both sides
        return 1.0 if diff == 0 else 0.0
    t = diff / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    return min(1.0, 2.0 * t_sf(abs(t), df))


# --------------------------------------------------------------------------------------------------
# Aggregation over seeds


Aggregate = dict[str, dict[str, Interval]]  # model -> metric -> interval over its runs


def aggregate(
    runs: dict[str, list[dict[str, float]]], confidence: float = 0.95, method: str = "t", n_boot: int = 10000
) -> Aggregate:
    out: Aggregate = {}
    for att, per_run in runs.items():
        keys = sorted({k for m in per_run for k in m})
        out[att] = {k: mean_ci([m[k] for m in per_run if k in m], confidence, method, n_boot) for k in keys}
    return out


def p_values(runs: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Welch p (softmax vs linear) of every metric both models report."""
    a, b = runs["softmax"], runs["linear"]
    keys = sorted({k for m in a for k in m} & {k for m in b for k in m})
    return {k: welch_p([m[k] for m in a if k in m], [m[k] for m in b if k in m]) for k in keys}


def aggregate_metrics(agg: Aggregate, pvals: dict[str, float]) -> dict[str, float]:
    """Flat MLflow metrics of the parent run: {model}/{metric}/{mean,ci_low,ci_high} and
    diff/{metric}/{mean,welch_p} (diff = linear - softmax)."""
    out: dict[str, float] = {}
    for att, metrics in agg.items():
        for k, iv in metrics.items():
            out |= {f"{att}/{k}/mean": iv.mean, f"{att}/{k}/ci_low": iv.low, f"{att}/{k}/ci_high": iv.high}
    for k, p in pvals.items():
        out[f"diff/{k}/mean"] = agg["linear"][k].mean - agg["softmax"][k].mean
        out[f"diff/{k}/welch_p"] = p
    return {k: v for k, v in out.items() if math.isfinite(v)}


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


def fmt_interval(iv: Interval | None, digits: int = 3) -> str:
    if iv is None or not math.isfinite(iv.mean):
        return "-"
    if not math.isfinite(iv.low):
        return f"{iv.mean:.{digits}f}"
    if abs(iv.mean - (iv.low + iv.high) / 2) < 1e-9 * max(1.0, abs(iv.mean)):
        return f"{iv.mean:.{digits}f} ± {iv.half_width:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def verdict(a: Interval | None, b: Interval | None, p: float, alpha: float, higher_better: bool) -> str:
    """Plain words: `within noise` unless Welch's test rejects equal means at level alpha."""
    if a is None or b is None or not math.isfinite(p):
        return "n/a (fewer than 2 runs a side)"
    if p > alpha:
        return "within noise"
    better = "linear" if (b.mean > a.mean) == higher_better else "softmax"
    return f"{better} better"


def summary_rows(
    agg: Aggregate, pvals: dict[str, float], keys: list[tuple[str, str, bool]], alpha: float
) -> list[dict[str, str]]:
    rows = []
    for key, label, higher in keys:
        a, b = agg["softmax"].get(key), agg["linear"].get(key)
        if a is None and b is None:
            continue
        p = pvals.get(key, math.nan)
        diff = b.mean - a.mean if a is not None and b is not None else math.nan
        rows.append(
            {
                "metric": label,
                "softmax": fmt_interval(a),
                "linear": fmt_interval(b),
                "diff": f"{diff:+.3f}" if math.isfinite(diff) else "-",
                "welch_p": f"{p:.3f}" if math.isfinite(p) else "-",
                "cis_overlap": ("yes" if a.overlaps(b) else "no")
                if a is not None and b is not None and math.isfinite(a.low) and math.isfinite(b.low)
                else "-",
                "verdict": verdict(a, b, p, alpha, higher),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Curves over seeds


def band(curves: list[np.ndarray], confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise mean and t interval of equal-length curves (NaN-padded); no band for one curve."""
    width = max(len(c) for c in curves)
    x = np.full((len(curves), width), np.nan)  # (curves, positions), NaN past a curve's end
    for i, c in enumerate(curves):
        x[i, : len(c)] = c
    n = np.isfinite(x).sum(0)
    with quiet_nan():
        mean = np.nanmean(x, 0)
        sd = np.nanstd(x, 0, ddof=1) if len(curves) > 1 else np.full(width, np.nan)
    q = np.array([t_ppf(0.5 + confidence / 2, k - 1) if k > 1 else np.nan for k in n])
    h = q * sd / np.sqrt(np.maximum(n, 1))
    return mean, mean - h, mean + h


@contextmanager
def quiet_nan() -> Iterator[None]:
    """Silence numpy's warnings about all-NaN columns (positions that no run reaches)."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
