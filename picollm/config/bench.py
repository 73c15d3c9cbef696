"""`make bench`: what it times and on which runs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from picollm.config.base import StrictModel, first_error
from picollm.config.compare import DEFAULT_VARIANTS, Variant
from picollm.config.training import TrackingConfig
from picollm.model.config import ModelConfig


class BenchRunsConfig(StrictModel):
    """Whole training runs timed by the `ddp` and `tracking` bench sections."""

    config: Path = Field(Path("configs/linear.yaml"))
    """training config of the ddp, tracking and breakdown runs"""
    overrides: list[str] = Field(default_factory=list)
    """--set overrides applied to that config"""
    nproc: int = Field(2, ge=2)
    """DDP processes (torchrun, 1 thread each) compared with one process"""
    repeats: int = Field(2, ge=1)
    """interleaved repeats of the tracking runs; the fastest of each counts (noise only adds)"""
    http_server: bool = Field(True)
    """also time the run against a temporary PostgreSQL-backed mlflow server (skipped with a note when PostgreSQL is
    missing)"""
    breakdown_repeats: int = Field(3, ge=1)
    """breakdown section: whole `picollm train` processes, each followed by a reference process; the first is the cold
    run (reported apart), medians are over the rest"""
    reference_epochs: int = Field(10, ge=0)
    """breakdown section: epochs of the pinned reference loop (its default); 0 = skip it"""
    log_model: bool = Field(True)
    """breakdown section: log and register the model, as `make train-linear`"""


class BenchSweepConfig(StrictModel):
    """`picollm sweep` timed by the `sweep` bench section: trials per minute and per-trial overhead."""

    config: Path = Field(Path("configs/sweep_tiny.yaml"))
    """sweep config the timed studies use"""
    overrides: list[str] = Field(default_factory=list)
    """--set overrides applied to that config"""
    trials: int = Field(6, ge=2)
    """finished trials per timed study"""
    workers: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    """worker counts compared"""


class BenchGenerationConfig(StrictModel):
    """Decode time per token of both attentions after contexts of several lengths: the fast path
    (picollm.decoding) vs the general cached forward, side by side in one process."""

    contexts: list[int] = Field(default_factory=lambda: [64, 256, 1024, 4096], min_length=1)
    """prompt lengths before the timed decode steps (the metric step is the context)"""
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    """decoded rows; batches above 1 only at contexts up to 1024"""
    new_tokens: int = Field(32, ge=1)
    """timed decode steps per measurement (median)"""
    repeats: int = Field(3, ge=1)
    """interleaved repeats per (model, context, path): the minimum is reported, median and maximum beside it"""


class BenchConfig(StrictModel):
    """`make bench`: training-step time of the variants vs sequence length, side by side; DDP speedup;
    MLflow's share of a training run's wall time; sweep throughput."""

    sections: list[Literal["steps", "ddp", "tracking", "sweep", "breakdown", "generation"]] = Field(
        default_factory=lambda: ["steps", "ddp", "tracking", "sweep", "breakdown", "generation"], min_length=1
    )
    """what to time: steps (step time per length), ddp (1 process vs torchrun), tracking (MLflow's share of a run's
    wall time), sweep (trials/min), breakdown (a `picollm train` process vs the reference loop), generation (decode
    time per context)"""
    runs: BenchRunsConfig = Field(default_factory=BenchRunsConfig)
    """Whole training runs timed by the ddp, tracking and breakdown sections, in temporary stores."""
    sweep: BenchSweepConfig = Field(default_factory=BenchSweepConfig)
    """`picollm sweep` studies timed by the sweep section, in temporary MLflow and Optuna stores."""
    generation: BenchGenerationConfig = Field(default_factory=BenchGenerationConfig)
    """Decode time per token of every variant after several context lengths, fast path vs cached forward."""
    lengths: list[int] = Field(default_factory=lambda: [32, 256, 1024, 4096], min_length=1)
    """steps section: sequence lengths N"""
    tokens_per_step: int = Field(4096, ge=1)
    """batch size = max(1, tokens_per_step // length)"""
    warmup_steps: int = Field(2, ge=0)
    """untimed steps before the timed ones"""
    timed_steps: int = Field(5, ge=1)
    """timed training steps (repeats: the minimum is reported, the maximum beside it)"""
    vocab_size: int = Field(128, ge=8)
    """token vocabulary of the benchmarked models"""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model shared by the variants; model.vocab_size null = vocab_size above."""
    variants: list[Variant] = Field(
        default_factory=lambda: [Variant.model_validate(v) for v in DEFAULT_VARIANTS], min_length=1
    )
    """timed side by side (steps, generation): model overrides per name; the first is the reference of the ratios"""
    kernels: bool = Field(True)
    """also time the linear-attention forms alone, fwd+bwd (quadratic, chunkwise, the naive cumulative state)"""
    num_threads: int | None = Field(None, ge=1)
    """torch CPU threads; null = torch default"""
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="picollm-bench", registered_model=None, log_model=False)
    )
    """Where the bench run (its results and bench.md) is logged."""

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
            raise ValueError(f"variant {v.name}: {first_error(e, ModelConfig, 'model.')}") from None
