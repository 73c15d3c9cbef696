"""report.md of `picollm compare`: one function per section (setup, headline, every split, per family,
length generalisation with coverage, efficiency, figures), assembled by `render_report`. Pure text from a
`ReportInput`; the flow logs it. Every table compares each variant with the baseline (the first): with two
variants a value column each and the test columns of their difference, with more a value column per variant
and one column per other variant holding its difference, adjusted p and verdict.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from picollm.compare.efficiency import Efficiency
from picollm.compare.report_efficiency import efficiency_section
from picollm.compare.stats import Aggregate, SeqIntervals
from picollm.compare.table import PRIMARY, Comparisons, diff_cells, fmt_interval, holm_grid, side, untested_reason
from picollm.compare.verdicts import WHY, rank
from picollm.tracking.pages import report_html as report_html  # the page compare logs (shared with dpo, sweep)


@dataclass
class ReportInput:
    title: str
    mode: str  # "train" or "registry"
    parent_run_id: str
    seconds: float
    setup: list[str]  # bullet lines
    runs: dict[str, list[str]]  # variant -> labels of its runs (seeds or references); the first is the baseline
    families: list[str]
    factors: list[int]
    train_len: int
    agg: Aggregate
    diffs: Comparisons  # variant -> metric -> variant - baseline with unadjusted p-values
    rows: list[dict[str, str]]  # the headline table (table.comparison_rows)
    alpha: float
    ci_text: str
    coverage: dict[str, dict[str, float]]  # "test split" and "<f>x" -> coverage()
    efficiency: Efficiency | None
    figures: list[tuple[str, str]]  # (caption, artifact path)
    extra: list[str] = field(default_factory=list)  # extra markdown sections
    test: str = "paired"  # compare.test: the test asked for
    seq_ci: SeqIntervals = field(default_factory=dict)  # sequence-bootstrap intervals of single runs
    primaries: list[str] = field(default_factory=list)  # compare.primaries (the rows' "role" says which is which)

    @property
    def variants(self) -> list[str]:
        return list(self.runs)

    @property
    def base(self) -> str:
        return self.variants[0]

    @property
    def others(self) -> list[str]:
        return self.variants[1:]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


ROW_COLUMNS = [  # the two-variant headline: (row key, header); the variant columns take their names
    ("metric", "metric"),
    ("base_value", "{base}"),
    ("value", "{variant}"),
    ("diff", "{variant} − {base}"),
    ("p", "p"),
    ("p_tost", "p TOST"),
    ("verdict", "verdict"),
]

Item = tuple[str, str, bool | None]  # (metric key, label, higher is better; None: no direction, not tested)


def _header(r: ReportInput, first: str) -> list[str]:
    """Two variants: value, value, difference, p, p TOST, verdict; more: each variant's value, then one
    `v − base` column per other variant (difference, adjusted p and verdict in one cell)."""
    if len(r.variants) == 2:
        v = r.others[0]
        return [first, r.base, v, f"{v} − {r.base}", "p", "p TOST", "verdict"]
    return [first, *r.variants, *(f"{v} − {r.base}" for v in r.others)]


def _compared(r: ReportInput, items: list[Item], extra: dict[str, list[str]] | None = None) -> tuple[list, int, dict]:
    """The rows of a compared table over `items` that some variant reports (`extra`: cells after the label,
    by key), the number of tests in it and the verdicts {(variant, label): verdict}; p-values Holm-adjusted
    over every test of the table."""
    present = [(k, label, hb) for k, label, hb in items if any(k in r.agg.get(v, {}) for v in r.variants)]
    adjusted = holm_grid(r.diffs, [k for k, _, hb in present if hb is not None])
    rows, verdicts = [], {}
    for key, label, hb in present:
        values = [fmt_interval(side(r.agg, r.seq_ci, v, key)) for v in r.variants]
        cells_of = {}
        for v in r.others:
            if hb is None or (v, key) not in adjusted:
                a, b = r.agg.get(r.base, {}).get(key), r.agg.get(v, {}).get(key)
                diff = f"{b.mean - a.mean:+.3f}" if a and b and math.isfinite(b.mean - a.mean) else "-"
                why = "-" if hb is None else untested_reason(r.agg, r.base, v, key)
                cells_of[v] = {"diff": diff, "p": "-", "p_tost": "-", "verdict": why}
            else:
                cells_of[v] = diff_cells(r.diffs[v][key], adjusted[(v, key)], r.alpha, hb, names=(r.base, v))
                verdicts[(v, label)] = cells_of[v]["verdict"]
        lead = [label, *(extra or {}).get(key, [])]
        if len(r.variants) == 2:
            c = cells_of[r.others[0]]
            rows.append([*lead, *values, c["diff"], c["p"], c["p_tost"], c["verdict"]])
        else:
            rows.append([*lead, *values, *(_cell(cells_of[v]) for v in r.others)])
    return rows, len(adjusted), verdicts


def _cell(c: dict[str, str]) -> str:
    """One comparison in one cell (more than two variants): difference, adjusted p, verdict."""
    if c["p"] == "-":
        return c["diff"]
    return f"{c['diff']} (p {c['p']}): {c['verdict']}"


def _table(
    r: ReportInput,
    first: str,
    items: list[Item],
    extra: dict[str, list[str]] | None = None,
    extra_header: list[str] | None = None,
) -> list[str]:
    rows, k, verdicts = _compared(r, items, extra)
    header = _header(r, first)
    header[1:1] = extra_header or []
    return [*md_table(header, rows), *_verdict_line(r, k, verdicts)]


def _verdict_line(r: ReportInput, k: int, verdicts: dict[tuple[str, str], str]) -> list[str]:
    """Which rows got which verdict, and the size of the table's Holm family."""
    if not k:
        return ["", "No test: fewer than 2 runs a side."]
    groups: dict[str, list[str]] = {}
    for (v, label), verdict in verdicts.items():
        groups.setdefault(verdict, []).append(label if len(r.variants) == 2 else f"{label} ({v})")
    order = sorted(groups, key=lambda v: (rank(v), v))
    said = "; ".join(f"**{v}**: {', '.join(groups[v])}" for v in order)
    return ["", f"p-values Holm-adjusted within this table of {k} tests. {said}."]


def _test_sentence(r: ReportInput) -> str:
    """Which test, which margin, the correction and alpha (under the headline table)."""
    if not any(r.diffs.values()):
        return "No difference test: fewer than 2 runs a side."
    used = {d.test for per in r.diffs.values() for d in per.values()}
    n = {att: len(labels) for att, labels in r.runs.items()}
    against = "" if len(r.variants) == 2 else f"each variant against the baseline {r.base}: "
    if "paired" in used:
        test = (
            f"{against}paired t-test on the {n[r.base]} per-seed differences variant_s − {r.base}_s (the runs of "
            "a seed share train.seed, so the same data in the same order and, where the architectures agree, the "
            "same initial weights), with its paired t interval"
        )
    else:
        test = f"{against}Welch's unequal-variance t-test of the difference of means, with its Welch t interval"
        if r.test == "paired":
            why = (
                "registry mode: the loaded models are not known to be paired"
                if r.mode == "registry"
                else "unequal numbers of runs"
                if len(set(n.values())) > 1
                else "the variants' seeds differ"
            )
            test += f" (the paired test was asked for, but the runs are not paired: {why})"
    margins = Counter(row["margin"] for row in r.rows if row.get("margin", "-") != "-")
    usual = margins.most_common(1)[0][0] if margins else "-"
    other = sorted(
        {f"{row['metric']} ±{row['margin']}" for row in r.rows if row.get("margin", usual) not in (usual, "-")}
    )
    tested = Counter(row.get("role", "secondary") for row in r.rows if row["p"] != "-")
    families = (
        f"within the primary family of {tested[PRIMARY]} tests and, separately, the secondary family of "
        f"{tested['secondary']}"
        if r.primaries
        else f"within this table of {tested['secondary']} tests"
    )
    return (
        f"Difference test: {test}. Equivalence: TOST (two one-sided tests) with margin ±{usual}"
        + (f" ({', '.join(other)})" if other else "")
        + " — absolute, in the metric's units (compare.equivalence_margin; per metric: "
        f"compare.equivalence_margins). p and p TOST are Holm-adjusted {families} (the two corrected "
        f"separately); alpha = {r.alpha}."
    )


HOW_TO_READ = (
    "How to read the verdicts (the first that applies, picollm/compare/verdicts.py): **n/a (…)** = no test, "
    "for the reason given (< 2 runs a side: fewer than 2 runs with a value on a side; fewer than 2 pairs: "
    "fewer than 2 seeds with the value on both sides; no noise estimate: "
    + WHY["n/a (no noise estimate)"]
    + "); **X better, by < m** = the difference test rejects equal means (adjusted p < alpha) and TOST shows "
    "the difference inside ±m (adjusted p TOST < alpha): real, but smaller than the margin; **X better** = the "
    "difference test rejects, TOST does not; **equivalent within ±m** = no difference shown, and TOST shows "
    "|variant − baseline| < m; **inconclusive** = neither a difference nor equivalence within ±m could be shown "
    "with these runs (more seeds, or a wider margin, may decide it). Primary rows were declared before the "
    "runs (compare.primaries) and are corrected only among themselves; every other row, and every other table "
    "of this report, is secondary: exploratory, each corrected within its own family."
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
    n = ", ".join(f"{att} n={len(labels)}" for att, labels in r.runs.items())
    return [
        f"# {r.title}",
        "",
        f"Parent run `{r.parent_run_id}` · mode: **{r.mode}** · wall time {r.seconds:.0f} s · runs: {n} · "
        f"baseline: **{r.base}**",
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
        f"Mean over runs ± {r.ci_text}. variant − {r.base}: mean difference with its "
        "interval; p: two-sided test of no difference; p TOST: equivalence within the margin.",
        "",
    ]
    primary = [row for row in r.rows if row.get("role") == PRIMARY]
    secondary = [row for row in r.rows if row.get("role") != PRIMARY]
    tested = [sum(row["p"] != "-" for row in rows) for rows in (primary, secondary)]
    if r.primaries:
        lines += [
            f"**Primary** (declared before the runs in compare.primaries: {', '.join(r.primaries)}; p Holm-adjusted "
            f"over these {tested[0]} tests only):",
            "",
            *_headline_table(r, primary),
            "",
            f"**Secondary** (exploratory; Holm over the other {tested[1]} tests of this table):",
            "",
        ]
    else:
        lines += [
            "No primary metric declared in compare.primaries: every row of this table is **secondary** (a recall "
            "study declares its primaries as compare.contrasts: the recall section's first table, when set).",
            "",
        ]
    lines += _headline_table(r, secondary)
    lines += ["", _test_sentence(r), "", HOW_TO_READ]
    groups: dict[str, list[str]] = {}
    for row in r.rows:
        label = row["metric"] if len(r.variants) == 2 else f"{row['metric']} ({row['variant']})"
        groups.setdefault(row["verdict"], []).append(label + (" (primary)" if row.get("role") == PRIMARY else ""))
    kinds = {f"{v} better" for v in r.variants} | {"inconclusive"} | set(groups)
    if any(r.diffs.values()):
        said = [
            f"**{v[0].upper() + v[1:]}**: {', '.join(groups.get(v, [])) or 'none'}."
            for v in sorted(kinds, key=lambda v: (rank(v), v))
        ]
        lines += ["", " ".join(said)]
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


def _headline_table(r: ReportInput, rows: list[dict[str, str]]) -> list[str]:
    """The headline's rows (one family): two variants, ROW_COLUMNS; more, a column per variant and one
    `v − base` cell per other variant."""
    if len(r.variants) == 2:
        header = [h.format(base=r.base, variant=r.others[0]) for _, h in ROW_COLUMNS]
        return md_table(header, [[row[k] for k, _ in ROW_COLUMNS] for row in rows])
    by_metric: dict[str, dict[str, dict[str, str]]] = {}
    for row in rows:
        by_metric.setdefault(row["metric"], {})[row["variant"]] = row
    table = [
        [m, per[r.others[0]]["base_value"], *(per[v]["value"] for v in r.others), *(_cell(per[v]) for v in r.others)]
        for m, per in by_metric.items()
    ]
    return md_table(_header(r, "metric"), table)


def _every_split(r: ReportInput) -> list[str]:
    items = [
        (f"eval/{split}/{m}", f"{split} {label}", hb)
        for split in ("train", "val", "test")
        for m, label, hb in SPLIT_METRICS
    ]
    return [
        "",
        "## Every split",
        "",
        "Mean confidence has no better direction and is not tested.",
        "",
        *_table(r, "metric", items),
    ]


def _per_family(r: ReportInput) -> list[str]:
    items: list[Item] = []
    extra = {}
    for fam in r.families:
        ceil = r.agg[r.base].get(f"eval/test/ceiling/{fam}")
        for key, label in (
            (f"eval/test/accuracy/{fam}", fam),
            (f"eval/test/accuracy_vs_ceiling/{fam}", f"{fam} / ceiling"),
        ):
            items.append((key, label, True))
            extra[key] = [f"{ceil.mean:.3f}" if ceil else "-"]
    return ["", "## Per family (test)", "", *_table(r, "family (accuracy)", items, extra, ["ceiling"])]


def _length_generalisation(r: ReportInput) -> list[str]:
    factors = sorted(r.factors)
    if not factors:
        return []
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
    items: list[Item] = []
    extra = {}
    for f in factors:
        c = r.agg[r.base].get(f"lengen/x{f}/beyond/ceiling")
        for key, label in (
            (f"lengen/x{f}/accuracy", f"accuracy at {f}× ({f * r.train_len})"),
            (f"lengen/x{f}/beyond/accuracy", f"accuracy beyond at {f}×"),
        ):
            items.append((key, label, True))
            extra[key] = [f"{c.mean:.3f}" if c and "beyond" in key else "-"]
    return lines + _table(r, "length", items, extra, ["ceiling beyond"])


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
    big = max(r.factors, default=1)
    if big <= 1:
        return []
    items: list[Item] = [(f"lengen/x{big}/beyond/accuracy/{fam}", fam, True) for fam in r.families]
    extra = {}
    for key, fam, _ in items:
        c = r.agg[r.base].get(f"lengen/x{big}/beyond/ceiling/{fam}")
        extra[key] = [f"{c.mean:.3f}" if c else "-"]
    return [
        "",
        f"Per family, targets beyond the training length at {big}× ({big * r.train_len} tokens):",
        "",
        *_table(r, "family", items, extra, ["ceiling"]),
    ]


def _efficiency(r: ReportInput) -> list[str]:
    return efficiency_section(r.efficiency)


def _figures(r: ReportInput) -> list[str]:
    lines = ["", "## Figures", ""]
    for caption, path in r.figures:
        lines += [f"### {caption}", "", f"![{caption}]({path})", ""]
    return lines
