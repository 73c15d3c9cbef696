"""Associative recall (MQAR) for the comparison: answer accuracy against the number of key-value pairs, per
query, against the heuristics that need no recall, and the declared contrasts between mixers.

For each `compare.recall_pairs` value n, the test split of the data config restricted to the `mqar` family
with `mqar_pairs: [n]` (the training draw's seed, so the same generator split) is every model's recall set.
A model's recall accuracy at n is its accuracy on the answers (`PaddedSplit.answers`: a query's value), also
per query index i (the i-th query of a sequence). Pair counts in data.mqar_pairs are the trained mixture;
the others test extrapolation to unseen counts, reported apart.

What a model gets without binding keys to values (`baselines`): chance, 1/V over the V value tokens; copying
a value of the context, 1/P; and, in the fed-back layout only (where each answer becomes an input), elimination
among the values not yet given as answers, H_P/P (H_P the P-th harmonic number: 1/P + 1/(P-1) + ... + 1 over
P queries). A mixer is said to recall at n only where its interval over seeds lies above the best of these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from picollm.compare.stats import Interval, mean_ci
from picollm.config import DataConfig, validate
from picollm.data.splits import PaddedSplit, build_data, to_padded
from picollm.training.evaluation import predict_split

RECALL_FAMILY = "mqar"
SUCCESS = 0.9  # a seed "solves" a cell when its answer accuracy is above this

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


def baselines(data_cfg: DataConfig, pairs: int) -> dict[str, float]:
    """Answer accuracy of the heuristics that need no key-value binding, at `pairs` pairs (see the module)."""
    out = {"chance": 1 / data_cfg.mqar_value_vocab, "copy": 1 / pairs}
    if data_cfg.mqar_layout == "fed_back":
        queries = min(data_cfg.mqar_queries or pairs, pairs)
        out["elimination"] = sum(1 / (pairs - i) for i in range(queries)) / queries
    return out


@dataclass
class RecallSet:
    """Held-out MQAR sequences with one number of pairs, and where their answers are."""

    split: PaddedSplit
    answers: torch.Tensor  # (N, L-1) bool: the targets that are an answer (a query's value)
    baselines: dict[str, float]

    @property
    def query_index(self) -> torch.Tensor:
        """(N, L-1) int: 1 for a row's first answer, 2 for its second, ...; 0 off the answers."""
        return self.answers.long().cumsum(1) * self.answers


def recall_splits(data_cfg: DataConfig, pairs: Sequence[int]) -> dict[int, RecallSet]:
    """pairs -> the held-out (test) MQAR sequences with that many key-value pairs, and their answers."""
    out = {}
    for n in pairs:
        d = recall_data_config(data_cfg, n)
        data = build_data(d)
        split = to_padded(data.test, d.pad_id, data.families)
        none = torch.zeros_like(split.tokens[:, 1:], dtype=torch.bool)  # (N, L-1): no answers at all
        answers = split.answers if split.answers is not None else none
        out[n] = RecallSet(split, answers, baselines(data_cfg, n))
    return out


@torch.no_grad()
def recall_accuracy(model: nn.Module, rs: RecallSet, batch_size: int = 256) -> float:
    """Accuracy on the answer positions of `rs`; NaN when it has none."""
    return recall_scores(model, rs, batch_size)[0]


@torch.no_grad()
def recall_scores(model: nn.Module, rs: RecallSet, batch_size: int = 256) -> tuple[float, dict[int, float]]:
    """Answer accuracy of `rs` overall and per query index (1-based); NaN overall when there are no answers."""
    _, correct, _ = predict_split(model, rs.split, batch_size)
    n = int(rs.answers.sum())
    overall = float(correct[rs.answers].float().sum()) / n if n else math.nan
    index = rs.query_index
    per_query = {int(i): float(correct[index == i].float().mean()) for i in index.unique().tolist() if i > 0}
    return overall, per_query


def recall_metrics(model: nn.Module, sets: dict[int, RecallSet], batch_size: int = 256) -> dict[str, float]:
    """`recall/pairs{n}/accuracy` and `recall/pairs{n}/query{i}/accuracy` of every recall set."""
    out = {}
    for n, rs in sets.items():
        overall, per_query = recall_scores(model, rs, batch_size)
        out[recall_key(n)] = overall
        out |= {recall_key(n, i): a for i, a in per_query.items()}
    return out


def recall_key(pairs: int, query: int | None = None) -> str:
    """A member's metric: answer accuracy on the MQAR recall set with `pairs` key-value pairs (of its i-th
    query with `query`)."""
    return f"recall/pairs{pairs}/accuracy" if query is None else f"recall/pairs{pairs}/query{query}/accuracy"


def recalls(iv: Interval, base: dict[str, float]) -> bool:
    """Credited with recall: the whole interval over seeds above the best heuristic baseline (a single run,
    with no interval, never is)."""
    return math.isfinite(iv.low) and iv.low > max(base.values())


def success_rate(accuracies: Sequence[float], threshold: float = SUCCESS) -> float:
    """Share of seeds whose answer accuracy is above `threshold` (for outcomes that are all or nothing)."""
    finite = [a for a in accuracies if math.isfinite(a)]
    return sum(a > threshold for a in finite) / len(finite) if finite else math.nan


def epochs_to(history: list[dict[str, float]], metric: str, threshold: float = SUCCESS) -> float:
    """The first epoch whose `metric` (validation answer accuracy) exceeds `threshold`; NaN if none did."""
    return next((float(h["epoch"]) for h in history if h.get(metric, -math.inf) > threshold), math.nan)


def recall_table(values: RecallValues, confidence: float = 0.95, method: str = "t") -> Columns:
    """One row per (variant, d_model, pairs): mean recall accuracy over seeds with its interval."""
    out: Columns = {k: [] for k in ("variant", "d_model", "pairs", "mean", "ci_low", "ci_high", "n")}
    for (v, d, n), accs in values.items():
        iv = mean_ci(accs, confidence, method)
        for col, x in zip(out, (v, d, n, iv.mean, iv.low, iv.high, iv.n), strict=True):
            out[col].append(x)
    return out
