"""`make serve` (mlflow models serve, from the project environment) on a free port, and the registered
model loaded in a fresh virtualenv that never installed picollm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from picollm.tracking import server

from ..conftest import REPO
from .conftest import free_port

pytestmark = pytest.mark.integration


def post(url: str, payload: dict | str, timeout: float = 30) -> tuple[int, dict]:
    """POST a JSON body (a dict, or the raw text: JSON's NaN); (status, body). No body carries a traceback."""
    data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    assert b"Traceback" not in raw and b"stack_trace" not in raw, raw[:2000]
    return status, json.loads(raw)


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


@contextmanager
def make_serve(model: str, store: str, log_path: Path, **env: str) -> Iterator[str]:
    """`make serve MODEL=model` on a free port (extra `env`, e.g. PICOLLM_SERVE_*), answering; its base URL.
    Stopped by its process group afterwards, also when the test fails; nothing of it may be left running."""
    port = free_port()
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": store, **env}
    full_env["PATH"] = "/usr/bin:/bin"  # without .venv/bin: the target must put it there for uvicorn itself
    cmd = ["make", "-s", "-C", str(REPO), "serve", f"MODEL={model}", f"PORT={port}"]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/ping", proc)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make, mlflow and uvicorn share the session started above
        try:
            proc.wait(timeout=20)
        finally:
            deadline = time.monotonic() + 20
            while server.process_group(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = server.process_group(proc.pid)
            if left:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
        assert not left, f"server processes left running: {left}"


def test_make_serve_answers_prompts_and_rejects_bad_ones(use_trained, tmp_path: Path):
    with make_serve(f"{use_trained.name}@champion", use_trained.uri, tmp_path / "serve.log") as base:
        status, body = post(f"{base}/invocations", {"inputs": ["2 4 6 8", "1 2"], "params": {"max_new_tokens": 3}})
        assert status == 200, body
        assert len(body["predictions"]) == 2 and all(len(p.split()) == 3 for p in body["predictions"])

        import picollm
        from picollm.tracking.prompts import continue_prompts

        model = picollm.load_model(f"{use_trained.name}@champion")
        assert body["predictions"] == continue_prompts(model, ["2 4 6 8", "1 2"], max_new_tokens=3)

        for prompt, fragment in (("2 4 99", "prompt token 99 is outside the model's values 0..30"), ("a b", "'a'")):
            status, body = post(f"{base}/invocations", {"inputs": [prompt]})
            assert status == 400, body
            assert body["error_code"] == "INVALID_PARAMETER_VALUE" and fragment in body["message"], body
        status, body = post(f"{base}/invocations", {"inputs": ["1 2"], "params": {"max_new_tokens": 0}})
        assert status == 400 and "max_new_tokens must be at least 1" in body["message"], body


@pytest.fixture
def slow_model(migrated_store: str) -> str:
    """Registers `itest-slow`: untrained softmax/ALiBi weights wide enough that 4096 tokens take seconds."""
    import torch

    from picollm.model.config import ModelConfig
    from picollm.model.transformer import Transformer
    from picollm.tracking import registry
    from picollm.tracking import store as tracking

    tracking.init_tracking()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=64, n_layers=2, n_heads=4, attention="softmax", pos_encoding="alibi")
    with tracking.tracked_run("itest-serve"):
        registry.log_model(Transformer(cfg), "itest-slow")
    return migrated_store


BUDGET_S = 2.0
REFUSED = [  # (request, what the 400's message says): the CLI's limits and the input shapes it cannot mean
    ({"inputs": ["1 2"], "params": {"temperature": -1}}, "temperature must be a finite number >= 0"),
    ({"inputs": ["1 2"], "params": {"top_p": 2}}, "top_p must be between 0 and 1"),
    ('{"inputs": ["1 2"], "params": {"temperature": NaN}}', "temperature must be a finite number >= 0"),
    ({"inputs": ["1 2"], "params": {"top_k": -1, "temperature": 1.0}}, "top_k must be an integer >= 1"),
    ({"inputs": [[5, 10, 15, 20]]}, "(a list of lists)"),
    ({"inputs": ["1 2"], "params": {"max_tokens": 3}}, "unknown parameter(s) max_tokens"),
    ({"inputs": ["1 2"] * 17}, "17 prompts in one request"),
    ({"inputs": [" ".join(["1"] * 1025)]}, "1025 tokens"),
]


def test_make_serve_cannot_be_tied_up(slow_model: str, tmp_path: Path):
    """A bare name served (its latest version, as every picollm command reads it); 1e8 tokens refused at once;
    every setting the CLI refuses is a 400 naming it; a request past the time budget is answered 504 within
    the budget and a few seconds, and the next request is served at once."""
    with make_serve(
        "itest-slow", slow_model, tmp_path / "serve.log", PICOLLM_SERVE_TIME_BUDGET_S=str(BUDGET_S)
    ) as base:
        url = f"{base}/invocations"
        assert post(url, {"inputs": ["1 2"], "params": {"max_new_tokens": 3}})[0] == 200

        t0 = time.monotonic()
        status, body = post(url, {"inputs": ["1 2"], "params": {"max_new_tokens": 100_000_000}})
        refused_in = time.monotonic() - t0
        assert status == 400 and "max_new_tokens must be at most 4096, got 100000000" in body["message"], body
        assert refused_in < 1.0, refused_in

        for payload, fragment in REFUSED:
            status, body = post(url, payload)
            assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", (payload, body)
            assert fragment in body["message"], (fragment, body)

        t0 = time.monotonic()
        status, body = post(
            url, {"inputs": [" ".join(["1"] * 256)] * 16, "params": {"max_new_tokens": 4096}}, timeout=60
        )
        over_budget_in = time.monotonic() - t0
        assert status == 504 and body["error_code"] == "DEADLINE_EXCEEDED", body
        assert "time budget of 2 s (PICOLLM_SERVE_TIME_BUDGET_S)" in body["message"], body
        assert over_budget_in < BUDGET_S + 4, over_budget_in

        t0 = time.monotonic()
        status, body = post(url, {"inputs": ["1 2"], "params": {"max_new_tokens": 4}})
        next_in = time.monotonic() - t0
        assert status == 200 and len(body["predictions"][0].split()) == 4, body
        assert next_in < 2.0, next_in  # the worker is free: no abandoned generation still decoding
    print(f"refused 1e8 tokens in {refused_in:.3f} s; over budget ({BUDGET_S} s) answered in {over_budget_in:.2f} s; "
          f"next request in {next_in:.3f} s")  # fmt: skip


def test_make_serve_with_a_name_that_names_nothing_is_one_line(migrated_store: str):
    env = {**os.environ, "MLFLOW_TRACKING_URI": migrated_store, "PATH": "/usr/bin:/bin"}
    t0 = time.monotonic()
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "serve", "MODEL=picollm-nothing", f"PORT={free_port()}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and time.monotonic() - t0 < 60
    lines = [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("make")]
    assert lines == ["error: no registered model named 'picollm-nothing' (registered: none yet)"], done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_registered_model_loads_in_a_fresh_virtualenv_without_picollm(use_trained, tmp_path: Path):
    """A fresh venv with only the model's requirements (pip, from the package index): pyfunc loads the
    registered model from the code it carries and predicts like the project environment."""
    import mlflow

    uri = f"models:/{use_trained.name}@champion"
    reqs = Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt", dst_path=str(tmp_path)))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(reqs)]
    subprocess.run(pip, check=True, timeout=1500)
    script = (
        "import json, sys, mlflow\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import picollm\n"
        "out = {'predictions': m.predict(['2 4 6 8']), 'picollm': picollm.__file__}\n"
        "try:\n"
        "    m.predict(['2 4 99'])\n"
        "except mlflow.exceptions.MlflowException as e:\n"
        "    out['error'] = [e.error_code, e.message]\n"
        "print(json.dumps(out))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": use_trained.uri}
    done = subprocess.run(
        [str(py), "-c", script, uri], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/picollm/" in out["picollm"] and str(REPO) not in out["picollm"]  # the copy the model carries

    import picollm
    from picollm.tracking.prompts import continue_prompts

    assert out["predictions"] == continue_prompts(picollm.load_model(f"{use_trained.name}@champion"), ["2 4 6 8"])
    assert out["error"][0] == "INVALID_PARAMETER_VALUE" and "outside the model's values" in out["error"][1]
