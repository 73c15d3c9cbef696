"""MLflow helpers: store resolution and safe initialisation, batched metric logging, run lifecycle.

Default store: `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlruns/`, which is exactly what a
plain `mlflow ui` started in the project root reads. `MLFLOW_TRACKING_URI` (or `tracking.uri`)
overrides it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from filelock import FileLock  # noqa: E402
from mlflow.entities import Metric, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from picollm.errors import PicollmError  # noqa: E402

log = logging.getLogger(__name__)

_initialised: set[str] = set()


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def init_tracking(configured: str | None = None) -> str:
    """Point MLflow at the store and make sure it exists and is migrated, before any work starts.

    A fresh SQLite store is created under a file lock: MLflow's migrations race when several
    processes create the same database at once. An HTTP server is probed so that an unreachable
    one fails in seconds with one line rather than hanging in retries.
    """
    uri = resolve_uri(configured)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri in _initialised:
        return uri
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(db) + ".lock", timeout=120), _quiet("mlflow.store.db.utils", "alembic"):
            MlflowClient(uri).search_experiments(max_results=1)
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
                pass
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PicollmError(f"tracking server {uri} is unreachable ({reason})") from None
    _initialised.add(uri)
    return uri


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence chatty INFO loggers (MLflow's "Creating initial MLflow database tables...")."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, keep artifacts in `mlruns/` beside the database, wherever the cwd is."""
    db = sqlite_path(uri)
    return (db.parent / "mlruns").resolve().as_uri() if db is not None else None


def experiment_id(name: str, uri: str | None = None) -> str:
    uri = uri or mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise PicollmError(f"experiment {name!r} is deleted; restore it in the UI or choose another name")
        return exp.experiment_id
    root = artifact_root(uri)
    try:
        return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except mlflow.exceptions.MlflowException:  # created by a concurrent process meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> tuple[str | None, bool]:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return None, False


class MetricLogger:
    """Buffers metrics and writes them with one `log_batch` call per flush (SQLite costs ~5 ms a call)."""

    def __init__(self, run_id: str, client: MlflowClient | None = None) -> None:
        self.run_id = run_id
        self.client = client or MlflowClient()
        self._buf: list[Metric] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._buf.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())

    def flush(self) -> None:
        for i in range(0, len(self._buf), 1000):
            self.client.log_batch(self.run_id, metrics=self._buf[i : i + 1000])
        self._buf.clear()


def log_params(params: dict[str, Any]) -> None:
    items = {k: ("null" if v is None else str(v))[:6000] for k, v in params.items()}
    keys = list(items)
    for i in range(0, len(keys), 100):
        mlflow.log_params({k: items[k] for k in keys[i : i + 100]})


@contextmanager
def tracked_run(
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) a run and always close it with the right status:
    FINISHED, KILLED on Ctrl-C/SIGTERM, FAILED (with an `error` tag) on any other exception."""
    exp_id = None if run_id else experiment_id(experiment)
    sha, dirty = git_commit()
    all_tags = dict(tags or {})
    if sha and not run_id:
        all_tags |= {"mlflow.source.git.commit": sha, "git.commit": sha, "git.dirty": str(dirty).lower()}
    run = mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=run_name, tags=all_tags, nested=nested)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.set_tag("error", "interrupted")
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as e:
        try:
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
        finally:
            mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run()
