"""Computations behind `picollm compare`, one module per concern:

- `stats`: Student-t intervals, paired t / Welch tests, TOST, Holm, sequence bootstrap, aggregation;
- `verdicts`: the verdict of a compared metric from its adjusted p-values, and its precedence;
- `table`: every variant against the baseline, metric by metric: differences, adjusted p-values, table rows;
- `inputs`: the child training configs (or loaded models) and data draws of a comparison;
- `summary`: aggregates, differences and headline rows over the members; the report's set-up text;
- `evaluation`: per-model evaluation with calibration and accuracy by position, length generalisation;
- `recall`: MQAR answer accuracy against the number of key-value pairs;
- `lr_grid`: each variant's learning rate from a grid, on validation data;
- `efficiency`: training-step time (also used by the bench flow), per-step peak memory, generation time,
  generation state size; every timing with its repeats and the load (picollm.runtime.noise);
- `plots`: the figures;
- `report`, `report_studies`, `report_efficiency`: report.md (and its self-contained HTML copy, report.html);
- `verdict_page`: the verdict-first page (primaries in words, a forest plot of every contrast: verdict.html;
  imported as a module, its function has its name);
- `keys`: the parent run's metric keys (headline numbers, variant last) and its tables.

Everything here takes plain models, splits and numbers; the flow (pipelines/compare.py) owns MLflow.
The names the flow and the tests use are re-exported here (`from picollm import compare as cmp; cmp.X`).
"""

from __future__ import annotations

from picollm.compare.efficiency import (
    Efficiency,
    decode_timing,
    efficiency_models,
    measure_step_memory,
    memory_worker,
    state_sizes,
    time_generation,
    time_train_steps,
)
from picollm.compare.evaluation import (
    accuracy_by_position,
    coverage,
    evaluate_model,
    expected_calibration_error,
    length_generalisation,
    long_sequences,
    predict,
    restrict_targets,
    valid_targets,
)
from picollm.compare.plots import (
    COLORS,
    attention_figures,
    close,
    efficiency_figure,
    embedding_figures,
    family_accuracy_ci,
    length_curves,
    loss_curves,
    position_accuracy,
    recall_curves,
    recall_vs_width,
)
from picollm.compare.recall_study import RecallStudy
from picollm.compare.report import ROW_COLUMNS, SPLIT_METRICS, ReportInput, md_table, render_report, report_html
from picollm.compare.report_studies import RULE_CURVE_METRICS, lr_grid_section, recall_section, rule_split_section
from picollm.compare.stats import (
    MODELS,
    Aggregate,
    Difference,
    Interval,
    SeqIntervals,
    TStat,
    aggregate,
    aggregate_metrics,
    band,
    betainc,
    difference,
    differences,
    holm,
    holm_table,
    mean_ci,
    p_values,
    paired_p,
    paired_stat,
    sequence_bootstrap_ci,
    sequence_counts,
    t_ppf,
    t_sf,
    tost_p,
    two_sided_p,
    welch_p,
    welch_stat,
)
from picollm.compare.table import (
    Comparisons,
    comparison_rows,
    diff_cells,
    diff_side,
    differences_vs_baseline,
    fmt_interval,
    fmt_p,
    headline_keys,
    holm_families,
    holm_grid,
    short_label,
    side,
    summary_rows,
)
from picollm.compare.verdicts import NA, NA_NOISE, NA_PAIRS, NA_RUNS, verdict

__all__ = [
    "COLORS",
    "MODELS",
    "NA",
    "NA_NOISE",
    "NA_PAIRS",
    "NA_RUNS",
    "ROW_COLUMNS",
    "SPLIT_METRICS",
    "Aggregate",
    "Comparisons",
    "Difference",
    "Efficiency",
    "Interval",
    "ReportInput",
    "SeqIntervals",
    "TStat",
    "accuracy_by_position",
    "aggregate",
    "aggregate_metrics",
    "attention_figures",
    "band",
    "betainc",
    "close",
    "comparison_rows",
    "coverage",
    "decode_timing",
    "diff_cells",
    "diff_side",
    "difference",
    "differences",
    "differences_vs_baseline",
    "efficiency_figure",
    "efficiency_models",
    "embedding_figures",
    "evaluate_model",
    "expected_calibration_error",
    "family_accuracy_ci",
    "fmt_interval",
    "fmt_p",
    "headline_keys",
    "holm",
    "holm_families",
    "holm_grid",
    "holm_table",
    "length_curves",
    "length_generalisation",
    "long_sequences",
    "loss_curves",
    "lr_grid_section",
    "md_table",
    "mean_ci",
    "measure_step_memory",
    "memory_worker",
    "p_values",
    "paired_p",
    "paired_stat",
    "position_accuracy",
    "predict",
    "recall_curves",
    "recall_section",
    "RecallStudy",
    "recall_vs_width",
    "RULE_CURVE_METRICS",
    "rule_split_section",
    "render_report",
    "report_html",
    "restrict_targets",
    "sequence_bootstrap_ci",
    "sequence_counts",
    "short_label",
    "side",
    "state_sizes",
    "summary_rows",
    "t_ppf",
    "t_sf",
    "time_generation",
    "time_train_steps",
    "tost_p",
    "two_sided_p",
    "valid_targets",
    "verdict",
    "welch_p",
    "welch_stat",
]
