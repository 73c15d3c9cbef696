"""The recall study's numbers, gathered from the compare members (their metrics and training histories) for
the report's recall section (report_studies.recall_section): answer accuracy per variant and pair count with each
seed's value, per query, the heuristic baselines, the declared contrasts with Holm, learning speed, the setup."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from picollm.compare.inputs import Member
from picollm.compare.recall import baselines, epochs_to, recall_key
from picollm.compare.stats import Difference, Interval, differences, holm
from picollm.compare.summary import ByVariant, Summary
from picollm.compare.table import Comparisons
from picollm.config import CompareConfig

ANSWER_METRIC = "eval/test/accuracy_answer/mqar"  # the trained mixture's test answers: the primary contrasts'
VAL_ANSWER = "val/accuracy_answer/mqar"


@dataclass
class RecallStudy:
    """What the recall section reports, as plain numbers (pipelines/compare.py fills it)."""

    per_variant: dict[str, dict[int, Interval]]  # variant -> pairs -> answer accuracy over seeds
    per_seed: dict[str, dict[int, list[float]]]  # variant -> pairs -> each seed's answer accuracy
    per_query: dict[str, dict[int, dict[int, float]]]  # variant -> pairs -> query index -> mean over seeds
    baselines: dict[int, dict[str, float]]  # pairs -> heuristic -> answer accuracy
    trained: list[int]  # the pair counts of the training mixture
    contrasts: list[tuple[str, str, Difference, tuple[float, float]]]  # declared (a, b, a - b, Holm (p, p_TOST))
    secondary: Comparisons  # each variant - baseline per pair count (recall keys), Holm over that table
    epochs_to: dict[str, list[float]]  # variant -> each seed's first epoch above 0.9 validation answer accuracy
    steps_per_epoch: int
    setup: list[str]  # the task and each variant's positions / short convolution
    width: dict[int, dict[str, dict[int, Interval]]] = field(default_factory=dict)


def _values(members: list[Member], key: str) -> list[float]:
    return [m.metrics.get(key, math.nan) for m in members]


def _per_query(cfg: CompareConfig, by_variant: ByVariant) -> dict[str, dict[int, dict[int, float]]]:
    out: dict[str, dict[int, dict[int, float]]] = {}
    for v, ms in by_variant.items():
        for n in cfg.compare.recall_pairs:
            keys = {i: recall_key(n, i) for i in range(1, (cfg.data.mqar_queries or n) + 1)}
            found = {i: k for i, k in keys.items() if any(k in m.metrics for m in ms)}
            out.setdefault(v, {})[n] = {i: float(np.nanmean(_values(ms, k))) for i, k in found.items()}
    return out


def _contrasts(
    cfg: CompareConfig, summary: Summary, by_variant: ByVariant
) -> list[tuple[str, str, Difference, tuple[float, float]]]:
    """The declared contrasts (else each variant against the baseline) on ANSWER_METRIC, Holm over them."""
    answers = {v: _values(ms, ANSWER_METRIC) for v, ms in by_variant.items()}
    return declared_contrasts(cfg, answers, summary.paired)


def declared_contrasts(
    cfg: CompareConfig, answers: dict[str, list[float]], paired: bool
) -> list[tuple[str, str, Difference, tuple[float, float]]]:
    """`_contrasts` from each variant's ANSWER_METRIC values in seed order (also what the verdict page uses)."""
    cc, names = cfg.compare, list(answers)
    pairs = [tuple(c) for c in cc.contrasts] or [(v, names[0]) for v in names[1:]]
    runs = {v: [{ANSWER_METRIC: x} for x in xs] for v, xs in answers.items()}
    tested = []
    for a, b in pairs:
        d = differences(runs, cc.confidence, cc.equivalence_margin, cc.equivalence_margins, cc.test, paired, b, a).get(
            ANSWER_METRIC
        )
        if d is not None:
            tested.append((a, b, d))
    p, p_tost = holm([d.p for *_, d in tested]), holm([d.p_tost for *_, d in tested])
    return [(a, b, d, (p[k], p_tost[k])) for k, (a, b, d) in enumerate(tested)]


def _setup(cfg: CompareConfig, by_variant: ByVariant) -> list[str]:
    d = cfg.data
    treatment = "; ".join(
        f"{v}: {ms[0].model.cfg.pos_encoding} positions, "
        + (f"short_conv {ms[0].model.cfg.short_conv}" if ms[0].model.cfg.short_conv else "no short_conv")
        for v, ms in by_variant.items()
    )
    length = f"{d.mqar_length or d.max_len} tokens a sequence, " if d.mqar_layout == "zoology" else ""
    return [
        f"Task: MQAR in the {d.mqar_layout} layout (docs/commands.md), keys from {d.mqar_key_vocab} tokens, values "
        f"from {d.mqar_value_vocab}, {length}trained on a mixture of {', '.join(map(str, d.mqar_pairs))} pairs "
        f"(train.loss_on: {cfg.train.loss_on}).",
        f"Positions and short convolution per variant (a fair comparison treats them alike): {treatment}.",
    ]


def recall_study(cfg: CompareConfig, summary: Summary, by_variant: ByVariant) -> RecallStudy:
    cc, d = cfg.compare, cfg.data
    return RecallStudy(
        per_variant={
            v: {n: iv for n in cc.recall_pairs if (iv := summary.agg[v].get(recall_key(n))) is not None}
            for v in summary.agg
        },
        per_seed={v: {n: _values(ms, recall_key(n)) for n in cc.recall_pairs} for v, ms in by_variant.items()},
        per_query=_per_query(cfg, by_variant),
        baselines={n: baselines(d, n) for n in cc.recall_pairs},
        trained=list(d.mqar_pairs),
        contrasts=_contrasts(cfg, summary, by_variant),
        secondary=summary.diffs,
        epochs_to={v: [epochs_to(m.history, VAL_ANSWER) for m in ms] for v, ms in by_variant.items()},
        steps_per_epoch=math.ceil(d.n_train * len(d.seq_types) / cfg.train.batch_size),
        setup=_setup(cfg, by_variant),
    )
