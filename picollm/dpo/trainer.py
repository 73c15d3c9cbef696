"""The DPO trainer for picollm Transformers (Rafailov et al. 2023; the losses are picollm/dpo/losses.py).

The metric names follow TRL's DPOTrainer. Reference log-probs are computed once for every pair (the
reference is frozen), so a step costs one policy forward/backward over the chosen and rejected sequences
concatenated into one batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from picollm.config import DPOConfig
from picollm.data.splits import IGNORE_INDEX, PaddedSplit, length_bucketed_batches
from picollm.dpo.losses import (
    PairBatch,
    batch_logps,
    batch_logps_and_logits,
    collate,
    dpo_loss,
    rpo_nll,
    simpo_loss,
)
from picollm.dpo.metrics import PairScores, pair_metrics, scores_metrics
from picollm.dpo.pairs import PreferencePair
from picollm.training import optim
from picollm.training.optim import EarlyStopping, NonFiniteGuard, TrainState
from picollm.training.trainer import resolve_precision

log = logging.getLogger(__name__)

MONITOR_MODE = {"val/loss": "min", "val/accuracy": "max", "val/rewards/accuracies": "max", "val/rewards/margins": "max"}


@dataclass
class PairSet:
    """A split's pairs with the frozen reference's log-probs, computed once."""

    pairs: list[PreferencePair]
    pad_id: int
    ref_chosen: torch.Tensor | None = None  # (N,)
    ref_rejected: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def total_lengths(self) -> torch.Tensor:
        return torch.tensor([len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in self.pairs])

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = False
    ) -> list[torch.Tensor]:
        # Similar lengths together: less padding in every forward pass.
        return length_bucketed_batches(self.total_lengths, batch_size, generator, shuffle)

    def batch(self, idx: torch.Tensor) -> PairBatch:
        return collate([self.pairs[i] for i in idx.tolist()], self.pad_id)


@torch.no_grad()
def compute_reference_logps(
    reference: nn.Module,
    pairs: PairSet,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill pairs.ref_chosen/ref_rejected with the reference's log-probs (eval mode: no dropout);
    `progress(done, total)` after every batch (pairs)."""
    was_training = reference.training
    reference.eval()
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    done = 0
    for idx in pairs.batches(batch_size):
        c, r = batch_logps(reference, pairs.batch(idx).to(device), precision)
        chosen[idx], rejected[idx] = c.cpu(), r.cpu()
        done += len(idx)
        if progress is not None:
            progress(done, len(pairs))
    reference.train(was_training)
    pairs.ref_chosen, pairs.ref_rejected = chosen, rejected


@torch.no_grad()
def lm_metrics(
    model: nn.Module, split: PaddedSplit, prefix: str, batch_size: int = 16, max_logits: int = 2**25
) -> dict[str, float]:
    """Next-token loss/accuracy/perplexity of an LM split. Batches shrink so that one batch's logits
    stay under `max_logits` floats: with a 50k vocabulary a 256-row batch would need gigabytes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = model.head.out_features if hasattr(model, "head") else 1
    nll_sum, correct, n = 0.0, 0, 0
    order = torch.argsort(split.lengths, stable=True)
    bs = max(1, min(batch_size, max_logits // max(1, split.tokens.shape[1] * vocab)))
    for idx in order.split(bs):
        inputs, targets = (t.to(device) for t in split.subset(idx).inputs_and_targets())
        logits = model(inputs).float()
        valid = targets != IGNORE_INDEX
        nll_sum += float(
            F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        )
        correct += int(((logits.argmax(-1) == targets) & valid).sum())
        n += int(valid.sum())
    model.train(was_training)
    loss = nll_sum / max(n, 1)
    return {
        f"{prefix}/loss": loss,
        f"{prefix}/accuracy": correct / max(n, 1),
        f"{prefix}/perplexity": math.exp(min(loss, 50.0)),
    }


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class DPOResult:
    steps: int
    step0_loss: float
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation
    best_step: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0


class DPOTrainer:
    """Optimises a policy against precomputed reference log-probs; evaluates and early-stops on val."""

    def __init__(self, policy: nn.Module, cfg: DPOConfig, device: torch.device) -> None:
        self.policy = policy.to(device)
        self.cfg = cfg
        self.device = device
        self.precision = resolve_precision(cfg.precision, device)
        self.optimizer = optim.make_optimizer(self.policy, cfg)
        self.scheduler = optim.make_scheduler(self.optimizer, cfg, cfg.max_steps)
        # No skip option: DPO stops at the first non-finite loss, before it reaches the weights.
        self.guard = NonFiniteGuard(
            on_stop="training stopped, the policy keeps its last good weights (lower dpo.lr)", metric="DPO train/loss"
        )

    def _terms(self, batch: PairBatch, ref_c: torch.Tensor, ref_r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, ref_c, ref_r,
        chosen_logits, rejected_logits): pair_metrics' arguments, with log-probs length-normalised where
        the loss uses them so (length_normalize, simpo), so the metrics match the loss."""
        cfg = self.cfg
        pc, pr, c_logits, r_logits = batch_logps_and_logits(self.policy, batch, self.precision)
        ref_c, ref_r = ref_c.to(self.device), ref_r.to(self.device)
        lc, lr = batch.lengths[: batch.n_pairs].float(), batch.lengths[batch.n_pairs :].float()
        nll = rpo_nll(pc, lc) if cfg.rpo_alpha else None
        if cfg.loss_type == "simpo":
            losses, cr, rr = simpo_loss(pc, pr, lc, lr, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
            pc, pr, ref_c, ref_r = pc / lc, pr / lr, ref_c / lc, ref_r / lr
        else:
            if cfg.length_normalize:
                pc, pr, ref_c, ref_r = pc / lc, pr / lr, ref_c / lc, ref_r / lr
            losses, cr, rr = dpo_loss(pc, pr, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        if nll is not None:
            losses = losses + cfg.rpo_alpha * nll
        return losses, cr, rr, pc, pr, ref_c, ref_r, c_logits, r_logits

    @torch.no_grad()
    def score(self, pairs: PairSet) -> PairScores:
        """Every pair's loss, rewards, log-probs and logits under the current policy (eval mode)."""
        assert pairs.ref_chosen is not None and pairs.ref_rejected is not None
        was_training = self.policy.training
        self.policy.eval()
        parts: list[tuple[torch.Tensor, ...]] = []
        schemes: list[str] = []
        uids: list[int] = []
        for idx in pairs.batches(self.cfg.eval_batch_size):
            batch = pairs.batch(idx).to(self.device)
            parts.append(tuple(t.cpu() for t in self._terms(batch, pairs.ref_chosen[idx], pairs.ref_rejected[idx])))
            schemes += batch.schemes
            uids += [pairs.pairs[i].uid for i in idx.tolist()]
        self.policy.train(was_training)
        return PairScores(*(torch.cat(c) for c in zip(*parts, strict=True)), schemes=schemes, uids=uids)

    def evaluate(self, pairs: PairSet, prefix: str) -> dict[str, float]:
        return scores_metrics(prefix, self.score(pairs))

    def fit(
        self,
        train: PairSet,
        val: PairSet,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
    ) -> DPOResult:
        """Up to cfg.max_steps steps, evaluating every cfg.eval_every; hands back the best policy."""
        cfg = self.cfg
        assert train.ref_chosen is not None and train.ref_rejected is not None
        on_log = on_log or (lambda s, m: None)
        on_eval = on_eval or (lambda s, m: None)
        t0 = time.perf_counter()
        step0 = self._step0_metrics(train)
        val0 = self.evaluate(val, "val")
        on_log(0, step0)
        on_eval(0, val0)
        state = TrainState(early=EarlyStopping(MONITOR_MODE[cfg.monitor], cfg.early_stopping_patience))
        state.history.append({"step": 0.0, **val0})
        state.early.update(val0[cfg.monitor], 0, self.policy)

        self.policy.train()
        stopped = False
        window: list[dict[str, float]] = []
        while state.step < cfg.max_steps and not stopped:
            stopped = self._train_pass(train, val, state, window, on_log, on_eval)
            state.epoch += 1
        state.early.restore_best(self.policy)
        self.policy.eval()
        return DPOResult(
            state.step, step0["train/loss"], state.history, state.early.best_at, stopped, time.perf_counter() - t0
        )

    def _step0_metrics(self, train: PairSet) -> dict[str, float]:
        """Train metrics of the first batch before any update: the policy is the reference, so the loss
        is ln 2 (sigmoid)."""
        assert train.ref_chosen is not None and train.ref_rejected is not None
        gen = torch.Generator().manual_seed(self.cfg.seed)
        first = train.batches(self.cfg.batch_size, gen, shuffle=True)[0]
        self.policy.eval()
        with torch.no_grad():
            terms = self._terms(train.batch(first).to(self.device), train.ref_chosen[first], train.ref_rejected[first])
        return pair_metrics("train", *(t.cpu() for t in terms))

    def _train_pass(
        self,
        train: PairSet,
        val: PairSet,
        state: TrainState,
        window: list[dict[str, float]],
        on_log: Callable[[int, dict[str, float]], None],
        on_eval: Callable[[int, dict[str, float]], None],
    ) -> bool:
        """One pass over `train` in pass `state.epoch`'s order (or up to max_steps); True to stop early."""
        cfg = self.cfg
        assert train.ref_chosen is not None and train.ref_rejected is not None
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.epoch)
        for idx in train.batches(cfg.batch_size, gen, shuffle=True):
            state.step += 1
            last = state.step == cfg.max_steps
            terms = self._terms(train.batch(idx).to(self.device), train.ref_chosen[idx], train.ref_rejected[idx])
            loss = terms[0].mean()
            self.guard.check(loss, state)  # raises before backward: the weights never see a bad loss
            grad_norm = self._update(loss)
            window.append(pair_metrics("train", *(t.detach().cpu() for t in terms)) | {"train/grad_norm": grad_norm})
            if state.step % cfg.log_every == 0 or last:
                avg = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                avg["train/lr"] = self.scheduler.get_last_lr()[0]
                on_log(state.step, avg)
                window.clear()
            if (state.step % cfg.eval_every == 0 or last) and self._eval_step(val, state, on_eval):
                return True
            if last:
                break
        return False

    def _update(self, loss: torch.Tensor) -> float:
        """optim.update, but returning the gradient norm before clipping (TRL's `grad_norm`)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else math.inf  # inf: measure, never clip
        norm = nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def _eval_step(self, val: PairSet, state: TrainState, on_eval: Callable[[int, dict[str, float]], None]) -> bool:
        """Evaluate on val, keep the best policy; True when early stopping says stop."""
        metrics = self.evaluate(val, "val")
        state.history.append({"step": float(state.step), **metrics})
        on_eval(state.step, metrics)
        early, monitor = state.early, self.cfg.monitor
        early.update(metrics[monitor], state.step, self.policy)
        if early.should_stop:
            log.info("early stopping at step %d (best %s at step %s)", state.step, monitor, early.best_at)
        return early.should_stop
