"""Softmax attention (with the ALiBi bias when pos_encoding is alibi) and its sliding-window variant.

    z_i = sum_{j<=i} softmax_j(q_i.k_j / sqrt(d) - m_h (i - j)) v_j        (sliding_window: i - j < window)

Forms: `sdpa` (torch's scaled_dot_product_attention, causal or with an additive bias), `pattern` (the
explicit (N, N) weights, what hook_pattern shows) and `recurrent` (a growing KV cache, one query at a time).
The decode step writes k and v into a pre-allocated cache and attends over a view of it; with a bias, in
three calls (baddbmm, softmax, bmm: at one query half the time of scaled_dot_product_attention); the bias
(ALiBi distance, padding) is one slice of a table every layer shares, and is skipped when there is none.
sliding_window attends over its last `window` keys only, so its step is flat in context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from picollm.model.config import ModelConfig
from picollm.model.mixers.base import LayerCache, Mixer


@dataclass
class _BiasTable:
    """The decode step's additive bias, built once and shared by every layer."""

    rev_bias: torch.Tensor  # (H, capacity): rev_bias[:, capacity - 1 - j] = -m_h * j, the ALiBi bias j keys back
    pad_bias: torch.Tensor | None  # (B, 1, capacity), -inf on prompt padding; None if there is none
    capacity: int
    decay: bool  # False with learned / sinusoidal / no positions: no ALiBi bias


@dataclass
class _Decode:
    wqkv_t: torch.Tensor  # (d, 3 H dh)
    kv: torch.Tensor  # (2, B, H, capacity, dh): keys and values in one buffer, one copy per step writes both
    table: _BiasTable


class Softmax(Mixer):
    """z_i = sum_j softmax_j(q_i.k_j / sqrt(d) - m_h (i - j)) v_j over every earlier position j (the ALiBi bias
    m_h with pos_encoding alibi, else none)."""

    forms: ClassVar[tuple[str, ...]] = ("sdpa", "pattern", "recurrent")
    pattern_label: ClassVar[str] = "softmax weights"
    js_kernel: ClassVar[str | None] = "softmax"
    window: int | None = None  # keys at most window - 1 positions back; None: every earlier key

    @classmethod
    def js_forward(cls, cfg: ModelConfig) -> dict[str, Any] | None:
        spec = super().js_forward(cfg)
        if spec is not None:
            spec["window"] = cfg.window if "window" in cls.options else None
        return spec

    @classmethod
    def state_floats(cls, cfg: ModelConfig, context: int) -> int:
        """The KV cache: keys and values of every position kept."""
        return 2 * cfg.n_heads * cfg.d_head * context

    def mix(self, q, k, v, x, key_mask, cache, form):
        window = self.window
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
        if form == "pattern" or self.hook_pattern.active:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)
            scores = scores - self.slopes.view(1, -1, 1, 1) * dist.clamp(min=0)
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            pattern = self.hook_pattern(scores.float().softmax(-1))
            return pattern.to(v.dtype) @ v
        drop = self.dropout if self.training else 0.0
        if n == t and window is None and bool(key_mask.all()) and not self.slopes.any():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        bias = (-self.slopes.view(1, -1, 1, 1) * dist.clamp(min=0)).to(q.dtype)
        bias = bias.masked_fill(~allowed[:, None], float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)

    # -- decoding -----------------------------------------------------------------------------------
    def decode_init(self, cache: LayerCache, key_mask: torch.Tensor, capacity: int, shared: dict[str, Any]) -> _Decode:
        assert cache.k is not None and cache.v is not None
        w = self.qkv.weight
        b, t = key_mask.shape
        if "softmax_bias" not in shared:
            # The bias of a step is one slice of rev_bias (as `mix`: -slope * distance).
            rev = -self.slopes.float().view(-1, 1) * torch.arange(capacity, device=w.device).float()
            pad_bias = None
            if not bool(key_mask.all()):
                pad_bias = torch.zeros(b, 1, capacity, device=w.device, dtype=w.dtype)
                pad_bias[:, 0, :t] = torch.where(key_mask, 0.0, float("-inf"))
            shared["softmax_bias"] = _BiasTable(rev.flip(-1).to(w.dtype), pad_bias, capacity, bool(self.slopes.any()))
        kv = torch.zeros(2, b, self.n_heads, capacity, self.d_head, device=w.device, dtype=w.dtype)
        n_kept = cache.k.shape[2]  # sliding_window's cache holds only the last positions
        kv[0, :, :, t - n_kept : t] = cache.k
        kv[1, :, :, t - n_kept : t] = cache.v
        return _Decode(w.t(), kv, shared["softmax_bias"])

    def _first_key(self, t: int) -> int:
        """First key position a query at t attends to (sliding_window: the last `window` keys only)."""
        return 0 if self.window is None else max(0, t + 1 - self.window)

    def decode_aux(self, state: _Decode, t: int) -> torch.Tensor | None:
        """The additive bias (B or 1, H, 1, keys) of the query at t over its keys, or None."""
        table, s = state.table, self._first_key(t)
        if not table.decay and table.pad_bias is None:
            return None
        bias = table.rev_bias[:, table.capacity - 1 - t + s :]  # (H, keys)
        if table.pad_bias is not None:
            bias = bias + table.pad_bias[:, :, s : t + 1]  # (B, H, keys)
        return bias.unsqueeze(-2)

    def decode_step(self, state: _Decode, hn: torch.Tensor, t: int, aux: torch.Tensor | None) -> torch.Tensor:
        b, h, dh = hn.shape[0], self.n_heads, self.d_head
        qkv = torch.mm(hn, state.wqkv_t).view(b, 3, h, 1, dh).transpose(0, 1)  # (3, B, H, 1, dh)
        state.kv.narrow(3, t, 1).copy_(qkv[1:])
        s = self._first_key(t)
        k, v = state.kv[0].narrow(2, s, t + 1 - s), state.kv[1].narrow(2, s, t + 1 - s)  # (B, H, keys, dh)
        if aux is None:
            return F.scaled_dot_product_attention(qkv[0], k, v).reshape(b, -1)  # (B, H, 1, dh) -> (B, H * dh)
        # softmax(q k^T / sqrt(dh) + bias) v by hand: at one query, scaled_dot_product_attention with a bias
        # takes about twice as long as these three calls (without one it is the faster). (B, H, ., .) ->
        # (B H, ., .): views of the cache, whose batch and head strides nest.
        q, k, v = qkv[0].flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        bias = aux.expand(b, -1, -1, -1).flatten(0, 1)  # (1 or B, H, 1, keys) -> (B H, 1, keys)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=1.0 / math.sqrt(dh))
        return torch.bmm(torch.softmax(scores, -1), v).view(b, -1)  # (B H, 1, dh) -> (B, H * dh)


class SlidingWindow(Softmax):
    """Softmax attention over the last `window` positions only, i - j < window (Based's local partner)."""

    options: ClassVar[frozenset[str]] = frozenset({"window"})
    js_kernel: ClassVar[str | None] = "softmax"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.window = cfg.window

    @classmethod
    def state_floats(cls, cfg: ModelConfig, context: int) -> int:
        """The KV cache of the last `window` positions."""
        return 2 * cfg.n_heads * cfg.d_head * min(context, cfg.window)
