"""The sections of `picollm analyze` that ask which component computes the answer, and how:
activation patching, the logit lens, linear probes, head detection and the interactive HTML view.

Each section is one small function over picollm.interp (which does the work through hook points);
here only metrics, tables and figures are named and logged. Metric names line up across models in
MLflow's compare view: `patching/L1/mlp/arithmetic`, `logit_lens/L0/accuracy/counting`,
`probe/L1/value/accuracy`, `heads/L0H1/previous_token`. Long tails (every position, every
neuron) go to tables, not metrics.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from picollm.config import AnalysisConfig, DataConfig
from picollm.interp import analysis as an
from picollm.interp import head_detector as hd
from picollm.interp import html_view, logit_lens, patching, playground, probes, prompts
from picollm.interp import plots as ip
from picollm.interp.analysis import Batch
from picollm.model.hooks import act_name
from picollm.model.transformer import Transformer
from picollm.tracking.runs import RunLog

log = logging.getLogger(__name__)


def random_baseline(model: Transformer, seed: int) -> Transformer:
    """Same config, random weights: what "no learned structure" looks like."""
    torch.manual_seed(seed)
    return Transformer(model.cfg).to(model.device).eval()


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def _metric_component(component: str) -> str:
    """ "L0H1" -> "L0H1", "L0 mlp" -> "L0/mlp": heads and layer parts in one hierarchy."""
    return component.replace(" ", "/")


# --------------------------------------------------------------------------------------------------
# Activation patching


def _patch_families(
    model: Transformer, batch: Batch, data_cfg: DataConfig, cfg: AnalysisConfig, run: RunLog
) -> dict[str, patching.PatchingResult]:
    """Patch every family's prompt pairs, logging the per-family metrics; families without pairs are left out."""
    length = min(cfg.patching_length, data_cfg.max_len - 1)
    results: dict[str, patching.PatchingResult] = {}
    for i, family in enumerate(batch.families):
        gens = [batch.generators[int(r)] for r in batch.rows(i)] if batch.generators else []
        pairs = prompts.patching_pairs(family, gens, length, data_cfg, cfg.patching_pairs, seed=cfg.seed + i)
        if pairs is None:
            log.warning("patching: no usable %s prompt pairs; skipped", family)
            continue
        results[family] = res = patching.patch_all(model, pairs)
        metrics = {f"patching/clean_ld/{family}": res.clean_ld, f"patching/corrupted_ld/{family}": res.corrupted_ld}
        metrics |= {
            f"patching/{_metric_component(c)}/{family}": float(v)
            for c, v in zip(res.components, res.component_recovered, strict=True)
        }
        # The residual at the last position (the one that is read out), per block input; the rest is a table.
        metrics |= {
            f"patching/L{s}/resid_pre_last/{family}": float(res.resid[s, -1]) for s in range(model.cfg.n_layers)
        }
        run.log_metrics(metrics)
    return results


def section_patching(
    model: Transformer, batch: Batch, data_cfg: DataConfig, cfg: AnalysisConfig, run: RunLog
) -> list[str]:
    results = _patch_families(model, batch, data_cfg, cfg, run)
    if not results:
        return ["patching: no prompt pairs"]
    families = list(results)
    comps = next(iter(results.values())).components
    matrix = torch.stack([r.component_recovered for r in results.values()], 1)  # (C, F)
    run.log_table(
        _columns(
            [
                {"component": c, "family": f, "recovered": float(matrix[j, k])}
                for j, c in enumerate(comps)
                for k, f in enumerate(families)
            ]
        ),
        "patching/components.json",
    )
    run.log_table(
        _columns(
            [
                {"family": f, "site": site, "position": p, "recovered": float(r.resid[s, p])}
                for f, r in results.items()
                for s, site in enumerate(r.resid_sites)
                for p in range(r.resid.shape[1])
            ]
        ),
        "patching/resid.json",
    )
    att = model.cfg.attention
    title = f"{att}: logit difference recovered by patching each component (all positions)"
    run.log_figure(
        ip.matrix_figure(matrix, comps, families, title, "recovered", -1.0, 1.0, "RdBu_r"), "patching/components.png"
    )
    for start in range(0, len(families), 4):  # at most four panels a figure
        chunk = {f: (results[f].resid_sites, results[f].resid) for f in families[start : start + 4]}
        run.log_figure(ip.patching_resid_figure(chunk, att), f"patching/resid_{start // 4 + 1}.png")
    best = []
    for k, f in enumerate(families):
        j = int(matrix[:, k].argmax())
        best.append(f"{f} {comps[j]} ({float(matrix[j, k]):.2f})")
    return ["patching: component recovering most of the logit difference per family: " + ", ".join(best)]


# --------------------------------------------------------------------------------------------------
# Logit lens


def section_logit_lens(model: Transformer, batch: Batch, cfg: AnalysisConfig, run: RunLog) -> list[str]:
    res = logit_lens.logit_lens(
        model, batch.tokens, batch.family_ids, batch.families, cfg.batch_size, targets=batch.targets
    )
    for s, site in enumerate(res.sites):
        for g, group in enumerate(res.groups):
            run.log_metrics(
                {
                    f"logit_lens/{site}/accuracy/{group}": float(res.accuracy[s, g]),
                    f"logit_lens/{site}/loss/{group}": float(res.loss[s, g]),
                }
            )
    rows = [
        {"site": site, "family": group, "accuracy": float(res.accuracy[s, g]), "loss": float(res.loss[s, g])}
        for s, site in enumerate(res.sites)
        for g, group in enumerate(res.groups)
    ]
    run.log_table(_columns(rows), "logit_lens/logit_lens.json")
    run.log_figure(
        ip.lens_figure(res.sites, res.groups, res.accuracy, res.loss, model.cfg.attention), "logit_lens/logit_lens.png"
    )
    per_site = ", ".join(f"{site} {float(res.accuracy[s, -1]):.2f}" for s, site in enumerate(res.sites))
    return [f"logit lens: next-token accuracy of each layer's residual, all families: {per_site}"]


# --------------------------------------------------------------------------------------------------
# Linear probes


Targets = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # name -> (rows, positions, labels)


def probe_targets(batch: Batch) -> Targets:
    """Per target: (row, position) index pairs and labels. `value` is the current token at every real
    position; `step` / `ratio` the arithmetic step / geometric ratio at positions >= 1 (two tokens fix
    them); `family` the family at positions >= 3 (before that, families look alike: 0, 1 may be
    counting, arithmetic with step 1, a walk or an alternation)."""
    lengths = batch.lengths
    pos = torch.arange(batch.tokens.shape[1])
    real = pos[None, :] < lengths[:, None]
    rows, cols = torch.nonzero(real, as_tuple=True)
    out = {"value": (rows, cols, batch.tokens[rows, cols])}
    known = cols >= 3
    out["family"] = (rows[known], cols[known], batch.family_ids[rows[known]])
    later = cols >= 1
    for target, family in (("step", "arithmetic"), ("ratio", "geometric")):
        if family not in batch.families or not batch.generators:
            continue
        keep = later & (batch.family_ids[rows] == batch.families.index(family))
        labels = torch.tensor([batch.generators[int(r)][target] for r in rows[keep]], dtype=torch.long)
        if len(labels.unique()) > 1:
            out[target] = (rows[keep], cols[keep], labels)
    return out


def _probe_model(
    model: Transformer, batch: Batch, cfg: AnalysisConfig, targets: Targets
) -> dict[tuple[str, str], probes.ProbeResult]:
    sites = logit_lens.lens_sites(model.cfg.n_layers)
    cache = an.run_cached(model, batch.tokens, [name for _, name in sites], cfg.batch_size)
    out = {}
    for site, name in sites:
        for target, (rows, cols, labels) in targets.items():
            train = probes.group_split(rows, cfg.probe_train_fraction, seed=cfg.seed)
            out[site, target] = probes.fit_probe(
                cache[name][rows, cols],
                labels,
                train,
                cfg.probe_kind,
                cfg.probe_lambda,
                cfg.probe_steps,
                cfg.probe_lr,
                cfg.seed,
            )
    return out


def section_probes(model: Transformer, batch: Batch, cfg: AnalysisConfig, run: RunLog) -> list[str]:
    targets = probe_targets(batch)
    trained = _probe_model(model, batch, cfg, targets)
    random = _probe_model(random_baseline(model, cfg.seed), batch, cfg, targets)
    sites = [s for s, _ in logit_lens.lens_sites(model.cfg.n_layers)]
    names = list(targets)
    rows = []
    for site in sites:
        for target in names:
            t, r = trained[site, target], random[site, target]
            run.log_metrics(
                {
                    f"probe/{site}/{target}/accuracy": t.test_accuracy,
                    f"probe/random/{site}/{target}/accuracy": r.test_accuracy,
                }
            )
            rows.append(
                {
                    "site": site,
                    "target": target,
                    "accuracy": t.test_accuracy,
                    "random_init_accuracy": r.test_accuracy,
                    "train_accuracy": t.train_accuracy,
                    "majority_class": t.chance,
                    "classes": t.n_classes,
                    "n_train": t.n_train,
                    "n_test": t.n_test,
                }
            )
    run.log_table(_columns(rows), "probes/probes.json")

    def grid(results, what: str) -> torch.Tensor:
        return torch.tensor([[getattr(results[s, t], what) for t in names] for s in sites])

    for start in range(0, len(names), 4):
        part = names[start : start + 4]
        idx = [names.index(n) for n in part]
        fig = ip.probe_figure(
            sites,
            part,
            grid(trained, "test_accuracy")[:, idx],
            grid(random, "test_accuracy")[:, idx],
            grid(trained, "chance")[:, idx],
            model.cfg.attention,
        )
        run.log_figure(fig, f"probes/probes_{start // 4 + 1}.png")
    last = sites[-1]
    txt = ", ".join(
        f"{t} {trained[last, t].test_accuracy:.2f} (random {random[last, t].test_accuracy:.2f})" for t in names
    )
    return [f"probes ({cfg.probe_kind}) held-out accuracy at {last}: {txt}"]


# --------------------------------------------------------------------------------------------------
# Head detector


def section_heads(model: Transformer, cfg: AnalysisConfig, run: RunLog) -> list[str]:
    n_values = (model.cfg.vocab_size or 2) - 1
    length = cfg.detector_length
    if model.cfg.pos_encoding == "learned":
        length = min(length, model.cfg.max_seq_len)
    plain = prompts.random_tokens(cfg.detector_sequences, length, n_values, cfg.seed)
    repeated = prompts.repeated_tokens(cfg.detector_sequences, length // 2, n_values, cfg.seed + 1)
    scores = hd.detect_heads(model, plain, repeated, cfg.max_k_back, cfg.batch_size)
    detectors = list(scores)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [f"L{i}H{j}" for i in range(n_layers) for j in range(n_heads)]
    matrix = torch.stack([scores[d].flatten() for d in detectors], 1)  # (L * H, D)
    run.log_metrics(
        {f"heads/{h}/{d}": float(matrix[i, k]) for i, h in enumerate(heads) for k, d in enumerate(detectors)}
    )
    run.log_metrics({f"heads/max/{d}": float(matrix[:, k].max()) for k, d in enumerate(detectors)})
    run.log_table({"head": heads, **{d: matrix[:, k].tolist() for k, d in enumerate(detectors)}}, "heads/heads.json")
    title = f"{model.cfg.attention}: head-detector scores (share of attention on the marked keys)"
    run.log_figure(ip.matrix_figure(matrix, heads, detectors, title, "score", 0.0, 1.0), "heads/detectors.png")
    top = []
    for k, d in enumerate(detectors):
        i = int(matrix[:, k].argmax())
        top.append(f"{d} {heads[i]} ({float(matrix[i, k]):.2f})")
    return ["heads: top score per detector: " + ", ".join(top)]


# --------------------------------------------------------------------------------------------------
# Interactive view


def section_interactive(model: Transformer, batch: Batch, cfg: AnalysisConfig, run: RunLog, label: str) -> list[str]:
    examples = []
    for i, family in enumerate(batch.families):
        for r in batch.rows(i)[: cfg.interactive_per_family].tolist():
            n = min(int(batch.lengths[r]), cfg.interactive_positions)
            tokens = batch.tokens[r : r + 1, :n]
            examples.append(html_view.Example(family, tokens[0].tolist(), hd.head_patterns(model, tokens)[0]))
    names = [act_name("post", i) for i in range(model.cfg.n_layers)]
    cache = an.run_cached(model, batch.tokens, names, cfg.batch_size)
    real = an.query_mask(batch.lengths, batch.tokens.shape[1])
    fam_pos = batch.family_ids[:, None].expand_as(real)[real]
    neurons = []
    for layer, name in enumerate(names):
        st = an.neuron_stats(cache[name][real], fam_pos, len(batch.families), cfg.activation_shift, cfg.dead_threshold)
        for n in torch.nonzero(~st.dead).flatten().tolist():
            pref = batch.families[int(st.means[:, n].argmax())]
            neurons.append(html_view.NeuronRow(layer, n, st.means[:, n].tolist(), float(st.si[n]), pref))
    page = html_view.render(
        html_view.ViewData(
            label,
            model.cfg.attention,
            model.blocks[0].attn.pattern_label,
            batch.families,
            examples,
            neurons,
            playground.build(model, examples[0].tokens if examples else None),
        )
    )
    refs = html_view.external_refs(page)
    if refs:  # a bug here, never the user's input: refuse to log a page that would reach out
        raise AssertionError(f"interactive view references external resources: {refs[:3]}")
    run.log_text(page, "interactive/attention.html")
    return [f"interactive: interactive/attention.html ({len(examples)} examples, {len(neurons)} live neurons)"]
