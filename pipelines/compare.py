"""Flow: N attention variants side by side, as one parent MLflow run with a child per model run.

Train mode: for every seed, every variant of `compare.variants` is trained (picollm.train_run) as a nested
child run, on the same data with the same seed; only what the variant overrides differs. The first variant is
the baseline every other is tested against (paired by seed). With `compare.lr_grid`, each variant first trains
on one seed per lr (children tagged `compare.lr_grid`) and its seeded runs use the lr with the best validation
score (picollm.compare.lr_grid). Registry mode: each variant's `models` are loaded and only evaluated, each in
its own child run, on the data of their training runs.

Every child is then evaluated the same way (eval/..., lengen/..., recall/...: overall numbers as metrics,
everything in tables/evaluation.json); the parent logs the headline numbers (means, CIs, differences and tests,
variant last: picollm.compare.keys), the efficiency sweep, the recall curves and the position curves as metrics,
every metric's aggregate and test as tables, the figures, report.md and its self-contained report.html. With
data that includes mqar and `compare.recall_pairs`, the recall study (accuracy on answer positions vs number of
key-value pairs, and vs d_model with `compare.d_models`) is added. Everything that can fail on the user's input
(config, references, data) is checked before the parent run starts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from picollm import compare as cmp
from picollm.compare import keys, lr_grid, recall
from picollm.compare import verdict_page as vp
from picollm.compare.inputs import EvalSet, Inputs, Member, build_inputs, child_config, data_seed
from picollm.compare.plots import learning_curve as learning_curve_figure
from picollm.compare.recall import recall_key
from picollm.compare.recall_study import recall_study
from picollm.compare.summary import ByVariant, Summary, ci_text, setup_lines, summarise
from picollm.config import CompareConfig, ModelConfig, flatten, to_yaml
from picollm.config.base import RULE_FAMILIES
from picollm.runtime.hardware import torch_threads
from picollm.runtime.noise import Load, load_average
from picollm.tracking import links, notes, runs, store
from picollm.tracking.runs import RunLog, Session
from picollm.training import run as train_run
from picollm.training.progress import FlowProgress, as_progress

log = logging.getLogger(__name__)

Say = FlowProgress  # lines, the parts (runs) and their training steps: picollm/training/progress.py


@dataclass
class CompareOutcome:
    parent_run_id: str
    mode: str
    members: list[Member]
    rows: list[dict[str, str]]
    report: str
    metrics: dict[str, float]
    seconds: float
    variants: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    lrs: dict[str, float] = field(default_factory=dict)  # the lr each variant's seeded runs used
    timing_warnings: list[str] = field(default_factory=list)  # the efficiency timings' noise (report.md has them)


class _EpochLines:
    """Training callbacks that report one line per epoch through `say`, and the steps to its bar."""

    def __init__(self, say: Say, label: str) -> None:
        self.say, self.label = say, label

    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
        self.say.on_train_start(total_steps, steps_per_epoch, start_epoch)

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        self.say.on_step(step, metrics)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.say(
            f"  {self.label} epoch {epoch}: val/loss {metrics['val/loss']:.4f} "
            f"val/accuracy {metrics['val/accuracy']:.4f}"
        )

    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# The child runs: trained (train mode) or loaded (registry mode), each evaluated the same way


def _evaluate(
    member: Member, run: RunLog, cfg: CompareConfig, inp: Inputs, recall_sets: dict[int, dict[int, recall.RecallSet]]
) -> None:
    bs = cfg.train.eval_batch_size
    ev = inp.evalsets[member.data_seed]
    metrics, curves = cmp.evaluate_model(member.model, ev.splits, bs, cfg.compare.calibration_bins)
    lg_metrics, lg_curves = cmp.length_generalisation(member.model, ev.long, inp.train_len, bs)
    member.metrics = {**metrics, **lg_metrics, "model/num_params": float(member.model.num_params())}
    if recall_sets:
        accs = recall.recall_metrics(member.model, recall_sets[member.data_seed], bs)
        member.metrics |= accs
        for n in recall_sets[member.data_seed]:  # one chart: answer accuracy against the number of pairs
            if math.isfinite(a := accs[recall_key(n)]):
                run.log_metrics({"recall/accuracy": a}, step=n)
    member.curves = {**curves, **lg_curves}
    # The overall numbers as metrics; every per-family tail (of every split and length) in the table.
    logged, table = keys.child_split(member.metrics, ev.families)
    run.log_metrics(logged)
    run.log_table(keys.table_json_safe(table), "tables/evaluation.json")
    for name, curve in member.curves.items():  # step = position of the predicted token
        for i, v in enumerate(curve):
            if math.isfinite(v):
                run.log_metrics({name: float(v)}, step=i + 1)


def _lr_grid(s: Session, cfg: CompareConfig, inp: Inputs, say: Say) -> tuple[dict[str, float], list[dict]]:
    """Each variant trained on the first seed at every lr of compare.lr_grid (nested runs, not registered),
    scored on validation data; returns ({variant: best lr}, the grid's rows)."""
    cc = cfg.compare
    seed = cc.seeds[0] if cc.lr_grid_seed is None else cc.lr_grid_seed
    epochs = cc.lr_grid_epochs or cfg.train.epochs
    name, higher = lr_grid.score_name(inp.families, cc.lr_grid_metric)
    best, rows = {}, []
    for v in cc.variants:
        scores = {}
        for lr in cc.lr_grid:
            child = child_config(cfg, v, seed, f"{v.name}-lr{lr:g}", register=False, lr=lr, epochs=epochs)
            say.part(f"lr grid: {v.name} lr={lr:g} ({epochs} epoch(s), seed {seed})")
            tags = {"compare.lr_grid": "true", "compare.model": v.name}
            out = train_run.train(s, child, nested=True, tags=tags, ui=say)
            scores[lr] = lr_grid.grid_score(out.history, name)
            rows.append({"variant": v.name, "lr": lr, "score": scores[lr], "metric": name, "run_id": out.run_id})
        best[v.name] = lr_grid.best_lr(scores, higher)
        for row in rows:
            if row["variant"] == v.name:
                row["chosen"] = row["lr"] == best[v.name]
        say(f"lr grid: {v.name} uses lr {best[v.name]:g} ({name} {scores[best[v.name]]:.4f})")
    return best, rows


def _train_children(
    s: Session,
    cfg: CompareConfig,
    inp: Inputs,
    parent_id: str,
    lrs: dict[str, float],
    recall_sets: dict[int, dict[int, recall.RecallSet]],
    say: Say,
) -> None:
    cc = cfg.compare
    for seed in cc.seeds:  # every variant of a seed back to back: machine load hits them alike
        for v in cc.variants:
            label = f"seed{seed}"
            say.part(f"training {v.name} {label}")
            child = inp.child_cfgs[(v.name, seed)]
            if v.name in lrs:
                child = child.model_copy(update={"train": child.train.model_copy(update={"lr": lrs[v.name]})})
            out = train_run.train(s, child, ui=_EpochLines(say, f"{v.name} {label}"), nested=True)
            assert out.model is not None
            seed_data = data_seed(cfg, seed)
            member = Member(v.name, label, out.model.cpu(), out.run_id, seed_data, seed, history=out.history)
            tags = {"compare.model": v.name, "compare.run": label, "compare.parent": parent_id}
            tags["compare.data_seed"] = str(seed_data)
            with s.run(run_id=out.run_id, nested=True, tags=tags) as child_run:
                _evaluate(member, child_run, cfg, inp, recall_sets)
            inp.members.append(member)


def _evaluate_loaded(
    s: Session, cfg: CompareConfig, inp: Inputs, recall_sets: dict[int, dict[int, recall.RecallSet]], say: Say
) -> None:
    client = MlflowClient()
    for member in inp.members:
        say.part(f"evaluating {member.variant} {member.label}")
        att = member.model.cfg.attention
        tags = {"compare.model": member.variant, "compare.run": member.label, "model.attention": att}
        if member.source_run_id:
            tags["compare.source_run"] = member.source_run_id
        with s.run(f"{member.variant}-{member.label}", tags=tags, nested=True) as child:
            member.run_id = child.run_id
            child.log_params(flatten(member.model.cfg.model_dump(mode="json"), prefix="model."))
            _evaluate(member, child, cfg, inp, recall_sets)
            if member.source_run_id:  # what the training run logged, beside what we measured
                logged = client.get_run(member.source_run_id).data.metrics
                child.log_metrics({f"source/{k}": logged[k] for k in ("test/loss", "test/accuracy") if k in logged})


def _recall_by_width(
    s: Session,
    cfg: CompareConfig,
    by_variant: ByVariant,
    lrs: dict[str, float],
    recall_sets: dict[int, dict[int, recall.RecallSet]],
    say: Say,
) -> recall.RecallValues:
    """Recall accuracy of every variant and seed at every compare.d_models width: the seeded runs where the
    width is the variant's own, else a nested run trained at that width (not registered)."""
    cc = cfg.compare
    values: recall.RecallValues = {}
    for v in cc.variants:
        own = cfg.variant_model(v).d_model
        for d in cc.d_models:
            for i, seed in enumerate(cc.seeds):
                if d == own:
                    accs = {n: by_variant[v.name][i].metrics.get(recall_key(n), math.nan) for n in cc.recall_pairs}
                else:
                    extra = {"lr": lrs[v.name]} if v.name in lrs else {}
                    child = child_config(cfg, v, seed, f"{v.name}-d{d}-seed{seed}", False, d, **extra)
                    say.part(f"recall vs width: {v.name} d_model={d} seed{seed}")
                    out = train_run.train(s, child, nested=True, tags={"compare.d_model": str(d)}, ui=say)
                    assert out.model is not None
                    sets = recall_sets[data_seed(cfg, seed)]
                    scores = recall.recall_metrics(out.model, sets, cfg.train.eval_batch_size)
                    accs = {n: scores[recall_key(n)] for n in cc.recall_pairs}
                for n, a in accs.items():
                    values.setdefault((v.name, d, n), []).append(a)
    return values


def _learning_curve(
    s: Session, cfg: CompareConfig, parent: RunLog, say: Say
) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """Every variant trained at every `learning_curve.n_train` (nested runs, nothing registered); the parent
    logs `learning_curve/test/accuracy_vs_ceiling[/<family>]/<variant>` with step = n_train, the rows as a
    table and the figure. Returns the figure as (caption, path) and the rows."""
    lc = cfg.learning_curve
    rows: list[dict[str, Any]] = []
    for n in lc.n_train:
        for seed in lc.seeds if lc.seeds is not None else cfg.compare.seeds:
            for v in cfg.compare.variants:
                child = child_config(cfg, v, seed, f"{v.name}-n{n}-seed{seed}", register=False)
                child.data.n_train = n
                say.part(f"learning curve: {v.name} n_train={n} seed{seed}")
                out = train_run.train(s, child, nested=True, ui=say)
                m = out.test_metrics
                for group in ("all", *out.families):
                    sfx = "" if group == "all" else f"/{group}"
                    rows.append(
                        {
                            "model": v.name,
                            "n_train": n,
                            "seed": seed,
                            "family": group,
                            "accuracy": m[f"test/accuracy{sfx}"],
                            "vs_ceiling": m[f"test/accuracy_vs_ceiling{sfx}"],
                            **{
                                name: m.get(f"test/{metric}{sfx}")  # None where the run has none
                                for name, metric in cmp.RULE_CURVE_METRICS.items()
                            },
                        }
                    )
    families = sorted({r["family"] for r in rows} - {"all"}, key=cfg.data.seq_types.index)
    for att, n, group in {(r["model"], r["n_train"], r["family"]) for r in rows}:
        vals = [r["vs_ceiling"] for r in rows if (r["model"], r["n_train"], r["family"]) == (att, n, group)]
        sfx = "" if group == "all" else f"/{group}"
        parent.log_metrics({f"learning_curve/test/accuracy_vs_ceiling{sfx}/{att}": float(np.mean(vals))}, step=n)
    parent.log_table({k: [r[k] for r in rows] for k in rows[0]}, "learning_curve.json")
    path = "figures/learning_curve.png"
    parent.log_figure(learning_curve_figure(rows, families), path)
    held_out = "held-out rules" if cfg.data.split == "new_rules" else "held-out generators"
    return [(f"Learning curves: test accuracy / ceiling vs training sequences ({held_out})", path)], rows


def _parts(cfg: CompareConfig, inp: Inputs) -> int:
    """The parts of the progress bar: every run trained (lr grid, seeds, widths, learning curve) or evaluated
    (registry mode), and the efficiency timing."""
    cc, lc = cfg.compare, cfg.learning_curve
    n = len(inp.child_cfgs) + len(cc.variants) * len(cc.lr_grid) if inp.mode == "train" else len(inp.members)
    if cc.recall_pairs and cc.d_models:
        n += sum(d != cfg.variant_model(v).d_model for v in cc.variants for d in cc.d_models) * len(cc.seeds)
    if lc.n_train:
        n += len(lc.n_train) * len(lc.seeds if lc.seeds is not None else cc.seeds) * len(cc.variants)
    return n + int(cfg.efficiency.enabled)


# --------------------------------------------------------------------------------------------------
# The flow


def run(cfg: CompareConfig, progress: Say | Callable[[str], None] | None = None) -> CompareOutcome:
    start = time.perf_counter()
    say = as_progress(progress)
    cc = cfg.compare
    with runs.session("compare", cfg.tracking, device=cfg.train.device, num_threads=cfg.train.num_threads) as s:
        inp = build_inputs(cfg, say)
        say.plan(_parts(cfg, inp), "runs")
        recall_sets = (
            {seed: recall.recall_splits(ev.data_cfg, cc.recall_pairs) for seed, ev in inp.evalsets.items()}
            if cc.recall_pairs
            else {}
        )
        run_name = cfg.tracking.run_name or runs.unique_name(f"compare-{inp.mode}")
        tags = {"compare.mode": inp.mode, "data.source": inp.data_source, "compare.baseline": cc.baseline}
        tags["compare.primaries"] = ", ".join(cc.primaries) or "none declared (every row secondary)"
        lrs: dict[str, float] = {}
        with s.run(run_name, config=cfg, tags=tags) as parent:
            parent.log_text(to_yaml(inp.data_cfg), "data_config.yaml")
            extra: list[str] = []
            if inp.mode == "train":
                if cc.lr_grid:
                    lrs, grid_rows = _lr_grid(s, cfg, inp, say)
                    parent.log_params({f"compare.lr.{v}": lr for v, lr in lrs.items()})
                    parent.log_table({k: [r[k] for r in grid_rows] for k in grid_rows[0]}, "tables/lr_grid.json")
                    extra.append(cmp.lr_grid_section(grid_rows, lrs, cc.lr_grid_epochs or cfg.train.epochs))
                _train_children(s, cfg, inp, parent.run_id, lrs, recall_sets, say)
            else:
                _evaluate_loaded(s, cfg, inp, recall_sets, say)
            by_variant = {n: [m for m in inp.members if m.variant == n] for n in cc.names}
            summary = _log_summary(parent, cfg, inp, by_variant)
            say("drawing figures")
            figures = _figures(parent, cfg, by_variant, summary.agg, inp)
            if recall_sets:
                width = _recall_by_width(s, cfg, by_variant, lrs, recall_sets, say) if cc.d_models else {}
                section, recall_figs = _log_recall(parent, cfg, summary, by_variant, width)
                extra.append(section)
                figures += recall_figs
            efficiency = _efficiency(parent, cfg, {n: ms[0].model.cfg for n, ms in by_variant.items()}, say)
            if efficiency is not None:
                path = "figures/efficiency.png"
                parent.log_figure(cmp.efficiency_figure(efficiency), path)
                figures.append(("Efficiency vs sequence / context length", path))
            curve: list[dict[str, Any]] = []
            if cfg.learning_curve.n_train:
                curve_figures, curve = _learning_curve(s, cfg, parent, say)
                figures += curve_figures
            if any(f in RULE_FAMILIES for f in inp.families):
                extra.append(cmp.rule_split_section(summary.agg, list(cc.names), inp.families, inp.data_cfg, curve))
            seconds = time.perf_counter() - start
            report = _report(cfg, inp, by_variant, summary, efficiency, figures, parent.run_id, seconds, extra, lrs)
            parent.log_text(report, "report.md")
            # MLflow's artifact viewer shows markdown as text: the HTML copy, with the figures inlined, is
            # the one it renders (images and all).
            parent.log_text(cmp.report_html(report, parent.figure_files), "report.html")
            runs_by_variant = {v: [m.metrics for m in ms] for v, ms in by_variant.items()}
            page, forest = vp.verdict_page(cfg, runs_by_variant, summary.paired, parent.run_id)
            parent.log_text(vp.page_html(page, forest), vp.PAGE)  # the verdicts first, one page
            parent.log_metrics({f"{runs.BOOKKEEPING}time/total_s": seconds})
            # The children grouped by variant, one chart per metric (mean and band): a shared view to link to.
            eid = parent.active.info.experiment_id
            store.store_write(links.share_grouped_view, eid, parent.run_id, "compare.model", "eval/", what="a view")
    artifacts = ["config.yaml", "data_config.yaml", "report.md", "report.html", *(path for _, path in figures)]
    outcome = CompareOutcome(
        parent.run_id, inp.mode, inp.members, summary.rows, report, parent.metrics, seconds, cc.names, artifacts, lrs
    )
    outcome.timing_warnings = efficiency.warnings() if efficiency is not None else []
    return outcome


def from_runs(parent_run_id: str) -> tuple[str, str]:
    """The verdict page of an existing compare parent, built from its config and its children's metrics (no
    training) and logged onto it as verdict.html. Returns (the page's markdown, its artifact path). A run that
    is not a compare parent (or no run at all): PicollmError, exit 2."""
    import tempfile
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    from picollm.config.base import read_yaml, validate
    from picollm.errors import PicollmError

    client = MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException:
        raise PicollmError(f"--from-runs: no run {parent_run_id!r} in the tracking store") from None
    mode = parent.data.tags.get("compare.mode")
    if mode is None or parent.data.tags.get("mlflow.parentRunId"):
        raise PicollmError(f"--from-runs: run {parent_run_id} is not a compare parent run (no compare.mode tag)")
    if parent.info.status == "RUNNING":  # its children are not all there yet: the page would be a partial one
        raise PicollmError(f"--from-runs: compare run {parent_run_id} is still running; build its page when it ends")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_run_id, "config.yaml", tmp)
        except Exception as e:  # a parent without its config cannot say which contrasts it declared
            raise PicollmError(f"--from-runs: run {parent_run_id} has no readable config.yaml ({e})") from None
        cfg = validate(CompareConfig, read_yaml(Path(path)), source=f"run {parent_run_id} config.yaml")
    found = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000
    )
    # The seeded (or loaded) runs of each variant; not the lr-grid or d_model-width runs.
    members = [r for r in found if "compare.model" in r.data.tags]
    members = [r for r in members if not {"compare.lr_grid", "compare.d_model"} & set(r.data.tags)]
    by_variant: dict[str, list[Any]] = {v: [] for v in cfg.compare.names}
    for r in members:
        by_variant.setdefault(r.data.tags["compare.model"], []).append(r)
    if not all(by_variant.values()):
        missing = ", ".join(v for v, rs in by_variant.items() if not rs)
        raise PicollmError(f"--from-runs: run {parent_run_id} has no child runs of variant(s) {missing}")
    order = {str(s): i for i, s in enumerate(cfg.compare.seeds)}  # the paired design's seed order

    def position(r: Any) -> tuple[int, int, str]:
        label = r.data.tags.get("compare.run", "")
        return (order.get(label.removeprefix("seed"), len(order)), r.info.start_time or 0, label)

    labels = {v: [r.data.tags.get("compare.run", "") for r in sorted(rs, key=position)] for v, rs in by_variant.items()}
    runs_by_variant = {v: [_child_metrics(client, r) for r in sorted(rs, key=position)] for v, rs in by_variant.items()}
    first = next(iter(labels.values()))
    paired = mode == "train" and all(ls == first for ls in labels.values())
    page, forest = vp.verdict_page(cfg, runs_by_variant, paired, parent_run_id)
    client.log_text(parent_run_id, vp.page_html(page, forest), vp.PAGE)
    return page, vp.PAGE


def _child_metrics(client: MlflowClient, child: Any) -> dict[str, float]:
    """A child's metrics as the comparison had them: its logged metrics and its tables/evaluation.json (which
    holds the per-family tails the metrics leave out, e.g. the recall study's answer accuracy)."""
    import json

    table: dict[str, float] = {}
    try:  # MLflow's table JSON: {"columns": ["metric", "value"], "data": [[key, value], ...]}
        text = mlflow.artifacts.load_text(f"runs:/{child.info.run_id}/tables/evaluation.json")
        table = {k: float(x) for k, x in json.loads(text)["data"] if x is not None}
    except Exception:  # a child without its table: the logged metrics still hold the headline
        log.debug("no tables/evaluation.json in run %s", child.info.run_id, exc_info=True)
    return table | dict(child.data.metrics)  # the logged values where both: the table's JSON rounds them


def contrasts_only(metrics: dict[str, float], variants: list[str]) -> dict[str, float]:
    """The parent's keys: the contrasts (differences and their tests), not each variant's own value. A
    variant's values are its child runs' (the same keys in sibling runs tagged `compare.model`): the runs
    table grouped by that tag draws them on one chart, mean and band, where `<metric>/<variant>` keys on
    the parent would be a chart each."""
    own = tuple(f"/{v}{sfx}" for v in variants for sfx in ("", "_ci_low", "_ci_high", "_seq_ci_low", "_seq_ci_high"))
    return {k: v for k, v in metrics.items() if not k.endswith(own)}


def _log_summary(parent: RunLog, cfg: CompareConfig, inp: Inputs, by_variant: ByVariant) -> Summary:
    """The summary's contrasts as the parent's metrics (metric first: compare.keys; each variant's values
    are in its children), its headline as the parent's description, and every metric's aggregate and test
    (the position curves with bands too) as tables."""
    cc = cfg.compare
    summary = summarise(cfg, inp, by_variant)
    names = list(by_variant)
    headline = [k for k, _, _ in summary.headline]
    if keys.compact(names):  # many variants: the parent keeps the main numbers, the tables keep the rest
        headline = [k for k in headline if k in keys.COMPACT_HEADLINE or k == headline[-1]]
    metrics = keys.headline_metrics(summary.agg, summary.diffs, headline, summary.seq_ci, names)
    adjusted = cmp.holm_families(summary.diffs, [k for k, _, _ in summary.headline], summary.primaries)
    metrics |= keys.holm_metrics(adjusted, summary.primaries, names)
    if primary := [r for r in summary.rows if r["role"] == "primary"]:  # the runs table can show it as a column
        each = (f"{r['key']}{'' if len(names) == 2 else ' ' + r['variant']}: {r['verdict']}" for r in primary)
        parent.set_tags({"compare.primary_verdicts": "; ".join(each)})
    metrics |= keys.family_metrics(summary.agg, inp.families, variants=names)
    parent.log_metrics(contrasts_only(metrics, names))
    parent.set_tags({notes.NOTE_TAG: notes.contrast_note(summary.rows)})  # the parent's description
    curves = {v: {name: [m.curves[name] for m in ms] for name in ms[0].curves} for v, ms in by_variant.items()}
    parent.flush()
    tables = {
        "tables/summary.json": keys.summary_table(summary.agg),
        "tables/differences.json": keys.differences_table(summary.diffs),
        "tables/position_curves.json": keys.curves_table(curves, cc.confidence),
        "tables/coverage.json": keys.coverage_table(inp.first.coverage),
    }
    for path, columns in tables.items():
        parent.log_table(keys.table_json_safe(columns), path)
    return summary


def _log_recall(
    parent: RunLog, cfg: CompareConfig, summary: Summary, by_variant: ByVariant, width: recall.RecallValues
) -> tuple[str, list[tuple[str, str]]]:
    """The recall curves (`recall/accuracy/<variant>`, step = pairs), the table, the figures and the section."""
    cc = cfg.compare
    st = recall_study(cfg, summary, by_variant)
    for v, per in st.per_variant.items():
        for n, iv in per.items():
            if math.isfinite(iv.mean):
                parent.log_metrics({f"recall/accuracy/{v}": iv.mean}, step=n)
    rows = [(v, n, iv) for v, per in st.per_variant.items() for n, iv in per.items()]
    columns = {"variant": [v for v, _, _ in rows], "pairs": [n for _, n, _ in rows]}
    columns |= {
        k: [getattr(iv, a) for _, _, iv in rows]
        for k, a in (("mean", "mean"), ("ci_low", "low"), ("ci_high", "high"), ("n", "n"))
    }
    columns["recalls"] = [recall.recalls(iv, st.baselines[n]) for _, n, iv in rows]
    columns["success_rate"] = [recall.success_rate(st.per_seed[v][n]) for v, n, _ in rows]
    parent.log_table(keys.table_json_safe(columns), "tables/recall.json")
    figures = []
    path = "figures/recall_vs_pairs.png"
    parent.log_figure(cmp.recall_curves(st.per_variant, baselines=st.baselines, trained=st.trained), path)
    figures.append(("MQAR answer accuracy vs key-value pairs (CI over seeds; baselines dashed; trained shaded)", path))
    if width:
        table = recall.recall_table(width, cc.confidence, cc.ci)
        parent.log_table(keys.table_json_safe(table), "tables/recall_vs_d_model.json")
        for v, d, n, mean, low, high, k in zip(*table.values(), strict=True):
            st.width.setdefault(n, {}).setdefault(v, {})[d] = cmp.Interval(mean, low, high, math.nan, k)
        path = "figures/recall_vs_d_model.png"
        parent.log_figure(cmp.recall_vs_width(st.width), path)
        figures.append(("MQAR answer accuracy vs d_model per number of pairs (Zoology's figure)", path))
    return cmp.recall_section(st, cfg.compare.alpha, list(summary.agg)), figures


def _report(
    cfg: CompareConfig,
    inp: Inputs,
    by_variant: ByVariant,
    summary: Summary,
    efficiency: cmp.Efficiency | None,
    figures: list[tuple[str, str]],
    parent_id: str,
    seconds: float,
    extra: list[str],
    lrs: dict[str, float],
) -> str:
    cc = cfg.compare
    names = list(by_variant)
    title = f"picollm: {' vs '.join(names)}" if len(names) <= 3 else f"picollm: {len(names)} attention variants"
    return cmp.render_report(
        cmp.ReportInput(
            title=title,
            mode=inp.mode,
            parent_run_id=parent_id,
            seconds=seconds,
            setup=setup_lines(cfg, inp, by_variant, summary.params, lrs),
            runs={v: [m.label for m in ms] for v, ms in by_variant.items()},
            families=inp.families,
            factors=cc.length_factors,
            train_len=inp.train_len,
            agg=summary.agg,
            diffs=summary.diffs,
            rows=summary.rows,
            alpha=cc.alpha,
            ci_text=ci_text(cfg),
            coverage=inp.first.coverage,
            efficiency=efficiency,
            figures=figures,
            extra=[*extra, *(_reproduction_section(inp.members) if inp.mode == "registry" else [])],
            test=cc.test,
            seq_ci=summary.seq_ci,
            primaries=summary.primaries,
        )
    )


def _efficiency(parent: RunLog, cfg: CompareConfig, archs: dict[str, ModelConfig], say: Say) -> cmp.Efficiency | None:
    """Every variant timed side by side (training steps, generation, peak memory) and its generation state
    size, logged by length."""
    e = cfg.efficiency
    if not e.enabled:
        return None
    with torch_threads(e.num_threads):
        longest = max(e.lengths + e.gen_contexts) + e.gen_tokens + 8
        models = cmp.efficiency_models(archs, longest)
        batches = {n: max(1, e.tokens_per_step // n) for n in e.lengths}
        eff = cmp.Efficiency(e.lengths, batches, e.gen_contexts, torch.get_num_threads())
        eff.state_floats = cmp.state_sizes(archs, sorted(set(e.lengths) | set(e.gen_contexts)))
        load_start = load_average()
        say.part(f"efficiency: training steps at N = {e.lengths}")
        eff.step = cmp.time_train_steps(models, e.lengths, e.tokens_per_step, e.warmup_steps, e.timed_steps)
        say(f"efficiency: generation at contexts {e.gen_contexts}")
        eff.prefill, eff.gen = cmp.time_generation(models, e.gen_contexts, e.gen_tokens)
        eff.load = Load.since(load_start)
        if e.memory:
            say("efficiency: peak memory, one fresh process per (variant, length)")
            eff.memory = {
                att: {n: cmp.measure_step_memory(m.cfg, n, batches[n]) for n in e.lengths} for att, m in models.items()
            }
    for (name, step), value in eff.metrics(keys.compact(list(archs))).items():
        if math.isfinite(value):  # under `scaling/`: after the contrasts (`eval/`) in the chart view
            parent.log_metrics({name: value}, step)
    parent.log_params(eff.params())
    parent.flush()
    return eff


def _figures(parent: RunLog, cfg: CompareConfig, by_variant: ByVariant, agg: Any, inp: Inputs) -> list[tuple[str, str]]:
    """The comparison's figures, logged to the parent run: [(caption, artifact path)]."""
    cc = cfg.compare
    families, train_len = inp.families, inp.train_len
    out: list[tuple[str, str]] = []

    def put(fig, path: str, caption: str) -> None:
        parent.log_figure(fig, path)
        out.append((caption, path))

    histories = {v: [m.history for m in ms if m.history] for v, ms in by_variant.items()}
    if any(histories.values()):
        put(cmp.loss_curves(histories), "figures/loss_curves.png", "Loss curves (seeds shaded min–max)")
    put(cmp.family_accuracy_ci(agg, families), "figures/accuracy_per_family.png", "Test accuracy per family, with CIs")
    put(
        cmp.position_accuracy(
            {v: [m.curves["eval/test/accuracy_by_position"] for m in ms] for v, ms in by_variant.items()},
            cc.confidence,
            train_len,
        ),
        "figures/accuracy_by_position.png",
        "Test accuracy by position",
    )
    if cc.length_factors:
        big = max(cc.length_factors)
        pos = {v: [m.curves[f"lengen/x{big}/accuracy_by_position"] for m in ms] for v, ms in by_variant.items()}
        put(
            cmp.length_curves(agg, cc.length_factors, train_len, families, pos, cc.confidence),
            "figures/length_generalisation.png",
            "Length generalisation (training length marked)",
        )
    first = {v: ms[0].model for v, ms in by_variant.items()}
    family = families[0]
    test = inp.first.splits["test"]
    for v, fig in cmp.attention_figures(first, test, family, cc.attention_positions, cfg.train.eval_batch_size).items():
        put(
            fig,
            f"figures/attention_{v}.png",
            f"Mixing pattern of the {v} model ({by_variant[v][0].label}), test sequences of family '{family}' "
            "(same sequences for every variant, colour scale fixed to [0, 1])",
        )
    figs, emb = cmp.embedding_figures(first)
    emb_metrics = {f"embeddings/{k}/{v}": x for v, m in emb.items() for k, x in m.items() if math.isfinite(x)}
    items = sorted(emb_metrics.items())  # a table: one value per variant, not a chart each on the parent
    parent.log_table({"metric": [k for k, _ in items], "value": [x for _, x in items]}, "tables/embeddings.json")
    for v, fig in figs.items():
        put(
            fig,
            f"figures/embeddings_{v}.png",
            f"Embedding PCA of the {v} model ({by_variant[v][0].label}) beside a random init",
        )
    return out


def _reproduction_section(members: list[Member]) -> list[str]:
    client = MlflowClient()
    rows = []
    for m in members:
        if not m.source_run_id:
            continue
        logged = client.get_run(m.source_run_id).data.metrics
        for key in ("test/loss", "test/accuracy"):
            if key in logged:
                now = m.metrics.get(f"eval/{key}", math.nan)
                rows.append(
                    [f"{m.variant} {m.label}", key, f"{logged[key]:.6f}", f"{now:.6f}", f"{abs(now - logged[key]):.2e}"]
                )
    if not rows:
        return []
    table = cmp.md_table(["model", "metric", "logged by its training run", "measured here", "|difference|"], rows)
    return ["## Reproduction of the training runs' metrics\n\n" + "\n".join(table)]


__all__ = ["CompareOutcome", "EvalSet", "run"]
