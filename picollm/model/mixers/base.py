"""The contract every token mixer meets, and what mixers share.

A mixer is one attention layer of the Transformer (`blocks.{i}.attn`). It owns the q/k/v and output
projections, its own extra parameters (gates, write rates), the hook points hook_q/k/v/pattern/z, and:

  mix(q, k, v, x, key_mask, cache, form)    the token mixing in any of its `forms`; `recurrent` (one
                                             position at a time through the cached path) is the reference
                                             every other form is tested against
  state_floats(cfg, context)                 floats of generation state per layer and sequence
  decode_init / decode_aux / decode_step     its fused step in picollm.model.decoding's fast path
  options, applicable_options(cfg)           the ModelConfig keys it reads (the config refuses the others)
  pattern_label                              what its hook_pattern holds (figures, the HTML view)
  js_kernel, js_forward(cfg)                 whether the analysis page's JavaScript forward pass
                                             (picollm/interp/playground.js) computes it, and with what

Mixers are registered by name in picollm/model/mixers/__init__.py; no code outside the mixers branches on
a mixer's name. Shapes: q/k (B, H, N, d_qk), v and the mixed output z (B, H, N, d_head); x (B, N, d_model)
is the layer's input (gates read it); key_mask (B, T) is True on real tokens, T = cached + N positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from picollm.model.config import ModelConfig
from picollm.model.hooks import HookPoint
from picollm.model.mixers.short_conv import ShortConv
from picollm.model.positions import alibi_slopes


@dataclass
class LayerCache:
    """Generation state of one layer filled by the forward: keys/values (softmax; sliding_window keeps the
    last `window`) or the recurrent state S (+ the normaliser z of a denominator)."""

    k: torch.Tensor | None = None  # (B, H, T, dh)
    v: torch.Tensor | None = None
    state: torch.Tensor | None = None  # (B, H, dk, dv) fp32
    z: torch.Tensor | None = None  # (B, H, dk) fp32
    conv: torch.Tensor | None = None  # (B, k-1, d) the short convolution's last inputs (model.short_conv)

    @property
    def empty(self) -> bool:
        return self.k is None and self.state is None


@dataclass
class MixerDecode:
    conv: torch.Tensor | None  # (B, k-1, d) the short convolution's last inputs, or None
    inner: Any  # the mixer's own decode state (decode_init)


Cache = LayerCache | None
Form = str | None  # one of a mixer's `forms`; None: its own choice


def gate_bias(slopes: torch.Tensor) -> torch.Tensor:
    """b_h with sigmoid(b_h) = exp(-m_h): a gate that starts at the ALiBi decay of its head."""
    g = torch.exp(-slopes).clamp(max=1 - 1e-4)
    return torch.log(g) - torch.log1p(-g)


class DecayGate(nn.Linear):
    """A decay per head and token, g_t = sigmoid(w.x_t + b) (GLA's and Mamba-2's scalar gate), started at each
    head's ALiBi decay: the gated mixers' positional prior, whatever pos_encoding says."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.d_model, cfg.n_heads)

    def start_at_alibi(self, cfg: ModelConfig) -> None:
        nn.init.normal_(self.weight, std=0.02)
        with torch.no_grad():
            self.bias.copy_(gate_bias(alibi_slopes(cfg.n_heads, cfg.alibi_exponent)))

    def log_gates(self, x: Tensor, mask: Tensor) -> Tensor:
        """log g_t = log_sigmoid(w.x_t + b): (B, N, d), (B, N) real tokens -> (B, H, N), 0 on padding (no decay)."""
        return F.logsigmoid(self(x)).transpose(1, 2) * mask[:, None, :].float()

    @staticmethod
    def decay_(state: Tensor, logits: Tensor) -> None:
        """state (B, H, dk, dv) *= g from the gate's logits (B, H), in place (exp(log_sigmoid) as log_gates)."""
        state.mul_(F.logsigmoid(logits.float()).exp().view(state.shape[0], -1, 1, 1))


class Mixer(nn.Module):
    """Base of every token mixer: projections, hook points, the ALiBi slopes, the generic forward and the
    recurrent reference. Subclasses implement `mix`, `state_floats` and the decode step."""

    options: ClassVar[frozenset[str]] = frozenset()  # ModelConfig mixer options this mixer reads
    forms: ClassVar[tuple[str, ...]] = ("recurrent",)  # the first is what the forward uses by default
    pattern_label: ClassVar[str] = "mixing weights"
    # The kernel of picollm/interp/playground.js that computes exactly this class, or None. Read from the class's
    # own namespace, never inherited: a subclass changes the computation, so it declares its own.
    js_kernel: ClassVar[str | None] = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.d_head, self.d_qk = cfg.n_heads, cfg.d_head, self.qk_dim(cfg)
        self.qkv = nn.Linear(cfg.d_model, cfg.n_heads * (2 * self.d_qk + self.d_head), bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        use_decay = cfg.pos_encoding == "alibi"
        slopes = alibi_slopes(cfg.n_heads, cfg.alibi_exponent) if use_decay else torch.zeros(cfg.n_heads)
        self.register_buffer("slopes", slopes, persistent=False)  # (H,): ALiBi bias or the fixed decay
        self.conv = ShortConv(cfg.d_model, cfg.short_conv) if cfg.short_conv else None
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()

    # -- what a mixer declares ------------------------------------------------------------------
    @classmethod
    def qk_dim(cls, cfg: ModelConfig) -> int:
        """Per-head width of q and k."""
        return cfg.d_head

    @classmethod
    def applicable_options(cls, cfg: ModelConfig) -> frozenset[str]:
        """The mixer options that apply under `cfg` (a subset of `options`, e.g. one that needs another)."""
        return cls.options

    @classmethod
    def state_floats(cls, cfg: ModelConfig, context: int) -> int:
        """Floats of generation state per layer and sequence after `context` positions."""
        raise NotImplementedError

    @classmethod
    def js_forward(cls, cfg: ModelConfig) -> dict[str, Any] | None:
        """What the analysis page's JavaScript forward pass needs to compute this mixer under `cfg`: {"kernel":
        js_kernel, "alibi": ..., "short_conv": ..., the mixer's own options}, or None where it cannot (the page
        then says so instead of showing numbers). The one place that decides the playground's support."""
        kernel = cls.__dict__.get("js_kernel")
        if kernel is None:
            return None
        return {"kernel": kernel, "alibi": cfg.pos_encoding == "alibi", "short_conv": cfg.short_conv or 0}

    def reset_parameters(self) -> None:
        """Mixer-specific initialisation, applied after the Transformer's generic one."""

    # -- the decay of a recurrent state (DecayGate overrides it per token) ----------------------------
    def fixed_log_decay(self) -> Tensor:
        """log g_h (H,) of a constant decay: -m_h (ALiBi's slopes; 0, no decay, without ALiBi)."""
        return -self.slopes.float()

    def log_gates(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, N, d) fp32 inputs, (B, N) real tokens -> log g (B, H, N): the constant decay at every position,
        padded or not, as ALiBi's distance counts them."""
        b, n, _ = x.shape
        return self.fixed_log_decay().view(1, -1, 1).expand(b, -1, n)

    def constant_decay(self) -> Tensor | None:
        """(1, H, 1, 1) g_h for an in-place decode step, or None when there is no decay."""
        log_decay = self.fixed_log_decay()
        return torch.exp(log_decay).view(1, -1, 1, 1) if bool(log_decay.any()) else None

    def decode_extras(self) -> list[nn.Linear]:
        """Projections whose outputs follow q, k, v in the decode step's one fused matmul (gates, write rates)."""
        return []

    # -- the forward ------------------------------------------------------------------------------
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
        self, x: torch.Tensor, key_mask: torch.Tensor, cache: LayerCache | None = None, form: str | None = None
    ) -> torch.Tensor:
        """x: (B, N, d); key_mask: (B, T) True for real tokens, T = cached + N positions."""
        b, n, _ = x.shape
        if self.conv is not None:  # x + a causal depthwise convolution of x: every form reads the same input
            conv = self.conv.recurrent if form == "recurrent" else self.conv
            x, conv_state = conv(x, key_mask[:, -n:], None if cache is None else cache.conv)
            if cache is not None:
                cache.conv = conv_state
        q, k, v = self.split_qkv(x)  # (B, N, H, d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        if form == "recurrent":
            z = self.recurrent(q, k, v, x, key_mask, cache)
        else:
            z = self.mix(q, k, v, x, key_mask, cache, form)
        z = self.hook_z(z.to(x.dtype).transpose(1, 2))  # (B, N, H, dh)
        return self.out(self.output(z, x).reshape(b, n, -1))

    def output(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What reaches the output projection from the head outputs z (B, N, H, dh): z itself, unless the
        mixer gates its output (e.g. with swish(W_g x))."""
        return z

    def mix(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, key_mask: Tensor, cache: Cache, form: Form) -> Tensor:
        """(B, H, N, d) q, k, v -> z (B, H, N, dh). A non-empty cache continues from its state (one step per
        position); an empty one is filled with the state after the last position (prefill)."""
        raise NotImplementedError

    def recurrent(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, key_mask: Tensor, cache: Cache = None) -> Tensor:
        """The reference form: one position at a time through the cached path (what generation does)."""
        cache = LayerCache() if cache is None else cache
        start = key_mask.shape[1] - q.shape[2]
        out = [
            self.mix(
                q[:, :, i : i + 1],
                k[:, :, i : i + 1],
                v[:, :, i : i + 1],
                x[:, i : i + 1],
                key_mask[:, : start + i + 1],
                cache,
                None,
            )  # fmt: skip
            for i in range(q.shape[2])
        ]
        return torch.cat(out, dim=2)

    # -- the fused decode step (picollm.model.decoding.Decoder) -------------------------------------
    def begin_decode(
        self, cache: LayerCache, key_mask: torch.Tensor, capacity: int, shared: dict[str, Any]
    ) -> MixerDecode:
        """What the decoder keeps for this layer: the short convolution's state (owned, updated in place)
        and the mixer's own decode state."""
        conv = None if cache.conv is None else cache.conv.clone(memory_format=torch.contiguous_format)
        return MixerDecode(conv, self.decode_init(cache, key_mask, capacity, shared))

    def decode(self, st: MixerDecode, hn: torch.Tensor, t: int, aux: Any) -> torch.Tensor:
        """One token through the short convolution (if any), then the mixer's step."""
        if self.conv is not None:
            assert st.conv is not None
            hn = self.conv.step_(hn, st.conv)
        return self.decode_step(st.inner, hn, t, aux)

    def decode_init(self, cache: LayerCache, key_mask: torch.Tensor, capacity: int, shared: dict[str, Any]) -> Any:
        """This layer's decode state from its prefilled cache; `shared` holds what every layer can share."""
        raise NotImplementedError

    def decode_aux(self, state: Any, t: int) -> Any:
        """Computed once per step (from layer 0's state) and passed to every layer's step."""
        return None

    def decode_step(self, state: Any, hn: torch.Tensor, t: int, aux: Any) -> torch.Tensor:
        """One token: the normalised layer input hn (B, d) at position t -> head outputs (B, H * dh), after
        `output`, ready for the output projection."""
        raise NotImplementedError
