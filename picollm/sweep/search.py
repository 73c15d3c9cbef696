"""The search behind `picollm sweep`: the base config and its space checked before any work, the trial
configs, and the Optuna study (storage, sampler, pruner, the trial callbacks that report to the pruner).
The config schema and the space's ranges are picollm/sweep_space.py.

    search = sweep.prepare(cfg)                   # every check of the user's input: no study, no run yet
    storage = sweep.open_storage(search.storage)  # SQLite in WAL mode, or a database many machines join
    study = sweep.open_study(search, storage, create=True)
    tcfg = search.trial_config(search.suggest(trial), run_name="trial-0")   # a TrainRunConfig

Optuna owns the trials (numbers, states, sampled values, intermediate values); MLflow owns the runs
(pipelines/sweep.py). A trial's state and its run's status agree: COMPLETE = FINISHED, PRUNED = KILLED
with `sweep.pruned=true`, FAIL = FAILED (or KILLED when interrupted). Nothing here talks to MLflow.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import socket
import sqlite3
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from picollm.config import ServerConfig, TrainRunConfig
from picollm.config.base import (
    apply_overrides,
    closest,
    flatten,
    load_config,
    parse_override,
    read_yaml,
    set_key,
    validate,
)
from picollm.config.sweep import SweepConfig, direction_of
from picollm.errors import ConfigError, PicollmError, RunStopped
from picollm.tracking.server import alive as process_alive  # zombies count as gone
from picollm.training.evaluation import metric_names
from picollm.training.trainer import NullCallbacks, TrainCallbacks

log = logging.getLogger(__name__)

HEARTBEAT_S = 5  # a RUNNING trial's process writes a heartbeat this often ...
GRACE_S = 30  # ... and one silent for longer is stale: failed by the next process that looks
SQLITE_TIMEOUT_S = 60  # busy timeout: processes sharing one SQLite study wait for each other's writes
PROBE_TIMEOUT_S = 10
CONFIG_ATTR = "sweep.search"  # study user attrs: the search it was created with, and its parent run
PARENT_ATTR = "sweep.parent_run_id"


def _check_metric(metric: str, allowed: list[str], what: str) -> None:
    if metric in allowed:
        return
    near = closest(metric, allowed)
    hint = f"did you mean {near!r}?" if near else "e.g. val/loss, val/accuracy, val/accuracy_vs_ceiling"
    raise ConfigError(f"{what} {metric!r} is never logged by a training run ({hint})")


# --------------------------------------------------------------------------------------------------
# The search: the base config and its space, checked before any work


@dataclass
class Search:
    cfg: SweepConfig
    base_raw: dict[str, Any]  # the base config file with base.overrides applied
    base: TrainRunConfig
    direction: str
    storage: str  # resolved URL
    study_name: str

    @property
    def pruner_sign(self) -> float:
        """Optuna compares intermediate values in the study's direction: a pruner metric that goes the
        other way (val/loss under a maximized accuracy) is reported negated."""
        return 1.0 if direction_of(self.cfg.pruner.metric) == self.direction else -1.0

    def with_params(self, params: dict[str, Any], what: str) -> dict[str, Any]:
        raw = copy.deepcopy(self.base_raw)
        for key, value in params.items():
            set_key(raw, key.split("."), value, what)
        return raw

    def trial_config(
        self,
        params: dict[str, Any],
        run_name: str,
        num_threads: int | None = None,
        peak_flops: float | None = None,
        seed: int | None = None,
        registered_model: str | None = None,
    ) -> TrainRunConfig:
        """The base config with `params` applied, tracked in the sweep's experiment; no model is logged
        unless `registered_model` is given (the promoted best)."""
        raw = self.with_params(params, run_name)
        train = raw.setdefault("train", {})
        if num_threads:
            train["num_threads"] = num_threads
        if peak_flops and train.get("peak_flops") is None:  # measured once per process, not per trial
            train["peak_flops"] = peak_flops
        if seed is not None:
            train["seed"] = seed
        # The base config's reference results describe its own defaults: a trial changes them on purpose, so a
        # "drifted" verdict on every trial would be noise in the runs table.
        raw.pop("reference", None)
        t = self.cfg.tracking
        raw["tracking"] = {
            "uri": t.uri,
            "experiment": t.experiment,
            "run_name": run_name,
            "registered_model": registered_model,
            "log_model": registered_model is not None,
        }
        return validate(TrainRunConfig, raw, source=f"{run_name} config")

    def suggest(self, trial: Trial) -> dict[str, Any]:
        return {key: spec.suggest(trial, key) for key, spec in self.cfg.space.items()}

    def sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        s = self.cfg.sampler
        seed = None if s.seed is None else (s.seed + seed_offset) % 2**32
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if s.name == "grid":
            grid = {key: spec.grid() for key, spec in self.cfg.space.items()}
            return optuna.samplers.GridSampler(grid, seed=seed)  # type: ignore[arg-type]
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.startup_trials)

    def pruner(self) -> optuna.pruners.BasePruner:
        p = self.cfg.pruner
        if p.name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
        if p.name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=p.min_epochs, reduction_factor=p.reduction_factor
            )
        return optuna.pruners.NopPruner()

    def fingerprint(self) -> dict[str, Any]:
        """What a study is bound to: another space, base config (as resolved, wherever its file is; the
        hardware settings may differ between machines) or objective is another study."""
        c = self.cfg
        hardware = {"device", "num_threads", "peak_flops"}
        # the reference results are the docs' numbers, not a training setting: refreshing them keeps the study
        exclude = {"tracking": True, "train": hardware, "reference": True}
        return {
            "base": self.base.model_dump(mode="json", exclude=exclude),
            "flow": c.base.flow,
            "space": {k: v.model_dump(mode="json") for k, v in c.space.items()},
            "objective": {"metric": c.objective.metric, "direction": self.direction},
        }


def prepare(cfg: SweepConfig) -> Search:
    """Check everything that can be wrong with the user's input, before any study or run exists: the base
    config, every searched key and value (applied to the base and validated), the grid, the enqueued
    trials, the metrics, and the storage (reachable)."""
    if not cfg.base.config.is_file():
        raise ConfigError(f"base.config: config file not found: {cfg.base.config}")
    base_raw = apply_overrides(read_yaml(cfg.base.config), list(cfg.base.overrides))
    base = validate(TrainRunConfig, copy.deepcopy(base_raw), source=f"base config {cfg.base.config}")
    search = Search(cfg, base_raw, base, cfg.objective.direction or direction_of(cfg.objective.metric), "", "")
    for key, spec in cfg.space.items():
        parse_override(f"{key}=0")  # the shape of a dotted key
        if key.startswith("tracking."):
            raise ConfigError(f"space: {key}: the sweep owns the tracking section")
        for value in spec.samples():
            try:
                validate(TrainRunConfig, search.with_params({key: value}, f"space {key}"), source=f"space {key}")
            except ConfigError as e:  # an unknown key names its likely spelling (config.base.first_error)
                raise ConfigError(f"{e} (value {value!r})") from None
    _check_grid(cfg)
    for i, params in enumerate(cfg.enqueue):
        for key, value in params.items():
            if key not in cfg.space:
                raise ConfigError(f"enqueue[{i}]: {key} is not in the space ({', '.join(cfg.space)})")
            if not cfg.space[key].contains(value):
                raise ConfigError(f"enqueue[{i}]: {key}={value!r} is outside its space")
    families = list(base.data.seq_types)
    per_epoch = metric_names("val", families) + ["train/loss"]
    _check_metric(cfg.objective.metric, per_epoch + metric_names("test", families), "objective.metric")
    _check_metric(cfg.pruner.metric, per_epoch, "pruner.metric (per epoch)")
    search.storage = resolve_storage(cfg.storage)
    search.study_name = cfg.study or f"{cfg.base.config.stem}-sweep"
    probe_storage(search.storage)
    return search


def _check_grid(cfg: SweepConfig) -> None:
    if cfg.sampler.name != "grid":
        return
    size = 1
    for key, spec in cfg.space.items():
        values = spec.grid()
        if values is None:
            raise ConfigError(f"sampler grid: space {key} is a continuous range; give it a step or choices")
        size *= len(values)
    if cfg.trials > size:
        raise ConfigError(f"sampler grid: the space has {size} points but trials is {cfg.trials}")


# --------------------------------------------------------------------------------------------------
# Storage: a SQLite file by default, a database server to share a study between machines


def resolve_storage(value: str | None) -> str:
    if value is None:
        return f"sqlite:///{Path.cwd() / 'optuna.db'}"
    if value == "team":
        from picollm.tracking import server

        path = Path("configs/server.yaml")
        return server.optuna_uri(load_config(ServerConfig, path if path.is_file() else None))
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return f"sqlite:///{Path(value.removeprefix('sqlite:///')).resolve()}"
    for bare in ("postgresql://", "postgres://"):  # bare = psycopg 3 to SQLAlchemy 2.1; we install psycopg2
        if value.startswith(bare):
            return "postgresql+psycopg2://" + value.removeprefix(bare)
    return value


def redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _sqlite_file(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def probe_storage(url: str) -> None:
    """One clear error (exit 2) for storage that cannot hold a study, in seconds, creating nothing."""
    scheme = url.split("://", 1)[0].split("+")[0].lower() if "://" in url else ""
    where = f"sweep storage {redact(url)}"
    if scheme == "sqlite":
        path = _sqlite_file(url)
        if str(path) in ("", ":memory:"):
            raise ConfigError(f"{where}: an in-memory database cannot be shared; give a file")
        folder = next((p for p in path.parents if p.exists()), Path("/"))
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"{where} is not usable: {folder} is not a writable folder")
        try:  # root passes os.access everywhere (/proc too): a file is created there and removed at once
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".picollm-probe-"):
                pass
        except OSError as e:
            raise ConfigError(
                f"{where} is not usable: no file can be created in {folder} ({e.strerror or e})"
            ) from None
        if path.exists():
            head = path.read_bytes()[:16] if path.is_file() else b"?"
            if head and head != b"SQLite format 3\x00":
                raise ConfigError(f"{where} is not usable: {path} is not a SQLite database")
            try:
                path.open("r+b").close()
            except OSError as e:
                raise ConfigError(f"{where} is not usable: {path} cannot be written ({e.strerror or e})") from None
        return
    if scheme not in ("postgresql", "mysql"):
        raise ConfigError(f"{where}: unsupported scheme {scheme!r} (use sqlite:///PATH, postgresql://..., or team)")
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or {"postgresql": 5432, "mysql": 3306}[scheme]
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"{where} is unreachable ({e.strerror or e})") from None
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as e:
        raise ConfigError(f"{where}: driver {e.name} is missing (pip install -e '.[server]')") from None
    except Exception as e:
        msg = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
        raise ConfigError(f"{where} is not usable: {msg}") from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": PROBE_TIMEOUT_S}}
    return {"pool_pre_ping": True}


def open_storage(url: str, on_stale: Callable[[FrozenTrial], None] | None = None) -> optuna.storages.RDBStorage:
    """The study database, with heartbeats (a trial whose process died is failed once stale; `on_stale`
    is told). A SQLite file is put in WAL mode with a busy timeout, so local processes share it."""
    if url.startswith("sqlite:///"):
        path = _sqlite_file(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S) as con:  # WAL is a property of the file
            con.execute("PRAGMA journal_mode=WAL")
        con.close()
    stale = (lambda study, trial: on_stale(trial)) if on_stale else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=stale,
        )


def open_study(
    search: Search, storage: optuna.storages.RDBStorage, create: bool, worker_offset: int = 0
) -> optuna.Study:
    """Create the study (with its enqueued trials) or load it: `create` refuses an existing name, a
    load refuses a missing one or one made for another space, base or objective. A new study samples
    from `sampler.seed`; a loaded one from the seed offset by its trials so far (plus `worker_offset`),
    so a resumed or joining process does not draw the values the first one drew."""
    name, where = search.study_name, redact(search.storage)
    exists = name in optuna.study.get_all_study_names(storage)
    if create and exists:
        raise PicollmError(f"study {name!r} already exists in {where}: add --resume to continue it, or --study NAME")
    if not create and not exists:
        raise PicollmError(f"no study {name!r} in {where} to resume or join")
    sampler, pruner = search.sampler(), search.pruner()
    if create:
        study = optuna.create_study(
            storage=storage, study_name=name, direction=search.direction, sampler=sampler, pruner=pruner
        )
        study.set_user_attr(CONFIG_ATTR, search.fingerprint())
        for params in search.cfg.enqueue:
            study.enqueue_trial(params)
        return study
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    old, new = flatten(study.user_attrs.get(CONFIG_ATTR, {})), flatten(search.fingerprint())
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            raise PicollmError(
                f"study {name!r} was created with {key} = {old.get(key)!r}, this config has {new.get(key)!r}; "
                "use another --study"
            )
    study.sampler = search.sampler(len(study.get_trials(deepcopy=False)) + worker_offset)
    return study


# --------------------------------------------------------------------------------------------------
# Counting trials, and failing those whose process is gone


@dataclass
class Counts:
    complete: int
    pruned: int
    running: int
    failed: int  # failed trials of the search itself (non-finite loss, timeout, invalid combination)

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


FAILURE_ATTR = "sweep.failure"


def counts(study: optuna.Study) -> Counts:
    trials = study.get_trials(deepcopy=False)
    n = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)}
    failed = sum(t.state == TrialState.FAIL and FAILURE_ATTR in t.user_attrs for t in trials)
    return Counts(n[TrialState.COMPLETE], n[TrialState.PRUNED], n[TrialState.RUNNING], failed)


def mark_process(trial: Trial) -> None:
    trial.set_user_attr("sweep.host", socket.gethostname())
    trial.set_user_attr("sweep.pid", os.getpid())


def fail_dead_trials(
    study: optuna.Study, storage: optuna.storages.RDBStorage, on_stale: Callable[[FrozenTrial], None] | None = None
) -> None:
    """Fail RUNNING trials of dead processes: at once for this machine's (their PID is gone), after the
    heartbeat grace period for other machines' (and a trial that never named its process, once old)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host, now = socket.gethostname(), datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("sweep.pid")
        if pid is None:  # killed before it named its process (or by another program): old enough = dead
            dead = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > 2 * GRACE_S
        else:
            dead = t.user_attrs.get("sweep.host") == host and not process_alive(int(pid))
        if not dead:
            continue
        try:
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)  # Optuna has no public id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first
        if on_stale:
            on_stale(t)


class Heartbeat:
    """Records a RUNNING trial's heartbeat every HEARTBEAT_S from a thread, so its death is noticed."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial: Trial) -> None:
        self.storage, self.trial_id = storage, trial._trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial.number}")

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # a busy database: the next beat will do
                log.debug("heartbeat: %s", e)
            if self.stop.wait(HEARTBEAT_S):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


# --------------------------------------------------------------------------------------------------
# Trainer callbacks of one trial


class TrialPruned(RunStopped):
    """The pruner stopped the trial: Optuna PRUNED, its run KILLED with `sweep.pruned=true`."""


class TrialTimeout(RunStopped):
    """The trial ran past `timeout_s`: Optuna FAIL, its run KILLED with `sweep.timed_out=true`."""


class TrialCallbacks:
    """Report the pruner metric every epoch (`trial.report(value, epoch)`) and stop the run when the
    pruner says so or the trial's time is up; `started` is called once the run exists."""

    def __init__(
        self,
        trial: Trial,
        search: Search,
        started: Callable[[], None] | None = None,
        ui: TrainCallbacks | None = None,
        deadline: float | None = None,
    ) -> None:
        self.trial, self.search, self.started = trial, search, started
        self.ui = ui or NullCallbacks()
        self.deadline = deadline  # time.monotonic() value
        self.train_seconds = 0.0  # the epochs' training time so far (evaluation excluded)

    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
        if self.started:
            self.started()
        self.ui.on_train_start(total_steps, steps_per_epoch, start_epoch)

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TrialTimeout(
                f"trial {self.trial.number} ran past timeout_s ({self.search.cfg.timeout_s:g} s)",
                {"sweep.timed_out": "true"},
            )
        self.ui.on_step(step, metrics)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.train_seconds += metrics.get("throughput/epoch_seconds", 0.0)
        self.ui.on_epoch_end(epoch, step, metrics)
        value = metrics.get(self.search.cfg.pruner.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(self.search.pruner_sign * value, epoch)
        if self.trial.should_prune():
            raise TrialPruned(
                f"trial {self.trial.number} pruned at epoch {epoch} ({self.search.cfg.pruner.metric} {value:.4g})",
                {"sweep.pruned": "true", "sweep.pruned_epoch": str(epoch)},
            )

    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None:
        self.ui.on_checkpoint(checkpoint, epoch)
