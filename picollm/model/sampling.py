"""Choosing the next token from logits: greedy, temperature, top-k and top-p (never the pad token)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token: temperature 0 is greedy; otherwise sample, optionally restricted by top-k
    and/or top-p, from `generator` (seeded by the caller for reproducible draws)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def next(self, logits: torch.Tensor, pad_id: int) -> torch.Tensor:
        """(B, V) logits -> (B,) tokens, never pad_id."""
        return sample_next(logits, pad_id, self)


def sample_next(logits: torch.Tensor, pad_id: int, s: Sampling) -> torch.Tensor:
    temperature, top_k, top_p, generator = s.temperature, s.top_k, s.top_p, s.generator
    logits = logits.float().clone()
    logits[:, pad_id] = float("-inf")  # never emit padding
    if temperature <= 0:
        return logits.argmax(-1)
    # Shifted so the best logit is 0 before dividing: a tiny temperature (1e-45) then gives 0 and -inf
    # (greedy in effect) instead of inf - inf = NaN; clamped to float32's range (1e300 would be inf, and
    # -inf / inf is NaN).
    logits = (logits - logits.amax(-1, keepdim=True)) / min(max(temperature, 1e-30), 1e30)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # and never less than the best token (top_p 0 would leave nothing to sample)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def greedy_next(logits: torch.Tensor, pad_bias: torch.Tensor) -> torch.Tensor:
    """`sample_next` at temperature 0 in two ops: pad_bias (V,) is -inf on padding and 0 elsewhere (fp32, so
    the sum is the fp32 logits with padding excluded, as sample_next's copy)."""
    return (logits + pad_bias).argmax(-1)
