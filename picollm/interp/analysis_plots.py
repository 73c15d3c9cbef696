"""Figures of `picollm analyze` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from picollm.interp.analysis import EmbeddingAnalysis, pearson  # noqa: E402


def close(fig: Figure) -> None:
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Embeddings


def _pc_scatter(ax, emb: EmbeddingAnalysis, i: int, j: int, name: str):
    x, y = emb.coords[:, i].numpy(), emb.coords[:, j].numpy()
    ci, cj = (abs(pearson(emb.coords[:, k], emb.values.float())) for k in (i, j))
    title = f"{name}\nPC{i + 1} vs PC{j + 1}  |corr with n|: {ci:.2f}, {cj:.2f}"
    order = np.argsort(emb.values.numpy())  # the line joins n -> n+1
    ax.plot(x[order], y[order], color="lightgrey", lw=0.7, zorder=1)
    sc = ax.scatter(x, y, c=emb.values.numpy(), cmap="viridis", s=14, zorder=2)
    for k in order[:: max(1, len(order) // 8)]:
        ax.annotate(str(int(emb.values[k])), (x[k], y[k]), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ev = emb.explained
    ax.set(
        xlabel=f"PC{i + 1} ({100 * float(ev[i]):.1f}%)", ylabel=f"PC{j + 1} ({100 * float(ev[j]):.1f}%)", title=title
    )
    return sc


DPI = 150  # figures are read in MLflow's artifact viewer: 150 dpi and <= 4 panels keep text legible


def embeddings_pca_figure(trained: EmbeddingAnalysis, random: EmbeddingAnalysis, label: str) -> Figure:
    """Rows: the trained model, a random init of the same config. Columns: PC1-PC2, PC2-PC3."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 9), dpi=DPI, squeeze=False)
    for row, (emb, name) in enumerate(((trained, label), (random, "random init (same config)"))):
        for col, (i, j) in enumerate(((0, 1), (1, 2))):
            ax = axes[row, col]
            if emb.coords.shape[1] <= j:
                ax.axis("off")
                continue
            sc = _pc_scatter(ax, emb, i, j, name)
            fig.colorbar(sc, ax=ax, label="value n")
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.07, top=0.93, wspace=0.3, hspace=0.4)  # cheaper than tight
    return fig


def _scree(ax: Any, emb: EmbeddingAnalysis, name: str) -> None:
    k = min(20, len(emb.explained))
    ax.bar(range(1, k + 1), emb.explained[:k].numpy(), color="tab:blue")
    ax.plot(range(1, k + 1), emb.explained[:k].cumsum(0).numpy(), color="tab:orange", marker=".", label="cumulative")
    ax.set(
        xlabel="principal component",
        ylabel="explained variance ratio",
        ylim=(0, 1.02),
        title=f"{name}\nscree (top-2 {100 * emb.metrics['explained_var_top2']:.1f}%)",
    )
    ax.legend(loc="center right")


def _cosine(fig: Figure, ax: Any, emb: EmbeddingAnalysis, name: str) -> None:
    im = ax.imshow(emb.cosine.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    cos = emb.metrics["neighbour_cos"]
    ax.set(xlabel="value", ylabel="value", title=f"{name}\ncentred cosine; cos(n, n+1) = {cos:.2f}")
    fig.colorbar(im, ax=ax, label="cosine similarity")


def embeddings_spectrum_figure(trained: EmbeddingAnalysis, random: EmbeddingAnalysis, label: str) -> Figure:
    """Rows: the trained model, a random init. Columns: scree plot, cosine-similarity matrix (value x value)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 9), dpi=DPI, squeeze=False)
    for row, (emb, name) in enumerate(((trained, label), (random, "random init (same config)"))):
        _scree(axes[row, 0], emb, name)
        _cosine(fig, axes[row, 1], emb, name)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.07, top=0.93, wspace=0.3, hspace=0.4)
    return fig


def embeddings_figure(trained: EmbeddingAnalysis, random: EmbeddingAnalysis, label: str) -> Figure:
    """All eight panels at once (used by `picollm compare`): rows trained / random init, columns PC1-PC2,
    PC2-PC3, scree, cosine matrix. `picollm analyze` logs the two halves as separate figures."""
    fig, axes = plt.subplots(2, 4, figsize=(21, 10))
    for row, (emb, name) in enumerate(((trained, label), (random, "random init (same config)"))):
        sc = _pc_scatter(axes[row, 0], emb, 0, 1, name)
        fig.colorbar(sc, ax=axes[row, 0], label="value n")
        if emb.coords.shape[1] > 2:
            sc = _pc_scatter(axes[row, 1], emb, 1, 2, name)
            fig.colorbar(sc, ax=axes[row, 1], label="value n")
        _scree(axes[row, 2], emb, name)
        _cosine(fig, axes[row, 3], emb, name)
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.06, top=0.91, wspace=0.35, hspace=0.35)  # cheaper than tight
    return fig


# --------------------------------------------------------------------------------------------------
# Attention


def _triangle(p: torch.Tensor) -> np.ndarray:
    """Hide the (non-causal) upper triangle so it reads as 'not allowed' rather than 'zero weight'."""
    a = p.numpy().astype(float).copy()
    a[np.triu_indices(a.shape[0], k=1)] = np.nan
    return a


def attention_figure(
    family: str,
    example: torch.Tensor,
    example_tokens: list[int],
    mean: torch.Tensor,
    n_mean: int,
    attention: str,
) -> Figure:
    """example, mean: (L, H, P, P). Top block: one sequence, labelled with its tokens; bottom block:
    the mean over `n_mean` sequences. One shared [0, 1] colour scale for every panel."""
    n_layers, n_heads, p, _ = mean.shape
    pe = example.shape[-1]
    size = max(2.6, 0.2 * p)
    fig, axes = plt.subplots(
        2 * n_layers, n_heads, figsize=(size * n_heads + 1.2, size * 2 * n_layers + 0.8), squeeze=False
    )
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = None
    labels = [str(t) for t in example_tokens[:pe]]
    for block, (pat, what) in enumerate(((example, "example"), (mean, f"mean of {n_mean}"))):
        for layer in range(n_layers):
            for head in range(n_heads):
                ax = axes[block * n_layers + layer, head]
                im = ax.imshow(_triangle(pat[layer, head]), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_title(f"{what}  L{layer}H{head}", fontsize=9)
                # Tick labels only on the outer panels of each block: text is nearly all of the drawing
                # time, and every panel of a block shares the same axes anyway.
                n = pat.shape[-1]
                ticks = list(range(n)) if block == 0 else list(range(0, n, max(1, n // 8)))
                names = labels if block == 0 else [str(t) for t in ticks]
                size_ = 6 if block == 0 else 7
                if head == 0:
                    ax.set_yticks(ticks, names, fontsize=size_)
                    ax.set_ylabel("query (token)" if block == 0 else "query position", fontsize=8)
                else:
                    ax.set_yticks([])
                if layer == n_layers - 1:
                    ax.set_xticks(ticks, names, fontsize=size_, rotation=90 if block == 0 else 0)
                    ax.set_xlabel("key (token)" if block == 0 else "key position", fontsize=8)
                else:
                    ax.set_xticks([])
    fig.suptitle(f"{attention} attention, family '{family}'  (colour scale fixed to [0, 1])", fontsize=12)
    # Fixed margins rather than tight_layout: same look, and several times faster on big grids.
    fig.subplots_adjust(left=0.07, right=0.9, bottom=0.06, top=0.93, wspace=0.3, hspace=0.35)
    cax = fig.add_axes((0.93, 0.15, 0.015, 0.7))
    fig.colorbar(im, cax=cax, label="attention weight")
    return fig


def head_scores_figure(rows: list[dict[str, float | str]], columns: list[str], attention: str) -> Figure:
    """Heads x scores (all in [0, 1]) with the numbers written in."""
    heads = [str(r["head"]) for r in rows]
    data = np.array([[float(r[c]) for c in columns] for r in rows])
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2.5, 0.42 * len(heads) + 1.6), dpi=DPI)
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        if not math.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(heads)), heads)
    ax.set_title(f"{attention} attention: per-head scores (all families)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Neurons and ablation


def neuron_heatmap(labels: list[str], means: torch.Tensor, families: list[str], shift: float) -> Figure:
    """Selected neurons (rows) x families: shifted family means divided by the row's maximum."""
    shifted = (means + shift).clamp(min=0)
    rel = (shifted / shifted.max(1, keepdim=True).values.clamp(min=1e-12)).numpy()
    fig, ax = plt.subplots(figsize=(1.1 * len(families) + 4.5, 0.3 * len(labels) + 1.8), dpi=DPI)
    im = ax.imshow(rel, cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(families)), families, rotation=20, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(f"most selective MLP neurons: mean activation per family\n(GELU + {shift:.2f}, / row max)")
    fig.colorbar(im, ax=ax, label="relative mean activation")
    fig.tight_layout()
    return fig


def ablation_figure(components: list[str], columns: list[str], delta: torch.Tensor, attention: str) -> Figure:
    data = delta.numpy()
    lim = max(float(np.nanmax(np.abs(data))), 1e-6)
    fig, ax = plt.subplots(figsize=(1.15 * len(columns) + 3, 0.45 * len(components) + 1.8), dpi=DPI)
    im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        ax.text(
            j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8, color="white" if abs(v) > 0.6 * lim else "black"
        )
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    ax.set_yticks(range(len(components)), components)
    ax.set_title(f"{attention} model: loss increase under mean ablation")
    fig.colorbar(im, ax=ax, label="delta loss (nats/token)")
    fig.tight_layout()
    return fig
