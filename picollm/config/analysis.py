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

    model: str | None = Field(
        None, description="model reference: NAME, NAME@ALIAS, NAME/VERSION, models:/..., runs:/... or a run id"
    )
    what: list[Section] = Field(
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
    patching_pairs: int = Field(24, ge=1, description="clean/corrupted prompt pairs per family (patching)")
    patching_length: int = Field(
        12, ge=3, description="tokens per patching prompt (capped at data.max_len - 1); positions of the heatmap"
    )
    probe_kind: Literal["ridge", "logistic"] = Field("ridge", description="ridge: closed form; logistic: Adam steps")
    probe_lambda: float = Field(1e-2, ge=0, description="L2 penalty of the probes (ridge: per training row)")
    probe_steps: int = Field(300, ge=1, description="full-batch Adam steps of a logistic probe")
    probe_lr: float = Field(0.05, gt=0, description="Adam learning rate of a logistic probe")
    probe_train_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of the sequences a probe is fitted on; the rest score it"
    )
    detector_sequences: int = Field(32, ge=1, description="sequences per head-detector prompt set")
    detector_length: int = Field(
        24, ge=4, description="tokens per head-detector sequence (the induction prompt repeats a half of it)"
    )
    interactive_per_family: int = Field(1, ge=1, description="examples per family in interactive/attention.html")
    interactive_positions: int = Field(24, ge=2, description="tokens shown per example of the interactive view")
    seed: int = Field(
        0, description="seed of the randomly initialised baseline model, the prompts, probe splits and detector inputs"
    )
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
