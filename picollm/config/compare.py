"""`picollm compare`: softmax vs linear attention, efficiency, learning curves."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from picollm.config.base import StrictModel
from picollm.config.training import DataConfig, ModelConfig, TrackingConfig, TrainConfig, link_vocab


class CompareSettings(StrictModel):
    """`compare` section of `picollm compare`: which models, how many seeds, what to evaluate."""

    baseline: list[str] | None = Field(
        None, description="softmax model reference(s) (NAME@ALIAS, NAME/VERSION, runs:/...); null = train"
    )
    linear: list[str] | None = Field(None, description="linear-attention model reference(s); null = train")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="train.seed per pair")
    resample_data: bool = Field(
        True,
        description="each seed also draws its own data and long sequences (data.seed + seed), so the intervals "
        "include data sampling; false = every seed on data.seed",
    )
    length_factors: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8], min_length=1, description="evaluate at these multiples of data.max_len"
    )
    n_long: int = Field(40, ge=1, description="length-generalisation sequences per family and factor")
    ci: Literal["t", "bootstrap"] = Field("t", description="confidence interval of the mean over seeds")
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_samples: int = Field(10000, ge=100)
    test: Literal["paired", "welch"] = Field(
        "paired",
        description="difference test over runs: paired t on the per-seed differences (train mode), or Welch's; "
        "paired falls back to Welch (noted in the report) when the runs are not paired",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="level of the difference and equivalence tests (p Holm-adjusted per table)"
    )
    equivalence_margin: float = Field(
        0.01,
        gt=0,
        description="TOST margin: |linear - softmax| < margin is equivalent; absolute, in the metric's units "
        "(sized for accuracy-like metrics in [0, 1])",
    )
    equivalence_margins: dict[str, float] = Field(
        default_factory=dict, description="per-metric margin overrides keyed by metric name, e.g. eval/test/loss"
    )
    calibration_bins: int = Field(10, ge=2, description="equal-width confidence bins of the ECE")
    attention_positions: int = Field(16, ge=2, description="positions shown in the attention heatmaps")

    @model_validator(mode="before")
    @classmethod
    def _single_ref(cls, raw: Any) -> Any:
        if isinstance(raw, dict):  # `compare.baseline: NAME@ALIAS` is a list of one
            raw = {k: [v] if k in ("baseline", "linear") and isinstance(v, str) else v for k, v in raw.items()}
        return raw

    @model_validator(mode="after")
    def _check(self) -> CompareSettings:
        if (self.baseline is None) != (self.linear is None):
            raise ValueError("give both compare.baseline and compare.linear (evaluate) or neither (train)")
        if self.baseline is not None and (not self.baseline or not self.linear):
            raise ValueError("compare.baseline and compare.linear must name at least one model each")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("compare.seeds lists a seed twice")
        if any(f < 1 for f in self.length_factors) or len(set(self.length_factors)) != len(self.length_factors):
            raise ValueError("compare.length_factors must be distinct integers >= 1")
        if any(not m > 0 for m in self.equivalence_margins.values()):
            raise ValueError("compare.equivalence_margins must all be > 0")
        return self


class EfficiencyConfig(StrictModel):
    """`efficiency` section of `picollm compare`: both attentions timed side by side in one process."""

    enabled: bool = True
    lengths: list[int] = Field(default_factory=lambda: [64, 256, 1024, 4096], min_length=1)
    tokens_per_step: int = Field(4096, ge=1, description="batch size = max(1, tokens_per_step // length)")
    warmup_steps: int = Field(1, ge=0)
    timed_steps: int = Field(3, ge=1)
    memory: bool = Field(True, description="peak RSS of one training step per (model, length), fresh subprocess each")
    gen_contexts: list[int] = Field(default_factory=lambda: [64, 256, 1024, 4096], min_length=1)
    gen_tokens: int = Field(16, ge=1, description="greedy decode steps timed per context length")
    num_threads: int | None = Field(None, ge=1, description="torch threads while timing; null = unchanged")

    @model_validator(mode="after")
    def _check(self) -> EfficiencyConfig:
        if any(n < 2 for n in self.lengths + self.gen_contexts):
            raise ValueError("efficiency lengths and gen_contexts must be >= 2")
        return self


class LearningCurveConfig(StrictModel):
    """`learning_curve` section of `picollm compare`: test accuracy vs training-set size, per family and model."""

    n_train: list[int] = Field(
        default_factory=list, description="data.n_train values (per family) to train both models at; empty = off"
    )
    seeds: list[int] | None = Field(None, description="seeds per size; null = compare.seeds")

    @model_validator(mode="after")
    def _check(self) -> LearningCurveConfig:
        if any(n < 1 for n in self.n_train) or len(set(self.n_train)) != len(self.n_train):
            raise ValueError("learning_curve.n_train must be distinct sizes >= 1")
        return self


class CompareConfig(StrictModel):
    """`picollm compare`: softmax vs linear attention, same data and seeds, one parent MLflow run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig, description="shared; attention is set per model")
    train: TrainConfig = Field(default_factory=TrainConfig)
    compare: CompareSettings = Field(default_factory=CompareSettings)
    efficiency: EfficiencyConfig = Field(default_factory=EfficiencyConfig)
    learning_curve: LearningCurveConfig = Field(default_factory=LearningCurveConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="picollm-compare", registered_model="picollm-compare"),
        description="registered_model is a prefix: children register as <prefix>-softmax / <prefix>-linear",
    )

    @model_validator(mode="after")
    def _link(self) -> CompareConfig:
        link_vocab(self.model, self.data)
        if self.learning_curve.n_train and self.compare.baseline is not None:
            raise ValueError("learning_curve trains models: it needs train mode (compare.baseline/linear null)")
        longest = max(self.compare.length_factors) * self.data.max_len
        if self.compare.baseline is None and self.model.pos_encoding == "learned" and longest > self.model.max_seq_len:
            raise ValueError(
                f"length generalisation needs {longest} positions but model.max_seq_len is "
                f"{self.model.max_seq_len} (learned positions)"
            )
        return self
