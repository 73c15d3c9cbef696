"""One tracked training run: data, model and trainer; train, evaluate, log and register.

The training flow (`picollm train`) is this inside a run scaffold session; `compare` runs it once per
(attention, seed) as nested child runs, and `bench` times it against `train_untracked`. Under torchrun
every rank calls `train`: all of them train (DDP), only rank 0 talks to MLflow, and the other ranks
return an outcome with an empty run id.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import torch
from mlflow.tracking import MlflowClient

from picollm.config import TrainRunConfig, flatten, validate
from picollm.data.splits import PaddedSplit, SyntheticData, to_padded
from picollm.errors import PicollmError
from picollm.model.transformer import Transformer
from picollm.runtime import distributed
from picollm.runtime.disk_cache import cached_build_data, cached_matmul_peak
from picollm.runtime.hardware import resolve_device, torch_threads
from picollm.runtime.timing import Stopwatch, TimedCallbacks
from picollm.tracking import faults as store_faults
from picollm.tracking import notes
from picollm.tracking import store as tracking
from picollm.tracking.registry import SOURCE_CONFIG, fail_pending_models
from picollm.tracking.runs import BOOKKEEPING, CHECKPOINT_PATH, SINGLE_VALUE_STEP, RunLog, Session, unique_name
from picollm.training.evaluation import evaluate
from picollm.training.optim import load_checkpoint, make_optimizer, make_scheduler, validate_checkpoint
from picollm.training.reproduce import Verdict
from picollm.training.reproduce import check as check_reference
from picollm.training.trainer import NullCallbacks, TrainCallbacks, Trainer, TrainResult

log = logging.getLogger(__name__)

RESUMABLE_KEYS = {
    "train.epochs",
    "train.early_stopping_patience",
    "tracking.run_name",
    "tracking.uri",
    "tracking.lock_timeout_s",
    "tracking.http_timeout_s",
}


@dataclass
class TrainOutcome:
    run_id: str
    model_uri: str | None
    registered_version: str | None
    test_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    model: Transformer | None = field(default=None, repr=False)  # the trained model (on the CPU)
    timing: dict[str, float] = field(default_factory=dict)  # time/<phase>_s, as logged (picollm.timing)
    reproduction: Verdict | None = None  # against the config's reference results; None: the config has none


class Prepared(NamedTuple):
    data: SyntheticData
    splits: dict[str, PaddedSplit]
    model: Transformer
    trainer: Trainer
    peak: float
    fit: Callable[[TrainCallbacks], TrainResult]


def load_resume(run_id: str, cfg: TrainRunConfig) -> dict[str, Any]:
    """The checkpoint of `run_id`, after checking that `cfg` differs from its config only in resumable keys
    and that every entry of it would restore (a bad checkpoint leaves the run as it was). A run whose
    checkpoint is at its last epoch but that did not finish (interrupted while logging its model)
    resumes into what is left: the test metrics, the model and its registration."""
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise PicollmError(f"--resume: no run with id {run_id!r} in {mlflow.get_tracking_uri()}") from None
    status, params = run.info.status, run.data.params
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_PATH, dst_path=tmp)
        except (mlflow.exceptions.MlflowException, OSError):
            raise PicollmError(f"--resume: run {run_id} has no checkpoint to resume from") from None
        ckpt = load_checkpoint(path)
    saved = validate(TrainRunConfig, ckpt["config"], source=f"checkpoint of run {run_id}")
    old, new = flatten(saved.model_dump(mode="json")), flatten(cfg.model_dump(mode="json"))
    check_checkpoint_matches_params(run_id, old, params)
    for key in sorted(old.keys() | new.keys()):
        if key not in RESUMABLE_KEYS and not key.startswith("reference.") and old.get(key) != new.get(key):
            raise PicollmError(
                f"--resume: {key} is {new.get(key)!r} in this config but {old.get(key)!r} in run {run_id} "
                "(its logged params and checkpoint)"
            )
    try:
        validate_checkpoint(ckpt, *_templates(cfg))
    except ValueError as e:
        raise PicollmError(f"--resume: the checkpoint of run {run_id} cannot be resumed ({e})") from None
    if int(ckpt["epoch"]) >= cfg.train.epochs and status == "FINISHED":
        raise PicollmError(f"--resume: run {run_id} already completed {ckpt['epoch']} epochs")
    return ckpt


def check_checkpoint_matches_params(run_id: str, checkpoint_config: dict[str, Any], params: dict[str, str]) -> None:
    """The checkpoint's config (flattened) against what the run logged as its params: a checkpoint that
    is not the run's own (copied from another run, or the run's artifacts replaced) would finish the run
    with weights its params do not describe. Keys the run did not log (an older picollm) are not compared."""
    differ = [
        key
        for key in sorted(checkpoint_config)
        if key not in RESUMABLE_KEYS and key in params and tracking.param_value(checkpoint_config[key]) != params[key]
    ]
    if differ:
        key = differ[0]
        more = f" ({len(differ) - 1} more differ: {', '.join(differ[1:4])}{', ...' if len(differ) > 4 else ''})"
        raise PicollmError(
            f"--resume: the checkpoint of run {run_id} is not this run's: {key} is "
            f"{tracking.param_value(checkpoint_config[key])} in its checkpoint.pt but {params[key]} in the run's "
            f"logged params{more if len(differ) > 1 else ''}; the run is left as it was"
        )


def _templates(cfg: TrainRunConfig) -> tuple[Transformer, Any, Any]:
    """A model, optimizer and scheduler of `cfg`'s shape, for `validate_checkpoint` to load into."""
    model = Transformer(cfg.model)
    optimizer = make_optimizer(model, cfg.train)
    return model, optimizer, make_scheduler(optimizer, cfg.train, 1)


def prepare(
    cfg: TrainRunConfig,
    ctx: distributed.DistContext,
    device: torch.device,
    ckpt: dict[str, Any] | None,
    data: SyntheticData | None = None,
    watch: Stopwatch | None = None,
) -> Prepared:
    """Data (unless given: already built from `cfg.data`), model and trainer: everything of a run but
    its tracking. `watch` times the data and set-up, and the validation inside `fit` as eval."""
    watch = watch or Stopwatch()
    with watch.phase("data"):  # before the run starts: bad data settings leave no run behind
        data = data or cached_build_data(cfg.data)  # splits and ceilings, once per data config
        splits = {name: to_padded(s, cfg.data.pad_id, data.families) for name, s in data.splits().items()}
    with watch.phase("setup"):
        torch.manual_seed(cfg.train.seed)
        model = Transformer(cfg.model)
        # Measured once per machine, thread count and world size (picollm.cache), not on every run; every
        # rank measures at once the first time, so the peak reflects the shared hardware; MFU is against
        # all ranks.
        peak = cfg.train.peak_flops or cached_matmul_peak(device, ctx.world_size)
        trainer = Trainer(
            model,
            cfg.train,
            device,
            flops_per_token=6 * model.matmul_params(),
            peak_flops=peak * ctx.world_size,
            dist=ctx,
        )
    fit = partial(
        trainer.fit,
        splits["train"],
        watch.wrap("eval", lambda m: evaluate(m, splits["val"], "val", cfg.train.eval_batch_size)),
        resume=ckpt,
        checkpoint_extra={"config": cfg.model_dump(mode="json")},
    )
    return Prepared(data, splits, model, trainer, peak, fit)


def train(
    session: Session,
    cfg: TrainRunConfig,
    resume: str | None = None,
    ui: TrainCallbacks | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
    data: SyntheticData | None = None,
    startup_s: float = 0.0,
) -> TrainOutcome:
    """Train, evaluate, log and register as a run of `session` (`nested`: a child of the active run;
    `tags`: added to the run's own, e.g. a sweep trial's number and parent run; `data`: the draw of
    `cfg.data` when the caller has it already, e.g. a sweep's trials share one; `startup_s`: what the
    process spent before this run, logged as time/startup_s: `picollm train` passes its start-up)."""
    ctx = session.dist
    watch = Stopwatch(startup_s)  # logged as time/*: where the run's wall time went
    ckpt = None if resume is None else _claim_resume(resume, cfg, ctx)
    prep = prepare(cfg, ctx, session.device, ckpt, data, watch)
    if not ctx.is_main:
        result = prep.fit(NullCallbacks())
        return TrainOutcome("", None, None, {}, result.history, prep.data.families)

    base_name = f"{cfg.model.attention}-{cfg.model.pos_encoding}-seed{cfg.train.seed}"
    run_name = cfg.tracking.run_name or unique_name(base_name)  # re-runs of a config stay apart in legends
    run_tags = {"picollm.flow": "train", "model.attention": cfg.model.attention, **(tags or {})}
    watch.switch("logging")  # the run's params, config, inputs
    with session.run(
        run_name,
        config=cfg if ckpt is None else None,  # a resumed run has its params already
        config_path=SOURCE_CONFIG,
        param_exclude={"reference"},  # expected results, not settings: in the logged config.yaml, not params
        params=_run_params(cfg, session, prep) if ckpt is None else None,
        tags=run_tags,
        nested=nested,
        run_id=resume,
        system_metrics=cfg.train.system_metrics,
    ) as run:
        if ckpt is None:
            run.log_metrics({f"{BOOKKEEPING}peak_flops": prep.peak})  # measured (or set): bookkeeping, charted last
            log_splits(run, prep.data)
        else:
            pending = tracking.store_write(fail_pending_models, run.run_id, what="finalising a logged model")
            for model_id in pending:  # left PENDING by the interrupted process
                log.info("run %s: logged model %s was interrupted while logged; marked FAILED", run.run_id, model_id)
            if ctx.enabled:
                run.set_tags({"distributed.resumed_world_size": str(ctx.world_size)})
        watch.switch("train")  # the callbacks (metrics, checkpoints) count as logging, validation as eval
        result = prep.fit(TimedCallbacks(MlflowCallbacks(run, ui or NullCallbacks()), watch))
        watch.switch("eval")
        test_metrics = evaluate(prep.trainer.model, prep.splits["test"], "test", cfg.train.eval_batch_size)
        watch.switch("logging")
        run.log_metrics(test_metrics, step=SINGLE_VALUE_STEP, flush=True)  # one value each: bar charts
        headline = notes.training_note(test_metrics)
        run.set_tags({notes.NOTE_TAG: headline})  # the run's description: its headline
        model_uri = version = None
        if cfg.tracking.log_model:  # the final test (and val) metrics linked to the model: its page shows them
            linked = ["test/accuracy", *test_metrics, *(k for k in result.history[-1] if k.startswith("val/"))]
            model_uri, version = run.log_model(
                prep.trainer.model.cpu(),
                cfg.tracking.registered_model,
                link=linked,
                name=notes.model_name(cfg.tracking.registered_model, cfg.model.attention, cfg.model.n_layers),
            )
            if version:  # the registry's pages and `picollm models list` show the test metrics
                tracking.store_write(
                    notes.describe_version,
                    cfg.tracking.registered_model,
                    version,
                    headline,
                    test_metrics,
                    what="describing the model version",
                )
        final = _log_results(run, prep, result, test_metrics)
        verdict = _check_reference(run, cfg, final, version)
        timing = watch.breakdown()  # closing the run (its last flush) is not in it
        run.log_metrics(timing, step=SINGLE_VALUE_STEP, flush=True)
    model = prep.trainer.model.cpu()
    return TrainOutcome(
        run.run_id, model_uri, version, final, result.history, prep.data.families, model, timing, verdict
    )


def _check_reference(
    run: RunLog, cfg: TrainRunConfig, metrics: dict[str, float], version: str | None
) -> Verdict | None:
    """The run's metrics against the config's reference results, tagged on the run (and its model version):
    none without a `reference:` section."""
    if cfg.reference is None:
        return None
    verdict = check_reference(metrics, cfg.reference)
    run.set_tags(verdict.tags())
    if version and cfg.tracking.registered_model:
        for key, value in verdict.tags().items():
            tracking.store_write(
                MlflowClient().set_model_version_tag,
                cfg.tracking.registered_model,
                version,
                key,
                value,
                what="tagging the model version",
            )
    log.info("run %s %s", run.run_id, verdict.line)
    return verdict


def _claim_resume(resume: str, cfg: TrainRunConfig, ctx: distributed.DistContext) -> dict[str, Any]:
    """The checkpoint `resume` continues from, on every rank; checked (and the run claimed) by rank 0 before
    any work starts, its failure raised on every rank."""
    ckpt, failure = None, None
    if ctx.is_main:
        try:
            if not resume.strip():
                raise PicollmError("--resume needs a run id (it was empty)")
            # Claimed first, so of two resumes of one run only one goes on; the run holds it from here.
            store_faults.preclaim(mlflow.get_tracking_uri(), resume)
            ckpt = load_resume(resume, cfg)
        except Exception as e:
            store_faults.release_preclaim(resume)
            failure = e
    distributed.share_failure(ctx, failure)
    return distributed.broadcast_checkpoint(ctx, ckpt)


def _run_params(cfg: TrainRunConfig, session: Session, prep: Prepared) -> dict[str, Any]:
    ctx = session.dist
    return {
        **prep.data.stats(),  # params: counts of the inputs, not measurements
        "model.num_params": prep.model.num_params(),
        "model.matmul_params": prep.model.matmul_params(),
        "train.precision_resolved": prep.trainer.precision,
        "distributed.world_size": ctx.world_size,
        "distributed.backend": ctx.backend or "none",
        "distributed.rows_per_rank": math.ceil(cfg.train.batch_size / ctx.world_size),
    }


def _log_results(run: RunLog, prep: Prepared, result: TrainResult, test_metrics: dict[str, float]) -> dict[str, float]:
    """Run summaries and figures; returns the test metrics with the last val metrics."""
    summary = {
        "throughput/tokens_per_s_mean": _mean(result.history, "throughput/tokens_per_s"),
        "throughput/mfu_mean": _mean(result.history, "throughput/mfu"),
        f"{BOOKKEEPING}epochs_run": float(result.epochs_run),
    }
    if result.best_epoch is not None:
        summary[f"{BOOKKEEPING}best_epoch"] = float(result.best_epoch)
    run.log_metrics(summary, step=SINGLE_VALUE_STEP, flush=True)  # one value each: bar charts
    from picollm.training import plots  # matplotlib: imported when the figures are drawn, not at start-up

    run.log_figure(plots.training_curves(result.history), "figures/training_curves.png")
    run.log_figure(plots.family_accuracy(test_metrics, prep.data.families), "figures/test_accuracy_per_family.png")
    return {**test_metrics, **{k: v for k, v in result.history[-1].items() if k.startswith("val/")}}


def train_untracked(cfg: TrainRunConfig) -> dict[str, float]:
    """The same training and test evaluation as `train`, with no MLflow at all: the baseline that
    `make bench` measures tracking overhead against."""
    device = resolve_device(cfg.train.device)
    with torch_threads(cfg.train.num_threads):  # as a session would apply them
        prep = prepare(cfg, distributed.DistContext(device=device), device, None)
        prep.fit(NullCallbacks())
        return evaluate(prep.trainer.model, prep.splits["test"], "test", cfg.train.eval_batch_size)


def _mean(history: list[dict[str, float]], key: str) -> float:
    vals = [h[key] for h in history if key in h]
    return sum(vals) / len(vals) if vals else math.nan


def log_splits(run: RunLog, data: SyntheticData) -> None:
    """Log every split of `data` to the open `run`: as an MLflow dataset input (context = the split's
    name; its digest covers family, tokens and generator) and as the artifact `data/<split>.jsonl`,
    one `{"family", "tokens", <generator parameters>}` object per line (`SequenceSplit.records`)."""
    import mlflow
    import mlflow.data
    import pandas as pd

    for name, split in data.splits().items():
        run.log_text("".join(json.dumps(r) + "\n" for r in split.records()), f"data/{name}.jsonl")
        frame = pd.DataFrame(
            {
                "family": split.families,
                "tokens": [" ".join(str(int(v)) for v in s) for s in split.sequences],
                "generator": [json.dumps(g) for g in split.generators] or [""] * len(split),
            }
        )
        mlflow.log_input(mlflow.data.from_pandas(frame, name=f"synthetic-{name}", targets=None), context=name)


class MlflowCallbacks:
    """Trainer callbacks that log to a run (batched, flushed every epoch) and forward to a UI
    reporter; `checkpoints=False` skips the checkpoint artifact (runs that are not resumable)."""

    def __init__(self, run: RunLog, ui: TrainCallbacks, checkpoints: bool = True) -> None:
        self.run = run
        self.ui = ui
        self.checkpoints = checkpoints

    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
        self.ui.on_train_start(total_steps, steps_per_epoch, start_epoch)

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        if metrics:
            self.run.log_metrics(metrics, step)
        self.ui.on_step(step, metrics)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.run.log_metrics(metrics, step, flush=True)
        self.ui.on_epoch_end(epoch, step, metrics)

    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None:
        if not self.checkpoints:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(CHECKPOINT_PATH).name
            torch.save(checkpoint, path)
            # Each attempt holds a signal until it is done (never a half-logged checkpoint); the run's lookup
            # in the store may meet a lock: retried in short attempts (tracking.store_write).
            parent = str(Path(CHECKPOINT_PATH).parent)
            tracking.store_write(mlflow.log_artifact, str(path), artifact_path=parent, what="logging the checkpoint")
        self.ui.on_checkpoint(checkpoint, epoch)
