"""Prompts in, continuations out: the text interface of a trained model (`picollm generate`, the pyfunc,
`mlflow models serve`). The tokenizers themselves are picollm/data/tokenizers.py; the limits on what a
request may ask for are picollm/tracking/limits.py."""

from __future__ import annotations

import time

import torch

from picollm.data.splits import pad_sequences
from picollm.data.tokenizers import Codec
from picollm.errors import PicollmError, TimeBudgetExceeded
from picollm.model import decoding
from picollm.model.sampling import Sampling
from picollm.model.transformer import Transformer
from picollm.tracking.limits import ENV_MAX_PROMPT_TOKENS, ENV_TIME_BUDGET_S, check_sampling

# A prompt string longer than this many characters per allowed token is refused before it is tokenised:
# tokenising a 30 MB prompt only to count it would itself take seconds.
MAX_CHARS_PER_TOKEN = 64


def continue_prompts(
    model: Transformer,
    prompts: list[str],
    max_new_tokens: int = 8,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    codec: Codec | None = None,
    *,
    max_prompt_tokens: int | None = None,
    time_budget_s: float | None = None,
) -> list[str]:
    """Prompts -> their continuations (in the same format), batched. Integer prompts unless `codec`.

    Every setting is checked first (`limits.check_sampling`: PicollmError naming it). `max_prompt_tokens`
    bounds each prompt of a model without a learned table (a `learned` model's bound is its table:
    prompt plus new tokens <= max_seq_len); `time_budget_s` bounds the generation's wall time
    (TimeBudgetExceeded when it is spent: nothing is returned, and the caller's thread is free again)."""
    max_new_tokens, temperature, top_k, top_p, seed = check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    start = time.monotonic()
    vocab = model.cfg.vocab_size
    assert vocab is not None
    learned = model.cfg.pos_encoding == "learned"
    codec = codec or Codec("integers", vocab)
    if max_prompt_tokens is not None:
        limit = model.cfg.max_seq_len if learned else max_prompt_tokens
        for i, p in enumerate(prompts):
            if isinstance(p, str) and len(p) > limit * MAX_CHARS_PER_TOKEN:
                raise PicollmError(
                    f"prompt {i + 1} has {len(p):,} characters, more than a prompt of at most {limit} tokens "
                    f"can have{_where(learned)}"
                )
    ids = [codec.encode(p) for p in prompts]
    if not ids:
        return []
    if max_prompt_tokens is not None and not learned:
        for i, one in enumerate(ids):
            if len(one) > max_prompt_tokens:
                raise PicollmError(
                    f"prompt {i + 1} has {len(one)} tokens; the served model takes at most {max_prompt_tokens} "
                    f"({ENV_MAX_PROMPT_TOKENS})"
                )
    longest = max(len(i) for i in ids) + max_new_tokens
    if learned and longest > model.cfg.max_seq_len:
        raise PicollmError(
            f"prompt plus {max_new_tokens} new tokens ({longest}) exceeds the model's "
            f"max_seq_len ({model.cfg.max_seq_len})"
        )
    tokens = pad_sequences(ids, model.pad_id, side="left").to(model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    sampling = Sampling(temperature, top_k, top_p, gen)
    if time_budget_s is None:
        out = model.generate(tokens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    else:
        out = generate_within(model, tokens, max_new_tokens, sampling, start + time_budget_s, time_budget_s)
    return [codec.decode(row[tokens.shape[1] :].tolist()) for row in out]


def _where(learned: bool) -> str:
    return " (the model's max_seq_len)" if learned else f" ({ENV_MAX_PROMPT_TOKENS})"


def generate_within(
    model: Transformer,
    tokens: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    deadline: float,
    budget_s: float,
) -> torch.Tensor:
    """`model.generate(tokens, max_new_tokens, ...)` (the same tokens: its fast path) that stops with
    TimeBudgetExceeded once `time.monotonic()` passes `deadline`, checked after the prompt and before every new
    token. With a hook active it is the model's own loop, unbounded (hooks are for analysis)."""
    b = tokens.shape[0]

    def check(i: int) -> None:
        if time.monotonic() > deadline:
            raise TimeBudgetExceeded(
                f"generation stopped at the time budget of {budget_s:g} s ({ENV_TIME_BUDGET_S}) after {i} "
                f"of {max_new_tokens} new tokens for {b} prompt(s); ask for fewer tokens or prompts"
            )

    if decoding.hooks_active(model):
        return decoding.generate(model, tokens, max_new_tokens, sampling)
    return decoding.generate(model, tokens, max_new_tokens, sampling, before_token=check)
