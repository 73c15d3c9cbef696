"""One trainer for every model: AdamW, warmup + cosine, clipping, per-epoch eval, early stopping,
exact resume from a checkpoint dict. Tracking, progress display and checkpoint storage are
callbacks, so the loop knows nothing of MLflow or the terminal."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from picollm.config import TrainConfig
from picollm.data import IGNORE_INDEX, PaddedSplit, inputs_and_targets, iter_batches
from picollm.distributed import DistContext, all_reduce_sum, any_rank, broadcast_json
from picollm.errors import TrainingError

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


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on norms, biases or the tied embedding)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lm_loss(model: nn.Module, tokens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over non-pad targets, and the number of those targets."""
    inputs, targets = inputs_and_targets(tokens, pad_id)
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
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.train_model: nn.Module = self.model  # what the training step calls
        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

    def _batch_generator(self, epoch: int) -> torch.Generator:
        # Batch order depends only on (seed, epoch), so a resumed run sees the same batches.
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)

    def _forward(self, batch: PaddedSplit) -> tuple[torch.Tensor, int]:
        """This rank's summed next-token loss over its rows, and the global batch's target count."""
        inputs, targets = inputs_and_targets(batch.tokens, batch.pad_id)
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

    def _non_finite(self, loss: torch.Tensor, step: int, epoch: int, skipped: int) -> int:
        """Stop (the default) or count a skipped batch; the weights never see the bad step."""
        what = f"train/loss is not finite at step {step} (epoch {epoch + 1}"
        what += f", this rank's loss {float(loss)})" if self.dist.enabled else f": {float(loss)})"
        if self.cfg.nonfinite == "stop":
            raise TrainingError(
                f"{what}; training stopped, the last good checkpoint is kept "
                "(lower train.lr, or set train.nonfinite=skip_batch)"
            )
        skipped += 1
        if skipped > self.cfg.max_skipped_batches:
            raise TrainingError(f"{what}: {skipped} non-finite batches, more than train.max_skipped_batches")
        log.warning("%s; batch skipped (%d so far)", what, skipped)
        return skipped

    def checkpoint(self, epoch: int, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        assert self.scheduler is not None
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "epoch": epoch,
            "step": step,
            **extra,
        }

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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(min(cfg.warmup_steps, total // 2), total, cfg.min_lr_ratio)
        )
        start_epoch, step = 0, 0
        history: list[dict[str, float]] = []
        best, best_epoch, bad_epochs, best_state = math.inf, None, 0, None
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            torch.set_rng_state(resume["rng_cpu"])
            start_epoch, step = int(resume["epoch"]), int(resume["step"])
            history = list(resume.get("history", []))
            best = float(resume.get("best", math.inf))
            best_epoch = resume.get("best_epoch")
            bad_epochs = int(resume.get("bad_epochs", 0))
            if resume.get("best_state") is not None:
                best_state = resume["best_state"]
            log.info("resuming at epoch %d, step %d", start_epoch, step)
        cb.on_train_start(total, steps_per_epoch, start_epoch)
        stopped_early = False
        skipped = int(resume.get("skipped_batches", 0)) if resume is not None else 0
        epoch = start_epoch
        for epoch in range(start_epoch, cfg.epochs):
            self.train_model.train()
            t0 = time.perf_counter()
            tokens_seen = 0  # global (all ranks) non-pad targets this epoch
            loss_sum = torch.zeros((), device=self.device)  # this rank's summed token losses
            window_sum = torch.zeros((), device=self.device)
            window_tokens = 0
            for batch in iter_batches(train, cfg.batch_size, self._batch_generator(epoch)):
                step += 1
                loss_tokens, n_tok = self._forward(batch)
                if any_rank(self.dist, not bool(torch.isfinite(loss_tokens))):
                    skipped = self._non_finite(loss_tokens, step, epoch, skipped)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()  # the batch is dropped; the schedule goes on
                    cb.on_step(step, {"train/skipped_batches": float(skipped)})
                    continue
                # Scaled so DDP's gradient mean over ranks is the mean over the global batch's tokens.
                loss = loss_tokens * (self.dist.world_size / max(n_tok, 1))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
                self.optimizer.step()
                self.scheduler.step()
                tokens_seen += n_tok
                d = loss_tokens.detach()
                loss_sum += d
                window_sum += d
                window_tokens += n_tok
                logged = None
                if step % cfg.log_every == 0:
                    [window_total] = all_reduce_sum(self.dist, window_sum)
                    logged = {"train/loss_step": window_total / max(window_tokens, 1)}
                    logged["lr"] = self.scheduler.get_last_lr()[0]
                    window_sum.zero_()
                    window_tokens = 0
                cb.on_step(step, logged)
            train_time = time.perf_counter() - t0
            [epoch_loss] = all_reduce_sum(self.dist, loss_sum)
            metrics = {"epoch": float(epoch + 1), "train/loss": epoch_loss / max(tokens_seen, 1)}
            if skipped:
                metrics["train/skipped_batches"] = float(skipped)
            metrics["throughput/tokens_per_s"] = tokens_seen / train_time
            metrics["throughput/epoch_seconds"] = train_time
            if self.flops_per_token and self.peak_flops:
                metrics["throughput/mfu"] = metrics["throughput/tokens_per_s"] * self.flops_per_token / self.peak_flops
            # Rank 0 evaluates; the others take its numbers, so early stopping agrees everywhere.
            metrics.update(broadcast_json(self.dist, evaluate(self.model) if self.dist.is_main else None))
            history.append(metrics)
            score = metrics.get(monitor, math.nan)
            if score < best:
                best, best_epoch, bad_epochs = score, epoch + 1, 0
                if cfg.early_stopping_patience:
                    best_state = copy.deepcopy(self.model.state_dict())
            else:
                bad_epochs += 1
            cb.on_epoch_end(epoch + 1, step, metrics)
            stop = cfg.early_stopping_patience is not None and bad_epochs >= cfg.early_stopping_patience
            last = epoch + 1 == cfg.epochs or stop
            if self.dist.is_main and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
                extra = {
                    "skipped_batches": skipped,
                    "history": history,
                    "best": best,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "best_state": best_state,
                    **(checkpoint_extra or {}),
                }
                cb.on_checkpoint(self.checkpoint(epoch + 1, step, extra), epoch + 1)
            if stop:
                stopped_early = True
                log.info("early stopping after epoch %d (best %s at epoch %s)", epoch + 1, monitor, best_epoch)
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return TrainResult(
            epochs_run=len(history), steps=step, history=history, best_epoch=best_epoch, stopped_early=stopped_early
        )
