"""Gated linear attention: linear attention whose decay is data-dependent, one scalar per head and token
(the GLA / Mamba-2 scalar gate):

    S_t = g_t S_{t-1} + phi(k_t) v_t^T,   z_t = g_t z_{t-1} + phi(k_t),   g_t = exp(log_sigmoid(w.x_t + b))
    y_t = phi(q_t)^T S_t / (phi(q_t).z_t + eps)          (eps=None: the numerator alone, for an RMSNorm)

so y_i = sum_{j<=i} (g_{j+1} ... g_i) phi(q_i).phi(k_j) v_j / (...). With a constant gate g_t = g_h this
is picollm.linear_attention's fixed decay exactly. Inputs carry log g (B, H, N) <= 0; a position whose
log g is 0 and whose features are 0 (padding) leaves the state untouched. Forms, tested against each
other: `kernel_pattern`/`quadratic` (the (N, N) weights), `chunkwise` (quadratic inside chunks, the
state carried between them), `recurrent_step` (generation) and `recurrent` (the reference loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from picollm.model.mixers.feature_maps import at_least_fp32 as _fp32
from picollm.model.mixers.linear_attention import normalise


def decay_matrix(log_g: torch.Tensor) -> torch.Tensor:
    """(..., N) log gates -> (..., N, N) with prod_{l=j+1..i} g_l on and below the diagonal, 0 above."""
    cum = _fp32(log_g).cumsum(-1)
    n = log_g.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_g.device).tril()
    # Masked before exp: above the diagonal cum_i - cum_j > 0 could overflow.
    diff = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    return diff.exp()


def kernel_pattern(fq: torch.Tensor, fk: torch.Tensor, log_g: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Kernel weights A (B, H, N, N), normalised unless eps is None, with y = A @ v exactly."""
    return normalise((fq @ fk.transpose(-1, -2)) * decay_matrix(log_g), eps)


def quadratic(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor, eps: float | None
) -> torch.Tensor:
    """fq, fk: (B, H, N, dk) fp32 features (fk zeroed on padding); v: (B, H, N, dv); log_g: (B, H, N)."""
    return kernel_pattern(fq, fk, log_g, eps) @ _fp32(v)


def chunkwise(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    eps: float | None,
    chunk_size: int,
) -> torch.Tensor:
    """Quadratic inside chunks of C, the (dk, dv) state and (dk,) normaliser carried across chunks."""
    b, h, n, dk = fq.shape
    dv = v.shape[-1]
    c = chunk_size
    pad = (-n) % c
    v = _fp32(v)
    if pad:  # zero features and log g = 0: the padded tail adds nothing and decays nothing
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
        log_g = F.pad(log_g, (0, pad))
    nc = (n + pad) // c
    fq, fk, v = (t.reshape(b, h, nc, c, t.shape[-1]) for t in (fq, fk, v))  # (B, H, nc, C, d)
    lg = _fp32(log_g).reshape(b, h, nc, c)
    cum = lg.cumsum(-1)  # log of g_1 ... g_i from the chunk start, inclusive
    scores = (fq @ fk.transpose(-1, -2)) * decay_matrix(lg)  # (B, H, nc, C, C)
    from_start = cum.exp().unsqueeze(-1)  # chunk-start state to query i
    to_end = (cum[..., -1:] - cum).exp().unsqueeze(-1)  # key j to the chunk's end
    state = fq.new_zeros(b, h, dk, dv)
    z = fq.new_zeros(b, h, dk)
    out = []
    for i in range(nc):
        qi, ki = fq[:, :, i], fk[:, :, i]
        num = scores[:, :, i] @ v[:, :, i] + from_start[:, :, i] * (qi @ state)
        if eps is None:
            out.append(num)
        else:
            den = scores[:, :, i].sum(-1) + from_start[:, :, i, :, 0] * (qi @ z.unsqueeze(-1)).squeeze(-1)
            out.append(num / (den.unsqueeze(-1) + eps))
        kd = ki * to_end[:, :, i]
        chunk_g = cum[:, :, i, -1].exp()  # (B, H): decay across the whole chunk
        state = chunk_g[..., None, None] * state + kd.transpose(-1, -2) @ v[:, :, i]
        z = chunk_g[..., None] * z + kd.sum(-2)
    return torch.stack(out, dim=2).reshape(b, h, nc * c, dv)[:, :, :n]  # (B, H, N, dv)


def final_state(fk: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """State after the last position: S = sum_j (g_{j+1}...g_N) phi(k_j) v_j^T, and z likewise."""
    cum = _fp32(log_g).cumsum(-1)
    w = (cum[..., -1:] - cum).exp()  # (B, H, N)
    s = torch.einsum("bhn,bhnd,bhne->bhde", w, fk, _fp32(v))
    z = torch.einsum("bhn,bhnd->bhd", w, fk)
    return s, z


def recurrent_step(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    state: torch.Tensor,
    z: torch.Tensor | None,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One position. fq, fk: (B, H, dk), v: (B, H, dv), log_g: (B, H); state (B, H, dk, dv), z (B, H, dk)."""
    g = _fp32(log_g).exp().unsqueeze(-1)  # (B, H, 1)
    state = g.unsqueeze(-1) * state + fk.unsqueeze(-1) * _fp32(v).unsqueeze(-2)
    num = (fq.unsqueeze(-2) @ state).squeeze(-2)  # (B, H, dv)
    if eps is None:
        return num, state, None
    assert z is not None
    z = g * z + fk
    return num / ((fq * z).sum(-1, keepdim=True) + eps), state, z


def recurrent(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor, eps: float | None
) -> torch.Tensor:
    """The reference: the recurrence, one position at a time."""
    b, h, n, dk = fq.shape
    state = fq.new_zeros(b, h, dk, v.shape[-1])
    z = None if eps is None else fq.new_zeros(b, h, dk)
    out = []
    for i in range(n):
        y, state, z = recurrent_step(fq[:, :, i], fk[:, :, i], v[:, :, i], log_g[:, :, i], state, z, eps)
        out.append(y)
    return torch.stack(out, dim=2)
