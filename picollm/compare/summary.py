"""The numbers of a comparison over its members: every metric's mean and interval per variant, each variant's
difference from the baseline with its tests, sequence-bootstrap intervals for a variant with a single run,
and the headline rows; plus the text of the report's set-up section. Plain data in, plain data out: the flow
logs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from picollm.compare.evaluation import predict, valid_targets
from picollm.compare.inputs import EvalSet, Inputs, Member
from picollm.compare.recall import recall_key
from picollm.compare.stats import Aggregate, SeqIntervals, aggregate, sequence_bootstrap_ci, sequence_counts
from picollm.compare.table import Comparisons, comparison_rows, diff_side, differences_vs_baseline, headline_keys
from picollm.config import CompareConfig
from picollm.config.base import RECALL_FAMILIES
from picollm.config.compare import BOOTSTRAP_MIN_RUNS
from picollm.model.transformer import Transformer

ByVariant = dict[str, list[Member]]  # variant -> its members, in seed (or reference) order


@dataclass
class Summary:
    agg: Aggregate
    diffs: Comparisons
    rows: list[dict[str, str]]
    params: dict[str, int]
    paired: bool  # the runs pair up by seed (train mode, the same seeds in the same order)
    headline: list[tuple[str, str, bool]]
    seq_ci: SeqIntervals = field(default_factory=dict)
    primaries: list[str] = field(default_factory=list)  # compare.primaries: the headline's primary family


def headline(cfg: CompareConfig) -> list[tuple[str, str, bool]]:
    """The headline rows: the usual metrics, then MQAR answer accuracy at each compare.recall_pairs."""
    rows = headline_keys(cfg.compare.length_factors)
    rows += [(recall_key(n), f"MQAR answer acc., {n} pairs", True) for n in cfg.compare.recall_pairs]
    return rows


def summarise(cfg: CompareConfig, inp: Inputs, by_variant: ByVariant) -> Summary:
    """Mean and CI of every metric over the runs of each variant, each variant - baseline with its paired (or
    Welch) test and TOST, sequence-bootstrap intervals for a variant with one run, and the headline rows
    (compare.primaries first, Holm over them; the rest secondary, Holm over the rest)."""
    cc = cfg.compare
    runs = {v: [m.metrics for m in ms] for v, ms in by_variant.items()}
    agg = aggregate(runs, cc.confidence, cc.ci, cc.bootstrap_samples)
    labels = [[m.label for m in ms] for ms in by_variant.values()]
    paired = inp.mode == "train" and all(ls == labels[0] for ls in labels)  # registry mode: unpaired
    diffs = differences_vs_baseline(
        runs, confidence=cc.confidence, margin=cc.equivalence_margin, margins=cc.equivalence_margins, test=cc.test,
        paired=paired,
    )  # fmt: skip
    seq_ci = sequence_intervals(cfg, inp, by_variant) if any(len(ms) == 1 for ms in by_variant.values()) else {}
    keys = headline(cfg)
    rows = comparison_rows(agg, diffs, keys, cc.alpha, seq_ci, list(by_variant), cc.primaries)
    params = {v: int(ms[0].model.num_params()) for v, ms in by_variant.items()}
    return Summary(agg, diffs, rows, params, paired, keys, seq_ci, list(cc.primaries))


def sequence_intervals(cfg: CompareConfig, inp: Inputs, by_variant: ByVariant) -> SeqIntervals:
    """For a variant with one run: sequence-bootstrap intervals of its test accuracy (all and predictable
    targets) and accuracy beyond the training length, on its fixed sequences; of its difference from the
    baseline as well when both have one run on the same data (per-sequence correct_v - correct_baseline)."""
    cc, bs = cfg.compare, cfg.train.eval_batch_size
    counts = {
        v: accuracy_counts(ms[0].model, inp.evalsets[ms[0].data_seed], inp.train_len, bs)
        for v, ms in by_variant.items()
        if len(ms) == 1
    }
    out: SeqIntervals = {
        v: {k: sequence_bootstrap_ci(c, t, cc.confidence, cc.bootstrap_samples) for k, (c, t) in per.items()}
        for v, per in counts.items()
    }
    base, *others = list(by_variant)
    for v in others:
        if base in counts and v in counts and by_variant[base][0].data_seed == by_variant[v][0].data_seed:
            a, b = counts[base], counts[v]
            out[diff_side(v)] = {
                k: sequence_bootstrap_ci(b[k][0] - a[k][0], b[k][1], cc.confidence, cc.bootstrap_samples)
                for k in sorted(a.keys() & b.keys())
            }
    return out


def accuracy_counts(
    model: Transformer, ev: EvalSet, train_len: int, batch_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (correct, targets) per sequence, for the accuracies a sequence bootstrap can resample."""
    test = ev.splits["test"]
    correct, _, _ = predict(model, test, batch_size)
    valid = valid_targets(test)
    out = {"eval/test/accuracy": sequence_counts(correct, valid)}
    if test.ceilings is not None and bool((sure := valid & (test.ceilings >= 1 - 1e-9)).any()):
        out["eval/test/accuracy_predictable"] = sequence_counts(correct, sure)
    for f, split in ev.long.items():
        correct, _, _ = predict(model, split, batch_size)
        beyond = valid_targets(split) & (torch.arange(1, split.tokens.shape[1]) >= train_len)[None, :]
        if bool(beyond.any()):
            out[f"lengen/x{f}/beyond/accuracy"] = sequence_counts(correct, beyond)
    return out


def ci_text(cfg: CompareConfig) -> str:
    c = cfg.compare
    pct = f"{100 * c.confidence:g} %"
    if c.ci == "t":
        return f"{pct} Student-t interval (mean ± t·s/√n)"
    return (
        f"{pct} percentile bootstrap interval of the mean ({c.bootstrap_samples} resamples; the t interval where "
        f"fewer than {BOOTSTRAP_MIN_RUNS} runs have a value)"
    )


def setup_lines(
    cfg: CompareConfig, inp: Inputs, by_variant: ByVariant, params: dict[str, int], lrs: dict[str, float]
) -> list[str]:
    """The report's set-up bullets: data, each variant's architecture, parameters, prior and training."""
    d, mode = inp.data_cfg, inp.mode
    archs = {v: ms[0].model.cfg for v, ms in by_variant.items()}
    seeds = sorted({m.data_seed for ms in by_variant.values() for m in ms})
    draws = f"data seed {seeds[0]}" if len(seeds) == 1 else f"data seeds {seeds} (each seed's runs on its own draw)"
    shape = {(a.d_model, a.n_layers, a.n_heads) for a in archs.values()}
    first = next(iter(archs.values()))
    by_name = {v.name: v for v in cfg.compare.variants}
    changes = "; ".join(
        f"**{v}**: " + (", ".join(f"{k}={x}" for k, x in by_name[v].model.items()) or "the shared model section")
        for v in archs
    )
    priors = {a.pos_encoding for a in archs.values()}
    rules = [f for f in d.seq_types if f not in RECALL_FAMILIES]  # the recall families have their own lengths
    lengths = f"lengths {d.min_len}–{d.max_len}, " if rules else ""
    lines = [
        f"Data (from {inp.data_source}): families {', '.join(d.seq_types)}; {d.n_train}/{d.n_val}/{d.n_test} "
        f"sequences per family (train/val/test), {lengths}{draws}; generator-disjoint splits.",
        f"Architecture: d_model {first.d_model}, {first.n_layers} layer(s), {first.n_heads} heads"
        + ("" if len(shape) == 1 else " (NOT the same for every variant: see the variants)")
        + f". Variants (baseline first): {changes}.",
        "Parameters: "
        + ", ".join(f"{v} {n:,}" for v, n in params.items())
        + (" (matched)." if len(set(params.values())) == 1 else " (NOT matched)."),
        "Positional prior: "
        + ", ".join(f"{v} {a.pos_encoding}" for v, a in archs.items())
        + (
            " (the same prior: ALiBi slopes m_h for softmax, decay exp(-m_h) for the recurrent mixers)."
            if priors == {"alibi"}
            else " (the same)."
            if len(priors) == 1
            else " (DIFFERENT)."
        ),
    ]
    if mode == "train":
        t = cfg.train
        lr = ", ".join(f"{v} {x:g}" for v, x in lrs.items()) if lrs else f"{t.lr:g}"
        lines.append(
            f"Training: {t.epochs} epochs, batch {t.batch_size}, lr {lr}, seeds {cfg.compare.seeds} "
            "(every variant gets each seed)."
        )
    else:
        for v, ms in by_variant.items():
            lines.append(f"{v}: " + ", ".join(m.label for m in ms) + " (loaded, evaluated only).")
    return lines
