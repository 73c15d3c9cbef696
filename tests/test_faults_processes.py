"""Faults that need real processes: SIGINT/SIGTERM during train, compare, DPO and analysis, and four
trainings started at the same moment on a fresh store. Offline, CPU; a test's processes run at once.

The interrupted flows run through the real entry point (pipelines.cli:main) in a child process. Train
is interrupted for real, once its first checkpoint is in the store. The other flows are stalled at a
known point (a patched function touches a marker file, then sleeps) so that the signal lands inside
the stage under test, deterministically, however slow the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from picollm.training import optim
from pipelines.cli import app

from .conftest import TINY, copy_store, load_tiny, point_mlflow, sqlite_uri
from .test_faults import COMPARE_TINY, DPO_TINY, DPO_YAML, sets

pytestmark = pytest.mark.slow

EXIT_WITHIN_S = 15  # measured 2-4 s, mostly Python finalising torch and MLflow; generous for a busy CI
READY_WITHIN_S = 240

DRIVER = r"""
import importlib, pathlib, sys, time
marker, target, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if target:  # "module:Attr.name": touch the marker, then stall there until a signal arrives
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    original = getattr(owner, name)
    def stall(*args, **kwargs):
        pathlib.Path(marker).touch()
        time.sleep(600)
        return original(*args, **kwargs)
    setattr(owner, name, stall)
sys.argv = ["picollm", *argv]
from pipelines.cli import main
main()
"""

# Same seed and total epochs for the interrupted, resumed and straight runs; one thread everywhere.
RESUMABLE = ["train.epochs=40", "train.num_threads=1", "tracking.log_model=false"]


def child_env(directory: Path) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(directory), "HF_HUB_OFFLINE": "1"}
    env.pop("PICOLLM_DEBUG", None)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def checkpoint_logged(directory: Path) -> bool:
    return any(directory.glob("mlruns/**/checkpoints/checkpoint.pt"))


@dataclass
class Interrupted:
    """A flow in a child process, signalled once `ready`; what the user saw and how long it took."""

    name: str
    directory: Path
    args: list[str]
    sig: signal.Signals
    target: str = ""  # where to stall (see DRIVER); "" = no stall, `ready` decides
    ignore_sigint_at_start: bool = False  # as for `picollm train ... &` in a non-interactive shell
    ready: Callable[[Path], bool] | None = None
    proc: subprocess.Popen | None = None
    sent_at: float | None = None
    exit_s: float | None = None

    @property
    def marker(self) -> Path:
        return self.directory / "stalled"

    def start(self) -> None:
        preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if self.ignore_sigint_at_start else None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(self.marker), self.target, *map(str, self.args)],
            cwd=self.directory,
            env=child_env(self.directory),
            stdout=(self.directory / "stdout.txt").open("w"),
            stderr=(self.directory / "stderr.txt").open("w"),
            preexec_fn=preexec,
        )

    def is_ready(self) -> bool:
        return self.ready(self.directory) if self.ready else self.marker.exists()

    @property
    def stderr(self) -> str:
        return (self.directory / "stderr.txt").read_text()

    def runs(self) -> dict[str, mlflow.entities.Run]:
        client = MlflowClient(sqlite_uri(self.directory))
        exps = [e.experiment_id for e in client.search_experiments()]
        return {r.info.run_name: r for r in client.search_runs(exps)}


def quiet(scenarios: list[Interrupted]) -> bool:
    """No process is training or shutting down: a stalled flow is signalled only then (one at a time),
    so its exit time measures the flow, not the CPU taken by the others (the train scenarios, which
    must be stopped before they finish, are signalled as soon as they are ready)."""
    return not any(sc.exit_s is None and (sc.sent_at is not None or sc.ready is not None) for sc in scenarios)


def run_all(scenarios: list[Interrupted]) -> None:
    for sc in scenarios:
        sc.start()
    deadline = time.monotonic() + READY_WITHIN_S
    try:
        while any(sc.exit_s is None for sc in scenarios):
            for sc in scenarios:
                assert sc.proc is not None
                if sc.exit_s is not None:
                    continue
                if sc.proc.poll() is not None:
                    sc.exit_s = time.monotonic() - (sc.sent_at or time.monotonic())
                    print(f"{sc.name}: {sc.sig.name}, exit {sc.proc.returncode} after {sc.exit_s:.1f} s")
                    if sc.sent_at is None:
                        raise AssertionError(f"{sc.name} ended before the signal: {sc.stderr}")
                elif sc.sent_at is None and sc.is_ready() and (sc.ready is not None or quiet(scenarios)):
                    sc.proc.send_signal(sc.sig)
                    sc.sent_at = time.monotonic()
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready/ended in {READY_WITHIN_S} s: {[s.name for s in scenarios]}")
            time.sleep(0.05)
    finally:
        for sc in scenarios:  # only the processes started here
            if sc.proc is not None and sc.proc.poll() is None:
                sc.proc.kill()
                sc.proc.wait()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, store_template: Path, trained) -> dict[str, Interrupted]:
    def directory(name: str, db: Path = store_template) -> Path:
        d = tmp_path_factory.mktemp(name)
        copy_store(db, d)
        return d

    scenarios = [
        Interrupted(
            "train-sigint",
            directory("train_sigint"),
            ["train", TINY, *sets(RESUMABLE)],
            signal.SIGINT,
            ignore_sigint_at_start=True,
            ready=checkpoint_logged,
        ),
        Interrupted(
            "train-sigterm",
            directory("train_sigterm"),
            ["train", TINY, *sets(["train.epochs=2000", "tracking.log_model=false"])],
            signal.SIGTERM,
            ready=checkpoint_logged,
        ),
        Interrupted(
            "compare",
            directory("compare"),
            ["compare", COMPARE_TINY, *sets(["efficiency.enabled=false", "tracking.log_model=false"])],
            signal.SIGTERM,
            target="picollm.training.trainer:Trainer.fit",  # inside the first child's training
        ),
        Interrupted(
            "dpo",
            directory("dpo"),
            ["dpo", DPO_YAML, *sets([*DPO_TINY, "tracking.log_model=false"])],
            signal.SIGINT,
            target="picollm.dpo.trainer:DPOTrainer.fit",  # after the SFT reference, inside DPO
        ),
        Interrupted(
            "analyze",
            directory("analyze", trained.directory / "mlflow.db"),  # the shared tiny model, read only
            ["analyze", trained.name],
            signal.SIGINT,
            target="pipelines.analyze:section_attention",  # after the embeddings section
        ),
    ]
    run_all(scenarios)
    return {sc.name: sc for sc in scenarios}


def assert_interrupted(sc: Interrupted) -> None:
    assert sc.proc is not None
    assert sc.proc.returncode == 130, (sc.proc.returncode, sc.stderr)
    assert sc.exit_s is not None and sc.exit_s < EXIT_WITHIN_S, sc.exit_s
    assert sc.stderr.strip().splitlines()[-1] == "interrupted", sc.stderr
    assert "Traceback" not in sc.stderr


def assert_killed(run: mlflow.entities.Run) -> None:
    assert run.info.status == "KILLED", run.info
    assert run.data.tags["error"] == "interrupted"


@pytest.mark.integration  # with the other interrupted flows: five processes at once (make test-integration, CI)
def test_sigint_during_train_then_resume_equals_a_straight_run(interrupted, mlflow_tmp, monkeypatch):
    """Started with SIGINT ignored (as `cmd &` does), Ctrl-C still stops it; the checkpoint of the last
    complete epoch is in the store and --resume reaches the straight run's metrics exactly."""
    sc = interrupted["train-sigint"]
    assert_interrupted(sc)
    [killed] = sc.runs().values()
    assert_killed(killed)
    point_mlflow(monkeypatch, sc.directory)
    run_id = killed.info.run_id
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/checkpoint.pt")
    epoch = optim.load_checkpoint(path)["epoch"]
    assert 1 <= epoch < 40

    result = CliRunner().invoke(app, ["train", str(TINY), *sets(RESUMABLE), "--resume", run_id])
    assert result.exit_code == 0, result.output
    resumed = MlflowClient().get_run(run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.metrics["system/epochs_run"] == 40

    from pipelines.train import run

    straight = MlflowClient().get_run(run(load_tiny(*RESUMABLE)).run_id)
    for key in ("test/loss", "test/accuracy", "val/loss", "val/accuracy"):
        assert resumed.data.metrics[key] == pytest.approx(straight.data.metrics[key], abs=1e-6), key


@pytest.mark.integration  # with the other interrupted flows: five processes at once (make test-integration, CI)
def test_sigterm_during_train(interrupted):
    sc = interrupted["train-sigterm"]
    assert_interrupted(sc)
    [killed] = sc.runs().values()
    assert_killed(killed)
    assert killed.data.metrics["epoch"] >= 1  # the metrics of the completed epochs are kept
    assert checkpoint_logged(sc.directory)


@pytest.mark.integration  # with the other interrupted flows: five processes at once (make test-integration, CI)
def test_sigterm_during_compare(interrupted):
    sc = interrupted["compare"]
    assert_interrupted(sc)
    runs = sorted(sc.runs().values(), key=lambda r: r.data.tags["picollm.flow"])
    assert [r.data.tags["picollm.flow"] for r in runs] == ["compare", "train"]  # the parent, the child in training
    for run in runs:
        assert_killed(run)


@pytest.mark.integration  # with the other interrupted flows: five processes at once (make test-integration, CI)
def test_sigint_during_dpo(interrupted):
    sc = interrupted["dpo"]
    assert_interrupted(sc)
    runs = {r.data.tags["picollm.flow"]: r for r in sc.runs().values()}
    assert_killed(runs["dpo"])
    assert runs["sft"].info.status == "FINISHED"  # the finished reference is kept as it was


@pytest.mark.integration  # with the other interrupted flows: five processes at once (make test-integration, CI)
def test_sigint_during_analysis(interrupted):
    sc = interrupted["analyze"]
    assert_interrupted(sc)
    runs = {r.data.tags.get("picollm.flow"): r for r in sc.runs().values()}
    assert_killed(runs["analyze"])
    assert runs["train"].info.status == "FINISHED"  # the analysed model's run is untouched
    client = MlflowClient(sqlite_uri(sc.directory))
    done = {a.path for a in client.list_artifacts(runs["analyze"].info.run_id, "embeddings")}
    assert "embeddings/pca.png" in done  # the section finished before the signal is kept


@pytest.mark.integration  # several processes at once: make test-integration (CI), not make test
def test_four_trainings_at_once_on_a_fresh_store(tmp_path: Path):
    """Four processes create the same (absent) store, log and register the same model name at once."""
    assert not (tmp_path / "mlflow.db").exists()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "train", str(TINY), *sets(["train.epochs=1", f"train.seed={i}"])],
            cwd=tmp_path,
            env=child_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * 4, errors
    client = MlflowClient(sqlite_uri(tmp_path))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    assert sorted(r.data.tags["registered_model"] for r in runs) == [f"picollm-tiny/{v}" for v in range(1, 5)]
    assert sorted(int(v.version) for v in client.search_model_versions("name='picollm-tiny'")) == [1, 2, 3, 4]
    assert str(client.get_registered_model("picollm-tiny").aliases["champion"]) == "1"


def test_unreachable_server_in_a_fresh_process(tmp_path: Path):
    """The in-process checks (test_faults.py) for every command, once more as a real process: no hang."""
    env = {**child_env(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", str(TINY)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: tracking server http://127.0.0.1:1 is unreachable"), line
    # Outside a terminal, only the progress heartbeat (pipelines/progress.py): no bar, no blank line
    assert {line.split("  ")[0] for line in proc.stdout.splitlines()} <= {"train: starting"}, proc.stdout
    assert not (tmp_path / "mlruns").exists()
