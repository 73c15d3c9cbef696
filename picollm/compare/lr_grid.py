"""Each variant's learning rate, chosen on validation data before the seeded runs (recurrent mixers train
well only in a narrow lr window, so one shared lr would favour whichever variant it happens to suit).

Every lr of `compare.lr_grid` trains the variant once, on the first seed (for `compare.lr_grid_epochs`
epochs, else train.epochs); its score is taken from the last epoch's validation metrics:
`compare.lr_grid_metric` where given, else the MQAR answer accuracy (`val/accuracy_answer/mqar`,
higher is better) when the data includes mqar, else the validation loss (lower is better). A diverged run
(NaN score) ranks last; ties go to the earlier lr.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

RECALL_SCORE = "val/accuracy_answer/mqar"
LOSS_SCORE = "val/loss"


def score_name(families: Sequence[str], metric: str | None = None) -> tuple[str, bool]:
    """(validation metric that ranks the grid, higher is better): `metric` (compare.lr_grid_metric) where
    given, a loss or ECE being lower-is-better; else the default above."""
    if metric is not None:
        return metric, not any(word in metric for word in ("loss", "ece", "perplexity"))
    return (RECALL_SCORE, True) if "mqar" in families else (LOSS_SCORE, False)


def grid_score(history: list[dict[str, float]], name: str) -> float:
    """The ranking metric `name` of a grid run: its value at the last epoch (NaN when missing or not finite)."""
    value = history[-1].get(name, math.nan) if history else math.nan
    return float(value) if math.isfinite(value) else math.nan


def best_lr(scores: dict[float, float], higher_better: bool) -> float:
    """The lr with the best finite score (the first such in the grid's order on ties); the first lr when
    every run diverged."""
    finite = [(lr, s) for lr, s in scores.items() if math.isfinite(s)]
    if not finite:
        return next(iter(scores))
    sign = -1.0 if higher_better else 1.0
    return min(finite, key=lambda item: sign * item[1])[0]  # min is stable: the first of equal scores
