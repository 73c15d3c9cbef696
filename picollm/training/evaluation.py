"""Next-token evaluation: loss, accuracy overall / per family / on predictable positions / on recall
answers / on seen and novel contexts / on the first targets and the rest, ceilings."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from picollm.data.splits import IGNORE_INDEX, PaddedSplit

# Targets x_1..x_3 of a sequence are `early`: there a model guesses which rule (family, step, ratio) this start
# begins, the rest (`late`) follow from the values seen. Reported apart so a lookup of which values start which
# family does not hide in the overall accuracy.
EARLY_TARGETS = 3


@torch.no_grad()
def predict_split(
    model: nn.Module, split: PaddedSplit, batch_size: int = 256, with_confidence: bool = False
) -> tuple[torch.Tensor, ...]:
    """Per-target (N, Lmax-1) predictions, correctness and NLL in the split's row order, plus the
    confidence (max probability, for calibration) when asked."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = split.tokens.shape[1] - 1
    preds = torch.full((len(split), width), -1, dtype=torch.long)
    nll, conf = torch.zeros(len(split), width), torch.zeros(len(split), width)
    for idx in torch.argsort(split.lengths, stable=True).split(batch_size):
        sub = split.subset(idx)
        inputs, targets = (t.to(device) for t in sub.inputs_and_targets())
        logits = model(inputs).float()
        w = targets.shape[1]
        preds[idx, :w] = logits.argmax(-1).cpu()
        if with_confidence:
            conf[idx, :w] = logits.softmax(-1).max(-1).values.cpu()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        )
        nll[idx, :w] = loss.view(targets.shape).cpu()
    model.train(was_training)
    _, targets = split.inputs_and_targets()
    correct = (preds == targets) & (targets != IGNORE_INDEX)
    return (preds, correct, nll, conf) if with_confidence else (preds, correct, nll)


def accuracy_metrics(split: PaddedSplit, correct: torch.Tensor, nll: torch.Tensor, prefix: str) -> dict[str, float]:
    """Aggregate per-target results into `{prefix}/loss`, `{prefix}/accuracy`, per family, etc.

    `ceiling` is the Bayes-optimal expected accuracy on the same targets; `accuracy_predictable`
    counts only targets the ideal predictor gets right with certainty (ceiling 1 there).
    `accuracy_answer` counts only the recall answers (`answer_mask`: the value after each mqar query,
    the repeated half of a copy sequence), e.g. `test/accuracy_answer/mqar`, Zoology's MQAR accuracy;
    unlike `accuracy_predictable/mqar` it leaves out the last query (certain once every other key was
    asked, but no recall). Where the
    split has seen-context flags (val/test, see picollm.data), `accuracy/seen_context[/family]` and
    `accuracy/novel_context[/family]` split the accuracy by whether the target's context occurs in
    training, and `novel_context_fraction[/family]` is the share of novel targets; `ceiling/novel_context` is the
    Bayes ceiling on the novel ones. `loss_early`, `accuracy_early`, `ceiling_early` (and `_late`) are over the first
    EARLY_TARGETS targets of each sequence (x_1..x_3) and over the rest.
    """
    _, targets = split.inputs_and_targets()
    valid = targets != IGNORE_INDEX
    out: dict[str, float] = {}

    def add(name: str, rows: torch.Tensor) -> None:
        v = valid & rows[:, None]
        n = int(v.sum())
        if n == 0:
            return
        out[f"{prefix}/loss{name}"] = float(nll[v].mean())
        out[f"{prefix}/accuracy{name}"] = float(correct[v].float().mean())
        if split.ceilings is not None:
            ceil = split.ceilings
            out[f"{prefix}/ceiling{name}"] = float(ceil[v].mean())
            pred = v & (ceil >= 1 - 1e-9)
            if int(pred.sum()):
                out[f"{prefix}/accuracy_predictable{name}"] = float(correct[pred].float().mean())
            out[f"{prefix}/accuracy_vs_ceiling{name}"] = float(correct[v].float().mean()) / max(
                float(ceil[v].mean()), 1e-12
            )
        if split.answers is not None and bool((answer := v & split.answers[:, : v.shape[1]]).any()):
            out[f"{prefix}/accuracy_answer{name}"] = float(correct[answer].float().mean())
        if split.seen is not None:
            seen = split.seen[:, : v.shape[1]]
            out[f"{prefix}/novel_context_fraction{name}"] = float((v & ~seen).sum()) / n
            for kind, mask in (("seen_context", v & seen), ("novel_context", v & ~seen)):
                if int(mask.sum()):
                    out[f"{prefix}/accuracy/{kind}{name}"] = float(correct[mask].float().mean())
            if split.ceilings is not None and bool((novel := v & ~seen).any()):
                out[f"{prefix}/ceiling/novel_context{name}"] = float(split.ceilings[novel].mean())
        early = torch.arange(v.shape[1], device=v.device)[None, :] < EARLY_TARGETS  # (1, Lmax-1)
        for part, mask in (("early", v & early), ("late", v & ~early)):
            if int(mask.sum()):
                out[f"{prefix}/loss_{part}{name}"] = float(nll[mask].mean())
                out[f"{prefix}/accuracy_{part}{name}"] = float(correct[mask].float().mean())
                if split.ceilings is not None:
                    out[f"{prefix}/ceiling_{part}{name}"] = float(split.ceilings[mask].mean())

    add("", torch.ones(len(split), dtype=torch.bool))
    if split.family_ids is not None:
        for i, fam in enumerate(split.family_names):
            add(f"/{fam}", split.family_ids == i)
    return out


# What `accuracy_metrics` names `{prefix}/<name>` and `{prefix}/<name>/<family>`; `evaluate` adds `perplexity`.
SPLIT_METRICS = (
    "loss",
    "accuracy",
    "ceiling",
    "accuracy_predictable",
    "accuracy_answer",
    "accuracy_vs_ceiling",
    "novel_context_fraction",
    "accuracy/seen_context",
    "accuracy/novel_context",
    "ceiling/novel_context",
    "loss_early",
    "accuracy_early",
    "ceiling_early",
    "loss_late",
    "accuracy_late",
    "ceiling_late",
)


def metric_names(prefix: str, families: Iterable[str]) -> list[str]:
    """Every metric `evaluate(..., prefix)` can log for these families (a few only where the split has
    such targets, e.g. `accuracy_predictable`): what a sweep may optimise or prune on."""
    names = [f"{prefix}/{m}" for m in SPLIT_METRICS] + [f"{prefix}/perplexity"]
    return names + [f"{prefix}/{m}/{fam}" for fam in families for m in SPLIT_METRICS]


def evaluate(model: nn.Module, split: PaddedSplit, prefix: str, batch_size: int = 256) -> dict[str, float]:
    _, correct, nll = predict_split(model, split, batch_size)
    metrics = accuracy_metrics(split, correct, nll, prefix)
    metrics[f"{prefix}/perplexity"] = math.exp(min(metrics[f"{prefix}/loss"], 50.0))
    return metrics
