"""Evaluation of one model for the comparison: the metrics of picollm.evaluation plus calibration (ECE,
mean confidence) and accuracy by position, and length generalisation.

Length generalisation. Sequences of exactly f x data.max_len tokens are drawn from the test split's
generators (held out from training, like the test split itself; a deterministic family has one sequence
per generator at a given length, so it may get fewer than n_long). Values are residues modulo M, so a long
sequence wraps around instead of leaving the value range; `coverage` checks this on the data
actually drawn (fraction of values and of (x_t, x_t+1) transitions that also occur in training).
A target counts as *beyond* the training length when its position is >= data.max_len, i.e. a
position at which the model never had to predict during training.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch
from torch import nn

from picollm.config import DataConfig
from picollm.data.generators import (
    Generator,
    ceiling_per_position,
    draw_from_generators,
    family_capacity,
    generate_sequence,
)
from picollm.data.splits import IGNORE_INDEX, PaddedSplit, SequenceSplit
from picollm.errors import PicollmError
from picollm.training.evaluation import accuracy_metrics, predict_split

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Calibration and accuracy by position


@torch.no_grad()
def predict(model: nn.Module, split: PaddedSplit, batch_size: int = 256) -> tuple[torch.Tensor, ...]:
    """Per-target (N, Lmax-1) correctness, NLL and confidence (max probability).

    Batches exactly like evaluation.predict_split (it is that function), so loss and accuracy equal what the
    training flow logged for the same model and split."""
    _, correct, nll, conf = predict_split(model, split, batch_size, with_confidence=True)
    return correct, nll, conf


def valid_targets(split: PaddedSplit) -> torch.Tensor:
    return split.inputs_and_targets()[1] != IGNORE_INDEX


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 10) -> float:
    """sum_b |B_b|/N |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins."""
    conf, hit = conf.flatten().double(), correct.flatten().double()
    if not len(conf):
        return math.nan
    b = (conf * n_bins).long().clamp(0, n_bins - 1)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add(0, b, hit)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add(0, b, conf)
    return float((acc_sum - conf_sum).abs().sum() / len(conf))


def accuracy_by_position(split: PaddedSplit, correct: torch.Tensor) -> np.ndarray:
    """Accuracy of the targets at sequence positions 1..Lmax-1 (index i = position i+1); NaN where none."""
    valid = valid_targets(split)
    den = valid.sum(0).double()
    acc = (correct & valid).sum(0).double() / den.clamp(min=1)
    return torch.where(den > 0, acc, torch.full_like(acc, math.nan)).numpy()


def restrict_targets(split: PaddedSplit, keep: torch.Tensor) -> PaddedSplit:
    """The split with every target outside `keep` (N, Lmax-1) turned into padding. accuracy_metrics
    reads only the targets from `tokens`, so predictions made on the full split can be re-aggregated
    over a subset of positions with the same definitions."""
    tokens = split.tokens.clone()
    tokens[:, 1:][~keep] = split.pad_id
    return dataclasses.replace(split, tokens=tokens)


Curves = dict[str, np.ndarray]


def _score(
    model: nn.Module, split: PaddedSplit, batch_size: int, prefix: str, metrics: dict[str, float], curves: Curves
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predict `split`, add its accuracy metrics and accuracy-by-position curve under `prefix`; returns
    the per-target correctness, NLL and confidence for the caller's own metrics."""
    correct, nll, conf = predict(model, split, batch_size)
    metrics.update(accuracy_metrics(split, correct, nll, prefix))
    curves[f"{prefix}/accuracy_by_position"] = accuracy_by_position(split, correct)
    return correct, nll, conf


def evaluate_model(
    model: nn.Module, splits: dict[str, PaddedSplit], batch_size: int = 256, n_bins: int = 10
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """`eval/{split}/...`: loss, accuracy (overall, per family, predictable positions, vs ceiling),
    ECE and mean confidence; plus accuracy by position per split."""
    metrics: dict[str, float] = {}
    curves: Curves = {}
    for name, split in splits.items():
        correct, _, conf = _score(model, split, batch_size, f"eval/{name}", metrics, curves)
        valid = valid_targets(split)
        metrics[f"eval/{name}/ece"] = expected_calibration_error(conf[valid], correct[valid], n_bins)
        metrics[f"eval/{name}/confidence"] = float(conf[valid].mean())
    return metrics, curves


# --------------------------------------------------------------------------------------------------
# Length generalisation


def long_sequences(
    cfg: DataConfig,
    length: int,
    n_per_family: int,
    exclude: set[bytes] | None = None,
    pools: dict[str, list[Generator]] | None = None,
) -> SequenceSplit:
    """`n_per_family` sequences of exactly `length` tokens per family, distinct from each other and from
    `exclude` (the splits' contents), with Bayes ceilings. From `pools[family]` (e.g. the test split's
    generators: held out from training) where given, else from the family's whole generator space. A
    deterministic family has one sequence per generator at a given length, so a pool caps its count."""
    rng = np.random.default_rng([cfg.seed, 7919, length])  # own stream: independent of the splits
    fixed = cfg.model_copy(update={"min_len": length, "max_len": length})
    seen = set(exclude or ())
    out = SequenceSplit(f"len{length}", [], [], [])
    for fam in cfg.seq_types:
        pool = pools.get(fam) if pools is not None else None
        cap = family_capacity(fam, fixed)
        if pool is not None and math.isfinite(cap):
            cap = len(pool)
        n = int(min(n_per_family, cap))
        if n < n_per_family:  # expected for a deterministic family on a held-out pool (documented): info only
            (log.info if pool is not None else log.warning)(
                "family %s has only %d distinct sequences of length %d", fam, n, length
            )
        got = attempts = 0
        while got < n and attempts < 50 * n + 1000:
            attempts += 1
            if pool is not None:
                seq, gen = draw_from_generators(fam, pool, length, cfg, rng)
            else:
                seq, gen = generate_sequence(fam, length, cfg, rng).astype(np.int64), {}
            if seq.tobytes() in seen:
                continue
            seen.add(seq.tobytes())
            out.sequences.append(seq)
            out.families.append(fam)
            out.ceilings.append(ceiling_per_position(seq, fam, cfg))
            out.generators.append(gen)
            got += 1
    if not out.sequences:
        raise PicollmError(f"no new sequences of length {length} could be drawn; widen the data parameters")
    return out


def coverage(train: SequenceSplit, split: SequenceSplit, modulus: int) -> dict[str, float]:
    """Fraction of the split's values, and of its (x_t, x_t+1) transitions (overall and per family),
    that occur anywhere in the training split."""

    def pairs(seqs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([s[:-1] * (modulus + 1) + s[1:] for s in seqs if len(s) > 1] or [np.zeros(0, int)])

    seen = pairs(train.sequences)
    out = {
        "value_coverage": float(np.isin(np.concatenate(split.sequences), np.concatenate(train.sequences)).mean()),
        "transition_coverage": float(np.isin(pairs(split.sequences), seen).mean()),
    }
    for fam in dict.fromkeys(split.families):
        mine = pairs([s for s, f in zip(split.sequences, split.families, strict=True) if f == fam])
        if len(mine):
            out[f"transition_coverage/{fam}"] = float(np.isin(mine, seen).mean())
    return out


def length_generalisation(
    model: nn.Module, long: dict[int, PaddedSplit], train_len: int, batch_size: int = 256
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """`lengen/x{f}/...` on every length factor f: all targets, and `lengen/x{f}/beyond/...` on the
    targets at positions >= train_len only (none at f = 1); accuracy by position per factor."""
    metrics: dict[str, float] = {}
    curves: Curves = {}
    for factor, split in long.items():
        correct, nll, _ = _score(model, split, batch_size, f"lengen/x{factor}", metrics, curves)
        positions = torch.arange(1, split.tokens.shape[1])  # position of each target in its sequence
        beyond = (positions >= train_len)[None, :].expand_as(correct)
        if bool((beyond & valid_targets(split)).any()):
            where = f"lengen/x{factor}/beyond"
            metrics.update(accuracy_metrics(restrict_targets(split, beyond), correct, nll, where))
    return metrics, curves
