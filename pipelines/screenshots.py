"""`make screenshots`: the pictures of docs/first_ten_minutes.md, taken in headless Chromium from the URLs the
commands print.

Runs `picollm train` and `picollm compare` into a fresh store (or reads an existing one with --store), starts
`mlflow ui` on that store on a free port, opens each printed URL and saves what the browser shows:

    python -m pipelines.screenshots [--store DIR] [--out docs/img] [--train CONFIG] [--compare CONFIG]

The UI is served on 127.0.0.2 rather than 127.0.0.1: MLflow 3.17 opens its assistant panel over a third of
the page on a first visit from localhost, and each headless Chromium is a first visit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from picollm.tracking import links

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.2"  # loopback, but not "localhost" to the UI: no assistant panel
WINDOW = "1400,1000"
MAX_BYTES = 150_000  # each picture in docs/img
URL = re.compile(r"^(run|report|grouped|model)\s+(http\S+)$", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run_command(args: list[str], store: Path) -> dict[str, str]:
    """Run `picollm ARGS` on `store`; the URLs it printed at the end, by kind (run, report, grouped, model)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "HF_HUB_OFFLINE": "1"}
    print(f"$ picollm {' '.join(args)}", flush=True)
    exe = str(Path(sys.executable).with_name("picollm"))
    out = subprocess.run([exe, *args], env=env, cwd=REPO, text=True, capture_output=True)
    if out.returncode != 0:
        raise SystemExit(f"picollm {' '.join(args)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return {kind: url for kind, url in URL.findall(out.stdout)}


def start_ui(store: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--host", HOST]
    cmd += ["--port", str(port), "--workers", "1", "--allowed-hosts", f"{HOST}:{port},{HOST}"]
    cmd += ["--cors-allowed-origins", f"http://{HOST}:{port}"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    stop_ui(proc)
    raise SystemExit("mlflow ui did not answer within 120 s")


def stop_ui(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its worker
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def screenshot(url: str, path: Path, budget_ms: int = 60_000, height: int = 1000) -> None:
    """The page at `url` as `path`. Taken five times with one profile, the largest kept: a visit often stops
    before the charts or a large HTML artifact have rendered, and a rendered page is the larger PNG."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
        ]
        cmd += [f"--window-size=1400,{height}", f"--virtual-time-budget={budget_ms}", url]
        tries = [Path(profile) / f"try{i}.png" for i in range(5)]
        for t in tries:
            subprocess.run([*cmd, f"--screenshot={t}"], capture_output=True, timeout=300, check=True)
        shutil.copy(max(tries, key=lambda t: t.stat().st_size), path)
    shrink(path)
    print(f"  {path.name}: {path.stat().st_size // 1000} KB  <- {url}", flush=True)


def shrink(path: Path) -> None:
    """Quantise a picture over MAX_BYTES to 64 colours (UI pages: flat colours, no visible loss)."""
    if path.stat().st_size <= MAX_BYTES:
        return
    from PIL import Image

    Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--store", type=Path, help="keep the store here (default: a temp dir); one filled before is reused (urls.json)"
    )
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    p.add_argument("--train", default="configs/linear.yaml", help="the training config (make train-linear's)")
    p.add_argument("--compare", default="configs/compare_tiny.yaml", help="the compare config (seconds-long)")
    p.add_argument("--copy-to", type=Path, help="also copy the pictures here")
    a = p.parse_args(argv)
    tmp = None if a.store else tempfile.TemporaryDirectory(prefix="picollm-screenshots-")
    store = (a.store or Path(tmp.name)).resolve()
    try:
        saved = store / "urls.json"
        if saved.is_file():  # filled by an earlier run: retake the pictures only
            train, compare = json.loads(saved.read_text())
        else:
            store.mkdir(parents=True, exist_ok=True)
            train = run_command(["train", a.train], store)
            compare = run_command(["compare", a.compare], store)
            saved.write_text(json.dumps([train, compare]))
        port = _free_port()
        base = f"http://{HOST}:{port}"
        proc = start_ui(store, port)
        try:
            a.out.mkdir(parents=True, exist_ok=True)
            printed = {**_prefix(train, "train"), **_prefix(compare, "compare")}
            local = {k: re.sub(r"^https?://[^/#]+", base, u) for k, u in printed.items()}
            # the command's own URLs, as printed (only the address swapped for this server's)
            shots = {
                "train_run.png": local["train_run"],
                "train_overview.png": local["train_run"].replace("/model-metrics?", "?"),
                "model_version.png": local["train_model"],
                "compare_parent.png": local["compare_run"],
                "compare_report.png": local["compare_report"],
                "compare_grouped.png": local["compare_grouped"],
            }
            train_eid = re.search(r"/experiments/(\d+)/", local["train_run"]).group(1)
            shots["runs_table.png"] = links.runs_table_url(base, train_eid)  # what `make ui` prints
            for name, url in shots.items():
                screenshot(url, a.out / name)
                if a.copy_to:
                    a.copy_to.mkdir(parents=True, exist_ok=True)
                    shutil.copy(a.out / name, a.copy_to / name)
        finally:
            stop_ui(proc)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def _prefix(urls: dict[str, str], name: str) -> dict[str, str]:
    return {f"{name}_{k}": v for k, v in urls.items()}


if __name__ == "__main__":
    raise SystemExit(main())
