"""The CLI's tables, within the terminal's width (80 columns in a CI log): train's accuracy per family,
compare's headline (verdicts kept whole), DPO's one table, and markdown reports (bench.md) as console tables
whose cells wrap at spaces rather than being cut."""

from __future__ import annotations

from rich import box
from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def family_table(metrics: dict[str, float], families: list[str], prefix: str = "test") -> Table:
    """Accuracy per family within 80 columns: short headers, spelled out in the caption."""
    answers = any(k.startswith(f"{prefix}/accuracy_answer") for k in metrics)  # recall families (mqar, copy)
    caption = "acc/ceil: accuracy / Bayes ceiling; pred.: rule-determined positions"
    caption += "; answers: recall answers" if answers else ""
    table = Table(title=f"{prefix} accuracy per family", caption=caption)
    for col in ["family", "accuracy", "ceiling", "acc/ceil", "acc pred.", *(["acc answers"] if answers else [])]:
        table.add_column(col, justify="left" if col == "family" else "right", no_wrap=True)

    def fmt(key: str) -> str:
        return f"{metrics[key]:.4f}" if key in metrics else "-"

    for fam in [*families, ""]:
        sfx = f"/{fam}" if fam else ""
        table.add_row(
            fam or "[bold]all",
            fmt(f"{prefix}/accuracy{sfx}"),
            fmt(f"{prefix}/ceiling{sfx}"),
            fmt(f"{prefix}/accuracy_vs_ceiling{sfx}"),
            fmt(f"{prefix}/accuracy_predictable{sfx}"),
            *([fmt(f"{prefix}/accuracy_answer{sfx}")] if answers else []),
        )
    return table


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(rows: list[list[str]], width: int) -> RenderableType:
    """Header and rows as a Table when its cells, wrapped at spaces, fit `width`; else one block per row
    (first cell, then `column  value` lines): a number is never cut."""
    header, *body = rows
    widest = [
        max(len(w) for r in rows for w in (r[j] if j < len(r) else "").split() or [""]) for j in range(len(header))
    ]
    if sum(widest) + 3 * len(header) <= width:
        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        for j, head in enumerate(header):
            table.add_column(head, justify="left" if j == 0 else "right", min_width=widest[j])
        for r in body:
            table.add_row(*r)
        return table
    blocks = Table.grid(padding=(0, 2))
    blocks.add_column(no_wrap=True)
    blocks.add_column(justify="right")
    for r in body:
        blocks.add_row(Text(f"{header[0]} {r[0]}", style="bold"), "")
        for head, cell in zip(header[1:], r[1:], strict=False):
            blocks.add_row(f"  {head}", cell)
    return blocks


def markdown(lines: list[str], width: int = 80) -> list[RenderableType]:
    """Markdown lines as renderables within `width`: each `| a | b |` table (header, `|---|` rule, rows) a
    Table (or, too wide, a block per row), headings bold, every other line text that wraps at spaces."""
    out: list[RenderableType] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        is_table = line.lstrip().startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: ")
        if not is_table:
            out.append(Text(line.lstrip("#").strip(), style="bold") if line.startswith("#") else Text(line))
            i += 1
            continue
        rows = [_cells(line)]
        i += 2
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            rows.append(_cells(lines[i]))
            i += 1
        out.append(_table(rows, width))
    return out


def compare_table(rows: list[dict[str, str]], runs: dict[str, int], confidence: float) -> Table:
    """The headline in 80 columns: one row per metric (per metric and variant with more than two), means only
    (report.html has their intervals), Δ = variant − baseline with its interval, p Holm-adjusted within its
    family, and the verdict whole (never wrapped: other cells wrap first). Primaries first, under a label."""
    base, *others = runs
    title = " vs ".join(f"{v} (n={k})" for v, k in runs.items())
    table = Table(
        title=f"{title}; Δ ± {100 * confidence:g} % CI, p Holm-adjusted",
        box=None,
        pad_edge=False,
        collapse_padding=True,
        title_justify="left",
    )
    two = len(others) == 1
    columns = ["metric", *([base, others[0]] if two else ["variant", base, "mean"]), "Δ", "p", "verdict"]
    for col in columns:
        left = col in ("metric", "variant", "verdict")
        table.add_column(col, justify="left" if left else "right", no_wrap=col == "verdict", header_style="bold")
    for role in ("primary", "secondary"):
        mine = [r for r in rows if r.get("role", "secondary") == role]
        if not mine:
            continue
        table.add_row(f"[italic]{role}[/italic]", *[""] * (len(columns) - 1))
        for r in mine:
            means = [r["base_mean"], r["mean"]] if two else [r["variant"], r["base_mean"], r["mean"]]
            table.add_row(escape(r["short"]), *map(escape, means), escape(r["diff"]), r["p"], escape(r["verdict"]))
    return table


def dpo_table(table: dict[str, list], split: str, loss_type: str, step0_loss: float, seconds: float) -> Table:
    """The one DPO table, within 80 columns: per scheme, reference and DPO ranking accuracy and the gain with
    its story-bootstrap CI (SimPO's rewards/accuracies is its accuracy, so there is no separate column)."""
    t = Table(
        title=f"{split} pairs: reference → DPO ({loss_type}; step-0 loss {step0_loss:.4f}, {seconds:.0f} s)",
        box=box.SIMPLE_HEAD,
    )
    for col in ("scheme", "pairs", "reference", "DPO", "gain", "95% CI (stories)"):
        t.add_column(col, justify="left" if col == "scheme" else "right", no_wrap=True)
    for i, scheme in enumerate(table["scheme"]):
        t.add_row(
            f"[bold]{scheme}" if scheme == "all" else scheme,
            str(table["pairs"][i]),
            f"{table['reference_accuracy'][i]:.3f}",
            f"{table['accuracy'][i]:.3f}",
            f"{table['gain'][i]:+.3f}",
            f"[{table['gain_ci_low'][i]:+.3f}, {table['gain_ci_high'][i]:+.3f}]",
        )
    return t
