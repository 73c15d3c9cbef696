"""Flow: softmax vs linear attention, side by side, as one parent MLflow run with a child per model run.

Train mode (compare.baseline/linear null): for every seed, both models are trained (picollm.train_run)
as nested child runs, on the same data, with the same seed and the same architecture apart from the
attention (so equal parameter counts and the same positional prior). Registry mode: the models
named by compare.baseline / compare.linear are loaded and only evaluated, each in its own child run,
on the data of their training runs.

Every child is then evaluated the same way (eval/..., lengen/...: overall numbers as metrics, everything
in tables/evaluation.json); the parent logs the headline numbers (means, CIs, differences and tests, variant
last: picollm.compare.keys), the efficiency sweep and curves as metrics, every metric's aggregate and test as
tables, the figures, report.md and its self-contained report.html. Everything that can fail on the user's
input (config, references, data) is checked before the parent run starts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from picollm import compare as cmp
from picollm import registry, runs, train_run
from picollm.compare import keys
from picollm.compare.plots import learning_curve as learning_curve_figure
from picollm.config import (
    CompareConfig,
    DataConfig,
    ModelConfig,
    TrackingConfig,
    TrainRunConfig,
    flatten,
    to_yaml,
    validate,
)
from picollm.data import PaddedSplit, build_data, to_padded
from picollm.errors import PicollmError
from picollm.hardware import torch_threads
from picollm.model import Transformer
from picollm.runs import RunLog, Session

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass
class Member:
    """One model run of the comparison: a child run, its model and what it measured."""

    attention: str
    label: str  # seed<k> or the model reference
    model: Transformer
    run_id: str = ""
    data_seed: int = 0  # the data it was trained and is evaluated on
    source_run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class CompareOutcome:
    parent_run_id: str
    mode: str
    members: list[Member]
    rows: list[dict[str, str]]
    report: str
    metrics: dict[str, float]
    seconds: float
    artifacts: list[str] = field(default_factory=list)


@dataclass
class EvalSet:
    """One data draw (one data seed): the splits and long sequences its models are evaluated on."""

    data_cfg: DataConfig
    families: list[str]
    splits: dict[str, PaddedSplit]
    long: dict[int, PaddedSplit]  # length factor -> sequences of factor x data.max_len
    coverage: dict[str, dict[str, float]]
    cov_long: dict[int, dict[str, float]]


@dataclass
class Inputs:
    """Everything the comparison needs, built and checked before the parent run exists. The report's
    coverage, figures and data description use the first data seed's draw (`first`)."""

    mode: str
    members: list[Member]  # registry mode: loaded; train mode: filled as children finish
    child_cfgs: dict[tuple[str, int], TrainRunConfig]
    data_source: str
    evalsets: dict[int, EvalSet]  # data seed -> its draw

    @property
    def first(self) -> EvalSet:
        return next(iter(self.evalsets.values()))

    @property
    def data_cfg(self) -> DataConfig:
        return self.first.data_cfg

    @property
    def families(self) -> list[str]:
        return self.first.families

    @property
    def splits(self) -> dict[str, PaddedSplit]:
        return self.first.splits

    @property
    def coverage(self) -> dict[str, dict[str, float]]:
        return self.first.coverage

    @property
    def cov_long(self) -> dict[int, dict[str, float]]:
        return self.first.cov_long

    @property
    def train_len(self) -> int:
        return self.data_cfg.max_len


class _EpochLines:
    """Training callbacks that report one line per epoch through `say`."""

    def __init__(self, say: Say, label: str) -> None:
        self.say, self.label = say, label

    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
        pass

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        pass

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.say(
            f"  {self.label} epoch {epoch}: val/loss {metrics['val/loss']:.4f} "
            f"val/accuracy {metrics['val/accuracy']:.4f}"
        )

    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Inputs: the models (registry mode) or the child configs (train mode), and the data


def _load_members(cfg: CompareConfig) -> tuple[list[Member], dict[int, DataConfig], str]:
    """The referenced models, each with the data config of its training run (they may differ in
    data.seed only: each model is evaluated on the draw it was trained on)."""
    members: list[Member] = []
    data_cfgs: dict[str, DataConfig] = {}
    for att, refs in (("softmax", cfg.compare.baseline), ("linear", cfg.compare.linear)):
        key = "baseline" if att == "softmax" else "linear"
        for ref in refs or []:
            source = registry.resolve(ref)
            label = source.label.replace(" ", "-")
            model = source.load()  # not registry.load_model: that resolves the store anew, ignoring tracking.uri
            if model.cfg.attention != att:
                raise PicollmError(f"compare.{key}: {ref} is a {model.cfg.attention}-attention model, expected {att}")
            trained = source.training_config()
            seed = trained.data.seed if trained is not None else cfg.data.seed
            history = source.training_history()
            members.append(Member(att, label, model, data_seed=seed, source_run_id=source.run_id, history=history))
            if trained is not None:
                data_cfgs[label] = trained.data
    if len({d.model_copy(update={"seed": 0}).model_dump_json() for d in data_cfgs.values()}) > 1:
        raise PicollmError(
            "compare: the referenced models were trained on different data ("
            + ", ".join(data_cfgs)
            + "); compare models trained on the same data config"
        )
    if data_cfgs:
        base, data_source = next(iter(data_cfgs.values())), "the referenced models' training runs"
    else:
        log.warning("no training config found for the referenced models: using the data section of the config")
        base, data_source = cfg.data, "the compare config (no training config found)"
    by_seed = {m.data_seed: base.model_copy(update={"seed": m.data_seed}) for m in members}
    _check_members(cfg, members, base)
    return members, by_seed, data_source


def _check_members(cfg: CompareConfig, members: list[Member], data_cfg: DataConfig) -> None:
    longest = max(cfg.compare.length_factors) * data_cfg.max_len
    for m in members:
        if m.model.cfg.vocab_size != data_cfg.vocab_size:
            raise PicollmError(
                f"compare: {m.label} has vocab_size {m.model.cfg.vocab_size}, its data {data_cfg.vocab_size}"
            )
        if m.model.cfg.pos_encoding == "learned" and longest > m.model.cfg.max_seq_len:
            raise PicollmError(
                f"compare: {m.label} has learned positions up to {m.model.cfg.max_seq_len}, "
                f"length generalisation needs {longest}"
            )


def data_seed(cfg: CompareConfig, seed: int) -> int:
    """The data draw of a seed's pair: its own (data.seed + seed) unless compare.resample_data is off."""
    return cfg.data.seed + seed if cfg.compare.resample_data else cfg.data.seed


def _child_train_config(cfg: CompareConfig, att: str, seed: int) -> TrainRunConfig:
    raw = {
        "data": {**cfg.data.model_dump(mode="json"), "seed": data_seed(cfg, seed)},
        "model": {**cfg.model.model_dump(mode="json"), "attention": att},
        "train": {**cfg.train.model_dump(mode="json"), "seed": seed},
        "tracking": TrackingConfig(
            uri=cfg.tracking.uri,
            experiment=cfg.tracking.experiment,
            run_name=f"{att}-seed{seed}",
            registered_model=f"{cfg.tracking.registered_model}-{att}" if cfg.tracking.registered_model else None,
            log_model=cfg.tracking.log_model,
        ).model_dump(mode="json"),
    }
    return validate(TrainRunConfig, raw, source=f"child config {att}-seed{seed}")


def _inputs(cfg: CompareConfig, say: Say) -> Inputs:
    cc = cfg.compare
    mode = "registry" if cc.baseline else "train"
    child_cfgs: dict[tuple[str, int], TrainRunConfig] = {}
    if mode == "registry":
        members, data_cfgs, data_source = _load_members(cfg)
    else:
        members, data_source = [], "the compare config"
        child_cfgs = {(att, s): _child_train_config(cfg, att, s) for s in cc.seeds for att in cmp.MODELS}
        data_cfgs = {data_seed(cfg, s): child_cfgs[("softmax", s)].data for s in cc.seeds}
    say(f"drawing length-generalisation sequences ({', '.join(f'{f}x' for f in cc.length_factors)})")
    evalsets = {seed: _evalset(cfg, d) for seed, d in data_cfgs.items()}
    return Inputs(mode, members, child_cfgs, data_source, evalsets)


def _evalset(cfg: CompareConfig, data_cfg: DataConfig) -> EvalSet:
    """The splits of one data draw, its long sequences (content-disjoint from every split) and coverage."""
    cc = cfg.compare
    data = build_data(data_cfg)
    families, train_len, pad = data.families, data_cfg.max_len, data_cfg.pad_id
    splits = {name: to_padded(s, pad, families) for name, s in data.splits().items()}
    used = {s.tobytes() for split in data.splits().values() for s in split.sequences}
    held_out = {fam: data.generator_pool("test", fam) for fam in families}  # no training generator
    long_raw = {
        f: cmp.long_sequences(data_cfg, f * train_len, cc.n_long, used, held_out) for f in sorted(cc.length_factors)
    }
    cov_long = {f: cmp.coverage(data.train, s, data_cfg.modulus) for f, s in long_raw.items()}
    coverage = {"test split": cmp.coverage(data.train, data.test, data_cfg.modulus)}
    coverage |= {f"{f}× ({f * train_len})": c for f, c in cov_long.items()}
    for name, c in coverage.items():
        if c["value_coverage"] < 1:  # e.g. a narrow data.start_range: long sequences reach unseen values
            log.warning("%s: only %.1f%% of the values occur in training", name, 100 * c["value_coverage"])
    long = {f: to_padded(s, pad, families) for f, s in long_raw.items()}
    return EvalSet(data_cfg, families, splits, long, coverage, cov_long)


# --------------------------------------------------------------------------------------------------
# The child runs: trained (train mode) or loaded (registry mode), each evaluated the same way


def _evaluate(member: Member, run: RunLog, cfg: CompareConfig, inp: Inputs) -> None:
    bs = cfg.train.eval_batch_size
    ev = inp.evalsets[member.data_seed]
    metrics, curves = cmp.evaluate_model(member.model, ev.splits, bs, cfg.compare.calibration_bins)
    lg_metrics, lg_curves = cmp.length_generalisation(member.model, ev.long, inp.train_len, bs)
    member.metrics = {**metrics, **lg_metrics, "model/num_params": float(member.model.num_params())}
    member.curves = {**curves, **lg_curves}
    # The overall numbers as metrics; every per-family tail (of every split and length) in the table.
    logged, table = keys.child_split(member.metrics, ev.families)
    run.log_metrics(logged)
    run.log_table(keys.table_json_safe(table), "tables/evaluation.json")
    for name, curve in member.curves.items():  # step = position of the predicted token
        for i, v in enumerate(curve):
            if math.isfinite(v):
                run.log_metrics({name: float(v)}, step=i + 1)


def _train_children(s: Session, cfg: CompareConfig, inp: Inputs, parent_id: str, say: Say) -> None:
    for seed in cfg.compare.seeds:  # both models of a seed back to back: machine load hits them alike
        for att in cmp.MODELS:
            label = f"seed{seed}"
            say(f"training {att} {label} ({len(inp.members) + 1}/{len(inp.child_cfgs)})")
            out = train_run.train(s, inp.child_cfgs[(att, seed)], ui=_EpochLines(say, f"{att} {label}"), nested=True)
            assert out.model is not None
            seed_data = data_seed(cfg, seed)
            member = Member(att, label, out.model.cpu(), out.run_id, seed_data, history=out.history)
            tags = {"compare.model": att, "compare.run": label, "compare.parent": parent_id}
            tags["compare.data_seed"] = str(seed_data)
            with s.run(run_id=out.run_id, nested=True, tags=tags) as child:
                _evaluate(member, child, cfg, inp)
            inp.members.append(member)


def _evaluate_loaded(s: Session, cfg: CompareConfig, inp: Inputs, say: Say) -> None:
    client = MlflowClient()
    for member in inp.members:
        say(f"evaluating {member.attention} {member.label}")
        tags = {"compare.model": member.attention, "compare.run": member.label, "model.attention": member.attention}
        if member.source_run_id:
            tags["compare.source_run"] = member.source_run_id
        with s.run(f"{member.attention}-{member.label}", tags=tags, nested=True) as child:
            member.run_id = child.run_id
            child.log_params(flatten(member.model.cfg.model_dump(mode="json"), prefix="model."))
            _evaluate(member, child, cfg, inp)
            if member.source_run_id:  # what the training run logged, beside what we measured
                logged = client.get_run(member.source_run_id).data.metrics
                child.log_metrics({f"source/{k}": logged[k] for k in ("test/loss", "test/accuracy") if k in logged})


def _learning_curve(s: Session, cfg: CompareConfig, parent: RunLog, say: Say) -> list[tuple[str, str]]:
    """Both models trained at every `learning_curve.n_train` (nested runs, nothing registered); the parent
    logs `learning_curve/test/accuracy_vs_ceiling[/<family>]/<model>` with step = n_train, the rows as a
    table and the figure. Returns the figure as (caption, path)."""
    lc = cfg.learning_curve
    rows: list[dict[str, Any]] = []
    for n in lc.n_train:
        for seed in lc.seeds if lc.seeds is not None else cfg.compare.seeds:
            for att in cmp.MODELS:
                child = _child_train_config(cfg, att, seed)
                child.data.n_train = n
                child.tracking.run_name = f"{att}-n{n}-seed{seed}"
                child.tracking.registered_model, child.tracking.log_model = None, False
                say(f"learning curve: {att} n_train={n} seed{seed}")
                out = train_run.train(s, child, nested=True)
                m = out.test_metrics
                for group in ("all", *out.families):
                    sfx = "" if group == "all" else f"/{group}"
                    rows.append(
                        {
                            "model": att,
                            "n_train": n,
                            "seed": seed,
                            "family": group,
                            "accuracy": m[f"test/accuracy{sfx}"],
                            "vs_ceiling": m[f"test/accuracy_vs_ceiling{sfx}"],
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
    return [("Learning curves: test accuracy / ceiling vs training sequences (held-out generators)", path)]


# --------------------------------------------------------------------------------------------------
# The flow


def run(cfg: CompareConfig, progress: Say | None = None) -> CompareOutcome:
    start = time.perf_counter()
    say: Say = progress or (lambda msg: log.info("%s", msg))
    with runs.session("compare", cfg.tracking, device=cfg.train.device, num_threads=cfg.train.num_threads) as s:
        inp = _inputs(cfg, say)
        run_name = cfg.tracking.run_name or runs.unique_name(f"compare-{inp.mode}")
        tags = {"compare.mode": inp.mode, "data.source": inp.data_source}
        with s.run(run_name, config=cfg, tags=tags) as parent:
            parent.log_text(to_yaml(inp.data_cfg), "data_config.yaml")
            if inp.mode == "train":
                _train_children(s, cfg, inp, parent.run_id, say)
            else:
                _evaluate_loaded(s, cfg, inp, say)
            by_model = {att: [m for m in inp.members if m.attention == att] for att in cmp.MODELS}
            summary = _log_summary(parent, cfg, inp, by_model)
            efficiency = _efficiency(parent, cfg, {att: ms[0].model.cfg for att, ms in by_model.items()}, say)
            say("drawing figures")
            figures = _figures(parent, cfg, by_model, summary.agg, inp, efficiency)
            if cfg.learning_curve.n_train:
                figures += _learning_curve(s, cfg, parent, say)
            seconds = time.perf_counter() - start
            report = _report(cfg, inp, by_model, summary, efficiency, figures, parent.run_id, seconds)
            parent.log_text(report, "report.md")
            # MLflow's artifact viewer shows markdown as text: the HTML copy, with the figures inlined, is
            # the one it renders (images and all).
            parent.log_text(cmp.report_html(report, parent.figure_files), "report.html")
            parent.log_metrics({"compare/seconds": seconds})
    artifacts = ["config.yaml", "data_config.yaml", "report.md", "report.html", *(path for _, path in figures)]
    return CompareOutcome(
        parent.run_id, inp.mode, inp.members, summary.rows, report, parent.metrics, seconds, artifacts
    )


@dataclass
class Summary:
    agg: Any  # cmp.Aggregate
    diffs: dict[str, cmp.Difference]
    rows: list[dict[str, str]]
    metrics: dict[str, float]
    params: dict[str, int]
    paired: bool  # the runs pair up by seed (train mode, the same seeds in the same order)
    seq_ci: cmp.SeqIntervals = field(default_factory=dict)


def _log_summary(parent: RunLog, cfg: CompareConfig, inp: Inputs, by_model: dict[str, list[Member]]) -> Summary:
    """Mean and CI of every metric over the runs, the difference linear - softmax with its paired (or
    Welch) test and TOST, sequence-bootstrap intervals for a model with one run, and the mean position
    curves with bands."""
    cc = cfg.compare
    runs_by_model = {att: [m.metrics for m in ms] for att, ms in by_model.items()}
    agg = cmp.aggregate(runs_by_model, cc.confidence, cc.ci, cc.bootstrap_samples)
    labels = {att: [m.label for m in ms] for att, ms in by_model.items()}
    paired = inp.mode == "train" and labels["softmax"] == labels["linear"]  # registry mode: unpaired
    margins = cc.equivalence_margins
    diffs = cmp.differences(runs_by_model, cc.confidence, cc.equivalence_margin, margins, cc.test, paired)
    seq_ci = _sequence_intervals(cfg, inp, by_model) if any(len(ms) == 1 for ms in by_model.values()) else {}
    headline = cmp.headline_keys(cc.length_factors)
    rows = cmp.summary_rows(agg, diffs, headline, cc.alpha, seq_ci)
    # The parent's metrics: the headline numbers only, metric first and variant last (see compare.keys);
    # every metric of every split, family and length goes to the tables below and to the report.
    metrics = keys.headline_metrics(agg, diffs, [k for k, _, _ in headline], seq_ci)
    metrics |= keys.family_metrics(agg, inp.families)
    params = {att: int(ms[0].model.num_params()) for att, ms in by_model.items()}
    metrics |= {f"model/num_params/{att}": float(n) for att, n in params.items()}
    parent.log_metrics(metrics)
    curves = {att: {name: [m.curves[name] for m in ms] for name in ms[0].curves} for att, ms in by_model.items()}
    charted = ["eval/test/accuracy_by_position", f"lengen/x{max(cc.length_factors)}/accuracy_by_position"]
    for step, point in keys.curve_steps(curves, charted):  # step = position
        parent.log_metrics(point, step)
    parent.flush()
    tables = {
        "tables/summary.json": keys.summary_table(agg),
        "tables/differences.json": keys.differences_table(diffs),
        "tables/position_curves.json": keys.curves_table(curves, cc.confidence),
        "tables/coverage.json": keys.coverage_table(inp.coverage),
    }
    for path, columns in tables.items():
        parent.log_table(keys.table_json_safe(columns), path)
    return Summary(agg, diffs, rows, metrics, params, paired, seq_ci)


def _sequence_intervals(cfg: CompareConfig, inp: Inputs, by_model: dict[str, list[Member]]) -> cmp.SeqIntervals:
    """For a model with one run: sequence-bootstrap intervals of its test accuracy (all and predictable
    targets) and accuracy beyond the training length, on its fixed sequences; of the difference as well
    when both models have one run on the same data (per-sequence correct_linear - correct_softmax)."""
    cc, bs = cfg.compare, cfg.train.eval_batch_size
    counts = {
        att: _accuracy_counts(ms[0].model, inp.evalsets[ms[0].data_seed], inp.train_len, bs)
        for att, ms in by_model.items()
        if len(ms) == 1
    }
    out: cmp.SeqIntervals = {
        att: {k: cmp.sequence_bootstrap_ci(c, t, cc.confidence, cc.bootstrap_samples) for k, (c, t) in per.items()}
        for att, per in counts.items()
    }
    if len(counts) == 2 and by_model["softmax"][0].data_seed == by_model["linear"][0].data_seed:
        a, b = counts["softmax"], counts["linear"]
        out["diff"] = {
            k: cmp.sequence_bootstrap_ci(b[k][0] - a[k][0], b[k][1], cc.confidence, cc.bootstrap_samples)
            for k in sorted(a.keys() & b.keys())
        }
    return out


def _accuracy_counts(
    model: Transformer, ev: EvalSet, train_len: int, batch_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (correct, targets) per sequence, for the accuracies a sequence bootstrap can resample."""
    test = ev.splits["test"]
    correct, _, _ = cmp.predict(model, test, batch_size)
    valid = cmp.valid_targets(test)
    out = {"eval/test/accuracy": cmp.sequence_counts(correct, valid)}
    if test.ceilings is not None and bool((sure := valid & (test.ceilings >= 1 - 1e-9)).any()):
        out["eval/test/accuracy_predictable"] = cmp.sequence_counts(correct, sure)
    for f, split in ev.long.items():
        correct, _, _ = cmp.predict(model, split, batch_size)
        beyond = cmp.valid_targets(split) & (torch.arange(1, split.tokens.shape[1]) >= train_len)[None, :]
        if bool(beyond.any()):
            out[f"lengen/x{f}/beyond/accuracy"] = cmp.sequence_counts(correct, beyond)
    return out


def _report(
    cfg: CompareConfig,
    inp: Inputs,
    by_model: dict[str, list[Member]],
    summary: Summary,
    efficiency: cmp.Efficiency | None,
    figures: list[tuple[str, str]],
    parent_id: str,
    seconds: float,
) -> str:
    cc = cfg.compare
    return cmp.render_report(
        cmp.ReportInput(
            title="picollm: softmax vs linear attention",
            mode=inp.mode,
            parent_run_id=parent_id,
            seconds=seconds,
            setup=_setup_lines(cfg, inp.mode, inp.data_cfg, inp.data_source, by_model, summary.params),
            runs={att: [m.label for m in ms] for att, ms in by_model.items()},
            families=inp.families,
            factors=cc.length_factors,
            train_len=inp.train_len,
            agg=summary.agg,
            diffs=summary.diffs,
            rows=summary.rows,
            alpha=cc.alpha,
            ci_text=_ci_text(cfg),
            coverage=inp.coverage,
            efficiency=efficiency,
            figures=figures,
            extra=_reproduction_section(inp.members) if inp.mode == "registry" else [],
            test=cc.test,
            seq_ci=summary.seq_ci,
        )
    )


def _efficiency(parent: RunLog, cfg: CompareConfig, archs: dict[str, ModelConfig], say: Say) -> cmp.Efficiency | None:
    """Both attentions timed side by side (training steps, generation, peak memory), logged by length."""
    e = cfg.efficiency
    if not e.enabled:
        return None
    with torch_threads(e.num_threads):
        longest = max(e.lengths + e.gen_contexts) + e.gen_tokens + 8
        models = cmp.efficiency_models(archs, longest)
        batches = {n: max(1, e.tokens_per_step // n) for n in e.lengths}
        eff = cmp.Efficiency(e.lengths, batches, e.gen_contexts, torch.get_num_threads())
        say(f"efficiency: training steps at N = {e.lengths}")
        eff.step_ms = cmp.time_train_steps(models, e.lengths, e.tokens_per_step, e.warmup_steps, e.timed_steps)
        say(f"efficiency: generation at contexts {e.gen_contexts}")
        eff.prefill_ms, eff.gen_ms_per_token = cmp.time_generation(models, e.gen_contexts, e.gen_tokens)
        if e.memory:
            say("efficiency: peak memory, one fresh process per (model, length)")
            eff.memory = {
                att: {n: cmp.measure_step_memory(m.cfg, n, batches[n]) for n in e.lengths} for att, m in models.items()
            }
    for (name, step), value in eff.metrics().items():
        if math.isfinite(value):
            parent.log_metrics({name: value}, step)
    parent.flush()
    return eff


def _figures(
    parent: RunLog,
    cfg: CompareConfig,
    by_model: dict[str, list[Member]],
    agg: Any,
    inp: Inputs,
    efficiency: cmp.Efficiency | None,
) -> list[tuple[str, str]]:
    """The comparison's figures, logged to the parent run: [(caption, artifact path)]."""
    cc = cfg.compare
    families, train_len = inp.families, inp.train_len
    out: list[tuple[str, str]] = []

    def put(fig, path: str, caption: str) -> None:
        parent.log_figure(fig, path)
        out.append((caption, path))

    histories = {att: [m.history for m in ms if m.history] for att, ms in by_model.items()}
    if any(histories.values()):
        put(cmp.loss_curves(histories), "figures/loss_curves.png", "Loss curves (seeds shaded min–max)")
    put(cmp.family_accuracy_ci(agg, families), "figures/accuracy_per_family.png", "Test accuracy per family, with CIs")
    put(
        cmp.position_accuracy(
            {att: [m.curves["eval/test/accuracy_by_position"] for m in ms] for att, ms in by_model.items()},
            cc.confidence,
            train_len,
        ),
        "figures/accuracy_by_position.png",
        "Test accuracy by position",
    )
    big = max(cc.length_factors)
    pos = {att: [m.curves[f"lengen/x{big}/accuracy_by_position"] for m in ms] for att, ms in by_model.items()}
    put(
        cmp.length_curves(agg, cc.length_factors, train_len, families, pos, cc.confidence),
        "figures/length_generalisation.png",
        "Length generalisation (training length marked)",
    )
    if efficiency is not None:
        put(cmp.efficiency_figure(efficiency), "figures/efficiency.png", "Efficiency vs sequence / context length")
    first = {att: ms[0].model for att, ms in by_model.items()}
    family = families[0]
    for att, fig in cmp.attention_figures(
        first, inp.splits["test"], family, cc.attention_positions, cfg.train.eval_batch_size
    ).items():
        put(
            fig,
            f"figures/attention_{att}.png",
            f"Attention of the {att} model ({by_model[att][0].label}), test sequences of family '{family}' "
            "(same sequences for both models, colour scale fixed to [0, 1])",
        )
    figs, emb = cmp.embedding_figures(first)
    parent.log_metrics({f"embeddings/{k}/{att}": v for att, m in emb.items() for k, v in m.items() if math.isfinite(v)})
    for att, fig in figs.items():
        put(
            fig,
            f"figures/embeddings_{att}.png",
            f"Embedding PCA of the {att} model ({by_model[att][0].label}) beside a random init",
        )
    return out


def _ci_text(cfg: CompareConfig) -> str:
    c = cfg.compare
    pct = f"{100 * c.confidence:g} %"
    if c.ci == "t":
        return f"{pct} Student-t interval (mean ± t·s/√n)"
    return f"{pct} percentile bootstrap interval of the mean ({c.bootstrap_samples} resamples)"


def _setup_lines(
    cfg: CompareConfig,
    mode: str,
    d: DataConfig,
    data_source: str,
    by_model: dict[str, list[Member]],
    params: dict[str, int],
) -> list[str]:
    archs = {att: ms[0].model.cfg for att, ms in by_model.items()}
    a, b = archs["softmax"], archs["linear"]
    same_prior = a.pos_encoding == b.pos_encoding
    seeds = sorted({m.data_seed for ms in by_model.values() for m in ms})
    draws = f"data seed {seeds[0]}" if len(seeds) == 1 else f"data seeds {seeds} (each pair on its own draw)"
    lines = [
        f"Data (from {data_source}): families {', '.join(d.seq_types)}; {d.n_train}/{d.n_val}/{d.n_test} sequences "
        f"per family (train/val/test), lengths {d.min_len}–{d.max_len}, values mod {d.modulus}, {draws}; "
        "generator-disjoint splits.",
        f"Architecture: d_model {a.d_model}, {a.n_layers} layer(s), {a.n_heads} heads"
        + (
            ""
            if (a.d_model, a.n_layers, a.n_heads) == (b.d_model, b.n_layers, b.n_heads)
            else f" (linear: d_model {b.d_model}, {b.n_layers} layer(s), {b.n_heads} heads)"
        )
        + ".",
        f"Parameters: softmax {params['softmax']:,}, linear {params['linear']:,}"
        + (" (matched)." if params["softmax"] == params["linear"] else " (NOT matched)."),
        f"Positional prior: softmax {a.pos_encoding}, linear {b.pos_encoding}"
        + (
            " (the same prior: ALiBi slopes m_h for softmax, decay exp(-m_h) for linear)."
            if same_prior and a.pos_encoding == "alibi"
            else " (the same)."
            if same_prior
            else " (DIFFERENT)."
        ),
    ]
    if mode == "train":
        t = cfg.train
        lines.append(
            f"Training: {t.epochs} epochs, batch {t.batch_size}, lr {t.lr}, seeds {cfg.compare.seeds} "
            "(both models get each seed)."
        )
    else:
        for att, ms in by_model.items():
            lines.append(f"{att}: " + ", ".join(m.label for m in ms) + " (loaded, evaluated only).")
    return lines


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
                    [
                        f"{m.attention} {m.label}",
                        key,
                        f"{logged[key]:.6f}",
                        f"{now:.6f}",
                        f"{abs(now - logged[key]):.2e}",
                    ]
                )
    if not rows:
        return []
    table = cmp.md_table(["model", "metric", "logged by its training run", "measured here", "|difference|"], rows)
    return ["## Reproduction of the training runs' metrics\n\n" + "\n".join(table)]
