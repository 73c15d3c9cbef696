"""The report sections of the comparison's studies: the learning-rate grid (which lr each variant got, and
from what) and MQAR recall (answer accuracy per variant against the number of key-value pairs, and against
d_model). Markdown text from plain numbers, like `report`.
"""

from __future__ import annotations

import math

from picollm.compare.recall import SUCCESS, recalls, success_rate
from picollm.compare.recall_study import RecallStudy
from picollm.compare.report import md_table
from picollm.compare.stats import Interval
from picollm.compare.table import diff_cells, fmt_interval, holm_grid


def lr_grid_section(rows: list[dict], chosen: dict[str, float], epochs: int) -> str:
    """The grid as a variant x lr table of validation scores, the chosen lr marked."""
    lrs = list(dict.fromkeys(r["lr"] for r in rows))
    metric = rows[0]["metric"] if rows else "-"
    score = {(r["variant"], r["lr"]): r["score"] for r in rows}
    table = []
    for v, best in chosen.items():
        cells = []
        for lr in lrs:
            x = score.get((v, lr), math.nan)
            text = f"{x:.4f}" if math.isfinite(x) else "diverged"
            cells.append(f"**{text}**" if lr == best else text)
        table.append([v, *cells, f"{best:g}"])
    direction = "higher" if "accuracy" in metric else "lower"
    lines = [
        "## Learning rate per variant",
        "",
        f"Before the seeded runs, every variant trained on the first seed for {epochs} epoch(s) at each lr of "
        f"the grid {', '.join(f'{lr:g}' for lr in lrs)}; its seeded runs use the lr with the best validation "
        f"score ({metric}, {direction} is better, last epoch; a diverged run ranks last). The grid runs are "
        "children tagged `compare.lr_grid` (table `tables/lr_grid.json`).",
        "",
        *md_table(["variant", *(f"lr {lr:g}" for lr in lrs), "chosen lr"], table),
    ]
    return "\n".join(lines)


def _cell(iv: Interval | None, base: dict[str, float]) -> str:
    """mean ± CI, marked where the interval lies above every heuristic baseline (recall credited)."""
    text = fmt_interval(iv)
    return text if iv is None or not math.isfinite(iv.mean) else text + (" ✓" if recalls(iv, base) else " ·")


def _accuracy_table(st: RecallStudy, pairs: list[int], variants: list[str]) -> list[str]:
    rows = []
    for v in variants:
        cells = [_cell(st.per_variant.get(v, {}).get(n), st.baselines[n]) for n in pairs]
        rates = [success_rate(st.per_seed.get(v, {}).get(n, [])) for n in pairs]
        rows.append([v, *cells, " / ".join("-" if math.isnan(r) else f"{r:.0%}" for r in rates)])
    for name in ("chance", "copy", "elimination"):  # elimination needs the answers fed back as inputs
        cells = [f"{st.baselines[n][name]:.3f}" if name in st.baselines[n] else "n/a" for n in pairs]
        rows.append([f"*{name}*", *cells, ""])
    return md_table(["variant", *(f"{n} pairs" for n in pairs), f"seeds > {SUCCESS:g} (per count)"], rows)


def _contrast_lines(st: RecallStudy, alpha: float) -> list[str]:
    if not st.contrasts:
        return []
    rows = []
    for a, b, d, adjusted in st.contrasts:
        c = diff_cells(d, adjusted, alpha, True, names=(b, a))
        rows.append([f"{a} − {b}", c["diff"], c["p"], c["p_tost"], c["verdict"]])
    return [
        f"**Primary contrasts** (declared in compare.contrasts), on the test answer accuracy of the trained mixture "
        f"({', '.join(map(str, st.trained))} pairs): paired t-test over seeds, Holm-adjusted over these "
        f"{len(st.contrasts)}; everything below is secondary.",
        "",
        *md_table(["contrast", "difference", "p (Holm)", "p TOST (Holm)", "verdict"], rows),
        "",
    ]


def _query_table(st: RecallStudy, variants: list[str]) -> list[str]:
    rows = []
    for n in st.trained:
        queries = sorted({i for v in variants for i in st.per_query.get(v, {}).get(n, {})})
        for v in variants:
            acc = st.per_query.get(v, {}).get(n, {})
            rows.append([v, str(n), " ".join(f"{acc.get(i, math.nan):.2f}" for i in queries)])
    return md_table(["variant", "pairs", "accuracy of query 1, 2, ... (mean over seeds)"], rows)


def _speed_table(st: RecallStudy, variants: list[str]) -> list[str]:
    rows = []
    for v in variants:
        epochs = st.epochs_to.get(v, [])
        reached = sorted(e for e in epochs if math.isfinite(e))
        median = reached[len(reached) // 2] if len(reached) > len(epochs) / 2 else math.nan
        text = "not reached" if math.isnan(median) else f"{median:g} (≈ {median * st.steps_per_epoch:.0f} steps)"
        rows.append([v, f"{len(reached)}/{len(epochs)}", text])
    return md_table(["variant", "seeds that reached it", "median epoch"], rows)


def _secondary_tests(st: RecallStudy, alpha: float, variants: list[str]) -> list[str]:
    """Each variant - the baseline at every pair count, Holm over that table: "v − base, n pairs: d (p p)"."""
    keys = [f"recall/pairs{n}/accuracy" for n in sorted(st.baselines)]
    adjusted = holm_grid(st.secondary, keys)
    base = variants[0]
    return [
        f"{v} − {base}, {n} pairs: {c['diff']} (p {c['p']})"
        for v in variants[1:]
        for n in sorted(st.baselines)
        if (d := st.secondary.get(v, {}).get(f"recall/pairs{n}/accuracy")) is not None
        and (adj := adjusted.get((v, f"recall/pairs{n}/accuracy"))) is not None
        and (c := diff_cells(d, adj, alpha, True, names=(base, v)))
    ]


def recall_section(st: RecallStudy, alpha: float, variants: list[str]) -> str:
    """The recall study: declared contrasts, answer accuracy on the trained and on unseen pair counts beside the
    heuristic baselines, per query, learning speed, and against d_model when measured."""
    trained = [n for n in sorted(st.baselines) if n in st.trained]
    unseen = [n for n in sorted(st.baselines) if n not in st.trained]
    lines = [
        "## Associative recall (MQAR)",
        "",
        *st.setup,
        "",
        *_contrast_lines(st, alpha),
        "Answer accuracy on held-out MQAR sequences (the keys' values), mean ± CI over seeds. ✓: the interval lies "
        "above every heuristic that needs no recall (chance 1/V, copying a context value 1/P, and in the fed-back "
        "layout eliminating the values already answered, H_P/P): recall is credited only there; ·: it is not. The "
        f"last column is the share of seeds above {SUCCESS:g} (outcomes are often all or nothing).",
        "",
        "**Trained pair counts** (the training mixture):",
        "",
        *_accuracy_table(st, trained, variants),
    ]
    if unseen:
        lines += ["", "**Unseen pair counts** (extrapolation, secondary):", "", *_accuracy_table(st, unseen, variants)]
    lines += [
        "",
        "**By query** (the i-th query of a sequence; in the fed-back layout elimination shows as rising accuracy):",
        "",
        *_query_table(st, variants),
        "",
        f"**Learning speed**: the first epoch whose validation answer accuracy exceeds {SUCCESS:g}.",
        "",
        *_speed_table(st, variants),
    ]
    if tests := _secondary_tests(st, alpha, variants):
        base = variants[0]
        lines += ["", f"Secondary: each variant − {base} per pair count, Holm over these: " + "; ".join(tests) + "."]
    if st.width:
        widths = sorted({d for per in st.width.values() for dv in per.values() for d in dv})
        pairs = sorted(st.width)
        rows = [
            [v, str(d), *(fmt_interval(st.width.get(n, {}).get(v, {}).get(d)) for n in pairs)]
            for v in variants
            for d in widths
        ]
        lines += [
            "",
            "Against model width (Zoology's figure): every variant and seed trained at each d_model "
            "(compare.d_models); answer accuracy, mean ± CI over seeds.",
            "",
            *md_table(["variant", "d_model", *(f"{n} pairs" for n in pairs)], rows),
        ]
    return "\n".join(lines)
