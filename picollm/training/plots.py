"""Figures logged with runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def training_curves(history: list[dict[str, float]]) -> Figure:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train/loss"] for h in history], marker="o", label="train")
    ax_loss.plot(epochs, [h["val/loss"] for h in history], marker="o", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss", yscale="log")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val/accuracy"] for h in history], marker="o", label="val accuracy")
    if "val/ceiling" in history[-1]:
        ax_acc.axhline(history[-1]["val/ceiling"], ls="--", color="grey", label="Bayes ceiling")
    if "val/accuracy_predictable" in history[-1]:
        ax_acc.plot(
            epochs,
            [h.get("val/accuracy_predictable", float("nan")) for h in history],
            marker="o",
            label="val accuracy (predictable positions)",
        )
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Next-token accuracy", ylim=(0, 1.02))
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    return fig


def family_accuracy(metrics: dict[str, float], families: list[str], prefix: str = "test") -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(families))
    acc = [metrics.get(f"{prefix}/accuracy/{f}", float("nan")) for f in families]
    ceil = [metrics.get(f"{prefix}/ceiling/{f}", float("nan")) for f in families]
    ax.bar([x - 0.2 for x in xs], acc, width=0.4, label="model")
    ax.bar([x + 0.2 for x in xs], ceil, width=0.4, label="Bayes ceiling", color="lightgrey")
    ax.set_xticks(list(xs), families, rotation=15)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=f"{prefix} accuracy per family vs ceiling")
    ax.legend()
    fig.tight_layout()
    return fig


def sweep_history(trials: list[dict[str, Any]], metric: str, direction: str) -> Figure:
    """A sweep's objective per trial number (pruned trials at their last reported value, where the
    pruner reports the objective's metric) and the best value so far."""
    fig, ax = plt.subplots(figsize=(8, 4))
    done = [t for t in trials if t["state"] == "COMPLETE"]
    pruned = [t for t in trials if t["state"] == "PRUNED" and t.get("value") is not None]
    ax.scatter([t["number"] for t in done], [t["value"] for t in done], label="complete", zorder=3)
    if pruned:
        ax.scatter(
            [t["number"] for t in pruned], [t["value"] for t in pruned], marker="x", color="grey", label="pruned"
        )
    best, xs, ys = None, [], []
    for t in sorted(done, key=lambda t: t["number"]):
        if best is None or (t["value"] < best if direction == "minimize" else t["value"] > best):
            best = t["value"]
        xs.append(t["number"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title=f"Optimisation history ({direction} {metric})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    return fig


def param_importances(importances: dict[str, float], metric: str) -> Figure:
    """Share of the objective's variation each searched key explains (Optuna's importance evaluator)."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(names)))
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel=f"importance for {metric}", xlim=(0, 1.05), title="Parameter importances")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
