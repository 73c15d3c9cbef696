"""`picollm dpo`: stories to preference pairs, the SFT reference and DPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from picollm.config.base import Seed, StrictModel, model_name_problem
from picollm.config.training import DataConfig, OptimConfig, TrackingConfig, TrainConfig
from picollm.model.config import ModelConfig

# --------------------------------------------------------------------------------------------------
# DPO: `picollm dpo configs/dpo.yaml` (pipelines/dpo.py)

GPT2_VOCAB = 50258  # tiktoken's GPT-2 ranks (50257) plus one pad token as the last id
CORRUPTIONS = ("random_tokens", "swap_tokens", "shuffle_sentences", "other_story", "replace_words")
Corruption = Literal["random_tokens", "swap_tokens", "shuffle_sentences", "other_story", "replace_words"]


class DPODataConfig(StrictModel):
    """Stories (or synthetic sequences) cut into prompt + continuation at sentence boundaries."""

    source: Literal["tinystories", "files", "synthetic"] = Field("tinystories")
    """tinystories: the Hugging Face hub dataset, streamed; files: stories under path; synthetic: integer sequences
    (data.synthetic)"""
    dataset: str = Field("roneneldan/TinyStories", min_length=1)
    """hub dataset of source tinystories"""
    split: str = Field("train", min_length=1)
    """hub split of source tinystories"""
    path: str | None = Field(None)
    """source files: a .txt/.jsonl file, a directory of them, or a glob; .txt stories are separated by blank lines or
    <|endoftext|>"""
    text_field: str = Field("text", min_length=1)
    """the story field of .jsonl rows (and hub rows)"""
    limit: int | None = Field(5000, ge=1)
    """stories read (streamed); null = all"""
    vocab: Literal["compact", "gpt2"] = Field("compact")
    """text sources: compact = the training stories' GPT-2 ids + unk + pad (mapped back to GPT-2 on output); gpt2 = all
    50,258"""
    seq_max_len: int = Field(128, ge=8)
    """longest prompt + continuation, in tokens"""
    prompt_sentences: int = Field(2, ge=1)
    """sentences in the prompt"""
    continuation_sentences: int | None = Field(3, ge=1)
    """sentences in the chosen continuation; null = as many as fit in seq_max_len"""
    min_continuation_tokens: int = Field(4, ge=2)
    """skip stories whose continuation is shorter"""
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """share of stories in val (val_fraction + test_fraction < 0.9)"""
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    """share of stories in test"""
    seed: Seed = Field(0)
    """seed of the story split and the pair sampling"""
    synthetic: DataConfig = Field(default_factory=DataConfig)
    """source synthetic: the sequences, as a training run's data section (splits from its n_train/n_val/n_test)"""
    synthetic_prompt_fraction: float = Field(0.5, gt=0, lt=1)
    """source synthetic: share of a sequence used as the prompt"""

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
    lr: float = Field(5e-4, gt=0)
    """AdamW peak learning rate, reached after warmup_steps"""
    warmup_steps: int = Field(10, ge=0)
    """linear warmup steps (at most half of all steps)"""

    reference: str | None = Field(None)
    """registered model or run (any MODEL_REF) to use as reference; null = train an SFT reference"""
    beta: float = Field(0.1, gt=0)
    """β: strength of the tie to the reference (SimPO: scale of the per-token margin)"""
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = Field("sigmoid")
    """the preference loss: sigmoid (DPO), ipo, hinge, or simpo (reference-free, length-averaged log-probs, margin
    simpo_gamma)"""
    simpo_gamma: float = Field(0.5, ge=0)
    """SimPO target reward margin γ (TRL's simpo_gamma)"""
    rpo_alpha: float | None = Field(None, ge=0)
    """add rpo_alpha x the chosen NLL per token (RPO, TRL's rpo_alpha); null = off"""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """conservative DPO ε (loss_type sigmoid and simpo only)"""
    length_normalize: bool = Field(False)
    """divide sequence log-probs by the response length"""
    corruptions: list[Corruption] = Field(default_factory=lambda: ["other_story", "swap_tokens"], min_length=1)
    """schemes that make the rejected continuations, each listed once; pairs cycle through them"""
    swap_k: int = Field(2, ge=1)
    """swap_tokens: adjacent swaps per continuation"""
    replace_k: int = Field(2, ge=1)
    """replace_words: words replaced per continuation"""
    train_pairs: int = Field(2000, ge=1)
    """training pairs (every story with every scheme before a story repeats; a pair whose continuations become equal in
    the compact vocabulary is dropped)"""
    val_pairs: int = Field(200, ge=1)
    """validation pairs"""
    test_pairs: int = Field(200, ge=1)
    """test pairs"""
    evaluate_test: bool = Field(True)
    """score the kept policy on the test pairs; false = validation only (a selection run: the test stories stay
    unseen, the run's table and samples are from val)"""
    batch_size: int = Field(16, ge=1)
    """pairs per step (2x sequences in the forward pass)"""
    max_steps: int = Field(200, ge=1)
    """optimizer steps; the cosine decay runs over them"""
    precision: Literal["auto", "fp32", "bf16"] = Field("auto")
    """bf16 autocast for the policy and reference forward passes (log-probs and their sums stay fp32); auto = bf16 on
    CUDA"""
    eval_every: int = Field(25, ge=1)
    """evaluate on val every N steps (and at step 0 and the last step)"""
    early_stopping_patience: int | None = Field(4, ge=1)
    """stop after this many evaluations without the monitor improving, keeping the best policy; null = off"""
    monitor: Literal["val/loss", "val/accuracy", "val/rewards/accuracies", "val/rewards/margins"] = Field("val/loss")
    """validation metric of early stopping and the best policy (val/loss: lower is better)"""
    log_every: int = Field(5, ge=1)
    """log the windowed train/ metrics every N steps"""
    eval_batch_size: int = Field(32, ge=1)
    """pairs per evaluation batch (also for the reference log-probs)"""
    num_samples: int = Field(4, ge=0)
    """test prompts continued (greedy) by reference and policy"""
    sample_tokens: int = Field(32, ge=1)
    """tokens generated per sample continuation"""
    seed: Seed = Field(0)
    """seed of the batch order and dropout"""

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        if len(set(self.corruptions)) != len(self.corruptions):
            raise ValueError("corruptions lists a scheme twice")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError("label_smoothing applies to loss_type sigmoid and simpo only")
        return self


class DPOTrackingConfig(TrackingConfig):
    experiment: str = Field("picollm-dpo", min_length=1)
    """MLflow experiment (at most 500 characters)"""
    run_name: str | None = Field(None)
    """MLflow run name; null = dpo-<source>-<schemes>-<loss_type>-<MMDD-HHMMSS> (UTC)"""
    registered_model: str | None = Field("picollm-dpo")
    """register the DPO policy under this name; null = don't register"""
    sft_registered_model: str | None = Field("picollm-sft")
    """the SFT reference; null = don't register"""

    @field_validator("sft_registered_model")
    @classmethod
    def _sft_name(cls, name: str | None) -> str | None:
        if name is not None and (problem := model_name_problem(name)):
            raise ValueError(f"not a valid registered model name: {problem}")
        return name


class SFTConfig(TrainConfig):
    """TrainConfig with defaults sized for a 50k-token output head (the logits dominate memory)."""

    epochs: int = Field(3, ge=1)
    """passes over the training stories"""
    batch_size: int = Field(16, ge=1)
    """sequences per optimizer step"""
    eval_batch_size: int = Field(16, ge=1)
    """sequences per evaluation batch"""


class DPORunConfig(StrictModel):
    data: DPODataConfig = Field(default_factory=DPODataConfig)
    """Stories (or synthetic sequences) cut into prompt + continuation at sentence boundaries."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The policy (and SFT reference), as for training; leave model.vocab_size null: it comes from the data (the
    compact vocabulary's size, or 50,258 with data.vocab gpt2)."""
    sft: SFTConfig = Field(default_factory=SFTConfig)
    """SFT of the reference on prompt + true continuation: a training run's train keys, with defaults sized for a large
    output head; its device and num_threads apply to the whole run."""
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    """Preference tuning of the policy against the reference: loss, pairs, optimiser and schedule."""
    tracking: DPOTrackingConfig = Field(default_factory=DPOTrackingConfig)
    """Where the run is logged; the SFT reference is a nested run, policy and reference are registered apart."""

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
