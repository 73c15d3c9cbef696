"""Linear attention (Katharopoulos et al. 2020) and gated linear attention (GLA's / Mamba-2's scalar gate):
one computation, whose decay is a constant per head (linear: the ALiBi decay g_h = exp(-m_h), or none) or
data-dependent per head and token (gated_linear: g_t = sigmoid(w.x_t + b)).

    S_t = g_t S_{t-1} + phi(k_t) v_t^T,    z_t = g_t z_{t-1} + phi(k_t)
    y_t = phi(q_t)^T S_t / (phi(q_t).z_t + eps)      (normalizer rmsnorm: the numerator, then RMSNorm per head)

so y_i = sum_{j<=i} (g_{j+1} ... g_i) phi(q_i).phi(k_j) v_j / (...). phi is a feature map of
picollm.model.mixers.feature_maps (elu+1, relu, Based's Taylor map). The forms take the log gates
log g (B, H, N) <= 0; a position whose log g is 0 and whose features are 0 (padding) changes nothing:

  kernel_pattern / quadratic   the masked (N, N) kernel weights: fastest at short lengths, and the pattern
  chunkwise                    quadratic inside chunks of C, the (dk, dv) state carried across chunks, all
                               chunks at once: O(N C dk + N dk dv)
  recurrent_step / recurrent   one position (generation) / the reference loop
Everything runs in fp32 (float64 stays), and cumulative log gates in float64: state and normaliser sum over
the whole sequence, and exp(cum_i - cum_j) of a long constant decay would otherwise lose digits.

The decode step updates S in place; with a denominator z rides along as an extra value column
(S' = [S | z], v' = [v | 1], the 1 from the fused projection's bias), so one matmul gives numerator and
denominator, and a gate's logits come from the same matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from picollm.model.config import ModelConfig
from picollm.model.mixers import feature_maps as fm
from picollm.model.mixers.base import DecayGate, LayerCache, Mixer

_fp32 = fm.at_least_fp32


def _cum(log_g: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum of log gates in float64 (exact enough for any length)."""
    return log_g.double().cumsum(-1)


def _pairwise(cum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(cum_i - cum_j) on and below the diagonal, 0 above: (..., N) -> (..., N, N)."""
    n = cum.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=cum.device).tril()
    # Masked before exp: above the diagonal cum_i - cum_j > 0 could overflow.
    return (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp().to(dtype)


def decay_matrix(log_g: torch.Tensor) -> torch.Tensor:
    """(..., N) log gates -> (..., N, N) with prod_{l=j+1..i} g_l on and below the diagonal, 0 above."""
    return _pairwise(_cum(log_g), _fp32(log_g).dtype)


def normalise(scores: torch.Tensor, eps: float | None) -> torch.Tensor:
    return scores if eps is None else scores / (scores.sum(-1, keepdim=True) + eps)


def kernel_pattern(fq: torch.Tensor, fk: torch.Tensor, log_g: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Kernel weights A (B, H, N, N), normalised unless eps is None, with y = A @ v exactly."""
    return normalise((fq @ fk.transpose(-1, -2)) * decay_matrix(log_g), eps)


def quadratic(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor, eps: float | None
) -> torch.Tensor:
    """fq, fk: (B, H, N, dk) fp32 features (fk zeroed on padding); v: (B, H, N, dv); log_g: (B, H, N)."""
    return kernel_pattern(fq, fk, log_g, eps) @ _fp32(v)


def chunkwise(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor, eps: float | None, chunk_size: int
) -> torch.Tensor:
    """Quadratic inside chunks of C; the state entering every chunk from the chunks before it, all at once."""
    b, h, n, dk = fq.shape
    dv, c = v.shape[-1], chunk_size
    pad = (-n) % c
    v = _fp32(v)
    if pad:  # zero features and log g = 0: the padded tail adds nothing and decays nothing
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
        log_g = F.pad(log_g, (0, pad))
    nc, dt = (n + pad) // c, fq.dtype
    fq, fk, v = (t.reshape(b, h, nc, c, t.shape[-1]) for t in (fq, fk, v))  # (B, H, nc, C, d)
    cum = _cum(log_g.reshape(b, h, nc, c))  # log g_1 ... g_i from the chunk start, inclusive (float64)
    scores = (fq @ fk.transpose(-1, -2)) * _pairwise(cum, dt)  # intra-chunk: (B, H, nc, C, C)
    to_end = (cum[..., -1:] - cum).exp().to(dt)  # key j to its chunk's end
    kv = torch.einsum("bhcj,bhcjd,bhcje->bhcde", to_end, fk, v)  # each chunk's state at its end, from it alone
    kz = torch.einsum("bhcj,bhcjd->bhcd", to_end, fk)
    total = cum[..., -1].cumsum(-1)  # (B, H, nc): log decay from the start to each chunk's end
    # Chunk s reaches the start of chunk c > s decayed by exp(total_{c-1} - total_s).
    entering = total - cum[..., -1]  # total_{c-1}
    gap = (entering.unsqueeze(-1) - total.unsqueeze(-2)).masked_fill(
        ~torch.ones(nc, nc, dtype=torch.bool, device=fq.device).tril(-1), float("-inf")
    )
    carry = gap.exp().to(dt)  # (B, H, nc, nc)
    state = torch.einsum("bhcs,bhsde->bhcde", carry, kv)  # the state entering each chunk
    z = torch.einsum("bhcs,bhsd->bhcd", carry, kz)
    from_start = cum.exp().to(dt).unsqueeze(-1)  # chunk-start state to query i
    num = scores @ v + from_start * (fq @ state)
    if eps is None:
        y = num
    else:
        den = scores.sum(-1) + from_start.squeeze(-1) * (fq @ z.unsqueeze(-1)).squeeze(-1)
        y = num / (den.unsqueeze(-1) + eps)
    return y.reshape(b, h, nc * c, dv)[:, :, :n]  # (B, H, N, dv)


def final_state(fk: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """State after the last position: S = sum_j (g_{j+1}...g_N) phi(k_j) v_j^T, and z likewise."""
    cum = _cum(log_g)
    w = (cum[..., -1:] - cum).exp().to(fk.dtype)  # (B, H, N)
    return torch.einsum("bhn,bhnd,bhne->bhde", w, fk, _fp32(v)), torch.einsum("bhn,bhnd->bhd", w, fk)


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


# --------------------------------------------------------------------------------------------------
# The mixers


@dataclass
class _Decode:
    wqkv_t: torch.Tensor  # (d, out): q, k, v' = [v | 1] with a denominator, then the extras' logits
    bqkv: torch.Tensor  # 0 on q, k, v, 1 on v's extra column, then the extras' biases
    state: torch.Tensor  # (B, H, dk, dv); with a denominator S' = [S | z]
    decay: torch.Tensor | None  # (1, H, 1, 1) constant decay, or None (none, or a gate)
    eps: float | None  # the denominator's, or None: the per-head RMSNorm (looked up once, not every step)
    rms_eps: float


class Linear(Mixer):
    """Kernel attention (Katharopoulos et al. 2020): S_t = g_h S_{t-1} + phi(k_t) v_t^T, y_t = phi(q_t).S_t /
    phi(q_t).z_t, with a constant decay g_h per head (ALiBi's with pos_encoding alibi, else 1)."""

    options: ClassVar[frozenset[str]] = frozenset({"feature_map", "normalizer", "feature_dim"})
    forms: ClassVar[tuple[str, ...]] = ("chunk", "quadratic", "recurrent")
    pattern_label: ClassVar[str] = "kernel weights"
    js_kernel: ClassVar[str | None] = "kernel"

    @classmethod
    def js_forward(cls, cfg: ModelConfig) -> dict[str, Any] | None:
        """elu and relu feature maps (not Taylor's), either normaliser."""
        spec = super().js_forward(cfg)
        if spec is None or cfg.feature_map not in ("elu", "relu"):
            return None
        return {**spec, "feature_map": cfg.feature_map, "normalizer": cfg.normalizer, "eps": cfg.linear_eps}

    @classmethod
    def _taylor(cls, cfg: ModelConfig) -> bool:
        return "feature_map" in cls.options and cfg.feature_map == "taylor"

    @classmethod
    def qk_dim(cls, cfg: ModelConfig) -> int:
        """feature_dim for the taylor map (its features grow quadratically), else d_head."""
        return (cfg.feature_dim or cfg.d_head) if cls._taylor(cfg) else cfg.d_head

    @classmethod
    def applicable_options(cls, cfg: ModelConfig) -> frozenset[str]:
        """feature_dim only with the taylor map."""
        return cls.options if cls._taylor(cfg) else cls.options - {"feature_dim"}

    @classmethod
    def state_floats(cls, cfg: ModelConfig, context: int) -> int:
        """S (dk x dv per head) plus z (dk) for a denominator; dk is the feature size."""
        dk = fm.feature_size(cfg.feature_map, cls.qk_dim(cfg))
        return cfg.n_heads * (dk * cfg.d_head + (dk if cfg.normalizer == "denominator" else 0))

    # -- what the variants change ---------------------------------------------------------------------
    @property
    def eps(self) -> float | None:
        """The denominator's eps, or None: the numerator alone, RMS-normalised per head."""
        return self.cfg.linear_eps if self.cfg.normalizer == "denominator" else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return fm.feature_map(x, self.cfg.feature_map)

    # -- the forward ----------------------------------------------------------------------------------
    def mix(self, q, k, v, x, key_mask, cache, form):
        # The state and normaliser sum over the whole prefix: fp32 even under bf16 autocast.
        with torch.autocast(q.device.type, enabled=False):
            n = q.shape[2]
            mask = key_mask[:, -n:]
            log_g = self.log_gates(x.float(), mask)  # (B, H, N)
            fq, fk = self.features(q.float()), self.features(k.float())
            fk = fk * mask[:, None, :, None]  # mask phi(k), not k: elu(0) + 1 = 1 would still add weight
            return self._mix(fq, fk, v.float(), log_g, cache, form)

    def _mix(self, fq, fk, v, log_g, cache, form):
        eps, n = self.eps, fq.shape[2]
        if cache is not None and not cache.empty:  # generation: one step at a time from the cached state
            out = []
            for i in range(n):
                y, cache.state, cache.z = recurrent_step(
                    fq[:, :, i], fk[:, :, i], v[:, :, i], log_g[:, :, i], cache.state, cache.z, eps
                )
                out.append(y)
            y = torch.stack(out, dim=2)
            return y if eps is not None else y * fm.rms_scale(y, self.cfg.linear_eps)
        if self.hook_pattern.active:
            pattern = kernel_pattern(fq, fk, log_g, eps)
            if eps is None:  # the RMSNorm's 1/rms is one scalar per (row, head): fold it into the row
                pattern = pattern * fm.rms_scale(pattern @ v, self.cfg.linear_eps)
            y = self.hook_pattern(pattern) @ v
        else:
            quad = form == "quadratic" or (form is None and n <= self.cfg.linear_chunk_size)
            y = (
                quadratic(fq, fk, v, log_g, eps)
                if quad
                else chunkwise(fq, fk, v, log_g, eps, self.cfg.linear_chunk_size)
            )
            if eps is None:
                y = y * fm.rms_scale(y, self.cfg.linear_eps)
        if cache is not None:  # prefill
            cache.state, z = final_state(fk, v, log_g)
            cache.z = z if eps is not None else None
        return y

    # -- decoding -------------------------------------------------------------------------------------
    @torch.no_grad()  # the fused projection is a copy: no autograd graph on it
    def decode_init(self, cache: LayerCache, key_mask: torch.Tensor, capacity: int, shared: dict[str, Any]) -> _Decode:
        assert cache.state is not None
        w = self.qkv.weight
        h, dh, n_qk = self.n_heads, self.d_head, 2 * self.n_heads * self.d_qk
        w_qk, w_v = w[:n_qk], w[n_qk:].view(h, dh, -1)
        b_v = w.new_zeros(h, dh)
        state = cache.state.clone(memory_format=torch.contiguous_format)  # owned here: updated in place
        if self.eps is not None:  # v' = [v | 1] (a zero row, bias 1), S' = [S | z]
            w_v = torch.cat([w_v, w_v.new_zeros(h, 1, w_v.shape[-1])], dim=1)
            b_v = torch.cat([b_v, b_v.new_ones(h, 1)], dim=1)
            assert cache.z is not None
            state = torch.cat([cache.state, cache.z.unsqueeze(-1)], dim=-1)
        extras = self.decode_extras()
        wqkv = torch.cat([w_qk, w_v.flatten(0, 1), *(lin.weight for lin in extras)])
        biases = (lin.bias if lin.bias is not None else w.new_zeros(lin.out_features) for lin in extras)
        bqkv = torch.cat([w.new_zeros(n_qk), b_v.flatten(), *biases])
        return _Decode(wqkv.t(), bqkv, state, self.constant_decay(), self.eps, self.cfg.linear_eps)

    def decode_step(self, st: _Decode, hn: torch.Tensor, t: int, aux: Any) -> torch.Tensor:
        """recurrent_step in place on the state (fp32, as `mix`)."""
        b, h, dqk, dh = hn.shape[0], self.n_heads, self.d_qk, self.d_head
        dv = st.state.shape[-1]
        proj = torch.addmm(st.bqkv, hn, st.wqkv_t)  # (B, 2 H dqk + H dv + extras)
        fq, fk = self.features(proj[:, : 2 * h * dqk].view(b, 2, h, dqk)).unbind(1)
        v = proj[:, 2 * h * dqk : (2 * dqk + dv) * h].view(b, h, 1, dv)  # v' = [v | 1] with a denominator
        extra = proj[:, (2 * dqk + dv) * h :]
        s = st.state  # (B, H, dk, dv)
        self.decode_decay(s, st, extra)
        s.addcmul_(fk.unsqueeze(-1), v.float())
        o = fq.unsqueeze(-2) @ s  # (B, H, 1, dv): with a denominator, the numerator and phi(q).z
        if st.eps is not None:
            y = o.narrow(-1, 0, dh) / (o.narrow(-1, dh, 1) + st.eps)
        else:
            y = o * fm.rms_scale(o, st.rms_eps)
        return self.decode_output(y.to(hn.dtype).reshape(b, -1), extra)  # (B, H, 1, dh) -> (B, H * dh)

    def decode_decay(self, s: torch.Tensor, st: _Decode, extra: torch.Tensor) -> None:
        """S *= g before the write: the constant decay (or nothing)."""
        if st.decay is not None:
            s.mul_(st.decay)

    def decode_output(self, y: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return y


class GatedLinear(Linear):
    """Linear attention whose decay is a gate per head and token, g_t = sigmoid(w.x_t + b) (GLA / Mamba-2's
    scalar gate), started at the ALiBi decay of each head whatever pos_encoding says."""

    pattern_label: ClassVar[str] = "gated kernel weights"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.gate = DecayGate(cfg)

    def reset_parameters(self) -> None:
        self.gate.start_at_alibi(self.cfg)

    def log_gates(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.gate.log_gates(x, mask)

    def decode_extras(self) -> list[nn.Linear]:
        return [self.gate]

    def decode_decay(self, s: torch.Tensor, st: _Decode, extra: torch.Tensor) -> None:
        DecayGate.decay_(s, extra[:, : self.n_heads])
