"""The tracking store as a component that fails: locks, stalls, read-only or vanished databases.

- **Locks.** Every SQLite connection waits at most `BUSY_TIMEOUT_S` for a lock (SQLite's busy
  timeout); `retry_locked` retries a write with backoff until `lock_timeout_s` is spent, then raises
  `StoreUnavailable` with one clear line. Short attempts keep Ctrl-C responsive: a deferred signal is
  delivered between attempts, not after a minute.
- **HTTP servers.** `configure_http` sets MLflow's per-request timeout and retries so that one call
  to a stalled server gives up within `http_timeout_s` (MLflow's defaults: 120 s x 7 retries).
- **Reasons.** `reason` digs the root cause out of MLflow's and SQLAlchemy's wrappers (whose first line
  is often an autoflush hint), so the user reads "attempt to write a readonly database".
- **Claims.** `claim_run` takes an exclusive `flock` on a file keyed by the run id, held for the run's
  lifetime: a second process that trains or resumes the same run gets `RunBusy` (exit 2). The kernel
  drops the lock when its process dies, so a SIGKILLed run can be resumed.
- **Pending records.** A run that could not be closed (the store refused writes to the end) is written to
  a small JSON file beside the store; `reconcile` closes it (status and `error` tag) the next time
  picollm opens that store, and says so. So no run stays RUNNING unnoticed.
"""

from __future__ import annotations

import contextvars
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy import event

from picollm.errors import RunBusy, StorageError, elide

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT_S = 2.0
_short_busy: contextvars.ContextVar[bool] = contextvars.ContextVar("picollm_short_busy", default=False)
LOCK_MARKERS = ("database is locked", "database table is locked", "sqlite_busy")


class StoreUnavailable(StorageError):
    """The tracking store refused a write for longer than we wait (a lock, a stalled server): exit 1."""


@dataclass
class Settings:
    lock_timeout_s: float = 60.0
    http_timeout_s: float = 30.0


SETTINGS = Settings()


# --------------------------------------------------------------------------------------------------
# SQLite locks and HTTP timeouts


@event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute", retval=True)
def _short_busy_timeout(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    # MLflow sets a 20 s busy timeout on every SQLite session; inside `retry_locked` shorter attempts
    # bound the total wait by lock_timeout_s and let a Ctrl-C through between attempts. Other calls keep
    # MLflow's 20 s (several sweep workers on one SQLite file rely on it).
    if _short_busy.get() and statement.startswith("PRAGMA busy_timeout"):
        statement = f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)};"
    return statement, parameters


def configure(lock_timeout_s: float | None = None, http_timeout_s: float | None = None) -> None:
    if lock_timeout_s is not None:
        SETTINGS.lock_timeout_s = lock_timeout_s
    if http_timeout_s is not None:
        SETTINGS.http_timeout_s = http_timeout_s
    configure_http(SETTINGS.http_timeout_s)


_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
_user_http_env = {k for k in _HTTP_ENV if k in os.environ}  # set by the user before we ran: theirs wins


def configure_http(budget_s: float) -> None:
    """One MLflow HTTP call gives up after about `budget_s`: 3 attempts of budget/3 s, no backoff."""
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(budget_s / 3))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    }
    for key, value in values.items():
        if key not in _user_http_env:
            os.environ[key] = value


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        orig = getattr(cur, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error here
        stack.extend([cur.__cause__, cur.__context__, orig if isinstance(orig, BaseException) else None])


def is_locked(e: BaseException) -> bool:
    return any(m in str(x).lower() for x in _chain(e) for m in LOCK_MARKERS)


def is_store_error(e: BaseException) -> bool:
    """An exception of the store's libraries (MLflow, SQLAlchemy, sqlite3, requests/urllib3)."""
    roots = ("mlflow", "sqlalchemy", "sqlite3", "requests", "urllib3")
    return any(type(x).__module__.split(".")[0] in roots for x in _chain(e))


def reason(e: BaseException) -> str:
    """The root cause in one line: the driver's or the network's message, not the wrappers' hints."""
    for x in _chain(e):
        if isinstance(x, sqlite3.Error) or type(x).__module__.split(".")[0] in ("requests", "urllib3"):
            return elide(str(x) or type(x).__name__, 200)
    text = str(getattr(e, "message", None) or e)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("(raised as a result of")]
    return elide(lines[0] if lines else type(e).__name__, 200)


def retry_locked(attempt: Callable[[], T], what: str, budget_s: float | None = None) -> T:
    """`attempt()`, retried with backoff while SQLite says the database is locked, for at most
    `budget_s` (default `lock_timeout_s`); then StoreUnavailable naming `what`."""
    budget = SETTINGS.lock_timeout_s if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = 0.05
    while True:
        token = _short_busy.set(True)
        try:
            return attempt()
        except Exception as e:
            if not is_locked(e):
                raise
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"tracking store stayed locked by another writer for more than {budget:.0f} s while "
                    f"{what} (tracking.lock_timeout_s)"
                ) from e
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        finally:
            _short_busy.reset(token)


# --------------------------------------------------------------------------------------------------
# Where picollm keeps its own notes about a store: run claims and pending closes


def state_dir(uri: str) -> Path:
    """`.picollm/` beside a SQLite database; for other stores a per-URI folder in the user's cache."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / ".picollm"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "picollm" / hashlib.sha1(uri.encode()).hexdigest()[:16]


def _fallback_dir(uri: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "picollm" / hashlib.sha1(uri.encode()).hexdigest()[:16]


_claims: dict[str, tuple[int, int]] = {}  # run id -> (fd, depth): claims are re-entrant in a process


def preclaim(uri: str, run_id: str) -> None:
    """Take the claim on `run_id` now (RunBusy if another process holds it) and hand it to the next
    `claim_run` of it, which releases it: a resume claims its run before checking the checkpoint, and
    the run it reopens holds the claim from then on. `release_preclaim` gives it up unused."""
    if run_id not in _claims:
        _claims[run_id] = (_acquire(uri, run_id), 0)


def release_preclaim(run_id: str) -> None:
    if run_id in _claims and _claims[run_id][1] == 0:
        os.close(_claims.pop(run_id)[0])


@contextmanager
def claim_run(uri: str, run_id: str) -> Iterator[None]:
    """Hold the exclusive claim on `run_id` for the block; RunBusy if another process holds it."""
    if run_id in _claims:  # re-entrant, or adopting a preclaim (depth 0)
        fd, depth = _claims[run_id]
        _claims[run_id] = (fd, depth + 1)
        try:
            yield
        finally:
            _release(run_id)
        return
    _claims[run_id] = (_acquire(uri, run_id), 1)
    try:
        yield
    finally:
        _release(run_id)


def _acquire(uri: str, run_id: str) -> int:
    fd = _open_claim(uri, run_id)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunBusy(
            f"run {run_id} is being trained or resumed by another process (pid {holder}); "
            "wait for it to end, or stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _open_claim(uri: str, run_id: str) -> int:
    name = f"{hashlib.sha1(run_id.encode()).hexdigest()[:20]}.lock"  # never a path from the user's string
    for base in (state_dir(uri), _fallback_dir(uri)):
        try:
            (base / "claims").mkdir(parents=True, exist_ok=True)
            return os.open(base / "claims" / name, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
    raise StorageError(f"cannot create a claim file for run {run_id} under {state_dir(uri)}")


def _release(run_id: str) -> None:
    fd, depth = _claims[run_id]
    if depth > 1:
        _claims[run_id] = (fd, depth - 1)
        return
    del _claims[run_id]
    os.close(fd)  # closing the descriptor drops the flock


def is_claimed_elsewhere(uri: str, run_id: str) -> bool:
    if run_id in _claims:
        return False
    try:
        fd = _open_claim(uri, run_id)
    except StorageError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def record_pending(uri: str, run_id: str, status: str, error: str | None) -> Path | None:
    """Note a run the store would not let us close; `reconcile` closes it later. None if even the note
    cannot be written (then the error line says the run may still show RUNNING)."""
    record = {"uri": uri, "run_id": run_id, "status": status, "error": error, "time": time.time()}
    for base in (state_dir(uri), _fallback_dir(uri)):
        try:
            (base / "pending").mkdir(parents=True, exist_ok=True)
            path = base / "pending" / f"{run_id}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
            return path
        except OSError:
            continue
    return None


def pending_records(uri: str) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for base in dict.fromkeys((state_dir(uri), _fallback_dir(uri))):
        for path in sorted((base / "pending").glob("*.json")) if (base / "pending").is_dir() else []:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("uri") == uri:
                out.append((path, record))
    return out


def reconcile(uri: str, close: Callable[[str, str, str | None], bool]) -> list[str]:
    """Close every pending run of `uri` with `close(run_id, status, error)` (False: it is not RUNNING
    any more, or gone); drop the records that are done. Returns one message per run it closed."""
    done: list[str] = []
    for path, record in pending_records(uri):
        run_id, status = str(record.get("run_id")), str(record.get("status", "FAILED"))
        if is_claimed_elsewhere(uri, run_id):
            continue  # being resumed right now: the resuming process owns its status
        try:
            closed = close(run_id, status, record.get("error"))
        except Exception as e:  # the store still refuses: try again next time
            log.debug("could not reconcile run %s yet: %s", run_id, reason(e))
            continue
        if closed:
            done.append(f"run {run_id} was left open by a tracking-store failure; now marked {status}")
        path.unlink(missing_ok=True)
    return done


def quiet_store_loggers() -> None:
    """MLflow logs every SQLAlchemy error at ERROR with its whole traceback before raising it (372
    lines for one lock); we report the raised error in one line, so those records are dropped unless
    the user asked for library messages (`picollm -v`)."""
    lg = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _DropTracebacks) for f in lg.filters):
        lg.addFilter(_DropTracebacks())


class _DropTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return logging.getLogger().getEffectiveLevel() <= logging.INFO
