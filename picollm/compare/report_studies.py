"""The report sections of the comparison's studies: the learning-rate grid (which lr each variant got, and
from what) and MQAR recall (answer accuracy per variant against the number of key-value pairs, and against
d_model). Markdown text from plain numbers, like `report`.
"""

from __future__ import annotations

import math

from picollm.compare.report import md_table
from picollm.compare.stats import Interval
from picollm.compare.table import Comparisons, diff_cells, fmt_interval, holm_grid


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


def recall_section(
    per_variant: dict[str, dict[int, Interval]],
    width: dict[int, dict[str, dict[int, Interval]]],
    diffs: Comparisons,
    alpha: float,
    variants: list[str],
) -> str:
    """Variant x pairs table of answer accuracy (mean ± CI over seeds) with each variant's paired test against
    the baseline at every number of pairs (Holm over the table), and the d_model table when measured."""
    pairs = sorted({n for per in per_variant.values() for n in per})
    keys = [f"recall/pairs{n}/accuracy" for n in pairs]
    adjusted = holm_grid(diffs, keys)
    base = variants[0]
    table = []
    for v in variants:
        cells = [fmt_interval(per_variant.get(v, {}).get(n)) for n in pairs]
        if v != base:
            for n, key in zip(pairs, keys, strict=True):
                d = diffs.get(v, {}).get(key)
                if d is not None and (v, key) in adjusted:
                    c = diff_cells(d, adjusted[(v, key)], alpha, True, names=(base, v))
                    cells[pairs.index(n)] += f" ({c['diff']}, p {c['p']})"
        table.append([v, *cells])
    lines = [
        "## Associative recall (MQAR)",
        "",
        "Answer accuracy: the accuracy on the value after each queried key (targets with Bayes ceiling 1) of "
        "held-out MQAR sequences with the given number of key-value pairs; mean ± CI over seeds, and in brackets "
        f"each variant's paired difference from {base} with its Holm-adjusted p (over this table). Chance is "
        "1 / value vocabulary; a model that only copies some value of the context gets about 1 / pairs.",
        "",
        *md_table(["variant", *(f"{n} pairs" for n in pairs)], table),
    ]
    if width:
        widths = sorted({d for per in width.values() for dv in per.values() for d in dv})
        rows = [
            [v, str(d), *(fmt_interval(width.get(n, {}).get(v, {}).get(d)) for n in pairs)]
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
