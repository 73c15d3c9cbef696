"""Flow: build data, train one model, evaluate, log everything to MLflow, register the model."""

from __future__ import annotations

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

from picollm import distributed, plots, tracking
from picollm.config import TrainRunConfig, flatten, to_yaml, validate
from picollm.data import PaddedSplit, SyntheticData, build_data, to_padded
from picollm.errors import PicollmError
from picollm.evaluation import evaluate
from picollm.hardware import measure_matmul_peak
from picollm.model import Transformer
from picollm.registry import load_checkpoint, log_model
from picollm.training import NullCallbacks, TrainCallbacks, Trainer, TrainResult

log = logging.getLogger(__name__)

CHECKPOINT_PATH = "checkpoints/checkpoint.pt"
RESUMABLE_KEYS = {"train.epochs", "train.early_stopping_patience", "tracking.run_name", "tracking.uri"}


@dataclass
class TrainOutcome:
    run_id: str
    model_uri: str | None
    registered_version: str | None
    test_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    model: Transformer | None = field(default=None, repr=False)  # the trained model (on the CPU)


class MlflowCallbacks:
    """Trainer callbacks that log to the active run (batched) and forward to a UI reporter;
    `checkpoints=False` skips the checkpoint artifact (runs that are not resumable)."""

    def __init__(self, run_id: str, ui: TrainCallbacks, checkpoints: bool = True) -> None:
        self.metrics = tracking.MetricLogger(run_id)
        self.ui = ui
        self.checkpoints = checkpoints

    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
        self.ui.on_train_start(total_steps, steps_per_epoch, start_epoch)

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        if metrics:
            self.metrics.log(metrics, step)
        self.ui.on_step(step, metrics)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.metrics.log(metrics, step)
        self.metrics.flush()
        self.ui.on_epoch_end(epoch, step, metrics)

    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None:
        if not self.checkpoints:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(CHECKPOINT_PATH).name
            torch.save(checkpoint, path)
            mlflow.log_artifact(str(path), artifact_path=str(Path(CHECKPOINT_PATH).parent))
        self.ui.on_checkpoint(checkpoint, epoch)


def _load_resume(run_id: str, cfg: TrainRunConfig) -> tuple[TrainRunConfig, dict[str, Any]]:
    client = MlflowClient()
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise PicollmError(f"--resume: no run with id {run_id!r} in {mlflow.get_tracking_uri()}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_PATH, dst_path=tmp)
        except (mlflow.exceptions.MlflowException, OSError):
            raise PicollmError(f"--resume: run {run_id} has no checkpoint to resume from") from None
        ckpt = load_checkpoint(path)
    saved = validate(TrainRunConfig, ckpt["config"], source=f"checkpoint of run {run_id}")
    old, new = flatten(saved.model_dump(mode="json")), flatten(cfg.model_dump(mode="json"))
    for key in sorted(old.keys() | new.keys()):
        if key not in RESUMABLE_KEYS and old.get(key) != new.get(key):
            raise PicollmError(
                f"--resume: {key} is {new.get(key)!r} but run {run_id} was trained with {old.get(key)!r}"
            )
    return cfg, ckpt


def run(
    cfg: TrainRunConfig, resume: str | None = None, ui: TrainCallbacks | None = None, nested: bool = False
) -> TrainOutcome:
    """Train, evaluate, log and register; `nested` opens the run as a child of the active run.

    Under torchrun every rank calls this: all of them train (DDP), only rank 0 talks to MLflow, and
    the other ranks return an outcome with an empty run id."""
    ctx, device = distributed.setup(cfg.train.device)
    try:
        return _run(cfg, ctx, device, resume, ui, nested)
    finally:
        distributed.teardown(ctx)


def _run(
    cfg: TrainRunConfig,
    ctx: distributed.DistContext,
    device: torch.device,
    resume: str | None,
    ui: TrainCallbacks | None,
    nested: bool,
) -> TrainOutcome:
    ckpt = None
    failure: BaseException | None = None
    if ctx.is_main:  # the store must answer (and a resume must make sense) before any work starts
        try:
            tracking.init_tracking(cfg.tracking.uri)
            if resume:
                cfg, ckpt = _load_resume(resume, cfg)
                if int(ckpt["epoch"]) >= cfg.train.epochs:
                    raise PicollmError(f"--resume: run {resume} already completed {ckpt['epoch']} epochs")
        except Exception as e:
            failure = e
    distributed.share_failure(ctx, failure)
    if resume:
        ckpt = distributed.broadcast_checkpoint(ctx, ckpt)
    data, splits, model, trainer, peak, fit = _prepare(cfg, ctx, device, ckpt)
    families = data.families
    if not ctx.is_main:
        result = fit(NullCallbacks())
        return TrainOutcome("", None, None, {}, result.history, families)

    run_name = cfg.tracking.run_name or f"{cfg.model.attention}-{cfg.model.pos_encoding}-seed{cfg.train.seed}"
    tags = {"picollm.flow": "train", "model.attention": cfg.model.attention}
    with tracking.tracked_run(cfg.tracking.experiment, run_name, run_id=resume, tags=tags, nested=nested) as active:
        run_id = active.info.run_id
        if ckpt is None:
            tracking.log_params(flatten(cfg.model_dump(mode="json")))
            tracking.log_params(
                {
                    "model.num_params": model.num_params(),
                    "model.matmul_params": model.matmul_params(),
                    "hardware.device": str(device),
                    "hardware.peak_flops": f"{peak:.3e}",
                    "hardware.torch_threads": torch.get_num_threads(),
                    "train.precision_resolved": trainer.precision,
                    "distributed.world_size": ctx.world_size,
                    "distributed.backend": ctx.backend or "none",
                    "distributed.rows_per_rank": math.ceil(cfg.train.batch_size / ctx.world_size),
                }
            )
            mlflow.log_text(to_yaml(cfg), "config.yaml")
            mlflow.log_metrics(data.stats(), step=0)
        elif ctx.enabled:
            mlflow.set_tag("distributed.resumed_world_size", str(ctx.world_size))

        result = fit(MlflowCallbacks(run_id, ui or NullCallbacks()))
        test_metrics = evaluate(trainer.model, splits["test"], "test", cfg.train.eval_batch_size)
        final = {**test_metrics, **{k: v for k, v in result.history[-1].items() if k.startswith("val/")}}
        mlflow.log_metrics(test_metrics, step=result.steps)
        mlflow.log_metrics(
            {
                "throughput/tokens_per_s_mean": _mean(result.history, "throughput/tokens_per_s"),
                "throughput/mfu_mean": _mean(result.history, "throughput/mfu"),
                "train.epochs_run": float(result.epochs_run),
            },
            step=result.steps,
        )
        if result.best_epoch is not None:
            mlflow.log_metric("train.best_epoch", float(result.best_epoch), step=result.steps)
        for name, fig in (
            ("figures/training_curves.png", plots.training_curves(result.history)),
            ("figures/test_accuracy_per_family.png", plots.family_accuracy(test_metrics, families)),
        ):
            mlflow.log_figure(fig, name)
            plots.close(fig)

        model_uri = version = None
        if cfg.tracking.log_model:
            model_uri, version = log_model(trainer.model.cpu(), cfg.tracking.registered_model)
            if version:
                mlflow.set_tag("registered_model", f"{cfg.tracking.registered_model}/{version}")
    return TrainOutcome(run_id, model_uri, version, final, result.history, families, trainer.model.cpu())


class _Prepared(NamedTuple):
    data: SyntheticData
    splits: dict[str, PaddedSplit]
    model: Transformer
    trainer: Trainer
    peak: float
    fit: Callable[[TrainCallbacks], TrainResult]


def _prepare(
    cfg: TrainRunConfig, ctx: distributed.DistContext, device: torch.device, ckpt: dict[str, Any] | None
) -> _Prepared:
    """Data, model and trainer: everything of a run but its tracking."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    data = build_data(cfg.data)  # before the run starts: bad data settings leave no run behind
    splits = {name: to_padded(s, cfg.data.pad_id, data.families) for name, s in data.splits().items()}
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    # Every rank measures at once, so the peak reflects the shared hardware; MFU is against all ranks.
    peak = cfg.train.peak_flops or measure_matmul_peak(device)
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
        lambda m: evaluate(m, splits["val"], "val", cfg.train.eval_batch_size),
        resume=ckpt,
        checkpoint_extra={"config": cfg.model_dump(mode="json")},
    )
    return _Prepared(data, splits, model, trainer, peak, fit)


def run_untracked(cfg: TrainRunConfig) -> dict[str, float]:
    """The same training and test evaluation as `run`, with no MLflow at all: the baseline that
    `make bench` measures tracking overhead against."""
    device = distributed.setup(cfg.train.device)[1]
    _, splits, _, trainer, _, fit = _prepare(cfg, distributed.DistContext(device=device), device, None)
    fit(NullCallbacks())
    return evaluate(trainer.model, splits["test"], "test", cfg.train.eval_batch_size)


def _mean(history: list[dict[str, float]], key: str) -> float:
    vals = [h[key] for h in history if key in h]
    return sum(vals) / len(vals) if vals else math.nan
