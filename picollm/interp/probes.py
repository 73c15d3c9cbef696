"""Linear probes: is a quantity linearly readable from an activation?

Two probe kinds, both multiclass, both on standardised features (train-split mean and std):
  ridge     closed form: W = (X^T X + lambda I)^-1 X^T Y on one-hot targets, predict the argmax
  logistic  softmax regression with an L2 penalty, full-batch Adam for `steps` steps from a seeded
            zero-mean init (deterministic given the seed)
Rows are split into train and held-out by *group* (a sequence), so positions of one sequence never
sit on both sides: neighbouring positions share most of their context and would leak the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from picollm.training.adamw import AdamW

ProbeKind = Literal["ridge", "logistic"]


@dataclass
class ProbeResult:
    train_accuracy: float
    test_accuracy: float
    chance: float  # accuracy of always predicting the most frequent training class
    n_train: int
    n_test: int
    n_classes: int


def group_split(groups: torch.Tensor, train_fraction: float, seed: int = 0) -> torch.Tensor:
    """Boolean (N,) train mask: a seeded random `train_fraction` of the distinct groups."""
    ids = torch.unique(groups)
    g = torch.Generator().manual_seed(seed)
    chosen = ids[torch.randperm(len(ids), generator=g)[: max(1, round(train_fraction * len(ids)))]]
    return torch.isin(groups, chosen)


def _standardise(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    mu, sd = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    return (x - mu) / sd


def _ridge(x: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float) -> torch.Tensor:
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # bias column
    eye = torch.eye(x1.shape[1], dtype=x.dtype)
    eye[-1, -1] = 0.0  # the bias is not penalised
    targets = F.one_hot(y, n_classes).to(x.dtype)
    # lambda scaled by the number of rows, so one setting suits any batch size
    return torch.linalg.solve(x1.T @ x1 + lam * len(x) * eye, x1.T @ targets)


def _logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float, steps: int, lr: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(x.shape[1] + 1, n_classes, generator=g, dtype=x.dtype)).requires_grad_()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    opt = AdamW([{"params": [w]}], lr=lr, weight_decay=0.0)  # Adam; picollm's: no torch._dynamo import
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(x1 @ w, y) + lam * (w[:-1] ** 2).sum()
            loss.backward()
            opt.step()
    return w.detach()


def fit_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    kind: ProbeKind = "ridge",
    lam: float = 1e-3,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
) -> ProbeResult:
    """Fit on rows `train` of features x (N, d) and integer labels y (N,), score on the rest."""
    x = _standardise(x.double(), train)
    classes, y = torch.unique(y, return_inverse=True)
    k = len(classes)
    if kind == "ridge":
        w = _ridge(x[train], y[train], k, lam)
    else:
        w = _logistic(x[train], y[train], k, lam, steps, lr, seed)
    pred = (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w).argmax(1)
    right = (pred == y).double()
    test = ~train
    majority = torch.bincount(y[train], minlength=k).argmax()
    return ProbeResult(
        train_accuracy=float(right[train].mean()),
        test_accuracy=float(right[test].mean()) if test.any() else float("nan"),
        chance=float((y[test] == majority).double().mean()) if test.any() else float("nan"),
        n_train=int(train.sum()),
        n_test=int(test.sum()),
        n_classes=k,
    )
