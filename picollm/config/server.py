"""`picollm server`: the team tracking server (PostgreSQL + mlflow server)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from picollm.config.base import StrictModel

# --------------------------------------------------------------------------------------------------
# Team tracking server (`make server`): MLflow on a PostgreSQL backend store


class ServerConfig(StrictModel):
    """`picollm server start`: PostgreSQL on loopback + `mlflow server` over it, all state in `state_dir`."""

    host: str = Field("127.0.0.1")
    """address mlflow server binds to; 0.0.0.0 serves other machines (then set allowed_hosts)"""
    port: int = Field(5001, ge=1, le=65535)
    """mlflow server port (5000 stays free for `make ui`)"""
    allowed_hosts: list[str] | None = Field(None)
    """mlflow --allowed-hosts: Host headers it accepts, e.g. [mlflow.example.com, "10.0.0.5:5001"]; null = MLflow's
    default (localhost, private IPs)"""
    workers: int = Field(1, ge=1)
    """mlflow server worker processes"""
    state_dir: Path = Field(Path(".picollm-server"))
    """PostgreSQL data (pgdata/), artifacts/, postgres.log, mlflow.log and pid files (git-ignored)"""
    postgres_port: int = Field(5433, ge=1, le=65535)
    """PostgreSQL's port on 127.0.0.1 (5432 stays free for a system cluster)"""
    postgres_db: str = Field("mlflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """the MLflow database"""
    postgres_user: str = Field("mlflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """the database's owner role"""
    postgres_bin: Path | None = Field(None)
    """folder with initdb, pg_ctl, psql; null = PATH, then the newest /usr/lib/postgresql/*/bin"""
    backend_store_uri: str | None = Field(None)
    """an existing database to use instead of starting PostgreSQL here, e.g.
    postgresql://user:password@db.example.com:5432/mlflow"""
    artifacts_destination: str | None = Field(None)
    """artifact store (a folder or e.g. s3://bucket/mlflow); null = <state_dir>/artifacts"""
    startup_timeout_s: float = Field(60.0, gt=0)
    """seconds to wait for PostgreSQL and for mlflow's /health"""
