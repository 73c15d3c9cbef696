"""Static figures of the interpretability sections: one question per figure, at most four panels,
150 dpi, so that text reads in MLflow's artifact viewer."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 150


def _annotate(ax, data: np.ndarray, fmt: str, vmin: float, vmax: float, diverging: bool, size: int = 8) -> None:
    """Numbers written into the cells, white on the dark end(s) of the colour map."""
    lim = max(abs(vmin), abs(vmax), 1e-12)
    for (i, j), v in np.ndenumerate(data):
        if math.isnan(v):
            continue
        dark = abs(v) > 0.6 * lim if diverging else (v - vmin) / max(vmax - vmin, 1e-12) < 0.6
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=size, color="white" if dark else "black")


def patching_resid_figure(results: dict[str, tuple[list[str], torch.Tensor]], attention: str) -> Figure:
    """Layer x position heatmaps of the recovered logit difference, one panel per family (<= 4 per
    figure: callers split longer lists)."""
    n = len(results)
    cols = min(2, n)
    rows = math.ceil(n / cols)
    width = max(t.shape[1] for _, t in results.values())
    fig, axes = plt.subplots(rows, cols, figsize=(0.42 * width * cols + 2.5, 1.9 * rows + 1.0), dpi=DPI, squeeze=False)
    im = None
    for ax, (family, (sites, data)) in zip(axes.flat, results.items(), strict=False):
        im = ax.imshow(data.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(sites)), sites, fontsize=8)
        ax.set_xticks(range(data.shape[1]), [str(p) for p in range(data.shape[1])], fontsize=7)
        ax.set_xlabel("position patched", fontsize=8)
        ax.set_title(f"{family}: residual stream", fontsize=10)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{attention}: logit difference recovered by patching the clean residual (1 = all)", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.88, bottom=0.12, top=0.85, wspace=0.25, hspace=0.6)
    fig.colorbar(im, cax=fig.add_axes((0.91, 0.15, 0.015, 0.65)), label="recovered")
    return fig


def matrix_figure(
    data: torch.Tensor,
    rows: list[str],
    cols: list[str],
    title: str,
    label: str,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    fmt: str = ".2f",
) -> Figure:
    """One annotated heatmap (components x families, heads x detectors, layers x families, ...)."""
    arr = data.numpy().astype(float)
    finite = arr[np.isfinite(arr)]
    lim = float(np.abs(finite).max()) if finite.size else 1.0
    if vmin is None or vmax is None:  # symmetric about 0
        vmin, vmax = -max(lim, 1e-6), max(lim, 1e-6)
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.8, 0.36 * len(rows) + 1.6), dpi=DPI)
    im = ax.imshow(arr, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    _annotate(ax, arr, fmt, vmin, vmax, diverging=vmin < 0 < vmax)
    ax.set_xticks(range(len(cols)), cols, rotation=25, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return fig


def probe_figure(
    sites: list[str],
    targets: list[str],
    trained: torch.Tensor,
    random: torch.Tensor,
    chance: torch.Tensor,
    attention: str,
) -> Figure:
    """Held-out probe accuracy per site, trained vs random init, one panel per target (<= 4)."""
    n = len(targets)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 0.6, 3.2), dpi=DPI, squeeze=False)
    x = np.arange(len(sites))
    for j, (ax, target) in enumerate(zip(axes[0], targets, strict=True)):
        ax.plot(x, trained[:, j].numpy(), marker="o", label="trained")
        ax.plot(x, random[:, j].numpy(), marker="s", ls="--", label="random init")
        ax.plot(x, chance[:, j].numpy(), color="grey", ls=":", label="majority class")
        ax.set_xticks(x, sites, fontsize=8)
        ax.set(ylim=(0, 1.02), title=target)
        ax.set_ylabel("held-out accuracy" if j == 0 else "")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{attention}: linear probes on the residual stream", fontsize=10)
    fig.tight_layout()
    return fig


def lens_figure(sites: list[str], groups: list[str], acc: torch.Tensor, loss: torch.Tensor, attention: str) -> Figure:
    """Logit-lens accuracy and loss per site, one line per family (two panels)."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), dpi=DPI)
    x = np.arange(len(sites))
    for j, g in enumerate(groups):
        style = {"color": "black", "lw": 2.2} if g == "all" else {}
        axes[0].plot(x, acc[:, j].numpy(), marker="o", label=g, **style)
        axes[1].plot(x, loss[:, j].numpy(), marker="o", label=g, **style)
    for ax, what in zip(axes, ("next-token accuracy", "loss (nats)"), strict=True):
        ax.set_xticks(x, sites)
        ax.set(xlabel="residual stream after", ylabel=what)
    axes[0].set_ylim(0, 1.02)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{attention}: logit lens (each layer decoded by the final norm and head)", fontsize=10)
    fig.tight_layout()
    return fig
