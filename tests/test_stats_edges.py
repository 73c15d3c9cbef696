"""The comparison statistics at their edges, against scipy: two seeds, zero and near-zero spread of count
differences, ties, NaN; the verdict table (picollm/compare/verdicts.py) on each case of issue 26; Holm over the
declared primaries; `ci: bootstrap` refused below its minimum; the terminal's table in 80 columns."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from picollm import compare as cmp
from picollm.compare.summary import headline
from picollm.config import CompareConfig
from picollm.config.base import ConfigError, load_config
from picollm.config.compare import BOOTSTRAP_MIN_RUNS, headline_metrics
from pipelines.cli import app
from pipelines.tables import compare_table

from .conftest import REPO

st = pytest.importorskip("scipy.stats")
TINY_COMPARE = str(REPO / "configs" / "compare_tiny.yaml")

# Issue 26's case: accuracies over 1,600 test targets, linear 3 answers behind softmax on both seeds.
COUNT_SOFTMAX, COUNT_LINEAR = [0.625, 0.7175], [0.623125, 0.715625]


def scipy_paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(p, low, high) of scipy's paired t-test of b - a at 95 %."""
    r = st.ttest_rel(b, a)
    ci = r.confidence_interval(0.95)
    return float(r.pvalue), float(ci.low), float(ci.high)


def scipy_tost(d: np.ndarray, margin: float) -> float:
    """TOST as two one-sided one-sample t-tests of the paired differences."""
    lower = st.ttest_1samp(d, -margin, alternative="greater").pvalue  # H0: difference <= -margin
    upper = st.ttest_1samp(d, margin, alternative="less").pvalue  # H0: difference >= margin
    return float(max(lower, upper))


def holm_reference(p: list[float]) -> list[float]:
    """Holm as statsmodels' multipletests(method="holm") computes it: sorted p times (k - i), running max, <= 1."""
    order = np.argsort(p, kind="stable")
    adj = np.maximum.accumulate(np.minimum(1.0, (len(p) - np.arange(len(p))) * np.asarray(p)[order]))
    out = np.empty(len(p))
    out[order] = adj
    return out.tolist()


# --------------------------------------------------------------------------------------------------
# Zero and near-zero spread


def test_a_constant_count_difference_has_no_noise_estimate():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns about the cancellation, then answers
        assert scipy_paired(COUNT_SOFTMAX, COUNT_LINEAR)[0] < 1e-12  # the bug of issue 26: "softmax better"
    d = cmp.difference(COUNT_SOFTMAX, COUNT_LINEAR)
    assert d.mean == pytest.approx(-3 / 1600) and d.se == 0 and not d.noise
    assert all(math.isnan(x) for x in (d.p, d.p_tost, d.low, d.high))
    assert cmp.verdict(d.mean, d.p, d.p_tost, d.margin, 0.05, True) == cmp.NA_NOISE
    # as float32 means (how evaluation computes accuracies): the last bits differ more, still rounding
    f32 = [[float(np.float32(c / 1600)) for c in counts] for counts in ((1000, 1148), (997, 1145))]
    assert not cmp.difference(*f32).noise
    # Welch: each side constant to rounding (two seeds that give the same accuracy), different means
    assert math.isnan(cmp.welch_p([0.1 + 0.2, 0.3], [0.31, 0.31]))


def test_a_sweep_of_constant_count_differences_never_gets_a_p():
    """Issue 26 swept such inputs: 4,680 of 10,200 got p ~ 1e-14. Here: every one is "no noise estimate"."""
    rng = np.random.default_rng(0)
    tiny = 0
    for _ in range(400):
        n_targets = int(rng.choice([80, 400, 1600, 6400, 100_000]))
        seeds = int(rng.integers(2, 6))
        base = rng.integers(n_targets // 2, n_targets, size=seeds)
        step = int(rng.integers(-20, 21))
        a = [float(np.float32(c / n_targets)) for c in base]
        b = [float(np.float32((c + step) / n_targets)) for c in base]
        d = cmp.difference(a, b)
        assert math.isnan(d.p) and math.isnan(d.p_tost) and not d.noise, (n_targets, base, step)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            tiny += bool(st.ttest_rel(b, a).pvalue < 0.05)
    assert tiny > 0  # scipy (and the former se == 0 test) call some of them significant


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on close values: it still answers
def test_a_spread_of_one_answer_is_noise_and_is_tested_like_scipy():
    # -3 and -4 answers of 1,600: a real spread of one answer, an ordinary paired t-test (df 1)
    a, b = [0.625, 0.7175], [0.623125, 0.715]
    d = cmp.difference(a, b)
    p, low, high = scipy_paired(a, b)
    assert d.noise and d.p == pytest.approx(p, abs=1e-12) and (d.low, d.high) == pytest.approx((low, high))
    # one answer in 100,000 targets is still far above the rounding floor (NOISE_RTOL of the values)
    a, b = [0.62500, 0.71750], [0.62497, 0.71746]
    d = cmp.difference(a, b)
    assert d.noise and d.p == pytest.approx(scipy_paired(a, b)[0], abs=1e-10)
    # Welch with one side constant: only the other side's spread, df = its n - 1 (Welch-Satterthwaite)
    x, y = [0.8, 0.8, 0.8], [0.82, 0.85, 0.83]
    s = cmp.welch_stat(x, y)
    ref = st.ttest_ind(y, x, equal_var=False)
    assert s.df == pytest.approx(2.0) and cmp.welch_p(x, y) == pytest.approx(ref.pvalue, abs=1e-10)


# --------------------------------------------------------------------------------------------------
# Two seeds, ties, NaN


def test_two_seeds_match_scipy_tests_intervals_and_tost():
    a, b = [0.80, 0.86], [0.812, 0.869]
    d = cmp.difference(a, b, margin=0.02)
    p, low, high = scipy_paired(a, b)
    assert (d.df, d.n) == (1, 2) and d.p == pytest.approx(p, abs=1e-10)
    assert (d.low, d.high) == pytest.approx((low, high), abs=1e-10)  # t_{0.975, 1} = 12.71: wide
    assert d.p_tost == pytest.approx(scipy_tost(np.subtract(b, a), 0.02), abs=1e-10)
    welch = cmp.difference(a, b, margin=0.02, paired=False)
    ref = st.ttest_ind(b, a, equal_var=False)
    assert welch.p == pytest.approx(ref.pvalue, abs=1e-10) and welch.df == pytest.approx(float(ref.df))
    ci = ref.confidence_interval(0.95)
    assert (welch.low, welch.high) == pytest.approx((ci.low, ci.high), abs=1e-10)
    # Welch TOST: the same two one-sided tests with b shifted by the margin
    upper = st.ttest_ind(np.subtract(b, 0.02), a, equal_var=False, alternative="less").pvalue
    lower = st.ttest_ind(np.add(b, 0.02), a, equal_var=False, alternative="greater").pvalue
    assert welch.p_tost == pytest.approx(max(upper, lower), abs=1e-10)


def test_ties_in_values_differences_and_p_values():
    a, b = [0.80, 0.80, 0.85, 0.85], [0.81, 0.81, 0.87, 0.86]  # tied values, tied differences
    d = cmp.difference(a, b)
    assert d.p == pytest.approx(scipy_paired(a, b)[0], abs=1e-10)
    assert cmp.welch_p(a, b) == pytest.approx(st.ttest_ind(b, a, equal_var=False).pvalue, abs=1e-10)
    # Holm with tied p-values (and a NaN that is not a test), as statsmodels' multipletests computes it
    p = [0.01, 0.04, 0.01, 0.04, 0.03]
    assert cmp.holm([*p, math.nan])[:5] == pytest.approx(holm_reference(p))
    assert math.isnan(cmp.holm([*p, math.nan])[5])
    # a p-value tied with alpha is not below it: no verdict flips on equality
    assert cmp.verdict(0.02, 0.05, 0.5, 0.01, 0.05, True) == "inconclusive"
    assert cmp.verdict(0.001, 0.5, 0.05, 0.01, 0.05, True) == "inconclusive"


def test_nan_values_drop_pairs_like_scipy_omit():
    a = [0.80, math.nan, 0.90, 0.85, 0.83]
    b = [0.81, 0.70, math.nan, 0.87, 0.86]  # a diverged run on each side: 3 complete pairs remain
    d = cmp.difference(a, b)
    ref = st.ttest_rel(b, a, nan_policy="omit")
    assert d.n == 3 and d.p == pytest.approx(ref.pvalue, abs=1e-10)
    welch = cmp.difference(a, b, paired=False)
    assert welch.p == pytest.approx(st.ttest_ind(b, a, equal_var=False, nan_policy="omit").pvalue, abs=1e-10)
    # five runs a side but a single complete pair: no test, and the table says why (not "fewer than 2 runs")
    runs = {
        "softmax": [{"m": v} for v in (0.80, math.nan, 0.90, math.nan, 0.85)],
        "linear": [{"m": v} for v in (0.81, 0.70, math.nan, 0.88, math.nan)],
    }
    agg, diffs = cmp.aggregate(runs), cmp.differences(runs)
    assert "m" not in diffs
    [row] = cmp.summary_rows(agg, diffs, [("m", "m", True)], 0.05)
    assert row["verdict"] == cmp.NA_PAIRS and row["p"] == "-"


# --------------------------------------------------------------------------------------------------
# The verdict table


def test_verdict_precedence_on_adjusted_p_values():
    """Every row of the table in picollm/compare/verdicts.py, in its order, from (p, p TOST)."""
    v = cmp.verdict
    assert v(0.003, math.nan, math.nan, 0.01, 0.05, True) == cmp.NA_NOISE
    assert v(0.003, 0.001, 0.001, 0.01, 0.05, True) == "linear better, by < 0.01"  # both hold
    assert v(0.003, 0.001, 0.001, 0.01, 0.05, False) == "softmax better, by < 0.01"  # e.g. a loss
    assert v(0.02, 0.001, 0.9, 0.01, 0.05, True) == "linear better"
    assert v(-0.02, 0.001, 0.9, 0.01, 0.05, True) == "softmax better"
    assert v(0.001, 0.6, 0.01, 0.01, 0.05, True) == "equivalent within ±0.01"
    assert v(0.02, 0.3, 0.4, 0.01, 0.05, True) == "inconclusive"
    assert v(0.02, 0.01, 0.9, 0.01, 0.05, True, names=("a", "b")) == "b better"


def test_the_verdict_of_each_case_of_issue_26():
    base = [0.80, 0.85, 0.90, 0.82, 0.88]
    cases = {  # metric -> linear's values (softmax: base), 5 seeds
        "small_real": [x + d for x, d in zip(base, (0.0030, 0.0031, 0.0029, 0.0030, 0.0031), strict=True)],
        "identical": list(base),
        "significant": [x + d for x, d in zip(base, (0.020, 0.030, 0.025, 0.022, 0.028), strict=True)],
        "worse": [x - d for x, d in zip(base, (0.020, 0.030, 0.025, 0.022, 0.028), strict=True)],
        "equivalent": [x + d for x, d in zip(base, (0.001, -0.001, 0.0005, 0.0, -0.0005), strict=True)],
        "inconclusive": [x + d for x, d in zip(base, (0.03, -0.02, 0.01, 0.04, -0.01), strict=True)],
    }
    counts = [1000, 1148, 1010, 1100, 1050]  # softmax's right answers of 1,600; linear: 3 fewer on every seed
    runs = {
        "softmax": [{k: x for k in cases} | {"count": float(np.float32(c / 1600))}
                    for x, c in zip(base, counts, strict=True)],
        "linear": [{k: v[i] for k, v in cases.items()} | {"count": float(np.float32((counts[i] - 3) / 1600))}
                   for i in range(5)],
    }  # fmt: skip
    runs["softmax"][0]["one"], runs["linear"][0]["one"] = 0.5, 0.6  # a metric only the first runs report
    keys = [(k, k, True) for k in (*cases, "count", "one")]
    agg, diffs = cmp.aggregate(runs), cmp.differences(runs, margin=0.01)
    rows = {r["key"]: r for r in cmp.summary_rows(agg, diffs, keys, alpha=0.05)}
    assert {k: r["verdict"] for k, r in rows.items()} == {
        "small_real": "linear better, by < 0.01",  # issue: read "linear better" though inside ±0.01
        "identical": cmp.NA_NOISE,  # issue: read "equivalent" with no noise estimate
        "significant": "linear better",
        "worse": "softmax better",
        "equivalent": "equivalent within ±0.01",
        "inconclusive": "inconclusive",
        "count": cmp.NA_NOISE,  # issue: p 1.9e-14 "softmax better"
        "one": cmp.NA_RUNS,
    }
    # the unadjusted numbers are scipy's; Holm over the 5 tested rows decides
    d = diffs["small_real"]
    assert d.p == pytest.approx(scipy_paired(base, cases["small_real"])[0], abs=1e-12)
    assert d.p_tost == pytest.approx(scipy_tost(np.subtract(cases["small_real"], base), 0.01), abs=1e-12)
    assert rows["count"]["diff"] == "-0.002" and rows["count"]["p"] == "-"  # a point, no interval, no p


# --------------------------------------------------------------------------------------------------
# Primaries


def _table_of_six() -> tuple[dict, list[tuple[str, str, bool]]]:
    """Six headline-like metrics on 5 seeds; accuracy's raw paired p is 0.018 (issue 26's case)."""
    base = [0.80, 0.82, 0.81, 0.83, 0.79]
    acc_d = [0.010, 0.004, 0.012, 0.002, 0.008]
    rng = np.random.default_rng(1)
    metrics = ["eval/test/loss", "eval/test/accuracy", "m3", "m4", "m5", "m6"]
    runs: dict[str, list[dict[str, float]]] = {"softmax": [], "linear": []}
    for i, x in enumerate(base):
        runs["softmax"].append({m: x for m in metrics})
        lin = {"eval/test/loss": x - 0.05 - 0.001 * i, "eval/test/accuracy": x + acc_d[i]}
        runs["linear"].append(lin | {m: x + float(rng.normal(0, 0.02)) for m in metrics[2:]})
    keys = [("eval/test/loss", "loss", False), ("eval/test/accuracy", "accuracy", True)]
    return runs, keys + [(m, m, True) for m in metrics[2:]]


def test_holm_over_the_declared_primaries_only():
    runs, keys = _table_of_six()
    agg, diffs = cmp.aggregate(runs), cmp.differences(runs)
    raw = {k: diffs[k].p for k, _, _ in keys}
    assert raw["eval/test/accuracy"] == pytest.approx(0.018, abs=0.002)
    everything = {r["key"]: r for r in cmp.summary_rows(agg, diffs, keys, 0.05)}
    assert everything["eval/test/accuracy"]["verdict"] == "inconclusive"  # Holm over 6 (0.018 x >= 5)
    assert {r["role"] for r in everything.values()} == {"secondary"}
    primaries = ["eval/test/loss", "eval/test/accuracy"]
    rows = cmp.summary_rows(agg, diffs, list(reversed(keys)), 0.05, primaries=primaries)
    assert [r["key"] for r in rows[:2]] == primaries[::-1] and [r["role"] for r in rows[:2]] == ["primary"] * 2
    by_key = {r["key"]: r for r in rows}
    primary_p = holm_reference([raw[k] for k in primaries])
    assert by_key["eval/test/accuracy"]["p"] == cmp.fmt_p(primary_p[1])  # 0.036: 2 x 0.018
    assert by_key["eval/test/accuracy"]["verdict"] == "linear better"
    secondary = [k for k, _, _ in keys if k not in primaries]
    second_p = dict(zip(secondary, holm_reference([raw[k] for k in secondary]), strict=True))
    assert all(by_key[k]["p"] == cmp.fmt_p(second_p[k]) and by_key[k]["role"] == "secondary" for k in secondary)


def test_primaries_must_name_headline_metrics():
    cfg = load_config(CompareConfig, TINY_COMPARE)
    assert cfg.compare.primaries == ["eval/test/loss", "eval/test/accuracy"]
    for name in ("compare.yaml", "learning_curve.yaml"):
        assert load_config(
            CompareConfig, REPO / "configs" / name
        ).compare.primaries  # every compare study declares its own
    # the config's list of headline metrics is the headline's (table.headline_keys and the MQAR rows)
    cfg = load_config(CompareConfig, REPO / "configs" / "recall.yaml")
    for c in (load_config(CompareConfig, REPO / "configs" / "compare.yaml"), cfg):
        assert [k for k, _, _ in headline(c)] == headline_metrics(c.compare.length_factors, c.compare.recall_pairs)
    with pytest.raises(ConfigError, match=r"'test/loss' is not a headline metric \(one of eval/test/loss"):
        load_config(CompareConfig, TINY_COMPARE, ["compare.primaries=[test/loss]"])
    with pytest.raises(ConfigError, match="lists a metric twice"):
        load_config(CompareConfig, TINY_COMPARE, ["compare.primaries=[eval/test/ece,eval/test/ece]"])
    with pytest.raises(ConfigError, match="lengen/x8/beyond/accuracy"):  # not a length this config evaluates
        load_config(CompareConfig, TINY_COMPARE, ["compare.primaries=[lengen/x8/beyond/accuracy]"])


# --------------------------------------------------------------------------------------------------
# ci: bootstrap below its minimum


def test_bootstrap_over_few_seeds_is_refused_with_one_line(tmp_path):
    result = CliRunner().invoke(app, ["compare", TINY_COMPARE, "--set", "compare.ci=bootstrap"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = result.output.strip().splitlines()
    assert f"compare.ci: bootstrap needs at least {BOOTSTRAP_MIN_RUNS} runs per variant (here 2" in line
    assert not (tmp_path / "mlflow.db").exists()  # no run started: the store was never even created
    seeds = f"compare.seeds=[{','.join(map(str, range(BOOTSTRAP_MIN_RUNS)))}]"
    cfg = load_config(CompareConfig, TINY_COMPARE, ["compare.ci=bootstrap", seeds])
    assert cfg.compare.ci == "bootstrap"
    result = CliRunner().invoke(app, ["compare", TINY_COMPARE, "--set", "compare.primaries=[x]"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# The terminal's table


def _rendered(table) -> list[str]:
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text().splitlines()


def test_the_console_table_fits_80_columns_with_whole_verdicts():
    base = [0.60, 0.62, 0.61, 0.63, 0.64]
    keys = cmp.headline_keys([1, 2, 4, 8])
    shift = {  # per headline row: linear - softmax on each seed, to reach every verdict
        0: (-0.02, -0.03, -0.025, -0.021, -0.028),  # loss: linear better
        1: (0.003, 0.0031, 0.0029, 0.003, 0.0031),  # better, by < 0.01
        2: (0.001, -0.001, 0.0005, 0.0, -0.0005),  # equivalent
        3: (0.03, -0.02, 0.01, 0.04, -0.01),  # inconclusive
        4: (0.0,) * 5,  # identical: no noise estimate
    }
    runs = {
        "softmax": [{k: b + 0.01 * j for j, (k, _, _) in enumerate(keys)} for b in base],
        "linear": [
            {k: b + 0.01 * j + shift.get(j, (0.02, 0.03, 0.025, 0.022, 0.028))[i] for j, (k, _, _) in enumerate(keys)}
            for i, b in enumerate(base)
        ],
    }
    for r in runs["linear"][1:]:
        del r["lengen/x8/beyond/accuracy"]  # one run: fewer than 2 runs a side
    agg, diffs = cmp.aggregate(runs), cmp.differences(runs)
    rows = cmp.summary_rows(agg, diffs, keys, 0.05, primaries=["eval/test/loss", "eval/test/accuracy"])
    verdicts = {r["verdict"] for r in rows}
    assert {cmp.NA_RUNS, cmp.NA_NOISE, "inconclusive", "equivalent within ±0.01"} <= verdicts
    assert "linear better, by < 0.01" in verdicts
    lines = _rendered(compare_table(rows, {"softmax": 5, "linear": 5}, 0.95))
    assert max(len(line) for line in lines) <= 80
    for r in rows:  # each row on one line: its label, its verdict whole
        assert any(line.startswith(r["short"]) and line.rstrip().endswith(r["verdict"]) for line in lines), r
    assert [line.strip() for line in lines if line.strip() in ("primary", "secondary")] == ["primary", "secondary"]
    # three variants: one row per (metric, variant); long names wrap their own cells, never the verdict
    three = {"softmax": runs["softmax"], "linear": runs["linear"], "delta_rule_long_name": runs["linear"]}
    diffs3 = cmp.differences_vs_baseline(three)
    rows3 = cmp.comparison_rows(cmp.aggregate(three), diffs3, keys, 0.05, variants=list(three))
    lines = _rendered(compare_table(rows3, {"softmax": 5, "linear": 5, "delta_rule_long_name": 5}, 0.95))
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert all(r["verdict"] in text for r in rows3) and "primary" not in text


def test_the_report_labels_primaries_and_states_the_precedence():
    runs, keys = _table_of_six()
    agg, diffs = cmp.aggregate(runs), cmp.differences(runs)
    rows = cmp.summary_rows(agg, diffs, keys, 0.05, primaries=["eval/test/loss", "eval/test/accuracy"])
    r = cmp.ReportInput(
        title="t", mode="train", parent_run_id="x", seconds=1.0, setup=[], runs={v: ["s"] * 5 for v in runs},
        families=[], factors=[], train_len=8, agg=agg, diffs={"linear": diffs}, rows=rows, alpha=0.05,
        ci_text="95 % Student-t interval", coverage={}, efficiency=None, figures=[],
        primaries=["eval/test/loss", "eval/test/accuracy"],
    )  # fmt: skip
    headline_text = cmp.render_report(r).split("## Headline")[1].split("## Every split")[0]
    primary, secondary = headline_text.split("**Primary**")[1].split("**Secondary**")
    assert "| accuracy |" in primary and "| m3 |" not in primary and "| m3 |" in secondary
    assert "Holm-adjusted over these 2 tests only" in primary and "Holm over the other 4 tests" in secondary
    assert "Holm-adjusted within the primary family of 2 tests and, separately, the secondary family of 4" in (
        headline_text
    )
    for kind in ("**n/a (…)**", "**X better, by < m**", "**X better**", "**equivalent within ±m**", "**inconclusive**"):
        assert kind in headline_text
    assert "accuracy (primary)" in headline_text  # the verdict summary marks primaries
    none = cmp.render_report(
        cmp.ReportInput(**{**r.__dict__, "primaries": [], "rows": cmp.summary_rows(agg, diffs, keys, 0.05)})
    )
    assert "No primary metric declared in compare.primaries" in none and "**Primary**" not in none
