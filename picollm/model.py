"""A small decoder-only Transformer whose attention is softmax or causal linear, chosen by config.

Pre-LayerNorm blocks, GELU MLP, an untied output head by default (on the reference workload it
learned counting and arithmetic faster than a head tied to the embedding; `tie_embeddings` switches).
Positional prior: ALiBi for softmax and the matching per-head decay g_h = exp(-m_h) for linear
attention, so both models share one prior and run on sequences longer than training; slopes are
steeper than the paper's by default (exponent 4, not 8) because 8-32-token sequences need local
heads. `none`, `sinusoidal` and `learned` are also available.

Hook points (TransformerLens names): hook_embed, hook_pos_embed, blocks.{i}.hook_resid_pre,
blocks.{i}.attn.hook_{q,k,v,pattern,z}, blocks.{i}.hook_attn_out, blocks.{i}.hook_resid_mid,
blocks.{i}.mlp.hook_{pre,post}, blocks.{i}.hook_mlp_out, blocks.{i}.hook_resid_post,
ln_final.hook_normalized. Shapes follow TransformerLens: q/k/v/z (batch, pos, head, d_head),
pattern (batch, head, query_pos, key_pos).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from picollm import linear_attention as la
from picollm.config import ModelConfig
from picollm.errors import PicollmError
from picollm.hooks import HookedMixin, HookPoint


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
    """Generation state of one attention layer: keys/values (softmax) or (S, z) (linear)."""

    k: torch.Tensor | None = None  # (B, H, T, dh)
    v: torch.Tensor | None = None
    state: torch.Tensor | None = None  # (B, H, dh, dh) fp32
    z: torch.Tensor | None = None  # (B, H, dh) fp32


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        use_decay = cfg.pos_encoding == "alibi"
        slopes = alibi_slopes(cfg.n_heads, cfg.alibi_exponent) if use_decay else torch.zeros(cfg.n_heads)
        self.register_buffer("slopes", slopes, persistent=False)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: (B, N, d); key_mask: (B, T) True for real tokens, T = cached + N positions."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.d_head).unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, dh)
        if self.cfg.attention == "softmax":
            z = self._softmax(q, k, v, key_mask, cache)
        else:
            z = self._linear(q, k, v, key_mask, cache)
        z = self.hook_z(z.to(x.dtype).transpose(1, 2))  # (B, N, H, dh)
        return self.out(z.reshape(b, n, -1))

    # -- softmax ---------------------------------------------------------------------------------
    def _softmax(self, q, k, v, key_mask, cache):
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            cache.k, cache.v = k, v
        n, t = q.shape[2], k.shape[2]
        qpos = torch.arange(t - n, t, device=q.device)
        kpos = torch.arange(t, device=q.device)
        dist = (qpos[:, None] - kpos[None, :]).float()
        allowed = (dist >= 0) & (key_mask[:, None, :] | (dist == 0))  # (B, N, T); self always allowed
        plain = n == t and bool(key_mask.all()) and not self.slopes.any()
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

    # -- linear ----------------------------------------------------------------------------------
    def _linear(self, q, k, v, key_mask, cache):
        # The state and normaliser sum over the whole prefix: keep them in fp32 even under bf16 autocast.
        with torch.autocast(q.device.type, enabled=False):
            return self._linear_fp32(q, k, v, key_mask, cache)

    def _linear_fp32(self, q, k, v, key_mask, cache):
        n = q.shape[2]
        fq, fk = la.feature_map(q), la.feature_map(k)
        # Mask phi(k), not k: elu(0) + 1 = 1, so a zeroed key would still add weight.
        fk = fk * key_mask[:, None, -n:, None]
        log_decay = -self.slopes
        eps = self.cfg.linear_eps
        if cache is not None and cache.state is not None:  # generation: one step at a time
            out = []
            for i in range(n):
                y, cache.state, cache.z = la.recurrent_step(
                    fq[:, :, i], fk[:, :, i], v[:, :, i], cache.state, cache.z, log_decay, eps
                )
                out.append(y)
            return torch.stack(out, dim=2)
        if self.hook_pattern.active:
            pattern = self.hook_pattern(la.kernel_pattern(fq, fk, log_decay, eps))
            y = pattern @ v.float()
        elif n <= self.cfg.linear_chunk_size:
            y = la.quadratic(fq, fk, v, log_decay, eps)
        else:
            y = la.chunkwise(fq, fk, v, log_decay, eps, self.cfg.linear_chunk_size)
        if cache is not None:  # prefill
            cache.state, cache.z = la.final_state(fk, v, log_decay)
        return y


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
        from picollm import decoding  # decoding imports this module

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
