"""The generation fast path: pre-allocated KV caches / recurrent states and one fused step per layer.

`Transformer.forward` with `LayerCache`s is general (any length, hooks, padding, autocast), and at batch 1
its per-token cost is Python and per-op overhead, not arithmetic: concatenating the KV cache and the key
mask every token, rebuilding position and mask tensors, module dispatch through hook points. A
`Decoder` prefills through that same forward (so the prompt is processed exactly as before), then copies
the caches into buffers sized for the whole generation and runs each new token through plain functional
ops on the raw weights, about twenty calls per layer:

- the residual adds are fused into the projections (`addmm(x, z, W_out^T)`), the recurrent mixers' gate
  and beta projections into the QKV matmul, and the positional rows of every step are gathered at prefill;
- softmax writes k and v into the cache with one copy and attends over a view of it; with a bias, in
  three calls (baddbmm, softmax, bmm: at one query half the time of scaled_dot_product_attention); the bias
  (ALiBi distance, padding) is one slice of a precomputed table shared by every layer, and is skipped when
  there is none (learned or no positions, no padding); sliding_window attends over its last `window` keys
  only, so its step is flat in context;
- linear and gated_linear update S in place; with a denominator z rides along as an extra value column
  (S' = [S | z], v' = [v | 1], the 1 from the projection's bias), so one matmul gives numerator and
  denominator;
- deltanet and gated_deltanet run the delta rule of `deltanet.recurrent_step` in place on S, their beta
  (and gate) from the same matmul;
- oneDNN is switched off for the step: its per-call set-up (about 10 us for a 512-wide GELU, more than the
  arithmetic) is the largest single cost at batch 1; the native kernels compute the same functions.

What is left is about 45 calls of 1-3 us and the reads of the weights (1.6 MB at the default size) and of
the KV cache. `torch.compile` of the step (CPU, inductor) was measured and is not offered: compiled
0.33 ms/token against 0.29 eager for the same linear step (fixed shapes, position row passed in), after
9-74 s of compiling; compiling `step` as it is recompiles for every position (its int is specialised).
A `Decoder` copies the kernel mixers' fused projection: make a new one after the weights change.

`generate_cached` is the previous loop, kept as the reference the fast path is tested against (and as
the fallback when a hook is active: hooks need the modules' forward).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from picollm.errors import PicollmError
from picollm.model.mixers import feature_maps as fm
from picollm.model.transformer import LayerCache, Transformer, sample_next, sinusoidal


def hooks_active(model: Transformer) -> bool:
    return any(h.active for h in model.hook_points().values())


class _Layer(NamedTuple):
    """One block's weights as the step uses them: projections as (in, out) views for `mm`/`addmm`."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    wqkv_t: torch.Tensor  # (d, out): q, k, v (recurrent: v' = [v | 1] with a denominator, then beta, gate)
    bqkv: torch.Tensor | None  # recurrent: 0 on q, k, v, 1 on v's extra column, then beta's and the gate's bias
    wo_t: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    wfc_t: torch.Tensor
    bfc: torch.Tensor
    wproj_t: torch.Tensor
    bproj: torch.Tensor


class Decoder:
    """Decoding state of `batch` rows for up to `capacity` positions (prompt + fed tokens). The steps
    are inference only: no dropout (the model as in eval mode) and no hooks (see `generate`)."""

    def __init__(self, model: Transformer, batch: int, capacity: int) -> None:
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.capacity = capacity
        self.kind = cfg.attention
        self.softmax = cfg.attention in ("softmax", "sliding_window")  # a KV cache
        self.kernel = cfg.attention in ("linear", "gated_linear")  # S (and z) updated in place here
        self.gated = cfg.attention in ("gated_linear", "gated_deltanet")  # gate logits from the QKV matmul
        self.denominator = cfg.normalizer == "denominator"
        p = next(model.parameters())
        dev, self.dtype = p.device, p.dtype
        h, dh = cfg.n_heads, cfg.d_head
        self.h, self.dh, self.dqk = h, dh, cfg.qk_dim
        self.layers = [self._weights(b) for b in model.blocks]
        self.embed_w, self.head_t = model.embed.weight, model.head.weight.t()
        self.lnf = (model.ln_final.weight, model.ln_final.bias, model.ln_final.eps)
        self.dshape = (cfg.d_model,)
        self.ln_eps = model.blocks[0].ln1.eps  # every block's LayerNorms are built alike
        slopes = model.blocks[0].attn.slopes.float()  # every layer shares the one prior
        self.decay = bool(slopes.any())  # learned / sinusoidal / none positions: no ALiBi, no decay
        self.t0 = self.t = 0  # positions written so far (prompt width included)
        self.pos0: torch.Tensor | None = None  # (B,) position of the first fed token (real tokens only)
        self.pe: torch.Tensor | None = None  # (1 or B, steps, d): the positional row of every fed token
        self.pe_steps = 0  # steps within the learned table
        if self.softmax:  # keys and values of a layer in one buffer: one copy per step writes both
            self.kv = [torch.zeros(2, batch, h, capacity, dh, device=dev, dtype=p.dtype) for _ in self.layers]
            self.k, self.v = [kv[0] for kv in self.kv], [kv[1] for kv in self.kv]
            # rev_bias[:, capacity - 1 - j] = -m_h * j: the ALiBi bias of the key j positions back, so the bias
            # of a step is one slice of it (as Attention._softmax: -slope * distance).
            rev = -slopes.view(h, 1) * torch.arange(capacity, device=dev).float()
            self.rev_bias = rev.flip(-1).to(p.dtype)  # (H, capacity)
            self.pad_bias: torch.Tensor | None = None  # (B, 1, capacity), -inf on prompt padding; None if none
            self.scale = 1.0 / math.sqrt(dh)  # scaled_dot_product_attention's default, as Attention uses
        else:  # filled by prefill (their shapes depend on the mixer)
            self.state: list[torch.Tensor] = []  # (B, H, dk, dv) per layer; with a denominator S' = [S | z]
            self.g4 = torch.exp(-slopes).view(1, h, 1, 1)
        self.fp32 = p.dtype == torch.float32  # the recurrent states are fp32: no casts needed
        self.dv = dh + 1 if self.kernel and self.denominator else dh  # S' = [S | z] carries z as a column

    @torch.no_grad()  # the fused projection of the kernel mixers is a copy: no autograd graph on it
    def _weights(self, block: torch.nn.Module) -> _Layer:
        a, m = block.attn, block.mlp
        wqkv, bqkv = a.qkv.weight, None
        if not self.softmax:  # one addmm: q, k, v' = [v | 1] (a zero row, bias 1), beta and gate logits
            h, dh, n_qk = self.h, self.dh, 2 * self.h * self.dqk
            w_qk, w_v = wqkv[:n_qk], wqkv[n_qk:].view(h, dh, -1)
            b_v = torch.zeros(h, dh, dtype=wqkv.dtype, device=wqkv.device)
            if self.kernel and self.denominator:
                w_v = torch.cat([w_v, w_v.new_zeros(h, 1, w_v.shape[-1])], dim=1)  # (H, dh + 1, d)
                b_v = torch.cat([b_v, b_v.new_ones(h, 1)], dim=1)  # (H, dh + 1)
            extra = [lin for lin in (a.beta, a.gate) if lin is not None]
            wqkv = torch.cat([w_qk, w_v.flatten(0, 1), *(lin.weight for lin in extra)])
            bqkv = torch.cat([w_qk.new_zeros(n_qk), b_v.flatten(), *(lin.bias for lin in extra)])
        return _Layer(
            block.ln1.weight,
            block.ln1.bias,
            wqkv.t(),
            bqkv,
            a.out.weight.t(),
            block.ln2.weight,
            block.ln2.bias,
            m.fc.weight.t(),
            m.fc.bias,
            m.proj.weight.t(),
            m.proj.bias,
        )

    @property
    def pos(self) -> torch.Tensor | None:
        """(B,) position of the next token (real tokens only)."""
        return None if self.pos0 is None else self.pos0 + (self.t - self.t0)

    @torch.inference_mode()  # cheaper per op than no_grad; the buffers are written in place only
    def prefill(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) through the model's forward; returns the last position's logits (B, V)."""
        b, t = tokens.shape
        if t > self.capacity:
            raise PicollmError(f"prompt of {t} positions exceeds the decoder's capacity {self.capacity}")
        caches = [LayerCache() for _ in self.layers]
        logits = self.model(tokens, key_mask=key_mask, caches=caches)[:, -1]
        if not self.softmax:
            self.state = []
        for i, c in enumerate(caches):
            if self.softmax:  # sliding_window's cache holds only the last positions
                n_kept = c.k.shape[2]
                self.kv[i][0, :, :, t - n_kept : t] = c.k
                self.kv[i][1, :, :, t - n_kept : t] = c.v
            elif self.kernel and self.denominator:  # S' = [S | z]: (B, H, dk, dv + 1)
                assert c.state is not None and c.z is not None
                self.state.append(torch.cat([c.state, c.z.unsqueeze(-1)], dim=-1))
            else:  # owned here (the cache's tensors may be views): updated in place by the step
                assert c.state is not None
                self.state.append(c.state.clone(memory_format=torch.contiguous_format))
        if self.softmax and not bool(key_mask.all()):
            self.pad_bias = torch.zeros(b, 1, self.capacity, device=tokens.device, dtype=self.dtype)
            self.pad_bias[:, 0, :t] = torch.where(key_mask, 0.0, float("-inf"))
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
        bias = self._bias(t) if self.softmax else None
        mix = self._attend if self.softmax else self._kernel if self.kernel else self._delta
        for i, w in enumerate(self.layers):
            z = mix(i, w, torch.layer_norm(x, self.dshape, w.ln1_w, w.ln1_b, self.ln_eps), t, bias)  # (B, H * dh)
            x = torch.addmm(x, z, w.wo_t)
            hn = torch.layer_norm(x, self.dshape, w.ln2_w, w.ln2_b, self.ln_eps)
            x = torch.addmm(x, F.gelu(torch.addmm(w.bfc, hn, w.wfc_t)), w.wproj_t).add_(w.bproj)
        self.t = t + 1
        lw, lb, leps = self.lnf
        return torch.mm(torch.layer_norm(x, self.dshape, lw, lb, leps), self.head_t)

    # -- the mixers: (layer, weights, normalised input (B, d), position, bias) -> head outputs (B, H * dh)
    def _window(self, t: int) -> int:
        """First key position a query at t attends to (sliding_window: the last `window` keys only)."""
        return max(0, t + 1 - self.cfg.window) if self.kind == "sliding_window" else 0

    def _bias(self, t: int) -> torch.Tensor | None:
        """The additive bias (B or 1, H, 1, keys) of the query at t over keys window..t, or None."""
        s = self._window(t)
        if not self.decay and self.pad_bias is None:
            return None
        bias = self.rev_bias[:, self.capacity - 1 - t + s :]  # (H, keys)
        if self.pad_bias is not None:
            bias = bias + self.pad_bias[:, :, s : t + 1]  # (B, H, keys)
        return bias.unsqueeze(-2)

    def _attend(self, i: int, w: _Layer, hn: torch.Tensor, t: int, bias: torch.Tensor | None) -> torch.Tensor:
        b = hn.shape[0]
        qkv = torch.mm(hn, w.wqkv_t).view(b, 3, self.h, 1, self.dh).transpose(0, 1)  # (3, B, H, 1, dh)
        self.kv[i].narrow(3, t, 1).copy_(qkv[1:])
        s = self._window(t)
        k, v = self.k[i].narrow(2, s, t + 1 - s), self.v[i].narrow(2, s, t + 1 - s)  # (B, H, keys, dh)
        if bias is None:
            return F.scaled_dot_product_attention(qkv[0], k, v).reshape(b, -1)  # (B, H, 1, dh) -> (B, H * dh)
        # softmax(q k^T / sqrt(dh) + bias) v by hand: at one query, scaled_dot_product_attention with a bias
        # takes about twice as long as these three calls (without one it is the faster). (B, H, ., .) ->
        # (B H, ., .): views of the cache, whose batch and head strides nest.
        q, k, v = qkv[0].flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        bias = bias.expand(b, -1, -1, -1).flatten(0, 1)  # (1 or B, H, 1, keys) -> (B H, 1, keys)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.scale)
        return torch.bmm(torch.softmax(scores, -1), v).view(b, -1)  # (B H, 1, dh) -> (B, H * dh)

    def _kernel(self, i: int, w: _Layer, hn: torch.Tensor, t: int, bias: torch.Tensor | None) -> torch.Tensor:
        """recurrent_step of linear / gated_linear, in place on the state (fp32, as Attention._recurrent)."""
        b, h, dqk, dh, dv = hn.shape[0], self.h, self.dqk, self.dh, self.dv
        proj = torch.addmm(w.bqkv, hn, w.wqkv_t)  # (B, 2 H dqk + H dv [+ H])
        fq, fk = fm.feature_map(proj[:, : 2 * h * dqk].view(b, 2, h, dqk), self.cfg.feature_map).unbind(1)
        v = proj[:, 2 * h * dqk : (2 * dqk + dv) * h].view(b, h, 1, dv)  # v' = [v | 1] with a denominator
        s = self.state[i]  # (B, H, dk, dv)
        self._decay(s, proj[:, (2 * dqk + dv) * h :])
        s.addcmul_(fk.unsqueeze(-1), v if self.fp32 else v.float())
        o = fq.unsqueeze(-2) @ s  # (B, H, 1, dv): with a denominator, the numerator and phi(q).z
        if self.denominator:
            y = o.narrow(-1, 0, dh) / (o.narrow(-1, dh, 1) + self.cfg.linear_eps)
        else:
            y = o * fm.rms_scale(o, self.cfg.linear_eps)
        return (y if self.fp32 else y.to(self.dtype)).reshape(b, -1)  # (B, H, 1, dh) -> (B, H * dh)

    def _delta(self, i: int, w: _Layer, hn: torch.Tensor, t: int, bias: torch.Tensor | None) -> torch.Tensor:
        """deltanet.recurrent_step of deltanet / gated_deltanet, in place on the state (fp32)."""
        b, h, dk, dh = hn.shape[0], self.h, self.dqk, self.dh
        proj = torch.addmm(w.bqkv, hn, w.wqkv_t)  # (B, 2 H dk + H dh + H [+ H])
        qk = proj[:, : 2 * h * dk].view(b, 2, h, dk)
        q, k = F.normalize(qk if self.fp32 else qk.float(), dim=-1).unbind(1)  # (B, H, dk) each
        v = proj[:, 2 * h * dk : (2 * dk + dh) * h].view(b, h, 1, dh)
        beta = torch.sigmoid(proj[:, (2 * dk + dh) * h : (2 * dk + dh + 1) * h].float()).view(b, h, 1, 1)
        s = self.state[i]  # (B, H, dk, dv)
        self._decay(s, proj[:, (2 * dk + dh + 1) * h :])
        u = (v - k.unsqueeze(-2) @ s).mul_(beta)  # beta (v - S^T k): (B, H, 1, dv)
        s.addcmul_(k.unsqueeze(-1), u)
        y = q.unsqueeze(-2) @ s  # (B, H, 1, dv)
        return (y if self.fp32 else y.to(self.dtype)).reshape(b, -1)  # (B, H, 1, dh) -> (B, H * dh)

    def _decay(self, s: torch.Tensor, gate_logits: torch.Tensor) -> None:
        """S *= g: the gate, sigmoid(logits) as exp(log_sigmoid) in the mixers' modules, or the fixed decay."""
        if self.gated:
            s.mul_(F.logsigmoid(gate_logits.float()).exp().view(s.shape[0], self.h, 1, 1))
        elif self.decay:
            s.mul_(self.g4)


def prompt_mask(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) True on real tokens of left-padded prompts; every prompt needs one."""
    key_mask = tokens != model.pad_id
    if not bool(key_mask.any(-1).all()):
        raise PicollmError("every prompt needs at least one token")
    return key_mask


def greedy_next(logits: torch.Tensor, pad_bias: torch.Tensor) -> torch.Tensor:
    """`sample_next` at temperature 0 in two ops: pad_bias (V,) is -inf on padding and 0 elsewhere (fp32, so
    the sum is the fp32 logits with padding excluded, as sample_next's copy)."""
    return (logits + pad_bias).argmax(-1)


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
        pad_bias = torch.zeros(logits.shape[-1], device=tokens.device)
        pad_bias[model.pad_id] = float("-inf")
        for i in range(max_new_tokens):
            if temperature <= 0:
                nxt = greedy_next(logits, pad_bias)
            else:
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
