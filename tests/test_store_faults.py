"""The tracking store as a component that fails, with real faults: a SQLite lock held by another
process, an HTTP server on 127.0.0.1 that answers /health and then stalls, a run claimed by another
process. Each ends in one line, quickly, with no run left RUNNING unnoticed.
"""

from __future__ import annotations

import http.server
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from picollm.errors import RunBusy, StorageError
from picollm.tracking import faults as store_faults
from picollm.tracking import store as tracking
from picollm.training.run import MlflowCallbacks

from .conftest import TINY
from .test_faults import all_runs, invoke, one_line

HOLD_LOCK = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("ROLLBACK")
"""

HOLD_CLAIM = r"""
import sys, time
from picollm.tracking import faults as store_faults
with store_faults.claim_run(sys.argv[1], sys.argv[2]):
    print("claimed", flush=True)
    time.sleep(60)
"""


def hold_lock(db: Path, seconds: float) -> subprocess.Popen:
    """Another writer holding SQLite's exclusive lock on `db` for `seconds` (returns once it holds it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def db_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///"))


def test_a_lock_shorter_than_the_budget_is_waited_out(migrated_store: str):
    tracking.init_tracking(lock_timeout_s=30)
    with tracking.tracked_run("locks") as run:
        metrics = tracking.MetricLogger(run.info.run_id)
        metrics.log({"m": 1.0}, step=0)
        holder = hold_lock(db_path(migrated_store), 3)
        t0 = time.perf_counter()
        metrics.flush()  # SQLite says "database is locked" every 2 s; retried until the lock is gone
        assert time.perf_counter() - t0 > 1.5
        holder.wait(10)
    [r] = all_runs()
    assert r.info.status == "FINISHED" and r.data.metrics["m"] == 1.0


def test_a_lock_longer_than_the_budget_is_one_line_and_the_run_is_closed_later(
    migrated_store: str, monkeypatch: pytest.MonkeyPatch
):
    """Locked for longer than tracking.lock_timeout_s after the first checkpoint: exit 1 within seconds,
    one line, no MLflow traceback; the run cannot be closed while locked, so it is noted beside the store
    and marked FAILED (with its error tag) by the next picollm command on that store."""
    holders: list[subprocess.Popen] = []
    original = MlflowCallbacks.on_checkpoint

    def then_lock(self, checkpoint, epoch):
        original(self, checkpoint, epoch)
        if not holders:
            holders.append(hold_lock(db_path(migrated_store), 8))

    monkeypatch.setattr(MlflowCallbacks, "on_checkpoint", then_lock)
    t0 = time.perf_counter()
    result = invoke("train", TINY, "--set", "train.epochs=4", "--set", "tracking.lock_timeout_s=1")
    line = one_line(result, 1, "locked by another writer for more than 1 s", "tracking.lock_timeout_s")
    assert "next time picollm opens this store" in line
    assert time.perf_counter() - t0 < 60
    holders[0].kill()  # the other writer goes away (its lock with it)
    holders[0].wait(20)
    [pending] = list((db_path(migrated_store).parent / ".picollm" / "pending").glob("*.json"))
    [r] = all_runs()
    assert r.info.status == "RUNNING"  # what the store holds until it accepts writes again
    tracking._initialised.clear()
    tracking.init_tracking()  # any next picollm command on this store
    [r] = all_runs()
    assert r.info.status == "FAILED" and "locked by another writer" in r.data.tags["error"]
    assert not pending.exists()


def test_ctrl_c_while_the_store_is_locked_ends_within_seconds(migrated_store: str):
    """The signal is delivered between write attempts (each at most SQLite's 2 s busy timeout)."""
    tracking.init_tracking(lock_timeout_s=60)
    holder = None
    t0 = 0.0
    with pytest.raises(KeyboardInterrupt), tracking.tracked_run("locks") as run:
        metrics = tracking.MetricLogger(run.info.run_id)
        metrics.log({"m": 1.0}, step=0)
        holder = hold_lock(db_path(migrated_store), 10)
        threading.Timer(0.5, lambda: __import__("signal").raise_signal(__import__("signal").SIGINT)).start()
        t0 = time.perf_counter()
        metrics.flush()
    assert time.perf_counter() - t0 < 9  # not the lock's 10 s, nor the 60 s budget
    holder.kill()
    holder.wait(15)
    tracking._initialised.clear()
    tracking.init_tracking()
    [r] = all_runs()
    assert r.info.status == "KILLED" and r.data.tags["error"] == "interrupted"


def test_a_database_turning_read_only_mid_run_is_one_line_with_the_real_reason(
    migrated_store: str, monkeypatch: pytest.MonkeyPatch
):
    """After the first checkpoint every SQLite connection becomes read-only (`PRAGMA query_only`, what
    a read-only file does to writes even as root): one line naming SQLite's reason, not SQLAlchemy's
    autoflush hint; once writable again, the next command closes the run FAILED."""
    import sqlalchemy
    from sqlalchemy import event

    armed: list[bool] = []

    def read_only(conn, cursor, statement, parameters, context, executemany):
        cursor.execute(f"PRAGMA query_only = {int(bool(armed))}")  # pooled connections follow the switch

    original = MlflowCallbacks.on_checkpoint

    def then_read_only(self, checkpoint, epoch):
        original(self, checkpoint, epoch)
        armed.append(True)

    monkeypatch.setattr(MlflowCallbacks, "on_checkpoint", then_read_only)
    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", read_only)
    try:
        t0 = time.perf_counter()
        result = invoke("train", TINY, "--set", "train.epochs=3")
        line = one_line(result, 1, "tracking store failed under run", "attempt to write a readonly database")
        assert "autoflush" not in line and "next time picollm opens this store" in line
        assert time.perf_counter() - t0 < 60
        armed.clear()  # writable again
        tracking._initialised.clear()
        tracking.init_tracking()
        [r] = all_runs()
        assert r.info.status == "FAILED" and "readonly database" in r.data.tags["error"]
    finally:
        event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", read_only)


def test_reasons_are_the_root_cause_not_the_wrappers_hints():
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    root = sqlite3.OperationalError("attempt to write a readonly database")
    wrapped = sqlalchemy.exc.OperationalError("INSERT INTO metrics ...", {}, root)
    try:
        try:
            raise wrapped
        except sqlalchemy.exc.OperationalError as e:
            raise MlflowException(
                "(raised as a result of Query-invoked autoflush; consider using a session.no_autoflush block)\n"
                + str(e)
            ) from e
    except MlflowException as e:
        assert store_faults.reason(e) == "attempt to write a readonly database"
        assert store_faults.is_store_error(e) and not store_faults.is_locked(e)


# --------------------------------------------------------------------------------------------------
# A server that answers /health and then stalls (127.0.0.1 only)


@pytest.fixture
def stalled_server() -> Iterator[str]:
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _stall(self) -> None:
            if self.path.rstrip("/") == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")
            else:
                release.wait(60)  # a frozen server: the client's timeout must end this, not us

        do_GET = do_POST = do_PATCH = do_DELETE = _stall

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_a_stalled_server_is_one_line_within_the_http_timeout(stalled_server: str, monkeypatch, tmp_path: Path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stalled_server)
    mlflow.set_tracking_uri(stalled_server)
    t0 = time.perf_counter()
    result = invoke("train", TINY, "--set", "tracking.http_timeout_s=3")
    one_line(result, 2, f"tracking store {stalled_server} did not answer")
    assert time.perf_counter() - t0 < 20  # 3 attempts of 1 s, not MLflow's 120 s x 7 retries


def test_a_stalled_server_is_one_line_on_stderr_of_a_real_process(stalled_server: str, tmp_path: Path):
    """As a user sees it (a `picollm` process, not CliRunner): urllib3's "Retrying ..." warnings for the
    stalled calls stay out of stderr, so the failure is the one error line (`-v` shows them: below)."""
    cmd = [sys.executable, "-m", "pipelines.cli", "train", str(TINY), "--set", "tracking.http_timeout_s=3"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": stalled_server}
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking store {stalled_server} did not answer"), lines


LIBRARY_MESSAGES = r"""
import logging, sys, warnings
from picollm.runtime import logs
logs.configure(verbose=sys.argv[1] == "-v")
from picollm.tracking import store
store.init_tracking(sys.argv[2])  # MLflow's own handler gets the filter here
logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=1))")
logging.getLogger("mlflow.tracking.fluent").warning("an MLflow warning")
logging.getLogger("mlflow.store.db.utils").error("an MLflow error with its traceback")
warnings.warn_explicit("a library's warning", UserWarning, "site-packages/lib.py", 1, module="lib")
logging.getLogger("picollm.runtime.disk_cache").warning("picollm's own warning")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_messages_reach_stderr_only_with_verbose(migrated_store: str, verbose: bool):
    flag = "-v" if verbose else "-"
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY_MESSAGES, flag, migrated_store], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "WARNING picollm.runtime.disk_cache: picollm's own warning", lines
    shown = "\n".join(lines)
    for library in ("Retrying", "an MLflow warning", "an MLflow error", "a library's warning"):
        assert (library in shown) == verbose, (library, lines)


def test_a_write_to_a_server_frozen_mid_run_gives_up_within_the_budget(stalled_server: str):
    tracking.init_tracking(stalled_server, http_timeout_s=3)
    t0 = time.perf_counter()
    with pytest.raises(Exception) as info:
        tracking.store_write(MlflowClient().log_batch, "0" * 32, metrics=[Metric("m", 1.0, 0, 0)])
    assert store_faults.is_store_error(info.value)
    assert time.perf_counter() - t0 < 15


# --------------------------------------------------------------------------------------------------
# Claims: one process per run


def fake_killed_run() -> str:
    client = MlflowClient()
    exp = client.create_experiment("claims")
    run = client.create_run(exp)
    client.set_terminated(run.info.run_id, "KILLED")
    return run.info.run_id


def test_a_run_claimed_by_another_process_is_refused(migrated_store: str):
    tracking.init_tracking()
    run_id = fake_killed_run()
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_CLAIM, migrated_store, run_id], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "claimed"
        t0 = time.perf_counter()
        one_line(invoke("train", TINY, "--resume", run_id), 2, f"run {run_id} is being trained or resumed", "pid")
        assert time.perf_counter() - t0 < 10
        with pytest.raises(RunBusy), tracking.tracked_run("claims", run_id=run_id):
            pass
        assert MlflowClient().get_run(run_id).info.status == "KILLED"  # left as it was
    finally:
        other.kill()
        other.wait(10)
    with store_faults.claim_run(migrated_store, run_id):  # a dead holder's claim is free again
        assert not store_faults.is_claimed_elsewhere(migrated_store, run_id)


def test_runs_hold_their_claim_while_open(migrated_store: str):
    tracking.init_tracking()
    with tracking.tracked_run("claims") as run:
        probe = subprocess.run(
            [sys.executable, "-c", HOLD_CLAIM.replace("time.sleep(60)", "pass"), migrated_store, run.info.run_id],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode != 0 and "RunBusy" in probe.stderr
    assert not store_faults.is_claimed_elsewhere(migrated_store, run.info.run_id)


def test_pending_record_is_kept_while_the_store_still_refuses(migrated_store: str):
    tracking.init_tracking()
    run_id = MlflowClient().create_run(MlflowClient().create_experiment("pending")).info.run_id
    store_faults.record_pending(migrated_store, run_id, "FAILED", "StorageError: boom")

    def refuse(run_id: str, status: str, error: str | None) -> bool:
        raise StorageError("still locked")

    assert store_faults.reconcile(migrated_store, refuse) == []
    assert len(store_faults.pending_records(migrated_store)) == 1
    tracking._initialised.clear()
    tracking.init_tracking()
    r = MlflowClient().get_run(run_id)
    assert r.info.status == "FAILED" and r.data.tags["error"] == "StorageError: boom"
    assert store_faults.pending_records(migrated_store) == []


def test_a_store_path_where_no_file_can_be_created_fails_at_once(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/mlflow.db")
    t0 = time.perf_counter()
    one_line(invoke("models", "list"), 2, "tracking store sqlite:////proc/mlflow.db is not usable")
    assert time.perf_counter() - t0 < 10  # FileLock alone retries for its 120 s timeout
