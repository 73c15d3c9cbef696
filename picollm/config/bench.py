"""`make bench`: what it times and on which runs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from picollm.config.base import StrictModel
from picollm.config.compare import DEFAULT_VARIANTS, Variant
from picollm.config.training import ModelConfig, TrackingConfig


class BenchRunsConfig(StrictModel):
    """Whole training runs timed by the `ddp` and `tracking` bench sections."""

    config: Path = Field(Path("configs/linear.yaml"), description="training config the runs use")
    overrides: list[str] = Field(default_factory=list, description="--set overrides applied to that config")
    nproc: int = Field(2, ge=2, description="DDP processes (torchrun) compared with one process")
    repeats: int = Field(2, ge=1, description="interleaved repeats of the tracking runs (the best of each counts)")
    http_server: bool = Field(True, description="also time the run against a temporary PostgreSQL-backed mlflow server")
    breakdown_repeats: int = Field(
        3, ge=1, description="breakdown section: whole `picollm train` processes (and reference runs), alternating"
    )
    reference_epochs: int = Field(
        10, ge=0, description="breakdown section: epochs of the pinned reference loop (its default); 0 = skip it"
    )
    log_model: bool = Field(True, description="breakdown section: log and register the model, as `make train-linear`")


class BenchSweepConfig(StrictModel):
    """`picollm sweep` timed by the `sweep` bench section: trials per minute and per-trial overhead."""

    config: Path = Field(Path("configs/sweep_tiny.yaml"), description="sweep config the timed studies use")
    overrides: list[str] = Field(default_factory=list, description="--set overrides applied to that config")
    trials: int = Field(6, ge=2, description="finished trials per timed study")
    workers: list[int] = Field(default_factory=lambda: [1, 2], min_length=1, description="worker counts compared")


class BenchGenerationConfig(StrictModel):
    """Decode time per token of both attentions after contexts of several lengths: the fast path
    (picollm.decoding) vs the general cached forward, side by side in one process."""

    contexts: list[int] = Field(default_factory=lambda: [64, 256, 1024, 4096], min_length=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1, description="decoded rows")
    new_tokens: int = Field(32, ge=1, description="timed decode steps per measurement (median)")
    repeats: int = Field(3, ge=1, description="interleaved repeats per (model, context, path): median and spread")


class BenchConfig(StrictModel):
    """`make bench`: training-step time of the variants vs sequence length, side by side; DDP speedup;
    MLflow's share of a training run's wall time; sweep throughput."""

    sections: list[Literal["steps", "ddp", "tracking", "sweep", "breakdown", "generation"]] = Field(
        default_factory=lambda: ["steps", "ddp", "tracking", "sweep", "breakdown", "generation"], min_length=1
    )
    runs: BenchRunsConfig = Field(default_factory=BenchRunsConfig)
    sweep: BenchSweepConfig = Field(default_factory=BenchSweepConfig)
    generation: BenchGenerationConfig = Field(default_factory=BenchGenerationConfig)
    lengths: list[int] = Field(default_factory=lambda: [32, 256, 1024, 4096], min_length=1)
    tokens_per_step: int = Field(4096, ge=1, description="batch size = max(1, tokens_per_step // length)")
    warmup_steps: int = Field(2, ge=0)
    timed_steps: int = Field(5, ge=1)
    vocab_size: int = Field(128, ge=8)
    model: ModelConfig = Field(default_factory=ModelConfig)
    variants: list[Variant] = Field(
        default_factory=lambda: [Variant.model_validate(v) for v in DEFAULT_VARIANTS],
        min_length=1,
        description="timed side by side (steps, generation): model overrides per name; the first is the "
        "reference of the ratios",
    )
    kernels: bool = Field(True, description="also time the linear-attention forms alone (fwd+bwd)")
    num_threads: int | None = Field(None, ge=1)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="picollm-bench", registered_model=None, log_model=False)
    )

    @model_validator(mode="after")
    def _vocab(self) -> BenchConfig:
        if self.model.vocab_size is None:
            self.model.vocab_size = self.vocab_size
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variants: a name is used twice (names must be unique)")
        if any(v.models is not None or v.train for v in self.variants):
            raise ValueError("variants: the bench times fresh models: give only name and model")
        for v in self.variants:
            self.variant_model(v)
        return self

    def variant_model(self, v: Variant, **update: object) -> ModelConfig:
        """The `model` section with the variant's overrides (and `update`, e.g. max_seq_len)."""
        try:
            return ModelConfig.model_validate({**self.model.model_dump(mode="json"), **v.model, **update})
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            raise ValueError(f"variant {v.name}: model.{loc}: {msg}") from None
