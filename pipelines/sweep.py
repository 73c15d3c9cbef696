"""Flow: an Optuna study over a base training config, as one MLflow parent run with a child run per trial.

The main process opens the parent run (found again by its `sweep.study` tag on `--resume`), starts
`workers - 1` local worker processes (`picollm sweep CONFIG --worker`: the same config, joining the same
study), works on trials itself, waits for them, and ends the study: the history and importance figures,
`trials.json`, the best trial, the optional top-k re-runs over seeds and `--promote`. A worker (local,
or on another machine against a shared database) only runs trials; each trial is one training run
(picollm.train_run) tagged as the parent's child. Every process stops once the study has `trials`
finished (complete or pruned) trials, so a resumed study runs only the missing ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, Trial, TrialState

from picollm.compare import mean_ci
from picollm.config import TrainRunConfig, to_yaml
from picollm.config.sweep import SweepConfig
from picollm.data.splits import SyntheticData, build_data
from picollm.errors import ConfigError, PicollmError, TrainingError
from picollm.runtime.hardware import measure_matmul_peak
from picollm.sweep import search as sweep
from picollm.sweep.report import sweep_report
from picollm.tracking import notes, registry, runs
from picollm.tracking import store as tracking
from picollm.tracking.pages import report_html
from picollm.tracking.runs import BOOKKEEPING, RunLog, Session
from picollm.training import plots
from picollm.training import run as train_run
from picollm.training.progress import FlowProgress, as_progress
from picollm.training.trainer import NullCallbacks, TrainCallbacks

log = logging.getLogger(__name__)

Say = FlowProgress  # lines and the trials as the parts of the bar: picollm/training/progress.py
POLL_S = 2.0  # a process with nothing to start waits this long for the others' running trials
STOP_GRACE_S = 30.0  # local workers get this long to close their runs after an interrupt


@dataclass
class SweepOutcome:
    parent_run_id: str | None  # None in a worker process
    study: str
    storage: str  # redacted
    counts: sweep.Counts
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    top_k: list[dict[str, Any]] = field(default_factory=list)
    promoted: str | None = None  # NAME/VERSION
    seconds: float = 0.0


class _Invalid(Exception):
    """A trial that cannot run or report (e.g. a sampled combination the base schema refuses)."""


class _GracefulStop(NullCallbacks):
    """While active, the first SIGINT/SIGTERM only asks to stop, and is passed on to the local workers
    at once; the stop happens at the next safe point (`check`: every training step and epoch, between
    trials), never inside a database write (an interrupted SQLite write can keep its lock, and the
    runs could then not be closed). Another signal FORCE_AFTER_S later interrupts at once.

    As trainer callbacks (`ui`), it checks every step and epoch, and passes the steps on to `progress`."""

    FORCE_AFTER_S = 5.0  # a terminal's Ctrl-C and the main process's forwarded SIGTERM count as one

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.workers: list[subprocess.Popen] = []
        self.saved: dict[int, Any] = {}
        self.progress: TrainCallbacks = NullCallbacks()

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
            self.forward()
        elif now - self.requested_at > self.FORCE_AFTER_S:
            raise KeyboardInterrupt

    def forward(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def check(self) -> None:
        if self.requested_at is not None:
            raise KeyboardInterrupt

    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
        self.progress.on_train_start(total_steps, steps_per_epoch, start_epoch)

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        self.check()
        self.progress.on_step(step, metrics)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.check()


def run(
    cfg: SweepConfig, resume: bool = False, worker: bool = False, progress: Say | Callable[[str], None] | None = None
) -> SweepOutcome:
    """Run (`resume`: continue; `worker`: join) the study; everything that can fail on the user's input
    (config, space, metrics, storage, tracking store) fails before any study or run exists."""
    start = time.perf_counter()
    say = as_progress(progress)
    search = sweep.prepare(cfg)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report the trials
    threads = max(1, _cores() // cfg.workers) if cfg.workers > 1 else search.base.train.num_threads
    t = search.base.train
    with runs.session("sweep", cfg.tracking, device=t.device, num_threads=threads) as s:
        storage = sweep.open_storage(search.storage, on_stale=_kill_trial_run)
        create = not resume and not worker
        study = sweep.open_study(search, storage, create=create, worker_offset=os.getpid() if worker else 0)
        label = f"worker {os.getpid()} " if worker else ""
        with _GracefulStop() as stop:
            stop.progress = say  # a trial's steps move the bar within the trial
            trials = _Trials(s, search, study, storage, threads, say, label, stop)
            if worker:
                return _work(trials, study, search)
            return _main(s, cfg, search, study, trials, create, say, start)


def _work(trials: _Trials, study: optuna.Study, search: sweep.Search) -> SweepOutcome:
    """A worker: the trials only, as children of the parent run its study names."""
    trials.parent_id = study.user_attrs.get(sweep.PARENT_ATTR)
    if not trials.parent_id:
        raise PicollmError(f"study {search.study_name!r} has no parent run yet: start its main process first")
    trials.loop()
    return SweepOutcome(None, search.study_name, sweep.redact(search.storage), sweep.counts(study))


def _main(
    s: Session,
    cfg: SweepConfig,
    search: sweep.Search,
    study: optuna.Study,
    trials: _Trials,
    create: bool,
    say: Say,
    start: float,
) -> SweepOutcome:
    """The main process: the parent run (new, or found again), local workers, trials, the end of the study."""
    storage = sweep.redact(search.storage)
    parent_id = None if create else _find_parent(s, search, study)
    shown = cfg.model_copy(update={"storage": storage, "study": search.study_name})
    config = shown if parent_id is None else None  # a resumed parent has its params already
    tags = {"sweep.study": search.study_name, "sweep.role": "parent", "sweep.storage": storage}
    run_name = cfg.tracking.run_name or search.study_name
    with s.run(
        run_name, config=config, config_path="sweep.yaml", param_exclude={"space"}, tags=tags, run_id=parent_id
    ) as parent:
        if parent_id is None:
            parent.log_params({f"space.{k}": v.describe() for k, v in cfg.space.items()})
            parent.log_params({"sweep.direction": search.direction})
            parent.log_text(to_yaml(search.base), "base_config.yaml")
        elif "error" in MlflowClient().get_run(parent_id).data.tags:  # last time's, not this run's
            MlflowClient().delete_tag(parent_id, "error")
        study.set_user_attr(sweep.PARENT_ATTR, parent.run_id)
        trials.parent_id = parent.run_id
        say(f"study {search.study_name} in {storage}: parent run {parent.run_id}")
        with _local_workers(cfg, search, cfg.workers - 1, s, trials.stop, say):
            trials.loop()
        return _finish(s, search, study, parent, trials, say, start)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _find_parent(s: Session, search: sweep.Search, study: optuna.Study) -> str | None:
    """The study's parent run in this tracking store: by its `sweep.study` tag (the one the study
    names, if several); None (a new parent) when the store has none."""
    exp = MlflowClient().get_experiment_by_name(s.tracking.experiment)
    if exp is None:
        return None
    found = MlflowClient().search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`sweep.study` = '{search.study_name}' and tags.`sweep.role` = 'parent'",
        max_results=50,
    )
    ids = [r.info.run_id for r in found]
    named = study.user_attrs.get(sweep.PARENT_ATTR)
    return named if named in ids else (ids[0] if ids else None)


def _kill_trial_run(trial: FrozenTrial) -> None:
    """The run of a trial whose process is gone (or that was interrupted after its run ended) is
    KILLED, as an interrupted run would be."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status in ("RUNNING", "FINISHED"):
            client.set_tag(run_id, "error", "interrupted")
            client.set_terminated(run_id, "KILLED")
    except mlflow.exceptions.MlflowException as e:
        log.warning("could not mark run %s of trial %d KILLED: %s", run_id, trial.number, tracking.first_line(e))


# --------------------------------------------------------------------------------------------------
# Trials, in whichever process


class _Trials:
    """Runs the study's trials in this process until it has `trials` finished ones."""

    def __init__(
        self,
        s: Session,
        search: sweep.Search,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        threads: int | None,
        say: Say,
        label: str,
        stop: _GracefulStop,
    ) -> None:
        self.s, self.search, self.study, self.storage = s, search, study, storage
        self.cfg = search.cfg
        self.threads, self.say, self.label, self.stop = threads, say, label, stop
        self.parent_id: str | None = None
        self.peak = search.base.train.peak_flops or measure_matmul_peak(s.device)  # once, not per trial
        self.client = MlflowClient()
        self._data: tuple[str, SyntheticData] | None = None  # the last data draw: trials share it
        self.counts = sweep.Counts(0, 0, 0, 0)

    def data(self, tcfg: TrainRunConfig) -> SyntheticData:
        """The draw of `tcfg.data`, built once while the trials' data settings stay the same."""
        key = tcfg.data.model_dump_json()
        if self._data is None or self._data[0] != key:
            self._data = (key, build_data(tcfg.data))
        return self._data[1]

    def loop(self) -> None:
        n = self.cfg.trials
        self.say.plan(n, "trials")
        while True:
            self.stop.check()
            sweep.fail_dead_trials(self.study, self.storage, on_stale=_kill_trial_run)
            c = self.counts = sweep.counts(self.study)
            if c.finished >= n:
                return
            if c.failed >= n:
                raise TrainingError(
                    f"study {self.search.study_name}: {c.failed} trials failed (non-finite loss, timeout or an "
                    "invalid combination: see their runs' error tags and the trials' sweep.failure)"
                )
            if c.finished + c.running >= n:  # the last trials run elsewhere: wait, one of them may fail
                time.sleep(POLL_S)
                continue
            self.run_one()

    def run_one(self) -> None:
        t0 = time.perf_counter()
        with tracking.deferred_signals(), warnings.catch_warnings():  # a new trial always names its process
            warnings.filterwarnings("ignore", message=".*Heartbeat", category=UserWarning)  # ours: sweep.Heartbeat
            trial = self.study.ask()
            sweep.mark_process(trial)
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        before = self.study.get_trials(deepcopy=False, states=states)
        if sum(t.number < trial.number for t in before) >= self.cfg.trials:  # another process took the last slot
            trial.set_user_attr("sweep.surplus", True)
            self.study.tell(trial, state=TrialState.FAIL)
            return
        run_id: list[str] = []

        def started() -> None:  # the trial's run exists: record it, so a dead process's run can be closed
            run_id.append(mlflow.active_run().info.run_id)  # type: ignore[union-attr]
            trial.set_user_attr("mlflow_run_id", run_id[0])

        deadline = time.monotonic() + self.cfg.timeout_s if self.cfg.timeout_s else None
        cb = sweep.TrialCallbacks(trial, self.search, started, ui=self.stop, deadline=deadline)
        value, state, why = None, TrialState.COMPLETE, ""
        try:
            with sweep.Heartbeat(self.storage, trial):
                value = self._objective(trial, cb)
        except sweep.TrialPruned as e:
            state, why = TrialState.PRUNED, str(e)
        except (TrainingError, sweep.TrialTimeout, _Invalid) as e:
            state, why = TrialState.FAIL, tracking.first_line(e)
            trial.set_user_attr(sweep.FAILURE_ATTR, why)
        except BaseException:  # Ctrl-C, or a bug: the trial fails, its run is KILLED (or FAILED), we stop
            with tracking.deferred_signals(redeliver=False):
                self._tell(trial, None, TrialState.FAIL)
                if run_id:
                    _kill_trial_run(self.storage.get_trial(trial._trial_id))
            raise
        with tracking.deferred_signals():  # a Ctrl-C now lands after the tell: state and run agree
            self._tell(trial, value, state)
            best = self._after(trial)
        if state == TrialState.COMPLETE:
            self.say(f"{self.label}trial {trial.number}: {self.cfg.objective.metric} {value:.4g}, {best}")
        elif state == TrialState.PRUNED:
            self.say(f"{self.label}{why}")
        else:
            self.say(f"{self.label}trial {trial.number} failed: {why}")
        if run_id:
            wall = time.perf_counter() - t0
            timing = {"sweep/trial_seconds": wall, "sweep/train_seconds": cb.train_seconds}
            self._log(run_id[0], timing | {"sweep/overhead_s": wall - cb.train_seconds}, trial.number)

    def _objective(self, trial: Trial, cb: sweep.TrialCallbacks) -> float:
        params = self.search.suggest(trial)
        line = f"{self.label}trial {trial.number}: " + " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        self.say.part(line, done=self.counts.finished)  # the study's finished trials, whichever process ran them
        try:
            tcfg = self._config(params, f"trial-{trial.number}")
        except ConfigError as e:
            raise _Invalid(str(e)) from None
        tags = {"sweep.role": "trial", "sweep.trial": str(trial.number), "sweep.params": json.dumps(params)}
        nested = mlflow.active_run() is not None  # the main process: under the parent; a worker: by tag only
        out = train_run.train(self.s, tcfg, ui=cb, nested=nested, tags=self._tags(tags), data=self.data(tcfg))
        value = _final(out).get(self.cfg.objective.metric)
        if value is None or not math.isfinite(value):
            raise _Invalid(f"trial {trial.number} logged no finite {self.cfg.objective.metric} ({value})")
        self._log(out.run_id, {"sweep/objective": value}, trial.number)
        return value

    def _config(self, params: dict[str, Any], name: str, **kw: Any) -> TrainRunConfig:
        return self.search.trial_config(params, f"{self.search.study_name}-{name}", self.threads, self.peak, **kw)

    def _tags(self, extra: dict[str, str]) -> dict[str, str]:
        assert self.parent_id is not None
        # Set explicitly: a worker process opens its trials' runs with no active parent run.
        return {"mlflow.parentRunId": self.parent_id, "sweep.study": self.search.study_name, **extra}

    def _tell(self, trial: Trial, value: float | None, state: TrialState) -> None:
        try:
            self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except (ValueError, RuntimeError) as e:  # already finished elsewhere (failed as stale)
            log.warning("trial %d: %s", trial.number, tracking.first_line(e))

    def _after(self, trial: Trial) -> str:
        """The parent's running record: best value so far and trial counts, at step = trial number."""
        c = sweep.counts(self.study)
        metrics = {"sweep/trials_complete": float(c.complete), "sweep/trials_pruned": float(c.pruned)}
        shown = "no trial complete yet"
        if c.complete:
            best = self.study.best_trial
            metrics["sweep/best_value"] = float(best.value)  # type: ignore[arg-type]
            shown = f"best {best.value:.4g} (trial {best.number})"
        assert self.parent_id is not None
        self._log(self.parent_id, metrics, trial.number)
        return shown

    def _log(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        try:
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])
        except mlflow.exceptions.MlflowException as e:
            log.warning("could not log %s to run %s: %s", ", ".join(metrics), run_id, tracking.first_line(e))


def _final(out: train_run.TrainOutcome) -> dict[str, float]:
    return {**(out.history[-1] if out.history else {}), **out.test_metrics}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------------
# Local worker processes


@contextmanager
def _local_workers(
    cfg: SweepConfig, search: sweep.Search, n: int, s: Session, stop: _GracefulStop, say: Say
) -> Iterator[None]:
    """`n` worker processes on this study (the resolved config in a temporary file), waited for at the
    end. A stop request reaches them at once (`stop.forward`); on the way out by an error they get
    SIGTERM; either way they get STOP_GRACE_S to close their runs, then SIGKILL."""
    if n < 1:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="picollm-sweep-") as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(to_yaml(cfg.model_copy(update={"storage": search.storage, "study": search.study_name})))
        env = {**os.environ, "MLFLOW_TRACKING_URI": s.uri or ""}
        cmd = [sys.executable, "-m", "pipelines.cli", "sweep", str(path), "--worker"]
        procs = [subprocess.Popen(cmd, env=env) for _ in range(n)]
        stop.workers = procs
        say(f"started {n} worker process(es): {', '.join(str(p.pid) for p in procs)}")
        try:
            yield
            while any(p.poll() is None for p in procs):
                time.sleep(0.2)
                stop.check()
        except BaseException:
            if stop.requested_at is None:  # an error, not a stop request: tell them now
                stop.forward()
            raise
        finally:
            _wait_or_kill(procs)
        for p in procs:
            if p.returncode:
                say(f"worker {p.pid} exited with code {p.returncode}")


def _wait_or_kill(procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + STOP_GRACE_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            log.warning("worker %d did not stop within %.0f s: killed", p.pid, STOP_GRACE_S)
            p.kill()
        p.wait()


# --------------------------------------------------------------------------------------------------
# The end of the study: figures, table, best trial, top-k re-runs, promotion


def _finish(
    s: Session, search: sweep.Search, study: optuna.Study, parent: RunLog, trials: _Trials, say: Say, start: float
) -> SweepOutcome:
    cfg, metric = search.cfg, search.cfg.objective.metric
    all_trials = study.get_trials()
    c = sweep.counts(study)
    rows = [_row(t) for t in all_trials]
    step = max((t.number for t in all_trials), default=0)
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        parent.log_table({k: [r.get(k) for r in rows] for k in keys}, "trials.json")
        pruned_value = cfg.pruner.metric == metric  # pruned trials' last value is the objective's metric
        shown = [r if r["state"] != "PRUNED" or pruned_value else {**r, "value": None} for r in rows]
        parent.log_figure(plots.sweep_history(shown, metric, search.direction), "figures/optimization_history.png")
    if c.complete >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
            parent.log_figure(plots.param_importances(importances, metric), "figures/param_importances.png")
        except (RuntimeError, ValueError, ZeroDivisionError) as e:  # e.g. every trial scored the same
            say(f"no parameter importances: {tracking.first_line(e)}")
    parent.log_metrics({f"sweep/trials_{k}": float(getattr(c, k)) for k in ("complete", "pruned", "failed")}, step=step)
    out = SweepOutcome(parent.run_id, search.study_name, sweep.redact(search.storage), c)
    if c.complete:
        best = study.best_trial
        out.best_trial, out.best_value, out.best_params = best.number, best.value, dict(best.params)
        parent.log_metrics(
            {"sweep/best_value": float(best.value), f"{BOOKKEEPING}best_trial": float(best.number)}, step=step
        )
        best_run = best.user_attrs.get("mlflow_run_id", "")
        parent.set_tags({"sweep.best_trial": str(best.number), "sweep.best_run_id": best_run})
        parent.set_tags({f"best.{k}": str(v) for k, v in best.params.items()})
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        parent.set_tags({notes.NOTE_TAG: f"best trial {best.number}: {metric} {best.value:.4g} ({params})"})
        if cfg.top_k:
            out.top_k = _top_k(s, search, study, parent, trials, say)
        if cfg.promote:
            out.promoted = _promote(s, search, best, trials, say)
            parent.set_tags({"sweep.promoted": out.promoted})
    _log_report(search, parent, c, rows, out)
    out.seconds = time.perf_counter() - start
    parent.log_metrics({f"{BOOKKEEPING}time/total_s": out.seconds}, step=step, flush=True)
    return out


def _log_report(search: sweep.Search, parent: RunLog, c: sweep.Counts, rows: list[dict], out: SweepOutcome) -> None:
    """report.md and its self-contained report.html (the page the CLI links to)."""
    cfg = search.cfg
    best = None
    if out.best_trial is not None:
        best = {"number": out.best_trial, "value": out.best_value, "params": out.best_params}
    counts = {"complete": c.complete, "pruned": c.pruned, "failed": c.failed}
    params = list(dict.fromkeys(k for t in rows for k in t if k not in _ROW_FIELDS))
    md = sweep_report(
        search.study_name, cfg.objective.metric, search.direction, counts, rows, params, best, out.top_k,
        list(parent.figure_files), out.promoted,
    )  # fmt: skip
    parent.log_text(md, "report.md")
    parent.log_text(report_html(md, parent.figure_files, title=f"picollm sweep: {search.study_name}"), "report.html")


_ROW_FIELDS = ("number", "state", "value", "duration_s", "run_id", "failure", "pruned_epoch")


def _row(t: FrozenTrial) -> dict[str, Any]:
    duration = t.duration.total_seconds() if t.duration is not None else None
    row = {"number": t.number, "state": t.state.name, "value": t.value, "duration_s": duration}
    row |= {"run_id": t.user_attrs.get("mlflow_run_id"), "failure": t.user_attrs.get(sweep.FAILURE_ATTR)}
    if t.state == TrialState.PRUNED and t.intermediate_values:
        row["pruned_epoch"] = max(t.intermediate_values)
    return row | dict(t.params)


def _top_k(
    s: Session, search: sweep.Search, study: optuna.Study, parent: RunLog, trials: _Trials, say: Say
) -> list[dict[str, Any]]:
    """The best `top_k` trials re-trained over `top_k_seeds` (nested runs), mean and 95 % CI of the
    objective on the parent as `top_k/<rank>/mean|ci_low|ci_high`, rows in `top_k.json`."""
    cfg, metric = search.cfg, search.cfg.objective.metric
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    done.sort(key=lambda t: t.value, reverse=search.direction == "maximize")  # type: ignore[arg-type, return-value]
    rows = []
    for rank, t in enumerate(done[: cfg.top_k], 1):
        values = []
        for seed in cfg.top_k_seeds:
            say(f"top {rank} (trial {t.number}) seed {seed}")
            tcfg = trials._config(t.params, f"top{rank}-trial{t.number}-seed{seed}", seed=seed)
            extra = {"sweep.role": "rerun", "sweep.rerun_of": str(t.number), "sweep.seed": str(seed)}
            out = train_run.train(
                s, tcfg, ui=trials.stop, nested=True, tags=trials._tags(extra), data=trials.data(tcfg)
            )
            values.append(_final(out).get(metric, math.nan))
        ci = mean_ci(values)
        parent.log_metrics(
            {f"top_k/{rank}/mean": ci.mean, f"top_k/{rank}/ci_low": ci.low, f"top_k/{rank}/ci_high": ci.high}
        )
        say(f"top {rank} (trial {t.number}): {metric} {ci.mean:.4g} [{ci.low:.4g}, {ci.high:.4g}] over {ci.n} seeds")
        rows.append(
            {"rank": rank, "trial": t.number, "params": json.dumps(t.params), "mean": ci.mean, "ci_low": ci.low}
            | {"ci_high": ci.high, "n": ci.n, "values": json.dumps(values)}
        )
    parent.log_table({k: [r[k] for r in rows] for k in rows[0]}, "top_k.json")
    return rows


def _promote(s: Session, search: sweep.Search, best: FrozenTrial, trials: _Trials, say: Say) -> str:
    """Train the best trial's config, register it under tracking.registered_model, move @champion to it."""
    name = search.cfg.tracking.registered_model
    assert name is not None  # checked with the config
    say(f"promoting trial {best.number} as {name}")
    tcfg = trials._config(best.params, "best", registered_model=name)
    out = train_run.train(
        s, tcfg, nested=True, tags=trials._tags({"sweep.role": "promoted", "sweep.rerun_of": str(best.number)})
    )
    assert out.registered_version is not None
    registry.promote(name, out.registered_version)
    return f"{name}/{out.registered_version}"
