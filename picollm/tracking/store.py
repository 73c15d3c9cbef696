"""MLflow helpers: store resolution and safe initialisation, batched metric logging, run lifecycle.

Default store: `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlruns/`, which is exactly what a
plain `mlflow ui` started in the project root reads. `MLFLOW_TRACKING_URI` (or `tracking.uri`)
overrides it.
"""

from __future__ import annotations

import contextlib
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
from mlflow.entities import Metric, RunStatus, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from picollm.errors import PicollmError, RunStopped, StorageError  # noqa: E402
from picollm.runtime import logs  # noqa: E402
from picollm.tracking import faults as store_faults  # noqa: E402
from picollm.tracking.faults import StoreUnavailable, retry_locked  # noqa: E402

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


def init_tracking(
    configured: str | None = None, *, lock_timeout_s: float | None = None, http_timeout_s: float | None = None
) -> str:
    """Point MLflow at the store and make sure it exists and is migrated, before any work starts.

    A fresh SQLite store is created under a file lock: MLflow's migrations race when several
    processes create the same database at once. An HTTP server (or a database host) is probed so
    that an unreachable one fails in seconds with one line rather than hanging in retries. Runs a
    store failure left open (`store_faults.record_pending`) are closed now, with a warning each.
    `lock_timeout_s` and `http_timeout_s` bound how long a store write waits (`tracking.*` keys).
    """
    store_faults.configure(lock_timeout_s, http_timeout_s)
    store_faults.quiet_store_loggers()
    logs.quiet_library_handlers()  # MLflow's own stderr handler, installed when it was imported
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
            # FileLock retries a lock file it cannot create until its timeout (125 s under /proc):
            # creating it once first turns an unwritable place into an immediate error.
            os.close(os.open(str(db) + ".lock", os.O_RDWR | os.O_CREAT, 0o644))
            with FileLock(str(db) + ".lock", timeout=120), _quiet("mlflow.store.db.utils", "alembic"):
                MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:  # a directory in the way, not a database, a lock held for minutes, ...
            why = e.strerror if isinstance(e, OSError) and e.strerror else store_faults.reason(e)
            raise PicollmError(f"tracking store {uri} is not usable: {why}") from None
    elif scheme in ("http", "https"):
        try:
            probe_s = min(PROBE_TIMEOUT_S, store_faults.SETTINGS.http_timeout_s)
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=probe_s):
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
    for message in store_faults.reconcile(uri, _close_pending):
        log.warning("%s", message)
    return uri


def _close_pending(run_id: str, status: str, error: str | None) -> bool:
    """Close a run a store failure left open (`store_faults.reconcile`); False if it is not open."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower():
            return False  # the store was replaced meanwhile: nothing left to close
        raise
    if run.info.status != "RUNNING":
        return False
    if error:
        client.set_tag(run_id, "error", error[:5000])
    client.set_terminated(run_id, status)
    return True


def store_write(
    fn: Any, *args: Any, what: str = "writing to the run", budget_s: float | None = None, **kwargs: Any
) -> Any:
    """`fn(*args, **kwargs)`, a write to the tracking store: retried while SQLite is locked (at most
    `tracking.lock_timeout_s`), each attempt shielded from Ctrl-C (a signal waits for the attempt, at
    most SQLite's busy timeout, then arrives: a write interrupted inside SQLite would keep its lock)."""

    def attempt() -> Any:
        with deferred_signals():
            return fn(*args, **kwargs)

    return retry_locked(attempt, what, budget_s)


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

    def flush(self, budget_s: float | None = None) -> None:
        # Ctrl-C inside a SQLite write would leave its lock held and stall closing the run for the busy
        # timeout (a minute): a signal waits for the write to finish, then arrives.
        while self._buf:  # a batch written is dropped at once: a retry never logs it twice
            batch = self._buf[:1000]
            store_write(self.client.log_batch, self.run_id, metrics=batch, what="logging metrics", budget_s=budget_s)
            del self._buf[:1000]


def param_value(value: Any) -> str:
    """How a param is stored (`log_params`): a string, None as "null", at most 6000 characters."""
    return ("null" if value is None else str(value))[:6000]


def log_params(params: dict[str, Any]) -> None:
    items = {k: param_value(v) for k, v in params.items()}
    keys = list(items)
    for i in range(0, len(keys), 100):  # as in MetricLogger.flush
        store_write(mlflow.log_params, {k: items[k] for k in keys[i : i + 100]}, what="logging params")


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
        # Also when the block failed (a locked store's attempt): a Ctrl-C is never swallowed by an error.
        if received and redeliver:
            signal.raise_signal(received[0])


CLOSE_BUDGET_S = 10.0  # how long closing a run waits for a locked store before leaving a pending record


@contextmanager
def _short_http(seconds: int = 3) -> Iterator[None]:
    """One quick try per HTTP call (a store that just failed us is likely to stall again)."""
    keys = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(seconds), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _close_run(
    status: RunStatus,
    error: str | None = None,
    details: str | None = None,
    tags: dict[str, str] | None = None,
    redeliver: bool | None = None,
    store_failed: bool = False,
) -> str:
    """End the active run with `status` (and `tags`), shielded from a second Ctrl-C and from a broken
    store: a failure to record the error must not hide the error itself. A signal that arrives meanwhile
    is delivered afterwards when the process goes on (`redeliver`, default: a FINISHED run).

    A locked store is waited for (`CLOSE_BUDGET_S`, less after Ctrl-C); a run that still cannot be closed
    is noted for `store_faults.reconcile`. Returns "" when closed, else what the user should know."""
    active = mlflow.active_run()
    if active is None:
        return ""
    run_id, uri, client = active.info.run_id, mlflow.get_tracking_uri(), MlflowClient()
    budget = min(store_faults.SETTINGS.lock_timeout_s, CLOSE_BUDGET_S if status != RunStatus.KILLED else 2.0)
    name = RunStatus.to_string(status)
    all_tags = {**({"error": error[:5000]} if error is not None else {}), **(tags or {})}

    tagged: list[bool] = []

    def end() -> None:  # the error tag first: a run closed without it would hide why it failed
        if all_tags and not tagged:
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
            tagged.append(True)
        current = mlflow.active_run()
        if current is not None and current.info.run_id == run_id:
            mlflow.end_run(name)  # pops the run first, so MLflow's atexit hook never ends it FINISHED
        else:
            client.set_terminated(run_id, name)

    http = _short_http() if store_failed else contextlib.nullcontext()
    with deferred_signals(redeliver=status == RunStatus.FINISHED if redeliver is None else redeliver), http:
        try:
            if details is not None and not store_failed:
                mlflow.log_text(details, "error_traceback.txt")
        except Exception as e:  # expected when the artifact store is what failed: the tag says it
            log.debug("could not log the traceback: %s", first_line(e))
        try:
            retry_locked(end, f"marking the run {name}", budget)
            return ""
        except Exception as e:
            log.debug("could not mark the run %s: %s", name, store_faults.reason(e))
            if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
                mlflow.tracking.fluent._active_run_stack.get().pop()  # never ended FINISHED at exit
    if store_faults.record_pending(uri, run_id, name, error) is None:
        where = store_faults.state_dir(uri)
        return f"the run may still show RUNNING (the store refused to close it, and {where} is not writable)"
    return f"the store refused to close the run: it is marked {name} the next time picollm opens this store"


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
    error (disk full, unwritable artifact store) or a failing tracking store (locked too long, stalled,
    read-only, gone) becomes a StorageError (exit code 1) whose line says whether the run could be
    closed. The run is claimed (`store_faults.claim_run`) while open: one process per run. A local
    artifact store is checked for writability first."""
    uri = mlflow.get_tracking_uri()
    with contextlib.ExitStack() as claims:
        if run_id:  # a resume: claimed before the run is reopened, so a second resume changes nothing
            claims.enter_context(store_faults.claim_run(uri, run_id))
        sha, dirty = git_commit()
        all_tags = dict(tags or {})
        if sha and not run_id:
            all_tags |= {"mlflow.source.git.commit": sha, "git.commit": sha, "git.dirty": str(dirty).lower()}
        try:
            exp_id = None if run_id else store_write(experiment_id, experiment, what="finding the experiment")
            run = store_write(
                mlflow.start_run,
                run_id=run_id,
                experiment_id=exp_id,
                run_name=run_name,
                tags=all_tags,
                nested=nested,
                what="opening the run",
            )
        except PicollmError:
            raise
        except Exception as e:  # e.g. a server that answered /health, then stalled: no run was opened
            if not store_faults.is_store_error(e):
                raise
            raise PicollmError(f"tracking store {uri} did not answer: {store_faults.reason(e)}") from None
        if not run_id:
            claims.enter_context(store_faults.claim_run(uri, run.info.run_id))
        with _closing(run):
            check_artifact_store(run.info.artifact_uri)
            yield run


@contextmanager
def _closing(run: mlflow.ActiveRun) -> Iterator[None]:
    rid = run.info.run_id
    try:
        yield
    except KeyboardInterrupt:
        if note := _close_run(RunStatus.KILLED, "interrupted"):
            log.warning("run %s: %s", rid, note)
        raise
    except RunStopped as e:  # stopped on purpose, the process goes on: a Ctrl-C meanwhile still counts
        if note := _close_run(RunStatus.KILLED, tags=e.tags, redeliver=True):
            log.warning("run %s: %s", rid, note)
        raise
    except PicollmError as e:
        failed = isinstance(e, StoreUnavailable)
        note = _close_run(RunStatus.FAILED, f"{type(e).__name__}: {e}", traceback.format_exc(), store_failed=failed)
        if note:
            e.args = (f"{e}; {note}",)  # the one line says the run is not closed yet
        raise
    except OSError as e:
        err = StorageError(f"run {rid} stopped on an I/O error: {e}; what it logged before is kept")
        note = _close_run(RunStatus.FAILED, f"{type(err).__name__}: {err}", traceback.format_exc())
        raise StorageError(f"{err}; {note}" if note else str(err)) from e
    except Exception as e:
        if not store_faults.is_store_error(e):
            _close_run(RunStatus.FAILED, f"{type(e).__name__}: {e}", traceback.format_exc())
            raise
        err = StorageError(
            f"tracking store failed under run {rid}: {store_faults.reason(e)}; what it logged before is kept"
        )
        note = _close_run(RunStatus.FAILED, f"{type(err).__name__}: {err}", store_failed=True)
        raise StorageError(f"{err}; {note}" if note else str(err)) from e
    except BaseException as e:
        _close_run(RunStatus.FAILED, f"{type(e).__name__}: {e}", traceback.format_exc())
        raise
    else:
        if note := _close_run(RunStatus.FINISHED):
            log.warning("run %s: %s", rid, note)
