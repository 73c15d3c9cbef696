"""`picollm compare` over N variants: config validation, the N-variant tables and parent keys on hand-made
numbers, the lr grid's choice, MQAR recall accuracy on hand-checkable stubs, and (slow) one tiny 3-variant
comparison with an lr grid and a recall report end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from picollm import compare as cmp
from picollm.compare import keys, lr_grid, recall
from picollm.config import CompareConfig, DataConfig, load_config
from picollm.errors import ConfigError

from .conftest import REPO, copy_store, mlflow_store
from .test_compare import report_input

TINY_COMPARE = REPO / "configs" / "compare_tiny.yaml"
THREE = (
    "compare.variants=[{name: softmax}, {name: linear, model: {attention: linear}},"
    " {name: delta, model: {attention: deltanet}}]"
)


# --------------------------------------------------------------------------------------------------
# Config


def test_variants_default_to_softmax_then_linear_and_first_is_baseline():
    cc = load_config(CompareConfig, TINY_COMPARE).compare
    assert cc.names == ["softmax", "linear"] and cc.baseline == "softmax" and not cc.registry
    cfg = load_config(CompareConfig, TINY_COMPARE, [THREE])
    assert cfg.compare.baseline == "softmax" and cfg.compare.names[-1] == "delta"
    assert [cfg.variant_model(v).attention for v in cfg.compare.variants] == ["softmax", "linear", "deltanet"]
    assert cfg.variant_model(cfg.compare.variants[1]).d_model == cfg.model.d_model  # the shared section


def test_legacy_baseline_and_linear_name_the_two_variants_models():
    cc = load_config(CompareConfig, TINY_COMPARE, ["compare.baseline=a@champion", "compare.linear=[b/1, b/2]"]).compare
    assert cc.registry and [v.models for v in cc.variants] == [["a@champion"], ["b/1", "b/2"]]
    with pytest.raises(ConfigError, match="with more, give each variant's references"):
        load_config(CompareConfig, TINY_COMPARE, [THREE, "compare.baseline=a", "compare.linear=b"])


@pytest.mark.parametrize(
    "variants, fragment",
    [
        ("[{name: a}, {name: a, model: {attention: linear}}]", "'a' is used twice"),
        ("[{name: a}, {name: b, model: {heads: 3}}]", "variant b: model.heads: unknown key"),
        ("[{name: a}, {name: b, model: {attention: mamba}}]", "variant b: model.attention"),
        ("[{name: a}, {name: b, model: {d_model: 15}}]", "variant b: model"),
        ("[{name: a}, {name: b, train: {lr: -1}}]", "variant b: train.lr"),
        ("[{name: a}, {name: b/c}]", "not a valid variant name"),
        ("[{name: a}, {name: diff}]", "reserved"),
        ("[{name: a}]", "at least 2"),
        ("[{name: a, models: [x@y]}, {name: b}]", "b give no models"),
    ],
)
def test_bad_variants_are_one_clear_error(variants, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(CompareConfig, TINY_COMPARE, [f"compare.variants={variants}"])


def test_recall_and_grid_settings_are_checked():
    with pytest.raises(ConfigError, match="needs the mqar family"):
        load_config(CompareConfig, TINY_COMPARE, ["compare.recall_pairs=[2]"])
    with pytest.raises(ConfigError, match="lr_grid must be distinct"):
        load_config(CompareConfig, TINY_COMPARE, ["compare.lr_grid=[0.1, 0.1]"])
    with pytest.raises(ConfigError, match="need train mode"):
        load_config(CompareConfig, TINY_COMPARE, ["compare.baseline=a", "compare.linear=b", "compare.lr_grid=[0.1]"])
    with pytest.raises(ConfigError, match="variant softmax at d_model 6: model: d_model"):  # 4 heads do not divide 6
        load_config(CompareConfig, TINY_COMPARE, ["compare.d_models=[6]", "model.n_heads=4"])


# --------------------------------------------------------------------------------------------------
# N-variant tables and parent keys

BASE, LIN, DELTA = [0.80, 0.85, 0.90], [0.81, 0.86, 0.915], [0.70, 0.76, 0.79]


def _runs() -> dict[str, list[dict[str, float]]]:
    return {
        name: [{"eval/test/accuracy": a, "eval/test/loss": 1 - a} for a in vals]
        for name, vals in (("softmax", BASE), ("linear", LIN), ("delta", DELTA))
    }


def test_every_variant_is_tested_against_the_baseline_with_holm_over_the_table():
    st = pytest.importorskip("scipy.stats")
    runs = _runs()
    diffs = cmp.differences_vs_baseline(runs)
    assert list(diffs) == ["linear", "delta"]
    for name, vals in (("linear", LIN), ("delta", DELTA)):
        d = diffs[name]["eval/test/accuracy"]
        assert d.test == "paired" and d.mean == pytest.approx(np.mean(np.subtract(vals, BASE)))
        assert d.p == pytest.approx(st.ttest_rel(vals, BASE).pvalue, abs=1e-10)
    agg = cmp.aggregate(runs)
    items = [("eval/test/accuracy", "test accuracy", True), ("eval/test/loss", "test loss", False)]
    rows = cmp.comparison_rows(agg, diffs, items, alpha=0.05)
    assert [(r["metric"], r["variant"]) for r in rows] == [
        ("test accuracy", "linear"),
        ("test accuracy", "delta"),
        ("test loss", "linear"),
        ("test loss", "delta"),
    ]
    raw = [diffs[r["variant"]][r["key"]].p for r in rows]
    adjusted = cmp.holm(raw)  # one family of 4 tests: both metrics, both variants
    assert [r["p"] for r in rows] == [cmp.fmt_p(p) for p in adjusted]
    acc_delta = rows[1]
    assert acc_delta["baseline"] == "softmax" and acc_delta["softmax"] == cmp.fmt_interval(
        agg["softmax"]["eval/test/accuracy"]
    )
    assert acc_delta["verdict"] in ("softmax better", "inconclusive")  # the verdict names the two variants
    assert rows[0]["verdict"] in ("linear better", "inconclusive", "equivalent within ±0.01")


def test_parent_keys_with_three_variants_are_compact_and_variant_last():
    runs = _runs()
    agg, diffs = cmp.aggregate(runs), cmp.differences_vs_baseline(runs)
    names = list(runs)
    m = keys.headline_metrics(agg, diffs, ["eval/test/accuracy", "eval/test/loss"], variants=names)
    # per metric: a mean per variant, and each other variant's difference and p: 3 + 2 * 2
    assert len(m) == 2 * 7
    assert m["eval/test/accuracy/delta"] == pytest.approx(np.mean(DELTA))
    assert m["eval/test/accuracy/delta_diff"] == pytest.approx(diffs["delta"]["eval/test/accuracy"].mean)
    assert m["eval/test/accuracy/linear_p"] == diffs["linear"]["eval/test/accuracy"].p
    assert all(k.rsplit("/", 1)[1].split("_")[0] in names for k in m)  # the variant is the last part
    two = {k: v for k, v in runs.items() if k != "delta"}
    two_m = keys.headline_metrics(cmp.aggregate(two), cmp.differences_vs_baseline(two), ["eval/test/accuracy"])
    assert "eval/test/accuracy/diff" in two_m and "eval/test/accuracy/linear_ci_low" in two_m  # as before
    table = keys.differences_table(diffs)
    assert table["variant"] == ["linear", "linear", "delta", "delta"]


def test_report_with_three_variants_has_a_column_per_comparison():
    runs = _runs()
    r = report_input(runs, [("eval/test/accuracy", "test accuracy", True)])
    text = cmp.render_report(r)
    assert "| metric | softmax | linear | delta | linear − softmax | delta − softmax |" in text
    assert "each variant against the baseline softmax" in text and "## Length generalisation" not in text


# --------------------------------------------------------------------------------------------------
# The lr grid


def test_best_lr_takes_the_best_validation_score():
    assert lr_grid.best_lr({1e-3: 0.9, 3e-3: 0.7, 1e-2: math.nan}, higher_better=False) == 3e-3  # a loss
    assert lr_grid.best_lr({1e-3: 0.2, 3e-3: 0.6, 1e-2: math.nan}, higher_better=True) == 3e-3  # an accuracy
    assert lr_grid.best_lr({1e-3: 0.5, 3e-3: 0.5}, higher_better=True) == 1e-3  # ties: the earlier lr
    assert lr_grid.best_lr({1e-3: math.nan, 3e-3: math.nan}, higher_better=True) == 1e-3  # all diverged
    assert lr_grid.score_name(["counting"]) == ("val/loss", False)
    assert lr_grid.score_name(["mqar", "copy"]) == ("val/accuracy_answer/mqar", True)
    assert lr_grid.score_name(["mqar"], "val/ece") == ("val/ece", False)
    history = [{"val/loss": 2.0}, {"val/loss": 1.5}]
    assert lr_grid.grid_score(history, "val/loss") == 1.5 and math.isnan(lr_grid.grid_score([], "val/loss"))


# --------------------------------------------------------------------------------------------------
# Recall accuracy on hand-checkable stubs


class RecallStub(nn.Module):
    """Reads MQAR's layout (k1 v1 .. kP vP q1 a1 .. qQ aQ): after a key seen earlier, predicts the value
    that followed it, for the first `answered` queries of each sequence (all: None); else the pad."""

    def __init__(self, vocab: int, pairs: int, answered: int | None = None) -> None:
        super().__init__()
        self.vocab, self.pairs, self.answered = vocab, pairs, answered
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pred = torch.full_like(tokens, self.vocab - 1)
        p = self.pairs
        for b in range(tokens.shape[0]):
            lookup = {int(tokens[b, 2 * i]): int(tokens[b, 2 * i + 1]) for i in range(p)}
            for q in range(self.answered if self.answered is not None else p):
                t = 2 * p + 2 * q  # position of the q-th query key; its answer is the next target
                if t < tokens.shape[1]:
                    pred[b, t] = lookup.get(int(tokens[b, t]), self.vocab - 1)
        return torch.nn.functional.one_hot(pred, self.vocab).float() * 10


def test_recall_accuracy_counts_only_the_answers():
    cfg = DataConfig(
        seq_types=["mqar"],
        mqar_layout="fed_back",
        vocab_size=40,
        mqar_pairs=[4],
        mqar_key_vocab=16,
        mqar_value_vocab=16,
        max_len=16,
        n_train=40,
        n_val=8,
        n_test=12,
    )
    [split] = recall.recall_splits(cfg, [4]).values()  # 12 sequences, 4 answers each
    assert len(split.split) == 12 and int(split.answers.sum()) == 12 * 4  # not the forced last query key
    assert recall.recall_accuracy(RecallStub(40, 4), split) == 1.0
    assert recall.recall_accuracy(RecallStub(40, 4, answered=0), split) == 0.0
    assert recall.recall_accuracy(RecallStub(40, 4, answered=1), split) == pytest.approx(1 / 4)  # 1 of 4 queries
    assert recall.recall_data_config(cfg, 2).mqar_pairs == [2]
    values = {("a", None, 4): [0.5, 0.7], ("a", None, 8): [0.2, 0.2]}
    table = recall.recall_table(values)
    assert table["pairs"] == [4, 8] and table["mean"] == pytest.approx([0.6, 0.2])
    iv = cmp.mean_ci([0.5, 0.7])
    assert (table["ci_low"][0], table["ci_high"][0]) == pytest.approx((iv.low, iv.high))
    per = {"a": {4: iv, 8: cmp.mean_ci([0.2, 0.2])}, "b": {4: cmp.mean_ci([0.9, 1.0]), 8: cmp.mean_ci([0.4, 0.5])}}
    cmp.close(cmp.recall_curves(per, baselines={4: {"chance": 0.1, "copy": 0.25}}, trained=[4]))
    cmp.close(cmp.recall_vs_width({4: {"a": {16: iv, 32: iv}}}))


# --------------------------------------------------------------------------------------------------
# End to end: three variants, an lr grid with a known answer, the recall report


@pytest.fixture(scope="module")
def three_way(tmp_path_factory: pytest.TempPathFactory, store_template: Path):
    from pipelines.compare import run

    directory = tmp_path_factory.mktemp("compare_variants_store")
    copy_store(store_template, directory)
    overrides = [
        THREE,
        "data.seq_types=[counting, mqar]",
        "data.max_len=16",
        "data.mqar_pairs=[2, 3]",
        "data.mqar_key_vocab=8",
        "data.mqar_value_vocab=8",
        "compare.length_factors=[]",
        "compare.recall_pairs=[2, 3]",
        # 1e-6 leaves the model at its initial loss; 0.02 learns in one epoch: the grid must pick 0.02
        "compare.lr_grid=[0.000001, 0.02]",
        "compare.lr_grid_epochs=1",
        "compare.lr_grid_metric=val/loss",
        "efficiency.gen_contexts=[8]",
        "efficiency.lengths=[16]",
        "tracking.registered_model=null",
        "tracking.log_model=false",
    ]
    import matplotlib.pyplot as plt

    import pipelines.compare
    from picollm.training import plots

    with mlflow_store(directory), pytest.MonkeyPatch.context() as mp:
        # The per-run and per-variant figures are checked in test_compare; here they would cost half the time.
        for name in ("training_curves", "family_accuracy"):
            mp.setattr(plots, name, lambda *a, **k: plt.figure(figsize=(1, 1)))
        mp.setattr(pipelines.compare, "_figures", lambda *a, **k: [])
        outcome = run(load_config(CompareConfig, TINY_COMPARE, overrides))
        client = MlflowClient()
        children = mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'",
            output_format="list",
        )
        parent = client.get_run(outcome.parent_run_id)
        report = mlflow.artifacts.load_text(f"runs:/{outcome.parent_run_id}/report.md")
        tables = {a.path for a in client.list_artifacts(outcome.parent_run_id, "tables")}
        figures = {a.path for a in client.list_artifacts(outcome.parent_run_id, "figures")}
        grid = json.loads(mlflow.artifacts.load_text(f"runs:/{outcome.parent_run_id}/tables/lr_grid.json"))
    return outcome, children, parent, report, tables, figures, grid


@pytest.mark.slow
def test_three_variants_one_child_per_variant_and_seed(three_way):
    outcome, children, parent, report, tables, figures, grid = three_way
    seeded = sorted(c.info.run_name for c in children if "compare.lr_grid" not in c.data.tags)
    assert seeded == [f"{v}-seed{s}" for v in ("delta", "linear", "softmax") for s in (0, 1)]
    assert sorted(c.info.run_name for c in children if "compare.lr_grid" in c.data.tags) == [
        f"{v}-lr{lr}" for v in ("delta", "linear", "softmax") for lr in ("0.02", "1e-06")
    ]
    pm = parent.data.metrics
    assert len(pm) <= keys.MAX_PARENT_KEYS
    # paired statistics against the baseline, from the children's own metrics
    by = {c.info.run_name: c.data.metrics for c in children}
    for v in ("linear", "delta"):
        a = [by[f"softmax-seed{s}"]["eval/test/accuracy"] for s in (0, 1)]
        b = [by[f"{v}-seed{s}"]["eval/test/accuracy"] for s in (0, 1)]
        assert f"eval/test/accuracy/{v}" not in pm  # each variant's own values: its children's
        assert pm[f"eval/test/accuracy/{v}_diff"] == pytest.approx(np.mean(np.subtract(b, a)))
        if math.isfinite(cmp.paired_p(a, b)):
            assert pm[f"eval/test/accuracy/{v}_p"] == pytest.approx(cmp.paired_p(a, b))
        assert f"recall/accuracy/{v}" in pm and f"scaling/state_floats/{v}" in pm
    assert not any(k.startswith(("eval/train", "eval/val")) or "_ci_" in k for k in pm)
    # the lr grid: every variant picks the lr that learned, and its seeded runs used it
    assert outcome.lrs == {"softmax": 0.02, "linear": 0.02, "delta": 0.02}
    assert "chosen" in grid["columns"] and len(grid["data"]) == 6
    assert parent.data.params["compare.lr.delta"] == "0.02"
    assert "## Learning rate per variant" in report and "chosen lr" in report
    # the recall report: table and figure
    assert "## Associative recall (MQAR)" in report and "| variant | 2 pairs | 3 pairs |" in report
    assert "figures/recall_vs_pairs.png" in figures and {"tables/lr_grid.json", "tables/recall.json"} <= tables
    assert "state floats / layer" in report
