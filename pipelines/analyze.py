"""Flow: interpretability report of one trained model, as one MLflow run in the analysis experiment.

The model reference is resolved, the model loaded and the data regenerated (from the source training
run's `config.yaml`) before the run starts, so a wrong reference or bad setting leaves no run behind.
Every section reads the model through its hook points (picollm.analysis; patching, logit lens,
probes, head detection and the interactive view are the sections of picollm/interp/sections.py
over picollm.interp); figures, tables and metrics are artifacts and metrics of the analysis run, which is
tagged with the model it analysed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from picollm.config import (
    ANALYSIS_SECTIONS,
    AnalysisConfig,
    DataConfig,
    apply_overrides,
    flatten,
    read_yaml,
    to_yaml,
    validate,
)
from picollm.errors import ConfigError, PicollmError
from picollm.interp import analysis as an
from picollm.interp import analysis_plots as ap
from picollm.interp import sections as ai
from picollm.interp.analysis import Batch, analysis_batch
from picollm.model.hooks import act_name
from picollm.model.transformer import Transformer
from picollm.tracking import notes, registry, runs
from picollm.tracking.runs import BOOKKEEPING, RunLog
from picollm.training.progress import FlowProgress, as_progress

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("configs/analysis.yaml")


# --------------------------------------------------------------------------------------------------
# Config


def load_config(
    model_ref: str, config: Path | None = None, overrides: list[str] | None = None, what: str | None = None
) -> AnalysisConfig:
    """The CLI's inputs as one validated config. `config` None = configs/analysis.yaml when it exists
    (relative to the cwd), else the schema defaults; `what` is a comma-separated list of sections."""
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    raw = read_yaml(config) if config is not None else {}
    raw = apply_overrides(raw, overrides or [])
    raw["model"] = model_ref  # set directly, not as a YAML override: a run id could parse as a number
    if what is not None:
        raw["what"] = [w.strip() for w in what.split(",") if w.strip()]
    return validate(AnalysisConfig, raw, source=str(config) if config is not None else "config")


# --------------------------------------------------------------------------------------------------
# Resolving the model and its data


def source_data_config(source: registry.ResolvedModel, vocab_size: int) -> tuple[DataConfig, str]:
    """The data config of the training run (so the analysis sees the data the model was trained and
    tested on); DataConfig defaults with the model's vocabulary when the run has none."""
    trained = source.training_config()
    if trained is not None:
        if trained.data.vocab_size == vocab_size:
            return trained.data, f"run {source.run_id}"
        log.warning(
            "data.vocab_size %d of run %s differs from the model's %d; using defaults",
            trained.data.vocab_size,
            source.run_id,
            vocab_size,
        )
    try:
        return DataConfig(vocab_size=vocab_size), "defaults"
    except ValueError:
        raise ConfigError(f"no data config for a model with vocab_size {vocab_size}") from None


# --------------------------------------------------------------------------------------------------
# Sections


def section_embeddings(model: Transformer, cfg: AnalysisConfig, run: RunLog, label: str) -> list[str]:
    trained = an.analyse_embeddings(an.number_embeddings(model), an.number_tokens(model))
    torch.manual_seed(cfg.seed)
    baseline = Transformer(model.cfg).to(model.device)  # same config, random weights: what "no structure" looks like
    random = an.analyse_embeddings(an.number_embeddings(baseline), an.number_tokens(baseline))
    run.log_metrics({f"embeddings/{k}": v for k, v in trained.metrics.items()})
    run.log_metrics({f"embeddings/random/{k}": v for k, v in random.metrics.items()})
    run.log_figure(ap.embeddings_pca_figure(trained, random, label), "embeddings/pca.png")
    run.log_figure(ap.embeddings_spectrum_figure(trained, random, label), "embeddings/spectrum.png")
    k = min(3, trained.coords.shape[1])
    pca = [
        {
            "value": int(v),
            **{f"pc{j + 1}": float(trained.coords[i, j]) for j in range(k)},
            **{f"random_pc{j + 1}": float(random.coords[i, j]) for j in range(k)},
        }
        for i, v in enumerate(trained.values)
    ]
    run.log_csv(pca, "embeddings/pca.csv")
    t, r = trained.metrics, random.metrics
    return [
        f"embeddings: |corr(PC, n)| best of PC1-3 {t['max_pc_value_corr']:.2f} (PC{t['max_pc_value_corr_index']:.0f}; "
        f"random {r['max_pc_value_corr']:.2f}), |corr(PC1, n)| {t['pc1_value_corr']:.2f}, "
        f"top-2 variance {t['explained_var_top2']:.0%} (random {r['explained_var_top2']:.0%}), "
        f"cos(n, n+1) {t['neighbour_cos']:.2f} (random {r['neighbour_cos']:.2f})"
    ]


def section_attention(model: Transformer, batch: Batch, cfg: AnalysisConfig, run: RunLog) -> list[str]:
    n_layers = model.cfg.n_layers
    names = [act_name("pattern", i) for i in range(n_layers)]
    cache = an.run_cached(model, batch.tokens, names, cfg.batch_size)
    patterns = torch.stack([cache[n] for n in names], 1)  # (B, L, H, N, N)
    ks = range(1, cfg.max_k_back + 1)
    columns = ["entropy", "prev_token", *[f"k_back_{k}" for k in ks if k > 1], "pos0"]
    rows: list[dict[str, Any]] = []
    groups = [("all", torch.arange(len(batch.tokens)))] + [(f, batch.rows(i)) for i, f in enumerate(batch.families)]
    for family, idx in groups:
        for layer in range(n_layers):
            scores = an.head_scores(patterns[idx, layer], batch.lengths[idx], cfg.max_k_back)
            for head in range(model.cfg.n_heads):
                rows.append(
                    {
                        "family": family,
                        "layer": layer,
                        "head": f"L{layer}H{head}",
                        **{c: float(scores[c][head]) for c in columns},
                    }
                )
    overall = [r for r in rows if r["family"] == "all"]
    run.log_metrics({f"attention/{r['head']}/{c}": r[c] for r in overall for c in columns})
    run.log_metrics(
        {
            "attention/mean_entropy": sum(r["entropy"] for r in overall) / len(overall),
            "attention/max_prev_token": max(r["prev_token"] for r in overall),
        }
    )
    run.log_csv(rows, "attention/head_scores.csv")
    run.log_figure(ap.head_scores_figure(overall, columns, model.cfg.attention), "attention/head_scores.png")

    p = cfg.attention_positions
    for i, family in enumerate(batch.families):
        idx = batch.rows(i)
        lengths = batch.lengths[idx]
        long_enough = torch.nonzero(lengths >= p).flatten()
        ex = int(idx[long_enough[0]] if len(long_enough) else idx[lengths.argmax()])
        pe = min(p, int(batch.lengths[ex]))
        example = patterns[ex, :, :, :pe, :pe]
        mean = torch.stack([an.mean_pattern(patterns[idx, layer], lengths, p) for layer in range(n_layers)])
        tokens = batch.tokens[ex, :pe].tolist()
        fig = ap.attention_figure(family, example, tokens, mean, len(idx), model.cfg.attention)
        run.log_figure(fig, f"attention/{family}.png")

    prev = sorted((r for r in overall if r["prev_token"] >= 0.5), key=lambda r: -r["prev_token"])
    prev_txt = ", ".join(f"{r['head']} ({r['prev_token']:.2f})" for r in prev) or "none above 0.5"
    return [
        f"attention: mean normalised entropy {run.metrics['attention/mean_entropy']:.2f}; "
        f"previous-token heads: {prev_txt}"
    ]


def section_activations(model: Transformer, batch: Batch, cfg: AnalysisConfig, run: RunLog) -> list[str]:
    names = [act_name("post", i) for i in range(model.cfg.n_layers)]
    cache = an.run_cached(model, batch.tokens, names, cfg.batch_size)
    real = an.query_mask(batch.lengths, batch.tokens.shape[1])
    fam_pos = batch.family_ids[:, None].expand_as(real)[real]  # family of every real position
    n_fam = len(batch.families)
    table: list[dict[str, Any]] = []
    candidates: list[tuple[float, str, torch.Tensor]] = []
    all_dead = total = 0
    for layer, name in enumerate(names):
        st = an.neuron_stats(cache[name][real], fam_pos, n_fam, cfg.activation_shift, cfg.dead_threshold)
        alive = ~st.dead
        all_dead, total = all_dead + int(st.dead.sum()), total + len(st.dead)
        run.log_metrics(
            {
                f"activations/L{layer}/dead_fraction": float(st.dead.float().mean()),
                f"activations/L{layer}/si_mean": float(st.si[alive].mean()) if alive.any() else 0.0,
                f"activations/L{layer}/si_max": float(st.si[alive].max()) if alive.any() else 0.0,
                f"activations/L{layer}/eta2_mean": float(st.eta2[alive].mean()) if alive.any() else 0.0,
                f"activations/L{layer}/eta2_max": float(st.eta2[alive].max()) if alive.any() else 0.0,
            }
        )
        for n in range(len(st.si)):
            pref = batch.families[int(st.means[:, n].argmax())]
            table.append(
                {
                    "layer": layer,
                    "neuron": n,
                    **{f"mean_{f}": float(st.means[i, n]) for i, f in enumerate(batch.families)},
                    "preferred_family": pref,
                    "si": float(st.si[n]),
                    "eta2": float(st.eta2[n]),
                    "max_activation": float(st.max_act[n]),
                    "dead": bool(st.dead[n]),
                }
            )
            if not st.dead[n]:
                label = f"L{layer} N{n}  SI {float(st.si[n]):.2f}  η² {float(st.eta2[n]):.2f}  → {pref}"
                candidates.append((float(st.si[n]), label, st.means[:, n]))
        shift = st.shift
    run.log_metrics({"activations/dead_fraction": all_dead / max(total, 1)})
    run.log_csv(table, "activations/neurons.csv")
    top = sorted(candidates, key=lambda c: -c[0])[: cfg.top_neurons]
    if top:
        means = torch.stack([c[2] for c in top])
        fig = ap.neuron_heatmap([c[1] for c in top], means, batch.families, shift)
        run.log_figure(fig, "activations/selective_neurons.png")
    layers = ", ".join(
        f"L{i} SI {run.metrics[f'activations/L{i}/si_mean']:.2f} η² {run.metrics[f'activations/L{i}/eta2_mean']:.2f}"
        for i in range(len(names))
    )
    return [f"activations: dead {run.metrics['activations/dead_fraction']:.1%}; mean over alive neurons {layers}"]


def section_ablation(model: Transformer, batch: Batch, cfg: AnalysisConfig, run: RunLog) -> list[str]:
    res = an.mean_ablation(
        model, batch.tokens, batch.family_ids, len(batch.families), cfg.batch_size, targets=batch.targets
    )
    columns = [*batch.families, "all"]
    keys = [c.replace(" ", "_") for c in res.components]
    run.log_metrics({f"ablation/clean_loss/{c}": float(res.clean[j]) for j, c in enumerate(columns)})
    run.log_metrics(
        {f"ablation/{k}/{c}": float(res.delta[i, j]) for i, k in enumerate(keys) for j, c in enumerate(columns)}
    )
    rows = [{"component": k, **{c: float(res.delta[i, j]) for j, c in enumerate(columns)}} for i, k in enumerate(keys)]
    rows.append({"component": "clean_loss", **{c: float(res.clean[j]) for j, c in enumerate(columns)}})
    run.log_csv(rows, "ablation/delta_loss.csv")
    run.log_figure(
        ap.ablation_figure(res.components, columns, res.delta, model.cfg.attention), "ablation/delta_loss.png"
    )
    i, j = divmod(int(res.delta[:, :-1].argmax()), len(batch.families))
    return [
        f"ablation: clean loss {float(res.clean[-1]):.3f}; largest increase {res.components[i]} on "
        f"{batch.families[j]} ({float(res.delta[i, j]):+.3f})"
    ]


# --------------------------------------------------------------------------------------------------
# Flow


@dataclass
class AnalysisOutcome:
    run_id: str
    source: registry.ResolvedModel
    data_source: str
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run(cfg: AnalysisConfig, progress: FlowProgress | Callable[[str], None] | None = None) -> AnalysisOutcome:
    """The analysis run; `progress` gets its sections as the parts of a bar (picollm/training/progress.py)."""
    start = time.perf_counter()
    say = as_progress(progress)
    if not cfg.model:
        raise PicollmError("no model to analyse: give a model reference (e.g. picollm-linear@champion)")
    with runs.session("analyze", cfg.tracking, device=cfg.device, num_threads=cfg.num_threads) as s:
        # Everything that can fail on the user's input happens before the run starts: no run left behind.
        source = registry.resolve(cfg.model)
        model = source.load().to(s.device).eval()
        assert model.cfg.vocab_size is not None
        data_cfg, data_source = source_data_config(source, model.cfg.vocab_size)
        # Embeddings and head detection need no data (the detector builds its own inputs); the rest
        # read the same batch.
        needs_data = bool(set(cfg.what) - {"embeddings", "heads"})
        batch = analysis_batch(data_cfg, cfg.split, cfg.n_per_family, model.pad_id) if needs_data else None
        log.info("analysing %s (%s attention), data from %s", source.label, model.cfg.attention, data_source)

        run_name = cfg.tracking.run_name or f"analyze-{source.label.replace(' ', '-')}"
        tags = {"model.attention": model.cfg.attention, "data.source": data_source, **source.tags()}
        with s.run(
            run_name,
            config=cfg,
            config_path="analysis_config.yaml",
            param_prefix="analysis.",
            param_exclude={"tracking"},
            tags=tags,
        ) as tracked:
            tracked.log_params(flatten(model.cfg.model_dump(mode="json"), prefix="model_config."))
            tracked.log_text(to_yaml(data_cfg), "data_config.yaml")
            label = f"{source.label} ({model.cfg.attention})"
            summary = _sections(model, batch, data_cfg, cfg, tracked, label, say)
            seconds = time.perf_counter() - start
            tracked.log_metrics({f"{BOOKKEEPING}time/total_s": seconds})  # bookkeeping: charted last
            tracked.set_tags({notes.NOTE_TAG: "\n".join([f"analysis of {source.label}", *summary])})
            tracked.log_text("\n".join([f"model: {source.label} ({source.uri})", *summary]) + "\n", "summary.txt")
    return AnalysisOutcome(tracked.run_id, source, data_source, tracked.metrics, tracked.artifacts, summary, seconds)


def _sections(
    model: Transformer,
    batch: Batch | None,
    data_cfg: DataConfig,
    cfg: AnalysisConfig,
    run: RunLog,
    label: str,
    say: FlowProgress,
) -> list[str]:
    """The configured sections in a fixed order (whatever order `what` lists), each timed."""

    def data() -> Batch:
        assert batch is not None
        return batch

    sections: dict[str, Callable[[], list[str]]] = {
        "embeddings": lambda: section_embeddings(model, cfg, run, label),
        "attention": lambda: section_attention(model, data(), cfg, run),
        "activations": lambda: section_activations(model, data(), cfg, run),
        "ablation": lambda: section_ablation(model, data(), cfg, run),
        "patching": lambda: ai.section_patching(model, data(), data_cfg, cfg, run),
        "logit_lens": lambda: ai.section_logit_lens(model, data(), cfg, run),
        "probes": lambda: ai.section_probes(model, data(), cfg, run),
        "heads": lambda: ai.section_heads(model, cfg, run),
        "interactive": lambda: ai.section_interactive(model, data(), cfg, run, label),
    }
    assert tuple(sections) == ANALYSIS_SECTIONS  # the config's list (and the CLI's help) names these
    summary: list[str] = []
    chosen = [n for n in sections if n in cfg.what]
    say.plan(len(chosen), "sections")
    for name in chosen:
        say.part(name)
        t0 = time.perf_counter()
        with torch.no_grad():
            summary += sections[name]()
        run.log_metrics({f"{BOOKKEEPING}time/{name}_s": time.perf_counter() - t0})
    return summary
