"""A small decoder-only Transformer whose token mixer is a plugin, chosen by `model.attention` from the
registry of picollm/model/mixers (docs/reference/mixers.md lists them).

Pre-LayerNorm blocks, GELU MLP, an untied output head by default (on the reference workload it
learned counting and arithmetic faster than a head tied to the embedding; `tie_embeddings` switches).
Positional prior: ALiBi for softmax and the matching per-head decay g_h = exp(-m_h) for the mixers with
a fixed decay, so both share one prior and run on sequences longer than training; slopes are steeper than
the paper's by default (exponent 4, not 8) because 8-32-token sequences need local heads. `none`,
`sinusoidal` and `learned` are also available. Gated mixers' gates start at that decay.

Hook points (TransformerLens names): hook_embed, hook_pos_embed, blocks.{i}.hook_resid_pre,
blocks.{i}.attn.hook_{q,k,v,pattern,z}, blocks.{i}.hook_attn_out, blocks.{i}.hook_resid_mid,
blocks.{i}.mlp.hook_{pre,post}, blocks.{i}.hook_mlp_out, blocks.{i}.hook_resid_post,
ln_final.hook_normalized. Shapes follow TransformerLens: q/k/v/z (batch, pos, head, d_head),
pattern (batch, head, query_pos, key_pos). For every mixer pattern @ v is the head output (the recurrent
mixers' pattern is the matrix mapping values to outputs, from their parallel form).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from picollm.errors import PicollmError
from picollm.model import decoding
from picollm.model.config import ModelConfig
from picollm.model.hooks import HookedMixin, HookPoint
from picollm.model.mixers import mixer_class
from picollm.model.mixers.base import LayerCache
from picollm.model.positions import sinusoidal
from picollm.model.sampling import Sampling


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
        self.attn = mixer_class(cfg.attention)(cfg)
        # The mixer's own init before the MLP's (and again after the model's generic init): picollm's order of
        # random draws, so a seed gives the initial weights it always gave (tests/test_legacy_artifacts.py).
        self.attn.reset_parameters()
        self.mlp = MLP(cfg)
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
            block.attn.reset_parameters()
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
        Returns (B, T + max_new_tokens). Runs on picollm.model.decoding's fast path (pre-allocated caches, a
        fused step per layer); `decoding.generate_cached` is the general loop it is tested against.
        """

        return decoding.generate(self, tokens, max_new_tokens, Sampling(temperature, top_k, top_p, generator))
