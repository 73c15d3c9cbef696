"""docs/dpo_study.png from the latest DPO study's parent run (docs/dpo_study.py; experiment picollm-dpo-study):
left, the selection on validation; right, the confirmation on test with story-bootstrap CIs and the seeds' range.

    .venv/bin/python docs/dpo_study_figure.py docs/dpo_study.png [PARENT_RUN_ID]
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np


def table(run_id: str, path: str) -> list[dict]:
    t = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)).read_text())
    return [dict(zip(t["columns"], row, strict=True)) for row in t["data"]]


def main() -> None:
    out = sys.argv[1]
    if len(sys.argv) > 2:
        run_id = sys.argv[2]
    else:  # the latest study parent (a run without a parent run)
        runs = mlflow.search_runs(experiment_names=["picollm-dpo-study"], order_by=["start_time DESC"])
        run_id = runs[runs["tags.mlflow.parentRunId"].isna()]["run_id"].iloc[0]
    sel, conf = table(run_id, "selection.json"), table(run_id, "confirmation.json")
    tags = mlflow.get_run(run_id).data.tags
    chosen, headline = tags["dpo.study.chosen"], tags["dpo.study.headline"].split(",")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    ref = np.mean([sel[0][f"reference/{s}"] for s in headline])
    ax.barh(
        [r["variant"] for r in sel],
        [r["val_score"] for r in sel],
        color=["tab:blue" if r["variant"] == chosen else "0.6" for r in sel],
    )
    ax.axvline(ref, color="k", ls="--", lw=1, label=f"SFT reference {ref:.3f}")
    ax.set(xlabel=f"val accuracy, mean over {', '.join(headline)}", title="selection (validation, seed 0)")
    ax.set_xlim(min(ref, *(r["val_score"] for r in sel)) - 0.03, max(r["val_score"] for r in sel) + 0.02)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    rows = [r for r in conf if r["scheme"] != "headline (pooled)"]
    y = np.arange(len(rows))
    g = np.array([r["gain"] for r in rows])
    lo, hi = np.array([r["ci_low"] for r in rows]), np.array([r["ci_high"] for r in rows])
    colors = ["tab:blue" if r["headline"] else "0.5" for r in rows]
    for i, c in enumerate(colors):
        bx.errorbar(g[i], y[i], xerr=[[g[i] - lo[i]], [hi[i] - g[i]]], fmt="none", ecolor=c, capsize=4, lw=1.5)
    bx.scatter(g, y, c=colors, zorder=3, label="gain, mean over seeds (95 % CI over stories)")
    bx.scatter([r["seed_gain_min"] for r in rows], y, marker="|", c="k", s=80, label="seed range")
    bx.scatter([r["seed_gain_max"] for r in rows], y, marker="|", c="k", s=80)
    bx.axvline(0, color="k", lw=0.8)
    labels = [f"{r['scheme']}{' (headline)' if r['headline'] else ''}" for r in rows]
    bx.set_yticks(y, labels, fontsize=8)
    bx.invert_yaxis()
    bx.set(xlabel="test accuracy: DPO − SFT reference", title=f"confirmation on unseen test stories: {chosen}")
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"{out} from run {run_id}")


if __name__ == "__main__":
    main()
