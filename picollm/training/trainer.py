"""One trainer for every model: per-epoch eval, early stopping, exact resume from a checkpoint dict,
DDP. The optimiser, schedule, non-finite guard, early stopping and checkpoint state come from
picollm/optim.py (shared with the DPO trainer). Tracking, progress display and checkpoint storage
are callbacks, so the loop knows nothing of MLflow or the terminal."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from picollm.config import TrainConfig
from picollm.data.splits import IGNORE_INDEX, PaddedSplit, inputs_and_targets, iter_batches
from picollm.errors import PicollmError
from picollm.runtime.distributed import DistContext, all_reduce_sum, any_rank, broadcast_json
from picollm.training import optim
from picollm.training.adamw import LambdaSchedule
from picollm.training.optim import EarlyStopping, NonFiniteGuard, TrainState, lr_lambda, make_optimizer

__all__ = [
    "NullCallbacks",
    "TrainCallbacks",
    "TrainResult",
    "Trainer",
    "autocast",
    "lm_loss",
    "lr_lambda",
    "make_optimizer",
    "predictable_targets",
    "resolve_precision",
]

log = logging.getLogger(__name__)


class TrainCallbacks(Protocol):
    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float] | None) -> None: ...
    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None: ...


class NullCallbacks:
    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
        pass

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        pass

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None:
        pass


@dataclass
class TrainResult:
    epochs_run: int
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False


def predictable_targets(targets: torch.Tensor, ceilings: torch.Tensor) -> torch.Tensor:
    """`targets` with IGNORE_INDEX wherever the Bayes ceiling is below 1 (`train.loss_on: predictable`:
    e.g. only the mqar answers count, as in Zoology); ceilings are (N, >= L-1), targets (N, L-1)."""
    return targets.masked_fill(ceilings[:, : targets.shape[1]].to(targets.device) < 1 - 1e-9, IGNORE_INDEX)


def lm_loss(
    model: nn.Module, tokens: torch.Tensor, pad_id: int, ceilings: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over non-pad targets (with `ceilings`, only those of ceiling 1),
    and the number of those targets."""
    inputs, targets = inputs_and_targets(tokens, pad_id)
    if ceilings is not None:
        targets = predictable_targets(targets, ceilings)
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    return loss, int((targets != IGNORE_INDEX).sum())


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 where it pays (CUDA with bf16 support), fp32 elsewhere."""
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if bf16_ok else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast for matmuls; losses, softmax statistics and the linear-attention state and
    normaliser are computed in fp32 regardless (they accumulate over many terms)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Trainer:
    """Trains `model` on one process or, given a DistContext from `distributed.setup`, as one rank of
    DDP. `cfg.batch_size` is the global batch: every rank draws the same batch order (seeded by
    epoch) and trains on its rows of each batch, and the loss is scaled so the all-reduced gradient
    equals the single-process gradient of the same batch."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        device: torch.device,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        dist: DistContext | None = None,
    ) -> None:
        self.model = model.to(device)  # the plain module: checkpoints, evaluation, the returned model
        self.cfg = cfg
        self.device = device
        self.dist = dist or DistContext(device=device)
        self.precision = resolve_precision(cfg.precision, device)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler: LambdaSchedule | None = None  # set by fit: its length is the run's
        self.state = TrainState()
        self.guard = NonFiniteGuard(
            action=cfg.nonfinite,
            max_skipped=cfg.max_skipped_batches,
            on_stop=self._on_stop(None),
            any_rank=partial(any_rank, self.dist),
            per_rank=self.dist.enabled,
        )
        # What the training step calls. Under DDP it exists only while `fit` runs (`_training_module`):
        # a DDP reducer that outlives its process group (kept by whoever still holds the trainer) is
        # destroyed during interpreter shutdown and aborts the rank ("terminate called without an
        # active exception").
        self.train_model: nn.Module = self.model if self.dist.enabled else self._training_module()

    @staticmethod
    def _on_stop(checkpoint_epoch: int | None) -> str:
        # Only what is true: before the first checkpoint there is nothing to resume from.
        kept = (
            "no checkpoint was written yet"
            if checkpoint_epoch is None
            else f"the checkpoint of epoch {checkpoint_epoch} is kept"
        )
        return f"training stopped, {kept} (lower train.lr, or set train.nonfinite=skip_batch)"

    def _training_module(self) -> nn.Module:
        module: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(self.model, device_ids=ids)
        return torch.compile(module) if self.cfg.compile else module

    def _batch_generator(self, epoch: int) -> torch.Generator:
        # Batch order depends only on (seed, epoch), so a resumed run sees the same batches.
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)

    def _forward(self, batch: PaddedSplit) -> tuple[torch.Tensor, int]:
        """This rank's summed next-token loss over its rows, and the global batch's count of the
        targets in the loss (`train.loss_on`)."""
        inputs, targets = batch.inputs_and_targets()
        if self.cfg.loss_on == "predictable":
            if batch.ceilings is None:
                raise PicollmError("train.loss_on=predictable needs data with Bayes ceilings (the synthetic families)")
            targets = predictable_targets(targets, batch.ceilings)
        n_tok = int((targets != IGNORE_INDEX).sum())
        rows = self.dist.shard(len(inputs))
        inputs = inputs[rows].to(self.device, non_blocking=True)
        targets = targets[rows].to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            logits = self.train_model(inputs)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, n_tok

    def checkpoint(self, epoch: int, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        """What `fit(resume=...)` needs to go on after `epoch` (at `step`), plus `extra`."""
        assert self.scheduler is not None
        state = dataclasses.replace(self.state, epoch=epoch, step=step)
        return optim.checkpoint(self.model, self.optimizer, self.scheduler, state, extra)

    def fit(
        self,
        train: PaddedSplit,
        evaluate: Callable[[nn.Module], dict[str, float]],
        callbacks: TrainCallbacks | None = None,
        resume: dict[str, Any] | None = None,
        monitor: str = "val/loss",
        checkpoint_extra: dict[str, Any] | None = None,
    ) -> TrainResult:
        """Train for cfg.epochs (from `resume`'s epoch on); `checkpoint_extra` is stored in every
        checkpoint (e.g. the run config, so a resume can check it)."""
        cb = callbacks or NullCallbacks()
        cfg = self.cfg
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        self.scheduler = optim.make_scheduler(self.optimizer, cfg, total)
        patience = cfg.early_stopping_patience
        self.state = state = TrainState(early=EarlyStopping("min", patience, keep_state=bool(patience)))
        if resume is not None:
            optim.restore(resume, self.model, self.optimizer, self.scheduler, state)
            log.info("resuming at epoch %d, step %d", state.epoch, state.step)
        self.guard.on_stop = self._on_stop(state.epoch if resume is not None else None)
        cb.on_train_start(total, steps_per_epoch, state.epoch)
        stopped_early = False
        if self.dist.enabled:
            self.train_model = self._training_module()  # after `restore`: DDP broadcasts rank 0's weights
        try:
            while state.epoch < cfg.epochs and not stopped_early:
                metrics = self._train_epoch(train, cb)
                # Rank 0 evaluates; the others take its numbers, so early stopping agrees everywhere.
                metrics.update(broadcast_json(self.dist, evaluate(self.model) if self.dist.is_main else None))
                stopped_early = self._end_epoch(metrics, monitor, cb, checkpoint_extra or {})
        finally:
            if self.dist.enabled:
                self.train_model = self.model  # the DDP wrapper and its reducer go now, while the group lives
        state.early.restore_best(self.model)
        return TrainResult(
            epochs_run=len(state.history),
            steps=state.step,
            history=state.history,
            best_epoch=state.early.best_at,
            stopped_early=stopped_early,
        )

    def _train_epoch(self, train: PaddedSplit, cb: TrainCallbacks) -> dict[str, float]:
        """One pass over `train` in epoch `state.epoch`'s batch order; that epoch's train metrics."""
        cfg, state = self.cfg, self.state
        assert self.scheduler is not None
        self.train_model.train()
        t0 = time.perf_counter()
        tokens_seen = 0  # global (all ranks) targets in the loss this epoch
        targets_seen = 0  # global non-pad targets this epoch, in the loss or not: the throughput
        loss_sum = torch.zeros((), device=self.device)  # this rank's summed token losses
        window_sum = torch.zeros((), device=self.device)
        window_tokens = 0
        for batch in iter_batches(train, cfg.batch_size, self._batch_generator(state.epoch)):
            state.step += 1
            loss_tokens, n_tok = self._forward(batch)
            if not self.guard.check(loss_tokens, state):  # before backward: the weights never see it
                optim.skip_update(self.optimizer, self.scheduler)
                cb.on_step(state.step, {"train/skipped_batches": float(state.skipped_batches)})
                continue
            # Scaled so DDP's gradient mean over ranks is the mean over the global batch's tokens.
            loss = loss_tokens * (self.dist.world_size / max(n_tok, 1))
            optim.update(loss, self.model, self.optimizer, self.scheduler, cfg.grad_clip)
            tokens_seen += n_tok
            targets_seen += batch.n_target_tokens
            d = loss_tokens.detach()
            loss_sum += d
            window_sum += d
            window_tokens += n_tok
            logged = None
            if state.step % cfg.log_every == 0:
                [window_total] = all_reduce_sum(self.dist, window_sum)
                logged = {"train/loss_step": window_total / max(window_tokens, 1)}
                logged["lr"] = self.scheduler.get_last_lr()[0]
                window_sum.zero_()
                window_tokens = 0
            cb.on_step(state.step, logged)
        return self._epoch_metrics(loss_sum, tokens_seen, targets_seen, time.perf_counter() - t0)

    def _epoch_metrics(
        self, loss_sum: torch.Tensor, tokens_seen: int, targets_seen: int, train_time: float
    ) -> dict[str, float]:
        [epoch_loss] = all_reduce_sum(self.dist, loss_sum)
        metrics = {"epoch": float(self.state.epoch + 1), "train/loss": epoch_loss / max(tokens_seen, 1)}
        if self.state.skipped_batches:
            metrics["train/skipped_batches"] = float(self.state.skipped_batches)
        metrics["throughput/tokens_per_s"] = targets_seen / train_time
        metrics["throughput/epoch_seconds"] = train_time
        if self.flops_per_token and self.peak_flops:
            metrics["throughput/mfu"] = metrics["throughput/tokens_per_s"] * self.flops_per_token / self.peak_flops
        return metrics

    def _end_epoch(self, metrics: dict[str, float], monitor: str, cb: TrainCallbacks, extra: dict[str, Any]) -> bool:
        """Record an epoch's metrics (with its evaluation), checkpoint when due; True to stop early."""
        cfg, state = self.cfg, self.state
        state.epoch += 1
        state.history.append(metrics)
        state.early.update(metrics.get(monitor, math.nan), state.epoch, self.model)
        cb.on_epoch_end(state.epoch, state.step, metrics)
        stop = state.early.should_stop
        last = state.epoch == cfg.epochs or stop
        if self.dist.is_main and (state.epoch % cfg.checkpoint_every == 0 or last):
            cb.on_checkpoint(self.checkpoint(state.epoch, state.step, extra), state.epoch)
            self.guard.on_stop = self._on_stop(state.epoch)
        if stop:
            log.info("early stopping after epoch %d (best %s at epoch %s)", state.epoch, monitor, state.early.best_at)
        return stop
