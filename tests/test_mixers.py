"""The attention zoo: every mixer's training form against its recurrent (generation) form on outputs and
gradients, the Taylor feature map against its expansion, and every variant inside the model (causality,
padding, cached generation, hook_pattern, state size, checkpoints, config errors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from picollm.config import ModelConfig
from picollm.data.splits import pad_sequences
from picollm.interp import analysis, patching
from picollm.interp import head_detector as hd
from picollm.interp.prompts import PromptPairs
from picollm.model import decoding
from picollm.model.mixers import deltanet as dn
from picollm.model.mixers import feature_maps as fm
from picollm.model.mixers import gated_linear as gl
from picollm.model.mixers import linear_attention as la
from picollm.model.transformer import LayerCache, Transformer, alibi_slopes, gate_bias, state_floats
from picollm.tracking.registry import load_from_files
from tests.test_model import PAD, VOCAB, greedy_reference, rand_tokens

TOL = {"atol": 1e-5, "rtol": 1e-5}
B, H, DK, DV, CHUNK = 2, 2, 4, 3, 4
LENGTHS = [8, 13]  # a multiple of the chunk and not
FEATURE_MAPS = ["elu", "relu", "taylor"]

# Every variant the model builds; the kernel options each once inside the model (every combination of
# feature map and normaliser is tested on the forms above).
VARIANTS = {
    "softmax": {"attention": "softmax"},
    "sliding_window": {"attention": "sliding_window", "window": 3},
    "linear": {"attention": "linear"},
    "linear-relu": {"attention": "linear", "feature_map": "relu"},
    "linear-taylor-dim3": {"attention": "linear", "feature_map": "taylor", "feature_dim": 3},
    "linear-rmsnorm": {"attention": "linear", "normalizer": "rmsnorm"},
    "gated_linear": {"attention": "gated_linear"},
    "gated_linear-taylor-rmsnorm": {"attention": "gated_linear", "feature_map": "taylor", "normalizer": "rmsnorm"},
    "deltanet": {"attention": "deltanet"},
    "gated_deltanet": {"attention": "gated_deltanet"},
}


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


def grads(out: torch.Tensor | tuple[torch.Tensor, ...], wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs and the gradients of a fixed random projection of them (every output element counts)."""
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum(
        (o * torch.randn(o.shape, generator=torch.Generator().manual_seed(9), dtype=o.dtype)).sum() for o in outs
    )
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, wrt))


# --------------------------------------------------------------------------------------------------
# Kernel mixers: linear (fixed decay) and gated_linear (data-dependent decay)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("eps", [1e-6, None], ids=["denominator", "numerator"])
@pytest.mark.parametrize("fmap", FEATURE_MAPS)
def test_gated_linear_forms_agree_with_the_recurrence(fmap, eps, n):
    # relu features can leave a tiny denominator, whose gradients are ill-conditioned in fp32
    dt = torch.float64 if (fmap, eps) == ("relu", 1e-6) else torch.float32
    q, k = rand(B, H, n, DK, seed=0, dtype=dt), rand(B, H, n, DK, seed=1, dtype=dt)
    v, a = rand(B, H, n, DV, seed=2, dtype=dt), rand(B, H, n, seed=3, dtype=dt)

    def run(form):
        log_g = F.logsigmoid(a + 2.0)
        return grads(form(fm.feature_map(q, fmap), fm.feature_map(k, fmap), v, log_g, eps), [q, k, v, a])

    ref = run(gl.recurrent)
    for form in (lambda *x: gl.chunkwise(*x, CHUNK), gl.quadratic):
        for got, want in zip(run(form), ref, strict=True):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("eps", [1e-6, None], ids=["denominator", "numerator"])
def test_linear_forms_agree_with_the_recurrence_in_values_and_gradients(eps):
    n = 13
    q, k, v = rand(B, H, n, DK, seed=0), rand(B, H, n, DK, seed=1), rand(B, H, n, DV, seed=2)
    log_decay = -alibi_slopes(H)

    def run(form):
        return grads(form(la.feature_map(q), la.feature_map(k), v, log_decay, eps), [q, k, v])

    ref = run(la.recurrent)
    for form in (lambda *x: la.chunkwise(*x, CHUNK), la.quadratic):
        for got, want in zip(run(form), ref, strict=True):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("eps", [1e-6, None], ids=["denominator", "numerator"])
def test_constant_gate_is_the_fixed_decay(eps):
    n = 13
    fq, fk = la.feature_map(torch.randn(B, H, n, DK)), la.feature_map(torch.randn(B, H, n, DK))
    v = torch.randn(B, H, n, DV)
    log_decay = -alibi_slopes(H)
    log_g = log_decay.view(1, H, 1).expand(B, H, n)
    torch.testing.assert_close(
        gl.chunkwise(fq, fk, v, log_g, eps, CHUNK), la.chunkwise(fq, fk, v, log_decay, eps, CHUNK)
    )
    torch.testing.assert_close(gl.kernel_pattern(fq, fk, log_g, eps), la.kernel_pattern(fq, fk, log_decay, eps))
    s_gl, z_gl = gl.final_state(fk, v, log_g)
    s_la, z_la = la.final_state(fk, v, log_decay)
    torch.testing.assert_close(s_gl, s_la, **TOL)
    torch.testing.assert_close(z_gl, z_la, **TOL)


def test_gate_decays_the_state_by_hand():
    """Two steps of one head: S = g_2 * (k_1 v_1^T) + k_2 v_2^T."""
    fk = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2)
    v = torch.tensor([[3.0], [5.0]]).view(1, 1, 2, 1)
    log_g = torch.log(torch.tensor([0.9, 0.5])).view(1, 1, 2)
    s, z = gl.final_state(fk, v, log_g)
    torch.testing.assert_close(s.view(2), torch.tensor([0.5 * 3.0, 2.0 * 5.0]))
    torch.testing.assert_close(z.view(2), torch.tensor([0.5, 2.0]))


def test_taylor_feature_map_is_the_second_order_expansion_of_exp():
    d = 5
    q, k = torch.randn(7, d, dtype=torch.float64), torch.randn(7, d, dtype=torch.float64)
    s = (q * k).sum(-1) / math.sqrt(d)
    fq, fk = fm.taylor(q), fm.taylor(k)
    assert fq.shape[-1] == fm.feature_size("taylor", d) == 1 + 5 + 15
    torch.testing.assert_close((fq * fk).sum(-1), 1 + s + s**2 / 2)
    # near 0 the expansion is exp itself up to the cubic term
    small = (0.1 * q, 0.1 * k)
    s_small = (small[0] * small[1]).sum(-1) / math.sqrt(d)
    dot = (fm.taylor(small[0]) * fm.taylor(small[1])).sum(-1)
    assert torch.all((dot - s_small.exp()).abs() <= s_small.abs() ** 3)


def test_rms_scale_normalises_each_head_output():
    y = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close((y * fm.rms_scale(y, 0.0))[0], torch.tensor([3.0, 4.0]) / math.sqrt(12.5))
    assert torch.all(y[1] * fm.rms_scale(y, 1e-6)[1] == 0)  # an all-zero output stays 0, not NaN


# --------------------------------------------------------------------------------------------------
# The delta rule


def delta_inputs(n: int, gated: bool):
    q, k, v = rand(B, H, n, DK, seed=0), rand(B, H, n, DK, seed=1), rand(B, H, n, DV, seed=2)
    b, a = rand(B, H, n, seed=3), rand(B, H, n, seed=4)

    def prep():
        log_alpha = F.logsigmoid(a + 2.0) if gated else torch.zeros(B, H, n)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, torch.sigmoid(b), log_alpha

    return prep, [q, k, v, b] + ([a] if gated else [])


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated_deltanet"])
def test_delta_chunkwise_equals_the_recurrence_in_outputs_state_and_gradients(gated, n):
    prep, wrt = delta_inputs(n, gated)
    ref = grads(dn.recurrent(*prep()), wrt)
    for chunk in (1, CHUNK, 64):
        for got, want in zip(grads(dn.chunkwise(*prep(), chunk), wrt), ref, strict=True):
            torch.testing.assert_close(got, want, **TOL)


def test_delta_rule_by_hand():
    """One head, dk = 2: write v1 at k1, then v2 at k1 with beta 1 replaces it, and k2 (orthogonal) is
    untouched; with beta 1/2 the state moves half way. alpha = 1/2 halves the state first."""
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).view(1, 1, 3, 2)
    v = torch.tensor([[2.0], [6.0], [1.0]]).view(1, 1, 3, 1)
    q = k.clone()
    y, s = dn.recurrent(q, k, v, torch.tensor([1.0, 1.0, 1.0]).view(1, 1, 3), torch.zeros(1, 1, 3))
    torch.testing.assert_close(y.view(3), torch.tensor([2.0, 6.0, 1.0]))
    torch.testing.assert_close(s.view(2), torch.tensor([6.0, 1.0]))
    y, _ = dn.recurrent(q, k, v, torch.tensor([1.0, 0.5, 1.0]).view(1, 1, 3), torch.zeros(1, 1, 3))
    assert float(y.view(3)[1]) == pytest.approx(2.0 + 0.5 * (6.0 - 2.0))
    y, _ = dn.recurrent(q, k, v, torch.tensor([1.0, 0.5, 1.0]).view(1, 1, 3), math.log(0.5) * torch.ones(1, 1, 3))
    assert float(y.view(3)[1]) == pytest.approx(0.5 * 2.0 + 0.5 * (6.0 - 0.5 * 2.0))


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated_deltanet"])
def test_delta_mixing_matrix_maps_values_to_outputs(gated):
    prep, _ = delta_inputs(13, gated)
    q, k, v, beta, log_alpha = (t.detach() for t in prep())
    p = dn.mixing_matrix(q, k, beta, log_alpha)
    assert p.shape == (B, H, 13, 13) and torch.all(p.triu(1) == 0)
    torch.testing.assert_close(p @ v, dn.recurrent(q, k, v, beta, log_alpha)[0], **TOL)


def test_delta_padding_writes_nothing():
    """beta = 0 and log alpha = 0 at a position: the state skips it, whatever its k and v."""
    prep, _ = delta_inputs(13, True)
    q, k, v, beta, log_alpha = (t.detach().clone() for t in prep())
    beta[:, :, 5], log_alpha[:, :, 5] = 0.0, 0.0
    y, s = dn.chunkwise(q, k, v, beta, log_alpha, CHUNK)
    keep = [i for i in range(13) if i != 5]
    y2, s2 = dn.chunkwise(*(t[:, :, keep] for t in (q, k, v, beta, log_alpha)), CHUNK)
    torch.testing.assert_close(y[:, :, keep], y2, **TOL)
    torch.testing.assert_close(s, s2, **TOL)


# --------------------------------------------------------------------------------------------------
# Every variant inside the model


def zoo_model(variant: str, seed: int = 0, **kw) -> Transformer:
    cfg = ModelConfig(
        d_model=16,
        n_heads=2,
        n_layers=2,
        vocab_size=VOCAB,
        linear_chunk_size=4,
        max_seq_len=64,
        **VARIANTS[variant],
        **kw,
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
    held = sum(t.numel() for t in (c.k, c.v, c.state, c.z) if t is not None)
    assert held == state_floats(model.cfg, 9)


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


def test_state_floats_by_hand():
    kw = {"d_model": 16, "n_heads": 2, "vocab_size": VOCAB}
    assert state_floats(ModelConfig(attention="softmax", **kw), 100) == 2 * 16 * 100
    assert state_floats(ModelConfig(attention="sliding_window", window=8, **kw), 100) == 2 * 16 * 8
    assert state_floats(ModelConfig(attention="linear", **kw), 100) == 2 * (8 * 8 + 8)
    assert state_floats(ModelConfig(attention="gated_linear", normalizer="rmsnorm", **kw), 100) == 2 * 8 * 8
    taylor = ModelConfig(attention="linear", feature_map="taylor", feature_dim=4, **kw)
    assert state_floats(taylor, 100) == 2 * (15 * 8 + 15)  # 1 + 4 + 10 features
    assert state_floats(ModelConfig(attention="gated_deltanet", **kw), 100) == 2 * 8 * 8


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
    ],
)
def test_options_that_do_not_apply_are_an_error(kw, word):
    with pytest.raises(ValidationError, match=word):
        ModelConfig(**kw)
