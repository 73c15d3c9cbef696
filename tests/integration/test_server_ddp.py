"""Integration: the team tracking server (PostgreSQL + `mlflow server`, started by picollm.server) and a
2-process CPU DDP training run (`torchrun`) logging to it over HTTP; the registered model is then loaded by
name in a fresh process.

Needs PostgreSQL's binaries (`make test-integration` installs them with apt-get when missing) and a couple of
minutes. Run with `make test-integration` or `pytest -m integration tests/integration`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ..conftest import TINY
from .conftest import TeamServer

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent  # the venv's bin: torchrun, picollm
MODEL = "picollm-itest"


def test_ddp_training_against_team_server(team_server: TeamServer, tmp_path: Path) -> None:
    url = team_server.url
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PICOLLM_DEBUG", None)

    train = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pipelines.cli", "train"]
    train += [str(TINY), "--set", f"tracking.registered_model={MODEL}", "--set", "train.epochs=2"]
    proc = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    exp = client.get_experiment_by_name("picollm-tiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"{len(runs)} runs: only rank 0 may log to MLflow"
    [run] = runs
    assert run.info.status == "FINISHED"
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert [v.run_id for v in versions] == [run.info.run_id]

    gen = subprocess.run(
        [str(BIN / "picollm"), "generate", MODEL, "2 4 6 8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stdout + gen.stderr
    last = gen.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"2 4 6 8( \d+){8}", last), gen.stdout

    assert run.data.params.get("distributed.world_size") == "2", "the run was not trained by 2 DDP ranks"
