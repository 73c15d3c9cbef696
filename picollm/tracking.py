"""MLflow helpers: store resolution and safe initialisation, batched metric logging, run lifecycle.

Default store: `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlruns/`, which is exactly what a
plain `mlflow ui` started in the project root reads. `MLFLOW_TRACKING_URI` (or `tracking.uri`)
overrides it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
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

from picollm.errors import PicollmError, RunStopped, StorageError  # noqa: E402

log = logging.getLogger(__name__)

_initialised: set[str] = set()


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


# Stores MLflow can track to; anything else is refused in one line before work starts.
SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
PROBE_TIMEOUT_S = 10.0


def init_tracking(configured: str | None = None) -> str:
    """Point MLflow at the store and make sure it exists and is migrated, before any work starts.

    A fresh SQLite store is created under a file lock: MLflow's migrations race when several
    processes create the same database at once. An HTTP server (or a database host) is probed so
    that an unreachable one fails in seconds with one line rather than hanging in retries.
    """
    uri = resolve_uri(configured)
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0].lower() if "://" in uri else ""
    if scheme not in SCHEMES:
        raise PicollmError(
            f"tracking URI {uri!r}: unsupported scheme {scheme!r} "
            "(use sqlite:///PATH, http(s)://HOST:PORT or a database URI)"
        )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri in _initialised:
        return uri
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(db) + ".lock", timeout=120), _quiet("mlflow.store.db.utils", "alembic"):
                MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:  # a directory in the way, not a database, a lock held for minutes, ...
            raise PicollmError(f"tracking store {uri} is not usable: {first_line(e)}") from None
    elif scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
                pass
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise PicollmError(f"tracking server {uri} is unreachable ({reason})") from None
    elif scheme in DB_PORTS:
        parts = urllib.parse.urlsplit(uri)
        host, port = parts.hostname or "localhost", parts.port or DB_PORTS[scheme]
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as e:
            raise PicollmError(f"tracking database {host}:{port} is unreachable ({e.strerror or e})") from None
    _initialised.add(uri)
    return uri


def first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


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
        # Ctrl-C inside a SQLite write would leave its lock held and stall closing the run for the busy
        # timeout (a minute): a signal waits for the write to finish, then arrives.
        with deferred_signals():
            for i in range(0, len(self._buf), 1000):
                self.client.log_batch(self.run_id, metrics=self._buf[i : i + 1000])
            self._buf.clear()


def log_params(params: dict[str, Any]) -> None:
    items = {k: ("null" if v is None else str(v))[:6000] for k, v in params.items()}
    keys = list(items)
    with deferred_signals():  # as in MetricLogger.flush
        for i in range(0, len(keys), 100):
            mlflow.log_params({k: items[k] for k in keys[i : i + 100]})


def check_artifact_store(artifact_uri: str) -> None:
    """A local artifact location must be writable before any work starts (StorageError if not)."""
    parts = urllib.parse.urlsplit(artifact_uri)
    if parts.scheme not in ("", "file"):
        return  # a server or object store: its own errors surface on the first upload
    path = Path(urllib.parse.unquote(parts.path) if parts.scheme else artifact_uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".picollm-write-test-"):
            pass
    except OSError as e:
        raise StorageError(f"artifact store {path} is not writable ({e.strerror or e})") from None


@contextmanager
def deferred_signals(redeliver: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done (e.g. while a run is being closed), then deliver
    them (`redeliver`) or drop them. Outside the main thread signals cannot arrive: a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved = {s: h for s, h in saved.items() if h is not None}  # None: set outside Python, leave it
    for s in saved:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    if received and redeliver:
        signal.raise_signal(received[0])


def _close_run(
    status: RunStatus,
    error: str | None = None,
    details: str | None = None,
    tags: dict[str, str] | None = None,
    redeliver: bool | None = None,
) -> None:
    """End the active run with `status` (and `tags`), shielded from a second Ctrl-C and from a broken
    store: a failure to record the error must not hide the error itself. A signal that arrives meanwhile
    is delivered afterwards when the process goes on (`redeliver`, default: a FINISHED run)."""
    with deferred_signals(redeliver=status == RunStatus.FINISHED if redeliver is None else redeliver):
        try:
            if error is not None:
                mlflow.set_tag("error", error[:5000])
            if tags:
                mlflow.set_tags(tags)
        except Exception as e:
            log.warning("could not tag the run with its error: %s", first_line(e))
        try:
            if details is not None:
                mlflow.log_text(details, "error_traceback.txt")
        except Exception as e:  # expected when the artifact store is what failed: the tag says it
            log.debug("could not log the traceback: %s", first_line(e))
        try:
            mlflow.end_run(RunStatus.to_string(status))
        except Exception as e:
            log.warning("could not mark the run %s: %s", RunStatus.to_string(status), first_line(e))


@contextmanager
def tracked_run(
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) a run and always close it with the right status: FINISHED; KILLED on
    Ctrl-C/SIGTERM, and on a RunStopped (with its tags: a pruned sweep trial); FAILED on any other
    exception, with the message in the `error` tag and the traceback in `error_traceback.txt`. An I/O
    error (disk full, unwritable artifact store) becomes a StorageError (exit code 1). A local artifact
    store is checked for writability first."""
    exp_id = None if run_id else experiment_id(experiment)
    sha, dirty = git_commit()
    all_tags = dict(tags or {})
    if sha and not run_id:
        all_tags |= {"mlflow.source.git.commit": sha, "git.commit": sha, "git.dirty": str(dirty).lower()}
    run = mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=run_name, tags=all_tags, nested=nested)
    try:
        check_artifact_store(run.info.artifact_uri)
        yield run
    except KeyboardInterrupt:
        _close_run(RunStatus.KILLED, "interrupted")
        raise
    except RunStopped as e:  # stopped on purpose, the process goes on: a Ctrl-C meanwhile still counts
        _close_run(RunStatus.KILLED, tags=e.tags, redeliver=True)
        raise
    except OSError as e:
        err = StorageError(f"run {run.info.run_id} stopped on an I/O error: {e}; what it logged before is kept")
        _close_run(RunStatus.FAILED, f"{type(err).__name__}: {err}", traceback.format_exc())
        raise err from e
    except BaseException as e:
        _close_run(RunStatus.FAILED, f"{type(e).__name__}: {e}", traceback.format_exc())
        raise
    else:
        _close_run(RunStatus.FINISHED)
