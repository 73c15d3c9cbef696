"""Direct Preference Optimization (Rafailov et al. 2023) for picollm Transformers.

The loss and metric names follow TRL's DPOTrainer. Reference log-probs are computed once for every
pair (the reference is frozen), so a step costs one policy forward/backward over the chosen and
rejected sequences concatenated into one batch.
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

from picollm import optim
from picollm.config import DPOConfig
from picollm.data import IGNORE_INDEX, PaddedSplit, inputs_and_targets, length_bucketed_batches, pad_sequences
from picollm.errors import PicollmError
from picollm.optim import EarlyStopping, NonFiniteGuard, TrainState
from picollm.text_data import PreferencePair
from picollm.training import autocast, resolve_precision

log = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
MONITOR_MODE = {"val/loss": "min", "val/accuracy": "max", "val/rewards/accuracies": "max", "val/rewards/margins": "max"}


# --------------------------------------------------------------------------------------------------
# Loss


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (losses, chosen_rewards, rejected_rewards), TRL's formulas.

    logits = (pc - pr) - (rc - rr);  sigmoid: -logsigmoid(b*logits)(1-ls) - logsigmoid(-b*logits) ls,
    hinge: relu(1 - b*logits),  ipo: (logits - 1/(2b))^2.  Rewards are b * (policy - reference)
    log-probs, detached. With `chosen_lengths`/`rejected_lengths` every log-prob is first divided by
    its response length (length normalisation, TRL's `sigmoid_norm` for the sigmoid loss).
    """
    if chosen_lengths is not None or rejected_lengths is not None:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("length normalisation needs both chosen_lengths and rejected_lengths")
        cl, rl = chosen_lengths.to(policy_chosen_logps.dtype), rejected_lengths.to(policy_rejected_logps.dtype)
        policy_chosen_logps, reference_chosen_logps = policy_chosen_logps / cl, reference_chosen_logps / cl
        policy_rejected_logps, reference_rejected_logps = policy_rejected_logps / rl, reference_rejected_logps / rl
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise PicollmError(f"unknown DPO loss_type {loss_type!r} (choose from {', '.join(LOSS_TYPES)})")
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# --------------------------------------------------------------------------------------------------
# Log-probs


def sequence_logps(logits: torch.Tensor, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token_t | tokens_<t) over response tokens only, in fp32.

    logits (B, W, V) from `tokens` (B, W); response_mask (B, W) True on response tokens. The logit at
    position t scores token t+1, so targets are the tokens shifted by one; prompt and padding targets
    are ignored (they contribute 0).
    """
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[:, :-1] = tokens[:, 1:].masked_fill(~response_mask[:, 1:], IGNORE_INDEX)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(tokens.shape).sum(-1)


@dataclass
class PairBatch:
    """B pairs as one batch of 2B sequences: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected."""

    tokens: torch.Tensor  # (2B, W) right-padded
    response_mask: torch.Tensor  # (2B, W)
    lengths: torch.Tensor  # (2B,) response lengths
    schemes: list[str]

    @property
    def n_pairs(self) -> int:
        return len(self.schemes)

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.tokens.to(device), self.response_mask.to(device), self.lengths.to(device), self.schemes)


def collate(pairs: list[PreferencePair], pad_id: int) -> PairBatch:
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    tokens = pad_sequences(seqs, pad_id)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    lengths = []
    for i, p in enumerate(pairs + pairs):
        n = len(p.chosen) if i < len(pairs) else len(p.rejected)
        mask[i, len(p.prompt) : len(p.prompt) + n] = True
        lengths.append(n)
    return PairBatch(tokens, mask, torch.tensor(lengths), [p.scheme for p in pairs])


def response_logps(model: nn.Module, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """`sequence_logps(model(tokens), tokens, response_mask)` without computing the logits it ignores.

    With a 50k vocabulary the output head dominates the cost, so a pre-hook hands the head only the
    positions that score a response token (no prompt, no padding); the forward pass itself is the
    model's own. Models without a Linear `head` fall back to the full logits.
    """
    scores = torch.zeros_like(response_mask)
    scores[:, :-1] = response_mask[:, 1:]  # position t scores token t+1
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        return sequence_logps(model(tokens), tokens, response_mask)
    handle = head.register_forward_pre_hook(lambda _mod, args: (args[0][scores],))
    try:
        logits = model(tokens)  # (n_scored, V)
    finally:
        handle.remove()
    targets = tokens[:, 1:][response_mask[:, 1:]]
    logp = -F.cross_entropy(logits.float(), targets, reduction="none")
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(scores)[scores]
    return torch.zeros(tokens.shape[0], device=tokens.device).index_add_(0, rows, logp)


def batch_logps(model: nn.Module, batch: PairBatch, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs from ONE forward pass over the concatenated batch (matmuls in bf16
    under `precision="bf16"`; the log-softmax and the per-sequence sums always in fp32)."""
    with autocast(batch.tokens.device, precision):
        logps = response_logps(model, batch.tokens, batch.response_mask)
    return logps[: batch.n_pairs], logps[batch.n_pairs :]


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
    reference: nn.Module, pairs: PairSet, batch_size: int, device: torch.device, precision: str = "fp32"
) -> None:
    """Fill pairs.ref_chosen/ref_rejected with the reference's log-probs (eval mode: no dropout)."""
    was_training = reference.training
    reference.eval()
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for idx in pairs.batches(batch_size):
        c, r = batch_logps(reference, pairs.batch(idx).to(device), precision)
        chosen[idx], rejected[idx] = c.cpu(), r.cpu()
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
        inputs, targets = inputs_and_targets(split.subset(idx).tokens.to(device), split.pad_id)
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
# Metrics


def pair_metrics(
    prefix: str,
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    schemes: list[str] | None = None,
) -> dict[str, float]:
    """TRL's names under `prefix/`, plus the policy's and the reference's own ranking accuracy
    (how often each gives the chosen continuation the higher log-prob), overall and per scheme."""

    def block(sel: torch.Tensor, sfx: str) -> dict[str, float]:
        out = {
            f"{prefix}/loss{sfx}": float(losses[sel].mean()),
            f"{prefix}/rewards/chosen{sfx}": float(chosen_rewards[sel].mean()),
            f"{prefix}/rewards/rejected{sfx}": float(rejected_rewards[sel].mean()),
            f"{prefix}/rewards/margins{sfx}": float((chosen_rewards[sel] - rejected_rewards[sel]).mean()),
            f"{prefix}/rewards/accuracies{sfx}": float((chosen_rewards[sel] > rejected_rewards[sel]).float().mean()),
            f"{prefix}/logps/chosen{sfx}": float(policy_chosen[sel].mean()),
            f"{prefix}/logps/rejected{sfx}": float(policy_rejected[sel].mean()),
            f"{prefix}/accuracy{sfx}": float((policy_chosen[sel] > policy_rejected[sel]).float().mean()),
        }
        if ref_chosen is not None and ref_rejected is not None:
            out[f"{prefix}/reference_accuracy{sfx}"] = float((ref_chosen[sel] > ref_rejected[sel]).float().mean())
        return out

    metrics = block(torch.ones(len(losses), dtype=torch.bool), "")
    for scheme in sorted(set(schemes or [])) if schemes and len(set(schemes)) > 1 else []:
        metrics |= block(torch.tensor([s == scheme for s in schemes]), f"/{scheme}")
    if schemes and len(set(schemes)) == 1:  # one scheme: name it too, so runs compare by key
        metrics |= {f"{k}/{schemes[0]}": v for k, v in list(metrics.items())}
    return metrics


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

    def _terms(self, batch: PairBatch, ref_c: torch.Tensor, ref_r: torch.Tensor):
        """(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, ref_c, ref_r)
        with log-probs length-normalised when configured, so metrics match the loss."""
        pc, pr = batch_logps(self.policy, batch, self.precision)
        ref_c, ref_r = ref_c.to(self.device), ref_r.to(self.device)
        if self.cfg.length_normalize:
            lc, lr = batch.lengths[: batch.n_pairs].float(), batch.lengths[batch.n_pairs :].float()
            pc, pr, ref_c, ref_r = pc / lc, pr / lr, ref_c / lc, ref_r / lr
        losses, cr, rr = dpo_loss(pc, pr, ref_c, ref_r, self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing)
        return losses, cr, rr, pc, pr, ref_c, ref_r

    @torch.no_grad()
    def evaluate(self, pairs: PairSet, prefix: str) -> dict[str, float]:
        assert pairs.ref_chosen is not None and pairs.ref_rejected is not None
        was_training = self.policy.training
        self.policy.eval()
        parts: list[tuple[torch.Tensor, ...]] = []
        schemes: list[str] = []
        for idx in pairs.batches(self.cfg.eval_batch_size):
            batch = pairs.batch(idx).to(self.device)
            parts.append(tuple(t.cpu() for t in self._terms(batch, pairs.ref_chosen[idx], pairs.ref_rejected[idx])))
            schemes += batch.schemes
        self.policy.train(was_training)
        cols = [torch.cat(c) for c in zip(*parts, strict=True)]
        return pair_metrics(prefix, *cols, schemes=schemes)

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
            optim.update(loss, self.policy, self.optimizer, self.scheduler, cfg.grad_clip)
            window.append(pair_metrics("train", *(t.detach().cpu() for t in terms)))
            if state.step % cfg.log_every == 0 or last:
                avg = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                avg["lr"] = self.scheduler.get_last_lr()[0]
                on_log(state.step, avg)
                window.clear()
            if (state.step % cfg.eval_every == 0 or last) and self._eval_step(val, state, on_eval):
                return True
            if last:
                break
        return False

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
