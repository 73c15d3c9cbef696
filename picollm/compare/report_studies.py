"""The report sections of the comparison's studies: the learning-rate grid (which lr each variant got, and
from what), MQAR recall (answer accuracy per variant against the number of key-value pairs, and against
d_model) and what the rule families' test split tests (lookup or a new rule). Markdown text from plain numbers,
like `report`.
"""

from __future__ import annotations

import math

from picollm.compare.recall import SUCCESS, recalls, success_rate
from picollm.compare.recall_study import RecallStudy
from picollm.compare.report import md_table
from picollm.compare.stats import Aggregate, Interval
from picollm.compare.table import diff_cells, fmt_interval, holm_grid
from picollm.config import DataConfig
from picollm.data.generators import cut_rules


def lr_grid_section(rows: list[dict], chosen: dict[str, float], epochs: int) -> str:
    """The grid as a variant x lr table of validation scores, the chosen lr marked."""
    lrs = list(dict.fromkeys(r["lr"] for r in rows))
    metric = rows[0]["metric"] if rows else "-"
    score = {(r["variant"], r["lr"]): r["score"] for r in rows}
    table = []
    for v, best in chosen.items():
        cells = []
        for lr in lrs:
            x = score.get((v, lr), math.nan)
            text = f"{x:.4f}" if math.isfinite(x) else "diverged"
            cells.append(f"**{text}**" if lr == best else text)
        table.append([v, *cells, f"{best:g}"])
    direction = "higher" if "accuracy" in metric else "lower"
    lines = [
        "## Learning rate per variant",
        "",
        f"Before the seeded runs, every variant trained on the first seed for {epochs} epoch(s) at each lr of "
        f"the grid {', '.join(f'{lr:g}' for lr in lrs)}; its seeded runs use the lr with the best validation "
        f"score ({metric}, {direction} is better, last epoch; a diverged run ranks last). The grid runs are "
        "children tagged `compare.lr_grid` (table `tables/lr_grid.json`).",
        "",
        *md_table(["variant", *(f"lr {lr:g}" for lr in lrs), "chosen lr"], table),
    ]
    return "\n".join(lines)


def _cell(iv: Interval | None, base: dict[str, float]) -> str:
    """mean ± CI, marked where the interval lies above every heuristic baseline (recall credited)."""
    text = fmt_interval(iv)
    return text if iv is None or not math.isfinite(iv.mean) else text + (" ✓" if recalls(iv, base) else " ·")


def _accuracy_table(st: RecallStudy, pairs: list[int], variants: list[str]) -> list[str]:
    rows = []
    for v in variants:
        cells = [_cell(st.per_variant.get(v, {}).get(n), st.baselines[n]) for n in pairs]
        rates = [success_rate(st.per_seed.get(v, {}).get(n, [])) for n in pairs]
        rows.append([v, *cells, " / ".join("-" if math.isnan(r) else f"{r:.0%}" for r in rates)])
    for name in ("chance", "copy", "elimination"):  # elimination needs the answers fed back as inputs
        cells = [f"{st.baselines[n][name]:.3f}" if name in st.baselines[n] else "n/a" for n in pairs]
        rows.append([f"*{name}*", *cells, ""])
    return md_table(["variant", *(f"{n} pairs" for n in pairs), f"seeds > {SUCCESS:g} (per count)"], rows)


def _contrast_lines(st: RecallStudy, alpha: float) -> list[str]:
    if not st.contrasts:
        return []
    rows = []
    for a, b, d, adjusted in st.contrasts:
        c = diff_cells(d, adjusted, alpha, True, names=(b, a))
        rows.append([f"{a} − {b}", c["diff"], c["p"], c["p_tost"], c["verdict"]])
    return [
        f"**Primary contrasts** (declared in compare.contrasts), on the test answer accuracy of the trained mixture "
        f"({', '.join(map(str, st.trained))} pairs): paired t-test over seeds, Holm-adjusted over these "
        f"{len(st.contrasts)}; everything below is secondary.",
        "",
        *md_table(["contrast", "difference", "p (Holm)", "p TOST (Holm)", "verdict"], rows),
        "",
    ]


def _query_table(st: RecallStudy, variants: list[str]) -> list[str]:
    rows = []
    for n in st.trained:
        queries = sorted({i for v in variants for i in st.per_query.get(v, {}).get(n, {})})
        for v in variants:
            acc = st.per_query.get(v, {}).get(n, {})
            rows.append([v, str(n), " ".join(f"{acc.get(i, math.nan):.2f}" for i in queries)])
    return md_table(["variant", "pairs", "accuracy of query 1, 2, ... (mean over seeds)"], rows)


def _speed_table(st: RecallStudy, variants: list[str]) -> list[str]:
    rows = []
    for v in variants:
        epochs = st.epochs_to.get(v, [])
        reached = sorted(e for e in epochs if math.isfinite(e))
        median = reached[len(reached) // 2] if len(reached) > len(epochs) / 2 else math.nan
        text = "not reached" if math.isnan(median) else f"{median:g} (≈ {median * st.steps_per_epoch:.0f} steps)"
        rows.append([v, f"{len(reached)}/{len(epochs)}", text])
    return md_table(["variant", "seeds that reached it", "median epoch"], rows)


def _secondary_tests(st: RecallStudy, alpha: float, variants: list[str]) -> list[str]:
    """Each variant - the baseline at every pair count, Holm over that table: "v − base, n pairs: d (p p)"."""
    keys = [f"recall/pairs{n}/accuracy" for n in sorted(st.baselines)]
    adjusted = holm_grid(st.secondary, keys)
    base = variants[0]
    return [
        f"{v} − {base}, {n} pairs: {c['diff']} (p {c['p']})"
        for v in variants[1:]
        for n in sorted(st.baselines)
        if (d := st.secondary.get(v, {}).get(f"recall/pairs{n}/accuracy")) is not None
        and (adj := adjusted.get((v, f"recall/pairs{n}/accuracy"))) is not None
        and (c := diff_cells(d, adj, alpha, True, names=(base, v)))
    ]


def recall_section(st: RecallStudy, alpha: float, variants: list[str]) -> str:
    """The recall study: declared contrasts, answer accuracy on the trained and on unseen pair counts beside the
    heuristic baselines, per query, learning speed, and against d_model when measured."""
    trained = [n for n in sorted(st.baselines) if n in st.trained]
    unseen = [n for n in sorted(st.baselines) if n not in st.trained]
    lines = [
        "## Associative recall (MQAR)",
        "",
        *st.setup,
        "",
        *_contrast_lines(st, alpha),
        "Answer accuracy on held-out MQAR sequences (the keys' values), mean ± CI over seeds. ✓: the interval lies "
        "above every heuristic that needs no recall (chance 1/V, copying a context value 1/P, and in the fed-back "
        "layout eliminating the values already answered, H_P/P): recall is credited only there; ·: it is not. The "
        f"last column is the share of seeds above {SUCCESS:g} (outcomes are often all or nothing).",
        "",
        "**Trained pair counts** (the training mixture):",
        "",
        *_accuracy_table(st, trained, variants),
    ]
    if unseen:
        lines += ["", "**Unseen pair counts** (extrapolation, secondary):", "", *_accuracy_table(st, unseen, variants)]
    lines += [
        "",
        "**By query** (the i-th query of a sequence; in the fed-back layout elimination shows as rising accuracy):",
        "",
        *_query_table(st, variants),
        "",
        f"**Learning speed**: the first epoch whose validation answer accuracy exceeds {SUCCESS:g}.",
        "",
        *_speed_table(st, variants),
    ]
    if tests := _secondary_tests(st, alpha, variants):
        base = variants[0]
        lines += ["", f"Secondary: each variant − {base} per pair count, Holm over these: " + "; ".join(tests) + "."]
    if st.width:
        widths = sorted({d for per in st.width.values() for dv in per.values() for d in dv})
        pairs = sorted(st.width)
        rows = [
            [v, str(d), *(fmt_interval(st.width.get(n, {}).get(v, {}).get(d)) for n in pairs)]
            for v in variants
            for d in widths
        ]
        lines += [
            "",
            "Against model width (Zoology's figure): every variant and seed trained at each d_model "
            "(compare.d_models); answer accuracy, mean ± CI over seeds.",
            "",
            *md_table(["variant", "d_model", *(f"{n} pairs" for n in pairs)], rows),
        ]
    return "\n".join(lines)


SPLIT_TESTS = {
    "generators": (
        "**data.split: generators**: val and test hold generators (starts, steps with starts, (a, b) pairs) that "
        "training never used, of rules that training uses. A target whose transition (its context, then the value) "
        "occurs somewhere in training can be answered by looking that transition up: such targets test lookup; only "
        "the novel ones test the rule."
    ),
    "new_rules": (
        "**data.split: new_rules**: val and test hold arithmetic steps and geometric ratios that training never "
        "used, so a test sequence follows a rule the model has not seen: after two values it must add their "
        "difference or multiply by their ratio. Every test transition is new unless another rule happens to make "
        "the same pair of values (a training ratio r and a held-out step d do at the x with (r − 1)x = d)."
    ),
}


# The learning curve's row fields for this section: name -> the training run's test metric (`test/<metric>`).
RULE_CURVE_METRICS = {
    "novel_accuracy": "accuracy/novel_context",
    "novel_share": "novel_context_fraction",
    "accuracy_early": "accuracy_early",
    "accuracy_late": "accuracy_late",
}


def split_rules(data_cfg: DataConfig) -> dict[str, dict[str, list[int]]]:
    """split -> family -> the steps/ratios its sequences use under `data.split: new_rules` (the cut `build_data`
    makes, from the config's seed); {} for the generator split, where every split uses every rule."""
    if data_cfg.split != "new_rules":
        return {}
    names = ["train", "val", "test"]
    out: dict[str, dict[str, list[int]]] = {n: {} for n in names}
    for fam in data_cfg.seq_types:
        for n, rules in cut_rules(fam, data_cfg, names).items():
            out[n][fam] = rules
    return out


def rule_split_section(
    agg: Aggregate, variants: list[str], families: list[str], data_cfg: DataConfig, curve: list[dict] | None = None
) -> str:
    """What the test split tests: the share of novel test transitions (never in training), accuracy on them
    beside the Bayes ceiling and chance (1/M), targets 1-3 apart from the rest, and the learning curve's
    accuracy on novel transitions when one was run."""
    split, modulus, rules = data_cfg.split, data_cfg.modulus, split_rules(data_cfg)
    base = agg.get(variants[0], {})
    groups = ["all", *families]

    def key(metric: str, group: str) -> str:
        return f"eval/test/{metric}" + ("" if group == "all" else f"/{group}")

    def value(metric: str, group: str) -> str:
        iv = base.get(key(metric, group))
        return f"{iv.mean:.3f}" if iv is not None and math.isfinite(iv.mean) else "-"

    def row(label: str, per: dict[str, Interval], metric: str) -> list[str]:
        return [label, *(fmt_interval(per.get(key(metric, g))) for g in groups)]

    header = ["", *groups]
    lines = ["## What the test split tests (lookup or rule)", "", SPLIT_TESTS.get(split, f"data.split: {split}")]
    if rules:
        used = "; ".join(
            f"{fam}: " + ", ".join(f"{n} {rules[n][fam]}" for n in rules if fam in rules[n])
            for fam in dict.fromkeys(f for per in rules.values() for f in per)
        )
        lines += ["", f"Rules each split's sequences use (the first data draw): {used}."]
    share = base.get(key("novel_context_fraction", "all"))
    if share is not None and share.mean == 0:
        lines += ["", "No test target here is novel: a lookup of training transitions could answer every one."]
    lines += [
        "",
        "**Novel transitions** (test): the share of targets whose context and value (x_t, x_t+1"
        + ("; alternating x_t-1, x_t, x_t+1" if "alternating" in families else "")
        + ") occur in no training sequence of any family, and the accuracy on them. A lookup table "
        "of training transitions scores 0 on these targets by construction. Mean ± CI over runs; the ceiling is "
        f"the Bayes-optimal accuracy on the same targets, chance 1/M = {1 / modulus:.3f}.",
        "",
        *md_table(
            header,
            [
                ["*novel share*", *(value("novel_context_fraction", g) for g in groups)],
                *(row(v, agg.get(v, {}), "accuracy/novel_context") for v in variants),
                ["*ceiling*", *(value("ceiling/novel_context", g) for g in groups)],
                ["*chance*", *(f"{1 / modulus:.3f}" for _ in groups)],
            ],
        ),
        "",
        "**Targets 1–3 and the rest** (test): on x_1..x_3 a model guesses which rule a start begins (a lookup of "
        "which values start which family helps there), later targets follow from the values seen. Accuracy, then "
        "loss, mean ± CI over runs.",
        "",
    ]
    table = []
    for part, label in (("early", "targets 1–3"), ("late", "targets 4+")):
        table += [row(f"{v} {label}", agg.get(v, {}), f"accuracy_{part}") for v in variants]
        table.append([f"*ceiling {label}*", *(value(f"ceiling_{part}", g) for g in groups)])
    for part, label in (("early", "targets 1–3"), ("late", "targets 4+")):
        table += [row(f"{v} loss {label}", agg.get(v, {}), f"loss_{part}") for v in variants]
    lines += md_table(header, table)
    if curve:
        sizes = sorted({r["n_train"] for r in curve})
        cells = []
        for v in variants:
            per = [[r for r in curve if (r["model"], r["n_train"], r["family"]) == (v, n, "all")] for n in sizes]
            cells.append([v, *(_mean_of(rs, "novel_accuracy") + " / " + _mean_of(rs, "novel_share") for rs in per)])
        lines += [
            "",
            "**Learning curve**: test accuracy on novel transitions / their share, mean over the curve's seeds.",
            "",
            *md_table(["", *(f"n_train {n}" for n in sizes)], cells),
        ]
    return "\n".join(lines)


def _mean_of(rows: list[dict], name: str) -> str:
    vals = [r[name] for r in rows if r.get(name) is not None and math.isfinite(r[name])]
    return f"{sum(vals) / len(vals):.3f}" if vals else "-"
