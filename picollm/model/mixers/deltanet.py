"""The (gated) delta rule: DeltaNet (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length") and Gated DeltaNet (Yang et al. 2025).

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

In the model, q and k are L2-normalised per head and beta_t = sigmoid(w.x_t + b) (starts at 1/2); alpha is
1 (deltanet without ALiBi), the ALiBi decay exp(-m_h) (deltanet with pos_encoding alibi) or a gate
sigmoid(w.x_t + b) started at that decay (gated_deltanet). Padding gets beta 0 (and a gate log alpha 0). The decode
step runs `recurrent_step` in place on S, beta (and the gate) from the same matmul as q, k, v.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from picollm.model.config import ModelConfig
from picollm.model.mixers.base import DecayGate, LayerCache, Mixer
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


# --------------------------------------------------------------------------------------------------
# The mixers


@dataclass
class _Decode:
    wqkv_t: torch.Tensor  # (d, out): q, k, v, then beta's (and the gate's) logits
    bqkv: torch.Tensor
    state: torch.Tensor  # (B, H, dk, dv) fp32, updated in place
    decay: torch.Tensor | None  # (1, H, 1, 1) constant decay, or None


class DeltaNet(Mixer):
    """The delta rule (Yang et al. 2024): S_t = alpha_h (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    y_t = S_t^T q_t, q and k L2-normalised, beta_t = sigmoid(w.x_t + b), a constant alpha_h (ALiBi's decay with
    pos_encoding alibi, else 1)."""

    forms: ClassVar[tuple[str, ...]] = ("chunk", "parallel", "recurrent")
    pattern_label: ClassVar[str] = "the delta rule's value-to-output matrix; entries can be negative"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.beta = nn.Linear(cfg.d_model, cfg.n_heads)  # the write rate per head and token

    @classmethod
    def state_floats(cls, cfg: ModelConfig, context: int) -> int:
        """S: d_head x d_head per head."""
        return cfg.n_heads * cfg.d_head * cfg.d_head

    def reset_parameters(self) -> None:
        nn.init.normal_(self.beta.weight, std=0.02)
        nn.init.zeros_(self.beta.bias)  # beta starts at 1/2

    def mix(self, q, k, v, x, key_mask, cache, form):
        # The state sums over the whole prefix: fp32 even under bf16 autocast.
        with torch.autocast(q.device.type, enabled=False):
            n = q.shape[2]
            m = key_mask[:, -n:][:, None, :].float()  # (B, 1, N)
            x = x.float()
            q, k, v = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1), v.float()
            beta = torch.sigmoid(self.beta(x)).transpose(1, 2) * m  # (B, H, N): 0 on padding
            return self._mix(q, k, v, beta, self.log_gates(x, key_mask[:, -n:]), cache, form)

    def _mix(self, q, k, v, beta, log_alpha, cache, form):
        if cache is not None and not cache.empty:  # generation: one step at a time
            out = []
            for i in range(q.shape[2]):
                y, cache.state = recurrent_step(
                    q[:, :, i], k[:, :, i], v[:, :, i], beta[:, :, i], log_alpha[:, :, i], cache.state
                )
                out.append(y)
            return torch.stack(out, dim=2)
        if form == "parallel" or self.hook_pattern.active:
            y = self.hook_pattern(mixing_matrix(q, k, beta, log_alpha)) @ v
            if cache is None:
                return y
        y_chunk, state = chunkwise(q, k, v, beta, log_alpha, self.cfg.linear_chunk_size)
        if cache is not None:  # prefill
            cache.state = state
        return y if form == "parallel" or self.hook_pattern.active else y_chunk

    # -- decoding -------------------------------------------------------------------------------------
    def decode_extras(self) -> list[nn.Linear]:
        return [self.beta]

    @torch.no_grad()
    def decode_init(self, cache: LayerCache, key_mask: torch.Tensor, capacity: int, shared: dict[str, Any]) -> _Decode:
        assert cache.state is not None
        w = self.qkv.weight
        extras = self.decode_extras()
        wqkv = torch.cat([w, *(lin.weight for lin in extras)])
        bqkv = torch.cat([w.new_zeros(w.shape[0]), *(lin.bias for lin in extras)])
        state = cache.state.clone(memory_format=torch.contiguous_format)  # owned here: updated in place
        return _Decode(wqkv.t(), bqkv, state, self.constant_decay())

    def decode_step(self, st: _Decode, hn: torch.Tensor, t: int, aux: Any) -> torch.Tensor:
        """recurrent_step in place on the state (fp32)."""
        b, h, dk, dh = hn.shape[0], self.n_heads, self.d_qk, self.d_head
        proj = torch.addmm(st.bqkv, hn, st.wqkv_t)  # (B, 2 H dk + H dh + H [+ H])
        q, k = F.normalize(proj[:, : 2 * h * dk].view(b, 2, h, dk).float(), dim=-1).unbind(1)  # (B, H, dk)
        v = proj[:, 2 * h * dk : (2 * dk + dh) * h].view(b, h, 1, dh)
        extra = proj[:, (2 * dk + dh) * h :]
        beta = torch.sigmoid(extra[:, :h].float()).view(b, h, 1, 1)
        s = st.state  # (B, H, dk, dv)
        self.decode_decay(s, st, extra[:, h:])
        u = (v.float() - k.unsqueeze(-2) @ s).mul_(beta)  # beta (v - S^T k): (B, H, 1, dv)
        s.addcmul_(k.unsqueeze(-1), u)
        return (q.unsqueeze(-2) @ s).to(hn.dtype).reshape(b, -1)  # (B, H, 1, dh) -> (B, H * dh)

    def decode_decay(self, s: torch.Tensor, st: _Decode, gate_logits: torch.Tensor) -> None:
        if st.decay is not None:
            s.mul_(st.decay)


class GatedDeltaNet(DeltaNet):
    """The gated delta rule (Gated DeltaNet, Yang et al. 2025): alpha_t = sigmoid(w.x_t + b) per head and token,
    started at the ALiBi decay."""

    def __init__(self, cfg: ModelConfig) -> None:
        Mixer.__init__(self, cfg)
        self.gate = DecayGate(cfg)  # before beta: the order of picollm's seeded init
        self.beta = nn.Linear(cfg.d_model, cfg.n_heads)

    def reset_parameters(self) -> None:
        self.gate.start_at_alibi(self.cfg)
        super().reset_parameters()

    def log_gates(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.gate.log_gates(x, mask)

    def decode_extras(self) -> list[nn.Linear]:
        return [self.beta, self.gate]

    def decode_decay(self, s: torch.Tensor, st: _Decode, gate_logits: torch.Tensor) -> None:
        DecayGate.decay_(s, gate_logits)
