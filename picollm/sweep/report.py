"""A sweep's report.md: what was searched, the best trial, the trials table, the top-k re-runs and the figures.

Pure text from what the flow measured; the flow logs it and its self-contained HTML copy
(`picollm.tracking.pages.report_html`), whose URL the CLI prints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# The trials table keeps to the best ones: a 200-trial study's table belongs in trials.json, not the page.
MAX_ROWS = 20


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def sweep_report(
    study: str,
    metric: str,
    direction: str,
    counts: dict[str, int],
    rows: Sequence[dict[str, Any]],
    params: Sequence[str],
    best: dict[str, Any] | None,
    top_k: Sequence[dict[str, Any]],
    figures: Sequence[str],
    promoted: str | None = None,
) -> str:
    """report.md of a sweep. `rows`: one per trial (number, state, value, duration_s, the params);
    `best`: {number, value, params} or None when no trial completed; `top_k`: the re-runs' rows."""
    better = "lowest" if direction == "minimize" else "highest"
    lines = [
        f"# picollm sweep: {study}",
        "",
        f"Objective: **{metric}** ({direction}); trials: {counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['failed']} failed. Search space: {', '.join(f'`{p}`' for p in params) or '–'}.",
        "",
        "## Best trial",
        "",
    ]
    if best is None:
        lines += ["No trial completed: there is no best trial.", ""]
    else:
        chosen = ", ".join(f"`{k}` = {_num(v)}" for k, v in best["params"].items())
        lines += [
            f"Trial {best['number']}: {metric} **{_num(best['value'])}** with {chosen}.",
            "",
            f"The {better} of {counts['complete']} trials is an optimistic estimate of that configuration (it was "
            "selected for being best on this metric, noise included); the top-k re-runs below, over fresh seeds, "
            "are the unbiased number. Select on a validation metric: test metrics are for the final report.",
            "",
        ]
    done = [r for r in rows if r.get("value") is not None and r.get("state") == "COMPLETE"]
    done.sort(key=lambda r: r["value"], reverse=direction == "maximize")
    if done:
        shown = done[:MAX_ROWS]
        more = f" ({len(done) - len(shown)} more in trials.json)" if len(done) > len(shown) else ""
        lines += [f"## Complete trials, best first{more}", ""]
        header = ["trial", metric, *params, "seconds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in shown:
            cells = [str(r["number"]), _num(r["value"]), *(_num(r.get(p)) for p in params), _num(r.get("duration_s"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if top_k:
        lines += [
            "## Top-k re-runs (mean and 95 % t interval over seeds)",
            "",
            "| rank | trial | params | mean | 95 % CI | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for r in top_k:
            ci = f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]"
            lines.append(f"| {r['rank']} | {r['trial']} | `{r['params']}` | {_num(r['mean'])} | {ci} | {r['n']} |")
        lines.append("")
    if promoted:
        lines += [f"The best trial's configuration was re-trained and registered as **{promoted}** (@champion).", ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{path.rsplit('/', 1)[-1].removesuffix('.png').replace('_', ' ')}]({path})" for path in figures]
        lines.append("")
    return "\n".join(lines)
