"""Causal linear attention (Katharopoulos et al. 2020) with an optional per-head decay.

    y_i = sum_{j<=i} g^(i-j) phi(q_i).phi(k_j) v_j / (sum_{j<=i} g^(i-j) phi(q_i).phi(k_j) + eps)

with phi(x) = elu(x) + 1 (or another map of picollm.feature_maps) and g = exp(-m_h) (the ALiBi slope of
head h; g = 1 without decay). eps=None drops the denominator (the numerator alone, for an output RMSNorm).
Three forms of one computation, tested against each other:
  quadratic   masked (N, N) kernel matrix: fastest at short lengths, and gives the pattern
  chunkwise   quadratic inside chunks of C, a (d, d) state carried between chunks: O(N C d + N d^2)
  recurrent   O(1) state (S, z) per step, for generation
Everything inside runs in fp32 (state and normaliser accumulate over the whole sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from picollm.model.mixers.feature_maps import feature_map

__all__ = [  # feature_map re-exported: callers build phi here as before
    "chunkwise",
    "decay_matrix",
    "feature_map",
    "final_state",
    "kernel_pattern",
    "normalise",
    "quadratic",
    "recurrent",
    "recurrent_step",
]


def decay_matrix(n: int, log_decay: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """(H, n, n) with g_h^(i-j) on and below the diagonal, 0 above. log_decay = log g_h <= 0."""
    idx = torch.arange(n, device=device)
    dist = (idx[:, None] - idx[None, :]).float()
    causal = dist >= 0
    w = torch.exp(log_decay.float().view(-1, 1, 1) * dist.clamp(min=0))
    return w * causal


def normalise(scores: torch.Tensor, eps: float | None) -> torch.Tensor:
    return scores if eps is None else scores / (scores.sum(-1, keepdim=True) + eps)


def kernel_pattern(fq: torch.Tensor, fk: torch.Tensor, log_decay: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Normalised kernel weights A_ij (B, H, N, N) such that y = A @ v exactly."""
    n = fq.shape[-2]
    scores = (fq @ fk.transpose(-1, -2)) * decay_matrix(n, log_decay, fq.device)
    return normalise(scores, eps)


def quadratic(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, eps: float | None
) -> torch.Tensor:
    """fq, fk: (B, H, N, dk) fp32 features (fk already zeroed on padding); v: (B, H, N, dv)."""
    return kernel_pattern(fq, fk, log_decay, eps) @ v.float()


def chunkwise(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    eps: float | None,
    chunk_size: int,
) -> torch.Tensor:
    b, h, n, dk = fq.shape
    dv = v.shape[-1]
    c = chunk_size
    pad = (-n) % c
    v = v.float()
    if pad:  # padded keys have zero features, so they add nothing
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    nc = (n + pad) // c
    fq, fk, v = (t.reshape(b, h, nc, c, t.shape[-1]) for t in (fq, fk, v))
    ld = log_decay.float().view(1, h, 1, 1)

    # Intra-chunk: the masked quadratic form on each (C, C) block.
    scores = (fq @ fk.transpose(-1, -2)) * decay_matrix(c, log_decay, fq.device).unsqueeze(1)
    num = scores @ v
    den = scores.sum(-1)

    # Inter-chunk: each chunk's contribution to the state at its end, summed with decay over chunks.
    pos = torch.arange(c, device=fq.device).float()
    to_end = torch.exp(ld * (c - 1 - pos))  # g^(C-1-j): key j to the end of its chunk
    kv = torch.einsum("bhcj,bhcjd,bhcje->bhcde", to_end.expand(b, h, nc, c), fk, v)
    kz = torch.einsum("bhcj,bhcjd->bhcd", to_end.expand(b, h, nc, c), fk)
    ci = torch.arange(nc, device=fq.device).float()
    gap = ci[:, None] - ci[None, :] - 1  # chunk c' contributes to chunk c > c' with g^(C*(c-c'-1))
    chunk_decay = torch.exp(ld.view(1, h, 1, 1) * c * gap.clamp(min=0)) * (gap >= 0)
    state = torch.einsum("xhcs,bhsde->bhcde", chunk_decay, kv)  # state entering each chunk
    z = torch.einsum("xhcs,bhsd->bhcd", chunk_decay, kz)
    from_start = torch.exp(ld * (pos + 1)).unsqueeze(-1)  # g^(i+1): chunk start to query i
    num = num + from_start * (fq @ state)
    den = den + from_start.squeeze(-1) * (fq @ z.unsqueeze(-1)).squeeze(-1)
    y = num if eps is None else num / (den.unsqueeze(-1) + eps)
    return y.reshape(b, h, nc * c, dv)[:, :, :n]


def final_state(fk: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """State after the last position: S = sum_j g^(N-1-j) phi(k_j) v_j^T, z = sum_j g^(N-1-j) phi(k_j)."""
    n = fk.shape[-2]
    w = torch.exp(log_decay.float().view(1, -1, 1) * (n - 1 - torch.arange(n, device=fk.device)).float())
    s = torch.einsum("bhn,bhnd,bhne->bhde", w.expand(fk.shape[0], -1, -1), fk, v.float())
    z = torch.einsum("bhn,bhnd->bhd", w.expand(fk.shape[0], -1, -1), fk)
    return s, z


def recurrent_step(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    z: torch.Tensor | None,
    log_decay: torch.Tensor,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One position. fq, fk: (B, H, dk), v: (B, H, dv); state (B, H, dk, dv), z (B, H, dk) or None
    (eps=None: no denominator, no z)."""
    g = torch.exp(log_decay.float()).view(1, -1, 1)
    state = g.unsqueeze(-1) * state + fk.unsqueeze(-1) * v.float().unsqueeze(-2)
    num = (fq.unsqueeze(-2) @ state).squeeze(-2)  # (B, H, dv)
    if eps is None:
        return num, state, None
    z = g * z + fk
    den = (fq * z).sum(-1, keepdim=True)
    return num / (den + eps), state, z


def recurrent(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, eps: float | None
) -> torch.Tensor:
    """Reference loop over positions (used by tests and generation)."""
    b, h, n, dk = fq.shape
    state = fq.new_zeros(b, h, dk, v.shape[-1])
    z = None if eps is None else fq.new_zeros(b, h, dk)
    out = []
    for i in range(n):
        y, state, z = recurrent_step(fq[:, :, i], fk[:, :, i], v[:, :, i], state, z, log_decay, eps)
        out.append(y)
    return torch.stack(out, dim=2)
