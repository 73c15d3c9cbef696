"""Integration: the team tracking server (PostgreSQL + `mlflow server`, started by picollm.server) and a
2-process CPU DDP training run (`torchrun`) logging to it over HTTP; the registered model is then loaded by
name in a fresh process.

Needs PostgreSQL's binaries (`make test-integration` installs them with apt-get when missing) and a couple of
minutes. Run with `make test-integration` or `pytest -m integration tests/integration`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from picollm import server
from picollm.config import ServerConfig

from ..conftest import TINY

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent  # the venv's bin: torchrun, picollm
MODEL = "picollm-itest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """Inside tmp_path, except as root: PostgreSQL then runs as `postgres`, who cannot traverse pytest's
    private /tmp/pytest-of-root (mode 0700), so the state goes in a fresh folder directly under /tmp."""
    if os.geteuid() != 0:
        yield tmp_path / "server"
        return
    folder = Path(tempfile.mkdtemp(prefix="picollm-itest-"))
    folder.chmod(0o711)
    try:
        yield folder / "server"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def team_server(state_dir: Path) -> Iterator[str]:
    """PostgreSQL + mlflow server on free ports; stopped by PID afterwards, also when the test fails."""
    cfg = ServerConfig(port=free_port(), postgres_port=free_port(), state_dir=state_dir, startup_timeout_s=180)
    pids: dict[str, int] = {}
    try:
        info = server.start(cfg)
        pids = {"mlflow": info["mlflow_pid"], "postgres": info["postgres_pid"]}
        assert all(pids.values()), info
        assert server.healthy(cfg)
        yield info["url"]
    finally:
        out = server.stop(cfg)
        st = server.status(cfg)
        assert st["mlflow_pid"] is None and st["postgres_pid"] is None, st
        for name, pid in pids.items():
            assert out[f"{name}_pid"] == pid, (name, out)
            assert not server.alive(pid), f"{name} (pid {pid}) still running"
        if "mlflow" in pids:
            assert server.process_group(pids["mlflow"]) == [], "mlflow server workers left running"


def test_ddp_training_against_team_server(team_server: str, tmp_path: Path) -> None:
    url = team_server
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
