"""The optimisation core of both trainers (`training.Trainer` for LM and SFT, `dpo.DPOTrainer`).

AdamW with weight decay on weight matrices only; linear warmup then cosine decay to lr * min_lr_ratio;
one clipped update; a guard that looks at every loss before backward, so a non-finite loss never
reaches the weights; early stopping that keeps a copy of the best weights; and the loop state a
checkpoint holds. The checkpoint keys are spelled here and nowhere else:

    model, optimizer, scheduler, rng_cpu        `checkpoint` / `restore` (torch state dicts, CPU RNG)
    epoch, step, skipped_batches, history,      `TrainState.state_dict` / `load_state_dict`
    best, best_epoch, bad_epochs, best_state
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from picollm.config import ModelConfig, OptimConfig
from picollm.errors import PicollmError, TrainingError
from picollm.model.weights import build_from_state, load_state_dict
from picollm.training.adamw import AdamW, LambdaSchedule

log = logging.getLogger(__name__)

REQUIRED_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng_cpu", "epoch", "step")
CHECKPOINT_KEYS = (*REQUIRED_CHECKPOINT_KEYS, "config")  # the trainer's keys, plus the run config a resume checks
"""What a resume cannot go without; the other keys `checkpoint` writes are optional on `restore`."""


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    """AdamW (picollm.adamw: torch's numerics without importing torch._dynamo); weight decay only on
    matrices (not on norms, biases or the tied embedding)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """The lr factor after `step` scheduler steps: linear warmup to 1, then cosine down to `min_ratio`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_scheduler(optimizer: AdamW, cfg: OptimConfig, total_steps: int) -> LambdaSchedule:
    """`lr_lambda` over `total_steps`, the warmup capped at half of them."""
    warmup = min(cfg.warmup_steps, total_steps // 2)
    return LambdaSchedule(optimizer, lr_lambda(warmup, total_steps, cfg.min_lr_ratio))


def update(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: AdamW,
    scheduler: LambdaSchedule,
    grad_clip: float | None,
) -> None:
    """One optimiser step on `loss`: backward, clip `model`'s gradient norm (None = no clipping), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    scheduler.step()


def skip_update(optimizer: AdamW, scheduler: LambdaSchedule) -> None:
    """A dropped batch: no update, but the schedule goes on (a run's lr stays a function of its step)."""
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


# --------------------------------------------------------------------------------------------------
# Early stopping and the loop state


@dataclass
class EarlyStopping:
    """The best score so far (`mode` min or max), when it came (`best_at`: an epoch or a step), how many
    evaluations since (`bad`), and, with `keep_state`, a copy of the model's weights at the best."""

    mode: Literal["min", "max"] = "min"
    patience: int | None = None  # stop after this many evaluations without improvement; None = never
    keep_state: bool = True
    best: float | None = None  # None = no score yet (inf for min, -inf for max)
    best_at: int | None = None
    bad: int = 0
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.best is None:
            self.best = math.inf if self.mode == "min" else -math.inf

    def update(self, score: float, at: int, model: nn.Module) -> bool:
        """Record an evaluation; True if it is a new best. A NaN score never is."""
        improved = score < self.best if self.mode == "min" else score > self.best
        if improved:
            self.best, self.best_at, self.bad = score, at, 0
            if self.keep_state:
                self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        """Load the best weights into `model`, if a copy was kept."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


@dataclass
class TrainState:
    """Where a training loop stands: `epoch` passes over the data done, `step` optimiser steps taken
    (skipped batches count), one `history` entry per evaluation, early stopping, skipped batches."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_batches: int = 0
    early: EarlyStopping = field(default_factory=EarlyStopping)

    def state_dict(self) -> dict[str, Any]:
        e = self.early
        return {
            "epoch": self.epoch,
            "step": self.step,
            "skipped_batches": self.skipped_batches,
            "history": self.history,
            "best": e.best,
            "best_epoch": e.best_at,
            "bad_epochs": e.bad,
            "best_state": e.best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`; only epoch and step are required (older checkpoints lack the rest)."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.skipped_batches = int(state.get("skipped_batches", 0))
        self.history = list(state.get("history", []))
        e = self.early
        e.best = float(state.get("best", math.inf if e.mode == "min" else -math.inf))
        e.best_at = state.get("best_epoch")
        e.bad = int(state.get("bad_epochs", 0))
        if state.get("best_state") is not None:
            e.best_state = state["best_state"]


def checkpoint(
    model: nn.Module,
    optimizer: AdamW,
    scheduler: LambdaSchedule,
    state: TrainState,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything an exact resume needs, plus `extra` (e.g. the run config). The tensors are live, not
    copies: save or copy the dict before training goes on."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        **state.state_dict(),
        **(extra or {}),
    }


def restore(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: AdamW,
    scheduler: LambdaSchedule,
    state: TrainState,
) -> None:
    """Load a `checkpoint` dict into the model, optimiser, scheduler, CPU RNG and `state`."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    state.load_state_dict(ckpt)


def validate_checkpoint(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: AdamW,
    scheduler: LambdaSchedule,
) -> None:
    """`restore` `ckpt` into fresh `model`/`optimizer`/`scheduler` (throwaway copies: the caller's
    objects are only a template) and check every entry a resumed loop will use, so a checkpoint that
    loads but cannot train fails here, in one line, before a run is reopened. ValueError names the entry.
    The global CPU RNG is left as it was."""
    missing = [k for k in REQUIRED_CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    for key in ("epoch", "step", "skipped_batches", "bad_epochs"):
        value = ckpt.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} is {value!r}, not a non-negative integer")
    best = ckpt.get("best", 0.0)
    if not isinstance(best, (int, float)) or math.isnan(best):
        raise ValueError(f"best is {best!r}, not a number")
    history = ckpt.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(h, dict) and all(isinstance(v, (int, float)) for v in h.values()) for h in history
    ):
        raise ValueError("history is not a list of metric dicts")
    if ckpt["epoch"] > 0 and len(history) < 1:
        raise ValueError(f"history is empty after {ckpt['epoch']} epochs")
    best_state = ckpt.get("best_state")
    if best_state is not None and not isinstance(best_state, dict):
        raise ValueError("best_state is not a state dict")
    if not isinstance(ckpt["rng_cpu"], torch.Tensor) or ckpt["rng_cpu"].dtype != torch.uint8:
        raise ValueError("rng_cpu is not a CPU RNG state (a uint8 tensor)")
    model, optimizer, scheduler = copy.deepcopy((model, optimizer, scheduler))
    saved_rng = torch.get_rng_state()
    try:
        for what, load in (
            ("model", lambda: model.load_state_dict(ckpt["model"])),
            ("best_state", lambda: best_state is None or model.load_state_dict(best_state)),
            ("optimizer", lambda: optimizer.load_state_dict(ckpt["optimizer"])),
            ("scheduler", lambda: scheduler.load_state_dict(ckpt["scheduler"])),
            ("rng_cpu", lambda: torch.set_rng_state(ckpt["rng_cpu"])),
        ):
            try:
                load()
            except Exception as e:  # torch's own message, first line: "size mismatch for ...", ...
                text = str(e).strip().splitlines()
                raise ValueError(f"{what}: {text[0] if text else type(e).__name__}") from None
    finally:
        torch.set_rng_state(saved_rng)
    for group in optimizer.param_groups:
        b1, b2 = group.get("betas", (0.9, 0.999))
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or not math.isfinite(float(group.get("lr", 0.0))):
            raise ValueError(f"optimizer: param group with lr {group.get('lr')!r}, betas {group.get('betas')!r}")
    if not isinstance(scheduler.last_epoch, int) or len(scheduler.base_lrs) != len(optimizer.param_groups):
        raise ValueError("scheduler: its state does not fit the optimizer")


# --------------------------------------------------------------------------------------------------
# Non-finite losses


def _no_reduction(flag: bool) -> bool:
    return flag


@dataclass
class NonFiniteGuard:
    """Looks at every loss before backward, so the weights never take a non-finite step.

    action `stop` raises TrainingError (one line: `metric`, the step, the epoch, the loss, then `on_stop`:
    what is kept and what to change); `skip_batch` counts the batch in `state.skipped_batches` and has the
    caller drop it, and raises once more than `max_skipped` were dropped. Under DDP `any_rank` makes
    every rank see a bad loss on any rank (`per_rank`: the loss shown is this rank's share)."""

    action: Literal["stop", "skip_batch"] = "stop"
    max_skipped: int = 0
    on_stop: str = "training stopped"
    metric: str = "train/loss"
    any_rank: Callable[[bool], bool] = _no_reduction
    per_rank: bool = False

    def check(self, loss: torch.Tensor, state: TrainState) -> bool:
        """True if the batch may update the weights, False if it is to be skipped; raises to stop.
        `state.step` is the step this loss belongs to, `state.epoch` the epochs done before it."""
        if not self.any_rank(not bool(torch.isfinite(loss))):
            return True
        value = float(loss.detach())
        what = f"{self.metric} is not finite at step {state.step} (epoch {state.epoch + 1}"
        what += f", this rank's loss {value})" if self.per_rank else f": {value})"
        if self.action == "stop":
            raise TrainingError(f"{what}; {self.on_stop}")
        state.skipped_batches += 1
        if state.skipped_batches > self.max_skipped:
            raise TrainingError(
                f"{what}: {state.skipped_batches} non-finite batches, more than train.max_skipped_batches"
            )
        log.warning("%s; batch skipped (%d so far)", what, state.skipped_batches)
        return False


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (weights_only, like every load), checked before anything uses it: every
    key a resume needs is there and its weights fit the model config stored beside them."""
    name = Path(path).name
    ckpt = load_state_dict(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise PicollmError(f"{name} is not a picollm training checkpoint (no {', '.join(missing)})")
    try:
        model_cfg = ModelConfig.model_validate(ckpt["config"]["model"])
    except (TypeError, KeyError, ValidationError):
        raise PicollmError(f"{name}: its stored config has no valid model section") from None
    if not isinstance(ckpt["model"], dict):
        raise PicollmError(f"{name}: its model entry is not a state dict")
    build_from_state(ckpt["model"], model_cfg, source=f"the weights in {name}")
    return ckpt
