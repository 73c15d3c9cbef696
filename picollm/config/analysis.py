"""`picollm analyze`: the interpretability report of one model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from picollm.config.base import StrictModel
from picollm.config.training import TrackingConfig

ANALYSIS_SECTIONS = (
    "embeddings",
    "attention",
    "activations",
    "ablation",
    "patching",
    "logit_lens",
    "probes",
    "heads",
    "interactive",
)
Section = Literal[
    "embeddings", "attention", "activations", "ablation", "patching", "logit_lens", "probes", "heads", "interactive"
]


class AnalysisConfig(StrictModel):
    """`picollm analyze MODEL_REF`: interpretability report of a trained model, logged to MLflow."""

    model: str | None = Field(None)
    """model reference: NAME, NAME@ALIAS, NAME/VERSION, models:/..., runs:/... or a run id (the CLI argument sets it)"""
    what: list[Section] = Field(default_factory=lambda: list(ANALYSIS_SECTIONS), min_length=1)
    """sections to compute"""
    split: Literal["train", "val", "test"] = Field("test")
    """split of the regenerated training data"""
    n_per_family: int = Field(80, ge=1)
    """sequences per family from the split (fewer if it has fewer)"""
    attention_positions: int = Field(16, ge=2)
    """positions shown in the attention heatmaps (scores use every position)"""
    max_k_back: int = Field(4, ge=1)
    """k-back attention profile for k = 1..max_k_back"""
    top_neurons: int = Field(24, ge=1)
    """rows of the selective-neuron heatmap"""
    activation_shift: float | None = Field(0.17, ge=0)
    """added to GELU outputs (min about -0.17) before the selectivity index; null = subtract the observed minimum"""
    dead_threshold: float = Field(0.01, ge=0)
    """a neuron never above this on the batch is dead"""
    patching_pairs: int = Field(24, ge=1)
    """clean/corrupted prompt pairs per family (patching)"""
    patching_length: int = Field(12, ge=3)
    """tokens per patching prompt (capped at data.max_len - 1); positions of the heatmap"""
    probe_kind: Literal["ridge", "logistic"] = Field("ridge")
    """ridge: closed form; logistic: Adam steps"""
    probe_lambda: float = Field(1e-2, ge=0)
    """L2 penalty of the probes (ridge: per training row)"""
    probe_steps: int = Field(300, ge=1)
    """full-batch Adam steps of a logistic probe"""
    probe_lr: float = Field(0.05, gt=0)
    """Adam learning rate of a logistic probe"""
    probe_train_fraction: float = Field(0.5, gt=0, lt=1)
    """share of the sequences a probe is fitted on; the rest score it"""
    detector_sequences: int = Field(32, ge=1)
    """sequences per head-detector prompt set"""
    detector_length: int = Field(24, ge=4)
    """tokens per head-detector sequence (capped at model.max_seq_len for learned positions); the induction prompt
    repeats its first half"""
    interactive_per_family: int = Field(1, ge=1)
    """examples per family in interactive/attention.html"""
    interactive_positions: int = Field(24, ge=2)
    """tokens shown per example of the interactive view"""
    seed: int = Field(0)
    """seed of the randomly initialised baseline model, the prompts, probe splits and detector inputs"""
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("cpu")
    """where the model runs; auto = CUDA if available, else MPS, else CPU"""
    batch_size: int = Field(256, ge=1)
    """sequences per forward pass"""
    num_threads: int | None = Field(None, ge=1)
    """torch CPU threads; null = torch default"""
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="picollm-analysis", registered_model=None, log_model=False)
    )
    """Where the analysis run is logged; the analysed model is not logged or registered again."""

    @model_validator(mode="after")
    def _no_repeats(self) -> AnalysisConfig:
        if len(set(self.what)) != len(self.what):
            raise ValueError("what lists a section twice")
        return self
