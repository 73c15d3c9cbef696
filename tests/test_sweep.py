"""`picollm sweep`: the parent run and its children, pruning, resume after a real interrupt, two worker
processes on one SQLite study, bad input. Tiny trials (configs/sweep_tiny.yaml), CPU, offline, seeded;
the study is `optuna.db` in the test's temporary cwd, MLflow its temporary store (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from picollm.config import apply_overrides, read_yaml, validate
from picollm.config.sweep import SweepConfig
from picollm.data.splits import build_data, to_padded
from picollm.errors import PicollmError, RunStopped
from picollm.model.transformer import Transformer
from picollm.sweep import search as sweep
from picollm.tracking import store as tracking
from picollm.training.evaluation import evaluate, metric_names
from pipelines import sweep as flow
from pipelines.cli import app

from .conftest import REPO, TINY, load_tiny

SWEEP_TINY = REPO / "configs" / "sweep_tiny.yaml"
runner = CliRunner()
EXIT_WITHIN_S = 20
READY_WITHIN_S = 240
# Long enough trials that a signal lands inside one, and that a second process joins in time.
SLOW_TRIALS = "base.overrides=[train.epochs=40, train.checkpoint_every=100, train.num_threads=1]"


def load(*overrides: str, **top: Any) -> SweepConfig:
    raw = apply_overrides(read_yaml(SWEEP_TINY), [f"base.config={TINY}", *overrides]) | top
    return validate(SweepConfig, raw, source="sweep_tiny")


def study(tmp: Path, name: str = "tiny-sweep") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'optuna.db'}")


def sweep_runs(role: str | None = None) -> list:
    found = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return [r for r in found if role is None or r.data.tags.get("sweep.role") == role]


def by_trial(runs: list) -> dict[int, Any]:
    numbers = [int(r.data.tags["sweep.trial"]) for r in runs]
    assert len(numbers) == len(set(numbers)), f"a trial has two runs: {sorted(numbers)}"
    return {int(r.data.tags["sweep.trial"]): r for r in runs}


def check_trials_match_runs(st: optuna.Study, parent_id: str) -> None:
    """Every trial that got a run has exactly one, the parent's child, with the state's status."""
    runs = by_trial(sweep_runs("trial"))
    expected = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "KILLED"}
    for t in st.trials:
        if t.state == TrialState.FAIL and "mlflow_run_id" not in t.user_attrs:
            assert t.number not in runs
            continue
        r = runs[t.number]
        assert r.info.run_id == t.user_attrs["mlflow_run_id"]
        assert r.data.tags["mlflow.parentRunId"] == parent_id
        assert r.info.status == expected[t.state], (t.number, t.state, r.info.status)
        assert (r.data.tags.get("sweep.pruned") == "true") == (t.state == TrialState.PRUNED)
    assert set(runs) <= {t.number for t in st.trials}


def cli(*args: object, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.cli", "sweep", SWEEP_TINY, "--set", f"base.config={TINY}", *args]
    return subprocess.Popen([str(a) for a in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + READY_WITHIN_S
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"sweep exited ({proc.returncode}) before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"no {what} within {READY_WITHIN_S} s"
        time.sleep(0.2)


def trials_in(tmp: Path, *states: TrialState) -> list:
    try:
        return study(tmp).get_trials(deepcopy=False, states=states)
    except KeyError:  # not created yet
        return []


# --------------------------------------------------------------------------------------------------
# Fast: the pieces


def test_metric_names_cover_what_evaluate_logs():
    cfg = load_tiny()
    data = build_data(cfg.data)
    val = to_padded(data.splits()["val"], cfg.data.pad_id, data.families)
    logged = evaluate(Transformer(cfg.model), val, "val")
    assert set(logged) <= set(metric_names("val", data.families))


def test_run_stopped_closes_killed_with_its_tags(migrated_store: str):
    with pytest.raises(RunStopped), tracking.tracked_run("t") as run:
        raise RunStopped("pruned", {"sweep.pruned": "true"})
    r = MlflowClient().get_run(run.info.run_id)
    assert r.info.status == "KILLED" and r.data.tags["sweep.pruned"] == "true" and "error" not in r.data.tags


def test_space_ranges_and_trial_configs():
    search = sweep.prepare(load())
    tcfg = search.trial_config({"train.lr": 0.02, "model.pos_encoding": "learned"}, "trial-0", num_threads=1)
    assert (tcfg.train.lr, tcfg.model.pos_encoding, tcfg.train.num_threads) == (0.02, "learned", 1)
    assert tcfg.tracking.experiment == "picollm-sweep-tiny" and not tcfg.tracking.log_model
    assert tcfg.tracking.registered_model is None
    assert search.direction == "minimize" and search.pruner_sign == 1.0
    assert sweep.prepare(load(**{"objective": {"metric": "val/accuracy"}})).pruner_sign == -1.0
    # a base config's reference results describe its defaults, which a trial changes: trials are not checked
    shipped = sweep.prepare(load(f"base.config={REPO / 'configs' / 'linear.yaml'}"))
    assert shipped.base.reference is not None and shipped.trial_config({}, "t").reference is None
    grid = load(**{"sampler": {"name": "grid"}}, space={"model.n_layers": {"type": "int", "low": 1, "high": 3}})
    assert grid.space["model.n_layers"].grid() == [1, 2, 3]


def test_a_study_is_bound_to_its_space_base_and_objective(tmp_path: Path):
    search = sweep.prepare(load())
    storage = sweep.open_storage(search.storage)
    sweep.open_study(search, storage, create=True)
    with pytest.raises(PicollmError, match="already exists"):
        sweep.open_study(search, storage, create=True)
    assert sweep.open_study(sweep.prepare(load("base.overrides=[train.num_threads=2]")), storage, create=False)
    for changed in (load("base.overrides=[train.epochs=3]"), load(**{"objective": {"metric": "val/accuracy"}})):
        with pytest.raises(PicollmError, match="was created with"):
            sweep.open_study(sweep.prepare(changed), storage, create=False)


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no study, no run


def bad_config(tmp: Path, **changes: Any) -> Path:
    raw = read_yaml(SWEEP_TINY)
    raw["base"]["config"] = str(TINY)
    for key, value in changes.items():
        raw[key] = value
    path = tmp / "bad_sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


LR = {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}
ALIBI = {"type": "categorical", "choices": ["alibi"]}


@pytest.mark.parametrize(
    "changes, args, fragments",
    [
        ({"space": {"train.lrr": LR}}, [], ["train.lrr", "unknown key", "did you mean train.lr"]),
        ({"space": {"train.lr": {**LR, "low": 0.01, "high": 0.001}}}, [], ["empty range"]),
        ({"space": {"train.lr": {**LR, "low": 0.0}}}, [], ["log range needs low > 0"]),
        ({"space": {"model.pos_encoding": {"type": "categorical", "choices": ["rope"]}}}, [], ["pos_encoding"]),
        ({"objective": {"metric": "test/acuracy"}}, [], ["never logged", "did you mean 'test/accuracy'"]),
        ({"pruner": {"metric": "test/loss"}}, [], ["pruner.metric", "never logged"]),
        ({}, ["--storage", "postgresql://u@127.0.0.1:1/optuna"], ["sweep storage", "unreachable"]),
        ({}, ["--storage", "sqlite:///{tmp}/a-file/optuna.db"], ["not usable"]),
        (
            {},
            ["--storage", "sqlite:////proc/picollm-sweep.db"],
            ["sweep storage sqlite:////proc/picollm-sweep.db", "/proc"],
        ),
        ({}, ["--resume"], ["no study 'tiny-sweep'"]),
    ],
    ids=[
        "unknown-key",
        "empty-range",
        "log-from-zero",
        "bad-choice",
        "metric-typo",
        "pruner-on-test",
        "unreachable",
        "under-a-file",
        "proc",
        "resume-nothing",
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(tmp_path: Path, changes, args, fragments):
    (tmp_path / "a-file").write_text("not a folder")
    path = bad_config(tmp_path, **changes)
    result = runner.invoke(app, ["sweep", str(path), *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    db = tmp_path / "optuna.db"
    assert not db.exists() or not optuna.study.get_all_study_names(f"sqlite:///{db}")
    assert sweep_runs() == []


# --------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_study_has_one_parent_and_a_child_per_trial(migrated_store: str, tmp_path: Path):
    out = flow.run(load(trials=3, top_k=1, top_k_seeds=[0, 1], promote=True))
    st = study(tmp_path)
    [parent] = sweep_runs("parent")
    assert parent.info.run_id == out.parent_run_id and parent.info.status == "FINISHED"
    assert parent.data.params["space.train.lr"] == "float [0.001, 0.03] log"
    assert parent.data.params["objective.metric"] == "val/loss"
    assert {"sweep.yaml", "trials.json"} <= {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    figures = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "figures")}
    assert "figures/optimization_history.png" in figures
    # the report the CLI links to: the best trial, its values, the figures inlined
    page = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report.html"))
    html = page.read_text()
    assert f"Trial {out.best_trial}: val/loss <strong>{out.best_value:.4g}</strong>" in html
    assert "data:image/png;base64," in html and "Top-k re-runs" in html and "registered as" in html
    children = by_trial(sweep_runs("trial"))
    assert sorted(children) == [t.number for t in st.trials] == [0, 1, 2]
    check_trials_match_runs(st, parent.info.run_id)
    for t in st.trials:  # the sampled values are the child's params, as the training flow logs them
        params = children[t.number].data.params
        assert params["train.lr"] == str(t.params["train.lr"])
        assert params["model.pos_encoding"] == t.params["model.pos_encoding"]
        assert params["tracking.log_model"] == "False" and "registered_model" not in children[t.number].data.tags
    complete = [children[t.number] for t in st.trials if t.state == TrialState.COMPLETE]
    best_child = min(r.data.metrics["val/loss"] for r in complete)
    assert st.best_value == out.best_value == best_child == parent.data.metrics["sweep/best_value"]
    assert parent.data.tags["sweep.best_run_id"] == st.best_trial.user_attrs["mlflow_run_id"]
    # top-k: the best trial re-run over two seeds, with a CI; --promote: registered, @champion moved
    [top] = out.top_k
    assert top["trial"] == st.best_trial.number and top["n"] == 2 and top["ci_low"] <= top["mean"] <= top["ci_high"]
    assert len(sweep_runs("rerun")) == 2 and "top_k/1/mean" in MlflowClient().get_run(parent.info.run_id).data.metrics
    name, version = out.promoted.split("/")
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == version
    [promoted] = sweep_runs("promoted")
    assert promoted.data.params["train.lr"] == str(st.best_params["train.lr"])


@pytest.mark.slow
def test_pruning_stops_a_trial_that_cannot_learn(migrated_store: str, tmp_path: Path):
    learns, cannot = (
        {"train.lr": 0.03, "model.pos_encoding": "alibi"},
        {"train.lr": 1e-6, "model.pos_encoding": "alibi"},
    )
    cfg = load(
        "base.overrides=[train.epochs=3, train.num_threads=1]",
        trials=2,
        space={"train.lr": {**LR, "low": 1e-6, "high": 0.03}, "model.pos_encoding": ALIBI},
        enqueue=[learns, cannot],
        pruner={"name": "median", "metric": "val/loss", "startup_trials": 1, "warmup_epochs": 0},
    )
    flow.run(cfg)
    st = study(tmp_path)
    assert [t.state for t in st.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert st.trials[1].params["train.lr"] == 1e-6 and max(st.trials[1].intermediate_values) == 1
    run = by_trial(sweep_runs("trial"))[1]
    assert run.info.status == "KILLED" and run.data.tags["sweep.pruned"] == "true" and "error" not in run.data.tags
    assert len(MlflowClient().get_metric_history(run.info.run_id, "val/loss")) == 1  # stopped after epoch 1
    check_trials_match_runs(st, sweep_runs("parent")[0].info.run_id)


@pytest.mark.slow
@pytest.mark.integration  # a sweep process signalled mid-trial, then resumed (~25 s): make test-integration (CI)
# SIGTERM only: SIGINT reaches the same handler (`_GracefulStop`, one function for both), and each case costs ~18 s.
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
def test_killed_sweep_resumes_without_repeating_finished_trials(migrated_store: str, tmp_path: Path, sig):
    no_pruning = ["--set", "pruner.name=none"]  # every trial trains its 40 epochs: the signal lands in one
    proc = cli("--trials", 4, "--set", SLOW_TRIALS, *no_pruning, cwd=tmp_path)
    try:
        wait_for(lambda: trials_in(tmp_path, TrialState.COMPLETE), proc, "a finished trial")
        training = lambda: any(t.intermediate_values for t in trials_in(tmp_path, TrialState.RUNNING))  # noqa: E731
        wait_for(training, proc, "a second trial past its first epoch")
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=EXIT_WITHIN_S)
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr
        assert time.monotonic() - t0 < EXIT_WITHIN_S
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    st = study(tmp_path)
    before = {t.number: t.state for t in st.trials}
    finished_before = {n for n, s in before.items() if s in (TrialState.COMPLETE, TrialState.PRUNED)}
    interrupted = [n for n, s in before.items() if s == TrialState.FAIL]
    assert len(interrupted) == 1 and TrialState.RUNNING not in before.values()
    [parent] = sweep_runs("parent")
    assert parent.info.status == "KILLED"
    assert by_trial(sweep_runs("trial"))[interrupted[0]].info.status == "KILLED"
    # again without --resume: refused, nothing run
    again = runner.invoke(app, ["sweep", str(SWEEP_TINY), "--set", f"base.config={TINY}", "--trials", "4"])
    assert again.exit_code == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    args = ["sweep", str(SWEEP_TINY), "--set", f"base.config={TINY}", "--set", SLOW_TRIALS, *no_pruning]
    resumed = runner.invoke(app, [*args, "--trials", "4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    st = study(tmp_path)
    finished = [t for t in st.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and finished_before <= {t.number for t in finished}
    assert [t.number for t in st.trials if t.number in before] == sorted(before)  # nothing re-run or renumbered
    assert [t.number for t in st.trials if t.state == TrialState.FAIL] == interrupted
    [parent] = sweep_runs("parent")  # found again by its tag, closed FINISHED this time
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/trials_complete"] >= 1
    check_trials_match_runs(st, parent.info.run_id)


@pytest.mark.slow
@pytest.mark.integration  # several processes at once: make test-integration (CI), not make test
def test_two_workers_share_one_sqlite_study(migrated_store: str, tmp_path: Path):
    n = 6  # trials long enough (no pruning) that the second process, seconds to import, gets its share
    proc = cli("--trials", n, "--workers", 2, "--set", SLOW_TRIALS, "--set", "pruner.name=none", cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, (stdout, stderr)
    st = study(tmp_path)
    finished = [t for t in st.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n and len({t.number for t in finished}) == n
    lost = [t for t in st.trials if t.state != TrialState.COMPLETE and t.state != TrialState.PRUNED]
    assert all(t.user_attrs.get("sweep.surplus") for t in lost), [(t.number, t.state) for t in lost]
    pids = {t.user_attrs["sweep.pid"] for t in finished}
    assert len(pids) == 2, f"one process did every trial: {pids}"
    [parent] = sweep_runs("parent")
    assert parent.info.status == "FINISHED"
    check_trials_match_runs(st, parent.info.run_id)
    cores = len(os.sched_getaffinity(0))
    assert {r.data.params["hardware.torch_threads"] for r in sweep_runs("trial")} == {str(max(1, cores // 2))}
    with open(tmp_path / "optuna.db", "rb") as f:  # WAL: set once on the file, shared by every connection
        assert f.read(20)[18:20] == b"\x02\x02"
    assert json.loads(MlflowClient().get_run(parent.info.run_id).data.tags["sweep.best_trial"]) == st.best_trial.number


@pytest.mark.slow
def test_trials_past_their_timeout_fail_and_the_sweep_gives_up(migrated_store: str, tmp_path: Path):
    result = runner.invoke(
        app, ["sweep", str(SWEEP_TINY), "--set", f"base.config={TINY}", "--set", "timeout_s=1e-6", "--trials", "2"]
    )
    assert result.exit_code == 1 and "2 trials failed" in result.stderr, result.output
    st = study(tmp_path)
    assert [t.state for t in st.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("timeout_s" in t.user_attrs[sweep.FAILURE_ATTR] for t in st.trials)
    runs = by_trial(sweep_runs("trial"))
    assert {r.info.status for r in runs.values()} == {"KILLED"}
    assert all(r.data.tags["sweep.timed_out"] == "true" for r in runs.values())
    [parent] = sweep_runs("parent")
    assert parent.info.status == "FAILED" and "trials failed" in parent.data.tags["error"]
