"""The generation fast path (picollm.decoding) equals the general cached loop and the full forward."""

from __future__ import annotations

import pytest
import torch

from picollm import decoding
from picollm.data import pad_sequences
from picollm.errors import PicollmError
from tests.test_model import ATTENTIONS, PAD, POS, VOCAB, greedy_reference, make_model, rand_tokens

TOL = {"atol": 1e-5, "rtol": 1e-5}


def step_logits_reference(model, tokens: torch.Tensor, fed: torch.Tensor) -> list[torch.Tensor]:
    """Last-position logits of the full forward (no cache) after the prompt and each fed token."""
    out, seq = [], tokens
    with torch.no_grad():
        out.append(model(seq)[:, -1])
        for col in fed.T:
            seq = torch.cat([seq, col[:, None]], dim=1)
            out.append(model(seq)[:, -1])
    return out


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_path_tokens_equal_cached_loop_and_full_forward(attention, pos, batch):
    model = make_model(attention, pos=pos, chunk=4)
    prompt = rand_tokens(batch, 6, seed=11)  # longer than a chunk: prefill goes through the chunkwise form
    fast = decoding.generate(model, prompt, 12)
    assert torch.equal(fast, decoding.generate_cached(model, prompt, 12))
    assert torch.equal(fast, greedy_reference(model, prompt, 12))


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_fast_path_logits_match_full_forward_with_left_padding(attention, pos):
    model = make_model(attention, pos=pos, chunk=4)
    prompts = [rand_tokens(3, seed=12), rand_tokens(7, seed=13), rand_tokens(5, seed=14)]
    tokens = pad_sequences(prompts, PAD, side="left")
    fed = torch.randint(0, VOCAB - 1, (3, 9), generator=torch.Generator().manual_seed(3))
    dec = decoding.Decoder(model, 3, tokens.shape[1] + fed.shape[1])
    with torch.no_grad():
        got = [dec.prefill(tokens, tokens != PAD)] + [dec.step(col) for col in fed.T]
    for g, want in zip(got, step_logits_reference(model, tokens, fed), strict=True):
        torch.testing.assert_close(g, want, **TOL)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padded_batch_on_fast_path_generates_like_single_prompts(attention):
    model = make_model(attention, pos="alibi", chunk=4)
    prompts = [rand_tokens(2, seed=15), rand_tokens(8, seed=16), rand_tokens(5, seed=17)]
    batch = decoding.generate(model, pad_sequences(prompts, PAD, side="left"), 7)
    assert torch.equal(batch, decoding.generate_cached(model, pad_sequences(prompts, PAD, side="left"), 7))
    for row, p in zip(batch, prompts, strict=True):
        assert torch.equal(row[-7:], decoding.generate(model, p[None], 7)[0, -7:])


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_sampling_on_fast_path_equals_cached_loop(attention):
    model = make_model(attention)
    prompt = rand_tokens(2, 4, seed=18)
    kw = {"temperature": 1.1, "top_k": 8, "top_p": 0.9}
    fast = decoding.generate(model, prompt, 10, generator=torch.Generator().manual_seed(4), **kw)
    slow = decoding.generate_cached(model, prompt, 10, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(fast, slow)


def test_model_generate_uses_the_fast_path_and_hooks_fall_back():
    model = make_model("softmax")
    prompt = rand_tokens(1, 5, seed=19)
    seen: list[int] = []
    with model.hooks([("blocks.0.attn.hook_q", lambda x, hook: seen.append(x.shape[1]))]):
        out = model.generate(prompt, 4)  # a hook needs the modules' forward: the cached loop runs
    assert seen == [5, 1, 1, 1]
    assert torch.equal(out, decoding.generate(model, prompt, 4))


def test_fast_path_keeps_the_learned_table_bound_and_zero_tokens():
    model = make_model("linear", pos="learned")
    prompt = rand_tokens(1, 60, seed=20)
    assert torch.equal(decoding.generate(model, prompt, 0), prompt)
    assert decoding.generate(model, prompt, 5).shape == (1, 65)  # positions 0..63 fed: within the table
    with pytest.raises(PicollmError, match="max_seq_len"):
        decoding.generate(model, prompt, 6)
    with pytest.raises(PicollmError, match="max_seq_len"):
        decoding.generate_cached(model, prompt, 6)


def test_ms_per_token_times_both_paths():
    model = make_model("linear")
    for fast in (True, False):
        assert decoding.ms_per_token(model, 8, 3, fast=fast, warmup=1) > 0
