"""The CLI's tables, within the terminal's width (80 columns in a CI log): train's accuracy per family, and
markdown reports (bench.md) as console tables whose cells wrap at spaces rather than being cut."""

from __future__ import annotations

from rich.console import RenderableType
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
