"""Retention (RetNet: Sun et al. 2023, "Retentive Network"; as flash-linear-attention's MultiScaleRetention):
linear attention with the identity feature map and a fixed decay per head, gamma_h = 1 - 2^(-5-h) (heads
from short to long memory, whatever pos_encoding says), each head's output RMS-normalised and gated:

    S_t = gamma_h S_{t-1} + k_t v_t^T / sqrt(d),   o_t = RMSNorm_head(S_t^T q_t),   y_t = (o_t * swish(W_g x_t)) W_o

Where picollm differs from the paper: no xPos rotation of q and k (positions enter through the decay and
the model's pos_encoding only), values of width d_head (RetNet doubles them), and RMSNorm without gain in
place of GroupNorm (a gain per channel is absorbed by W_o). Every form is linear attention's (a constant
gate), so retention adds only what differs: the map, the decay, the normaliser and the output gate. The
output gate acts between hook_z and the output projection (hook_pattern @ v is still hook_z).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from picollm.model.config import ModelConfig
from picollm.model.mixers.linear import Linear


class Retention(Linear):
    """Multi-scale retention (RetNet, Sun et al. 2023): linear attention with phi the identity (q.k / sqrt(d)),
    fixed decays gamma_h = 1 - 2^(-5-h), each head's output RMS-normalised and gated by swish(W_g x)."""

    options: ClassVar[frozenset[str]] = frozenset()
    pattern_label: ClassVar[str] = "retention weights (decayed q.k, each row divided by its output's RMS)"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.g = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # the output gate's projection

    @classmethod
    def state_floats(cls, cfg: ModelConfig, context: int) -> int:
        """S: d_head x d_head per head (no normaliser state: the RMSNorm needs none)."""
        return cfg.n_heads * cfg.d_head * cfg.d_head

    @property
    def eps(self) -> None:
        return None  # always the per-head RMSNorm, never a denominator

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """q and k as they are, each scaled by d^(-1/4): q.k / sqrt(d)."""
        return x.float() / math.sqrt(math.sqrt(x.shape[-1]))

    def fixed_log_decay(self) -> torch.Tensor:
        h = torch.arange(self.n_heads, dtype=torch.float32, device=self.slopes.device)
        return torch.log1p(-(2.0 ** (-5.0 - h)))

    def output(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """z (B, N, H, dh) gated by swish(W_g x), per channel."""
        return z * F.silu(self.g(x)).view_as(z)

    def decode_extras(self) -> list[nn.Linear]:
        return [self.g]

    def decode_output(self, y: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return y * F.silu(extra)
