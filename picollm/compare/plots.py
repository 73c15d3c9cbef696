"""Figures of the comparison: loss curves, accuracy per family and by position with intervals over seeds,
length generalisation, efficiency, and each model's attention patterns and embeddings. Every function
returns a matplotlib Figure (headless Agg backend); the caller logs it and `close`s it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from picollm.compare.efficiency import Efficiency  # noqa: E402
from picollm.compare.stats import Aggregate, Interval, band, quiet_nan  # noqa: E402
from picollm.data.splits import PaddedSplit  # noqa: E402
from picollm.model.mixers import REFERENCE_PAIR  # noqa: E402
from picollm.model.transformer import Transformer  # noqa: E402

COLORS = dict(zip(REFERENCE_PAIR, ("tab:blue", "tab:orange"), strict=True))
_PALETTE = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]


class _Colors(dict):
    """A variant's colour: the reference pair keeps theirs, every other name the next free one of the palette."""

    def __missing__(self, name: str) -> str:
        taken = set(self.values())
        colour = next((c for c in _PALETTE if c not in taken), _PALETTE[len(self) % len(_PALETTE)])
        self[name] = colour
        return colour


COLORS = _Colors(COLORS)


def close(fig: Figure) -> None:
    plt.close(fig)


def loss_curves(histories: dict[str, list[list[dict[str, float]]]]) -> Figure:
    """Train and validation loss per epoch: mean over seeds, shaded from the min to the max seed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("train/loss", "val/loss"), strict=True):
        for att, runs in histories.items():
            runs = [[h[key] for h in hist if key in h] for hist in runs]
            runs = [r for r in runs if r]
            if not runs:
                continue
            width = max(len(r) for r in runs)
            x = np.full((len(runs), width), np.nan)
            for i, r in enumerate(runs):
                x[i, : len(r)] = r
            epochs = np.arange(1, width + 1)
            with quiet_nan():
                ax.plot(epochs, np.nanmean(x, 0), marker="o", color=COLORS[att], label=f"{att} (n={len(runs)})")
                ax.fill_between(epochs, np.nanmin(x, 0), np.nanmax(x, 0), color=COLORS[att], alpha=0.25)
        ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"{key} (mean, shaded min-max over seeds)", yscale="log")
        ax.legend()
    fig.tight_layout()
    return fig


def learning_curve(rows: list[dict[str, Any]], families: list[str]) -> Figure:
    """Test accuracy / Bayes ceiling vs training sequences per family, one panel per family and one for all:
    mean over seeds, shaded min-max. `rows`: {model, n_train, seed, family ("all" or a family), vs_ceiling}."""
    groups = ["all", *families]
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), sharey=True, squeeze=False)
    sizes = sorted({r["n_train"] for r in rows})
    variants = list(dict.fromkeys(r["model"] for r in rows))
    for ax, group in zip(axes.flat, groups, strict=False):
        for att in variants:
            vals = [
                [r["vs_ceiling"] for r in rows if (r["model"], r["n_train"], r["family"]) == (att, n, group)]
                for n in sizes
            ]
            if not all(vals):
                continue
            ax.plot(sizes, [np.mean(v) for v in vals], marker="o", color=COLORS[att], label=att)
            ax.fill_between(sizes, [min(v) for v in vals], [max(v) for v in vals], color=COLORS[att], alpha=0.25)
        ax.set(xscale="log", title=group)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training sequences per family")
    for row in axes:
        row[0].set_ylabel("test accuracy / ceiling")
    axes[0][0].legend()
    fig.suptitle("Learning curves on held-out generators (mean, shaded min-max over seeds)")
    fig.tight_layout()
    return fig


def family_accuracy_ci(agg: Aggregate, families: list[str], prefix: str = "eval/test") -> Figure:
    """Accuracy per family (and overall) of every variant with CI error bars; the Bayes ceiling as a tick."""
    groups = [*families, "all"]
    variants = list(agg)
    width = 0.76 / len(variants)
    fig, ax = plt.subplots(figsize=(0.6 * len(groups) * max(2, len(variants)) + 3, 4.2))
    xs = np.arange(len(groups))
    for j, att in enumerate(variants):
        ivs = [agg[att].get(f"{prefix}/accuracy" + ("" if g == "all" else f"/{g}")) for g in groups]
        mean = np.array([iv.mean if iv else np.nan for iv in ivs])
        err = np.array(
            [[iv.mean - iv.low, iv.high - iv.mean] if iv and math.isfinite(iv.low) else [0, 0] for iv in ivs]
        ).T
        offset = (j - (len(variants) - 1) / 2) * width
        ax.bar(xs + offset, mean, width=width, yerr=err, capsize=4, color=COLORS[att], label=att)
    ceil = [agg[variants[0]].get(f"{prefix}/ceiling" + ("" if g == "all" else f"/{g}")) for g in groups]
    ax.scatter(
        xs, [c.mean if c else np.nan for c in ceil], marker="_", s=900, color="black", zorder=3, label="Bayes ceiling"
    )
    ax.set_xticks(xs, groups, rotation=15)
    split = prefix.split("/")[-1]
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=f"{split} accuracy per family (mean, CI over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def position_accuracy(
    curves: dict[str, list[np.ndarray]],
    confidence: float,
    train_len: int | None = None,
    title: str = "test accuracy by position",
) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4))
    _plot_positions(ax, curves, confidence, train_len)
    ax.set(title=title)
    fig.tight_layout()
    return fig


def _plot_positions(ax, curves: dict[str, list[np.ndarray]], confidence: float, train_len: int | None) -> None:
    for att, runs in curves.items():
        mean, low, high = band(runs, confidence)
        pos = np.arange(1, len(mean) + 1)
        ax.plot(pos, mean, color=COLORS[att], label=att)
        ax.fill_between(pos, np.clip(low, 0, 1), np.clip(high, 0, 1), color=COLORS[att], alpha=0.25)
    if train_len is not None:
        ax.axvline(train_len - 0.5, ls="--", color="grey", label=f"training length ({train_len})")
    ax.set(xlabel="position of the predicted token", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax.legend(loc="lower left")


def length_curves(
    agg: Aggregate,
    factors: list[int],
    train_len: int,
    families: list[str],
    position_curves: dict[str, list[np.ndarray]],
    confidence: float,
) -> Figure:
    """Accuracy vs evaluated length (all targets solid, targets beyond the training length dashed),
    overall and per family, the training length marked; last panel: accuracy by position at the
    longest length."""
    groups = ["all", *families]
    ncols = 4
    nrows = math.ceil((len(groups) + 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    flat = axes.flatten()
    for ax, g in zip(flat, groups, strict=False):
        _length_panel(ax, agg, factors, train_len, g)
    flat[0].legend(fontsize=7, loc="lower left")
    big = max(factors)
    _plot_positions(flat[len(groups)], position_curves, confidence, train_len)
    flat[len(groups)].set_title(f"accuracy by position at {big}x ({big * train_len} tokens)")
    for ax in flat[len(groups) + 1 :]:
        ax.set_visible(False)
    fig.suptitle("length generalisation (mean, CI over seeds)")
    fig.tight_layout()
    return fig


def _length_panel(ax, agg: Aggregate, factors: list[int], train_len: int, group: str) -> None:
    """One panel of `length_curves`: accuracy vs length of one family (or "all") for both models."""
    lengths = [f * train_len for f in sorted(factors)]
    sfx = "" if group == "all" else f"/{group}"
    for att in agg:
        for kind, ls in (("", "-"), ("/beyond", "--")):
            ivs = [agg[att].get(f"lengen/x{f}{kind}/accuracy{sfx}") for f in sorted(factors)]
            pts = [(n, iv) for n, iv in zip(lengths, ivs, strict=True) if iv is not None]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            mean = np.array([iv.mean for _, iv in pts])
            err = np.array(
                [[iv.mean - iv.low, iv.high - iv.mean] if math.isfinite(iv.low) else [0, 0] for _, iv in pts]
            ).T  # (2, points): below and above the mean, as errorbar wants
            ax.errorbar(
                xs,
                mean,
                yerr=err,
                ls=ls,
                marker="o",
                capsize=3,
                color=COLORS[att],
                label=f"{att}{' beyond' if kind else ''}",
            )
    ceil = [next(iter(agg.values())).get(f"lengen/x{f}/beyond/ceiling{sfx}") for f in sorted(factors)]
    pts = [(n, c.mean) for n, c in zip(lengths, ceil, strict=True) if c is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), ls=":", color="black", label="ceiling beyond")
    ax.axvline(train_len, ls="--", color="grey", label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.xaxis.set_minor_locator(NullLocator())  # only the measured lengths
    ax.set(xlabel="sequence length", ylabel="accuracy", ylim=(-0.02, 1.05), title=group)


def efficiency_figure(eff: Efficiency) -> Figure:
    """Step time, step memory and generation time vs length; each timing's min (line) with its repeats'
    min – max shaded, and the noise warnings' verdict in the title."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for att in eff.step:
        kw = {"marker": "o", "color": COLORS[att], "label": att}
        for ax, xs, timings in ((axes[0], eff.lengths, eff.step.get(att)), (axes[2], eff.contexts, eff.gen.get(att))):
            if timings:
                ax.plot(xs, [timings[x].min for x in xs], **kw)
                ax.fill_between(
                    xs, [timings[x].min for x in xs], [timings[x].max for x in xs], color=kw["color"], alpha=0.2
                )
        if eff.memory.get(att):
            axes[1].plot(eff.lengths, [eff.memory[att][n]["step_mb"] for n in eff.lengths], **kw)
    axes[0].set(title="training step time (min, repeats shaded)", xlabel="sequence length", ylabel="ms / step")
    axes[1].set(
        title="training step peak memory (fresh process, RSS)",
        xlabel="sequence length",
        ylabel="MB above model + inputs",
    )
    axes[2].set(
        title="generation time per token (batch 1; min, steps shaded)", xlabel="context length", ylabel="ms / token"
    )
    for ax, xs in zip(axes, (eff.lengths, eff.lengths, eff.contexts), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured lengths
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:  # e.g. efficiency.memory: false
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="grey")
    warnings = eff.warnings()
    if warnings:
        fig.suptitle(
            f"NOISY TIMINGS ({len(warnings)} warning(s)): not the variants' costs; see the report's efficiency section",
            color="#b35900",
            fontweight="bold",
        )
    load = f"; {eff.load.text()}" if eff.load else ""
    fig.text(
        0.01, 0.01, f"batch = tokens_per_step // length: {eff.batches}; torch threads {eff.threads}{load}", fontsize=7
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.93 if warnings else 1))
    return fig


def attention_figures(
    models: dict[str, Transformer], split: PaddedSplit, family: str, positions: int, batch_size: int = 256
) -> dict[str, Figure]:
    """One figure per model on the same sequences of `family` (the same example sequence on top),
    drawn by picollm.analysis_plots.attention_figure, whose colour scale is fixed to [0, 1] for every
    panel, so the two models' heatmaps share one scale."""
    from picollm.interp import analysis as an
    from picollm.interp import analysis_plots as ap

    assert split.family_ids is not None
    idx = torch.nonzero(split.family_ids == split.family_names.index(family)).flatten()
    lengths = split.lengths[idx]
    long_enough = torch.nonzero(lengths >= positions).flatten()
    ex = int(long_enough[0]) if len(long_enough) else int(lengths.argmax())
    pe = min(positions, int(lengths[ex]))
    tokens = split.tokens[idx]
    out = {}
    for att, model in models.items():
        names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
        cache = an.run_cached(model, tokens, names, batch_size)
        pat = torch.stack([cache[n] for n in names], 1)  # (B, L, H, N, N)
        mean = torch.stack([an.mean_pattern(pat[:, layer], lengths, positions) for layer in range(len(names))])
        out[att] = ap.attention_figure(
            family, pat[ex, :, :, :pe, :pe], tokens[ex, :pe].tolist(), mean, len(idx), model.cfg.attention
        )
    return out


def embedding_figures(models: dict[str, Transformer], seed: int = 0) -> tuple[dict[str, Figure], dict[str, dict]]:
    """Embedding PCA of each model beside a random init of its config (picollm.analysis_plots)."""
    from picollm.interp import analysis as an
    from picollm.interp import analysis_plots as ap

    figs, metrics = {}, {}
    for att, model in models.items():
        trained = an.analyse_embeddings(an.number_embeddings(model), an.number_tokens(model))
        torch.manual_seed(seed)
        random = Transformer(model.cfg)
        rnd = an.analyse_embeddings(an.number_embeddings(random), an.number_tokens(random))
        figs[att] = ap.embeddings_figure(trained, rnd, f"{att} attention")
        metrics[att] = trained.metrics
    return figs, metrics


def recall_curves(
    values: dict[str, dict[int, Interval]],
    title: str = "MQAR answer accuracy",
    baselines: dict[int, dict[str, float]] | None = None,
    trained: Sequence[int] = (),
) -> Figure:
    """Recall accuracy against the number of key-value pairs, a line per variant with its CI over seeds, the
    heuristic baselines dashed (chance, copying a context value, elimination where it applies) and the trained
    pair counts shaded."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n in trained:
        ax.axvspan(n * 0.93, n * 1.07, color="0.92", zorder=0)
    for name, style in (("chance", ":"), ("copy", "--"), ("elimination", "-.")):
        xs = sorted(n for n, b in (baselines or {}).items() if name in b)
        if xs:
            ax.plot(xs, [baselines[n][name] for n in xs], style, color="0.45", label=f"{name} baseline")
    _recall_panel(ax, values, "key-value pairs")
    ax.set(title=f"{title} vs number of key-value pairs (mean, CI over seeds)")
    fig.tight_layout()
    return fig


def recall_vs_width(values: dict[int, dict[str, dict[int, Interval]]]) -> Figure:
    """Zoology's figure: per number of pairs a panel of recall accuracy against d_model, a line per variant.
    `values`: pairs -> variant -> d_model -> interval over seeds."""
    pairs = sorted(values)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], pairs, strict=True):
        _recall_panel(ax, values[n], "d_model")
        ax.set_xscale("log", base=2)
        ax.set(title=f"{n} key-value pairs")
    axes[0][0].set_ylabel("answer accuracy")
    fig.suptitle("MQAR answer accuracy vs model width (mean, CI over seeds)")
    fig.tight_layout()
    return fig


def _recall_panel(ax, values: dict[str, dict[int, Interval]], xlabel: str) -> None:
    for att, per in values.items():
        xs = sorted(per)
        mean = np.array([per[x].mean for x in xs])
        err = np.array(
            [[per[x].mean - per[x].low, per[x].high - per[x].mean] if math.isfinite(per[x].low) else [0, 0] for x in xs]
        ).T  # (2, points): below and above the mean, as errorbar wants
        ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, color=COLORS[att], label=att)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel=xlabel, ylabel="answer accuracy", ylim=(-0.02, 1.05))
    ax.legend(fontsize=7)
