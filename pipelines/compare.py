"""Flow: softmax vs linear attention, side by side, as one parent MLflow run with a child per model run.

Train mode (compare.baseline/linear null): for every seed, both models are trained by the training
flow as nested child runs, on the same data, with the same seed and the same architecture apart from
the attention (so equal parameter counts and the same positional prior). Registry mode: the models
named by compare.baseline / compare.linear are loaded and only evaluated, each in its own child run,
on the data of their training runs.

Every child is then evaluated the same way (eval/..., lengen/...); the parent logs mean, CI and
Welch p of every metric, the efficiency sweep, the figures and report.md. Everything that can fail on
the user's input (config, references, data) is checked before the parent run starts.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from picollm import compare as cmp
from picollm import distributed, registry, tracking
from picollm.config import (
    CompareConfig,
    DataConfig,
    ModelConfig,
    TrackingConfig,
    TrainRunConfig,
    flatten,
    read_yaml,
    to_yaml,
    validate,
)
from picollm.data import PaddedSplit, SyntheticData, build_data, to_padded
from picollm.errors import PicollmError
from picollm.model import Transformer
from pipelines import train as train_flow

log = logging.getLogger(__name__)

SOURCE_CONFIG = "config.yaml"  # what the training flow logs with its run
Say = Callable[[str], None]


@dataclass
class Member:
    """One model run of the comparison: a child run, its model and what it measured."""

    attention: str
    label: str  # seed<k> or the model reference
    model: Transformer
    run_id: str = ""
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
# Registry mode: resolving references and the data they were trained on


def _source_run(ref: str) -> tuple[str, str, str | None]:
    """(pinned URI, label, source run id) of a reference; ModelNotFoundError if it names nothing."""
    uri = registry.resolve_model_uri(ref)
    info = registry.model_version_of(ref)
    if info is not None:  # pin the version: an alias could move while we work
        return f"models:/{info['name']}/{info['version']}", f"{info['name']}-v{info['version']}", info["run_id"] or None
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/")[0]
        return uri, f"run-{run_id[:8]}", run_id
    try:  # models:/m-<id>: a logged model knows its run
        return uri, uri.removeprefix("models:/"), mlflow.get_logged_model(uri.removeprefix("models:/")).source_run_id
    except (MlflowException, AttributeError):
        return uri, uri.removeprefix("models:/"), None


def _source_config(run_id: str | None) -> TrainRunConfig | None:
    if not run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SOURCE_CONFIG, dst_path=tmp)
            return validate(TrainRunConfig, read_yaml(path), source=f"{SOURCE_CONFIG} of run {run_id}")
    except (MlflowException, OSError, PicollmError) as e:
        log.warning("run %s has no usable %s: %s", run_id, SOURCE_CONFIG, str(e).splitlines()[0][:200])
        return None


def _source_history(run_id: str | None) -> list[dict[str, float]]:
    """Per-epoch train/val loss of a training run, as the training flow's history records it."""
    if not run_id:
        return []
    client = MlflowClient()
    try:
        series = {
            k: sorted(client.get_metric_history(run_id, k), key=lambda m: m.step) for k in ("train/loss", "val/loss")
        }
    except MlflowException:
        return []
    n = min(len(v) for v in series.values())
    return [{"epoch": float(i + 1), **{k: v[i].value for k, v in series.items()}} for i in range(n)]


def _load_members(cfg: CompareConfig) -> tuple[list[Member], DataConfig, str]:
    members: list[Member] = []
    data_cfgs: dict[str, DataConfig] = {}
    for att, refs in (("softmax", cfg.compare.baseline), ("linear", cfg.compare.linear)):
        key = "baseline" if att == "softmax" else "linear"
        for ref in refs or []:
            uri, label, run_id = _source_run(ref)
            # not registry.load_model: it re-points MLflow at the default store, ignoring tracking.uri
            _, files = registry.download_model(uri)
            model = registry.load_from_files(files / registry.WEIGHTS_FILE, files / registry.CONFIG_FILE)
            if model.cfg.attention != att:
                raise PicollmError(f"compare.{key}: {ref} is a {model.cfg.attention}-attention model, expected {att}")
            members.append(Member(att, label, model, source_run_id=run_id, history=_source_history(run_id)))
            source = _source_config(run_id)
            if source is not None:
                data_cfgs[label] = source.data
    distinct = {d.model_dump_json() for d in data_cfgs.values()}
    if len(distinct) > 1:
        raise PicollmError(
            "compare: the referenced models were trained on different data ("
            + ", ".join(data_cfgs)
            + "); compare models trained on the same data config"
        )
    if data_cfgs:
        data_cfg, data_source = next(iter(data_cfgs.values())), "the referenced models' training runs"
    else:
        log.warning("no training config found for the referenced models: using the data section of the config")
        data_cfg, data_source = cfg.data, "the compare config (no training config found)"
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
    return members, data_cfg, data_source


# --------------------------------------------------------------------------------------------------
# Evaluating one member inside its child run


def _evaluate(
    member: Member, cfg: CompareConfig, splits: dict[str, PaddedSplit], long: dict[int, PaddedSplit], train_len: int
) -> None:
    bs = cfg.train.eval_batch_size
    metrics, curves = cmp.evaluate_model(member.model, splits, bs, cfg.compare.calibration_bins)
    lg_metrics, lg_curves = cmp.length_generalisation(member.model, long, train_len, bs)
    member.metrics = {**metrics, **lg_metrics, "model/num_params": float(member.model.num_params())}
    member.curves = {**curves, **lg_curves}
    logger = tracking.MetricLogger(member.run_id)
    logger.log(member.metrics, step=0)
    for name, curve in member.curves.items():  # step = position of the predicted token
        for i, v in enumerate(curve):
            if math.isfinite(v):
                logger.log({name: float(v)}, step=i + 1)
    logger.flush()


def _child_train_config(cfg: CompareConfig, att: str, seed: int) -> TrainRunConfig:
    raw = {
        "data": cfg.data.model_dump(mode="json"),
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


# --------------------------------------------------------------------------------------------------
# The flow


def run(cfg: CompareConfig, progress: Say | None = None) -> CompareOutcome:
    distributed.refuse_under_torchrun("compare")
    start = time.perf_counter()
    say: Say = progress or (lambda msg: log.info("%s", msg))
    tracking.init_tracking(cfg.tracking.uri)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    cc = cfg.compare

    # -- everything that can fail on the user's input, before the parent run exists
    mode = "registry" if cc.baseline else "train"
    child_cfgs: dict[tuple[str, int], TrainRunConfig] = {}
    if mode == "registry":
        members, data_cfg, data_source = _load_members(cfg)
    else:
        members, data_cfg, data_source = [], cfg.data, "the compare config"
        child_cfgs = {(att, s): _child_train_config(cfg, att, s) for s in cc.seeds for att in cmp.MODELS}
    data: SyntheticData = build_data(data_cfg)
    families, train_len = data.families, data_cfg.max_len
    pad = data_cfg.pad_id
    splits = {name: to_padded(s, pad, families) for name, s in data.splits().items()}
    say(f"drawing length-generalisation sequences ({', '.join(f'{f}x' for f in cc.length_factors)})")
    used = {s.tobytes() for split in data.splits().values() for s in split.sequences}
    long_raw = {f: cmp.long_sequences(data_cfg, f * train_len, cc.n_long, used) for f in sorted(cc.length_factors)}
    long = {f: to_padded(s, pad, families) for f, s in long_raw.items()}
    cov_long = {f: cmp.coverage(data.train, s, data_cfg.modulus) for f, s in long_raw.items()}
    coverage = {"test split": cmp.coverage(data.train, data.test, data_cfg.modulus)}
    coverage |= {f"{f}× ({f * train_len})": c for f, c in cov_long.items()}
    for name, c in coverage.items():
        if c["value_coverage"] < 1:  # e.g. a narrow data.start_range: long sequences reach unseen values
            log.warning("%s: only %.1f%% of the values occur in training", name, 100 * c["value_coverage"])

    run_name = cfg.tracking.run_name or f"compare-{mode}"
    tags = {"picollm.flow": "compare", "compare.mode": mode, "data.source": data_source}
    with tracking.tracked_run(cfg.tracking.experiment, run_name, tags=tags) as parent:
        parent_id = parent.info.run_id
        tracking.log_params(flatten(cfg.model_dump(mode="json")))
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        mlflow.log_text(to_yaml(data_cfg), "data_config.yaml")

        if mode == "train":
            for seed in cc.seeds:  # both models of a seed back to back: machine load hits them alike
                for att in cmp.MODELS:
                    label = f"seed{seed}"
                    say(f"training {att} {label} ({len(members) + 1}/{len(child_cfgs)})")
                    out = _train_child(child_cfgs[(att, seed)], _EpochLines(say, f"{att} {label}"))
                    assert out.model is not None
                    member = Member(att, label, out.model.cpu(), run_id=out.run_id, history=out.history)
                    with tracking.tracked_run(cfg.tracking.experiment, run_id=out.run_id, nested=True):
                        mlflow.set_tags({"compare.model": att, "compare.run": label, "compare.parent": parent_id})
                        _evaluate(member, cfg, splits, long, train_len)
                    members.append(member)
        else:
            client = MlflowClient()
            for member in members:
                say(f"evaluating {member.attention} {member.label}")
                ctags = {
                    "compare.model": member.attention,
                    "compare.run": member.label,
                    "model.attention": member.attention,
                }
                if member.source_run_id:
                    ctags["compare.source_run"] = member.source_run_id
                with tracking.tracked_run(
                    cfg.tracking.experiment, f"{member.attention}-{member.label}", tags=ctags, nested=True
                ) as child:
                    member.run_id = child.info.run_id
                    tracking.log_params(flatten(member.model.cfg.model_dump(mode="json"), prefix="model."))
                    _evaluate(member, cfg, splits, long, train_len)
                    if member.source_run_id:  # what the training run logged, beside what we measured
                        logged = client.get_run(member.source_run_id).data.metrics
                        same = {f"source/{k}": logged[k] for k in ("test/loss", "test/accuracy") if k in logged}
                        mlflow.log_metrics(same)

        by_model = {att: [m for m in members if m.attention == att] for att in cmp.MODELS}
        runs = {att: [m.metrics for m in ms] for att, ms in by_model.items()}
        agg = cmp.aggregate(runs, cc.confidence, cc.ci, cc.bootstrap_samples)
        pvals = cmp.p_values(runs)
        keys = cmp.headline_keys(cc.length_factors)
        rows = cmp.summary_rows(agg, pvals, keys, cc.alpha)
        metrics = cmp.aggregate_metrics(agg, pvals)
        for f, c in cov_long.items():
            metrics |= {f"lengen/x{f}/{k}": v for k, v in c.items()}
        params = {att: int(ms[0].model.num_params()) for att, ms in by_model.items()}
        metrics |= {f"{att}/num_params": float(n) for att, n in params.items()}
        logger = tracking.MetricLogger(parent_id)
        logger.log(metrics, step=0)
        for att, ms in by_model.items():  # position curves: mean over runs, step = position
            for name in ms[0].curves:
                mean, low, high = cmp.band([m.curves[name] for m in ms], cc.confidence)
                names = (f"{att}/{name}/mean", f"{att}/{name}/ci_low", f"{att}/{name}/ci_high")
                for i, values in enumerate(zip(mean, low, high, strict=True)):
                    point = {k: float(v) for k, v in zip(names, values, strict=True) if math.isfinite(v)}
                    logger.log(point, i + 1)
        logger.flush()

        efficiency = None
        if cfg.efficiency.enabled:
            efficiency = _efficiency(cfg, {att: ms[0].model.cfg for att, ms in by_model.items()}, say)
            eff_logger = tracking.MetricLogger(parent_id)
            for (name, step), value in efficiency.metrics().items():
                if math.isfinite(value):
                    eff_logger.log({name: value}, step)
            eff_logger.flush()

        say("drawing figures")
        figures = _figures(cfg, by_model, agg, splits, families, train_len, efficiency)
        setup = _setup_lines(cfg, mode, data_cfg, data_source, by_model, params)
        extra = _reproduction_section(members) if mode == "registry" else []
        seconds = time.perf_counter() - start
        report = cmp.render_report(
            cmp.ReportInput(
                title="picollm: softmax vs linear attention",
                mode=mode,
                parent_run_id=parent_id,
                seconds=seconds,
                setup=setup,
                runs={att: [m.label for m in ms] for att, ms in by_model.items()},
                families=families,
                factors=cc.length_factors,
                train_len=train_len,
                agg=agg,
                pvals=pvals,
                rows=rows,
                alpha=cc.alpha,
                ci_text=_ci_text(cfg),
                coverage=coverage,
                efficiency=efficiency,
                figures=figures,
                extra=extra,
            )
        )
        mlflow.log_text(report, "report.md")
        mlflow.log_metric("compare/seconds", seconds)
    artifacts = ["config.yaml", "data_config.yaml", "report.md", *(path for _, path in figures)]
    return CompareOutcome(parent_id, mode, members, rows, report, metrics, seconds, artifacts)


def _train_child(child_cfg: TrainRunConfig, ui: _EpochLines) -> train_flow.TrainOutcome:
    return train_flow.run(child_cfg, ui=ui, nested=True)


def _efficiency(cfg: CompareConfig, archs: dict[str, ModelConfig], say: Say) -> cmp.Efficiency:
    e = cfg.efficiency
    threads = torch.get_num_threads()
    if e.num_threads:
        torch.set_num_threads(e.num_threads)
    try:
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
        return eff
    finally:
        torch.set_num_threads(threads)


def _figures(
    cfg: CompareConfig,
    by_model: dict[str, list[Member]],
    agg: cmp.Aggregate,
    splits: dict[str, PaddedSplit],
    families: list[str],
    train_len: int,
    efficiency: cmp.Efficiency | None,
) -> list[tuple[str, str]]:
    cc = cfg.compare
    out: list[tuple[str, str]] = []

    def put(fig, path: str, caption: str) -> None:
        mlflow.log_figure(fig, path)
        cmp.close(fig)
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
        first, splits["test"], family, cc.attention_positions, cfg.train.eval_batch_size
    ).items():
        put(
            fig,
            f"figures/attention_{att}.png",
            f"Attention of the {att} model ({by_model[att][0].label}), test sequences of family '{family}' "
            "(same sequences for both models, colour scale fixed to [0, 1])",
        )
    figs, emb = cmp.embedding_figures(first)
    mlflow.log_metrics({f"{att}/embeddings/{k}": v for att, m in emb.items() for k, v in m.items() if math.isfinite(v)})
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
    lines = [
        f"Data (from {data_source}): families {', '.join(d.seq_types)}; {d.n_train}/{d.n_val}/{d.n_test} sequences "
        f"per family (train/val/test), lengths {d.min_len}–{d.max_len}, values mod {d.modulus}, data seed {d.seed}; "
        "content-disjoint splits.",
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
