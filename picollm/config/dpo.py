"""`picollm dpo`: stories to preference pairs, the SFT reference and DPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from picollm.config.base import Seed, StrictModel, model_name_problem
from picollm.config.training import DataConfig, ModelConfig, OptimConfig, TrackingConfig, TrainConfig

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
    vocab: Literal["compact", "gpt2"] = Field(
        "compact", description="text: compact = the training stories' GPT-2 ids + unk + pad; gpt2 = all 50,258"
    )
    seq_max_len: int = Field(128, ge=8, description="longest prompt + continuation, in tokens")
    prompt_sentences: int = Field(2, ge=1, description="sentences in the prompt")
    continuation_sentences: int | None = Field(
        3, ge=1, description="sentences in the chosen continuation; null = as many as fit in seq_max_len"
    )
    min_continuation_tokens: int = Field(4, ge=2, description="skip stories whose continuation is shorter")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of stories in val")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of stories in test")
    seed: Seed = 0
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
    def vocab_size(self) -> int | None:
        """The model's vocabulary; None for a compact one (known once the training stories are read)."""
        if self.source == "synthetic":
            return self.synthetic.vocab_size
        return None if self.vocab == "compact" else GPT2_VOCAB


class DPOConfig(OptimConfig):
    # Parameters whose default values are overridden from OptimConfig
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate, reached after warmup_steps")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps (at most half of all steps)")

    reference: str | None = Field(
        None, description="registered model or run to use as reference; null = train an SFT reference"
    )
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = Field(
        "sigmoid", description="simpo: reference-free, length-averaged log-probs, margin simpo_gamma"
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin γ (TRL's simpo_gamma)")
    rpo_alpha: float | None = Field(
        None, ge=0, description="add rpo_alpha x the chosen NLL per token (RPO, TRL's rpo_alpha); null = off"
    )
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
    seed: Seed = 0

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        if len(set(self.corruptions)) != len(self.corruptions):
            raise ValueError("corruptions lists a scheme twice")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError("label_smoothing applies to loss_type sigmoid and simpo only")
        return self


class DPOTrackingConfig(TrackingConfig):
    experiment: str = Field("picollm-dpo", min_length=1)
    registered_model: str | None = Field("picollm-dpo", description="the DPO policy; null = don't register")
    sft_registered_model: str | None = Field("picollm-sft", description="the SFT reference; null = don't register")

    @field_validator("sft_registered_model")
    @classmethod
    def _sft_name(cls, name: str | None) -> str | None:
        if name is not None and (problem := model_name_problem(name)):
            raise ValueError(f"not a valid registered model name: {problem}")
        return name


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
            self.model.vocab_size = vocab  # compact: the flow sets it from the data
        elif vocab is None:
            raise ValueError("model.vocab_size must stay null with data.vocab compact (it comes from the stories)")
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
