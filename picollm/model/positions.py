"""Positional priors shared by the Transformer and its mixers: ALiBi slopes and sinusoidal waves."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def alibi_slopes(n_heads: int, exponent: float = 8.0) -> torch.Tensor:
    """m_h = 2^(-exponent * h / H), h = 1..H (Press et al. 2022 use exponent 8; geometric in h)."""
    return torch.tensor([2.0 ** (-exponent * (h + 1) / n_heads) for h in range(n_heads)])


def sinusoidal(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """(...,) positions -> (..., d_model): sines then cosines of geometrically spaced frequencies."""
    half = d_model // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    ang = positions.float().unsqueeze(-1) * freqs
    emb = torch.cat([ang.sin(), ang.cos()], dim=-1)
    return F.pad(emb, (0, d_model - 2 * half))
