"""Statistics over seeds, by hand (scipy is not a dependency; the tests check against it): Student-t
intervals; the paired t-test on per-seed differences and Welch's test; TOST equivalence within a margin;
Holm's step-down correction within a family; a sequence-level bootstrap for one run on a fixed test set;
aggregation of per-run metrics and pointwise bands of curves.

Every comparison is softmax (the baseline, `a`) against linear (`b`); a difference is linear - softmax.
A difference whose spread over the seeds is zero to rounding (`NOISE_RTOL`) has no noise estimate: no p, no
interval (picollm.compare.verdicts turns the p-values into verdicts and says why there is none).

Only numpy and math, and two constants (the reference pair, BOOTSTRAP_MIN_RUNS).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from picollm.config.compare import BOOTSTRAP_MIN_RUNS  # why 10: its comment (validation refuses fewer)
from picollm.model.mixers import REFERENCE_PAIR

MODELS = REFERENCE_PAIR  # (baseline, variant) of the two-model API: the registry's reference pair


# --------------------------------------------------------------------------------------------------
# Student t


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
    """t interval mean +- t_{(1+c)/2, n-1} s / sqrt(n), or a percentile bootstrap of the mean (the t interval
    below BOOTSTRAP_MIN_RUNS values, where the bootstrap undercovers)."""
    if method not in ("t", "bootstrap"):
        raise ValueError(f"unknown interval method {method!r}")
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, n)
    std = float(x.std(ddof=1))
    if method == "t" or n < BOOTSTRAP_MIN_RUNS:
        h = t_ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
        return Interval(mean, mean - h, mean + h, std, n)
    means = x[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(mean, float(low), float(high), std, n)


def _finite(values: Sequence[float]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


# Below this fraction of the compared values' magnitude, a standard deviation is rounding, not noise. Metrics
# are float32 means (relative error <= 2^-24 = 6e-8 each), so the same count difference on every seed (e.g.
# accuracies [0.625, 0.7175] vs [0.623125, 0.715625], -3 answers of 1,600 on both) differs in its last bits
# and would otherwise give an infinite-looking t (p 1.9e-14 "better"). The floor is relative to the values,
# not to the difference: their rounding error is what spreads the differences, whatever their size. A real
# spread of one answer in N targets is 1/N of an accuracy, far above 1e-6 for any test set below 10^6 targets.
NOISE_RTOL = 1e-6


def _spread(values: np.ndarray, scale: float) -> float:
    """Standard deviation (ddof 1) of `values`, 0 when it is below NOISE_RTOL * `scale` (rounding only)."""
    sd = float(values.std(ddof=1))
    return 0.0 if sd <= NOISE_RTOL * scale else sd


def _scale(*arrays: np.ndarray) -> float:
    return max((float(np.abs(a).max()) for a in arrays if len(a)), default=0.0)


# --------------------------------------------------------------------------------------------------
# The difference linear - softmax: paired t or Welch, TOST, Holm


@dataclass(frozen=True)
class TStat:
    """Ingredients of a t statistic for the difference linear - softmax: mean, standard error, df."""

    mean: float
    se: float
    df: float
    n: int  # pairs (paired) or the smaller number of runs a side (Welch)


def paired_stat(a: Sequence[float], b: Sequence[float]) -> TStat | None:
    """Paired by position: d_i = b_i - a_i over the pairs with both values finite; se = s_d / sqrt(n),
    df = n - 1 (se 0 when s_d is rounding: `_spread`). None with fewer than 2 pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    x = np.asarray([math.nan if v is None else v for v in a], dtype=float)
    y = np.asarray([math.nan if v is None else v for v in b], dtype=float)
    both = np.isfinite(x) & np.isfinite(y)
    d = (y - x)[both]
    if len(d) < 2:
        return None
    sd = _spread(d, _scale(x[both], y[both]))
    return TStat(float(d.mean()), sd / math.sqrt(len(d)), len(d) - 1.0, len(d))


def welch_stat(a: Sequence[float], b: Sequence[float]) -> TStat | None:
    """Unpaired, unequal variances: se = sqrt(s_a^2/n_a + s_b^2/n_b), Welch-Satterthwaite df (a side's s is 0
    when it is rounding: `_spread`). None with fewer than 2 finite values a side."""
    x, y = _finite(a), _finite(b)
    if len(x) < 2 or len(y) < 2:
        return None
    scale = _scale(x, y)
    vx, vy = _spread(x, scale) ** 2 / len(x), _spread(y, scale) ** 2 / len(y)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1)) if vx + vy > 0 else len(x) + len(y) - 2.0
    return TStat(float(y.mean() - x.mean()), math.sqrt(vx + vy), float(df), min(len(x), len(y)))


def two_sided_p(s: TStat) -> float:
    """p of H0: mean difference 0. NaN without a noise estimate (se 0: e.g. seeds whose discrete accuracies
    differ by the same step, or identical runs): an infinite t would call a one-token difference significant,
    and identical seeds say nothing about the next one."""
    if s.se == 0:
        return math.nan
    return min(1.0, 2.0 * t_sf(abs(s.mean / s.se), s.df))


def tost_p(s: TStat, margin: float) -> float:
    """Two one-sided tests of equivalence within ±margin: max of p_lower (H0: difference <= -margin,
    P(T > (mean + margin) / se)) and p_upper (H0: difference >= margin, P(T < (mean - margin) / se)).
    NaN without a noise estimate (se 0), as `two_sided_p`: two identical seeds are not evidence of equivalence."""
    if s.se == 0:
        return math.nan
    return max(t_sf((s.mean + margin) / s.se, s.df), t_sf((margin - s.mean) / s.se, s.df))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's unequal-variance t-test; NaN with fewer than 2 values a side."""
    s = welch_stat(a, b)
    return math.nan if s is None else two_sided_p(s)


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test (pairs by position); NaN with fewer than 2 pairs."""
    s = paired_stat(a, b)
    return math.nan if s is None else two_sided_p(s)


@dataclass(frozen=True)
class Difference:
    """linear - softmax of one metric: mean with its t interval, the test used ("paired" or "welch"), its
    two-sided p, the TOST p of equivalence within ±margin, and Welch's p (always, for reference).
    p-values are unadjusted; `holm_table` adjusts them within a table. No noise estimate (`noise` False: se 0,
    the same difference on every seed to rounding): p and p_tost NaN, low = high = NaN (no interval)."""

    test: str
    mean: float
    low: float
    high: float
    se: float
    df: float
    n: int
    p: float
    p_tost: float
    welch_p: float
    margin: float

    @property
    def noise(self) -> bool:
        """The runs estimate the noise of the difference (se > 0): the tests and the interval exist."""
        return self.se > 0


def difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95, margin: float = 0.01, paired: bool = True
) -> Difference | None:
    """Paired t (when `paired` and both sides have as many values) or Welch; None when untestable."""
    paired = paired and len(a) == len(b)
    s = paired_stat(a, b) if paired else welch_stat(a, b)
    if s is None:
        return None
    h = t_ppf(0.5 + confidence / 2, s.df) * s.se if s.se > 0 else math.nan
    return Difference(
        test="paired" if paired else "welch",
        mean=s.mean,
        low=s.mean - h,
        high=s.mean + h,
        se=s.se,
        df=s.df,
        n=s.n,
        p=two_sided_p(s),
        p_tost=tost_p(s, margin),
        welch_p=welch_p(a, b),
        margin=margin,
    )


def differences(
    runs: dict[str, list[dict[str, float]]],
    confidence: float = 0.95,
    margin: float = 0.01,
    margins: dict[str, float] | None = None,
    test: str = "paired",
    paired: bool = True,
    baseline: str = MODELS[0],
    variant: str = MODELS[1],
) -> dict[str, Difference]:
    """Difference `variant` - `baseline` of every metric both report (and can be tested). The runs are paired
    by position (seed order) when `test` is "paired", the design is `paired` and both sides have as many runs;
    Welch's test otherwise. `margins` overrides the equivalence margin per metric name."""
    if test not in ("paired", "welch"):
        raise ValueError(f"unknown test {test!r}")
    a, b = runs[baseline], runs[variant]
    use_paired = test == "paired" and paired and len(a) == len(b)
    keys = sorted({k for m in a for k in m} & {k for m in b for k in m})
    out: dict[str, Difference] = {}
    for k in keys:
        if use_paired:
            x, y = [m.get(k, math.nan) for m in a], [m.get(k, math.nan) for m in b]
        else:
            x, y = [m[k] for m in a if k in m], [m[k] for m in b if k in m]
        d = difference(x, y, confidence, (margins or {}).get(k, margin), use_paired)
        if d is not None:
            out[k] = d
    return out


def holm(pvals: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of k p-values becomes max_{j <= i} min(1, (k - j + 1) p_(j))
    (monotone in p). NaN entries stay NaN and do not count towards k."""
    p = np.asarray(pvals, dtype=float)
    out = np.full(len(p), math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    running = 0.0
    for i, j in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (len(idx) - i) * float(p[j])))
        out[j] = running
    return out.tolist()


def holm_table(diffs: dict[str, Difference], keys: Sequence[str]) -> dict[str, tuple[float, float]]:
    """(p, p_TOST) of the tested `keys`, each family Holm-adjusted within this table."""
    tested = [k for k in dict.fromkeys(keys) if k in diffs]
    p = holm([diffs[k].p for k in tested])
    p_tost = holm([diffs[k].p_tost for k in tested])
    return {k: (p[i], p_tost[i]) for i, k in enumerate(tested)}


# --------------------------------------------------------------------------------------------------
# One run on a fixed test set: a bootstrap over its sequences


def sequence_counts(correct: Any, valid: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence correct and target counts from per-target (N, L-1) correctness and validity masks
    (numpy arrays or CPU tensors, e.g. compare.predict's `correct` and compare.valid_targets)."""
    c, v = np.asarray(correct, dtype=bool), np.asarray(valid, dtype=bool)
    return (c & v).sum(1), v.sum(1)


def sequence_bootstrap_ci(
    correct_per_seq: Sequence[float],
    targets_per_seq: Sequence[float],
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> Interval:
    """Accuracy sum(correct) / sum(targets) with a percentile bootstrap interval over sequences (resampled
    with replacement): the test-set sampling noise of one run, not seed-to-seed variation. Two models on
    the same sequences: correct_b - correct_a per sequence gives the paired interval of their difference.
    n is the number of sequences, std the standard deviation of the bootstrap accuracies."""
    c, t = np.asarray(correct_per_seq, dtype=float), np.asarray(targets_per_seq, dtype=float)
    if c.ndim != 1 or c.shape != t.shape:
        raise ValueError(f"need two equal-length 1-d arrays, got shapes {c.shape} and {t.shape}")
    n = len(c)
    if n == 0 or t.sum() == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    chunk = max(1, 2**22 // n)  # resamples per draw: at most ~4M indices in memory
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        with np.errstate(invalid="ignore", divide="ignore"):
            boot[start : start + len(idx)] = c[idx].sum(1) / t[idx].sum(1)
    boot = boot[np.isfinite(boot)]  # resamples of target-less sequences only
    low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(c.sum() / t.sum()), float(low), float(high), float(boot.std()), n)


# --------------------------------------------------------------------------------------------------
# Aggregation over seeds


Aggregate = dict[str, dict[str, Interval]]  # model -> metric -> interval over its runs
SeqIntervals = dict[str, dict[str, Interval]]  # model or "diff" -> metric -> sequence bootstrap


def aggregate(
    runs: dict[str, list[dict[str, float]]], confidence: float = 0.95, method: str = "t", n_boot: int = 10000
) -> Aggregate:
    out: Aggregate = {}
    for att, per_run in runs.items():
        keys = sorted({k for m in per_run for k in m})
        out[att] = {k: mean_ci([m[k] for m in per_run if k in m], confidence, method, n_boot) for k in keys}
    return out


def p_values(runs: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Welch p (the reference pair, MODELS) of every metric both models report."""
    a, b = runs[MODELS[0]], runs[MODELS[1]]
    keys = sorted({k for m in a for k in m} & {k for m in b for k in m})
    return {k: welch_p([m[k] for m in a if k in m], [m[k] for m in b if k in m]) for k in keys}


def aggregate_metrics(
    agg: Aggregate, diffs: dict[str, Difference], seq_ci: SeqIntervals | None = None
) -> dict[str, float]:
    """Flat MLflow metrics of the parent run: {model}/{metric}/{mean,ci_low,ci_high};
    diff/{metric}/{mean,ci_low,ci_high,p,p_tost,welch_p} (diff = linear - softmax, p of the test used,
    unadjusted); {model|diff}/{metric}/{seq_ci_low,seq_ci_high} for single-run sequence-bootstrap intervals."""
    out: dict[str, float] = {}
    for att, metrics in agg.items():
        for k, iv in metrics.items():
            out |= {f"{att}/{k}/mean": iv.mean, f"{att}/{k}/ci_low": iv.low, f"{att}/{k}/ci_high": iv.high}
    base, var = MODELS
    for k in agg.get(base, {}).keys() & agg.get(var, {}).keys():
        out[f"diff/{k}/mean"] = agg[var][k].mean - agg[base][k].mean
    for k, d in diffs.items():
        out |= {
            f"diff/{k}/mean": d.mean,
            f"diff/{k}/ci_low": d.low,
            f"diff/{k}/ci_high": d.high,
            f"diff/{k}/p": d.p,
            f"diff/{k}/p_tost": d.p_tost,
            f"diff/{k}/welch_p": d.welch_p,
        }
    for side, metrics in (seq_ci or {}).items():
        for k, iv in metrics.items():
            out |= {f"{side}/{k}/seq_ci_low": iv.low, f"{side}/{k}/seq_ci_high": iv.high}
    return {k: v for k, v in out.items() if math.isfinite(v)}


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
