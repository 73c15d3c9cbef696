"""The schemas of one training run: data, model, optimiser, trainer, tracking."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from picollm.config.base import RULE_FAMILIES, Beta, Family, Seed, StrictModel, model_name_problem


class DataConfig(StrictModel):
    """Synthetic integer sequences. Values live in Z_M with M = vocab_size - 1 (modular arithmetic),
    so no sequence sticks at a bound and sequences of any length stay inside the trained range.
    Token M (the last id) is the pad token."""

    seq_types: list[Family] = Field(
        default_factory=lambda: list(RULE_FAMILIES), min_length=1, description="default: the five rule families"
    )
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
    seed: Seed = 0
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
    # The recall families (picollm.generators): keys are tokens 0..K-1, values K..K+V-1.
    mqar_pairs: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [4], min_length=1, description="key-value pairs; each mqar sequence draws one"
    )
    mqar_key_vocab: int = Field(16, ge=1, description="mqar keys are the tokens 0..mqar_key_vocab-1")
    mqar_value_vocab: int = Field(16, ge=1, description="mqar values are the next mqar_value_vocab tokens")
    mqar_queries: int | None = Field(
        None, ge=1, description="queries per mqar sequence (distinct keys); null = every key once, in random order"
    )
    copy_len: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [8], min_length=1, description="copy segment lengths; each sequence draws one"
    )

    @property
    def modulus(self) -> int:
        return self.vocab_size - 1

    @property
    def pad_id(self) -> int:
        return self.vocab_size - 1

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        m = self.modulus
        if self.min_len > self.max_len and any(f in RULE_FAMILIES for f in self.seq_types):  # recall: own lengths
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
        for fam in ("mqar", "copy"):
            if fam in self.seq_types and (problem := self.recall_problem(fam)):
                raise ValueError(problem)
        return self

    def recall_problem(self, family: str) -> str | None:
        """Why `family` (mqar or copy) cannot be drawn with these settings, or None. The generators ask
        again: a config changed with `model_copy(update=...)` skips validation."""
        if family == "mqar":
            pairs, k, v = max(self.mqar_pairs), self.mqar_key_vocab, self.mqar_value_vocab
            queries = self.mqar_queries or pairs
            if k + v > self.modulus:
                return (
                    f"mqar_key_vocab + mqar_value_vocab ({k} + {v}) exceeds the {self.modulus} values of "
                    f"vocab_size {self.vocab_size} (keys and values are disjoint tokens; the last id is the pad)"
                )
            if pairs > k or pairs > v:
                return (
                    f"mqar_pairs up to {pairs} needs that many distinct keys and values "
                    f"(mqar_key_vocab {k}, mqar_value_vocab {v})"
                )
            if self.mqar_queries is not None and self.mqar_queries > min(self.mqar_pairs):
                return (
                    f"mqar_queries ({self.mqar_queries}) exceeds the fewest mqar_pairs ({min(self.mqar_pairs)}): "
                    "the queries are distinct keys"
                )
            if 2 * pairs + 2 * queries > self.max_len:
                return (
                    f"mqar sequences of {pairs} pairs have {2 * pairs + 2 * queries} tokens, "
                    f"more than max_len ({self.max_len})"
                )
        if family == "copy" and 2 * max(self.copy_len) > self.max_len:
            n = max(self.copy_len)
            return f"copy sequences of copy_len {n} have {2 * n} tokens, more than max_len ({self.max_len})"
        return None


class ModelConfig(StrictModel):
    attention: Literal["softmax", "linear", "gated_linear", "deltanet", "gated_deltanet", "sliding_window"] = "softmax"
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
    feature_map: Literal["elu", "relu", "taylor"] = Field(
        "elu", description="linear, gated_linear: phi = elu(x)+1, relu(x), or Based's 2nd-order Taylor map"
    )
    feature_dim: int | None = Field(
        None, ge=1, le=64, description="taylor: q and k projected to this size per head; null = d_head"
    )
    normalizer: Literal["denominator", "rmsnorm"] = Field(
        "denominator", description="linear, gated_linear: divide by phi(q).z, or RMSNorm each head's output"
    )
    window: int = Field(64, ge=1, description="sliding_window: keys at most window-1 positions back")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        kernel = self.attention in ("linear", "gated_linear")
        wrong = [
            f"{key}={value}"
            for key, value, default, applies in (
                ("feature_map", self.feature_map, "elu", kernel),
                ("normalizer", self.normalizer, "denominator", kernel),
                ("feature_dim", self.feature_dim, None, kernel and self.feature_map == "taylor"),
                ("window", self.window, 64, self.attention == "sliding_window"),
            )
            if value != default and not applies
        ]
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)} does not apply to attention={self.attention}, feature_map={self.feature_map} "
                "(feature_map, normalizer: linear and gated_linear; feature_dim: feature_map taylor; "
                "window: sliding_window)"
            )
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    @property
    def recurrent(self) -> bool:
        """A mixer with a fixed-size state (S, z) rather than a KV cache."""
        return self.attention in ("linear", "gated_linear", "deltanet", "gated_deltanet")

    @property
    def qk_dim(self) -> int:
        """Per-head width of q and k: feature_dim for the taylor map, else d_head."""
        return (self.feature_dim or self.d_head) if self.feature_map == "taylor" else self.d_head

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
    betas: tuple[Beta, Beta] = Field((0.9, 0.98), description="AdamW betas, each in [0, 1)")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null = off")


class TrainConfig(OptimConfig):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    loss_on: Literal["all", "predictable"] = Field(
        "all", description="train on every target, or only on those of Bayes ceiling 1 (mqar answers, as Zoology)"
    )
    seed: Seed = 0
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
    system_metrics: bool = Field(
        False, description="log MLflow's system metrics (system/cpu_utilization_percentage, memory, ...) every 10 s"
    )


class TrackingConfig(StrictModel):
    uri: str | None = Field(None, description="tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = Field("picollm", min_length=1)
    run_name: str | None = None
    registered_model: str | None = Field(
        "picollm-baseline", description="register the model under this name; null = don't register"
    )
    log_model: bool = True
    lock_timeout_s: float = Field(
        60.0, ge=0, description="how long a store write retries while SQLite is locked by another writer"
    )
    http_timeout_s: float = Field(
        30.0, ge=3, description="how long one request to an http(s) tracking server may take, retries included"
    )

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, name: str) -> str:
        if len(name) > 500:  # MLflow's limit
            raise ValueError("must be at most 500 characters")
        return name

    @field_validator("registered_model")
    @classmethod
    def _registered_name(cls, name: str | None) -> str | None:
        if name is not None and (problem := model_name_problem(name)):
            raise ValueError(f"not a valid registered model name: {problem}")
        return name


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
