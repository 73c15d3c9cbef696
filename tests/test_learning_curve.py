"""`picollm compare` with a `learning_curve` section: both models trained at every training-set size as
nested runs (nothing registered), the parent's curve equal to what the children measured."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from picollm.config import CompareConfig, load_config
from picollm.errors import ConfigError

from .conftest import REPO

TINY_COMPARE = REPO / "configs" / "compare_tiny.yaml"
CURVE = [
    "compare.seeds=[0]",
    "efficiency.enabled=false",
    "learning_curve.n_train=[8, 16]",
    "learning_curve.seeds=[3]",
]


@pytest.mark.slow
def test_learning_curve_children_and_parent_curve(migrated_store: str, monkeypatch: pytest.MonkeyPatch):
    import pipelines.compare

    monkeypatch.setattr(pipelines.compare, "_figures", lambda *a, **k: [])  # checked in test_compare
    out = pipelines.compare.run(load_config(CompareConfig, TINY_COMPARE, CURVE))
    client = MlflowClient()
    children = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.mlflow.parentRunId = '{out.parent_run_id}'",
        output_format="list",
    )
    curve = {c.info.run_name: c for c in children if "-n" in c.info.run_name}
    assert sorted(curve) == ["linear-n16-seed3", "linear-n8-seed3", "softmax-n16-seed3", "softmax-n8-seed3"]
    assert all(c.info.status == "FINISHED" and "registered_model" not in c.data.tags for c in curve.values())
    assert {c.data.params["data.n_train"] for c in curve.values()} == {"8", "16"}
    for att in ("softmax", "linear"):
        history = client.get_metric_history(out.parent_run_id, f"learning_curve/test/accuracy_vs_ceiling/{att}")
        by_step = {m.step: m.value for m in history}
        assert sorted(by_step) == [8, 16]  # step = training sequences per family
        for n in (8, 16):  # one seed: the parent's point is that child's test metric
            child = curve[f"{att}-n{n}-seed3"].data.metrics
            assert by_step[n] == pytest.approx(child["test/accuracy_vs_ceiling"])
    rows = json.loads(mlflow.artifacts.load_text(f"runs:/{out.parent_run_id}/learning_curve.json"))
    n_groups = len(load_config(CompareConfig, TINY_COMPARE).data.seq_types) + 1
    assert len(rows["data"]) == 2 * 2 * n_groups
    artifacts = {a.path for a in client.list_artifacts(out.parent_run_id, "figures")}
    assert "figures/learning_curve.png" in artifacts


def test_learning_curve_needs_train_mode():
    with pytest.raises(ConfigError, match="learning_curve trains models"):
        load_config(CompareConfig, TINY_COMPARE, ["compare.baseline=a@champion", "compare.linear=b@champion", CURVE[2]])
    with pytest.raises(ConfigError, match="distinct sizes"):
        load_config(CompareConfig, TINY_COMPARE, ["learning_curve.n_train=[8, 8]"])
