"""report.md of `picollm compare`: one function per section (setup, headline, every split, per family,
length generalisation with coverage, efficiency, figures), assembled by `render_report`. Pure text from a
`ReportInput`; the flow logs it.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections import Counter
from dataclasses import dataclass, field

from picollm.compare.efficiency import Efficiency
from picollm.compare.stats import (
    MODELS,
    Aggregate,
    Difference,
    SeqIntervals,
    diff_cells,
    fmt_interval,
    holm_table,
    side,
)


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
    diffs: dict[str, Difference]  # metric -> linear - softmax with unadjusted p-values
    rows: list[dict[str, str]]  # the headline table (stats.summary_rows)
    alpha: float
    ci_text: str
    coverage: dict[str, dict[str, float]]  # "test split" and "<f>x" -> coverage()
    efficiency: Efficiency | None
    figures: list[tuple[str, str]]  # (caption, artifact path)
    extra: list[str] = field(default_factory=list)  # extra markdown sections
    test: str = "paired"  # compare.test: the test asked for
    seq_ci: SeqIntervals = field(default_factory=dict)  # sequence-bootstrap intervals of single runs


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


ROW_COLUMNS = [
    ("metric", "metric"),
    ("softmax", "softmax"),
    ("linear", "linear"),
    ("diff", "linear − softmax"),
    ("p", "p"),
    ("p_tost", "p TOST"),
    ("verdict", "verdict"),
]
TEST_HEADER = ["linear − softmax", "p", "p TOST", "verdict"]  # the test columns of every compared table


def _tested(r: ReportInput, items: list[tuple[str, str, bool | None]]) -> list[tuple[str, str, bool | None, dict]]:
    """(key, label, higher_better, cells) of the items either model reports; `cells` are the test columns
    (stats.diff_cells) with p-values Holm-adjusted within these items (higher_better None: not tested)."""
    present = [(k, label, hb) for k, label, hb in items if k in r.agg["softmax"] or k in r.agg["linear"]]
    adjusted = holm_table(r.diffs, [k for k, _, hb in present if hb is not None])
    out = []
    for key, label, hb in present:
        if hb is None or key not in adjusted:
            a, b = r.agg["softmax"].get(key), r.agg["linear"].get(key)
            diff = f"{b.mean - a.mean:+.3f}" if a and b and math.isfinite(b.mean - a.mean) else "-"
            cells = {"diff": diff, "p": "-", "p_tost": "-", "verdict": "-" if hb is None else "n/a"}
        else:
            cells = diff_cells(r.diffs[key], adjusted[key], r.alpha, hb)
        out.append((key, label, hb, cells))
    return out


def _test_cells(cells: dict[str, str]) -> list[str]:
    return [cells["diff"], cells["p"], cells["p_tost"], cells["verdict"]]


def _verdict_line(tested: list[tuple[str, str, bool | None, dict]]) -> list[str]:
    """Which rows got which verdict, and the size of the table's Holm family."""
    k = sum(t[3]["p"] != "-" for t in tested)
    if not k:
        return ["", "No test: fewer than 2 runs a side."]
    groups: dict[str, list[str]] = {}
    for _, label, _, cells in tested:
        if cells["p"] != "-":
            groups.setdefault(cells["verdict"], []).append(label)
    order = sorted(groups, key=lambda v: (not v.endswith("better"), v.startswith("inconclusive"), v))
    said = "; ".join(f"**{v}**: {', '.join(groups[v])}" for v in order)
    return ["", f"p-values Holm-adjusted within this table of {k} tests. {said}."]


def _test_sentence(r: ReportInput) -> str:
    """Which test, which margin, the correction and alpha (under the headline table)."""
    if not r.diffs:
        return "No difference test: fewer than 2 runs a side."
    used = {d.test for d in r.diffs.values()}
    n = {att: len(labels) for att, labels in r.runs.items()}
    if "paired" in used:
        test = (
            f"paired t-test on the {n['softmax']} per-seed differences linear_s − softmax_s (both models of a "
            "seed start from the same weights and see the same data in the same order), with its paired t interval"
        )
    else:
        test = "Welch's unequal-variance t-test of the difference of means, with its Welch t interval"
        if r.test == "paired":
            why = (
                "registry mode: the loaded models are not known to be paired"
                if r.mode == "registry"
                else "unequal numbers of runs"
                if n["softmax"] != n["linear"]
                else "the two models' seeds differ"
            )
            test += f" (the paired test was asked for, but the runs are not paired: {why})"
    margins = Counter(row["margin"] for row in r.rows if row.get("margin", "-") != "-")
    usual = margins.most_common(1)[0][0] if margins else "-"
    other = [f"{row['metric']} ±{row['margin']}" for row in r.rows if row.get("margin", usual) not in (usual, "-")]
    return (
        f"Difference test: {test}. Equivalence: TOST (two one-sided tests) with margin ±{usual}"
        + (f" ({', '.join(other)})" if other else "")
        + " — absolute, in the metric's units (compare.equivalence_margin; per metric: "
        f"compare.equivalence_margins). p and p TOST are Holm-adjusted within this table of "
        f"{sum(row['p'] != '-' for row in r.rows)} tests (the two corrected separately); alpha = {r.alpha}."
    )


HOW_TO_READ = (
    "How to read the verdicts: **X better** = the difference test rejects equal means (adjusted p < alpha); "
    "**equivalent within ±m** = no difference shown, and TOST shows |linear − softmax| < m (adjusted p TOST "
    "< alpha); **inconclusive** = neither a difference nor equivalence within ±m could be shown with these "
    "runs (more seeds, or a wider margin, may decide it)."
)


SPLIT_METRICS = [  # (metric, label, higher is better; None: no better direction, not tested)
    ("loss", "loss", False),
    ("accuracy", "accuracy", True),
    ("accuracy_predictable", "acc. predictable", True),
    ("accuracy_vs_ceiling", "acc. / ceiling", True),
    ("ece", "ECE", False),
    ("confidence", "mean confidence", None),
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
        f"Mean over runs ± {r.ci_text}. linear − softmax: mean difference with its "
        "interval; p: two-sided test of no difference; p TOST: equivalence within the margin.",
        "",
    ]
    lines += md_table([h for _, h in ROW_COLUMNS], [[row[k] for k, _ in ROW_COLUMNS] for row in r.rows])
    lines += ["", _test_sentence(r), "", HOW_TO_READ]
    groups: dict[str, list[str]] = {}
    for row in r.rows:
        groups.setdefault(row["verdict"], []).append(row["metric"])
    kinds = ["linear better", "softmax better", *sorted(v for v in groups if v.startswith("equivalent"))]
    kinds.append("inconclusive")
    if r.diffs:
        lines += ["", " ".join(f"**{v[0].upper() + v[1:]}**: {', '.join(groups.get(v, [])) or 'none'}." for v in kinds)]
    single = [att for att, labels in r.runs.items() if len(labels) == 1]
    if single:
        boot = [k for att in single for k in r.seq_ci.get(att, {})]
        lines += [
            "",
            f"One run of {' and '.join(single)}: no interval over runs and no test. "
            + (
                "Where such a model's accuracy shows an interval (test accuracy, predictable positions, beyond "
                "the training length), it is a percentile bootstrap over its fixed test sequences, as is the "
                "difference when both models have one run on the same sequences: test-set sampling noise only, "
                "not seed-to-seed variation."
                if boot
                else "Every difference is of unknown significance."
            ),
        ]
    return lines


def _every_split(r: ReportInput) -> list[str]:
    items = [
        (f"eval/{split}/{m}", f"{split} {label}", hb)
        for split in ("train", "val", "test")
        for m, label, hb in SPLIT_METRICS
    ]
    tested = _tested(r, items)
    table = [[label, *_sides(r, key), *_test_cells(cells)] for key, label, _, cells in tested]
    return [
        "",
        "## Every split",
        "",
        "Mean confidence has no better direction and is not tested.",
        "",
        *md_table(["metric", "softmax", "linear", *TEST_HEADER], table),
        *_verdict_line(tested),
    ]


def _sides(r: ReportInput, key: str) -> list[str]:
    return [fmt_interval(side(r.agg, r.seq_ci, att, key)) for att in MODELS]


def _per_family(r: ReportInput) -> list[str]:
    tested = _tested(r, [(f"eval/test/accuracy/{fam}", fam, True) for fam in r.families])
    table = []
    for key, fam, _, cells in tested:
        ceil = r.agg["softmax"].get(f"eval/test/ceiling/{fam}")
        acc_c = [fmt_interval(r.agg[att].get(f"eval/test/accuracy_vs_ceiling/{fam}")) for att in MODELS]
        table.append([fam, *_sides(r, key), f"{ceil.mean:.3f}" if ceil else "-", *acc_c, *_test_cells(cells)])
    header = ["family", "softmax acc.", "linear acc.", "ceiling", "softmax acc./ceiling", "linear acc./ceiling"]
    return ["", "## Per family (test)", "", *md_table([*header, *TEST_HEADER], table), *_verdict_line(tested)]


def _length_generalisation(r: ReportInput) -> list[str]:
    factors = sorted(r.factors)
    lines = [
        "",
        "## Length generalisation",
        "",
        f"Sequences of exactly f × {r.train_len} tokens (f = {', '.join(map(str, factors))}) are "
        "drawn from the test split's generators (none of them in training; a deterministic family gives one "
        "sequence per generator and length, so it may have fewer than n_long), content-disjoint from every "
        "split. Values are residues modulo M, so long sequences wrap around rather than "
        "reaching values outside the trained range; the coverage table below checks this on the sequences "
        "actually drawn (fraction of their values, and of their x_t → x_t+1 transitions, that also occur in "
        f"the training split). *Beyond* = targets at (0-based) positions ≥ {r.train_len}, where the model "
        "never had to predict in training. The ceiling is the Bayes-optimal accuracy on the same targets.",
        "",
    ]
    items = [(f"lengen/x{f}/accuracy", f"accuracy at {f}×", True) for f in factors]
    items += [(f"lengen/x{f}/beyond/accuracy", f"accuracy beyond at {f}×", True) for f in factors]
    tested = _tested(r, items)
    cells_of = {key: cells for key, _, _, cells in tested}
    table = []
    for f in factors:
        row = [f"{f}× ({f * r.train_len})"]
        for key in (f"lengen/x{f}/accuracy", f"lengen/x{f}/beyond/accuracy"):
            cells = cells_of.get(key, {"p": "-", "verdict": "-"})
            row += [*_sides(r, key), cells["p"], cells["verdict"]]
        c = r.agg["softmax"].get(f"lengen/x{f}/beyond/ceiling")
        row.append(f"{c.mean:.3f}" if c else "-")
        table.append(row)
    header = [
        "length",
        "softmax acc.",
        "linear acc.",
        "p",
        "verdict",
        "softmax acc. beyond",
        "linear acc. beyond",
        "p beyond",
        "verdict beyond",
        "ceiling beyond",
    ]
    lines += md_table(header, table)
    return lines + _verdict_line(tested)


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
    tested = _tested(r, [(f"lengen/x{big}/beyond/accuracy/{fam}", fam, True) for fam in r.families])
    table = []
    for key, fam, _, cells in tested:
        c = r.agg["softmax"].get(f"lengen/x{big}/beyond/ceiling/{fam}")
        table.append([fam, *_sides(r, key), f"{c.mean:.3f}" if c else "-", *_test_cells(cells)])
    return [
        "",
        f"Per family, targets beyond the training length at {big}× ({big * r.train_len} tokens):",
        "",
        *md_table(["family", "softmax", "linear", "ceiling", *TEST_HEADER], table),
        *_verdict_line(tested),
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


# --------------------------------------------------------------------------------------------------
# HTML: the copy MLflow's artifact viewer renders (it shows .md as plain text, and an HTML page's relative
# image links do not resolve in its sandboxed frame), so the figures are inlined as data URIs.

_IMAGE = re.compile(r"!\[(.*?)\]\(([^)\s]+)\)")  # captions may hold brackets: "colour scale [0, 1]"
_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #1f2328; line-height: 1.45; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr:nth-child(even) { background: #f6f8fa; }
img { max-width: 100%; border: 1px solid #d0d7de; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 3px; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
"""


def report_html(markdown: str, figures: dict[str, bytes], title: str = "picollm compare report") -> str:
    """`markdown` (report.md) as one self-contained HTML page: tables rendered, and every image whose
    path is a key of `figures` (artifact path -> PNG bytes) embedded, so it needs no other artifact."""
    from markdown_it import MarkdownIt

    def inline(m: re.Match[str]) -> str:
        png = figures.get(m.group(2))
        if png is None:
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(png).decode()})"

    body = MarkdownIt("commonmark").enable("table").render(_IMAGE.sub(inline, markdown))
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )
