"""The (gated) delta rule: DeltaNet (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length") and Gated DeltaNet (Yang et al. 2025).

With the state S (dk, dv) (the transpose of the papers' (dv, dk) S, so y = S^T q):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     y_t = S_t^T q_t

i.e. S_t = alpha_t S_{t-1} + k_t u_t^T with the "new value" u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t): the
state first forgets (alpha), then replaces what it recalled for k_t by v_t, at rate beta. q and k arrive
L2-normalised, beta in [0, 1], log alpha <= 0 (alpha = 1: DeltaNet). A position with beta = 0 and
log alpha = 0 (padding) leaves the state untouched.

Forms, tested against each other on outputs, final state and gradients:
  chunkwise        the WY / UT-transform form: inside a chunk of C, with gamma_i = alpha_1...alpha_i,
                   (I + L) U = diag(beta) V - diag(beta gamma) K S0, L_ij = beta_i (gamma_i/gamma_j) k_i.k_j (j < i),
                   solved by one triangular solve; O = diag(gamma) Q S0 + tril((gamma_i/gamma_j) Q K^T) U,
                   S_end = gamma_C S0 + K^T diag(gamma_C/gamma_j) U. A Python loop over chunks only.
  mixing_matrix    the parallel form with S0 = 0 over the whole sequence: O = P V with
                   P = tril(D * Q K^T) (I + L)^-1 diag(beta), the matrix `hook_pattern` exposes
  recurrent_step   one position (generation); `recurrent` loops it (the reference)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from picollm.model.mixers.feature_maps import at_least_fp32 as _fp32


def _decay(log_alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log gamma (..., N) (inclusive cumulative) and D (..., N, N) = gamma_i / gamma_j on and below the
    diagonal, 0 above."""
    cum = _fp32(log_alpha).cumsum(-1)
    n = log_alpha.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_alpha.device).tril()
    diff = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf"))  # masked before exp
    return cum, diff.exp()


def _solve_unit_lower(kk: torch.Tensor, beta: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(I + L)^-1 rhs with L = strictly-lower part of diag(beta) kk (the UT transform's inverse)."""
    n = kk.shape[-1]
    a = (beta.unsqueeze(-1) * kk).tril(-1) + torch.eye(n, dtype=kk.dtype, device=kk.device)
    return torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)


def chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, H, N, dk) L2-normalised; v: (B, H, N, dv); beta, log_alpha: (B, H, N).
    Returns the outputs (B, H, N, dv) and the final state (B, H, dk, dv)."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    pad = (-n) % c
    q, k, v, beta, log_alpha = (_fp32(t) for t in (q, k, v, beta, log_alpha))
    if pad:  # beta = 0, log alpha = 0: the padded tail neither writes nor forgets
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta, log_alpha = F.pad(beta, (0, pad)), F.pad(log_alpha, (0, pad))
    nc = (n + pad) // c
    q, k, v = (t.reshape(b, h, nc, c, t.shape[-1]) for t in (q, k, v))  # (B, H, nc, C, d)
    beta, log_alpha = beta.reshape(b, h, nc, c), log_alpha.reshape(b, h, nc, c)
    cum, d = _decay(log_alpha)  # (B, H, nc, C), (B, H, nc, C, C)
    gamma = cum.exp().unsqueeze(-1)  # (B, H, nc, C, 1)
    kk = (k @ k.transpose(-1, -2)) * d
    # U = U0 - W S0 per chunk: U0 = T diag(beta) V, W = T diag(beta gamma) K.
    bv = beta.unsqueeze(-1) * v
    bk = beta.unsqueeze(-1) * gamma * k
    tw = _solve_unit_lower(kk, beta, torch.cat([bv, bk], dim=-1))
    u0, w = tw[..., :dv], tw[..., dv:]
    qk = (q @ k.transpose(-1, -2)) * d  # inclusive lower
    to_end = (cum[..., -1:] - cum).exp().unsqueeze(-1)  # gamma_C / gamma_j
    state = q.new_zeros(b, h, dk, dv)
    out = []
    for i in range(nc):
        u = u0[:, :, i] - w[:, :, i] @ state
        out.append(gamma[:, :, i] * (q[:, :, i] @ state) + qk[:, :, i] @ u)
        chunk_g = cum[:, :, i, -1].exp()[..., None, None]  # gamma_C
        state = chunk_g * state + (k[:, :, i] * to_end[:, :, i]).transpose(-1, -2) @ u
    y = torch.stack(out, dim=2).reshape(b, h, nc * c, dv)[:, :, :n]  # (B, H, N, dv)
    return y, state


def mixing_matrix(q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """P (B, H, N, N), lower triangular, with outputs = P @ v from a zero state."""
    q, k, beta = _fp32(q), _fp32(k), _fp32(beta)
    _, d = _decay(log_alpha)
    kk = (k @ k.transpose(-1, -2)) * d
    qk = (q @ k.transpose(-1, -2)) * d
    return qk @ _solve_unit_lower(kk, beta, torch.diag_embed(beta))


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One position. q, k: (B, H, dk), v: (B, H, dv), beta, log_alpha: (B, H); state (B, H, dk, dv)."""
    q, k, v, beta, log_alpha = (_fp32(t) for t in (q, k, v, beta, log_alpha))
    state = log_alpha.exp()[..., None, None] * state
    recalled = (k.unsqueeze(-2) @ state).squeeze(-2)  # S^T k: (B, H, dv)
    u = beta.unsqueeze(-1) * (v - recalled)
    state = state + k.unsqueeze(-1) * u.unsqueeze(-2)
    return (q.unsqueeze(-2) @ state).squeeze(-2), state


def recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, log_alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the recurrence, one position at a time. Returns outputs and the final state."""
    b, h, n, dk = q.shape
    state = _fp32(q).new_zeros(b, h, dk, v.shape[-1])
    out = []
    for i in range(n):
        y, state = recurrent_step(q[:, :, i], k[:, :, i], v[:, :, i], beta[:, :, i], log_alpha[:, :, i], state)
        out.append(y)
    return torch.stack(out, dim=2), state
