"""The contract every registered mixer meets (picollm/model/mixers/base.py), run for each name of the registry
and each option variant below: a new mixer gets all of it by being registered.

- every form of `mix` equals the recurrent reference on outputs, the final state and the gradients (of the
  input and of every parameter), from an empty state and continuing a prefilled one;
- the fused decode step equals the forward pass, token by token, and generation equals greedy recomputation;
- causal; left padding and masked keys change nothing; hook_pattern @ v is hook_z; the state it keeps has
  the size `state_floats` says; weights round-trip through files; the analyses run on it;
- options it does not read are a config error.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from picollm.config import ModelConfig
from picollm.data.splits import pad_sequences
from picollm.interp import analysis, patching
from picollm.interp import head_detector as hd
from picollm.interp.prompts import PromptPairs
from picollm.model import decoding, mixers
from picollm.model.config import MIXER_OPTIONS
from picollm.model.mixers.base import LayerCache, Mixer, gate_bias
from picollm.model.positions import alibi_slopes
from picollm.model.transformer import Transformer
from picollm.tracking.registry import load_from_files
from tests.test_model import PAD, VOCAB, greedy_reference, rand_tokens

TOL = {"atol": 1e-5, "rtol": 1e-5}

# Every registered mixer with its defaults, plus each mixer option once (every combination of feature map and
# normaliser is tested on the forms in tests/test_mixers.py).
OPTION_VARIANTS = {
    "sliding_window-w3": {"attention": "sliding_window", "window": 3},
    "linear-relu": {"attention": "linear", "feature_map": "relu"},
    "linear-taylor-dim3": {"attention": "linear", "feature_map": "taylor", "feature_dim": 3},
    "linear-rmsnorm": {"attention": "linear", "normalizer": "rmsnorm"},
    "gated_linear-taylor-rmsnorm": {"attention": "gated_linear", "feature_map": "taylor", "normalizer": "rmsnorm"},
    "deltanet-nodecay": {"attention": "deltanet", "pos_encoding": "none"},
    # model.short_conv applies to every mixer: once on a KV-cache mixer, once on each recurrent family
    "softmax-conv3": {"attention": "softmax", "short_conv": 3},
    "linear-conv4": {"attention": "linear", "short_conv": 4},
    "gated_deltanet-conv2": {"attention": "gated_deltanet", "short_conv": 2},
}
VARIANTS = {name: {"attention": name} for name in mixers.names()} | OPTION_VARIANTS


def zoo_model(variant: str, seed: int = 0, **kw) -> Transformer:
    cfg = ModelConfig(
        **{"d_model": 16, "n_heads": 2, "n_layers": 2, "vocab_size": VOCAB, "linear_chunk_size": 4, "max_seq_len": 64}
        | VARIANTS[variant]
        | kw
    )
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # weights large enough that every token visibly moves the logits
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ".gate." not in name and ".beta." not in name:
                p.normal_(0.0, 0.4)
    return model.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def model(variant):
    return zoo_model(variant)


def test_every_option_variant_names_a_registered_mixer():
    assert {v["attention"] for v in OPTION_VARIANTS.values()} <= set(mixers.names())
    for name in mixers.names():
        cls = mixers.mixer_class(name)
        assert issubclass(cls, Mixer) and cls.forms[-1] == "recurrent" and cls.options <= set(MIXER_OPTIONS)


# --------------------------------------------------------------------------------------------------
# Forms: outputs, final state and gradients against the recurrent reference


def _run_form(mixer: Mixer, form: str, x: torch.Tensor, key_mask: torch.Tensor, prefix: int):
    """The mixer's output for positions prefix.. (the first `prefix` positions prefilled with the default
    form), the cache it leaves, and the gradients of a fixed projection of the output."""
    mixer.zero_grad()
    x = x.detach().requires_grad_()
    cache = LayerCache()
    if prefix:
        mixer(x[:, :prefix], key_mask[:, :prefix], cache)
    out = mixer(x[:, prefix:], key_mask, cache, form=form)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weight).sum().backward()
    params = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in mixer.parameters()]
    state = [t.detach() for t in (cache.k, cache.v, cache.state, cache.z, cache.conv) if t is not None]
    return out.detach(), state, [x.grad, *params]


@pytest.mark.parametrize("prefix", [0, 5], ids=["from-empty", "continuing"])
@pytest.mark.parametrize("n", [7, 11], ids=["short", "chunked"])  # linear_chunk_size 4: 11 spans chunks
def test_every_form_equals_the_recurrence_in_outputs_state_and_gradients(model, n, prefix):
    mixer = model.blocks[0].attn
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, prefix + n, model.cfg.d_model, generator=g)
    key_mask = torch.ones(2, prefix + n, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding in the second row
    with torch.enable_grad():
        ref_out, ref_state, ref_grads = _run_form(mixer, "recurrent", x, key_mask, prefix)
        assert len(ref_state) >= 1
        for form in type(mixer).forms[:-1]:
            out, state, grads = _run_form(mixer, form, x, key_mask, prefix)
            torch.testing.assert_close(out, ref_out, **TOL, msg=lambda m, f=form: f"{f} output: {m}")
            for got, want in zip(state, ref_state, strict=True):
                torch.testing.assert_close(got, want, **TOL, msg=lambda m, f=form: f"{f} state: {m}")
            for got, want in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, f=form: f"{f} grad: {m}")


# --------------------------------------------------------------------------------------------------
# Inside the model


def test_causality(model):
    tokens = rand_tokens(2, 11)
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % (VOCAB - 1)
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-2


def test_left_padding_changes_nothing(model):
    seq, longer = rand_tokens(7, seed=3), rand_tokens(12, seed=4)
    left = model(pad_sequences([seq, longer], PAD, side="left"))
    torch.testing.assert_close(left[0, 5:], model(seq[None])[0], **TOL)
    torch.testing.assert_close(left[1], model(longer[None])[0], **TOL)


def test_a_masked_key_mid_sequence_contributes_nothing(model):
    """Its token may change freely: no other output moves, and its pattern column is 0 (gates and beta
    are masked too, not only the keys)."""
    tokens = rand_tokens(1, 10)
    key_mask = torch.ones_like(tokens, dtype=torch.bool)
    key_mask[0, 4] = False
    changed = tokens.clone()
    changed[0, 4] = (tokens[0, 4] + 11) % (VOCAB - 1)
    others = [i for i in range(10) if i != 4]
    a, b = model(tokens, key_mask=key_mask), model(changed, key_mask=key_mask)
    torch.testing.assert_close(a[0, others], b[0, others], atol=1e-6, rtol=1e-6)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern", key_mask=key_mask)
    assert torch.all(cache["blocks.0.attn.hook_pattern"][0][:, others, 4] == 0)


def test_hook_pattern_times_v_is_z_and_the_hooked_run_is_the_plain_one(model):
    tokens = rand_tokens(2, 11)
    names = ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v", "blocks.1.attn.hook_z"]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    pattern, v, z = (cache[n] for n in names)
    assert pattern.shape == (2, 2, 11, 11) and torch.all(pattern.triu(1) == 0)
    torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", pattern, v), z, **TOL)
    torch.testing.assert_close(logits, model(tokens), **TOL)


def test_generation_equals_the_full_forward(model):
    prompt = pad_sequences([rand_tokens(6, seed=5), rand_tokens(3, seed=6)], PAD, side="left")
    want = torch.stack([greedy_reference(model, p[p != PAD][None], 5)[0, -5:] for p in prompt])
    fast = model.generate(prompt, 5)
    assert torch.equal(fast[:, -5:], want)
    assert torch.equal(decoding.generate_cached(model, prompt, 5), fast)
    # logits of the fast decoder step by step against the full forward of the same sequence
    seq = fast[:1]
    dec = decoding.Decoder(model, 1, seq.shape[1])
    logits = dec.prefill(seq[:, :6], seq[:, :6] != PAD)
    for t in range(6, seq.shape[1]):
        torch.testing.assert_close(logits, model(seq[:, :t])[:, -1], **TOL)
        logits = dec.step(seq[:, t])


def test_state_floats_is_the_cache_size(model):
    caches = [LayerCache() for _ in model.blocks]
    with torch.no_grad():
        model(rand_tokens(1, 9), caches=caches)
    c = caches[0]
    held = sum(t.numel() for t in (c.k, c.v, c.state, c.z, c.conv) if t is not None)
    assert held == mixers.state_floats(model.cfg, 9)


def test_checkpoint_round_trip(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(model.cfg.model_dump_json())
    loaded = load_from_files(tmp_path / "model.pt", tmp_path / "config.json")
    tokens = rand_tokens(2, 9)
    torch.testing.assert_close(loaded(tokens), model(tokens))


def test_analysis_runs_on_every_variant(model):
    """Head scores, the head detector and activation patching read hook_pattern / hook_z of any mixer."""
    tokens = rand_tokens(4, 8, seed=7)
    plain = torch.stack([torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(i))[:8] for i in range(4)])
    scores = hd.detect_heads(model, plain, torch.cat([plain[:, :4], plain[:, :4]], dim=1))
    for name, s in scores.items():
        assert s.shape == (2, 2) and torch.all((s >= 0) & (s <= 1 + 1e-6)), name
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    head = analysis.head_scores(cache["blocks.0.attn.hook_pattern"], torch.full((4,), 8))
    assert all(torch.isfinite(v).all() for v in head.values())
    corrupted = tokens.clone()
    corrupted[:, -2] = (tokens[:, -2] + 3) % (VOCAB - 1)
    res = patching.patch_all(model, PromptPairs(tokens, corrupted, tokens[:, -2:-1], corrupted[:, -2:-1]))
    assert len(res.components) == res.component_recovered.numel() == 2 * (2 + 2)
    assert float(res.resid[-1].max()) == pytest.approx(1.0, abs=1e-4)  # the final residual carries it all


# --------------------------------------------------------------------------------------------------
# Declarations: state sizes, gates, options


def test_state_floats_by_hand():
    kw = {"d_model": 16, "n_heads": 2, "vocab_size": VOCAB}

    def floats(**c) -> int:
        return mixers.state_floats(ModelConfig(**kw, **c), 100)

    assert floats(attention="softmax") == 2 * 16 * 100
    assert floats(attention="sliding_window", window=8) == 2 * 16 * 8
    assert floats(attention="linear") == 2 * (8 * 8 + 8)
    assert floats(attention="gated_linear", normalizer="rmsnorm") == 2 * 8 * 8
    assert floats(attention="linear", feature_map="taylor", feature_dim=4) == 2 * (15 * 8 + 15)  # 1 + 4 + 10
    assert floats(attention="gated_deltanet") == 2 * 8 * 8


@pytest.mark.parametrize(("gated", "plain"), [("gated_linear", "linear"), ("gated_deltanet", "deltanet")])
def test_a_constant_gate_at_the_alibi_decay_is_the_ungated_model(gated, plain):
    """Gate weights 0: g_t = sigmoid(b_h) = exp(-m_h) for every token, the fixed ALiBi decay."""
    a, b = zoo_model(gated), zoo_model(plain)
    with torch.no_grad():
        for block in a.blocks:
            block.attn.gate.weight.zero_()
    missing = b.load_state_dict(a.state_dict(), strict=False)
    assert all(".gate." in k for k in missing.unexpected_keys) and not missing.missing_keys
    tokens = pad_sequences([rand_tokens(11, seed=1), rand_tokens(6, seed=2)], PAD, side="left")
    torch.testing.assert_close(a(tokens), b(tokens), **TOL)
    assert torch.equal(a.generate(tokens, 4), b.generate(tokens, 4))


def test_gates_start_at_the_alibi_decay():
    model = zoo_model("gated_deltanet")
    slopes = alibi_slopes(2, model.cfg.alibi_exponent)
    bias = model.blocks[0].attn.gate.bias
    torch.testing.assert_close(torch.sigmoid(bias), torch.exp(-slopes))
    torch.testing.assert_close(gate_bias(slopes), bias.detach())
    assert torch.all(model.blocks[1].attn.beta.bias == 0)  # beta starts at 1/2


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"attention": "softmax", "feature_map": "relu"}, "feature_map=relu"),
        ({"attention": "deltanet", "normalizer": "rmsnorm"}, "normalizer=rmsnorm"),
        ({"attention": "linear", "feature_dim": 4}, "feature_dim=4"),
        ({"attention": "linear", "window": 8}, "window=8"),
        ({"attention": "nope"}, "unknown mixer 'nope'"),
    ],
)
def test_options_that_do_not_apply_are_an_error(kw, word):
    with pytest.raises(ValidationError, match=word):
        ModelConfig(**kw)


def test_the_mixer_catalog_is_current():
    from picollm.model.mixers import catalog

    assert catalog.DOC.read_text() == catalog.render(), "docs/reference/mixers.md is stale: run `make docs`"
    assert all(f"| `{name}` |" in catalog.render() for name in mixers.names())
