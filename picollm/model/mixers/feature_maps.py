"""Feature maps phi of kernel (linear) attention, and the per-head output RMSNorm that can replace the
Katharopoulos denominator.

  elu      phi(x) = elu(x) + 1                      (Katharopoulos et al. 2020; size d)
  relu     phi(x) = relu(x)                         (size d)
  taylor   phi(x) = [1, x / d^(1/4), x_i x_j / sqrt(d) (i < j), x_i^2 / (sqrt(2) sqrt(d))]
           so phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d): the 2nd-order Taylor expansion of
           exp(q.k / sqrt(d)) (Based, Arora et al. 2024; fla's `TaylorFeatureMap`); size 1 + d + d(d+1)/2
Everything returns fp32: the state built from the features accumulates over the whole sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32, except float64 stays (the tests' high-precision references)."""
    return x if x.dtype == torch.float64 else x.float()


def feature_size(kind: str, d: int) -> int:
    """Width of phi(x) for inputs of width d."""
    return 1 + d + d * (d + 1) // 2 if kind == "taylor" else d


def taylor(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., 1 + d + d(d+1)/2), Based's ordering: constant, linear, off-diagonal, diagonal."""
    d = x.shape[-1]
    outer = x.unsqueeze(-1) * x.unsqueeze(-2)  # (..., d, d)
    i, j = torch.triu_indices(d, d, 1, device=x.device)
    diag = torch.arange(d, device=x.device)
    rd = math.sqrt(d)
    return torch.cat(
        [
            torch.ones_like(x[..., :1]),
            x / math.sqrt(rd),
            outer[..., i, j] / rd,  # each pair i < j once: together they carry 2 sum_{i<j} / (2d)
            outer[..., diag, diag] / (math.sqrt(2.0) * rd),
        ],
        dim=-1,
    )


def feature_map(x: torch.Tensor, kind: str = "elu") -> torch.Tensor:
    x = at_least_fp32(x)
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    if kind == "taylor":
        return taylor(x)
    raise ValueError(f"unknown feature map {kind!r}")


def rms_scale(y: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS of each head output (..., dv) -> (..., 1). No gain: a per-channel gain before the output
    projection is absorbed by that projection, so it would add parameters and nothing else."""
    return torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
