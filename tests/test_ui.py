"""`make ui`: lean flags, and the banner's URLs that open the runs table (not the GenAI overview)."""

from __future__ import annotations

import re
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.ui_url import experiment_urls, main

from .conftest import REPO


def test_ui_urls_open_each_experiments_runs_table(migrated_store: str, tmp_path: Path, capsys) -> None:
    client = MlflowClient(migrated_store)  # not mlflow.set_experiment: its cached id would outlive this store
    exp_id = client.create_experiment("picollm-ui-test")
    client.set_terminated(client.create_run(exp_id).info.run_id)
    urls = dict(experiment_urls(migrated_store, "http://127.0.0.1:5000/"))
    assert urls == {"picollm-ui-test": f"http://127.0.0.1:5000/#/experiments/{exp_id}?workflowType=machine_learning"}
    assert main(["ui_url", migrated_store, "http://127.0.0.1:5000"]) == 0
    assert "workflowType=machine_learning" in capsys.readouterr().out

    missing = tmp_path / "nowhere" / "mlflow.db"
    assert experiment_urls(f"sqlite:///{missing}", "http://x") == [] and not missing.exists()  # nothing created


def test_make_ui_is_lean_and_serve_puts_the_venv_on_path() -> None:
    make = (REPO / "Makefile").read_text()
    ui = re.search(r"^ui:.*?(?=^\S)", make, flags=re.M | re.S).group(0)
    assert "--workers 1" in ui and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in ui and "pipelines.ui_url" in ui
    serve = re.search(r"^serve:.*?(?=^\S)", make, flags=re.M | re.S).group(0)
    assert 'PATH="$(abspath $(BIN)):$$PATH"' in serve and "--env-manager local" in serve
    assert "--host 127.0.0.1 --port $(PORT)" in serve
