"""Linear attention's quadratic, chunkwise and recurrent forms (picollm/model/mixers/linear.py, a constant gate:
no decay or the ALiBi decay) against each other and against a naive loop of the formula."""

from __future__ import annotations

import math

import pytest
import torch

from picollm.model.mixers import linear as la
from picollm.model.mixers.feature_maps import feature_map
from picollm.model.positions import alibi_slopes

B, H, N, DK, DV = 2, 3, 37, 8, 5
EPS = 1e-6
TOL = {"atol": 1e-5, "rtol": 1e-5}


def inputs(decay: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fq = feature_map(torch.randn(B, H, N, DK, generator=g))
    fk = feature_map(torch.randn(B, H, N, DK, generator=g))
    v = torch.randn(B, H, N, DV, generator=g)
    log_decay = -alibi_slopes(H) if decay else torch.zeros(H)
    return fq, fk, v, log_decay.view(1, H, 1).expand(B, H, N)  # a constant gate: log g per (batch, head, position)


def naive(fq, fk, v, log_decay, eps=EPS):
    """The formula of the module docstring, term by term, in float64."""
    fq, fk, v = fq.double(), fk.double(), v.double()
    out = torch.zeros(*fq.shape[:3], v.shape[-1], dtype=torch.float64)
    for b in range(fq.shape[0]):
        for h in range(fq.shape[1]):
            g = math.exp(float(log_decay[b, h, 0]))
            for i in range(fq.shape[2]):
                num = torch.zeros(v.shape[-1], dtype=torch.float64)
                den = 0.0
                for j in range(i + 1):
                    w = g ** (i - j) * float(fq[b, h, i] @ fk[b, h, j])
                    num += w * v[b, h, j]
                    den += w
                out[b, h, i] = num / (den + eps)
    return out.float()


@pytest.fixture(scope="module", params=[False, True], ids=["no-decay", "decay"])
def case(request):
    x = inputs(request.param)
    return x, naive(*x)


def test_naive_reference_is_sensible(case):
    (fq, fk, v, log_decay), ref = case
    # position 0 attends only to itself: y_0 = v_0 up to eps
    torch.testing.assert_close(ref[:, :, 0], v[:, :, 0], atol=1e-4, rtol=1e-4)


def test_quadratic_matches_naive(case):
    x, ref = case
    torch.testing.assert_close(la.quadratic(*x, EPS), ref, **TOL)


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])
def test_chunkwise_matches_naive(case, chunk):
    x, ref = case
    torch.testing.assert_close(la.chunkwise(*x, EPS, chunk), ref, **TOL)


def test_recurrent_matches_naive(case):
    x, ref = case
    torch.testing.assert_close(la.recurrent(*x, EPS), ref, **TOL)


def test_three_forms_agree_with_uneven_chunks(case):
    x, _ = case
    quad = la.quadratic(*x, EPS)
    torch.testing.assert_close(la.chunkwise(*x, EPS, 8), quad, **TOL)  # 37 = 4 * 8 + 5
    torch.testing.assert_close(la.recurrent(*x, EPS), quad, **TOL)


def test_kernel_pattern_times_v_is_the_output(case):
    (fq, fk, v, log_decay), ref = case
    pattern = la.kernel_pattern(fq, fk, log_decay, EPS)
    assert pattern.shape == (B, H, N, N)
    assert torch.all(pattern.triu(1) == 0)  # causal
    torch.testing.assert_close(pattern @ v, ref, **TOL)
    torch.testing.assert_close(pattern @ v, la.quadratic(fq, fk, v, log_decay, EPS), atol=1e-6, rtol=1e-6)


def test_final_state_is_the_recurrent_state_after_the_last_step(case):
    (fq, fk, v, log_decay), _ = case
    state = torch.zeros(B, H, DK, DV)
    z = torch.zeros(B, H, DK)
    for i in range(N):
        _, state, z = la.recurrent_step(fq[:, :, i], fk[:, :, i], v[:, :, i], log_decay[:, :, i], state, z, EPS)
    s_final, z_final = la.final_state(fk, v, log_decay)
    torch.testing.assert_close(s_final, state, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(z_final, z, atol=1e-4, rtol=1e-5)


def test_final_state_continues_the_sequence(case):
    """Prefill with final_state, then recurrent steps: same outputs as the full quadratic form."""
    (fq, fk, v, log_decay), ref = case
    split = 20
    state, z = la.final_state(fk[:, :, :split], v[:, :, :split], log_decay[:, :, :split])
    for i in range(split, N):
        y, state, z = la.recurrent_step(fq[:, :, i], fk[:, :, i], v[:, :, i], log_decay[:, :, i], state, z, EPS)
        torch.testing.assert_close(y, ref[:, :, i], **TOL)


@pytest.mark.parametrize("form", ["quadratic", "chunkwise", "recurrent"])
def test_zero_key_features_contribute_nothing(form):
    fq, fk, v, log_decay = inputs(True, seed=1)
    masked = torch.zeros(N, dtype=torch.bool)
    masked[[3, 17, 30]] = True
    fk = fk.masked_fill(masked[:, None], 0.0)
    v2 = v.clone()
    v2[:, :, masked] = 100.0 * torch.randn_like(v2[:, :, masked])
    run = {
        "quadratic": lambda vv: la.quadratic(fq, fk, vv, log_decay, EPS),
        "chunkwise": lambda vv: la.chunkwise(fq, fk, vv, log_decay, EPS, 8),
        "recurrent": lambda vv: la.recurrent(fq, fk, vv, log_decay, EPS),
    }[form]
    torch.testing.assert_close(run(v2), run(v), atol=1e-6, rtol=1e-6)


def test_decay_matrix():
    d = la.decay_matrix(torch.full((1, 4), math.log(0.5)))
    expected = torch.tensor([[1, 0, 0, 0], [0.5, 1, 0, 0], [0.25, 0.5, 1, 0], [0.125, 0.25, 0.5, 1]])
    torch.testing.assert_close(d[0], expected)
