"""DPO's story-level statistics (picollm/dpo/stats.py) against scipy and hand computations, the one console
table within 80 columns, the report, and the reference log-prob heartbeat. All tiny: no training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from picollm.dpo.metrics import PairScores, gain_table, paired_bootstrap_ci
from picollm.dpo.stats import SeedScores, confirmation_rows, story_bootstrap, story_gain, story_t_p


def _scipy_cluster_ci(sums: np.ndarray, counts: np.ndarray, n: int = 20000) -> tuple[float, float]:
    res = sps.bootstrap(
        (sums, counts),
        lambda s, c, axis=-1: s.sum(axis=axis) / c.sum(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=n,
        method="percentile",
        random_state=np.random.default_rng(1),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def test_one_pair_per_story_matches_scipy_bootstrap_of_the_mean() -> None:
    rng = np.random.default_rng(0)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.15, 0.6, 0.25], size=150)
    gain, lo, hi = story_bootstrap([d], [np.arange(150)], n_boot=20000)
    ref = sps.bootstrap((d,), np.mean, n_resamples=20000, method="percentile", random_state=np.random.default_rng(1))
    assert gain == pytest.approx(d.mean(), abs=1e-12)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.006)


def test_unequal_story_sizes_match_scipy_ratio_bootstrap() -> None:
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 5, size=80)  # 1-4 pairs a story
    stories = np.repeat(np.arange(80), sizes)
    d = rng.choice([-1.0, 0.0, 1.0], size=stories.size)
    sums, counts = np.bincount(stories, weights=d), np.bincount(stories).astype(float)
    gain, lo, hi = story_bootstrap([d], [stories], n_boot=20000)
    s_lo, s_hi = _scipy_cluster_ci(sums, counts)
    assert gain == pytest.approx(d.mean(), abs=1e-12)  # the pooled mean over pairs, not the mean of story means
    assert (lo, hi) == pytest.approx((s_lo, s_hi), abs=0.01)


def test_cluster_interval_is_wider_than_the_pair_one_when_pairs_of_a_story_agree() -> None:
    rng = np.random.default_rng(3)
    per_story = rng.choice([-1.0, 0.0, 1.0], size=40)
    d, stories = np.repeat(per_story, 4), np.repeat(np.arange(40), 4)  # a story's 4 pairs: the same outcome
    _, lo, hi = story_bootstrap([d], [stories], n_boot=4000)
    _, p_lo, p_hi = paired_bootstrap_ci(np.clip(d, 0, 1), np.clip(-d, 0, 1), n_boot=4000)
    assert (hi - lo) > 1.6 * (p_hi - p_lo)  # ~sqrt(4) = 2 in theory
    # independent pairs: both intervals agree
    d2 = rng.choice([-1.0, 0.0, 1.0], size=160)
    _, lo2, hi2 = story_bootstrap([d2], [np.repeat(np.arange(40), 4)], n_boot=4000)
    _, q_lo, q_hi = paired_bootstrap_ci(np.clip(d2, 0, 1), np.clip(-d2, 0, 1), n_boot=4000)
    assert (hi2 - lo2) == pytest.approx(q_hi - q_lo, rel=0.25)


def test_seeds_are_averaged_and_resampled_together() -> None:
    # two seeds on the same 3 stories (hand computed): seed gains 2/4 and 0/4, gain = mean of seed means 0.25
    d = [np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 0.0])]
    ids = [np.array([0, 0, 1, 2]), np.array([0, 0, 1, 2])]
    g = story_gain(d, ids, n_boot=2000)
    assert g.gain == pytest.approx(0.25) and g.seed_gains == (0.5, 0.0) and g.stories == 3 and g.pairs == 4
    # resamples: story 0 drawn k of 3 times -> seed-0 mean 2k/(2k + (3-k)); the interval lies within those values
    assert 0.0 <= g.ci_low <= g.gain <= g.ci_high <= 0.5 * (6 / 6)
    # different pairs per seed are fine (a seed without story 2)
    g2 = story_gain([np.array([1.0, 0.0, 0.0]), np.array([1.0, -1.0])], [np.array([0, 1, 2]), np.array([0, 1])])
    assert g2.gain == pytest.approx((1 / 3 + 0) / 2) and g2.stories == 3


def test_story_t_p_matches_scipy_and_handles_edges() -> None:
    rng = np.random.default_rng(4)
    d = [rng.choice([-1.0, 0.0, 1.0], size=60) for _ in range(3)]
    ids = [np.repeat(np.arange(30), 2)] * 3
    x = np.mean([np.bincount(ids[0], weights=dk) / 2 for dk in d], axis=0)  # seed-averaged story means
    assert story_t_p(d, ids) == pytest.approx(sps.ttest_1samp(x, 0.0).pvalue, rel=1e-9)
    d2, ids2 = [np.array([1.0, 0.0])], [np.array([0, 1])]  # n = 2 stories: df 1
    assert story_t_p(d2, ids2) == pytest.approx(sps.ttest_1samp([1.0, 0.0], 0.0).pvalue, rel=1e-9)
    assert story_t_p([np.zeros(5)], [np.arange(5)]) == 1.0  # no change anywhere
    # the same non-zero difference on every story, in float rounding too: no noise estimate, not p ~ 1e-14
    assert math.isnan(story_t_p([np.full(5, 0.1) + np.array([0, 1e-17, 0, 0, 0])], [np.arange(5)]))
    assert math.isnan(story_t_p([np.array([1.0])], [np.array([0])]))  # one story


def test_confirmation_rows_holm_over_the_headline_only() -> None:
    rng = np.random.default_rng(5)
    schemes = np.array(["a", "b", "c"] * 50)
    uids = np.repeat(np.arange(50), 3)
    seeds = []
    for _ in range(3):
        ref = rng.random(150) < np.where(schemes == "c", 0.99, 0.5)
        pol = ref | (rng.random(150) < np.where(schemes == "a", 0.3, 0.02))
        seeds.append(SeedScores(uids, schemes, ref, pol))
    rows = confirmation_rows(seeds, ["a", "b"], n_boot=500)
    by = {r["scheme"]: r for r in rows}
    assert [r["scheme"] for r in rows] == ["a", "b", "c", "headline (pooled)", "all"]
    p = [float(by["a"]["p"]), float(by["b"]["p"])]
    holm = sorted(p)[0] * 2, max(sorted(p)[0] * 2, sorted(p)[1])  # Holm by hand for 2 tests
    adjusted = sorted([float(by["a"]["p_holm"]), float(by["b"]["p_holm"])])
    assert adjusted == pytest.approx([min(1, holm[0]), min(1, holm[1])])
    assert math.isnan(float(by["c"]["p_holm"])) and math.isnan(float(by["all"]["p_holm"]))
    gain_a = np.mean(
        [(s.policy_correct[schemes == "a"].mean() - s.reference_correct[schemes == "a"].mean()) for s in seeds]
    )
    assert float(by["a"]["gain"]) == pytest.approx(gain_a)
    assert float(by["a"]["ci_low"]) > 0 and by["a"]["stories"] == 50


def _scores() -> PairScores:
    t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return PairScores(
        losses=t(0.1, 0.2, 0.3, 0.4),
        chosen_rewards=t(0.5, 0.1, 0.2, -0.1),
        rejected_rewards=t(-0.5, 0.0, 0.1, 0.1),
        policy_chosen=t(-1, -2, -3, -4),
        policy_rejected=t(-2, -3, -4, -3),
        ref_chosen=t(-3, -1, -5, -2),
        ref_rejected=t(-2, -2, -4, -3),
        chosen_logits=None,
        rejected_logits=None,
        schemes=["other_story", "other_story", "shuffle_sentences", "shuffle_sentences"],
        uids=[7, 8, 7, 8],
    )


def test_gain_table_counts_stories() -> None:
    table = gain_table(_scores(), n_boot=200)
    assert table["stories"] == [2, 2, 2] and table["pairs"] == [2, 2, 4]
    assert table["logps_rejected"] == [-2.5, -3.5, -3.0] and table["reference_logps_rejected"] == [-2.0, -3.5, -2.75]


def test_console_table_fits_80_columns_with_one_accuracy_column() -> None:
    from rich.console import Console

    from pipelines.tables import dpo_table

    console = Console(width=80, record=True)
    console.print(dpo_table(gain_table(_scores(), n_boot=200), "test", "simpo", 0.8021, 123.0))
    text = console.export_text()
    lines = text.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    assert sum("shuffle_sentences" in line for line in lines) == 1  # one table, one row per scheme
    assert "rewards/accuracies" not in text and text.count("DPO") >= 1
    assert "+0.500" in text and "95% CI" in text  # other_story's gain and its interval


def test_dpo_help_names_its_own_example_config() -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    out = CliRunner().invoke(app, ["dpo", "--help"], terminal_width=100).output
    assert "configs/dpo.yaml" in out and "linear.yaml" not in out


def test_report_and_figure() -> None:
    from picollm.dpo import report

    table = gain_table(_scores(), n_boot=200)
    history = [
        {"step": 0.0, "val/logps/chosen": -3.0, "val/logps/rejected": -3.5},
        {"step": 25.0, "val/logps/chosen": -3.2, "val/logps/rejected": -4.5},
    ]
    fig = report.dpo_figure(history, table, "test", "sigmoid")
    left, right = fig.axes
    assert {line.get_label() for line in left.get_lines()} >= {"chosen", "rejected"}  # one plot for both
    assert len(right.patches) == 2 * len(table["scheme"])  # reference and DPO bars per scheme
    md = report.render(["data: x"], table, "test", "sigmoid", 0.6931, {"total": 3.0}, {})
    assert "| other_story | 2 | 2 | 0.500 | 1.000 | +0.500 |" in md and report.FIGURE in md
    assert "bootstrap" in md and "stories" in md


def test_reference_progress_heartbeat() -> None:
    from pipelines.dpo import _reference_progress

    lines: list[str] = []
    beat = _reference_progress(lines.append, "train", every_s=3600.0)
    for done in (10, 20, 30):
        beat(done, 30)
    assert len(lines) == 1 and "30/30" in lines[0]  # only the end within the interval
    beat = _reference_progress(lines.append, "val", every_s=0.0)
    beat(5, 10)
    assert "5/10" in lines[-1] and "val" in lines[-1]
