"""The mixers' math, family by family: each training form against its recurrence on outputs and gradients,
the Taylor feature map against its expansion, the delta rule by hand. What every registered mixer must meet
inside the model (forms, state, gradients, decoding, causality, padding, hooks) is tests/test_mixer_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from picollm.model.mixers import deltanet as dn
from picollm.model.mixers import feature_maps as fm
from picollm.model.mixers import linear as gl

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
