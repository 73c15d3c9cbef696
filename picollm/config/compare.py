"""`picollm compare`: N attention variants against a baseline, LR grid, recall, efficiency, learning curves."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from picollm.config.base import StrictModel, first_error
from picollm.config.training import DataConfig, TrackingConfig, TrainConfig, link_vocab
from picollm.model.config import ModelConfig
from picollm.model.mixers import REFERENCE_PAIR

VARIANT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")
# Suffixes of the parent's metric keys (`<metric>/<variant>_ci_low`, ...) and words of its tables: not names.
RESERVED_NAMES = {"diff", "p", "p_tost", "baseline", "all"}
DEFAULT_VARIANTS = [{"name": name, "model": {"attention": name}} for name in REFERENCE_PAIR]
# The headline table's metrics (picollm.compare.table.headline_keys labels them; a test keeps the two in step):
# what compare.primaries may name.
HEADLINE_METRICS = (
    "eval/test/loss",
    "eval/test/accuracy",
    "eval/test/accuracy_predictable",
    "eval/test/accuracy_vs_ceiling",
    "eval/test/ece",
)
# A percentile bootstrap of the mean over few runs undercovers: nominal 95 % intervals covered 49 % of normal
# samples at n=2, 75 % at 3, 84 % at 5, 89 % at 8, 91 % at 10 (measured 2026-12-04: 4,000 samples per n, 2,000
# resamples each; the t interval is exact there). `ci: bootstrap` with fewer runs per variant is refused at
# validation (one line, before any training) rather than silently replaced: the config would say one interval
# and the report show another. stats.mean_ci still falls back to t when NaNs leave fewer values at run time.
BOOTSTRAP_MIN_RUNS = 10


def headline_metrics(length_factors: list[int], recall_pairs: list[int]) -> list[str]:
    """The headline's metric keys: HEADLINE_METRICS, accuracy beyond the training length per factor > 1, and MQAR
    answer accuracy per number of pairs (picollm.compare.recall.recall_key)."""
    beyond = [f"lengen/x{f}/beyond/accuracy" for f in sorted(length_factors) if f > 1]
    return [*HEADLINE_METRICS, *beyond, *(f"recall/pairs{n}/accuracy" for n in recall_pairs)]


class Variant(StrictModel):
    """One compared model: a name (the last part of its metric keys) and what it changes in the shared
    `model` (and, optionally, `train`) sections; or, to evaluate only, the registered models to load."""

    name: str = Field()
    """unique; letters, digits, _ . - (starts with a letter), at most 40; not diff, p, p_tost, baseline or all (the
    last part of its metric keys)"""
    model: dict[str, Any] = Field(default_factory=dict)
    """overrides of the shared model section, e.g. {attention: linear, feature_map: taylor}"""
    train: dict[str, Any] = Field(default_factory=dict)
    """overrides of the shared train section, e.g. {lr: 0.001} (an lr grid's choice replaces lr)"""
    models: list[str] | None = Field(None)
    """registry mode: model reference(s) to load and evaluate instead of training; give them on every variant or on
    none"""

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not VARIANT_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid variant name (letters, digits, _ . -, starting with a letter)")
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is reserved (metric key suffix): choose another variant name")
        return name

    @field_validator("models", mode="before")
    @classmethod
    def _single_model(cls, raw: Any) -> Any:
        return [raw] if isinstance(raw, str) else raw


class CompareSettings(StrictModel):
    """`compare` section of `picollm compare`: which variants, how many seeds, what to evaluate."""

    variants: list[Variant] = Field(
        default_factory=lambda: [Variant.model_validate(v) for v in DEFAULT_VARIANTS], min_length=2
    )
    """the compared models; the first is the baseline every other is tested against"""
    lr_grid: list[float] = Field(default_factory=list)
    """learning rates each variant tries on one seed before the seeded runs (validation score picks its lr); empty =
    off, every variant uses train.lr"""
    lr_grid_epochs: int | None = Field(None, ge=1)
    """epochs of each grid run; null = train.epochs"""
    lr_grid_seed: int | None = Field(None)
    """train.seed (and data draw) of the grid runs; null = the first of compare.seeds. A seed outside compare.seeds
    keeps the choice of lr off the runs that are reported"""
    lr_grid_metric: str | None = Field(None)
    """last-epoch validation metric that ranks the grid (lower is better for a loss or ECE); null =
    val/accuracy_answer/mqar when the data include mqar, else val/loss"""
    recall_pairs: list[int] = Field(default_factory=list)
    """MQAR: evaluate answer accuracy at these numbers of key-value pairs (data must include mqar); empty = the recall
    report is off"""
    d_models: list[int] = Field(default_factory=list)
    """MQAR recall vs model width: every variant and seed trained again at each d_model; empty = off"""
    contrasts: list[tuple[str, str]] = Field(default_factory=list)
    """declared primary contrasts (a, b) of the recall study, each a - b on the test answer accuracy of the trained
    mixture, paired over seeds, Holm-adjusted over these contrasts; empty = each variant against the baseline"""
    primaries: list[str] = Field(default_factory=list)
    """headline metrics declared primary before the runs, e.g. [eval/test/loss, eval/test/accuracy]: each variant -
    baseline on them is Holm-adjusted over these tests only; every other row and table is secondary (Holm within
    its own family). Names from the headline (`eval/test/{loss,accuracy,accuracy_predictable,accuracy_vs_ceiling,
    ece}`, `lengen/x<f>/beyond/accuracy`, `recall/pairs<n>/accuracy`); empty = none declared, all secondary. The
    recall study declares its primaries as compare.contrasts"""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    """train.seed of each seed's runs, the same for every variant"""
    resample_data: bool = Field(True)
    """each seed also draws its own data and long sequences (data.seed + seed), so the intervals include data sampling;
    false = every seed on data.seed"""
    length_factors: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    """evaluate at these multiples of data.max_len; empty = no length generalisation"""
    n_long: int = Field(40, ge=1)
    """length-generalisation sequences per family and factor"""
    ci: Literal["t", "bootstrap"] = Field("t")
    """confidence interval of the mean over runs: Student-t, or bootstrap percentile (needs at least 10 runs per
    variant: below that it undercovers, 84 % at 5 runs for a nominal 95 %)"""
    confidence: float = Field(0.95, gt=0, lt=1)
    """level of the confidence intervals"""
    bootstrap_samples: int = Field(10000, ge=100)
    """resamples of a bootstrap interval"""
    test: Literal["paired", "welch"] = Field("paired")
    """difference test over runs: paired t on the per-seed differences (train mode), or Welch's; paired falls back to
    Welch (noted in the report) when the runs are not paired"""
    alpha: float = Field(0.05, gt=0, lt=1)
    """level of the difference and equivalence tests (p Holm-adjusted per table)"""
    equivalence_margin: float = Field(0.01, gt=0)
    """TOST margin: |variant - baseline| < margin is equivalent; absolute, in the metric's units (sized for accuracy-
    like metrics in [0, 1])"""
    equivalence_margins: dict[str, float] = Field(default_factory=dict)
    """per-metric margin overrides keyed by metric name, e.g. {eval/test/loss: 0.02}"""
    calibration_bins: int = Field(10, ge=2)
    """equal-width confidence bins of the ECE"""
    attention_positions: int = Field(16, ge=2)
    """positions shown in the attention heatmaps"""

    @model_validator(mode="before")
    @classmethod
    def _legacy_refs(cls, raw: Any) -> Any:
        """`compare.baseline` / `compare.linear`, the two-model shorthand: the `models` of the first and the
        second variant (the default ones when `variants` is not given)."""
        if not isinstance(raw, dict) or not ({"baseline", "linear"} & raw.keys()):
            return raw
        raw = dict(raw)
        refs = [raw.pop("baseline", None), raw.pop("linear", None)]
        if refs == [None, None]:
            return raw
        if None in refs:
            raise ValueError("give both compare.baseline and compare.linear (evaluate) or neither (train)")
        variants = raw.get("variants", DEFAULT_VARIANTS)
        if not isinstance(variants, list) or len(variants) != 2:
            raise ValueError(
                "compare.baseline/compare.linear name the models of two variants; with more, give each "
                "variant's references as compare.variants[*].models"
            )
        pairs = zip(variants, refs, strict=True)
        raw["variants"] = [{**v, "models": r} if isinstance(v, dict) else v for v, r in pairs]
        return raw

    @model_validator(mode="after")
    def _check(self) -> CompareSettings:
        names = [v.name for v in self.variants]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"compare.variants: the name {dupes[0]!r} is used twice (names must be unique)")
        given = [v.models is not None for v in self.variants]
        if any(given) and not all(given):
            missing = [v.name for v in self.variants if v.models is None]
            raise ValueError(
                f"compare.variants: {', '.join(missing)} give no models: give models for every variant "
                "(evaluate) or for none (train)"
            )
        if any(v.models == [] for v in self.variants):
            raise ValueError("compare.variants: models must name at least one model")
        if self.registry and (self.lr_grid or self.d_models):
            raise ValueError("compare.lr_grid and compare.d_models train models: they need train mode (no models)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("compare.seeds lists a seed twice")
        if any(f < 1 for f in self.length_factors) or len(set(self.length_factors)) != len(self.length_factors):
            raise ValueError("compare.length_factors must be distinct integers >= 1")
        if any(not m > 0 for m in self.equivalence_margins.values()):
            raise ValueError("compare.equivalence_margins must all be > 0")
        if self.lr_grid_metric is not None and not self.lr_grid_metric.startswith("val/"):
            raise ValueError("compare.lr_grid_metric must be a validation metric (val/...), e.g. val/loss")
        for a, b in self.contrasts:
            if a not in names or b not in names or a == b:
                raise ValueError(f"compare.contrasts ({a}, {b}) must name two different variants of {names}")
        if len({tuple(c) for c in self.contrasts}) != len(self.contrasts):
            raise ValueError("compare.contrasts lists a contrast twice")
        known = headline_metrics(self.length_factors, self.recall_pairs)
        for m in self.primaries:
            if m not in known:
                raise ValueError(f"compare.primaries: {m!r} is not a headline metric (one of {', '.join(known)})")
        if len(set(self.primaries)) != len(self.primaries):
            raise ValueError("compare.primaries lists a metric twice")
        runs = min(len(v.models or []) for v in self.variants) if self.registry else len(self.seeds)
        if self.ci == "bootstrap" and runs < BOOTSTRAP_MIN_RUNS:
            raise ValueError(
                f"compare.ci: bootstrap needs at least {BOOTSTRAP_MIN_RUNS} runs per variant (here {runs}: a "
                "percentile bootstrap over so few undercovers, 84 % at 5 for a nominal 95 %); use ci: t"
            )
        for key in ("lr_grid", "recall_pairs", "d_models"):
            values = getattr(self, key)
            if len(set(values)) != len(values) or any(not x > 0 for x in values):
                raise ValueError(f"compare.{key} must be distinct values > 0")
        return self

    @property
    def registry(self) -> bool:
        """Evaluate registered models (every variant gives `models`) rather than train."""
        return self.variants[0].models is not None

    @property
    def baseline(self) -> str:
        return self.variants[0].name

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variants]


class EfficiencyConfig(StrictModel):
    """`efficiency` section of `picollm compare`: both attentions timed side by side in one process."""

    enabled: bool = Field(True)
    """run the efficiency measurements"""
    lengths: list[int] = Field(default_factory=lambda: [64, 256, 1024, 4096], min_length=1)
    """training-step sequence lengths N (time and memory), each at least 2"""
    tokens_per_step: int = Field(4096, ge=1)
    """batch size = max(1, tokens_per_step // length)"""
    warmup_steps: int = Field(1, ge=0)
    """untimed steps before the timed ones"""
    timed_steps: int = Field(3, ge=1)
    """timed training steps (repeats: the minimum is reported, the maximum beside it)"""
    memory: bool = Field(True)
    """peak RSS of one training step per (model, length), fresh subprocess each"""
    gen_contexts: list[int] = Field(default_factory=lambda: [64, 256, 1024, 4096], min_length=1)
    """prompt lengths for the generation timing, each at least 2"""
    gen_tokens: int = Field(16, ge=1)
    """greedy decode steps timed per context length"""
    num_threads: int | None = Field(None, ge=1)
    """torch threads while timing; null = unchanged"""

    @model_validator(mode="after")
    def _check(self) -> EfficiencyConfig:
        if any(n < 2 for n in self.lengths + self.gen_contexts):
            raise ValueError("efficiency lengths and gen_contexts must be >= 2")
        return self


class LearningCurveConfig(StrictModel):
    """`learning_curve` section of `picollm compare`: test accuracy vs training-set size, per family and model."""

    n_train: list[int] = Field(default_factory=list)
    """data.n_train values (per family) to train both models at; empty = off"""
    seeds: list[int] | None = Field(None)
    """seeds per size; null = compare.seeds"""

    @model_validator(mode="after")
    def _check(self) -> LearningCurveConfig:
        if any(n < 1 for n in self.n_train) or len(set(self.n_train)) != len(self.n_train):
            raise ValueError("learning_curve.n_train must be distinct sizes >= 1")
        return self


class CompareConfig(StrictModel):
    """`picollm compare`: softmax vs linear attention, same data and seeds, one parent MLflow run."""

    data: DataConfig = Field(default_factory=DataConfig)
    """The data every variant trains and is evaluated on, as for a training run; with compare.resample_data each seed
    draws its own."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model shared by the variants; each variant overrides what it changes (e.g. attention)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The trainer shared by the variants; train.seed is set per seed from compare.seeds."""
    compare: CompareSettings = Field(default_factory=CompareSettings)
    """Which variants, how many seeds, what to evaluate and test."""
    efficiency: EfficiencyConfig = Field(default_factory=EfficiencyConfig)
    """Training-step time and memory and decode time of the variants, side by side in one process."""
    learning_curve: LearningCurveConfig = Field(default_factory=LearningCurveConfig)
    """Test accuracy vs training-set size, per family and model."""
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="picollm-compare", registered_model="picollm-compare")
    )
    """The parent run's tracking; registered_model is a prefix: children register as <prefix>-<variant>."""

    @model_validator(mode="after")
    def _link(self) -> CompareConfig:
        link_vocab(self.model, self.data)
        cc = self.compare
        if self.learning_curve.n_train and cc.registry:
            raise ValueError("learning_curve trains models: it needs train mode (no compare.variants[*].models)")
        if cc.recall_pairs and "mqar" not in self.data.seq_types:
            raise ValueError("compare.recall_pairs needs the mqar family in data.seq_types")
        longest = max(cc.length_factors, default=1) * self.data.max_len
        for v in cc.variants:
            model = self.variant_model(v)
            self.variant_train(v)
            for d in cc.d_models:
                self.variant_model(v, d_model=d)
            if not cc.registry and model.pos_encoding == "learned" and longest > model.max_seq_len:
                raise ValueError(
                    f"length generalisation needs {longest} positions but variant {v.name}'s model.max_seq_len "
                    f"is {model.max_seq_len} (learned positions)"
                )
        return self

    def variant_model(self, v: Variant, d_model: int | None = None) -> ModelConfig:
        """The shared `model` section with the variant's overrides (and `d_model`, for compare.d_models)."""
        raw = {**self.model.model_dump(mode="json"), **v.model, **({"d_model": d_model} if d_model else {})}
        try:
            return ModelConfig.model_validate(raw)
        except ValidationError as e:
            at = f" at d_model {d_model}" if d_model else ""
            raise ValueError(f"variant {v.name}{at}: {first_error(e, ModelConfig, 'model.')}") from None

    def variant_train(self, v: Variant, **update: Any) -> TrainConfig:
        """The shared `train` section with the variant's overrides (and `update`, e.g. a grid lr)."""
        try:
            return TrainConfig.model_validate({**self.train.model_dump(mode="json"), **v.train, **update})
        except ValidationError as e:
            raise ValueError(f"variant {v.name}: {first_error(e, TrainConfig, 'train.')}") from None
