"""The generation fast path: pre-allocated state and one fused step per layer.

`Transformer.forward` with `LayerCache`s is general (any length, hooks, padding, autocast), and at batch 1
its per-token cost is Python and per-op overhead, not arithmetic: concatenating the KV cache and the key
mask every token, rebuilding position and mask tensors, module dispatch through hook points. A
`Decoder` prefills through that same forward (so the prompt is processed exactly as before), then asks
each layer's mixer for its decode state (`Mixer.begin_decode`: buffers sized for the whole generation, its
projections fused into one matrix) and runs each new token through plain functional ops on the raw
weights, about twenty calls per layer:

- the residual adds are fused into the projections (`addmm(x, z, W_out^T)`), the positional rows of every
  step are gathered at prefill, and the mixer's step (`Mixer.decode`) does the token mixing (each
  mixer module describes its own: a KV cache written in place, or a recurrent state updated in place);
- oneDNN is switched off for the step: its per-call set-up (about 10 us for a 512-wide GELU, more than the
  arithmetic) is the largest single cost at batch 1; the native kernels compute the same functions.

What is left is about 45 calls of 1-3 us and the reads of the weights (1.6 MB at the default size) and of
the KV cache. `torch.compile` of the step (CPU, inductor) was measured and is not offered: compiled
0.33 ms/token against 0.29 eager for the same linear step (fixed shapes, position row passed in), after
9-74 s of compiling; compiling `step` as it is recompiles for every position (its int is specialised).
A `Decoder` copies the mixers' fused projections: make a new one after the weights change.

`generate_cached` is the general loop, kept as the reference the fast path is tested against (and as
the fallback when a hook is active: hooks need the modules' forward). This module takes the model as an
nn.Module with the Transformer's attributes (blocks, embed, ...): the Transformer imports it for `generate`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from picollm.errors import PicollmError
from picollm.model.mixers.base import LayerCache
from picollm.model.positions import sinusoidal
from picollm.model.sampling import Sampling, greedy_next


def hooks_active(model: nn.Module) -> bool:
    return any(h.active for h in model.hook_points().values())


class _Layer(NamedTuple):
    """One block's weights outside its mixer, as the step uses them: projections as (in, out) views."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    wo_t: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    wfc_t: torch.Tensor
    bfc: torch.Tensor
    wproj_t: torch.Tensor
    bproj: torch.Tensor


def _layer(block: nn.Module) -> _Layer:
    a, m = block.attn, block.mlp
    return _Layer(
        block.ln1.weight, block.ln1.bias, a.out.weight.t(), block.ln2.weight, block.ln2.bias,
        m.fc.weight.t(), m.fc.bias, m.proj.weight.t(), m.proj.bias,
    )  # fmt: skip


class Decoder:
    """Decoding state of `batch` rows for up to `capacity` positions (prompt + fed tokens). The steps
    are inference only: no dropout (the model as in eval mode) and no hooks (see `generate`)."""

    def __init__(self, model: nn.Module, batch: int, capacity: int) -> None:
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.capacity = capacity
        self.mixers = [b.attn for b in model.blocks]
        self.layers = [_layer(b) for b in model.blocks]
        self.states: list[Any] = []  # each mixer's decode state, from prefill
        self.dtype = next(model.parameters()).dtype
        self.embed_w, self.head_t = model.embed.weight, model.head.weight.t()
        self.lnf = (model.ln_final.weight, model.ln_final.bias, model.ln_final.eps)
        self.dshape = (cfg.d_model,)
        self.ln_eps = model.blocks[0].ln1.eps  # every block's LayerNorms are built alike
        self.t0 = self.t = 0  # positions written so far (prompt width included)
        self.pos0: torch.Tensor | None = None  # (B,) position of the first fed token (real tokens only)
        self.pe: torch.Tensor | None = None  # (1 or B, steps, d): the positional row of every fed token
        self.pe_steps = 0  # steps within the learned table

    @property
    def pos(self) -> torch.Tensor | None:
        """(B,) position of the next token (real tokens only)."""
        return None if self.pos0 is None else self.pos0 + (self.t - self.t0)

    @torch.inference_mode()  # cheaper per op than no_grad; the buffers are written in place only
    def prefill(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) through the model's forward; returns the last position's logits (B, V)."""
        t = tokens.shape[1]
        if t > self.capacity:
            raise PicollmError(f"prompt of {t} positions exceeds the decoder's capacity {self.capacity}")
        caches = [LayerCache() for _ in self.layers]
        logits = self.model(tokens, key_mask=key_mask, caches=caches)[:, -1]
        shared: dict[str, Any] = {}  # what the layers' decode states share (e.g. a bias table)
        self.states = [
            m.begin_decode(c, key_mask, self.capacity, shared) for m, c in zip(self.mixers, caches, strict=True)
        ]
        self.t0 = self.t = t
        self.pos0 = key_mask.long().sum(-1)  # the first fed token's position: real tokens before it
        self._position_rows(self.capacity - t)
        return logits

    def _position_rows(self, steps: int) -> None:
        """The positional rows of the next `steps` tokens, gathered once: (1, steps, d) when every row is at
        the same position (batch 1, no padding), else (B, steps, d)."""
        cfg, pos0 = self.cfg, self.pos0
        assert pos0 is not None
        if cfg.pos_encoding not in ("learned", "sinusoidal"):
            return
        start = pos0[:1] if bool((pos0 == pos0[0]).all()) else pos0
        idx = start[:, None] + torch.arange(steps, device=pos0.device)  # (1 or B, steps)
        if cfg.pos_encoding == "sinusoidal":
            self.pe = (0.02 * sinusoidal(idx, cfg.d_model)).to(self.dtype)
            self.pe_steps = steps
        else:  # rows past the table are clamped here and refused by step (check_positions up front)
            assert self.model.pos_embed is not None
            self.pe = self.model.pos_embed.weight[idx.clamp(max=cfg.max_seq_len - 1)]
            self.pe_steps = cfg.max_seq_len - int(pos0.max())

    def check_positions(self, new_tokens: int) -> None:
        """The learned table's bound, checked up front (the forward raises it at the offending step)."""
        pos = self.pos
        assert pos is not None
        if self.cfg.pos_encoding == "learned" and new_tokens > 0:
            last = int(pos.max()) + new_tokens - 1
            if last >= self.cfg.max_seq_len:
                raise PicollmError(
                    f"sequence of {last + 1} positions exceeds model.max_seq_len "
                    f"({self.cfg.max_seq_len}) of the learned positional table"
                )

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the next logits (B, V)."""
        if self.pos0 is None:
            raise PicollmError("Decoder.step before prefill")
        if self.t >= self.capacity:
            raise PicollmError(f"decoder capacity {self.capacity} reached")
        if self.pe is not None and self.t - self.t0 >= self.pe_steps:
            self.check_positions(1)
        mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False  # see the module docstring; restored on every way out
        try:
            return self._step(tokens)
        finally:
            torch.backends.mkldnn.enabled = mkldnn

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.t
        x = torch.embedding(self.embed_w, tokens)  # (B, d); torch.* calls skip the F.* Python wrappers
        if self.pe is not None:
            x = x + self.pe[:, t - self.t0]
        aux = self.mixers[0].decode_aux(self.states[0].inner, t)  # once per step, shared by every layer
        for mixer, state, w in zip(self.mixers, self.states, self.layers, strict=True):
            hn = torch.layer_norm(x, self.dshape, w.ln1_w, w.ln1_b, self.ln_eps)
            x = torch.addmm(x, mixer.decode(state, hn, t, aux), w.wo_t)  # (B, H * dh) -> (B, d)
            hn = torch.layer_norm(x, self.dshape, w.ln2_w, w.ln2_b, self.ln_eps)
            x = torch.addmm(x, F.gelu(torch.addmm(w.bfc, hn, w.wfc_t)), w.wproj_t).add_(w.bproj)
        self.t = t + 1
        lw, lb, leps = self.lnf
        return torch.mm(torch.layer_norm(x, self.dshape, lw, lb, leps), self.head_t)


def prompt_mask(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) True on real tokens of left-padded prompts; every prompt needs one."""
    key_mask = tokens != model.pad_id
    if not bool(key_mask.any(-1).all()):
        raise PicollmError("every prompt needs at least one token")
    return key_mask


@torch.no_grad()
def generate(
    model: nn.Module,
    tokens: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    before_token: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """`Transformer.generate` on the fast path (the cached loop when a hook is active): same tokens,
    same sampling, one pre-allocated output. `before_token(i)` is called before the i-th new token is chosen
    (after the prompt for i = 0): a caller's deadline raises from there (the served model's time budget)."""
    if hooks_active(model):
        return generate_cached(model, tokens, max_new_tokens, sampling)
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
        pad_bias = torch.zeros(logits.shape[-1], device=tokens.device)
        pad_bias[model.pad_id] = float("-inf")
        for i in range(max_new_tokens):
            if before_token is not None:
                before_token(i)
            nxt = greedy_next(logits, pad_bias) if sampling.temperature <= 0 else sampling.next(logits, model.pad_id)
            out[:, t + i] = nxt
            if i == max_new_tokens - 1:
                break
            logits = dec.step(nxt)
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_cached(
    model: nn.Module, tokens: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling()
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
            nxt = sampling.next(logits, model.pad_id)
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
def ms_per_token(model: nn.Module, context: int, new_tokens: int, fast: bool, warmup: int = 3, batch: int = 1) -> float:
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
