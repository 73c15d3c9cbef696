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
from pathlib import Path

import pytest

from picollm.tracking import server

from ..conftest import REPO
from .conftest import free_port

pytestmark = pytest.mark.integration


def post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


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


def test_make_serve_answers_prompts_and_rejects_bad_ones(use_trained, tmp_path: Path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": use_trained.uri}
    env["PATH"] = "/usr/bin:/bin"  # without .venv/bin: the target must put it there for uvicorn itself
    cmd = ["make", "-s", "-C", str(REPO), "serve", f"MODEL={use_trained.name}@champion", f"PORT={port}"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/ping", proc)
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
            assert "stack_trace" not in body and "Traceback" not in body["message"]
        status, body = post(f"{base}/invocations", {"inputs": ["1 2"], "params": {"max_new_tokens": 0}})
        assert status == 400 and "max_new_tokens must be at least 1" in body["message"], body
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
