"""report.md of `picollm compare`: one function per section (setup, headline, every split, per family,
length generalisation with coverage, efficiency, figures), assembled by `render_report`. Pure text from a
`ReportInput`; the flow logs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from picollm.compare.efficiency import Efficiency
from picollm.compare.stats import MODELS, Aggregate, fmt_interval


@dataclass
class ReportInput:
    title: str
    mode: str  # "train" or "registry"
    parent_run_id: str
    seconds: float
    setup: list[str]  # bullet lines
    runs: dict[str, list[str]]  # model -> labels of its runs (seeds or references)
    families: list[str]
    factors: list[int]
    train_len: int
    agg: Aggregate
    pvals: dict[str, float]
    rows: list[dict[str, str]]
    alpha: float
    ci_text: str
    coverage: dict[str, dict[str, float]]  # "test split" and "<f>x" -> coverage()
    efficiency: Efficiency | None
    figures: list[tuple[str, str]]  # (caption, artifact path)
    extra: list[str] = field(default_factory=list)  # extra markdown sections


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


ROW_COLUMNS = [
    ("metric", "metric"),
    ("softmax", "softmax"),
    ("linear", "linear"),
    ("diff", "linear − softmax"),
    ("welch_p", "Welch p"),
    ("cis_overlap", "CIs overlap"),
    ("verdict", "verdict"),
]


def _cmp_row(r: ReportInput, key: str, label: str) -> list[str] | None:
    a, b = r.agg["softmax"].get(key), r.agg["linear"].get(key)
    if a is None and b is None:
        return None
    p = r.pvals.get(key, math.nan)
    return [label, fmt_interval(a), fmt_interval(b), f"{p:.3f}" if math.isfinite(p) else "-"]


def _noise_line(r: ReportInput, items: list[tuple[str, str]]) -> list[str]:
    """A sentence naming the table's differences with Welch p <= alpha; all others are within noise."""
    tested = [(key, label, r.pvals[key]) for key, label in items if math.isfinite(r.pvals.get(key, math.nan))]
    if not tested:
        return ["", "No test: fewer than 2 runs a side."]
    real = []
    for key, label, p in tested:
        higher = r.agg["linear"][key].mean > r.agg["softmax"][key].mean
        if p <= r.alpha:
            real.append(f"{label} (linear {'higher' if higher else 'lower'}, p = {p:.3f})")
    if not real:
        return ["", f"Every difference in this table is within noise (Welch p > {r.alpha})."]
    return ["", f"Real differences (p ≤ {r.alpha}): {'; '.join(real)}. Everything else in this table is within noise."]


SPLIT_METRICS = [
    ("loss", "loss"),
    ("accuracy", "accuracy"),
    ("accuracy_predictable", "acc. predictable"),
    ("accuracy_vs_ceiling", "acc. / ceiling"),
    ("ece", "ECE"),
    ("confidence", "mean confidence"),
]


def render_report(r: ReportInput) -> str:
    """The sections in report order; `r.extra` sections go just before the figures."""
    lines = [
        *_setup(r),
        *_headline(r),
        *_every_split(r),
        *_per_family(r),
        *_length_generalisation(r),
        *_coverage(r),
        *_beyond_per_family(r),
        *_efficiency(r),
    ]
    for section in r.extra:
        lines += ["", section]
    lines += _figures(r)
    return "\n".join(lines).rstrip() + "\n"


def _setup(r: ReportInput) -> list[str]:
    n = {att: len(labels) for att, labels in r.runs.items()}
    return [
        f"# {r.title}",
        "",
        f"Parent run `{r.parent_run_id}` · mode: **{r.mode}** · wall time {r.seconds:.0f} s · "
        f"runs: softmax n={n['softmax']}, linear n={n['linear']}",
        "",
        "## Setup",
        "",
        *[f"- {s}" for s in r.setup],
    ]


def _headline(r: ReportInput) -> list[str]:
    lines = [
        "",
        "## Headline",
        "",
        f"Mean over runs ± {r.ci_text}. Difference = linear − softmax; Welch's unequal-variance t-test, "
        f"a difference is called real when p ≤ {r.alpha}.",
        "",
    ]
    lines += md_table([h for _, h in ROW_COLUMNS], [[row[k] for k, _ in ROW_COLUMNS] for row in r.rows])
    noise = [row["metric"] for row in r.rows if row["verdict"] == "within noise"]
    real = [f"{row['metric']} ({row['verdict']})" for row in r.rows if row["verdict"].endswith("better")]
    lines += [
        "",
        f"**Within noise** (p > {r.alpha}): {', '.join(noise) if noise else 'none'}.",
        "",
        f"**Real differences** (p ≤ {r.alpha}): {', '.join(real) if real else 'none'}.",
    ]
    if any(row["verdict"].startswith("n/a") for row in r.rows):
        lines += [
            "",
            "With one run per model there is no interval and no test: every difference is of unknown significance.",
        ]
    return lines


def _every_split(r: ReportInput) -> list[str]:
    items = [
        (f"eval/{split}/{m}", f"{split} {label}") for split in ("train", "val", "test") for m, label in SPLIT_METRICS
    ]
    table = [row for key, label in items if (row := _cmp_row(r, key, label))]
    return [
        "",
        "## Every split",
        "",
        *md_table(["metric", "softmax", "linear", "Welch p"], table),
        *_noise_line(r, items),
    ]


def _per_family(r: ReportInput) -> list[str]:
    table = []
    for fam in r.families:
        row = _cmp_row(r, f"eval/test/accuracy/{fam}", fam)
        if row:
            ceil = r.agg["softmax"].get(f"eval/test/ceiling/{fam}")
            acc_c = [fmt_interval(r.agg[att].get(f"eval/test/accuracy_vs_ceiling/{fam}")) for att in MODELS]
            table.append([*row[:3], f"{ceil.mean:.3f}" if ceil else "-", *acc_c, row[3]])
    header = [
        "family",
        "softmax acc.",
        "linear acc.",
        "ceiling",
        "softmax acc./ceiling",
        "linear acc./ceiling",
        "Welch p (acc.)",
    ]
    return [
        "",
        "## Per family (test)",
        "",
        *md_table(header, table),
        *_noise_line(r, [(f"eval/test/accuracy/{fam}", fam) for fam in r.families]),
    ]


def _length_generalisation(r: ReportInput) -> list[str]:
    factors = sorted(r.factors)
    lines = [
        "",
        "## Length generalisation",
        "",
        f"Sequences of exactly f × {r.train_len} tokens (f = {', '.join(map(str, factors))}) are "
        "drawn from the training generators with the training parameters and start values, content-disjoint "
        "from the training data. Values are residues modulo M, so long sequences wrap around rather than "
        "reaching values outside the trained range; the coverage table below checks this on the sequences "
        "actually drawn (fraction of their values, and of their x_t → x_t+1 transitions, that also occur in "
        f"the training split). *Beyond* = targets at (0-based) positions ≥ {r.train_len}, where the model "
        "never had to predict in training. The ceiling is the Bayes-optimal accuracy on the same targets.",
        "",
    ]
    table = []
    for f in factors:
        cells = [f"{f}× ({f * r.train_len})"]
        for key in ("accuracy", "beyond/accuracy"):
            cells += [fmt_interval(r.agg[att].get(f"lengen/x{f}/{key}")) for att in MODELS]
            p = r.pvals.get(f"lengen/x{f}/{key}", math.nan)
            cells.append(f"{p:.3f}" if math.isfinite(p) else "-")
        c = r.agg["softmax"].get(f"lengen/x{f}/beyond/ceiling")
        cells.append(f"{c.mean:.3f}" if c else "-")
        table.append(cells)
    header = [
        "length",
        "softmax acc.",
        "linear acc.",
        "p",
        "softmax acc. beyond",
        "linear acc. beyond",
        "p beyond",
        "ceiling beyond",
    ]
    lines += md_table(header, table)
    return lines + _noise_line(
        r,
        [(f"lengen/x{f}/accuracy", f"accuracy at {f}×") for f in factors]
        + [(f"lengen/x{f}/beyond/accuracy", f"accuracy beyond at {f}×") for f in factors],
    )


def _coverage(r: ReportInput) -> list[str]:
    """Part of the length-generalisation section: how much of each split the training split covers."""
    cov_fams = [f for f in r.families if any(f"transition_coverage/{f}" in c for c in r.coverage.values())]
    cov_keys = ["value_coverage", "transition_coverage", *(f"transition_coverage/{f}" for f in cov_fams)]
    return [
        "",
        "Coverage by the training split (the ordinary test split for reference). Alternating pairs "
        "(a, b) come from M·(M−1) combinations, so most are new in any split: that family tests the "
        "copy rule, not memorised transitions.",
        "",
        *md_table(
            ["sequences", "values", "transitions", *(f"transitions: {f}" for f in cov_fams)],
            [[name, *(f"{c.get(k, math.nan):.3f}" for k in cov_keys)] for name, c in r.coverage.items()],
        ),
    ]


def _beyond_per_family(r: ReportInput) -> list[str]:
    """Part of the length-generalisation section: per family, beyond the training length at the longest
    length (nothing when the longest is the training length)."""
    big = max(r.factors)
    if big <= 1:
        return []
    table = []
    for fam in r.families:
        row = _cmp_row(r, f"lengen/x{big}/beyond/accuracy/{fam}", fam)
        if row:
            c = r.agg["softmax"].get(f"lengen/x{big}/beyond/ceiling/{fam}")
            table.append([*row[:3], f"{c.mean:.3f}" if c else "-", row[3]])
    return [
        "",
        f"Per family, targets beyond the training length at {big}× ({big * r.train_len} tokens):",
        "",
        *md_table(["family", "softmax", "linear", "ceiling", "Welch p"], table),
        *_noise_line(r, [(f"lengen/x{big}/beyond/accuracy/{fam}", fam) for fam in r.families]),
    ]


def _efficiency(r: ReportInput) -> list[str]:
    """Training step time and memory per length, then (`_generation_table`) prefill and decoding time."""
    e = r.efficiency
    if e is None:
        return []
    lines = [
        "",
        "## Efficiency",
        "",
        f"Both models (fresh weights, same architecture as compared) measured side by side in one process, "
        f"interleaved per length, on the CPU with {e.threads} torch thread(s); times are medians. "
        "Training step = forward + backward + AdamW on a batch of max(1, tokens_per_step // N) sequences. "
        "Peak memory: one training step per (model, length) in a fresh Python process; its peak RSS "
        "is the kernel high-water mark VmHWM (/proc/self/status; ru_maxrss is not used on Linux because "
        "a child inherits its parent's peak there), reset to the current RSS just before the step "
        "(/proc/self/clear_refs), so 'step MB' is what the (first) step adds on top of model, optimizer "
        "and inputs. Generation: greedy decoding at batch 1 after a prompt of C tokens; softmax keeps a KV "
        "cache, linear attention a fixed-size recurrent state.",
        "",
    ]
    table = []
    for n_ in e.lengths:
        cells = [str(n_), str(e.batches[n_])]
        cells += [f"{e.step_ms[att][n_]:.1f}" for att in MODELS]
        cells.append(f"{e.step_ms['linear'][n_] / e.step_ms['softmax'][n_]:.2f}")
        for key in ("step_mb", "peak_rss_mb"):
            cells += [f"{e.memory[att][n_][key]:.0f}" if e.memory.get(att) else "-" for att in MODELS]
        table.append(cells)
    header = [
        "N",
        "batch",
        "softmax ms/step",
        "linear ms/step",
        "linear/softmax",
        "softmax step MB",
        "linear step MB",
        "softmax peak RSS MB",
        "linear peak RSS MB",
    ]
    return [*lines, *md_table(header, table), "", *_generation_table(e)]


def _generation_table(e: Efficiency) -> list[str]:
    table = [
        [
            str(c),
            *(f"{e.prefill_ms[att][c]:.1f}" for att in MODELS),
            *(f"{e.gen_ms_per_token[att][c]:.2f}" for att in MODELS),
        ]
        for c in e.contexts
    ]
    header = ["context", "softmax prefill ms", "linear prefill ms", "softmax ms/token", "linear ms/token"]
    return md_table(header, table)


def _figures(r: ReportInput) -> list[str]:
    lines = ["", "## Figures", ""]
    for caption, path in r.figures:
        lines += [f"### {caption}", "", f"![{caption}]({path})", ""]
    return lines
