"""DPO's gain over the reference with intervals over *stories*, combined over seeds, and Holm across schemes.

A test story gives one pair per scheme (more when pairs repeat), and every seed scores the same stories, so
pairs are not independent: two pairs of one story share its prompt and continuation, and the seeds' models
were all trained on the same stories. The unit that was sampled is the story, so the bootstrap resamples
stories and keeps all pairs of a story (and every seed's scores of them): a cluster bootstrap.

Seeds are combined as a fixed average: the gain is the mean over seeds of each seed's mean over its pairs of
d = policy_correct - reference_correct (each seed against its own SFT reference). The interval covers the
sampling of stories for that average, not the spread of seeds (report the per-seed gains beside it: with 3
seeds, a bootstrap or t interval over seeds would say little). The p-value is the one-sample t-test over
stories of the seed-averaged story means (Student t; scipy's `ttest_1samp` on the same values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from picollm.compare.stats import holm, t_sf


@dataclass(frozen=True)
class StoryGain:
    gain: float  # mean over seeds of the mean over pairs of policy - reference correct
    ci_low: float
    ci_high: float
    p: float  # two-sided, story-level t-test; NaN without a noise estimate (< 2 stories or no variance)
    stories: int
    pairs: int  # pairs per seed (summed over seeds / seeds)
    seed_gains: tuple[float, ...]


def story_sums(d: Sequence[np.ndarray], stories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(story ids, sums (K, S), counts (K, S)): each seed k's sum of d and number of pairs per story.
    `d[k]` and `stories[k]` are seed k's per-pair differences and story ids (seeds may hold different pairs)."""
    if len(d) == 0 or len(d) != len(stories):
        raise ValueError("story_sums needs one d and one stories array per seed")
    ids = np.unique(np.concatenate([np.asarray(s) for s in stories]))
    sums, counts = np.zeros((len(d), len(ids))), np.zeros((len(d), len(ids)))
    for k, (dk, sk) in enumerate(zip(d, stories, strict=True)):
        dk, col = np.asarray(dk, dtype=np.float64), np.searchsorted(ids, np.asarray(sk))
        if dk.shape != col.shape:
            raise ValueError(f"seed {k}: {dk.size} differences but {col.size} story ids")
        np.add.at(sums[k], col, dk)
        np.add.at(counts[k], col, 1.0)
    return ids, sums, counts


def story_bootstrap(
    d: Sequence[np.ndarray],
    stories: Sequence[np.ndarray],
    n_boot: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(gain, low, high): the seed-averaged gain and its percentile interval, resampling stories with
    replacement (the same draw for every seed) and keeping all pairs of a drawn story."""
    _, sums, counts = story_sums(d, stories)
    if counts.sum() == 0:
        raise ValueError("story_bootstrap needs at least one pair")
    # (n_boot, S): how often each story is drawn; a seed's resampled mean is (W @ sums_k) / (W @ counts_k)
    rng = np.random.default_rng(seed)
    n = sums.shape[1]
    w = np.zeros((n_boot, n))
    np.add.at(w, (np.repeat(np.arange(n_boot), n), rng.integers(0, n, size=n_boot * n)), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = (w @ sums.T) / (w @ counts.T)  # (n_boot, K); NaN when a seed has no pair among the drawn
    means = np.nanmean(per_seed, axis=1)
    gain = float(np.mean(sums.sum(1) / counts.sum(1)))
    alpha = (1 - level) / 2
    return gain, float(np.nanquantile(means, alpha)), float(np.nanquantile(means, 1 - alpha))


def story_t_p(d: Sequence[np.ndarray], stories: Sequence[np.ndarray]) -> float:
    """Two-sided p of H0 "gain 0" from the one-sample t-test over stories of x_s = mean over seeds of story s's
    mean difference. No variance across stories: 1 when every x_s is 0, else NaN (no noise estimate)."""
    _, sums, counts = story_sums(d, stories)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.nanmean(sums / counts, axis=0)  # (S,): seeds without a pair of story s are left out
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return math.nan
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):  # constant up to rounding: a t of 1e15 would be meaningless
        return 1.0 if abs(mean) <= 1e-12 else math.nan
    return min(1.0, 2.0 * t_sf(abs(mean) / (sd / math.sqrt(len(x))), len(x) - 1.0))


def story_gain(
    d: Sequence[np.ndarray], stories: Sequence[np.ndarray], n_boot: int = 4000, level: float = 0.95, seed: int = 0
) -> StoryGain:
    gain, lo, hi = story_bootstrap(d, stories, n_boot, level, seed)
    seed_gains = tuple(float(np.mean(dk)) for dk in d)
    ids, _, counts = story_sums(d, stories)
    return StoryGain(gain, lo, hi, story_t_p(d, stories), len(ids), round(counts.sum() / len(d)), seed_gains)


@dataclass(frozen=True)
class SeedScores:
    """One seed's test pairs: story id, scheme, and whether reference and policy rank the chosen one higher."""

    uids: np.ndarray
    schemes: np.ndarray
    reference_correct: np.ndarray
    policy_correct: np.ndarray


def confirmation_rows(
    seeds: Sequence[SeedScores], headline: Sequence[str], n_boot: int = 4000, level: float = 0.95, seed: int = 0
) -> list[dict[str, float | str | bool]]:
    """Per scheme (and the headline schemes pooled, and all): reference and DPO accuracy (mean over seeds),
    gain with its story-bootstrap CI, the story t-test p and, for the `headline` schemes only, Holm's
    adjustment across them. Rows of the headline schemes first."""
    schemes = sorted({str(s) for sc in seeds for s in sc.schemes}, key=lambda s: (s not in headline, s))
    groups: list[tuple[str, set[str]]] = [(s, {s}) for s in schemes]
    if len(headline) > 1:
        groups.append(("headline (pooled)", set(headline)))
    groups.append(("all", set(schemes)))
    rows: list[dict[str, float | str | bool]] = []
    for name, members in groups:
        sel = [np.isin(sc.schemes, list(members)) for sc in seeds]
        d = [
            sc.policy_correct[m].astype(float) - sc.reference_correct[m].astype(float)
            for sc, m in zip(seeds, sel, strict=True)
        ]
        ids = [sc.uids[m] for sc, m in zip(seeds, sel, strict=True)]
        g = story_gain(d, ids, n_boot, level, seed)
        rows.append(
            {
                "scheme": name,
                "headline": name in headline,
                "stories": g.stories,
                "pairs": g.pairs,
                "reference_accuracy": float(
                    np.mean([sc.reference_correct[m].mean() for sc, m in zip(seeds, sel, strict=True)])
                ),
                "accuracy": float(np.mean([sc.policy_correct[m].mean() for sc, m in zip(seeds, sel, strict=True)])),
                "gain": g.gain,
                "ci_low": g.ci_low,
                "ci_high": g.ci_high,
                "seed_gain_min": min(g.seed_gains),
                "seed_gain_max": max(g.seed_gains),
                "p": g.p,
                "p_holm": math.nan,
            }
        )
    primary = [r for r in rows if r["headline"]]
    for r, p in zip(primary, holm([float(r["p"]) for r in primary]), strict=True):
        r["p_holm"] = p
    return rows
