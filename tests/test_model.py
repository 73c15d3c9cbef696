"""Transformer: linear vs softmax attention, hooks, causality, padding, generation."""

from __future__ import annotations

import pytest
import torch

from picollm.config import ModelConfig
from picollm.data.splits import pad_sequences
from picollm.errors import PicollmError
from picollm.model.mixers.base import LayerCache
from picollm.model.transformer import Transformer

VOCAB = 32
PAD = VOCAB - 1
ATTENTIONS = ["softmax", "linear"]
POS = ["alibi", "none", "sinusoidal", "learned"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_model(attention="linear", pos="alibi", chunk=4, seed=0, **kw) -> Transformer:
    """A small model with weights large enough that every token visibly moves the logits."""
    cfg = ModelConfig(
        attention=attention,
        pos_encoding=pos,
        d_model=16,
        n_heads=2,
        n_layers=2,
        vocab_size=VOCAB,
        linear_chunk_size=chunk,
        max_seq_len=64,
        **kw,
    )
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.4)
    return model.eval()


def rand_tokens(*shape, seed=0) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Linear attention inside the model


def test_linear_pattern_times_v_is_z():
    model = make_model("linear", chunk=4)
    tokens = rand_tokens(3, 13)
    names = ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_v", "blocks.0.attn.hook_z"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    pattern, v, z = (cache[n] for n in names)
    assert pattern.shape == (3, 2, 13, 13)  # (batch, head, query, key)
    assert v.shape == z.shape == (3, 13, 2, 8)  # (batch, pos, head, d_head)
    torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", pattern, v), z, **TOL)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cached_run_gives_the_plain_logits(attention):
    """The pattern path (hooks active) computes the same thing as the fast path (chunkwise / SDPA)."""
    model = make_model(attention, chunk=4)
    tokens = rand_tokens(2, 13)
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, model(tokens), **TOL)
    assert "blocks.1.attn.hook_pattern" in cache and "ln_final.hook_normalized" in cache


def test_softmax_pattern_is_a_causal_distribution():
    model = make_model("softmax")
    _, cache = model.run_with_cache(rand_tokens(2, 9), names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 2, 9))
    assert torch.all(pattern.triu(1) == 0)


@pytest.mark.parametrize("pos", POS)
def test_small_chunks_give_the_quadratic_logits(pos):
    small = make_model("linear", pos=pos, chunk=4)
    big = make_model("linear", pos=pos, chunk=64)
    big.load_state_dict(small.state_dict())
    tokens = pad_sequences([rand_tokens(13, seed=1), rand_tokens(10, seed=2)], PAD)
    torch.testing.assert_close(small(tokens), big(tokens), **TOL)


# --------------------------------------------------------------------------------------------------
# Causality and padding


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causality(attention, pos):
    model = make_model(attention, pos=pos, chunk=4)
    tokens = rand_tokens(2, 15)
    t = 6  # not a multiple of the chunk size
    changed = tokens.clone()
    changed[:, t:] = (changed[:, t:] + 7) % (VOCAB - 1)
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-2  # the change is visible where it may be


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_pad_invariance(attention, pos):
    model = make_model(attention, pos=pos, chunk=4)
    seq, longer = rand_tokens(7, seed=3), rand_tokens(12, seed=4)
    alone = model(seq[None])[0]
    right = model(pad_sequences([seq, longer], PAD, side="right"))
    left = model(pad_sequences([seq, longer], PAD, side="left"))
    torch.testing.assert_close(right[0, :7], alone, **TOL)
    torch.testing.assert_close(left[0, 5:], alone, **TOL)
    torch.testing.assert_close(left[1], model(longer[None])[0], **TOL)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_masked_key_contributes_nothing(attention):
    model = make_model(attention, chunk=4)
    tokens = rand_tokens(1, 12)
    j = 5
    key_mask = torch.ones_like(tokens, dtype=torch.bool)
    key_mask[0, j] = False
    changed = tokens.clone()
    changed[0, j] = (tokens[0, j] + 11) % (VOCAB - 1)
    others = [i for i in range(12) if i != j]
    a, b = model(tokens, key_mask=key_mask), model(changed, key_mask=key_mask)
    torch.testing.assert_close(a[0, others], b[0, others], atol=1e-6, rtol=1e-6)
    assert (model(tokens)[0, j + 1 :] - model(changed)[0, j + 1 :]).abs().max() > 1e-2  # unmasked: it matters
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern", key_mask=key_mask)
    pattern = cache["blocks.0.attn.hook_pattern"][0]
    assert torch.all(pattern[:, others, j] == 0)


def test_linear_pad_token_features_are_masked():
    """phi(0) = 1, so masking k instead of phi(k) would still give pads weight: the pattern shows it."""
    model = make_model("linear")
    tokens = pad_sequences([rand_tokens(4), rand_tokens(9, seed=1)], PAD, side="left")
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    pattern = cache["blocks.1.attn.hook_pattern"][0]  # first row: 5 pads, then 4 tokens
    assert torch.all(pattern[:, :, :5] == 0)
    torch.testing.assert_close(pattern[:, 5:].sum(-1), torch.ones(2, 4), atol=1e-4, rtol=0)


def test_learned_positions_beyond_the_table_are_an_error():
    model = make_model("softmax", pos="learned")
    with pytest.raises(PicollmError, match="max_seq_len"):
        model(rand_tokens(1, 70))


# --------------------------------------------------------------------------------------------------
# Generation


def greedy_reference(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """No cache: run the whole sequence again for every new token; argmax with padding excluded."""
    out = prompt
    with torch.no_grad():
        for _ in range(n):
            logits = model(out)[:, -1].clone()
            logits[:, PAD] = float("-inf")
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_greedy_generate_matches_full_forward(attention, pos):
    model = make_model(attention, pos=pos, chunk=4)
    prompt = rand_tokens(2, 6, seed=5)  # longer than a chunk: prefill goes through the chunkwise form
    out = model.generate(prompt, 10)
    assert out.shape == (2, 16)
    assert torch.equal(out[:, :6], prompt)
    assert torch.equal(out, greedy_reference(model, prompt, 10))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_left_padded_batch_generates_like_single_prompts(attention):
    model = make_model(attention, pos="sinusoidal", chunk=4)
    prompts = [rand_tokens(3, seed=6), rand_tokens(7, seed=7)]
    batch = model.generate(pad_sequences(prompts, PAD, side="left"), 6)
    for row, p in zip(batch, prompts, strict=True):
        assert torch.equal(row[-6:], model.generate(p[None], 6)[0, -6:])


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_top_k_1_sampling_is_greedy(attention):
    model = make_model(attention)
    prompt = rand_tokens(3, 5, seed=8)
    greedy = model.generate(prompt, 8)
    sampled = model.generate(prompt, 8, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_pad_is_never_generated(attention):
    model = make_model(attention)
    bonus = torch.zeros(VOCAB)
    bonus[PAD] = 50.0
    model.head.register_forward_hook(lambda mod, inp, out: out + bonus)
    prompt = rand_tokens(4, 5, seed=9)
    assert torch.all(model(prompt).argmax(-1) == PAD)  # the pad is by far the favourite ...
    for kwargs in ({}, {"temperature": 1.0}, {"temperature": 1.0, "top_p": 0.9}, {"temperature": 2.0, "top_k": 3}):
        out = model.generate(prompt, 12, generator=torch.Generator().manual_seed(0), **kwargs)
        assert not torch.any(out[:, 5:] == PAD), kwargs  # ... and never emitted


def test_sampling_is_seeded():
    model = make_model("softmax")
    prompt = rand_tokens(2, 4)
    draw = lambda s: model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(s))
    assert torch.equal(draw(3), draw(3))


def test_generate_restores_training_mode_and_rejects_empty_prompts():
    model = make_model("linear").train()
    model.generate(rand_tokens(1, 3), 2)
    assert model.training
    with pytest.raises(PicollmError):
        model.generate(torch.full((1, 3), PAD), 2)


def test_tied_embeddings_and_hook_names():
    model = make_model("linear", tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    assert make_model("linear").head.weight is not make_model("linear").embed.weight  # untied by default
    names = set(model.hook_points())
    for n in (
        "hook_embed",
        "blocks.0.attn.hook_pattern",
        "blocks.1.attn.hook_z",
        "blocks.1.mlp.hook_post",
        "blocks.0.hook_resid_post",
        "ln_final.hook_normalized",
    ):
        assert n in names
    with pytest.raises(KeyError):
        model.run_with_hooks(rand_tokens(1, 3), [("blocks.9.attn.hook_z", lambda x, h: None)])


def test_hook_can_replace_an_activation():
    model = make_model("softmax")
    tokens = rand_tokens(1, 6)
    zero = lambda x, hook: torch.zeros_like(x)
    ablated = model.run_with_hooks(
        tokens, [(lambda n: n.endswith("hook_attn_out") or n.endswith("hook_mlp_out"), zero)]
    )
    # with every block's output zeroed, the residual stream is the embedding alone
    expected = model.head(model.ln_final(model.embed(tokens)))
    torch.testing.assert_close(ablated, expected, **TOL)
    assert not torch.allclose(model(tokens), expected)
    assert all(not p._fns for p in model.hook_points().values())  # hooks removed afterwards


def test_linear_cache_is_constant_size():
    model = make_model("linear")
    caches = [LayerCache() for _ in model.blocks]
    with torch.no_grad():
        model(rand_tokens(1, 20), caches=caches)
    assert caches[0].state.shape == (1, 2, 8, 8) and caches[0].z.shape == (1, 2, 8)
    assert caches[0].k is None and caches[0].v is None


def test_act_name_builds_every_hook_point_name_and_nothing_else():
    from picollm.model.hooks import act_name

    model = make_model("linear")
    per_layer = ("q", "k", "v", "pattern", "z", "pre", "post", "resid_pre", "resid_mid", "resid_post")
    built = {act_name(n) for n in ("embed", "pos_embed", "normalized")}
    built |= {act_name(n, layer) for n in (*per_layer, "attn_out", "mlp_out") for layer in range(model.cfg.n_layers)}
    assert built == set(model.hook_points())  # one owner of the names: it names all of them, and only those
    assert act_name("pattern", 0) == "blocks.0.attn.hook_pattern" and act_name("post", 1) == "blocks.1.mlp.hook_post"
    assert act_name("blocks.1.attn.hook_z") == "blocks.1.attn.hook_z"  # a full name passes through
    for bad in (("nope", 0), ("z", None), ("embed", 0)):
        with pytest.raises(ValueError):
            act_name(*bad)
