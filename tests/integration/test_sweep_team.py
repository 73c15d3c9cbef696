"""Integration: two `picollm sweep` worker processes join one Optuna study on the team PostgreSQL server
(database `optuna`, beside MLflow's) while logging to the team's mlflow server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from picollm.tracking import server

from ..conftest import REPO, TINY
from .conftest import TeamServer

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
STUDY = "itest-sweep"
TRIALS = 6
# trials long enough (12 epochs, no pruning) that the second process, seconds to import, gets its share
SLOW = ["--set", "base.overrides=[train.epochs=12, train.checkpoint_every=100]", "--set", "pruner.name=none"]


def test_two_workers_join_one_study_on_the_team_server(team_server: TeamServer, tmp_path: Path) -> None:
    storage = server.optuna_uri(team_server.cfg)
    env = {**os.environ, "MLFLOW_TRACKING_URI": team_server.url, "HF_HUB_OFFLINE": "1"}
    env.pop("PICOLLM_DEBUG", None)
    cmd = [str(BIN / "picollm"), "sweep", str(REPO / "configs" / "sweep_tiny.yaml"), "--storage", storage]
    cmd += ["--study", STUDY, "--trials", str(TRIALS), "--workers", "2", "--set", f"base.config={TINY}", *SLOW]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert not (tmp_path / "optuna.db").exists()  # the study lives on the server, not in a local file

    study = optuna.load_study(study_name=STUDY, storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == TRIALS and len({t.number for t in finished}) == TRIALS
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert len({t.user_attrs["sweep.pid"] for t in finished}) == 2, "both worker processes ran trials"

    mlflow.set_tracking_uri(team_server.url)
    runs = mlflow.search_runs(
        experiment_names=["picollm-sweep-tiny"], filter_string=f"tags.`sweep.study` = '{STUDY}'", output_format="list"
    )
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # one parent for both workers
    children = mlflow.search_runs(
        experiment_names=["picollm-sweep-tiny"],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list",
    )
    numbers = sorted(int(c.data.tags["sweep.trial"]) for c in children)
    assert numbers == sorted(t.number for t in finished)  # one child run per trial, none twice
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(study.best_value)
