"""The generation fast path: pre-allocated KV caches / recurrent states and one fused step per layer.

`Transformer.forward` with `LayerCache`s is general (any length, hooks, padding, autocast), and at batch 1
its per-token cost is Python and per-op overhead, not arithmetic: concatenating the KV cache and the key
mask every token, rebuilding position and mask tensors, module dispatch through hook points. A
`Decoder` prefills through that same forward (so the prompt is processed exactly as before), then copies
the caches into buffers sized for the whole generation and runs each new token through plain functional
ops: per layer one LayerNorm, one QKV matmul, an in-place cache write (softmax) or state update (linear),
the attention read, the output projection and the MLP. The attention bias of a step (ALiBi distance
plus the padding mask) is one slice of a precomputed table, shared by every layer.

`generate_cached` is the previous loop, kept as the reference the fast path is tested against (and as
the fallback when a hook is active: hooks need the modules' forward).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from picollm import linear_attention as la
from picollm.errors import PicollmError
from picollm.model import LayerCache, Transformer, sample_next, sinusoidal


def hooks_active(model: Transformer) -> bool:
    return any(h.active for h in model.hook_points().values())


class Decoder:
    """Decoding state of `batch` rows for up to `capacity` positions (prompt + fed tokens). The steps
    are inference only: no dropout (the model as in eval mode) and no hooks (see `generate`)."""

    def __init__(self, model: Transformer, batch: int, capacity: int) -> None:
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.capacity = capacity
        self.softmax = cfg.attention == "softmax"
        p = next(model.parameters())
        dev, h, dh = p.device, cfg.n_heads, cfg.d_head
        self.h, self.dh = h, dh
        self.layers = [self._weights(b) for b in model.blocks]
        # Functional calls on the weights: no module dispatch or hook points per token.
        self.embed_w, self.head_w = model.embed.weight, model.head.weight
        self.lnf = (model.ln_final.weight, model.ln_final.bias, model.ln_final.eps)
        self.ln_eps = model.blocks[0].ln1.eps  # every block's LayerNorms are built alike
        slopes = model.blocks[0].attn.slopes.float()  # every layer shares the one prior
        self.t = 0  # positions written so far (prompt width included)
        if self.softmax:  # keys and values of a layer in one buffer: one copy per step writes both
            self.kv = [torch.zeros(2, batch, h, capacity, dh, device=dev, dtype=p.dtype) for _ in self.layers]
            # rev_bias[:, capacity - 1 - j] = -m_h * j: the ALiBi bias of the key j positions back, so the bias
            # of a step is one slice of it (as Attention._softmax: -slope * distance).
            dist = torch.arange(capacity, device=dev).float()
            self.rev_bias = (-slopes.view(h, 1) * dist).flip(-1).to(p.dtype)  # (H, capacity)
            self.pad_bias = torch.zeros(batch, 1, capacity, device=dev, dtype=p.dtype)  # -inf on padding
        else:
            self.state = [torch.zeros(batch, h, dh, dh, device=dev) for _ in self.layers]
            self.z = [torch.zeros(batch, h, dh, device=dev) for _ in self.layers]
            self.g = torch.exp(-slopes).view(1, h, 1)
            self.g4 = self.g.unsqueeze(-1)
        self.pos: torch.Tensor | None = None  # (B,) position of the next token (real tokens only)
        self.pe_table: torch.Tensor | None = None

    @staticmethod
    def _weights(block: torch.nn.Module) -> tuple[torch.Tensor | None, ...]:
        a, m = block.attn, block.mlp
        return (
            block.ln1.weight,
            block.ln1.bias,
            a.qkv.weight,
            a.out.weight,
            block.ln2.weight,
            block.ln2.bias,
            m.fc.weight,
            m.fc.bias,
            m.proj.weight,
            m.proj.bias,
        )

    @torch.inference_mode()  # cheaper per op than no_grad; the buffers are written in place only
    def prefill(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) through the model's forward; returns the last position's logits (B, V)."""
        b, t = tokens.shape
        if t > self.capacity:
            raise PicollmError(f"prompt of {t} positions exceeds the decoder's capacity {self.capacity}")
        caches = [LayerCache() for _ in self.layers]
        logits = self.model(tokens, key_mask=key_mask, caches=caches)[:, -1]
        for i, c in enumerate(caches):
            if self.softmax:
                self.kv[i][0, :, :, :t] = c.k
                self.kv[i][1, :, :, :t] = c.v
            else:
                self.state[i].copy_(c.state)
                self.z[i].copy_(c.z)
        if self.softmax:
            self.pad_bias[:, 0, :t] = torch.where(key_mask, 0.0, float("-inf"))
        self.t = t
        self.pos = key_mask.long().sum(-1)  # the next token's position: real tokens before it
        cfg = self.cfg
        if cfg.pos_encoding == "sinusoidal":
            last = int(self.pos.max()) + self.capacity - t
            self.pe_table = (0.02 * sinusoidal(torch.arange(last + 1, device=tokens.device), cfg.d_model)).to(
                self.model.embed.weight.dtype
            )
        elif cfg.pos_encoding == "learned":
            assert self.model.pos_embed is not None
            self.pe_table = self.model.pos_embed.weight
        return logits

    def check_positions(self, new_tokens: int) -> None:
        """The learned table's bound, checked up front (the forward raises it at the offending step)."""
        assert self.pos is not None
        if self.cfg.pos_encoding == "learned" and new_tokens > 0:
            last = int(self.pos.max()) + new_tokens - 1
            if last >= self.cfg.max_seq_len:
                raise PicollmError(
                    f"sequence of {last + 1} positions exceeds model.max_seq_len "
                    f"({self.cfg.max_seq_len}) of the learned positional table"
                )

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the next logits (B, V)."""
        assert self.pos is not None
        if self.t >= self.capacity:
            raise PicollmError(f"decoder capacity {self.capacity} reached")
        t = self.t
        x = F.embedding(tokens, self.embed_w)  # (B, d)
        if self.pe_table is not None:
            x = x + self.pe_table[self.pos]
        b = x.shape[0]
        if self.softmax:
            self.pad_bias[:, 0, t] = 0.0  # a generated token is always real
            bias = (self.rev_bias[:, self.capacity - 1 - t :] + self.pad_bias[:, :, : t + 1]).unsqueeze(2)
        eps = self.cfg.linear_eps
        for i, (w1, b1, wqkv, wo, w2, b2, wfc, bfc, wproj, bproj) in enumerate(self.layers):
            hn = F.layer_norm(x, (x.shape[-1],), w1, b1, self.ln_eps)
            qkv = F.linear(hn, wqkv).view(b, 3, self.h, self.dh)  # q, k, v: (B, H, dh) each
            if self.softmax:
                kv = self.kv[i]
                kv[:, :, :, t] = qkv[:, 1:].transpose(0, 1)
                z = F.scaled_dot_product_attention(
                    qkv[:, 0].unsqueeze(2), kv[0, :, :, : t + 1], kv[1, :, :, : t + 1], attn_mask=bias
                )
                z = z.reshape(b, -1)
            else:  # recurrent_step, in place on the pre-allocated state (fp32, as Attention._linear)
                fq, fk = la.feature_map(qkv[:, :2]).unbind(1)  # phi of q and k in one op
                v = qkv[:, 2].float()
                s, zn = self.state[i], self.z[i]
                s.mul_(self.g4).addcmul_(fk.unsqueeze(-1), v.unsqueeze(-2))
                zn.mul_(self.g).add_(fk)
                num = (fq.unsqueeze(-2) @ s).squeeze(-2)
                den = (fq * zn).sum(-1, keepdim=True)
                z = (num / (den + eps)).to(x.dtype).reshape(b, -1)
            x = x + F.linear(z, wo)
            hn = F.layer_norm(x, (x.shape[-1],), w2, b2, self.ln_eps)
            x = x + F.linear(F.gelu(F.linear(hn, wfc, bfc)), wproj, bproj)
        self.t += 1
        self.pos = self.pos + 1
        w, bias_f, eps_f = self.lnf
        return F.linear(F.layer_norm(x, (x.shape[-1],), w, bias_f, eps_f), self.head_w)


def prompt_mask(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) True on real tokens of left-padded prompts; every prompt needs one."""
    key_mask = tokens != model.pad_id
    if not bool(key_mask.any(-1).all()):
        raise PicollmError("every prompt needs at least one token")
    return key_mask


@torch.no_grad()
def generate(
    model: Transformer,
    tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`Transformer.generate` on the fast path (the cached loop when a hook is active): same tokens,
    same sampling, one pre-allocated output."""
    if hooks_active(model):
        return generate_cached(model, tokens, max_new_tokens, temperature, top_k, top_p, generator)
    was_training = model.training
    model.eval()
    try:
        key_mask = prompt_mask(model, tokens)
        b, t = tokens.shape
        dec = Decoder(model, b, t + max(max_new_tokens - 1, 0))
        logits = dec.prefill(tokens, key_mask)
        dec.check_positions(max_new_tokens - 1)
        out = torch.empty(b, t + max_new_tokens, dtype=tokens.dtype, device=tokens.device)
        out[:, :t] = tokens
        for i in range(max_new_tokens):
            nxt = sample_next(logits, model.pad_id, temperature, top_k, top_p, generator)
            out[:, t + i] = nxt
            if i == max_new_tokens - 1:
                break
            logits = dec.step(nxt)
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_cached(
    model: Transformer,
    tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The general loop: the model's forward with growing `LayerCache`s, one token at a time."""
    was_training = model.training
    model.eval()
    try:
        key_mask = prompt_mask(model, tokens)
        caches = [LayerCache() for _ in model.blocks]
        logits = model(tokens, key_mask=key_mask, caches=caches)[:, -1]
        out = tokens
        for i in range(max_new_tokens):
            nxt = sample_next(logits, model.pad_id, temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if i == max_new_tokens - 1:
                break
            key_mask = torch.cat([key_mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], dim=1)
            logits = model(nxt[:, None], key_mask=key_mask, caches=caches)[:, -1]
        return out
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Timing (the bench's generation table)


@torch.no_grad()
def ms_per_token(
    model: Transformer, context: int, new_tokens: int, fast: bool, warmup: int = 3, batch: int = 1
) -> float:
    """Median ms of one greedy decode step of `batch` rows after random prompts of `context` tokens:
    the fast path (`Decoder.step`) or the cached forward (`generate_cached`'s step)."""
    model.eval()
    vocab = model.cfg.vocab_size or 2
    prompt = torch.randint(0, vocab - 1, (batch, context), generator=torch.Generator().manual_seed(context))
    key_mask = torch.ones_like(prompt, dtype=torch.bool)
    if fast:
        dec = Decoder(model, batch, context + warmup + new_tokens)
        logits = dec.prefill(prompt, key_mask)

        def step(nxt: torch.Tensor) -> torch.Tensor:
            return dec.step(nxt)
    else:
        caches = [LayerCache() for _ in model.blocks]
        logits = model(prompt, key_mask=key_mask, caches=caches)[:, -1]
        mask = [key_mask]

        def step(nxt: torch.Tensor) -> torch.Tensor:
            mask[0] = torch.cat([mask[0], torch.ones_like(nxt[:, None], dtype=torch.bool)], dim=1)
            return model(nxt[:, None], key_mask=mask[0], caches=caches)[:, -1]

    return _median_step_ms(step, logits, warmup, new_tokens)


def _median_step_ms(step: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, warmup: int, n: int) -> float:
    times = []
    for i in range(warmup + n):
        nxt = logits.argmax(-1)
        t0 = time.perf_counter()
        logits = step(nxt)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000 if times else math.nan
