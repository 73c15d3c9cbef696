"""The verdict-first page of a comparison: each primary contrast's Holm-adjusted verdict in one sentence, a
forest plot of every difference (variant - baseline) with its interval, each seed's paired difference as a
dot and the equivalence margin shaded, then the secondary contrasts as a table.

It needs only the per-run metrics of each variant (seed order) and the comparison's config, so it is built the
same way at the end of `picollm compare` and later from a parent's child runs (`compare --from-runs`). The
statistics are the comparison's own (`table.differences_vs_baseline`, `comparison_rows`, `holm_grid`): the
headline rows' verdicts are the report's. The per-family (and per-number-of-pairs) test accuracies are one more
Holm family of their own, as in the report's per-family table.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any

from picollm.compare.recall_study import ANSWER_METRIC, declared_contrasts
from picollm.compare.report import md_table
from picollm.compare.stats import Difference, aggregate
from picollm.compare.summary import headline
from picollm.compare.table import (
    PRIMARY,
    comparison_rows,
    diff_cells,
    differences_vs_baseline,
    fmt_p,
    holm_grid,
)
from picollm.compare.verdicts import verdict
from picollm.config import CompareConfig
from picollm.tracking.pages import report_html

FIGURE = "figures/verdict_forest.png"
PAGE = "verdict.html"
_FAMILY_KEY = re.compile(r"eval/test/accuracy/([a-z0-9_]+)")
_NOT_FAMILIES = {"seen_context", "novel_context"}

Runs = dict[str, list[dict[str, float]]]  # variant (baseline first) -> its runs' metrics, in seed order


@dataclass
class Contrast:
    """One row of the forest plot: `variant` - `baseline` of `key`, its test, its verdict and its seeds."""

    key: str
    label: str
    variant: str
    baseline: str
    higher_better: bool
    role: str  # "primary", "secondary" or "family"
    diff: Difference | None
    p: str  # Holm-adjusted within the row's family, formatted
    verdict: str
    seeds: list[float]  # each seed's paired difference (empty when the runs are not paired)


def families(runs: Runs) -> list[str]:
    """The families with a per-family test accuracy in every variant's runs."""
    found = [
        {m[1] for k in r for m in [_FAMILY_KEY.fullmatch(k)] if m and m[1] not in _NOT_FAMILIES}
        for per in runs.values()
        for r in per
    ]
    return sorted(set.intersection(*found)) if found else []


def contrasts(cfg: CompareConfig, runs: Runs, paired: bool) -> list[Contrast]:
    """The headline contrasts (primaries first, the comparison's Holm families and verdicts), then each family's
    test accuracy (a Holm family of its own). `paired`: the runs pair up by position (the same seeds)."""
    cc = cfg.compare
    names = list(runs)
    agg = aggregate(runs, cc.confidence, cc.ci, cc.bootstrap_samples)
    diffs = differences_vs_baseline(
        runs, confidence=cc.confidence, margin=cc.equivalence_margin, margins=cc.equivalence_margins, test=cc.test,
        paired=paired,
    )  # fmt: skip
    keys = headline(cfg)
    higher = {k: hb for k, _, hb in keys}
    out = [
        _contrast(runs, diffs, r["key"], r["metric"], r["variant"], higher[r["key"]], r["role"], r["p"], r["verdict"])
        for r in comparison_rows(agg, diffs, keys, cc.alpha, None, names, cc.primaries)
    ]
    if cc.recall_pairs:  # a recall study: its primaries are the declared contrasts on the trained mixture's answers
        out = _recall_primaries(cfg, runs, paired) + out
    fam_keys = [f"eval/test/accuracy/{f}" for f in families(runs)]
    adjusted = holm_grid(diffs, fam_keys)
    for key in fam_keys:
        for v in names[1:]:
            d = diffs.get(v, {}).get(key)
            cells = diff_cells(d, adjusted.get((v, key)), cc.alpha, True, None, (names[0], v))
            label = f"test acc., {key.rsplit('/', 1)[-1]}"
            out.append(_contrast(runs, diffs, key, label, v, True, "family", cells["p"], cells["verdict"]))
    return out


def _recall_primaries(cfg: CompareConfig, runs: Runs, paired: bool) -> list[Contrast]:
    """compare.contrasts (a - b) on the test answer accuracy, Holm over them: the recall study's own
    (recall_study.declared_contrasts), as its report states them."""
    answers = {v: [r.get(ANSWER_METRIC, math.nan) for r in per] for v, per in runs.items()}
    out = []
    for a, b, d, (p, p_tost) in declared_contrasts(cfg, answers, paired):
        label = "test answer accuracy (trained mixture)"
        v = verdict(d.mean, p, p_tost, d.margin, cfg.compare.alpha, True, (b, a))
        pair = {b: runs[b], a: runs[a]}  # baseline first: `_contrast` takes a - b
        c = _contrast(pair, {a: {ANSWER_METRIC: d}}, ANSWER_METRIC, label, a, True, PRIMARY, fmt_p(p), v)
        out.append(c)
    return out


def _contrast(
    runs: Runs, diffs: dict[str, dict[str, Difference]], key: str, label: str, v: str, hb: bool, role: str,
    p: str, verdict: str,
) -> Contrast:  # fmt: skip
    base = next(iter(runs))
    d = diffs.get(v, {}).get(key)
    seeds: list[float] = []
    if d is not None and d.test == "paired":
        pairs = zip(runs[base], runs[v], strict=True)
        seeds = [b[key] - a[key] for a, b in pairs if math.isfinite(a.get(key, math.nan) + b.get(key, math.nan))]
    return Contrast(key, label, v, base, hb, role, d, p, verdict, seeds)


def sentence(c: Contrast) -> str:
    """A primary contrast in words: "linear has lower test loss than softmax: -0.026 [-0.031, -0.021], Holm
    p < 0.001 — linear better"."""
    d = c.diff
    if d is None or not math.isfinite(d.mean):
        return f"{c.variant} vs {c.baseline} on {c.label}: no test — {c.verdict}"
    interval = f" [{d.low:+.3f}, {d.high:+.3f}]" if math.isfinite(d.low) else ""
    p = "" if c.p == "-" else f", Holm p {'< 0.001' if c.p == '<0.001' else '= ' + c.p}"
    # "has lower/higher" only where the test found a difference; otherwise the contrast is named plainly
    if " better" in c.verdict and d.mean != 0:
        head = f"{c.variant} has {'higher' if d.mean > 0 else 'lower'} {c.label} than {c.baseline}"
    else:
        head = f"{c.label}, {c.variant} − {c.baseline}"
    return f"{head}: {d.mean:+.3f}{interval}{p} (margin ±{d.margin:g}, {d.n} runs a side) — **{c.verdict}**"


def forest(rows: list[Contrast], confidence: float) -> Any:
    """One row per contrast: its interval as a bar, its mean as a diamond, each seed's paired difference as a
    dot, the ±margin band shaded and the zero line; primaries on top, in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.42 * max(len(rows), 1)))
    for i, c in enumerate(rows):
        y = len(rows) - 1 - i
        d = c.diff
        if d is None:
            continue
        ax.fill_between([-d.margin, d.margin], y - 0.35, y + 0.35, color="#dddddd", zorder=0, linewidth=0)
        color = "#0b5fa5" if c.role == PRIMARY else "#555555" if c.role != "family" else "#8a5a00"
        if math.isfinite(d.low):
            ax.plot([d.low, d.high], [y, y], color=color, linewidth=2.5, zorder=2)
        ax.plot([d.mean], [y], marker="D", color=color, markersize=7, zorder=3)
        ax.scatter(c.seeds, [y + 0.18] * len(c.seeds), s=14, color="black", alpha=0.6, zorder=4)
    for i, c in enumerate(rows):  # each row's verdict beside the plot: the figure reads on its own
        weight = "bold" if c.role == PRIMARY else "normal"
        ax.text(1.02, len(rows) - 1 - i, c.verdict, transform=ax.get_yaxis_transform(), va="center", fontsize=8,
                fontweight=weight)  # fmt: skip
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    labels = [f"{c.label} ({c.variant} − {c.baseline})" + ("  [primary]" if c.role == PRIMARY else "") for c in rows]
    ax.set_yticklabels(labels[::-1], fontsize=8)
    for tick, c in zip(ax.get_yticklabels(), rows[::-1], strict=True):
        tick.set_fontweight("bold" if c.role == PRIMARY else "normal")
    ax.set_ylim(-0.7, len(rows) - 0.3)
    pct = f"{100 * confidence:g} %"
    ax.set_xlabel(f"difference variant − baseline ({pct} CI bar, mean ◆, seeds ●, grey: ±equivalence margin)")
    ax.set_title("Every contrast: differences from the baseline (loss: lower is better; accuracy: higher)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def verdict_page(cfg: CompareConfig, runs: Runs, paired: bool, parent_run_id: str = "") -> tuple[str, Any]:
    """The page's markdown (its figure at FIGURE) and the forest plot."""
    rows = contrasts(cfg, runs, paired)
    names = list(runs)
    primaries = [c for c in rows if c.role == PRIMARY]
    lines = [f"# Verdict: {' vs '.join(names)}", ""]
    if parent_run_id:
        counts = ", ".join(f"{v} {len(r)} runs" for v, r in runs.items())
        lines += [f"Comparison parent run `{parent_run_id}`; {counts}.", ""]
    lines += ["## Primary contrasts (declared in advance, Holm-adjusted over the primaries)", ""]
    lines += [f"- {sentence(c)}" for c in primaries] or ["- none declared (compare.primaries): every row is secondary"]
    alpha = cfg.compare.alpha
    lines += [
        "",
        f"Verdicts at alpha {alpha:g}: a difference (two-sided test) and/or equivalence within the margin (TOST), "
        f"both Holm-adjusted within their family; {'paired by seed' if paired else 'Welch (unpaired)'}.",
        "",
        f"![forest plot of every contrast]({FIGURE})",
        "",
        "## Secondary contrasts",
        "",
    ]
    table = [
        {"contrast": f"{c.variant} − {c.baseline}", "metric": c.label, "diff": _diff(c.diff), "Holm p": c.p}
        | {"verdict": c.verdict, "family": "per-family accuracy" if c.role == "family" else "secondary"}
        for c in rows
        if c.role != PRIMARY
    ]
    if table:
        lines += md_table(list(table[0]), [list(r.values()) for r in table])
    return "\n".join(lines) + "\n", forest(rows, cfg.compare.confidence)


def _diff(d: Difference | None) -> str:
    if d is None:
        return "-"
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" if math.isfinite(d.low) else f"{d.mean:+.3f}"


def page_html(markdown: str, fig: Any) -> str:
    """The page as self-contained HTML (the figure inlined); closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return report_html(markdown, {FIGURE: buf.getvalue()}, title="picollm verdict")


__all__ = ["FIGURE", "PAGE", "Contrast", "contrasts", "families", "forest", "page_html", "sentence"]
