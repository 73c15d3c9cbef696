"""Prompts in, continuations out: the text interface of a trained model (`picollm generate`, the pyfunc,
`mlflow models serve`). The tokenizers themselves are picollm/data/tokenizers.py."""

from __future__ import annotations

import torch

from picollm.data.splits import pad_sequences
from picollm.data.tokenizers import Codec
from picollm.errors import PicollmError
from picollm.model.transformer import Transformer


def continue_prompts(
    model: Transformer,
    prompts: list[str],
    max_new_tokens: int = 8,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    codec: Codec | None = None,
) -> list[str]:
    """Prompts -> their continuations (in the same format), batched. Integer prompts unless `codec`."""
    if max_new_tokens < 1:
        raise PicollmError("max_new_tokens must be at least 1")
    vocab = model.cfg.vocab_size
    assert vocab is not None
    codec = codec or Codec("integers", vocab)
    ids = [codec.encode(p) for p in prompts]
    if not ids:
        return []
    longest = max(len(i) for i in ids) + max_new_tokens
    if model.cfg.pos_encoding == "learned" and longest > model.cfg.max_seq_len:
        raise PicollmError(
            f"prompt plus {max_new_tokens} new tokens ({longest}) exceeds the model's "
            f"max_seq_len ({model.cfg.max_seq_len})"
        )
    tokens = pad_sequences(ids, model.pad_id, side="left").to(model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = model.generate(tokens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    return [codec.decode(row[tokens.shape[1] :].tolist()) for row in out]
