"""`picollm compare`: intervals and tests on hand-computed numbers, calibration, length generalisation
on a hand-checkable stub, input errors before any run, and (slow) the parent/child run structure and
the registry mode reproducing the training runs' metrics.

Every test runs in its own MLflow store and working directory (conftest's autouse `mlflow_tmp`:
MLFLOW_TRACKING_URI=sqlite:///<tmp>/mlflow.db, chdir to tmp, picollm.tracking._initialised cleared).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from picollm import compare as cmp
from picollm.compare import keys
from picollm.config import CompareConfig, DataConfig, ModelConfig, load_config
from picollm.data.splits import build_data, to_padded
from picollm.errors import ConfigError
from picollm.tracking import links

from .conftest import REPO, copy_store, mlflow_store, point_mlflow

TINY_COMPARE = REPO / "configs" / "compare_tiny.yaml"
runner = CliRunner()


# --------------------------------------------------------------------------------------------------
# Intervals and tests


def test_t_interval_matches_hand_computation():
    # mean 0.81, s = 0.01, t_{0.975, 2} = 4.302653 (table): half-width 4.302653 * 0.01 / sqrt(3) = 0.0248414
    iv = cmp.mean_ci([0.80, 0.82, 0.81], 0.95, "t")
    assert iv.mean == pytest.approx(0.81)
    assert iv.std == pytest.approx(0.01)
    assert iv.half_width == pytest.approx(0.0248414, abs=1e-6)
    assert (iv.low, iv.high) == pytest.approx((0.81 - 0.0248414, 0.81 + 0.0248414), abs=1e-6)
    # 1..5: mean 3, s = sqrt(2.5), t_{0.975, 4} = 2.776445: half-width 1.963243
    iv = cmp.mean_ci([1, 2, 3, 4, 5])
    assert (iv.low, iv.high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-5)
    # t quantiles from the table
    for df, q in ((1, 12.706205), (2, 4.302653), (4, 2.776445), (10, 2.228139), (30, 2.042272)):
        assert cmp.t_ppf(0.975, df) == pytest.approx(q, abs=1e-5)


def test_interval_edge_cases_and_bootstrap():
    one = cmp.mean_ci([0.5])
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    assert cmp.mean_ci([]).n == 0
    twelve = [0.1 * i for i in range(1, 13)]
    boot = cmp.mean_ci(twelve, method="bootstrap", n_boot=2000)
    assert 0.1 <= boot.low < boot.mean < boot.high <= 1.2 and boot != cmp.mean_ci(twelve)  # percentile, not t
    assert boot == cmp.mean_ci(twelve, method="bootstrap", n_boot=2000)  # seeded
    # below BOOTSTRAP_MIN_RUNS values the bootstrap undercovers: the t interval instead
    four = [0.1, 0.2, 0.3, 0.4]
    assert cmp.mean_ci(four, method="bootstrap") == cmp.mean_ci(four)


def test_welch_p_on_hand_computed_case():
    # t = 0.036667 / sqrt(1e-4/3 + 2.3333e-4/3) = 3.4785, Welch df = 3.448 -> p = 0.03220
    # (scipy.stats.ttest_ind(a, b, equal_var=False).pvalue = 0.032199)
    a, b = [0.80, 0.82, 0.81], [0.85, 0.83, 0.86]
    assert cmp.welch_p(a, b) == pytest.approx(0.032199, abs=1e-5)
    assert cmp.welch_p(a, a) == pytest.approx(1.0)
    assert math.isnan(cmp.welch_p([1.0, 1.0], [1.0, 1.0]))  # identical runs: no noise estimate either
    # a constant non-zero difference gives no estimate of the noise: not "p = 0" (an infinite t)
    assert math.isnan(cmp.welch_p([1.0, 1.0], [0.0, 0.0]))
    assert math.isnan(cmp.paired_p([0.5, 0.6], [0.502, 0.602]))
    assert math.isnan(cmp.welch_p([0.8], [0.9, 0.95]))


def test_summary_rows_say_within_noise():
    # unpaired (Welch), as in registry mode; paired, these seeds give p = 0.11 (see the paired test below)
    runs = {
        "softmax": [{"eval/test/accuracy": v} for v in (0.80, 0.82, 0.81)],
        "linear": [{"eval/test/accuracy": v} for v in (0.85, 0.83, 0.86)],
    }
    agg, diffs = cmp.aggregate(runs), cmp.differences(runs, paired=False)
    assert cmp.p_values(runs)["eval/test/accuracy"] == diffs["eval/test/accuracy"].p
    [row] = cmp.summary_rows(agg, diffs, [("eval/test/accuracy", "test accuracy", True)], alpha=0.05)
    assert row["verdict"] == "linear better" and row["p"] == "0.032" and row["test"] == "welch"
    [row] = cmp.summary_rows(agg, diffs, [("eval/test/accuracy", "test accuracy", True)], alpha=0.01)
    assert row["verdict"] == "inconclusive"  # a difference of 0.037 is not within ±0.01 either
    assert row["softmax"] == "0.810 ± 0.025"


def test_expected_calibration_error_by_hand():
    # bin 9: confidences 0.9, 0.9, one hit -> |0.5 - 0.9| * 2/4; bin 6: 0.6, 0.6, two hits -> |1 - 0.6| * 2/4
    conf = torch.tensor([0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([True, False, True, True])
    assert cmp.expected_calibration_error(conf, correct, 10) == pytest.approx(0.4)
    assert cmp.expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == 0.0


# --------------------------------------------------------------------------------------------------
# Length generalisation on a hand-checkable case


class CountingStub(nn.Module):
    """Predicts x + 1 (mod M) — the counting rule — at target positions < `good_until`, x + 2 after."""

    def __init__(self, vocab: int, good_until: int | None = None) -> None:
        super().__init__()
        self.vocab, self.good_until = vocab, good_until
        self.dummy = nn.Parameter(torch.zeros(1))  # predict() reads the device from the parameters

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.vocab - 1
        target_pos = torch.arange(1, tokens.shape[1] + 1)[None, :]  # input i predicts position i + 1
        step = torch.ones_like(tokens)
        if self.good_until is not None:
            step = torch.where(target_pos < self.good_until, step, 2 * step)
        return torch.nn.functional.one_hot((tokens + step) % m, self.vocab).float() * 10


@pytest.fixture(scope="module")
def counting_data():
    cfg = DataConfig(seq_types=["counting"], vocab_size=32, min_len=4, max_len=8, n_train=60, n_val=5, n_test=5)
    data = build_data(cfg)
    used = {s.tobytes() for split in data.splits().values() for s in split.sequences}
    raw = {f: cmp.long_sequences(cfg, 8 * f, 6, used) for f in (1, 2, 4)}
    long = {f: to_padded(s, cfg.pad_id, data.families) for f, s in raw.items()}
    return cfg, data, raw, long, used


def test_long_sequences_are_exact_length_new_and_covered(counting_data):
    cfg, data, raw, _, used = counting_data
    for f, split in raw.items():
        assert len(split) == 6 and {len(s) for s in split.sequences} == {8 * f}
        assert not any(s.tobytes() in used for s in split.sequences)
        assert all(((s[1:] - s[:-1]) % cfg.modulus == 1).all() for s in split.sequences)  # still counting
        # values are residues mod 31: every value and every x -> x+1 transition also occurs in training
        assert cmp.coverage(data.train, split, cfg.modulus) == {
            "value_coverage": 1.0,
            "transition_coverage": 1.0,
            "transition_coverage/counting": 1.0,
        }


def test_length_generalisation_perfect_model(counting_data):
    _, _, _, long, _ = counting_data
    metrics, curves = cmp.length_generalisation(CountingStub(32), long, train_len=8)
    for f in (1, 2, 4):
        assert metrics[f"lengen/x{f}/accuracy"] == 1.0
        assert metrics[f"lengen/x{f}/ceiling"] == 1.0  # counting alone: the Bayes predictor is always sure
        assert metrics[f"lengen/x{f}/accuracy/counting"] == 1.0
    assert metrics["lengen/x4/beyond/accuracy"] == 1.0
    assert "lengen/x1/beyond/accuracy" not in metrics  # no position beyond the training length at 1x
    assert list(curves["lengen/x4/accuracy_by_position"]) == [1.0] * 31


def test_length_generalisation_model_that_fails_beyond_training(counting_data):
    _, _, _, long, _ = counting_data
    metrics, curves = cmp.length_generalisation(CountingStub(32, good_until=8), long, train_len=8)
    # a sequence of L tokens has targets at positions 1..L-1; positions 1..7 are right, the rest wrong
    assert metrics["lengen/x1/accuracy"] == 1.0
    assert metrics["lengen/x2/accuracy"] == pytest.approx(7 / 15)
    assert metrics["lengen/x4/accuracy"] == pytest.approx(7 / 31)
    assert metrics["lengen/x2/beyond/accuracy"] == 0.0
    assert metrics["lengen/x4/beyond/accuracy/counting"] == 0.0
    assert metrics["lengen/x4/beyond/ceiling"] == 1.0
    assert list(curves["lengen/x4/accuracy_by_position"]) == [1.0] * 7 + [0.0] * 24


def test_evaluate_model_matches_training_evaluation(counting_data):
    from picollm.model.transformer import Transformer
    from picollm.training.evaluation import evaluate

    cfg, data, *_ = counting_data
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=cfg.vocab_size, d_model=16, n_layers=1, n_heads=2))
    test = to_padded(data.test, cfg.pad_id, data.families)
    metrics, curves = cmp.evaluate_model(model, {"test": test}, batch_size=4)
    reference = evaluate(model, test, "test", batch_size=4)
    for key in ("loss", "accuracy", "ceiling", "accuracy/counting"):
        assert metrics[f"eval/test/{key}"] == reference[f"test/{key}"]
    assert 0 <= metrics["eval/test/ece"] <= 1
    assert len(curves["eval/test/accuracy_by_position"]) == test.tokens.shape[1] - 1


def test_memory_worker_reports_peak_rss(capsys):
    # what measure_step_memory runs in a fresh process (not spawned here: importing torch costs seconds)
    model = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2).model_dump(mode="json")
    cmp.memory_worker(json.dumps({"model": model, "length": 32, "batch": 2, "threads": 1}))
    mem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mem["peak_rss_mb"] > 50  # a Python process with torch loaded
    if sys.platform == "linux":
        assert mem["reset"] and mem["step_mb"] >= 0 and mem["peak_rss_mb"] >= mem["before_mb"]


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no run


def invoke(*args: str):
    from pipelines.cli import app

    return runner.invoke(app, [str(a) for a in args])


def no_runs() -> bool:
    return mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["compare.baseline=picollm-baseline@champion"], "both compare.baseline and compare.linear"),
        (["compare.seeds=[0, 0]"], "seed twice"),
        (["compare.ci=anova"], "compare.ci"),
        (["efficiency.foo=1"], "unknown key"),
        (["model.pos_encoding=learned", "model.max_seq_len=20"], "max_seq_len"),
    ],
)
def test_bad_config_is_a_config_error(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(CompareConfig, TINY_COMPARE, overrides)


def test_cli_unknown_reference_fails_before_any_run(migrated_store):
    result = invoke("compare", TINY_COMPARE, "--set", "compare.baseline=nope@champion", "--set", "compare.linear=x")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no registered model named 'nope'" in lines[0]
    assert no_runs()


def test_cli_bad_config_exits_2():
    result = invoke("compare", TINY_COMPARE, "--set", "compare.seeds=[1, 1]")
    assert result.exit_code == 2 and "seed twice" in result.stderr
    assert not Path("mlflow.db").exists()


# --------------------------------------------------------------------------------------------------
# End to end on the tiny config (one shared training comparison)


@dataclass
class Compared:
    directory: Path
    outcome: object


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, store_template: Path) -> Compared:
    from pipelines.compare import run

    directory = tmp_path_factory.mktemp("compare_store")
    copy_store(store_template, directory)
    with mlflow_store(directory):
        outcome = run(load_config(CompareConfig, TINY_COMPARE))
    return Compared(directory, outcome)


@pytest.fixture
def in_compared(compared: Compared, mlflow_tmp: str, monkeypatch: pytest.MonkeyPatch) -> Compared:
    point_mlflow(monkeypatch, compared.directory)
    return compared


def _children(parent_id: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list"
    )


@pytest.mark.slow
def test_parent_with_one_child_per_model_and_seed(in_compared: Compared):
    out = in_compared.outcome
    client = MlflowClient()
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["compare.mode"] == "train"
    children = _children(out.parent_run_id)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    names = sorted(c.info.run_name for c in children)
    assert names == ["linear-seed0", "linear-seed1", "softmax-seed0", "softmax-seed1"]
    every = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(every) == 5  # nothing else, nothing left RUNNING

    for c in children:  # the comparison's evaluation equals what the training flow logged
        m = c.data.metrics
        for key in ("loss", "accuracy", "accuracy_predictable", "accuracy/counting"):
            assert m[f"eval/test/{key}"] == pytest.approx(m[f"test/{key}"], abs=1e-6), key
        assert "lengen/x4/beyond/accuracy" in m and "eval/train/ece" in m
        # per-family tails of other splits and lengths: in the child's table, not its metrics
        assert "eval/val/loss/counting" not in m and "lengen/x4/beyond/accuracy/counting" not in m
        table = json.loads(mlflow.artifacts.load_text(f"runs:/{c.info.run_id}/tables/evaluation.json"))
        rows = dict(table["data"])
        assert "lengen/x4/beyond/accuracy/counting" in rows
        assert rows["eval/test/loss"] == pytest.approx(m["eval/test/loss"], rel=1e-9)
        assert len(client.get_metric_history(c.info.run_id, "eval/test/accuracy_by_position")) == 11

    pm = parent.data.metrics
    # Each variant's values are its children's: the same keys in sibling runs tagged compare.model (the runs
    # table grouped by that tag charts them together); the parent keeps the contrasts.
    shared = ("eval/test/accuracy", "eval/test/loss", "eval/test/accuracy/counting", "model/num_params")
    assert {c.data.tags["compare.model"] for c in children} == {"softmax", "linear"}
    assert all(set(shared) <= set(c.data.metrics) for c in children)
    own = [k for k in pm if k.endswith(("/softmax", "/linear", "_ci_low", "_ci_high")) and "/diff" not in k]
    assert all(k.startswith("scaling/") for k in own), own  # the timings: one per variant, not per seed
    assert len({c.data.metrics["model/num_params"] for c in children}) == 1  # matched architectures
    for att in ("softmax", "linear"):
        assert f"scaling/step_ms/{att}" in pm  # one measurement per variant, not per seed
    assert "eval/test/accuracy/counting/diff" in pm and pm["system/time/total_s"] > 0
    assert parent.data.tags["mlflow.note.content"].startswith("linear − softmax: test loss")
    # the children grouped by variant: a shared view of the experiment that `compare` links to
    shared = client.get_experiment(parent.info.experiment_id).tags[
        links.SHARED_VIEW_TAG + links.grouped_view_key(out.parent_run_id)
    ]
    assert json.loads(shared)["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "compare.model"}]
    assert links.run_links(out.parent_run_id, base="http://h").grouped.startswith("http://h/#/experiments/")
    # Readable in the UI: a bounded set of headline keys, metric first and the variant last (so both
    # variants share a chart section); the tails (other splits, families, lengths, tests) are tables.
    assert len(pm) <= keys.MAX_PARENT_KEYS, len(pm)
    # the declared primaries, labelled: the tag names them, the Holm-adjusted p's key names its family
    tags = parent.data.tags
    assert tags["compare.primaries"] == "eval/test/loss, eval/test/accuracy"
    assert tags["compare.primary_verdicts"].startswith("eval/test/loss: ")
    assert {k.rsplit("/", 1)[1] for k in pm if "/p_holm_" in k} <= {"p_holm_primary", "p_holm_secondary"}
    assert "eval/test/loss/p_holm_primary" in pm and "eval/test/ece/p_holm_secondary" in pm  # a loss: never tied
    assert "eval/test/ece/p_holm_primary" not in pm and "eval/test/accuracy/p_holm_secondary" not in pm
    assert not any(k.startswith(("softmax/", "linear/", "diff/")) for k in pm)
    assert not any(k.startswith(("eval/train", "eval/val")) or "/welch_p" in k for k in pm)
    assert re.fullmatch(r"compare-train-\d{4}-\d{6}", parent.info.run_name)
    tables = {a.path for a in client.list_artifacts(out.parent_run_id, "tables")}
    names = ("summary", "differences", "position_curves", "coverage", "embeddings")
    assert tables == {f"tables/{n}.json" for n in names}
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{out.parent_run_id}/tables/summary.json"))
    rows = {(r[0], r[1]): r for r in summary["data"]}
    assert summary["columns"][:3] == ["metric", "model", "mean"]
    assert rows[("eval/train/ece", "linear")][2] == pytest.approx(
        cmp.mean_ci([c.data.metrics["eval/train/ece"] for c in children if c.info.run_name.startswith("linear")]).mean
    )
    diffs = json.loads(mlflow.artifacts.load_text(f"runs:/{out.parent_run_id}/tables/differences.json"))
    assert "eval/val/accuracy/geometric" in {r[0] for r in diffs["data"]} and "welch_p" in diffs["columns"]

    top = {a.path for a in client.list_artifacts(out.parent_run_id)}
    figures = {a.path for a in client.list_artifacts(out.parent_run_id, "figures")}
    assert {"report.md", "config.yaml", "figures"} <= top
    assert figures == {
        f"figures/{n}.png"
        for n in (
            "loss_curves",
            "accuracy_per_family",
            "accuracy_by_position",
            "length_generalisation",
            "efficiency",
            "attention_softmax",
            "attention_linear",
            "embeddings_softmax",
            "embeddings_linear",
        )
    }
    report = mlflow.artifacts.load_text(f"runs:/{out.parent_run_id}/report.md")
    assert "## Headline" in report and "How to read the verdicts" in report and "![" in report
    assert "paired t-test on the 2 per-seed differences" in report
    assert "**Primary** (declared before the runs in compare.primaries: eval/test/loss, eval/test/accuracy" in report
    assert "**Secondary** (exploratory" in report
    assert "Holm-adjusted within this table of" in report
    assert {r["verdict"] for r in out.rows} <= {
        *(f"{v} better{by}" for v in ("linear", "softmax") for by in ("", ", by < 0.01")),
        "equivalent within ±0.01",
        "inconclusive",
        "n/a (no noise estimate)",  # 2 seeds of a tiny test set: the same count difference on both happens
    }
    assert [r["role"] for r in out.rows[:2]] == ["primary"] * 2  # compare_tiny.yaml declares loss and accuracy
    for key in ("diff", "diff_ci_low", "diff_ci_high", "p", "p_tost"):
        assert f"eval/test/accuracy/{key}" in pm
    # report.html: the report as MLflow's artifact viewer renders it, figures inlined at a legible dpi
    page = mlflow.artifacts.load_text(f"runs:/{out.parent_run_id}/report.html")
    assert page.startswith("<!doctype html>") and "<table>" in page and "<h2>Headline</h2>" in page
    assert page.count('src="data:image/png;base64,') == len(figures) and "](figures/" not in page
    png = mlflow.artifacts.download_artifacts(f"runs:/{out.parent_run_id}/figures/efficiency.png")
    from PIL import Image

    assert round(Image.open(png).info["dpi"][0]) == 150
    assert [r["metric"] for r in out.rows][:2] == ["test loss (NLL)", "test accuracy"]


@pytest.mark.slow
def test_registry_mode_reproduces_the_logged_metrics(in_compared: Compared, monkeypatch: pytest.MonkeyPatch):
    import pipelines.compare

    monkeypatch.setattr(pipelines.compare, "_figures", lambda *a, **k: [])  # checked above; seconds each
    out = in_compared.outcome
    trained = {c.info.run_name: c.data.metrics for c in _children(out.parent_run_id)}
    result = invoke(
        "compare",
        TINY_COMPARE,
        "--set",
        "compare.baseline=[picollm-compare-tiny-softmax/1, picollm-compare-tiny-softmax/2]",
        "--set",
        "compare.linear=[picollm-compare-tiny-linear/1, picollm-compare-tiny-linear/2]",
        "--set",
        "efficiency.enabled=false",
    )
    assert result.exit_code == 0, result.output
    assert "softmax (n=2) vs linear (n=2)" in result.stdout and "(registry, 4 child runs)" in result.stdout
    parents = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`compare.mode` = 'registry'", output_format="list"
    )
    assert len(parents) == 1
    children = _children(parents[0].info.run_id)
    assert len(children) == 4
    for c in children:  # version k was registered by the seed index k-1 child
        att, version = c.info.run_name.split("-")[0], c.info.run_name.rsplit("-v", 1)[1]
        source = trained[f"{att}-seed{int(version) - 1}"]
        m = c.data.metrics
        assert c.data.tags["compare.source_run"]
        for key in ("loss", "accuracy", "accuracy_predictable", "ceiling", "accuracy/random_walk"):
            assert m[f"eval/test/{key}"] == pytest.approx(source[f"test/{key}"], abs=1e-6), key
        for key in ("eval/val/accuracy", "eval/train/loss", "lengen/x4/beyond/accuracy", "eval/test/ece"):
            assert m[key] == pytest.approx(source[key], abs=1e-6), key
        assert m["source/test/accuracy"] == source["test/accuracy"]


# --------------------------------------------------------------------------------------------------
# Paired differences, TOST, Holm, verdicts, sequence bootstrap (checked against scipy where it has them)

# 3 seeds, each pair sharing init weights and data: the seed moves both models alike, linear is a bit
# better on every seed. Welch sees the seed spread (p = 0.79); the paired test sees d = (0.01, 0.01, 0.015).
SOFTMAX, LINEAR = [0.80, 0.85, 0.90], [0.81, 0.86, 0.915]


def test_paired_difference_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    d = cmp.difference(SOFTMAX, LINEAR, confidence=0.95, margin=0.01)
    assert d.test == "paired" and d.n == 3 and d.df == 2
    # by hand: mean 0.011667, s_d = 0.0028868, se = 0.0016667, t = 7.0, p = 0.019804
    assert d.mean == pytest.approx(0.0116667, abs=1e-7) and d.se == pytest.approx(0.0016667, abs=1e-7)
    assert d.p == pytest.approx(st.ttest_rel(LINEAR, SOFTMAX).pvalue, abs=1e-10)
    assert d.p == pytest.approx(0.019804, abs=1e-6) and cmp.paired_p(SOFTMAX, LINEAR) == d.p
    h = st.t.ppf(0.975, 2) * d.se
    assert (d.low, d.high) == pytest.approx((d.mean - h, d.mean + h), abs=1e-10)
    assert d.welch_p == pytest.approx(st.ttest_ind(LINEAR, SOFTMAX, equal_var=False).pvalue, abs=1e-10)
    assert d.welch_p > 0.7  # unpaired, the same numbers say nothing
    welch = cmp.difference(SOFTMAX, LINEAR, paired=False)
    assert welch.test == "welch" and welch.p == d.welch_p and welch.low < 0 < welch.high
    assert cmp.difference([0.8, 0.9], [0.8, 0.9, 1.0]).test == "welch"  # unequal n: no pairs
    assert cmp.difference([0.8], [0.9]) is None
    # no variance of the differences: no noise estimate, so no test and no interval (not "certain")
    same = cmp.difference([0.5, 0.6], [0.5, 0.6], margin=0.01)
    assert all(math.isnan(x) for x in (same.p, same.p_tost, same.low, same.high)) and not same.noise
    for confidence in (0.9, 0.99):
        for df in (1, 2, 5, 30):
            assert cmp.t_ppf(0.5 + confidence / 2, df) == pytest.approx(st.t.ppf(0.5 + confidence / 2, df), abs=1e-8)


def test_tost_matches_two_one_sided_scipy_tests():
    st = pytest.importorskip("scipy.stats")
    for a, b, margin in ((SOFTMAX, LINEAR, 0.02), ([0.8, 0.82, 0.81], [0.801, 0.819, 0.812], 0.01)):
        d = np.subtract(b, a)
        lower = st.ttest_1samp(d, -margin, alternative="greater").pvalue  # H0: difference <= -margin
        upper = st.ttest_1samp(d, margin, alternative="less").pvalue  # H0: difference >= margin
        assert cmp.difference(a, b, margin=margin).p_tost == pytest.approx(max(lower, upper), abs=1e-10)
    # Welch TOST by hand: the same one-sided t tests with the Welch standard error and df
    a, b, m = [0.80, 0.82, 0.81], [0.80, 0.83, 0.81], 0.03
    s = cmp.welch_stat(a, b)
    hand = max(st.t.sf((s.mean + m) / s.se, s.df), st.t.cdf((s.mean - m) / s.se, s.df))
    assert cmp.difference(a, b, margin=m, paired=False).p_tost == pytest.approx(hand, abs=1e-10)
    # Welch-Satterthwaite: (1e-4/3 + 2.3333e-4/3)^2 / ((1e-4/3)^2/2 + (2.3333e-4/3)^2/2) = 3.4483
    assert s.df == pytest.approx(3.448276, abs=1e-6)
    assert s.df == pytest.approx(float(st.ttest_ind(b, a, equal_var=False).df), abs=1e-9)


def test_holm_on_hand_computed_case():
    # sorted 0.005, 0.01, 0.03, 0.04 (k = 4): 4 * 0.005 = 0.02, 3 * 0.01 = 0.03, 2 * 0.03 = 0.06,
    # 1 * 0.04 = 0.04 -> 0.06 (monotone); NaN is not a test
    adj = cmp.holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert adj[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adj[4])
    assert cmp.holm([0.3, 0.6]) == pytest.approx([0.6, 0.6]) and cmp.holm([0.9, 0.8]) == [1.0, 1.0]
    assert cmp.holm([0.02]) == [0.02] and cmp.holm([]) == []
    runs = {  # a table of two: the p of each is adjusted against the other
        "softmax": [{"x": a, "y": a} for a in SOFTMAX],
        "linear": [{"x": b, "y": b + 0.1 * i} for i, b in enumerate(LINEAR)],
    }
    diffs = cmp.differences(runs)
    (px, tx), (py, ty) = cmp.holm_table(diffs, ["x", "y"]).values()
    ps, ts = sorted([diffs["x"].p, diffs["y"].p]), sorted([diffs["x"].p_tost, diffs["y"].p_tost])
    assert sorted([px, py]) == pytest.approx([2 * ps[0], max(2 * ps[0], ps[1])])
    assert sorted([tx, ty]) == pytest.approx([min(1.0, 2 * ts[0]), max(min(1.0, 2 * ts[0]), ts[1])])


def test_the_four_verdicts():
    assert cmp.verdict(0.02, 0.01, 0.9, 0.01, 0.05, higher_better=True) == "linear better"
    assert cmp.verdict(0.02, 0.01, 0.9, 0.01, 0.05, higher_better=False) == "softmax better"  # e.g. a loss
    assert cmp.verdict(-0.02, 0.01, 0.9, 0.01, 0.05, higher_better=True) == "softmax better"
    assert cmp.verdict(0.001, 0.6, 0.01, 0.01, 0.05, True) == "equivalent within ±0.01"
    assert cmp.verdict(0.02, 0.3, 0.4, 0.01, 0.05, True) == "inconclusive"
    assert cmp.verdict(0.02, 0.05, 0.05, 0.01, 0.05, True) == "inconclusive"  # p < alpha, strictly
    assert cmp.verdict(0.02, math.nan, math.nan, 0.01, 0.05, True).startswith("n/a")
    # the same from runs, through the headline table (each row its own metric, Holm over the 4 tested)
    base = [0.80, 0.85, 0.90]
    deltas = {
        "better": (0.010, 0.011, 0.010),
        "worse": (-0.010, -0.011, -0.010),
        "equivalent": (0.0005, -0.0005, 0.0002),
        "noisy": (0.03, -0.02, 0.01),
    }
    runs = {
        "softmax": [{k: a for k in deltas} for a in base],
        "linear": [{k: a + deltas[k][i] for k in deltas} for i, a in enumerate(base)],
    }
    runs["softmax"][0]["single"] = 0.5
    runs["linear"][0]["single"] = 0.6
    agg, diffs = cmp.aggregate(runs), cmp.differences(runs, margin=0.01, margins={"noisy": 0.02})
    keys = [(k, k, True) for k in (*deltas, "single")]
    rows = {r["metric"]: r for r in cmp.summary_rows(agg, diffs, keys, alpha=0.05)}
    assert {k: r["verdict"] for k, r in rows.items()} == {
        "better": "linear better",
        "worse": "softmax better",
        "equivalent": "equivalent within ±0.01",
        "noisy": "inconclusive",
        "single": cmp.NA_RUNS,
    }
    assert rows["noisy"]["margin"] == "0.02" and rows["single"]["p"] == "-" and rows["single"]["diff"] == "+0.100"
    assert rows["better"]["diff"].startswith("+0.010 ± ") and rows["better"]["test"] == "paired"
    metrics = cmp.aggregate_metrics(agg, diffs)
    assert metrics["diff/better/p"] == diffs["better"].p and metrics["diff/better/ci_low"] == diffs["better"].low
    assert metrics["diff/better/welch_p"] == diffs["better"].welch_p and "diff/better/p_tost" in metrics
    assert metrics["diff/single/mean"] == pytest.approx(0.1) and "diff/single/p" not in metrics


def test_sequence_bootstrap_ci():
    # identical sequences: every resample has the same accuracy, a zero-width interval at 3/5
    iv = cmp.sequence_bootstrap_ci([3] * 10, [5] * 10, 0.95, n_boot=500, seed=1)
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.6, 0.6, 0.6, 10)
    correct, targets = [5, 0, 3, 4, 2, 5, 1, 4], [5, 4, 5, 6, 3, 5, 2, 5]
    iv = cmp.sequence_bootstrap_ci(correct, targets, 0.95, n_boot=4000, seed=0)
    assert iv.mean == pytest.approx(24 / 35)  # sum correct / sum targets, not a mean of per-sequence ratios
    assert 0 <= iv.low < iv.mean < iv.high <= 1
    assert iv == cmp.sequence_bootstrap_ci(correct, targets, 0.95, n_boot=4000, seed=0)  # seeded
    assert iv != cmp.sequence_bootstrap_ci(correct, targets, 0.95, n_boot=4000, seed=1)
    st = pytest.importorskip("scipy.stats")
    ref = st.bootstrap(
        (np.array(correct), np.array(targets)),
        lambda c, t: c.sum() / t.sum(),
        paired=True,
        vectorized=False,
        n_resamples=4000,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    assert (iv.low, iv.high) == pytest.approx((ref.low, ref.high), abs=0.03)  # other resamples, same interval
    assert math.isnan(cmp.sequence_bootstrap_ci([], []).mean)
    with pytest.raises(ValueError):
        cmp.sequence_bootstrap_ci([1, 2], [3])


def test_sequence_counts_from_predictions(counting_data):
    cfg, data, _, long, _ = counting_data
    test = to_padded(data.test, cfg.pad_id, data.families)
    correct, _, _ = cmp.predict(CountingStub(32, good_until=4), test)
    c, t = cmp.sequence_counts(correct, cmp.valid_targets(test))
    assert list(t) == [len(s) - 1 for s in data.test.sequences]  # every target of each sequence
    assert list(c) == [min(3, n) for n in t]  # positions 1..3 right, the rest wrong
    metrics, _ = cmp.evaluate_model(CountingStub(32, good_until=4), {"test": test})
    iv = cmp.sequence_bootstrap_ci(c, t, n_boot=200)
    assert iv.mean == pytest.approx(metrics["eval/test/accuracy"])
    # the paired difference of two models on the same sequences: correct_b - correct_a per sequence
    perfect, _, _ = cmp.predict(CountingStub(32), test)
    cb, _ = cmp.sequence_counts(perfect, cmp.valid_targets(test))
    diff = cmp.sequence_bootstrap_ci(cb - c, t, n_boot=200)
    assert diff.mean == pytest.approx(1 - metrics["eval/test/accuracy"]) and 0 < diff.low <= diff.high
    # one run a side: the headline shows these intervals instead of none
    runs = {"softmax": [{"eval/test/accuracy": iv.mean}], "linear": [{"eval/test/accuracy": 1.0}]}
    agg = cmp.aggregate(runs)
    ones = cmp.sequence_bootstrap_ci(cb, t, n_boot=200)
    seq_ci = {"softmax": {"eval/test/accuracy": iv}, "linear": {"eval/test/accuracy": ones}}
    seq_ci["diff"] = {"eval/test/accuracy": diff}
    [row] = cmp.summary_rows(agg, {}, [("eval/test/accuracy", "test accuracy", True)], 0.05, seq_ci)
    assert row["softmax"] == cmp.fmt_interval(iv) and "[" in row["softmax"] and row["linear"] == "1.000 ± 0.000"
    assert row["diff"] == cmp.fmt_interval(diff, sign="+") and row["verdict"].startswith("n/a")
    assert cmp.aggregate_metrics(agg, {}, seq_ci)["diff/eval/test/accuracy/seq_ci_low"] == diff.low


def test_report_states_test_margin_and_holm():
    keys = cmp.headline_keys([1, 2])
    runs = {
        att: [
            {
                **{
                    k: 0.8 + 0.05 * i + (0.01 * (j + 1) + 0.002 * i if att == "linear" else 0)
                    for j, (k, _, _) in enumerate(keys)
                },
                "eval/test/accuracy/counting": 0.9 + 0.01 * i,
                "eval/val/confidence": 0.7,
            }
            for i in range(3)
        ]
        for att in cmp.MODELS
    }
    r = report_input(runs, keys, families=["counting"], factors=[1, 2], ci_text="95 % Student-t interval")
    text = cmp.render_report(r)
    headline = text.split("## Headline")[1].split("## Every split")[0]
    assert "| metric | softmax | linear | linear − softmax | p | p TOST | verdict |" in headline
    assert "paired t-test on the 3 per-seed differences" in headline and "TOST" in headline
    assert f"Holm-adjusted within this table of {len(keys)} tests" in headline and "alpha = 0.05" in headline
    assert "How to read the verdicts" in headline and "within noise" not in text.lower()
    assert "p-values Holm-adjusted within this table of 1 tests" in text  # per family: its own table of one
    welch = cmp.render_report(
        dataclasses.replace(r, mode="registry", diffs=cmp.differences_vs_baseline(runs, paired=False))
    )
    assert "Welch's unequal-variance t-test" in welch and "the runs are not paired: registry mode" in welch


def test_parent_keys_are_the_headline_with_the_variant_last():
    """Whatever the number of metrics per run, the parent logs 11 keys per headline metric and 3 per family."""
    rng = np.random.default_rng(0)
    tail = [f"eval/{s}/accuracy/{f}" for s in ("train", "val", "test") for f in ("counting", "geometric")]
    names = ["eval/test/accuracy", "eval/test/loss", "lengen/x8/beyond/accuracy", *tail]
    names += [f"lengen/x{f}/{k}" for f in (1, 2, 4, 8) for k in ("accuracy", "loss", "ceiling")]
    runs = {att: [{k: float(rng.random()) for k in names} for _ in range(3)] for att in cmp.MODELS}
    agg, diffs = cmp.aggregate(runs), cmp.differences(runs)
    headline = ["eval/test/accuracy", "eval/test/loss", "lengen/x8/beyond/accuracy"]
    m = keys.headline_metrics(agg, diffs, headline) | keys.family_metrics(agg, ["counting", "geometric"])
    assert len(m) == 11 * len(headline) + 3 * 2
    acc = agg["linear"]["eval/test/accuracy"]
    assert (m["eval/test/accuracy/linear"], m["eval/test/accuracy/linear_ci_high"]) == (acc.mean, acc.high)
    assert m["eval/test/accuracy/p"] == diffs["eval/test/accuracy"].p
    assert m["eval/test/accuracy/counting/diff"] == pytest.approx(
        agg["linear"]["eval/test/accuracy/counting"].mean - agg["softmax"]["eval/test/accuracy/counting"].mean
    )
    assert {k.rsplit("/", 1)[1] for k in m} <= {
        f"{v}{s}" for v in ("softmax", "linear", "diff") for s in ("", "_ci_low", "_ci_high")
    } | {"p", "p_tost"}
    table = keys.table_json_safe(keys.summary_table(agg))
    assert len(table["metric"]) == 2 * len(names) and set(table) >= {"metric", "model", "mean", "ci_low", "n"}
    assert keys.table_json_safe({"x": [math.nan, 1.0]}) == {"x": [None, 1.0]}


def test_report_html_inlines_figures_and_renders_tables():
    md = "# T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![cap [0, 1]](figures/x.png)\n\n![other](figures/missing.png)\n"
    page = cmp.report_html(md, {"figures/x.png": b"\x89PNG fake"})
    assert "<table>" in page and "<td>2</td>" in page
    assert 'src="data:image/png;base64,iVBORyBmYWtl"' in page and 'alt="cap [0, 1]"' in page
    assert 'src="figures/missing.png"' in page  # unknown paths stay links


def report_input(runs: dict, items: list, **fields) -> cmp.ReportInput:
    """A train-mode report of `runs` (three seeds per variant) with a headline table of `items`."""
    agg, diffs = cmp.aggregate(runs), cmp.differences_vs_baseline(runs)
    base = {
        "title": "t", "mode": "train", "parent_run_id": "abc", "seconds": 1.0, "setup": [], "families": [],
        "factors": [], "train_len": 8, "alpha": 0.05, "ci_text": "95 %", "coverage": {}, "efficiency": None,
        "figures": [], "runs": {v: ["seed0", "seed1", "seed2"] for v in runs},
    }  # fmt: skip
    rows = cmp.comparison_rows(agg, diffs, items, 0.05)
    return cmp.ReportInput(**base | {"agg": agg, "diffs": diffs, "rows": rows} | fields)
