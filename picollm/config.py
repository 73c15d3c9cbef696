"""Pydantic schemas for every config file, and loading with dotted `--set` overrides.

Every schema forbids unknown keys, so a typo is an error that names the key rather than a silently
ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from picollm.errors import ConfigError

FAMILIES = ("counting", "arithmetic", "geometric", "alternating", "random_walk")
Family = Literal["counting", "arithmetic", "geometric", "alternating", "random_walk"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Synthetic integer sequences. Values live in Z_M with M = vocab_size - 1 (modular arithmetic),
    so no sequence sticks at a bound and sequences of any length stay inside the trained range.
    Token M (the last id) is the pad token."""

    seq_types: list[Family] = Field(default_factory=lambda: list(FAMILIES), min_length=1)
    vocab_size: int = Field(128, ge=8, le=65536)
    min_len: int = Field(8, ge=3)
    max_len: int = Field(32, ge=3)
    n_train: int = Field(2000, ge=1, description="training sequences per family")
    n_val: int = Field(80, ge=1, description="validation sequences per family")
    n_test: int = Field(80, ge=1, description="test sequences per family")
    held_out_share: float = Field(
        0.15,
        gt=0,
        lt=0.5,
        description="share of each family's generators that val, and test, each hold (never in train)",
    )
    seed: int = 0
    start_range: tuple[int, int] | None = Field(
        None, description="inclusive range of first values; null = every value 0..M-1"
    )
    arithmetic_steps: list[int] = Field(
        default_factory=lambda: [2, 3, 4, 5], min_length=1, description="common differences d (not 0 or 1 mod M)"
    )
    geometric_ratios: list[int] = Field(
        default_factory=lambda: [2, 3], min_length=1, description="ratios r (not 0 or 1 mod M)"
    )
    walk_steps: list[int] = Field(default_factory=lambda: [-1, 1], min_length=1)

    @property
    def modulus(self) -> int:
        return self.vocab_size - 1

    @property
    def pad_id(self) -> int:
        return self.vocab_size - 1

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        m = self.modulus
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) is larger than max_len ({self.max_len})")
        if len(set(self.seq_types)) != len(self.seq_types):
            raise ValueError("seq_types lists a family twice")
        if self.start_range is not None:
            lo, hi = self.start_range
            if not 0 <= lo <= hi < m:
                raise ValueError(f"start_range must satisfy 0 <= lo <= hi <= {m - 1}, got {[lo, hi]}")
        small = " (the defaults need vocab_size >= 14)" if m < 13 else ""
        if any(s % m == 0 for s in self.arithmetic_steps):
            raise ValueError(f"arithmetic_steps must be non-zero modulo {m}{small}")
        if "counting" in self.seq_types and any(s % m == 1 for s in self.arithmetic_steps):
            raise ValueError(f"arithmetic_steps must not be 1 modulo {m}: step 1 is the counting family{small}")
        if any(r % m in (0, 1) for r in self.geometric_ratios):
            raise ValueError(f"geometric_ratios must not be 0 or 1 modulo {m} (the sequence would stick){small}")
        for key in ("arithmetic_steps", "geometric_ratios"):  # one value is one generator
            if len({v % m for v in getattr(self, key)}) != len(getattr(self, key)):
                raise ValueError(f"{key} lists a value twice modulo {m}")
        return self


class ModelConfig(StrictModel):
    attention: Literal["softmax", "linear"] = "softmax"
    pos_encoding: Literal["alibi", "none", "sinusoidal", "learned"] = "alibi"
    alibi_exponent: float = Field(
        4.0, gt=0, description="ALiBi slopes m_h = 2^(-alibi_exponent * h / n_heads), h = 1..n_heads"
    )
    d_model: int = Field(128, ge=4)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    d_mlp: int | None = Field(None, ge=1, description="MLP width; null = 4 * d_model")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    vocab_size: int | None = Field(None, ge=2, description="null = taken from data.vocab_size")
    pad_id: int | None = Field(None, description="null = vocab_size - 1")
    max_seq_len: int = Field(1024, ge=1, description="longest sequence a learned positional table supports")
    tie_embeddings: bool = False
    linear_chunk_size: int = Field(64, ge=1, description="chunk length of the chunkwise linear form")
    linear_eps: float = Field(1e-6, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    @property
    def pad_token(self) -> int:
        assert self.vocab_size is not None
        return self.vocab_size - 1 if self.pad_id is None else self.pad_id


class OptimConfig(StrictModel):
    """The optimiser and its schedule (picollm/optim.py), shared by the `train`, `sft` and `dpo` sections:
    AdamW, linear warmup, cosine decay to lr * min_lr_ratio, gradient clipping."""

    lr: float = Field(3e-3, gt=0, description="AdamW peak learning rate, reached after warmup_steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr of the cosine as a fraction of lr")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps (at most half of all steps)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay, on weight matrices only")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null = off")


class TrainConfig(OptimConfig):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch default")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without val/loss improving"
    )
    log_every: int = Field(10, ge=1, description="log train loss every N optimizer steps")
    checkpoint_every: int = Field(1, ge=1, description="log the checkpoint artifact every N epochs")
    eval_batch_size: int = Field(256, ge=1)
    peak_flops: float | None = Field(None, gt=0, description="FLOP/s used for MFU; null = measured fp32 matmul peak")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast for matmuls (state, normaliser and losses stay fp32); auto = bf16 on CUDA"
    )
    compile: bool = Field(False, description="torch.compile the model (CUDA or a C++ compiler on CPU)")
    nonfinite: Literal["stop", "skip_batch"] = Field(
        "stop", description="on a NaN/inf loss: stop the run (FAILED), or skip that batch and go on"
    )
    max_skipped_batches: int = Field(
        10, ge=0, description="with nonfinite=skip_batch, stop after this many skipped batches in all"
    )


class TrackingConfig(StrictModel):
    uri: str | None = Field(None, description="tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = Field("picollm", min_length=1)
    run_name: str | None = None
    registered_model: str | None = Field(
        "picollm-baseline", description="register the model under this name; null = don't register"
    )
    log_model: bool = True


def link_vocab(model: ModelConfig, data: DataConfig) -> None:
    """The model's vocabulary comes from the data; an explicit, different one is an error."""
    if model.vocab_size is None:
        model.vocab_size = data.vocab_size
    elif model.vocab_size != data.vocab_size:
        raise ValueError(
            f"model.vocab_size ({model.vocab_size}) differs from data.vocab_size ({data.vocab_size}); "
            "leave model.vocab_size null"
        )


class TrainRunConfig(StrictModel):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _link_model_to_data(self) -> TrainRunConfig:
        link_vocab(self.model, self.data)
        if self.model.pos_encoding == "learned" and self.data.max_len > self.model.max_seq_len:
            raise ValueError(f"data.max_len ({self.data.max_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        return self


# --------------------------------------------------------------------------------------------------
# Loading

C = TypeVar("C", bound=BaseModel)


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    msg = msg.removeprefix("Value error, ")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`model.d_model=64` -> (["model", "d_model"], 64); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_key(raw: dict[str, Any], path: list[str], value: Any, what: str = "override") -> None:
    """raw[path[0]][path[1]]... = value, creating sections on the way (`what` names it in errors)."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        set_key(raw, path, value, f"override {item!r}")
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def validate(schema: type[C], raw: dict[str, Any], source: str = "config") -> C:
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_validation_error(e)}") from None


def load_config(schema: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read a YAML config (or start from defaults), apply `key=value` overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return validate(schema, raw, source=str(path) if path is not None else "config")


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class BenchRunsConfig(StrictModel):
    """Whole training runs timed by the `ddp` and `tracking` bench sections."""

    config: Path = Field(Path("configs/linear.yaml"), description="training config the runs use")
    overrides: list[str] = Field(default_factory=list, description="--set overrides applied to that config")
    nproc: int = Field(2, ge=2, description="DDP processes (torchrun) compared with one process")
    repeats: int = Field(2, ge=1, description="interleaved repeats of the tracking runs (the best of each counts)")
    http_server: bool = Field(True, description="also time the run against a temporary PostgreSQL-backed mlflow server")


class BenchSweepConfig(StrictModel):
    """`picollm sweep` timed by the `sweep` bench section: trials per minute and per-trial overhead."""

    config: Path = Field(Path("configs/sweep_tiny.yaml"), description="sweep config the timed studies use")
    overrides: list[str] = Field(default_factory=list, description="--set overrides applied to that config")
    trials: int = Field(6, ge=2, description="finished trials per timed study")
    workers: list[int] = Field(default_factory=lambda: [1, 2], min_length=1, description="worker counts compared")


class BenchConfig(StrictModel):
    """`make bench`: training-step time of both attentions vs sequence length, side by side; DDP speedup;
    MLflow's share of a training run's wall time; sweep throughput."""

    sections: list[Literal["steps", "ddp", "tracking", "sweep"]] = Field(
        default_factory=lambda: ["steps", "ddp", "tracking", "sweep"], min_length=1
    )
    runs: BenchRunsConfig = Field(default_factory=BenchRunsConfig)
    sweep: BenchSweepConfig = Field(default_factory=BenchSweepConfig)
    lengths: list[int] = Field(default_factory=lambda: [32, 256, 1024, 4096], min_length=1)
    tokens_per_step: int = Field(4096, ge=1, description="batch size = max(1, tokens_per_step // length)")
    warmup_steps: int = Field(2, ge=0)
    timed_steps: int = Field(5, ge=1)
    vocab_size: int = Field(128, ge=8)
    model: ModelConfig = Field(default_factory=ModelConfig)
    kernels: bool = Field(True, description="also time the linear-attention forms alone (fwd+bwd)")
    num_threads: int | None = Field(None, ge=1)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="picollm-bench", registered_model=None, log_model=False)
    )

    @model_validator(mode="after")
    def _vocab(self) -> BenchConfig:
        if self.model.vocab_size is None:
            self.model.vocab_size = self.vocab_size
        return self


ANALYSIS_SECTIONS = ("embeddings", "attention", "activations", "ablation")


class AnalysisConfig(StrictModel):
    """`picollm analyze MODEL_REF`: interpretability report of a trained model, logged to MLflow."""

    model: str | None = Field(
        None, description="model reference: NAME, NAME@ALIAS, NAME/VERSION, models:/..., runs:/... or a run id"
    )
    what: list[Literal["embeddings", "attention", "activations", "ablation"]] = Field(
        default_factory=lambda: list(ANALYSIS_SECTIONS), min_length=1, description="sections to compute"
    )
    split: Literal["train", "val", "test"] = Field("test", description="split of the regenerated training data")
    n_per_family: int = Field(80, ge=1, description="sequences per family from the split (fewer if it has fewer)")
    attention_positions: int = Field(16, ge=2, description="positions shown in the attention heatmaps")
    max_k_back: int = Field(4, ge=1, description="k-back attention profile for k = 1..max_k_back")
    top_neurons: int = Field(24, ge=1, description="rows of the selective-neuron heatmap")
    activation_shift: float | None = Field(
        0.17,
        ge=0,
        description="added to GELU outputs (min about -0.17) before the selectivity index; "
        "null = subtract the observed minimum",
    )
    dead_threshold: float = Field(0.01, ge=0, description="a neuron never above this on the batch is dead")
    seed: int = Field(0, description="seed of the randomly initialised baseline model")
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"
    batch_size: int = Field(256, ge=1, description="sequences per forward pass")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch default")
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="picollm-analysis", registered_model=None, log_model=False)
    )

    @model_validator(mode="after")
    def _no_repeats(self) -> AnalysisConfig:
        if len(set(self.what)) != len(self.what):
            raise ValueError("what lists a section twice")
        return self


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


# --------------------------------------------------------------------------------------------------
# DPO: `picollm dpo configs/dpo.yaml` (pipelines/dpo.py)

GPT2_VOCAB = 50258  # tiktoken's GPT-2 ranks (50257) plus one pad token as the last id
CORRUPTIONS = ("random_tokens", "swap_tokens", "shuffle_sentences", "other_story", "replace_words")
Corruption = Literal["random_tokens", "swap_tokens", "shuffle_sentences", "other_story", "replace_words"]


class DPODataConfig(StrictModel):
    """Stories (or synthetic sequences) cut into prompt + continuation at sentence boundaries."""

    source: Literal["tinystories", "files", "synthetic"] = "tinystories"
    dataset: str = Field("roneneldan/TinyStories", min_length=1, description="hub dataset of source tinystories")
    split: str = Field("train", min_length=1, description="hub split of source tinystories")
    path: str | None = Field(None, description="source files: a .txt/.jsonl file, a directory of them, or a glob")
    text_field: str = Field("text", min_length=1, description="the story field of .jsonl rows")
    limit: int | None = Field(5000, ge=1, description="stories read (streamed); null = all")
    seq_max_len: int = Field(128, ge=8, description="longest prompt + continuation, in tokens")
    prompt_sentences: int = Field(2, ge=1, description="sentences in the prompt")
    continuation_sentences: int | None = Field(
        3, ge=1, description="sentences in the chosen continuation; null = as many as fit in seq_max_len"
    )
    min_continuation_tokens: int = Field(4, ge=2, description="skip stories whose continuation is shorter")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of stories in val")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of stories in test")
    seed: int = 0
    synthetic: DataConfig = Field(default_factory=DataConfig, description="source synthetic: the sequences")
    synthetic_prompt_fraction: float = Field(0.5, gt=0, lt=1, description="source synthetic: prompt share")

    @model_validator(mode="after")
    def _check(self) -> DPODataConfig:
        if self.source == "files" and not self.path:
            raise ValueError("data.source is files but data.path is not set")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave stories for training")
        return self

    @property
    def vocab_size(self) -> int:
        return self.synthetic.vocab_size if self.source == "synthetic" else GPT2_VOCAB


class DPOConfig(OptimConfig):
    # Parameters whose default values are overridden from OptimConfig
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate, reached after warmup_steps")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps (at most half of all steps)")

    reference: str | None = Field(
        None, description="registered model or run to use as reference; null = train an SFT reference"
    )
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO (sigmoid only)")
    length_normalize: bool = Field(False, description="divide sequence log-probs by the response length")
    corruptions: list[Corruption] = Field(default_factory=lambda: ["other_story", "swap_tokens"], min_length=1)
    swap_k: int = Field(2, ge=1, description="swap_tokens: adjacent swaps per continuation")
    replace_k: int = Field(2, ge=1, description="replace_words: words replaced per continuation")
    train_pairs: int = Field(2000, ge=1)
    val_pairs: int = Field(200, ge=1)
    test_pairs: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="pairs per step (2x sequences in the forward pass)")
    max_steps: int = Field(200, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast for the policy and reference forward passes; auto = bf16 on CUDA"
    )
    eval_every: int = Field(25, ge=1, description="evaluate on val every N steps")
    early_stopping_patience: int | None = Field(
        4, ge=1, description="stop after this many evaluations without the monitor improving"
    )
    monitor: Literal["val/loss", "val/accuracy", "val/rewards/accuracies", "val/rewards/margins"] = "val/loss"
    log_every: int = Field(5, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    num_samples: int = Field(4, ge=0, description="test prompts continued by reference and policy")
    sample_tokens: int = Field(32, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        if len(set(self.corruptions)) != len(self.corruptions):
            raise ValueError("corruptions lists a scheme twice")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type sigmoid only")
        return self


class DPOTrackingConfig(TrackingConfig):
    experiment: str = Field("picollm-dpo", min_length=1)
    registered_model: str | None = Field("picollm-dpo", description="the DPO policy; null = don't register")
    sft_registered_model: str | None = Field("picollm-sft", description="the SFT reference; null = don't register")


class SFTConfig(TrainConfig):
    """TrainConfig with defaults sized for a 50k-token output head (the logits dominate memory)."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(16, ge=1)


class DPORunConfig(StrictModel):
    data: DPODataConfig = Field(default_factory=DPODataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(
        default_factory=SFTConfig, description="SFT of the reference; its device and num_threads apply to the whole run"
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    tracking: DPOTrackingConfig = Field(default_factory=DPOTrackingConfig)

    @model_validator(mode="after")
    def _link(self) -> DPORunConfig:
        vocab = self.data.vocab_size
        if self.model.vocab_size is None:
            self.model.vocab_size = vocab
        elif self.model.vocab_size != vocab:
            raise ValueError(
                f"model.vocab_size ({self.model.vocab_size}) differs from the data's vocabulary ({vocab}); "
                "leave model.vocab_size null"
            )
        if self.model.pos_encoding == "learned" and self.data.seq_max_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_max_len ({self.data.seq_max_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Team tracking server (`make server`): MLflow on a PostgreSQL backend store


class ServerConfig(StrictModel):
    """`picollm server start`: PostgreSQL on loopback + `mlflow server` over it, all state in `state_dir`."""

    host: str = Field("127.0.0.1", description="address mlflow server binds to; 0.0.0.0 for a team (see README)")
    port: int = Field(5001, ge=1, le=65535)
    allowed_hosts: list[str] | None = Field(
        None, description="mlflow --allowed-hosts (Host headers it accepts); null = MLflow's localhost default"
    )
    workers: int = Field(1, ge=1, description="mlflow server worker processes")
    state_dir: Path = Field(Path(".picollm-server"), description="PostgreSQL data, artifacts, logs and pid files")
    postgres_port: int = Field(5433, ge=1, le=65535)
    postgres_db: str = Field("mlflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    postgres_user: str = Field("mlflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    postgres_bin: Path | None = Field(None, description="folder with initdb/pg_ctl; null = PATH, then Debian's")
    backend_store_uri: str | None = Field(
        None, description="use this existing database instead of starting PostgreSQL (e.g. a team's host)"
    )
    artifacts_destination: str | None = Field(None, description="artifact store; null = <state_dir>/artifacts")
    startup_timeout_s: float = Field(60.0, gt=0)
