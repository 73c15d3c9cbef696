"""DPO study: one SFT reference (a registered model), data + reference log-probs once, many DPO variants.
Each variant is one MLflow run (experiment dpo-study) with its overrides as params and its test metrics."""

import copy
import json
import sys
import time

import mlflow
import torch

from picollm.config import DPORunConfig, load_config
from picollm.dpo.metrics import gain_metrics, gain_table, scores_metrics
from picollm.dpo.pairs import build_preference_data
from picollm.dpo.trainer import DPOTrainer, PairSet, compute_reference_logps
from picollm.tracking import registry
from picollm.tracking.store import init_tracking

torch.set_num_threads(1)  # the study shares the 2-core machine with other work

ref_name, base, variants = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
init_tracking(mlflow.get_tracking_uri())
reference = registry.resolve(ref_name).load().eval().requires_grad_(False)
cfg0 = load_config(DPORunConfig, "configs/dpo.yaml", base)
data = build_preference_data(cfg0.data, cfg0.dpo, reference.text_vocab)
sets = {n: PairSet(p, data.pad_id) for n, p in data.pairs.items()}
dev = torch.device("cpu")
t0 = time.perf_counter()
for s in sets.values():
    compute_reference_logps(reference, s, 64, dev)
print("data", {n: len(s) for n, s in sets.items()}, "ref logps %.0fs" % (time.perf_counter() - t0), flush=True)
mlflow.set_experiment("dpo-study")
for v in variants:
    name, over = v["name"], v["set"]
    cfg = load_config(DPORunConfig, "configs/dpo.yaml", base + over)
    torch.manual_seed(cfg.dpo.seed)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    tr = DPOTrainer(policy, cfg.dpo, dev)
    t = time.perf_counter()
    res = tr.fit(sets["train"], sets["val"])
    sc = tr.score(sets["test"])
    table = gain_table(sc)
    m = {
        **scores_metrics("test", sc),
        **gain_metrics("test", table),
        "dpo/steps": res.steps,
        "dpo/best_step": float(res.best_step or 0),
        "time/dpo_s": time.perf_counter() - t,
    }
    with mlflow.start_run(run_name=name):
        mlflow.log_params(
            {"reference": ref_name, "variant": name, **{o.split("=")[0]: o.split("=", 1)[1] for o in base + over}}
        )
        mlflow.log_metrics({k.replace("@", "_"): float(x) for k, x in m.items()})
        for h in res.history:
            mlflow.log_metrics({k: x for k, x in h.items() if k in ("val/loss", "val/accuracy")}, step=int(h["step"]))
        mlflow.log_table(table, "test/per_scheme.json")
    rows = " ".join(
        f"{s}:{table['reference_accuracy'][i]:.3f}->{table['accuracy'][i]:.3f}[{table['gain_ci_low'][i]:+.2f},{table['gain_ci_high'][i]:+.2f}]"
        for i, s in enumerate(table["scheme"])
    )
    print(
        f"{name:<28} steps {res.steps:>4} best {res.best_step} {m['time/dpo_s']:.0f}s "
        f"logpc {table['reference_logps_chosen'][-1]:.1f}->{table['logps_chosen'][-1]:.1f} | {rows}",
        flush=True,
    )
