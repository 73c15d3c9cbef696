"""The short convolution every mixer can put before itself (`model.short_conv: k`), as Zoology puts one before
every sequence mixer and flash-linear-attention's DeltaNet has one: a causal depthwise convolution of width k
over the mixer's input, added to it,

    x'_t = x_t + sum_{i=0}^{k-1} w_i * x_{t-i}        (w: one weight per channel and lag, zero at init)

so a model starts as it would without it, and one layer can already see the previous tokens (the shift that
an induction head needs before attention can look a key up). Padded positions enter as zeros. Its state for
generation is the last k-1 inputs. Where picollm differs: Zoology's BaseConv (kernel 3, optionally an
implicit long convolution) is a layer of its own before the mixer; fla convolves q, k and v separately
(with SiLU); here one residual convolution feeds the whole mixer (projections and gates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShortConv(nn.Module):
    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.zeros(d_model, width))  # (d, k): column i weighs x_{t-i}

    def forward(self, x: Tensor, mask: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, N, d), mask (B, N) real tokens, state (B, k-1, d) the inputs before x (zeros if None) ->
        x' (B, N, d) and the state after x. One conv1d over the state and x: the parallel form."""
        b, _, d = x.shape
        prev = x.new_zeros(b, self.width - 1, d) if state is None else state.to(x.dtype)
        full = torch.cat([prev, x * mask[..., None].to(x.dtype)], dim=1)  # (B, k-1+N, d)
        # conv1d correlates: window entry j of position t is x_{t-(k-1)+j}, so the kernel is w reversed.
        y = F.conv1d(full.transpose(1, 2), self.weight.flip(-1).unsqueeze(1).to(x.dtype), groups=d)
        return x + y.transpose(1, 2), full[:, full.shape[1] - (self.width - 1) :]

    def recurrent(self, x: Tensor, mask: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The same, one position at a time (the reference the parallel form is tested against)."""
        b, n, d = x.shape
        state = x.new_zeros(b, self.width - 1, d) if state is None else state.to(x.dtype)
        out = []
        for t in range(n):
            y, state = self._step(x[:, t], mask[:, t], state)
            out.append(y)
        return torch.stack(out, dim=1), state

    def _step(self, x: Tensor, mask: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        xt = x * mask[:, None].to(x.dtype)
        window = torch.cat([state, xt[:, None]], dim=1)  # (B, k, d): x_{t-k+1} .. x_t
        return x + (window * self.weight.flip(-1).t().to(x.dtype)).sum(1), window[:, 1:]

    def step_(self, x: Tensor, state: Tensor) -> Tensor:
        """The decode step: x (B, d) a real token, `state` (B, k-1, d) updated in place; returns x'."""
        window = torch.cat([state, x[:, None]], dim=1)  # (B, k, d)
        state.copy_(window[:, 1:])
        return x + (window * self.weight.flip(-1).t().to(x.dtype)).sum(1)
