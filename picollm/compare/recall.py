"""Associative recall (MQAR) for the comparison: answer accuracy against the number of key-value pairs.

For each `compare.recall_pairs` value n, the test split of the data config restricted to the `mqar` family
with `mqar_pairs: [n]` (the training draw's seed, so the same generator split) is every model's recall set.
A model's recall accuracy at n is its accuracy on the answer positions (the value after each queried key,
`PaddedSplit.answers`): `accuracy_answer` of picollm.evaluation on that split, Zoology's MQAR accuracy (not
`accuracy_predictable`, which also counts the last query key: forced once every other key was asked).
Intervals are over seeds (t or bootstrap, as compare.ci), per variant and n (and per d_model when
compare.d_models is given).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from picollm.compare.stats import mean_ci
from picollm.config import DataConfig, validate
from picollm.data.splits import PaddedSplit, build_data, to_padded
from picollm.training.evaluation import predict_split

RECALL_FAMILY = "mqar"

Columns = dict[str, list]
# (variant, d_model or None, pairs) -> the recall accuracy of each seed's model
RecallValues = dict[tuple[str, int | None, int], list[float]]


def recall_data_config(data_cfg: DataConfig, pairs: int) -> DataConfig:
    """`data_cfg` with only the mqar family, at `pairs` key-value pairs (validated: a clear error when the
    sequence length cannot hold them)."""
    raw = {**data_cfg.model_dump(mode="json"), "seq_types": [RECALL_FAMILY], "mqar_pairs": [pairs]}
    if data_cfg.mqar_queries is not None:  # queries are distinct keys: at most `pairs` of them
        raw["mqar_queries"] = min(data_cfg.mqar_queries, pairs)
    return validate(DataConfig, raw, source=f"compare.recall_pairs {pairs}")


@dataclass
class RecallSet:
    """Held-out MQAR sequences with one number of pairs, and where their answers are."""

    split: PaddedSplit
    answers: torch.Tensor  # (N, L-1) bool: the targets that are an answer (a value fixed by the context)


def recall_splits(data_cfg: DataConfig, pairs: Sequence[int]) -> dict[int, RecallSet]:
    """pairs -> the held-out (test) MQAR sequences with that many key-value pairs, and their answers."""
    out = {}
    for n in pairs:
        d = recall_data_config(data_cfg, n)
        data = build_data(d)
        split = to_padded(data.test, d.pad_id, data.families)
        none = torch.zeros_like(split.tokens[:, 1:], dtype=torch.bool)  # (N, L-1): no answers at all
        answers = split.answers if split.answers is not None else none
        out[n] = RecallSet(split, answers)
    return out


@torch.no_grad()
def recall_accuracy(model: nn.Module, rs: RecallSet, batch_size: int = 256) -> float:
    """Accuracy on the answer positions of `rs`; NaN when it has none."""
    _, correct, _ = predict_split(model, rs.split, batch_size)
    n = int(rs.answers.sum())
    return float(correct[rs.answers].float().sum()) / n if n else math.nan


def recall_metrics(model: nn.Module, sets: dict[int, RecallSet], batch_size: int = 256) -> dict[int, float]:
    return {n: recall_accuracy(model, rs, batch_size) for n, rs in sets.items()}


def recall_table(values: RecallValues, confidence: float = 0.95, method: str = "t") -> Columns:
    """One row per (variant, d_model, pairs): mean recall accuracy over seeds with its interval."""
    out: Columns = {k: [] for k in ("variant", "d_model", "pairs", "mean", "ci_low", "ci_high", "n")}
    for (v, d, n), accs in values.items():
        iv = mean_ci(accs, confidence, method)
        for col, x in zip(out, (v, d, n, iv.mean, iv.low, iv.high, iv.n), strict=True):
            out[col].append(x)
    return out
