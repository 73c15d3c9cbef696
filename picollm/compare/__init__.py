"""Computations behind `picollm compare`, one module per concern:

- `stats`: Student-t intervals and Welch's test over seeds, aggregation, verdicts of the summary table;
- `evaluation`: per-model evaluation with calibration and accuracy by position, length generalisation;
- `efficiency`: training-step time (also used by the bench flow), per-step peak memory, generation time;
- `plots`: the figures;
- `report`: report.md.

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
)
from picollm.compare.report import ROW_COLUMNS, SPLIT_METRICS, ReportInput, md_table, render_report
from picollm.compare.stats import (
    MODELS,
    Aggregate,
    Interval,
    aggregate,
    aggregate_metrics,
    band,
    betainc,
    fmt_interval,
    headline_keys,
    mean_ci,
    p_values,
    summary_rows,
    t_ppf,
    t_sf,
    verdict,
    welch_p,
)

__all__ = [
    "COLORS",
    "MODELS",
    "ROW_COLUMNS",
    "SPLIT_METRICS",
    "Aggregate",
    "Efficiency",
    "Interval",
    "ReportInput",
    "accuracy_by_position",
    "aggregate",
    "aggregate_metrics",
    "attention_figures",
    "band",
    "betainc",
    "close",
    "coverage",
    "decode_timing",
    "efficiency_figure",
    "efficiency_models",
    "embedding_figures",
    "evaluate_model",
    "expected_calibration_error",
    "family_accuracy_ci",
    "fmt_interval",
    "headline_keys",
    "length_curves",
    "length_generalisation",
    "long_sequences",
    "loss_curves",
    "md_table",
    "mean_ci",
    "measure_step_memory",
    "memory_worker",
    "p_values",
    "position_accuracy",
    "predict",
    "render_report",
    "restrict_targets",
    "summary_rows",
    "t_ppf",
    "t_sf",
    "time_generation",
    "time_train_steps",
    "valid_targets",
    "verdict",
    "welch_p",
]
