"""The answer one click away: UI links (picollm/tracking/links.py), headlines as descriptions
(picollm/tracking/notes.py), the chart order of a run's keys, `models list`'s metric columns."""

from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from picollm.tracking import links, notes
from picollm.tracking.runs import BOOKKEEPING
from pipelines.cli import app

from .conftest import TINY

EID, RID = "7", "0123456789abcdef0123456789abcdef"


def test_ui_base_is_the_server_or_the_make_ui_address():
    assert links.ui_base("sqlite:///mlflow.db", env={}) == "http://127.0.0.1:5000"
    assert links.ui_base("sqlite:///mlflow.db", env={"UI_PORT": "5050"}) == "http://127.0.0.1:5050"
    assert links.ui_base("http://10.0.0.5:5001/", env={"UI_PORT": "5050"}) == "http://10.0.0.5:5001"
    assert links.ui_base("https://mlflow.example.org", env={}) == "https://mlflow.example.org"


def test_urls_open_the_runs_view():
    base = "http://127.0.0.1:5000/"
    view = "?workflowType=machine_learning"
    assert links.runs_table_url(base, EID) == f"http://127.0.0.1:5000/#/experiments/{EID}{view}"
    assert links.run_url(base, EID, RID) == f"http://127.0.0.1:5000/#/experiments/{EID}/runs/{RID}/model-metrics{view}"
    assert links.run_url(base, EID, RID, tab=None) == f"http://127.0.0.1:5000/#/experiments/{EID}/runs/{RID}{view}"
    assert links.artifact_url(base, EID, RID, "report.html") == (
        f"http://127.0.0.1:5000/#/experiments/{EID}/runs/{RID}/artifacts/report.html{view}"
    )
    assert links.artifact_url(base, EID, RID, "/figures/a b.png").endswith("/artifacts/figures/a%20b.png" + view)
    assert (
        links.model_version_url(base, "picollm-linear", 3)
        == f"http://127.0.0.1:5000/#/models/picollm-linear/versions/3{view}"
    )


def test_training_note_from_the_metrics():
    m = {"test/accuracy": 0.8384, "test/accuracy_vs_ceiling": 0.9617, "test/loss": 0.51234}
    assert notes.training_note(m) == "test accuracy 0.838 = 0.962 of the Bayes ceiling, test loss 0.512"
    assert notes.training_note({"test/accuracy": 0.5}) == "test accuracy 0.500"
    assert notes.training_note({"test/accuracy": float("nan"), "test/loss": 1.0}) == "test loss 1.000"
    assert notes.training_note({}) == "no test metrics"


def test_contrast_note_from_the_headline_rows():
    rows = [
        {
            "metric": "test loss (NLL)",
            "variant": "linear",
            "baseline": "softmax",
            "diff": "-0.026 ± 0.004",
            "p": "0.002",
            "verdict": "linear better",
        },  # fmt: skip
        {"metric": "test accuracy", "variant": "linear", "baseline": "softmax", "diff": "+0.01", "p": "-"},
        {"metric": "test loss (NLL)", "variant": "delta", "baseline": "softmax", "diff": "+0.1"},
    ]
    assert notes.contrast_note(rows) == (
        "linear − softmax: test loss (NLL) -0.026 ± 0.004, Holm p 0.002 (linear better); "
        "delta − softmax: test loss (NLL) +0.1"
    )
    assert "test accuracy +0.01 (" not in notes.contrast_note(rows, limit=2)  # no p: no "Holm p -"
    assert notes.contrast_note([]) == "no comparison rows"


def test_model_name_is_what_the_model_is():
    assert notes.model_name("picollm-linear", "linear", 2) == "picollm-linear"
    assert notes.model_name(None, "softmax", 4) == "softmax-4L"
    assert notes.model_name("team/model x", "linear", 2) == "team-model-x"


def _section(key: str) -> str:
    return key.rsplit("/", 1)[0] if "/" in key else ""


def chart_order(keys: list[str]) -> list[str]:
    """MLflow 3.17's run page: sections by name (prefixed keys first, the un-prefixed "Model metrics"
    section last), charts by key within a section; `system/` keys on the System metrics tab."""
    charted = [k for k in keys if not k.startswith(BOOKKEEPING)]
    return sorted(charted, key=lambda k: (_section(k) == "", _section(k), k))


def test_a_training_run_describes_itself_and_charts_its_headline_first(use_trained):
    client = MlflowClient()
    out, name = use_trained.outcome, use_trained.name
    run = client.get_run(out.run_id)
    m = run.data.metrics
    note = run.data.tags[notes.NOTE_TAG]
    assert note == notes.training_note(m) and f"test accuracy {m['test/accuracy']:.3f}" in note
    first = chart_order(list(m))[0]
    assert first == "test/accuracy", chart_order(list(m))[:5]
    assert {f"{BOOKKEEPING}peak_flops", f"{BOOKKEEPING}epochs_run"} <= set(m)
    assert not any(k.startswith(("hardware/", "train/epochs", "train/best")) for k in m)
    version = client.get_model_version(name, "1")
    assert version.description == note
    assert float(version.tags["test/accuracy"]) == pytest.approx(m["test/accuracy"], abs=1e-4)
    [logged] = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{out.run_id}'")
    assert logged.name == name  # not "model"
    found = links.run_links(out.run_id, base="http://h")
    assert found.run == links.run_url("http://h", run.info.experiment_id, out.run_id) and found.report is None


def test_models_list_shows_the_test_metrics(use_trained):
    acc = MlflowClient().get_run(use_trained.outcome.run_id).data.metrics["test/accuracy"]
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if use_trained.name in line)
    assert f"{acc:.3f}" in row and "v1 of 1" in row and "@champion=v1" in row


def test_train_prints_its_run_url_at_start_and_end(migrated_store, monkeypatch):
    monkeypatch.setenv("UI_PORT", "5123")
    args = ["train", str(TINY), "--set", "train.epochs=1", "--set", "tracking.log_model=false"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    urls = re.findall(r"http://127\.0\.0\.1:5123/#/experiments/\d+/runs/([0-9a-f]{32})/model-metrics", result.output)
    assert len(urls) == 2 and urls[0] == urls[1], result.output
    assert result.output.index("started:") < result.output.index("epoch   1")
