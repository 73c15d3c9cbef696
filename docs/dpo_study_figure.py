"""docs/dpo_study.png from the MLflow runs of the study: gain per scheme with its 95% paired-bootstrap CI."""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

parts = []
for exp, label in [("study-r1", "r1 flow: sigmoid b0.1, 300 steps"), ("study-r2", "r2 flow: simpo b2 g1")]:
    r = mlflow.search_runs(experiment_names=[exp])
    r = r[r["metrics.test/gain"].notna()].copy()
    r["label"], r["ref"] = label, exp[-2:]
    parts.append(r)
r = mlflow.search_runs(experiment_names=["dpo-study"], order_by=["start_time ASC"])
r["label"], r["ref"] = r["params.variant"], "r1"
parts.append(r)
if len(sys.argv) > 2:  # the final default's flow run
    r = mlflow.search_runs(experiment_names=[sys.argv[2]])
    r = r[r["metrics.test/gain"].notna()].copy()
    r["label"], r["ref"] = "configs/dpo.yaml (make dpo)", "default"
    parts.append(r)
runs = pd.concat(parts, ignore_index=True)
schemes = ["other_story", "shuffle_sentences", "replace_words", "swap_tokens"]
fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
w = 0.8 / len(schemes)
x = np.arange(len(runs))
for j, s in enumerate(schemes):
    g = runs[f"metrics.test/gain/{s}"].values
    lo, hi = runs[f"metrics.test/gain_ci_low/{s}"].values, runs[f"metrics.test/gain_ci_high/{s}"].values
    ok = ~np.isnan(g)
    ax.errorbar((x + (j - 1.5) * w)[ok], g[ok], yerr=[(g - lo)[ok], (hi - g)[ok]], fmt="o", ms=3, capsize=2, label=s)
ax.axhline(0, color="k", lw=0.8)
ax.axhline(0.10, color="gray", ls="--", lw=0.8, label="target +0.10")
ax.set_ylabel("test accuracy: DPO − reference\n(95% paired-bootstrap CI)")
ax.set_title("DPO on the shared TinyStories sample (d_model 64, 2 layers): gain over the SFT reference per scheme")
ax.legend(fontsize=7, ncol=5)
# chosen log-prob change, per token: sums are divided by the mean response length where they are sums
ref, pol = runs["metrics.test/reference_logps/chosen"].values, runs["metrics.test/logps/chosen"].values
per_tok = np.where(ref < -20, 25.96, 1.0)  # summed log-probs: mean test response 25.96 tokens
ax2.bar(x, (pol - ref) / per_tok, color="tab:red")
ax2.axhline(0, color="k", lw=0.8)
ax2.set_ylabel("Δ logps/chosen\nper token (nats)")
ax2.set_xticks(
    x,
    [f"{label} [{rf}]" for label, rf in zip(runs["label"], runs["ref"], strict=True)],
    rotation=35,
    ha="right",
    fontsize=7,
)
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=110)
print(runs[["label", "ref", "metrics.test/gain/other_story", "metrics.test/gain/shuffle_sentences"]].to_string())
