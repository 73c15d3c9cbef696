"""Integration fixtures: the team tracking server (PostgreSQL + `mlflow server`) on free ports, stopped by PID."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from picollm.config import ServerConfig
from picollm.tracking import server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TeamServer:
    url: str  # the MLflow tracking server
    cfg: ServerConfig


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
def team_server(state_dir: Path) -> Iterator[TeamServer]:
    """PostgreSQL + mlflow server on free ports; stopped by PID afterwards, also when the test fails."""
    cfg = ServerConfig(port=free_port(), postgres_port=free_port(), state_dir=state_dir, startup_timeout_s=180)
    pids: dict[str, int] = {}
    try:
        info = server.start(cfg)
        pids = {"mlflow": info["mlflow_pid"], "postgres": info["postgres_pid"]}
        assert all(pids.values()), info
        assert server.healthy(cfg)
        yield TeamServer(info["url"], cfg)
    finally:
        out = server.stop(cfg)
        st = server.status(cfg)
        assert st["mlflow_pid"] is None and st["postgres_pid"] is None, st
        for name, pid in pids.items():
            assert out[f"{name}_pid"] == pid, (name, out)
            assert not server.alive(pid), f"{name} (pid {pid}) still running"
        if "mlflow" in pids:
            assert server.process_group(pids["mlflow"]) == [], "mlflow server workers left running"
