"""Team tracking server: PostgreSQL on loopback and `mlflow server` over it, all state in one folder.

`start(cfg)` initialises a PostgreSQL cluster once in `<state_dir>/pgdata` (Debian's binaries; run as the
`postgres` user when we are root, because PostgreSQL refuses to run as root), starts it on
127.0.0.1:`postgres_port`, creates the role and database, then starts `mlflow server` detached (its own
session, PID in `<state_dir>/mlflow.pid`) and waits for `GET /health`. `stop(cfg)` stops exactly those two:
mlflow by the PID in its pid file (its process group: SIGTERM, then SIGKILL), PostgreSQL with
`pg_ctl stop -m fast`. Both are idempotent; `status(cfg)` reports both.

Local authentication is `trust` on loopback (any local user may connect as any role): fine for one machine,
not for a team, whose database needs passwords and TLS (see README, "Team tracking server").
Every failure is a PicollmError with one clear line (the log's last lines where a process died).
"""

from __future__ import annotations

import errno
import glob
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picollm.config import ServerConfig
from picollm.errors import PicollmError

PG_SUPERUSER = "postgres"
PG_OS_USER = "postgres"
OPTUNA_DB = "optuna"  # the database of `picollm sweep --storage team` studies, beside MLflow's
INSTALL_HINT = "install it with `apt-get install postgresql` (or `make server`, which does so as root)"
_SOCKET_MAX = 100  # Unix socket paths are limited to 107 bytes; leave room for ".s.PGSQL.NNNNN"


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def postgres_log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        return self.root / "pgsocket"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def mlflow_log(self) -> Path:
        return self.root / "mlflow.log"

    @property
    def mlflow_pid(self) -> Path:
        return self.root / "mlflow.pid"


def paths(cfg: ServerConfig) -> Paths:
    return Paths(cfg.state_dir.expanduser().resolve())


def url(cfg: ServerConfig) -> str:
    """The URL clients use: the bound address, or loopback when bound to every interface."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.port}"


def managed_postgres(cfg: ServerConfig) -> bool:
    return cfg.backend_store_uri is None


def backend_uri(cfg: ServerConfig) -> str:
    """SQLAlchemy URI of the store. A bare `postgresql://` means psycopg (v3) to SQLAlchemy 2.1; we pin and
    install psycopg2 (the `server` extra), so name that driver explicitly."""
    uri = cfg.backend_store_uri or f"postgresql://{cfg.postgres_user}@127.0.0.1:{cfg.postgres_port}/{cfg.postgres_db}"
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", uri)


def optuna_uri(cfg: ServerConfig) -> str:
    """The team's Optuna study database (`picollm sweep --storage team`): database `optuna` on the same
    PostgreSQL as MLflow's store (a database of its own: both keep an `alembic_version` table)."""
    uri = backend_uri(cfg)
    head, _, _ = uri.partition("?")
    return re.sub(r"/[^/]*$", f"/{OPTUNA_DB}", head)


def _redact(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


# --------------------------------------------------------------------------------------------------
# Processes and ports


def _reap(pid: int) -> None:
    """Collect our own exited child (a zombie still answers kill(pid, 0))."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, ... (None where unreadable)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while `pid` runs (zombies count as gone: init may never reap them in a container)."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_group(pgid: int) -> list[int]:
    """Live processes of a process group (our mlflow server and the workers it spawned)."""
    if not Path("/proc/self/stat").exists():  # no /proc: ask the kernel whether the group has anyone
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[2] == str(pgid) and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def _is_mlflow_group(pid: int) -> bool:
    """The pid file's process group still holds an mlflow server (not a reused PID)."""
    members = process_group(pid)
    if not Path("/proc/self/stat").exists():
        return bool(members)
    return any("mlflow" in _cmdline(p) for p in members)


def _port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (None: it can). Only "in use" is about the port:
    a host that does not resolve, or is not an address of this machine, is named as such."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"host {host!r} cannot be resolved ({e.strerror}); use 127.0.0.1, 0.0.0.0 or this machine's name"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use; choose another with --set port=PORT"
            return f"cannot listen on {host}:{port} ({e.strerror}; is {host} an address of this machine?)"
    return None


def _tail(path: Path, n: int = 10) -> str:
    try:
        lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"  ({path} is missing)"
    return "\n".join(f"  | {ln}" for ln in lines[-n:]) or f"  ({path} is empty)"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------------
# PostgreSQL


def find_postgres_bin(cfg: ServerConfig) -> Path:
    """Folder with initdb, pg_ctl, pg_isready, psql: cfg.postgres_bin, then PATH, then Debian's newest."""
    if cfg.postgres_bin is not None:
        folder = cfg.postgres_bin.expanduser()
        if not (folder / "pg_ctl").is_file():
            raise PicollmError(f"postgres_bin {folder} has no pg_ctl; point it at PostgreSQL's bin folder")
        return folder
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        folder = Path(on_path).resolve().parent  # /usr/local/bin/pg_ctl -> /usr/lib/postgresql/15/bin
        if (folder / "initdb").is_file():
            return folder
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    if candidates:

        def version(folder: Path) -> tuple[int, ...]:
            return tuple(int(x) for x in re.findall(r"\d+", folder.parent.name)) or (0,)

        return max(candidates, key=version)
    raise PicollmError(f"PostgreSQL (pg_ctl, initdb) not found: {INSTALL_HINT}, or set postgres_bin")


def _tool(folder: Path, name: str) -> str:
    path = folder / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise PicollmError(f"PostgreSQL's {name} not found in {folder} or on PATH: {INSTALL_HINT}")
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise PicollmError(
            f"PostgreSQL refuses to run as root and there is no {PG_OS_USER!r} user: "
            f"{INSTALL_HINT} (it creates that user), or run as a normal user"
        ) from None
    if not shutil.which("runuser"):
        raise PicollmError("running as root needs `runuser` (util-linux) to start PostgreSQL as the postgres user")
    return ["runuser", "-u", PG_OS_USER, "--", *cmd]


def _chown_postgres(*targets: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_OS_USER)
        for t in targets:
            os.chown(t, pw.pw_uid, pw.pw_gid)


def _run(cmd: list[str], what: str, timeout: float, cwd: Path | None = None, log: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PicollmError(f"{what} did not finish within {timeout:.0f} s") from None
    except OSError as e:
        raise PicollmError(f"{what}: cannot run {cmd[0]} ({e.strerror})") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        more = f"\nlast lines of {log}:\n{_tail(log)}" if log is not None and log.exists() else ""
        raise PicollmError(f"{what} failed: {detail}{more}")
    return proc.stdout


def _pg_running(bin_dir: Path, p: Paths) -> bool:
    if not (p.pgdata / "PG_VERSION").exists():
        return False
    proc = subprocess.run(
        _as_postgres([_tool(bin_dir, "pg_ctl"), "status", "-D", str(p.pgdata)]),
        cwd=p.root,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode == 0  # 3: not running, 4: no data directory


def postgres_pid(p: Paths) -> int | None:
    pid = _read_pid(p.pgdata / "postmaster.pid")
    return pid if pid is not None and alive(pid) else None


def _check_reachable_by_postgres(p: Paths) -> None:
    if os.geteuid() != 0:
        return
    probe = subprocess.run(_as_postgres(["test", "-x", str(p.root)]), capture_output=True, timeout=30)
    if probe.returncode != 0:
        raise PicollmError(
            f"the postgres user cannot reach {p.root} (a parent folder is not searchable by other users); "
            "choose a state_dir under a folder everyone can traverse, e.g. --set state_dir=/srv/picollm-server"
        )


def _socket_dir(p: Paths, port: int) -> Path:
    if len(str(p.socket_dir / f".s.PGSQL.{port}")) <= _SOCKET_MAX:
        return p.socket_dir
    import tempfile

    return Path(tempfile.gettempdir()) / f"picollm-pgsocket-{port}"


def _psql(bin_dir: Path, cfg: ServerConfig, sql: str) -> str:
    cmd = [_tool(bin_dir, "psql"), "-X", "-h", "127.0.0.1", "-p", str(cfg.postgres_port), "-U", PG_SUPERUSER]
    cmd += ["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc", sql]
    return _run(cmd, f"psql ({sql.split()[0]})", timeout=60).strip()


def start_postgres(cfg: ServerConfig) -> tuple[int | None, bool]:
    """Initialise (once) and start the cluster, create role and database. Returns (postmaster PID, started now)."""
    p = paths(cfg)
    bin_dir = find_postgres_bin(cfg)
    p.root.mkdir(parents=True, exist_ok=True)
    _check_reachable_by_postgres(p)
    if not (p.pgdata / "PG_VERSION").exists():
        if p.pgdata.exists() and any(p.pgdata.iterdir()):
            raise PicollmError(f"{p.pgdata} exists but is not a PostgreSQL data folder; move it away")
        p.pgdata.mkdir(mode=0o700, exist_ok=True)
        _chown_postgres(p.pgdata)
        initdb = [_tool(bin_dir, "initdb"), "-D", str(p.pgdata), "-U", PG_SUPERUSER, "-E", "UTF8", "--locale=C"]
        initdb += ["--auth-local=trust", "--auth-host=trust"]  # loopback only (listen_addresses below)
        _run(_as_postgres(initdb), "initdb", timeout=300, cwd=p.root)
    started = False
    if not _pg_running(bin_dir, p):
        if _port_problem("127.0.0.1", cfg.postgres_port):
            raise PicollmError(
                f"port {cfg.postgres_port} on 127.0.0.1 is in use (another PostgreSQL?); "
                "choose another with --set postgres_port=PORT"
            )
        sock = _socket_dir(p, cfg.postgres_port)
        sock.mkdir(exist_ok=True)
        p.postgres_log.touch()
        _chown_postgres(sock, p.postgres_log)
        opts = f"-p {cfg.postgres_port} -c listen_addresses=127.0.0.1 -k {shlex.quote(str(sock))}"
        timeout = max(int(cfg.startup_timeout_s), 5)
        cmd = [_tool(bin_dir, "pg_ctl"), "start", "-D", str(p.pgdata), "-l", str(p.postgres_log), "-w"]
        cmd += ["-t", str(timeout), "-o", opts]
        _run(_as_postgres(cmd), "PostgreSQL start (pg_ctl)", timeout=timeout + 30, cwd=p.root, log=p.postgres_log)
        started = True
    ready = [_tool(bin_dir, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(cfg.postgres_port)]
    deadline = time.monotonic() + cfg.startup_timeout_s
    while subprocess.run(ready, capture_output=True, timeout=30).returncode != 0:
        if time.monotonic() > deadline:
            raise PicollmError(
                f"PostgreSQL on 127.0.0.1:{cfg.postgres_port} not ready after {cfg.startup_timeout_s:.0f} s; "
                f"last lines of {p.postgres_log}:\n{_tail(p.postgres_log)}"
            )
        time.sleep(0.3)
    user, db = cfg.postgres_user, cfg.postgres_db  # both validated as plain identifiers
    if not _psql(bin_dir, cfg, f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'"):
        _psql(bin_dir, cfg, f'CREATE ROLE "{user}" LOGIN')
    for name in (db, OPTUNA_DB):  # MLflow's store and the sweeps' Optuna studies
        if not _psql(bin_dir, cfg, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"):
            _psql(bin_dir, cfg, f'CREATE DATABASE "{name}" OWNER "{user}"')
    return postgres_pid(p), started


def stop_postgres(cfg: ServerConfig) -> int | None:
    """`pg_ctl stop -m fast` if our cluster runs. Returns the PID it stopped (None: nothing to stop)."""
    p = paths(cfg)
    if not (p.pgdata / "PG_VERSION").exists():
        return None
    pid = postgres_pid(p)
    bin_dir = find_postgres_bin(cfg)
    if not _pg_running(bin_dir, p):
        return None
    cmd = [_tool(bin_dir, "pg_ctl"), "stop", "-D", str(p.pgdata), "-m", "fast", "-w", "-t", "60"]
    _run(_as_postgres(cmd), "PostgreSQL stop (pg_ctl)", timeout=90, cwd=p.root, log=p.postgres_log)
    return pid


# --------------------------------------------------------------------------------------------------
# mlflow server


def _mlflow_cmd(cfg: ServerConfig, p: Paths) -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]
    dest = cfg.artifacts_destination or str(p.artifacts)
    if "://" not in dest:  # a local folder: absolute, since the server runs in state_dir
        dest = str(Path(dest).expanduser().resolve())
        Path(dest).mkdir(parents=True, exist_ok=True)
    cmd += ["server", "--backend-store-uri", backend_uri(cfg), "--artifacts-destination", dest]
    cmd += ["--host", cfg.host, "--port", str(cfg.port), "--workers", str(cfg.workers)]
    if cfg.allowed_hosts:
        cmd += ["--allowed-hosts", ",".join(cfg.allowed_hosts)]
    return cmd


def healthy(cfg: ServerConfig, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url(cfg)}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def mlflow_pid(cfg: ServerConfig) -> int | None:
    """PID of the running mlflow server we started (None: none, or a stale pid file)."""
    pid = _read_pid(paths(cfg).mlflow_pid)
    return pid if pid is not None and _is_mlflow_group(pid) else None


def _kill_group(pgid: int, grace_s: float = 15.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pgid)
            if not process_group(pgid):
                return
            time.sleep(0.1)
    raise PicollmError(f"mlflow server (process group {pgid}) survived SIGKILL")


def start_mlflow(cfg: ServerConfig) -> int:
    p = paths(cfg)
    uri = backend_uri(cfg)
    if uri.startswith("postgresql+psycopg2") and importlib.util.find_spec("psycopg2") is None:
        raise PicollmError("mlflow server needs the PostgreSQL driver psycopg2: pip install -e '.[server]'")
    if problem := _port_problem(cfg.host, cfg.port):
        raise PicollmError(problem)
    cmd = _mlflow_cmd(cfg, p)
    env = dict(os.environ)
    # MLflow's job runner (GenAI scorers, trace rollups) spawns ~7 huey consumer processes that picollm
    # never uses; off unless the environment asks for it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with open(p.mlflow_log, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=p.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    p.mlflow_pid.write_text(f"{proc.pid}\n")
    try:
        _wait_healthy(cfg, proc)
    except KeyboardInterrupt:  # Ctrl-C while it starts: no half-started server is left behind
        _kill_group(proc.pid, grace_s=5)
        p.mlflow_pid.unlink(missing_ok=True)
        raise
    return proc.pid


def _wait_healthy(cfg: ServerConfig, proc: subprocess.Popen) -> None:
    p = paths(cfg)
    deadline = time.monotonic() + cfg.startup_timeout_s
    while not healthy(cfg):
        if proc.poll() is not None:
            p.mlflow_pid.unlink(missing_ok=True)
            _kill_group(proc.pid, grace_s=5)  # workers it may have left behind
            raise PicollmError(
                f"mlflow server exited with code {proc.returncode} during startup; "
                f"last lines of {p.mlflow_log}:\n{_tail(p.mlflow_log)}"
            )
        if time.monotonic() > deadline:
            _kill_group(proc.pid, grace_s=5)
            p.mlflow_pid.unlink(missing_ok=True)
            raise PicollmError(
                f"mlflow server not healthy at {url(cfg)}/health after {cfg.startup_timeout_s:.0f} s "
                f"(startup_timeout_s); last lines of {p.mlflow_log}:\n{_tail(p.mlflow_log)}"
            )
        time.sleep(0.5)


def stop_mlflow(cfg: ServerConfig) -> int | None:
    """Stop the server by the PID in its pid file. Returns the PID it stopped (None: nothing to stop)."""
    p = paths(cfg)
    pid = mlflow_pid(cfg)
    if pid is not None:
        _kill_group(pid)
    p.mlflow_pid.unlink(missing_ok=True)
    return pid


# --------------------------------------------------------------------------------------------------
# Entry points (the CLI prints what they return)


def start(cfg: ServerConfig) -> dict[str, Any]:
    """Start PostgreSQL (unless backend_store_uri is set) and mlflow server; idempotent."""
    p = paths(cfg)
    p.root.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"url": url(cfg), "backend_store_uri": _redact(backend_uri(cfg)), "state_dir": str(p.root)}
    pid = mlflow_pid(cfg)
    if pid is None and (problem := _port_problem(cfg.host, cfg.port)):  # fail before starting PostgreSQL
        raise PicollmError(problem)
    pg_started = False
    if managed_postgres(cfg):
        info["postgres_pid"], pg_started = start_postgres(cfg)
    if pid is not None and healthy(cfg):
        return info | {"mlflow_pid": pid, "already_running": True, "log": str(p.mlflow_log)}
    if pid is not None:  # running but not answering (e.g. another port in the config): restart it
        stop_mlflow(cfg)
    try:
        pid = start_mlflow(cfg)
    except BaseException:
        if pg_started:
            stop_postgres(cfg)  # leave nothing behind that this call started
        raise
    return info | {"mlflow_pid": pid, "already_running": False, "log": str(p.mlflow_log)}


def stop(cfg: ServerConfig) -> dict[str, Any]:
    """Stop mlflow server, then our PostgreSQL; idempotent (nothing running is not an error)."""
    out: dict[str, Any] = {"mlflow_pid": stop_mlflow(cfg)}
    if managed_postgres(cfg):
        out["postgres_pid"] = stop_postgres(cfg)
    return out


def status(cfg: ServerConfig) -> dict[str, Any]:
    p = paths(cfg)
    out: dict[str, Any] = {
        "url": url(cfg),
        "mlflow_pid": mlflow_pid(cfg),
        "healthy": healthy(cfg),
        "backend_store_uri": _redact(backend_uri(cfg)),
        "state_dir": str(p.root),
        "managed_postgres": managed_postgres(cfg),
    }
    if managed_postgres(cfg):
        out["postgres_pid"] = postgres_pid(p)
    return out


def describe_start(info: dict[str, Any]) -> list[str]:
    verb = "already running" if info["already_running"] else "started"
    lines = [f"mlflow server {verb} at {info['url']} (pid {info['mlflow_pid']}, log {info['log']})"]
    if "postgres_pid" in info:
        lines.append(f"PostgreSQL running (pid {info['postgres_pid']}), store {info['backend_store_uri']}")
    else:
        lines.append(f"backend store {info['backend_store_uri']}")
    return lines


def describe_stop(out: dict[str, Any]) -> list[str]:
    lines = [
        f"mlflow server stopped (pid {out['mlflow_pid']})" if out["mlflow_pid"] else "mlflow server was not running"
    ]
    if "postgres_pid" in out:
        pg = out["postgres_pid"]
        lines.append(f"PostgreSQL stopped (pid {pg})" if pg else "PostgreSQL was not running")
    return lines


def describe_status(st: dict[str, Any]) -> list[str]:
    if st["mlflow_pid"]:
        health = "healthy" if st["healthy"] else "not answering /health"
        lines = [f"mlflow server: running at {st['url']} (pid {st['mlflow_pid']}), {health}"]
    else:
        lines = ["mlflow server: not running"]
    if st["managed_postgres"]:
        pg = st["postgres_pid"]
        lines.append(f"PostgreSQL: running (pid {pg}), {st['backend_store_uri']}" if pg else "PostgreSQL: not running")
    else:
        lines.append(f"backend store: {st['backend_store_uri']} (not managed here)")
    lines.append(f"state: {st['state_dir']}")
    return lines
