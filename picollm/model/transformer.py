"""A small decoder-only Transformer whose token mixer is chosen by config: softmax, sliding_window,
linear (kernel), gated_linear, deltanet or gated_deltanet (the math of each recurrent mixer is in its own
module: linear_attention, gated_linear, deltanet, feature_maps).

Pre-LayerNorm blocks, GELU MLP, an untied output head by default (on the reference workload it
learned counting and arithmetic faster than a head tied to the embedding; `tie_embeddings` switches).
Positional prior: ALiBi for softmax and the matching per-head decay g_h = exp(-m_h) for linear
attention, so both models share one prior and run on sequences longer than training; slopes are
steeper than the paper's by default (exponent 4, not 8) because 8-32-token sequences need local
heads. `none`, `sinusoidal` and `learned` are also available. The gated mixers' gates start at that decay.

Hook points (TransformerLens names): hook_embed, hook_pos_embed, blocks.{i}.hook_resid_pre,
blocks.{i}.attn.hook_{q,k,v,pattern,z}, blocks.{i}.hook_attn_out, blocks.{i}.hook_resid_mid,
blocks.{i}.mlp.hook_{pre,post}, blocks.{i}.hook_mlp_out, blocks.{i}.hook_resid_post,
ln_final.hook_normalized. Shapes follow TransformerLens: q/k/v/z (batch, pos, head, d_head),
pattern (batch, head, query_pos, key_pos). For every mixer pattern @ v is the head output (the recurrent
mixers' pattern is the matrix mapping values to outputs, from their parallel form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from picollm.config import ModelConfig
from picollm.errors import PicollmError
from picollm.model.hooks import HookedMixin, HookPoint
from picollm.model.mixers import deltanet as dn
from picollm.model.mixers import feature_maps as fm
from picollm.model.mixers import gated_linear as gl
from picollm.model.mixers import linear_attention as la


def alibi_slopes(n_heads: int, exponent: float = 8.0) -> torch.Tensor:
    """m_h = 2^(-exponent * h / H), h = 1..H (Press et al. 2022 use exponent 8; geometric in h)."""
    return torch.tensor([2.0 ** (-exponent * (h + 1) / n_heads) for h in range(n_heads)])


def sinusoidal(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    half = d_model // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    ang = positions.float().unsqueeze(-1) * freqs
    emb = torch.cat([ang.sin(), ang.cos()], dim=-1)
    return F.pad(emb, (0, d_model - 2 * half))


@dataclass
class LayerCache:
    """Generation state of one attention layer: keys/values (softmax; sliding_window keeps the last
    `window`) or the recurrent state S (+ the normaliser z of a denominator)."""

    k: torch.Tensor | None = None  # (B, H, T, dh)
    v: torch.Tensor | None = None
    state: torch.Tensor | None = None  # (B, H, dk, dv) fp32
    z: torch.Tensor | None = None  # (B, H, dk) fp32


def state_floats(cfg: ModelConfig, context: int) -> int:
    """Floats of generation state per layer and sequence after `context` positions: the KV cache
    (softmax; sliding_window at most `window` positions) or S (dk x dv per head) plus z (dk) for the
    denominator normaliser. dk is the feature size: d_head, or 1 + f + f(f+1)/2 for the taylor map."""
    h, dh = cfg.n_heads, cfg.d_head
    if cfg.attention == "softmax":
        return 2 * h * dh * context
    if cfg.attention == "sliding_window":
        return 2 * h * dh * min(context, cfg.window)
    if cfg.attention in ("linear", "gated_linear"):
        dk = fm.feature_size(cfg.feature_map, cfg.qk_dim)
        return h * (dk * dh + (dk if cfg.normalizer == "denominator" else 0))
    return h * dh * dh


def gate_bias(slopes: torch.Tensor) -> torch.Tensor:
    """b_h with sigmoid(b_h) = exp(-m_h): a gate that starts at the ALiBi decay of its head."""
    g = torch.exp(-slopes).clamp(max=1 - 1e-4)
    return torch.log(g) - torch.log1p(-g)


class Attention(nn.Module):
    """Multi-head token mixing; `cfg.attention` picks the mixer (softmax, sliding_window, linear,
    gated_linear, deltanet, gated_deltanet), whose math lives in its own module."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.attention
        self.n_heads, self.d_head, self.d_qk = cfg.n_heads, cfg.d_head, cfg.qk_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.n_heads * (2 * self.d_qk + self.d_head), bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        use_decay = cfg.pos_encoding == "alibi"
        slopes = alibi_slopes(cfg.n_heads, cfg.alibi_exponent) if use_decay else torch.zeros(cfg.n_heads)
        self.register_buffer("slopes", slopes, persistent=False)
        # Data-dependent scalars per head and token: the decay gate (gated_*) and the write rate beta (delta rule).
        self.gate = nn.Linear(cfg.d_model, cfg.n_heads) if self.kind in ("gated_linear", "gated_deltanet") else None
        self.beta = nn.Linear(cfg.d_model, cfg.n_heads) if self.kind in ("deltanet", "gated_deltanet") else None
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self) -> None:
        """Gates start at the ALiBi decay of each head (whatever pos_encoding says: the gate is the
        gated mixers' positional prior), with small weights; beta starts at 1/2."""
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)
            with torch.no_grad():
                self.gate.bias.copy_(gate_bias(alibi_slopes(self.n_heads, self.cfg.alibi_exponent)))
        if self.beta is not None:
            nn.init.normal_(self.beta.weight, std=0.02)
            nn.init.zeros_(self.beta.bias)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., d_model) -> q, k (..., H, d_qk) and v (..., H, d_head)."""
        h, dqk = self.n_heads, self.d_qk
        qkv = self.qkv(x)
        if dqk == self.d_head:
            # One view then unbind: torch.compile's backward of split + a view of each slice fails on the
            # non-contiguous gradients that follow ("view size is not compatible").
            q, k, v = qkv.unflatten(-1, (3, h, dqk)).unbind(-3)
            return q, k, v
        q, k, v = qkv.split([h * dqk, h * dqk, h * self.d_head], dim=-1)
        return q.unflatten(-1, (h, dqk)), k.unflatten(-1, (h, dqk)), v.unflatten(-1, (h, self.d_head))

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: (B, N, d); key_mask: (B, T) True for real tokens, T = cached + N positions."""
        b, n, _ = x.shape
        q, k, v = self.split_qkv(x)  # (B, N, H, d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        if self.cfg.recurrent:
            # The state and normaliser sum over the whole prefix: keep them in fp32 even under bf16 autocast.
            with torch.autocast(q.device.type, enabled=False):
                z = self._recurrent(q, k, v, x.float(), key_mask[:, -n:], cache)
        else:
            z = self._softmax(q, k, v, key_mask, cache)
        z = self.hook_z(z.to(x.dtype).transpose(1, 2))  # (B, N, H, dh)
        return self.out(z.reshape(b, n, -1))

    # -- softmax and sliding_window -------------------------------------------------------------
    def _softmax(self, q, k, v, key_mask, cache):
        window = self.cfg.window if self.kind == "sliding_window" else None
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            # A window needs only its last `window` keys: the cache stays that size.
            cache.k, cache.v = (k, v) if window is None else (k[:, :, -window:], v[:, :, -window:])
        n, t, total = q.shape[2], k.shape[2], key_mask.shape[1]
        qpos = torch.arange(total - n, total, device=q.device)
        kpos = torch.arange(total - t, total, device=q.device)
        key_mask = key_mask[:, -t:]
        dist = (qpos[:, None] - kpos[None, :]).float()
        allowed = (dist >= 0) & (key_mask[:, None, :] | (dist == 0))  # (B, N, T); self always allowed
        if window is not None:
            allowed = allowed & (dist < window)
        plain = n == t and window is None and bool(key_mask.all()) and not self.slopes.any()
        if self.hook_pattern.active:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)
            scores = scores - self.slopes.view(1, -1, 1, 1) * dist.clamp(min=0)
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            pattern = self.hook_pattern(scores.float().softmax(-1))
            return pattern.to(v.dtype) @ v
        drop = self.dropout if self.training else 0.0
        if plain:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        bias = (-self.slopes.view(1, -1, 1, 1) * dist.clamp(min=0)).to(q.dtype)
        bias = bias.masked_fill(~allowed[:, None], float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)

    # -- the recurrent family --------------------------------------------------------------------
    def log_gates(self, x: torch.Tensor) -> torch.Tensor:
        """log g_t = log_sigmoid(w.x_t + b): (..., d_model) -> (..., H), <= 0."""
        assert self.gate is not None
        return F.logsigmoid(self.gate(x))

    def _recurrent(self, q, k, v, x, mask, cache):
        """q, k, v: (B, H, N, d); x: (B, N, d_model) fp32 (the gates' input); mask: (B, N) real tokens."""
        q, k, v = q.float(), k.float(), v.float()
        b, h, n, _ = q.shape
        m = mask[:, None, :].float()  # (B, 1, N)
        # Padding: the gate is 1 (log 0) and beta 0 there, so a padded position changes no state.
        if self.gate is not None:
            log_g = self.log_gates(x).transpose(1, 2) * m  # (B, H, N)
        else:
            log_g = (-self.slopes.float()).view(1, h, 1).expand(b, h, n)
        if self.kind in ("linear", "gated_linear"):
            return self._kernel(q, k, v, log_g, mask, cache)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        assert self.beta is not None
        beta = torch.sigmoid(self.beta(x)).transpose(1, 2) * m  # (B, H, N)
        if cache is not None and cache.state is not None:  # generation: one step at a time
            out = []
            for i in range(n):
                y, cache.state = dn.recurrent_step(
                    q[:, :, i], k[:, :, i], v[:, :, i], beta[:, :, i], log_g[:, :, i], cache.state
                )
                out.append(y)
            return torch.stack(out, dim=2)
        if self.hook_pattern.active:
            pattern = self.hook_pattern(dn.mixing_matrix(q, k, beta, log_g))
            y = pattern @ v
            if cache is None:
                return y
        y_chunk, state = dn.chunkwise(q, k, v, beta, log_g, self.cfg.linear_chunk_size)
        if cache is not None:  # prefill
            cache.state = state
        return y if self.hook_pattern.active else y_chunk

    def _kernel(self, q, k, v, log_g, mask, cache):
        """linear and gated_linear: phi features, then the fixed-decay or gated forms."""
        cfg = self.cfg
        fq, fk = fm.feature_map(q, cfg.feature_map), fm.feature_map(k, cfg.feature_map)
        # Mask phi(k), not k: elu(0) + 1 = 1, so a zeroed key would still add weight.
        fk = fk * mask[:, None, :, None]
        eps = cfg.linear_eps if cfg.normalizer == "denominator" else None
        gated = self.gate is not None
        log_decay = -self.slopes
        n = q.shape[2]
        if cache is not None and cache.state is not None:  # generation: one step at a time
            out = []
            for i in range(n):
                y, cache.state, cache.z = self.kernel_step(
                    fq[:, :, i], fk[:, :, i], v[:, :, i], log_g[:, :, i], cache.state, cache.z
                )
                out.append(y)
            return torch.stack(out, dim=2)
        if self.hook_pattern.active:
            pattern = gl.kernel_pattern(fq, fk, log_g, eps) if gated else la.kernel_pattern(fq, fk, log_decay, eps)
            if eps is None:  # the RMSNorm's 1/rms is one scalar per (row, head): fold it into the row
                pattern = pattern * fm.rms_scale(pattern @ v, cfg.linear_eps)
            y = self.hook_pattern(pattern) @ v
        else:
            if gated:
                y = (
                    gl.quadratic(fq, fk, v, log_g, eps)
                    if n <= cfg.linear_chunk_size
                    else gl.chunkwise(fq, fk, v, log_g, eps, cfg.linear_chunk_size)
                )
            elif n <= cfg.linear_chunk_size:
                y = la.quadratic(fq, fk, v, log_decay, eps)
            else:
                y = la.chunkwise(fq, fk, v, log_decay, eps, cfg.linear_chunk_size)
            if eps is None:
                y = y * fm.rms_scale(y, cfg.linear_eps)
        if cache is not None:  # prefill
            cache.state, z = gl.final_state(fk, v, log_g) if gated else la.final_state(fk, v, log_decay)
            cache.z = z if eps is not None else None
        return y

    def kernel_step(self, fq, fk, v, log_g, state, z):
        """One position of linear / gated_linear from features (B, H, dk), v (B, H, dv), log_g (B, H)."""
        eps = self.cfg.linear_eps if self.cfg.normalizer == "denominator" else None
        if self.gate is not None:
            y, state, z = gl.recurrent_step(fq, fk, v, log_g, state, z, eps)
        else:
            y, state, z = la.recurrent_step(fq, fk, v, state, z, -self.slopes, eps)
        if eps is None:
            y = y * fm.rms_scale(y, self.cfg.linear_eps)
        return y, state, z


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_width)
        self.proj = nn.Linear(cfg.mlp_width, cfg.d_model)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.hook_post(F.gelu(self.hook_pre(self.fc(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.drop(self.hook_attn_out(self.attn(self.ln1(x), key_mask, cache))))
        x = self.hook_resid_post(x + self.drop(self.hook_mlp_out(self.mlp(self.ln2(x)))))
        return x


class FinalNorm(nn.LayerNorm):
    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(super().forward(x))


class Transformer(HookedMixin, nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise PicollmError("model.vocab_size must be set")
        self.cfg = cfg
        self.pad_id = cfg.pad_token
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = FinalNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init)
        for block in self.blocks:  # after _init, which would zero the gates' biases
            block.attn.reset_mixer_parameters()
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.out.weight", "mlp.proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        self._name_hook_points()

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # -- bookkeeping -----------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self) -> int:
        """Weights used in matrix multiplies per token (the 6N FLOPs rule): all Linear layers."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # -- forward ---------------------------------------------------------------------------------
    def _positions(self, key_mask: torch.Tensor, n: int) -> torch.Tensor:
        # Count only real tokens, so left padding does not shift positions.
        pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
        if self.pos_embed is not None and int(pos.max()) >= self.cfg.max_seq_len:
            raise PicollmError(
                f"sequence of {int(pos.max()) + 1} positions exceeds model.max_seq_len "
                f"({self.cfg.max_seq_len}) of the learned positional table"
            )
        return pos

    def forward(
        self,
        tokens: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        caches: list[LayerCache] | None = None,
    ) -> torch.Tensor:
        """tokens: (B, N) -> logits (B, N, vocab). Pad tokens are masked as keys automatically;
        with `caches`, key_mask covers the cached positions too."""
        if key_mask is None:
            key_mask = tokens != self.pad_id
        n = tokens.shape[1]
        x = self.hook_embed(self.embed(tokens))
        if self.cfg.pos_encoding in ("learned", "sinusoidal"):
            pos = self._positions(key_mask, n)
            if self.pos_embed is not None:
                pe = self.pos_embed(pos)
            else:  # at the embedding's init scale: unit-amplitude waves would drown the token signal
                pe = 0.02 * sinusoidal(pos, self.cfg.d_model)
            x = x + self.hook_pos_embed(pe.to(x.dtype))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, key_mask, None if caches is None else caches[i])
        return self.head(self.ln_final(x))

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue (B, T) prompts (left-padded with pad_id when lengths differ).

        Softmax attention keeps a KV cache, linear attention its O(1) recurrent state.
        temperature 0 is greedy; otherwise sample, optionally restricted by top-k and/or top-p.
        Returns (B, T + max_new_tokens). Runs on picollm.decoding's fast path (pre-allocated caches, a
        fused step per layer); `decoding.generate_cached` is the general loop it is tested against.
        """
        from picollm.model import decoding as decoding  # decoding imports this module

        return decoding.generate(self, tokens, max_new_tokens, temperature, top_k, top_p, generator)


def sample_next(
    logits: torch.Tensor,
    pad_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    logits = logits.float().clone()
    logits[:, pad_id] = float("-inf")  # never emit padding
    if temperature <= 0:
        return logits.argmax(-1)
    # Shifted so the best logit is 0 before dividing: a tiny temperature (1e-45) then gives 0 and -inf
    # (greedy in effect) instead of inf - inf = NaN; clamped to float32's range (1e300 would be inf, and
    # -inf / inf is NaN).
    logits = (logits - logits.amax(-1, keepdim=True)) / min(max(temperature, 1e-30), 1e30)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # and never less than the best token (top_p 0 would leave nothing to sample)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
