"""The preference losses and the log-probs they read (Rafailov et al. 2023's DPO and its variants: IPO,
hinge, SimPO, the RPO NLL term), with TRL's names. A pair's sequences are scored in one batch: chosen and
rejected continuations concatenated, each log-prob summed (or averaged) over its response tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from picollm.data.splits import IGNORE_INDEX, pad_sequences
from picollm.dpo.pairs import PreferencePair
from picollm.errors import PicollmError
from picollm.training.trainer import autocast

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


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


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024), TRL's CPOTrainer `loss_type="simpo"`: reference-free, on length-averaged
    log-probs a = logp / length:  logits = (a_c - a_r) - gamma/beta,
    loss = -logsigmoid(b*logits)(1-ls) - logsigmoid(-b*logits) ls;  rewards b * a, detached."""
    avg_c = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
    avg_r = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype)
    logits = (avg_c - avg_r) - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * avg_c.detach(), beta * avg_r.detach()


def rpo_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's extra term (Pang et al. 2024; TRL's `rpo_alpha`): the chosen continuation's NLL per token, per
    pair (TRL averages over the batch's chosen tokens: the same when lengths are equal)."""
    return -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)


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
    """`sequence_logps(model(tokens), tokens, response_mask)` without computing the logits it ignores."""
    return response_logps_and_logits(model, tokens, response_mask)[0]


def response_logps_and_logits(
    model: nn.Module, tokens: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) response log-prob sums and (B,) mean output logit over the scoring positions (TRL's
    `logits/chosen`: all vocabulary entries averaged), without computing the logits the sums ignore.

    The output head dominates a small model's cost, so a pre-hook hands the head only the positions
    that score a response token (no prompt, no padding); the forward pass itself is the model's own.
    Models without a Linear `head` fall back to the full logits.
    """
    scores = torch.zeros_like(response_mask)
    scores[:, :-1] = response_mask[:, 1:]  # position t scores token t+1
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        logits = model(tokens)  # (B, W, V)
        n = scores.sum(-1).clamp(min=1)
        mean_logits = (logits.float().mean(-1) * scores).sum(-1).detach() / n
        return sequence_logps(logits, tokens, response_mask), mean_logits
    handle = head.register_forward_pre_hook(lambda _mod, args: (args[0][scores],))
    try:
        logits = model(tokens)  # (n_scored, V)
    finally:
        handle.remove()
    targets = tokens[:, 1:][response_mask[:, 1:]]
    logp = -F.cross_entropy(logits.float(), targets, reduction="none")
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(scores)[scores]
    zeros = torch.zeros(tokens.shape[0], device=tokens.device)
    logit_sums = zeros.index_add(0, rows, logits.detach().float().mean(-1))
    return zeros.index_add(0, rows, logp), logit_sums / scores.sum(-1).clamp(min=1)


def batch_logps(model: nn.Module, batch: PairBatch, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs from ONE forward pass over the concatenated batch (matmuls in bf16
    under `precision="bf16"`; the log-softmax and the per-sequence sums always in fp32)."""
    with autocast(batch.tokens.device, precision):
        logps = response_logps(model, batch.tokens, batch.response_mask)
    return logps[: batch.n_pairs], logps[batch.n_pairs :]


def batch_logps_and_logits(
    model: nn.Module, batch: PairBatch, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`batch_logps` plus the mean response logits: (chosen logps, rejected logps, chosen logits, rejected logits)."""
    with autocast(batch.tokens.device, precision):
        logps, logits = response_logps_and_logits(model, batch.tokens, batch.response_mask)
    n = batch.n_pairs
    return logps[:n], logps[n:], logits[:n], logits[n:]
