"""The generation fast path (picollm.decoding) equals the general cached loop and the full forward."""

from __future__ import annotations

import pytest
import torch

from picollm.data.splits import pad_sequences
from picollm.errors import PicollmError
from picollm.model import decoding
from picollm.model.sampling import Sampling
from tests.test_model import ATTENTIONS, PAD, POS, VOCAB, greedy_reference, make_model, rand_tokens

TOL = {"atol": 1e-5, "rtol": 1e-5}
# Each branch of the fast step: KV cache with and without a bias, the window's key range, the kernel state
# with z as an extra column (fixed decay or none, gated) or an RMSNorm, and the delta rule (gated or not).
MIXERS = {
    "softmax": {"attention": "softmax"},
    "sliding_window": {"attention": "sliding_window", "window": 3},
    "linear": {"attention": "linear"},
    "linear-rmsnorm-taylor": {"attention": "linear", "normalizer": "rmsnorm", "feature_map": "taylor"},
    "gated_linear": {"attention": "gated_linear"},
    "deltanet": {"attention": "deltanet"},
    "gated_deltanet": {"attention": "gated_deltanet"},
}


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
@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_fast_path_logits_match_full_forward(mixer, pos, padded):
    """Step by step against the full forward; padded: left-padded rows, per-row positions and pad bias."""
    model = make_model(pos=pos, chunk=4, **MIXERS[mixer])
    lengths = [3, 7, 5] if padded else [7, 7]
    tokens = pad_sequences([rand_tokens(n, seed=12 + i) for i, n in enumerate(lengths)], PAD, side="left")
    fed = torch.randint(0, VOCAB - 1, (len(lengths), 9), generator=torch.Generator().manual_seed(3))
    dec = decoding.Decoder(model, len(lengths), tokens.shape[1] + fed.shape[1])
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
    fast = decoding.generate(model, prompt, 10, Sampling(**kw, generator=torch.Generator().manual_seed(4)))
    slow = decoding.generate_cached(model, prompt, 10, Sampling(**kw, generator=torch.Generator().manual_seed(4)))
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


def test_step_refuses_past_the_learned_table_and_restores_onednn():
    """The step switches oneDNN off for itself only, on every way out."""
    model = make_model("softmax", pos="learned")
    dec = decoding.Decoder(model, 1, 70)
    with pytest.raises(PicollmError, match="before prefill"):
        dec.step(rand_tokens(1, seed=21))
    dec.prefill(rand_tokens(1, 60, seed=21), torch.ones(1, 60, dtype=torch.bool))
    before = torch.backends.mkldnn.enabled
    for _ in range(4):  # positions 60..63: the last rows of the table
        dec.step(rand_tokens(1, seed=22))
    with pytest.raises(PicollmError, match="max_seq_len"):
        dec.step(rand_tokens(1, seed=23))
    assert torch.backends.mkldnn.enabled == before


def test_greedy_output_is_an_ordinary_tensor():
    """The decoder's logits are inference tensors; what generate returns must not be one, and a pad token
    never comes out even where it is the best logit."""
    model = make_model("linear")
    with torch.no_grad():
        model.ln_final.weight[0], model.ln_final.bias[0] = 0.0, 1.0  # feature 0 of the final norm is 1
        model.head.weight[PAD] = 0.0
        model.head.weight[PAD, 0] = 1e3  # so the pad logit is the best everywhere
    prompt = rand_tokens(4, 4, seed=24)
    out = decoding.generate(model, prompt, 6)
    assert not out.is_inference() and not (out[:, 4:] == PAD).any()
    assert torch.equal(out, decoding.generate_cached(model, prompt, 6))
    out[0, 0] = 1  # in-place use outside inference mode works
