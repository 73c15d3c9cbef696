"""`picollm compare`: intervals and tests on hand-computed numbers, calibration, length generalisation
on a hand-checkable stub, input errors before any run, and (slow) the parent/child run structure and
the registry mode reproducing the training runs' metrics.

Every test runs in its own MLflow store and working directory (conftest's autouse `mlflow_tmp`:
MLFLOW_TRACKING_URI=sqlite:///<tmp>/mlflow.db, chdir to tmp, picollm.tracking._initialised cleared).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from picollm import compare as cmp
from picollm.config import CompareConfig, DataConfig, ModelConfig, load_config
from picollm.data import build_data, to_padded
from picollm.errors import ConfigError

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
    boot = cmp.mean_ci([0.1, 0.2, 0.3, 0.4], method="bootstrap", n_boot=2000)
    assert 0.1 <= boot.low < boot.mean < boot.high <= 0.4
    assert boot == cmp.mean_ci([0.1, 0.2, 0.3, 0.4], method="bootstrap", n_boot=2000)  # seeded


def test_welch_p_on_hand_computed_case():
    # t = 0.036667 / sqrt(1e-4/3 + 2.3333e-4/3) = 3.4785, Welch df = 3.448 -> p = 0.03220
    # (scipy.stats.ttest_ind(a, b, equal_var=False).pvalue = 0.032199)
    a, b = [0.80, 0.82, 0.81], [0.85, 0.83, 0.86]
    assert cmp.welch_p(a, b) == pytest.approx(0.032199, abs=1e-5)
    assert cmp.welch_p(a, a) == pytest.approx(1.0)
    assert cmp.welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0  # no variance, same value
    assert cmp.welch_p([1.0, 1.0], [0.0, 0.0]) == 0.0
    assert math.isnan(cmp.welch_p([0.8], [0.9, 0.95]))


def test_summary_rows_say_within_noise():
    runs = {
        "softmax": [{"eval/test/accuracy": v} for v in (0.80, 0.82, 0.81)],
        "linear": [{"eval/test/accuracy": v} for v in (0.85, 0.83, 0.86)],
    }
    agg, pvals = cmp.aggregate(runs), cmp.p_values(runs)
    [row] = cmp.summary_rows(agg, pvals, [("eval/test/accuracy", "test accuracy", True)], alpha=0.05)
    assert row["verdict"] == "linear better" and row["welch_p"] == "0.032"
    [row] = cmp.summary_rows(agg, pvals, [("eval/test/accuracy", "test accuracy", True)], alpha=0.01)
    assert row["verdict"] == "within noise"
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
    from picollm.evaluation import evaluate
    from picollm.model import Transformer

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
        assert len(client.get_metric_history(c.info.run_id, "eval/test/accuracy_by_position")) == 11

    pm = parent.data.metrics
    for att in ("softmax", "linear"):
        accs = [c.data.metrics["eval/test/accuracy"] for c in children if c.info.run_name.startswith(att)]
        iv = cmp.mean_ci(accs)
        assert pm[f"{att}/eval/test/accuracy/mean"] == pytest.approx(iv.mean)
        assert pm[f"{att}/eval/test/accuracy/ci_low"] == pytest.approx(iv.low)
        assert pm[f"{att}/num_params"] > 0
    assert pm["softmax/num_params"] == pm["linear/num_params"]  # matched architectures
    assert "diff/eval/test/accuracy/welch_p" in pm and "efficiency/linear/step_ms" in pm

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
    assert "## Headline" in report and "Within noise" in report and "![" in report
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
