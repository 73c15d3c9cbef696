"""Runs that know whether they reproduced: the verdict (pure), the `reference:` section, and a tiny run
that matches its reference and one, a default changed, that names the drift."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from picollm.config import ReferenceResults, TrainRunConfig, load_config
from picollm.errors import ConfigError
from picollm.training.reproduce import check
from picollm.training.run import _check_reference
from pipelines.cli import app

from .conftest import REPO, TINY


def reference(**metrics: tuple[float, float]) -> ReferenceResults:
    return ReferenceResults(
        metrics={k.replace("__", "/"): {"value": v, "tolerance": t} for k, (v, t) in metrics.items()},
        source="test",
    )


def test_verdict_matches_drifts_and_misses():
    ref = reference(test__accuracy=(0.838, 0.004), test__loss=(0.481, 0.01))
    ok = check({"test/accuracy": 0.8405, "test/loss": 0.475, "val/loss": 9.0}, ref)
    assert ok.outcome == "true"
    assert ok.line == "matches the reference (test/accuracy 0.841 vs 0.838 ± 0.004; test/loss 0.475 vs 0.481 ± 0.010)"
    assert ok.tags() == {"reproduced": "true", "reproduced.test/accuracy": "true", "reproduced.test/loss": "true"}

    half = check({"test/accuracy": 0.812, "test/loss": 0.48}, ref)
    assert half.outcome == "partial"
    assert half.line == (
        "does not match the reference: test/accuracy 0.812 vs reference 0.838 ± 0.004: drifted (1 of 2 metrics match)"
    )
    assert half.tags()["reproduced.test/accuracy"] == "false"

    none = check({"test/accuracy": 0.9}, ref)  # one drifted (above counts too), one never logged
    assert none.outcome == "false"
    assert "test/accuracy 0.900 vs reference 0.838 ± 0.004: drifted" in none.line
    assert "test/loss not logged vs reference 0.481 ± 0.010: missing" in none.line
    assert none.tags()["reproduced.test/loss"] == "missing"
    assert check({"test/accuracy": float("nan"), "test/loss": 0.48}, ref).outcome == "partial"  # NaN never matches


def test_verdict_edges_of_the_tolerance():
    ref = reference(test__accuracy=(0.8, 0.05))
    assert check({"test/accuracy": 0.85}, ref).outcome == "true"  # exactly at the edge (float rounding aside)
    assert check({"test/accuracy": 0.75}, ref).outcome == "true"
    assert check({"test/accuracy": 0.8501}, ref).outcome == "false"
    fine = check({"test/accuracy": 0.80001}, reference(test__accuracy=(0.8, 0.0002)))
    assert fine.line == "matches the reference (test/accuracy 0.8000 vs 0.8000 ± 0.0002)"  # tolerance's digits


def test_reference_section_is_validated(tmp_path: Path):
    raw = yaml.safe_load(TINY.read_text())
    path = tmp_path / "ref.yaml"

    def load(metric: dict, **extra: str) -> TrainRunConfig:
        raw["reference"] = {"source": "x", "metrics": {"test/accuracy": metric}, **extra}
        path.write_text(yaml.safe_dump(raw))
        return load_config(TrainRunConfig, path, [])

    typo = r"reference\.tolerance_form: unknown key \(did you mean reference\.tolerance_from\?\)"
    with pytest.raises(ConfigError, match=typo):
        load({"value": 0.5, "tolerance": 0.1}, tolerance_form="3 sd")
    with pytest.raises(ConfigError, match=r"reference\.metrics\.test/accuracy\.tolerance: .*greater than 0"):
        load({"value": 0.5, "tolerance": 0})
    with pytest.raises(ConfigError, match=r"reference\.metrics\.test/accuracy\.tolerance: Field required"):
        load({"value": 0.5})
    assert load({"value": 0.5, "tolerance": 0.1}).reference.metrics["test/accuracy"].tolerance == 0.1
    assert load_config(TrainRunConfig, TINY, []).reference is None  # no section: no check


@pytest.mark.parametrize("name", ["linear", "baseline"])
def test_shipped_configs_carry_their_reference(name: str):
    ref = load_config(TrainRunConfig, REPO / "configs" / f"{name}.yaml", []).reference
    assert ref is not None and {"test/accuracy", "test/accuracy_vs_ceiling", "test/loss"} <= ref.metrics.keys()
    assert ref.source and ref.tolerance_from


def test_no_reference_section_no_check():
    assert _check_reference(None, load_config(TrainRunConfig, TINY, []), {"test/accuracy": 0.5}, "1") is None  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_run_says_whether_it_reproduced(tmp_path: Path, migrated_store: str):
    runner = CliRunner()
    raw = yaml.safe_load(TINY.read_text())
    path = tmp_path / "tiny_ref.yaml"

    def train_against(reference: dict[str, float]) -> tuple[str, mlflow.entities.Run]:
        raw["reference"] = {
            "source": "test_reproduce",
            "metrics": {k: {"value": v, "tolerance": 1e-4} for k, v in reference.items()},
        }
        path.write_text(yaml.safe_dump(raw))
        result = runner.invoke(app, ["train", str(path), "--set", "train.epochs=1"])
        assert result.exit_code == 0, result.output
        [run] = mlflow.search_runs(search_all_experiments=True, max_results=1, output_format="list")
        return result.stdout, run

    # A reference the run cannot reach: the verdict names the metric that drifted.
    out, drifted = train_against({"test/accuracy": 0.0, "test/loss": 50.0})
    assert "does not match the reference: test/accuracy " in out and "vs reference 0.0000 ± 0.0001: drifted" in out
    assert drifted.data.tags["reproduced"] == "false"
    assert drifted.data.tags["reproduced.test/loss"] == "false"
    assert not any(k.startswith("reference") for k in drifted.data.params)  # expectations, not settings

    # Its own results as the reference (runs on the CPU are deterministic): the same config matches.
    got = drifted.data.metrics
    out, same = train_against({"test/accuracy": got["test/accuracy"], "test/loss": got["test/loss"]})
    assert "matches the reference (test/accuracy " in out
    [found] = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.reproduced = 'true'", output_format="list"
    )
    assert found.info.run_id == same.info.run_id and same.data.tags["reproduced.test/loss"] == "true"
    assert MlflowClient().get_model_version("picollm-tiny", "2").tags["reproduced"] == "true"
