"""DPO study: choose the preference loss on validation, confirm it on unseen test stories with several seeds.

    .venv/bin/python docs/dpo_study.py --set data.source=files \
        --set data.path=../shared/data/tinystories/TinyStories-train-head.jsonl

The protocol, fixed before any run (docs/studies.md reports what it measured):
1. Split. configs/dpo.yaml's story split (`data.seed` 0): train / val / test stories. The test stories are the
   confirmation partition, held out up front: every selection run sets `dpo.evaluate_test=false`, so no test
   pair is scored (nor any test prompt continued) before step 3.
2. Selection, on validation only. One SFT reference (seed 0, registered as picollm-sft-study); each variant
   below is one DPO run from it (seed 0). The headline schemes are the ones that reference does not solve:
   reference val accuracy < UNSOLVED_BELOW. Criterion: the kept policy's val accuracy averaged over the
   headline schemes (the earlier variant wins a tie).
3. Confirmation on test. The chosen variant with SFT+DPO seeds --seeds (default 1 2 3: fresh references, so
   the seed-0 draw that won the selection does not carry over), each a full `picollm dpo` run scored on test.
4. Statistics (picollm/dpo/stats.py). Per scheme, gain = mean over seeds of (DPO − reference) ranking accuracy on
   the same test pairs; 95 % CI from a bootstrap over test stories (all pairs and every seed's scores of a drawn
   story kept); p from the t-test over stories of the seed-averaged story means; Holm across the headline schemes.
   The per-seed gains (min–max) stand beside it: the CI covers story sampling, not seed spread.

Everything goes to MLflow, experiment picollm-dpo-study: a parent run (the selection and confirmation tables,
report.md / report.html) with every selection and confirmation run nested in it.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from picollm.compare.report import report_html
from picollm.config import DPORunConfig, load_config
from picollm.dpo.stats import SeedScores, confirmation_rows
from picollm.tracking import runs
from picollm.tracking.runs import SINGLE_VALUE_STEP, unique_name
from pipelines import dpo as flow

UNSOLVED_BELOW = 0.95
EXPERIMENT = "picollm-dpo-study"
SFT_NAME = "picollm-sft-study"
VARIANTS: dict[str, list[str]] = {  # dpo.* overrides on configs/dpo.yaml
    "sigmoid_b0.1": ["dpo.loss_type=sigmoid", "dpo.beta=0.1", "dpo.rpo_alpha=null"],
    "sigmoid_b0.1_rpo0.05": ["dpo.loss_type=sigmoid", "dpo.beta=0.1", "dpo.rpo_alpha=0.05"],
    "ipo_b0.1": ["dpo.loss_type=ipo", "dpo.beta=0.1", "dpo.rpo_alpha=null"],
    "simpo_b2_g1": ["dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.simpo_gamma=1.0", "dpo.rpo_alpha=null"],
    "simpo_b2_g1_rpo0.05": ["dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.simpo_gamma=1.0", "dpo.rpo_alpha=0.05"],
}


def echo(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def select(base: list[str]) -> tuple[str, list[dict], list[str]]:
    """Step 2: (chosen variant, one row per variant, headline schemes)."""
    rows: list[dict] = []
    reference, headline = None, None
    for name, over in VARIANTS.items():
        sel = ["dpo.evaluate_test=false", "dpo.seed=0", "sft.seed=0", "tracking.registered_model=null"]
        if reference is None:  # the first run trains and registers the shared SFT reference
            sel += [f"tracking.sft_registered_model={SFT_NAME}"]
        else:
            sel += [f"dpo.reference={reference}", "tracking.log_model=false"]
        cfg = load_config(DPORunConfig, "configs/dpo.yaml", [*base, *over, *sel, f"tracking.run_name=select-{name}"])
        t0 = time.perf_counter()
        out = flow.run(cfg, echo=lambda line, n=name: echo(f"select {n}: {line}"))
        reference = reference or out.reference
        t = out.val_table
        acc = dict(zip(t["scheme"], t["accuracy"], strict=True))
        ref = dict(zip(t["scheme"], t["reference_accuracy"], strict=True))
        if headline is None:  # declared from the reference alone, before any variant is compared
            headline = [s for s in t["scheme"] if s != "all" and ref[s] < UNSOLVED_BELOW]
            echo(f"headline (reference val accuracy < {UNSOLVED_BELOW}): {headline}  reference {ref}")
        score = float(np.mean([acc[s] for s in headline]))
        rows.append(
            {"variant": name, "val_score": score, "steps": out.steps, "seconds": time.perf_counter() - t0}
            | {f"val/{s}": acc[s] for s in t["scheme"]}
            | {f"reference/{s}": ref[s] for s in t["scheme"]}
        )
        echo(f"select {name}: headline val accuracy {score:.4f}  ({rows[-1]['seconds']:.0f} s)")
    assert headline is not None
    best = max(rows, key=lambda r: r["val_score"])  # max keeps the first of equals
    return best["variant"], rows, headline


def confirm(base: list[str], chosen: str, seeds: list[int]) -> tuple[list[SeedScores], list[float]]:
    """Step 3: the chosen variant, one full SFT+DPO run per seed, scored on the test stories."""
    out_scores, seconds = [], []
    for k in seeds:
        over = [*VARIANTS[chosen], f"dpo.seed={k}", f"sft.seed={k}", "tracking.log_model=false"]
        cfg = load_config(DPORunConfig, "configs/dpo.yaml", [*base, *over, f"tracking.run_name=confirm-seed{k}"])
        t0 = time.perf_counter()
        out = flow.run(cfg, echo=lambda line, k=k: echo(f"confirm seed {k}: {line}"))
        seconds.append(time.perf_counter() - t0)
        s = out.scores
        assert s is not None and s.uids is not None and s.reference_correct is not None
        out_scores.append(SeedScores(np.asarray(s.uids), np.asarray(s.schemes), s.reference_correct, s.policy_correct))
        echo(f"confirm seed {k}: test gain {out.metrics['test/gain']:+.4f}  ({seconds[-1]:.0f} s)")
    return out_scores, seconds


def _p(x: float) -> str:
    return "n/a (no variance)" if not math.isfinite(x) else ("<0.0001" if x < 1e-4 else f"{x:.4f}")


def report(selection: list[dict], chosen: str, headline: list[str], rows: list[dict], seeds: list[int]) -> str:
    schemes = [k.split("/", 1)[1] for k in selection[0] if k.startswith("val/") and k != "val/all"]
    ref = selection[0]
    lines = [
        "# DPO study: chosen on validation, confirmed on test",
        "",
        f"## Selection (validation; one SFT reference and DPO seed 0; headline = {', '.join(headline)})",
        "",
        "| variant | headline val accuracy | " + " | ".join(schemes) + " | steps | s |",
        "|---|---|" + "---|" * len(schemes) + "---|---|",
        "| reference | "
        + _fmt(np.mean([ref[f"reference/{s}"] for s in headline]))
        + " | "
        + " | ".join(_fmt(ref[f"reference/{s}"]) for s in schemes)
        + " | | |",
    ]
    for r in selection:
        mark = "**" if r["variant"] == chosen else ""
        lines.append(
            f"| {mark}{r['variant']}{mark} | {mark}{_fmt(r['val_score'])}{mark} | "
            + " | ".join(_fmt(r[f"val/{s}"]) for s in schemes)
            + f" | {r['steps']} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        f"## Confirmation (test stories unseen in selection; {chosen}; SFT+DPO seeds {', '.join(map(str, seeds))})",
        "",
        "| scheme | stories | reference | DPO | gain [95 % CI, stories] | seed gains | p | p Holm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"**{r['scheme']}**" if r["headline"] else str(r["scheme"])
        holm = _p(float(r["p_holm"])) if r["headline"] else "(secondary)"
        lines.append(
            f"| {name} | {r['stories']} | {_fmt(r['reference_accuracy'])} | {_fmt(r['accuracy'])} | "
            f"{float(r['gain']):+.3f} [{float(r['ci_low']):+.3f}, {float(r['ci_high']):+.3f}] | "
            f"{float(r['seed_gain_min']):+.3f} … {float(r['seed_gain_max']):+.3f} | {_p(float(r['p']))} | {holm} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override on configs/dpo.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="confirmation SFT+DPO seeds")
    args = ap.parse_args()
    base = [*args.overrides, f"tracking.experiment={EXPERIMENT}"]
    if len(args.seeds) < 3:
        ap.error("the confirmation needs at least 3 seeds")
    cfg = load_config(DPORunConfig, "configs/dpo.yaml", base)  # bad overrides fail here, before any run
    t0 = time.perf_counter()
    with runs.session("dpo-study", cfg.tracking) as s, s.run(unique_name("dpo-study")) as parent:
        chosen, selection, headline = select(base)
        echo(f"chosen on validation: {chosen}")
        parent.set_tags({"dpo.study.chosen": chosen, "dpo.study.headline": ",".join(headline)})
        parent.log_table({k: [r[k] for r in selection] for k in selection[0]}, "selection.json")
        scores, seconds = confirm(base, chosen, args.seeds)
        rows = confirmation_rows(scores, headline, n_boot=4000)
        parent.log_table({k: [r[k] for r in rows] for k in rows[0]}, "confirmation.json")
        metrics = {}
        for r in rows:
            key = str(r["scheme"]).replace(" (pooled)", "").replace(" ", "_")
            for k, name in [("gain", "gain"), ("ci_low", "gain_ci_low"), ("ci_high", "gain_ci_high"), ("p", "p")]:
                if math.isfinite(float(r[k])):  # keys sort with the gain first: MLflow's first chart
                    metrics[f"confirm/{name}/{key}"] = float(r[k])
            if math.isfinite(float(r["p_holm"])):
                metrics[f"confirm/p_holm/{key}"] = float(r["p_holm"])
        metrics |= {f"select/val_score/{r['variant']}": r["val_score"] for r in selection}
        parent.log_metrics(metrics, SINGLE_VALUE_STEP, flush=True)
        total = time.perf_counter() - t0
        parent.log_params({"dpo.seconds.total": round(total, 1)})
        md = report(selection, chosen, headline, rows, args.seeds)
        md += f"\nWall time {total:.0f} s (confirmation runs: "
        md += ", ".join(f"{x:.0f} s" for x in seconds) + ").\n"
        parent.log_text(md, "report.md")
        parent.log_text(report_html(md, {}, title="picollm DPO study"), "report.html")
    print(md, flush=True)


if __name__ == "__main__":
    main()
