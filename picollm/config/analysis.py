"""`picollm analyze`: the interpretability report of one model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from picollm.config.base import StrictModel
from picollm.config.training import TrackingConfig

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
