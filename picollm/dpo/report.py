"""report.md and the figure of a `picollm dpo` run: setup, the per-scheme table (reference vs DPO, gain with
its story-bootstrap CI), how to read it, chosen vs rejected log-probs over the steps, and sample continuations.
Pure text and a matplotlib figure from what the flow measured; the flow logs them (and report.html, the same
page self-contained, through `picollm.tracking.pages.report_html`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from picollm.config import DPORunConfig

FIGURE = "figures/dpo.png"


def _f(x: float, digits: int = 3, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def setup_lines(cfg: DPORunConfig, stats: dict[str, float], reference: str, steps: int) -> list[str]:
    d, o = cfg.data, cfg.dpo
    loss = f"{o.loss_type} β {o.beta:g}" + (f", γ {o.simpo_gamma:g}" if o.loss_type == "simpo" else "")
    loss += f", rpo_alpha {o.rpo_alpha:g}" if o.rpo_alpha else ""
    loss += ", length-normalised" if o.length_normalize and o.loss_type != "simpo" else ""
    stories = ", ".join(f"{int(stats.get(f'data.{n}.stories', 0)):,} {n}" for n in ("train", "val", "test"))
    pairs = ", ".join(f"{int(stats.get(f'data.{n}.pairs', 0)):,} {n}" for n in ("train", "val", "test"))
    return [
        f"data: {d.source}{f' ({d.path})' if d.path else ''}, stories split by `data.seed` {d.seed}: {stories}",
        f"pairs: {pairs}; schemes {', '.join(o.corruptions)}",
        f"model: d_model {cfg.model.d_model}, {cfg.model.n_layers} layer{'s' if cfg.model.n_layers > 1 else ''}, "
        f"vocabulary {int(stats['data.vocab_size']):,}",
        f"reference: {reference}",
        f"loss: {loss}; lr {o.lr:g}, batch {o.batch_size} pairs, {steps} of {o.max_steps} steps, "
        f"kept the best `{o.monitor}` (val every {o.eval_every}), seed {o.seed}",
    ]


def table_rows(table: dict[str, list]) -> tuple[list[str], list[list[str]]]:
    """The per-scheme table as text cells."""
    header = ["scheme", "pairs", "stories", "reference", "DPO", "gain", "95 % CI (stories)", "logp chosen ref → DPO"]
    rows = []
    for i, scheme in enumerate(table["scheme"]):
        rows.append(
            [
                scheme,
                str(table["pairs"][i]),
                str(table["stories"][i]),
                _f(table["reference_accuracy"][i]),
                _f(table["accuracy"][i]),
                _f(table["gain"][i], sign=True),
                f"[{_f(table['gain_ci_low'][i], sign=True)}, {_f(table['gain_ci_high'][i], sign=True)}]",
                f"{_f(table['reference_logps_chosen'][i], 2)} → {_f(table['logps_chosen'][i], 2)}",
            ]
        )
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render(
    setup: list[str],
    table: dict[str, list],
    split: str,
    loss_type: str,
    step0_loss: float,
    seconds: dict[str, float],
    samples: dict[str, list[str]],
    figure: str = FIGURE,
) -> str:
    """report.md of one DPO run."""
    header, rows = table_rows(table)
    per_token = " (per token: SimPO averages)" if loss_type == "simpo" else ""
    lines = [
        "# picollm dpo",
        "",
        "## Setup",
        "",
        *(f"- {s}" for s in setup),
        "",
        f"## Ranking accuracy on {split} pairs",
        "",
        *_md_table(header, rows),
        "",
        "## How to read it",
        "",
        "- **accuracy**: the share of pairs where the model gives the chosen continuation the higher log-prob;",
        "  `reference` is the SFT model DPO started from, `DPO` the kept policy, on the same pairs.",
        "- **gain** = DPO − reference, with a 95 % percentile bootstrap interval that resamples **stories** (all",
        "  pairs of a drawn story kept: pairs of one story are not independent). One run is one seed: the",
        "  interval covers the sampling of stories, not the spread between seeds (`docs/dpo_study.py` measures",
        "  that, choosing the configuration on validation and confirming it on test with several seeds).",
        "- A scheme the reference already ranks at ~1.0 cannot gain; read the unsolved ones.",
        f"- `logp chosen`: mean log-prob of the chosen continuation{per_token}. A gain bought by lowering it",
        "  (both chosen and rejected fall) is the usual DPO failure; `rpo_alpha` holds it up.",
        f"- step-0 loss {_f(step0_loss, 4)} (sigmoid DPO: ln 2 = 0.6931; SimPO and RPO terms differ);",
        "  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()),
        "",
        "## Figure",
        "",
        f"![chosen and rejected log-probs on val over the steps; accuracy per scheme before and after]({figure})",
        "",
    ]
    if samples.get("prompt"):
        lines += ["## Sample continuations (greedy, test prompts)", ""]
        for i, prompt in enumerate(samples["prompt"]):
            lines += [f"**{i + 1}.** {prompt}", ""]
            lines += [f"- *{k}:* {samples[k][i]}" for k in ("chosen", "reference", "policy")]
            lines.append("")
    return "\n".join(lines)


def dpo_figure(history: Sequence[dict[str, float]], table: dict[str, list], split: str, loss_type: str) -> Any:
    """Left: val log-probs of the chosen and rejected continuations over the steps, on one axis (step 0 is
    the reference). Right: accuracy per scheme, reference vs DPO, with the gain's story-bootstrap CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.2]})
    steps = [h["step"] for h in history]
    for key, color, label in (("chosen", "tab:green", "chosen"), ("rejected", "tab:red", "rejected")):
        ax.plot(steps, [h[f"val/logps/{key}"] for h in history], "o-", color=color, ms=3, label=label)
        if history:
            ax.axhline(history[0][f"val/logps/{key}"], color=color, ls=":", lw=1)
    unit = "per token" if loss_type == "simpo" else "summed over the response"
    ax.set(xlabel="DPO step", ylabel=f"val log-prob ({unit})", title="chosen vs rejected (dotted: reference)")
    ax.legend(fontsize=8)
    names = list(table["scheme"])
    x = range(len(names))
    w = 0.38
    ref, pol = table["reference_accuracy"], table["accuracy"]
    lo = [p - (g - c) for p, g, c in zip(pol, table["gain"], table["gain_ci_low"], strict=True)]
    hi = [p + (c - g) for p, g, c in zip(pol, table["gain"], table["gain_ci_high"], strict=True)]
    bx.bar([i - w / 2 for i in x], ref, w, color="0.7", label="reference")
    bx.bar([i + w / 2 for i in x], pol, w, color="tab:blue", label="DPO")
    bx.errorbar(
        [i + w / 2 for i in x],
        pol,
        yerr=[[p - lo_ for p, lo_ in zip(pol, lo, strict=True)], [h - p for p, h in zip(pol, hi, strict=True)]],
        fmt="none",
        ecolor="k",
        capsize=3,
        lw=1,
    )
    bx.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    bx.set(
        ylim=(0, 1.05), ylabel=f"{split} ranking accuracy", title="per scheme (error bar: 95 % CI of the gain, stories)"
    )
    bx.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
