"""`picollm server`: the team tracking server (PostgreSQL + mlflow server)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from picollm.config.base import StrictModel

# --------------------------------------------------------------------------------------------------
# Team tracking server (`make server`): MLflow on a PostgreSQL backend store


class ServerConfig(StrictModel):
    """`picollm server start`: PostgreSQL on loopback + `mlflow server` over it, all state in `state_dir`."""

    host: str = Field("127.0.0.1", description="address mlflow server binds to; 0.0.0.0 for a team (see README)")
    port: int = Field(5001, ge=1, le=65535)
    allowed_hosts: list[str] | None = Field(
        None, description="mlflow --allowed-hosts (Host headers it accepts); null = MLflow's localhost default"
    )
    workers: int = Field(1, ge=1, description="mlflow server worker processes")
    state_dir: Path = Field(Path(".picollm-server"), description="PostgreSQL data, artifacts, logs and pid files")
    postgres_port: int = Field(5433, ge=1, le=65535)
    postgres_db: str = Field("mlflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    postgres_user: str = Field("mlflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    postgres_bin: Path | None = Field(None, description="folder with initdb/pg_ctl; null = PATH, then Debian's")
    backend_store_uri: str | None = Field(
        None, description="use this existing database instead of starting PostgreSQL (e.g. a team's host)"
    )
    artifacts_destination: str | None = Field(None, description="artifact store; null = <state_dir>/artifacts")
    startup_timeout_s: float = Field(60.0, gt=0)
