"""The schemas of one training run: data, model, optimiser, trainer, tracking."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from picollm.config.base import RULE_FAMILIES, Beta, Family, Seed, StrictModel, model_name_problem
from picollm.config.reference_results import ReferenceResults
from picollm.model.config import ModelConfig

NEW_RULE_FAMILIES = {"arithmetic": "arithmetic_steps", "geometric": "geometric_ratios"}  # family -> its held-out rules


class DataConfig(StrictModel):
    """Synthetic integer sequences. Values live in Z_M with M = vocab_size - 1 (modular arithmetic),
    so no sequence sticks at a bound and sequences of any length stay inside the trained range.
    Token M (the last id) is the pad token."""

    seq_types: list[Family] = Field(default_factory=lambda: list(RULE_FAMILIES), min_length=1)
    """families drawn, each listed once; the default is the five rule families, the recall families mqar and copy are
    drawn only when listed"""
    vocab_size: int = Field(128, ge=8, le=65536)
    """values are 0..vocab_size-2 (residues modulo M = vocab_size - 1) and token vocab_size-1 is the pad; the default
    steps and ratios need at least 14"""
    min_len: int = Field(8, ge=3)
    """shortest rule-family sequence; lengths are drawn uniformly in min_len..max_len"""
    max_len: int = Field(32, ge=3)
    """longest rule-family sequence; mqar (2P + 2Q tokens) and copy (2n tokens) must fit in it too"""
    n_train: int = Field(2000, ge=1)
    """training sequences per family"""
    n_val: int = Field(80, ge=1)
    """validation sequences per family"""
    n_test: int = Field(80, ge=1)
    """test sequences per family"""
    held_out_share: float = Field(0.15, gt=0, lt=0.5)
    """share of each family's generators that val, and test, each hold (never in train)"""
    seed: Seed = Field(0)
    """data generation seed: the cut of generators into splits and the draws"""
    split: Literal["generators", "new_rules"] = Field("generators")
    """how val and test differ from train. `generators`: held-out generators (starts, steps, (a, b) pairs) of rules
    that train holds too, mostly a lookup test (their transitions occur in training). `new_rules`: held-out arithmetic
    steps and geometric ratios (held_out_share of each list for val, and for test, at least one each), so val/test
    transitions are new to the model: seq_types may list only arithmetic and geometric"""
    start_range: tuple[int, int] | None = Field(None)
    """inclusive [lo, hi] range of first values; null = every value 0..M-1"""
    arithmetic_steps: list[int] = Field(default_factory=lambda: [2, 3, 4, 5], min_length=1)
    """common differences d: distinct modulo M, not 0, not 1 (step 1 is the counting family)"""
    geometric_ratios: list[int] = Field(default_factory=lambda: [2, 3], min_length=1)
    """ratios r: distinct modulo M, not 0 or 1 (the sequence would stick)"""
    walk_steps: list[int] = Field(default_factory=lambda: [-1, 1], min_length=1)
    """random-walk steps, one drawn uniformly per position"""
    # The recall families (picollm.generators): keys are tokens 0..K-1, values K..K+V-1.
    mqar_pairs: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [4], min_length=1)
    """mqar: numbers of key-value pairs P; each sequence draws one uniformly (a list is a curriculum mixture)"""
    mqar_key_vocab: int = Field(16, ge=1)
    """mqar: keys are the tokens 0..K-1 (K = mqar_key_vocab, at least the largest P)"""
    mqar_value_vocab: int = Field(16, ge=1)
    """mqar: values are the next V = mqar_value_vocab tokens, K..K+V-1 (disjoint from the keys; K + V ≤ vocab_size - 1,
    V at least the largest P)"""
    mqar_layout: Literal["zoology", "fed_back"] = "zoology"
    """mqar: `zoology` (Arora et al. 2023): the pairs, then queries among noise tokens at power-law gaps; an answer
    is only a target, never an input (the next input is noise or another query). `fed_back` (picollm's first form,
    for teaching): every answer follows its query as the next input, so a model can eliminate the values already
    answered"""
    mqar_length: int | None = Field(None, ge=4)
    """mqar zoology: tokens per sequence (the pairs' 2P, then the query region); null = max_len"""
    mqar_power_a: float = Field(0.01, gt=0, le=1)
    """mqar zoology: the query gaps' power law, p(gap g) ~ g^(a-1) for g = 1..(L - 2P)/2 (Zoology's power_a; 1 is
    uniform, small values put the queries near the pairs)"""
    mqar_queries: int | None = Field(None, ge=1)
    """mqar: queries per sequence, distinct keys in random order (at most the fewest mqar_pairs); null = every key
    once"""
    copy_len: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [8], min_length=1)
    """copy: segment lengths n, each sequence draws one uniformly (2n tokens, within max_len)"""

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
        if self.split == "new_rules":
            self._check_new_rules()
        return self

    def _check_new_rules(self) -> None:
        """Only families with a rule parameter to hold out, each with a rule for train, val and test."""
        other = [f for f in self.seq_types if f not in NEW_RULE_FAMILIES]
        if other:
            raise ValueError(
                f"split new_rules holds out arithmetic steps and geometric ratios; seq_types may list only "
                f"{' and '.join(NEW_RULE_FAMILIES)}, not {', '.join(other)} (no rule of theirs can be held out)"
            )
        for fam, key in NEW_RULE_FAMILIES.items():
            if fam in self.seq_types and len(getattr(self, key)) < 3:
                raise ValueError(f"split new_rules needs at least 3 {key} (one each for train, val and test)")

    def recall_problem(self, family: str) -> str | None:
        """Why `family` (mqar or copy) cannot be drawn with these settings, or None. The generators ask
        again: a config changed with `model_copy(update=...)` skips validation."""
        if family == "mqar":
            pairs, k, v = max(self.mqar_pairs), self.mqar_key_vocab, self.mqar_value_vocab
            queries = self.mqar_queries or pairs
            zoology = self.mqar_layout == "zoology"
            if k + v + zoology > self.modulus:
                noise = " and at least one noise token" if zoology else ""
                return (
                    f"mqar_key_vocab + mqar_value_vocab ({k} + {v}){noise} exceeds the {self.modulus} values of "
                    f"vocab_size {self.vocab_size} (keys, values and noise are disjoint tokens; the last id is the pad)"
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
            length = (self.mqar_length or self.max_len) if zoology else self.max_len
            if 2 * pairs + 2 * queries > length:
                where = "mqar_length (null: max_len)" if zoology else "max_len"
                return (
                    f"mqar sequences of {pairs} pairs and {queries} queries need {2 * pairs + 2 * queries} tokens, "
                    f"more than {where} ({length})"
                )
        if family == "copy" and 2 * max(self.copy_len) > self.max_len:
            n = max(self.copy_len)
            return f"copy sequences of copy_len {n} have {2 * n} tokens, more than max_len ({self.max_len})"
        return None


class OptimConfig(StrictModel):
    """The optimiser and its schedule (picollm/optim.py), shared by the `train`, `sft` and `dpo` sections:
    AdamW, linear warmup, cosine decay to lr * min_lr_ratio, gradient clipping."""

    lr: float = Field(3e-3, gt=0)
    """AdamW peak learning rate, reached after warmup_steps"""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """final lr of the cosine decay, as a fraction of lr"""
    warmup_steps: int = Field(20, ge=0)
    """linear warmup steps (at most half of all steps)"""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay, on weight matrices only (not norms, biases, embeddings)"""
    betas: tuple[Beta, Beta] = Field((0.9, 0.98))
    """AdamW betas, each in [0, 1)"""
    grad_clip: float | None = Field(1.0, gt=0)
    """max gradient norm; null = off"""


class TrainConfig(OptimConfig):
    epochs: int = Field(10, ge=1)
    """passes over the training split"""
    batch_size: int = Field(64, ge=1)
    """sequences per optimizer step (batches group similar lengths, so little padding)"""
    loss_on: Literal["all", "predictable"] = Field("all")
    """train on every target, or only on those whose Bayes ceiling is 1 (mqar answers and last query, copy's repeat,
    the rule families' certain steps; as Zoology); train/loss is then over those"""
    seed: Seed = Field(0)
    """seed of the initialisation, batch order and dropout; same seed, same metrics on CPU"""
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto")
    """where the model trains; auto = CUDA if available, else MPS, else CPU"""
    num_threads: int | None = Field(None, ge=1)
    """torch CPU threads; null = torch default"""
    early_stopping_patience: int | None = Field(None, ge=1)
    """stop after this many epochs without val/loss improving and keep the best weights; null = off"""
    log_every: int = Field(10, ge=1)
    """log train/loss_step every N optimizer steps (metrics are written in batches once per epoch)"""
    checkpoint_every: int = Field(1, ge=1)
    """log the checkpoint artifact every N epochs (and always at the end)"""
    eval_batch_size: int = Field(256, ge=1)
    """sequences per evaluation batch"""
    peak_flops: float | None = Field(None, gt=0)
    """FLOP/s used for MFU; null = this machine's measured fp32 matmul peak"""
    precision: Literal["auto", "fp32", "bf16"] = Field("auto")
    """bf16 autocast for matmuls (losses, softmax statistics and the linear-attention state and normaliser stay fp32);
    auto = bf16 on a CUDA GPU that supports it, else fp32"""
    compile: bool = Field(False)
    """torch.compile the model for training (CUDA, or a C++ compiler on CPU); worth it on a GPU, on a 2-core CPU
    compiling takes minutes"""
    nonfinite: Literal["stop", "skip_batch"] = Field("stop")
    """on a NaN/inf loss: stop the run (FAILED, the last good checkpoint kept), or skip that batch (counted in
    train/skipped_batches) and go on"""
    max_skipped_batches: int = Field(10, ge=0)
    """with nonfinite=skip_batch, stop once more batches than this were skipped in all"""
    system_metrics: bool = Field(False)
    """log MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network; GPU with nvidia-ml-py)
    every 10 s while the run is open"""


class TrackingConfig(StrictModel):
    uri: str | None = Field(None)
    """tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd"""
    experiment: str = Field("picollm", min_length=1)
    """MLflow experiment (at most 500 characters)"""
    run_name: str | None = Field(None)
    """MLflow run name; null = one the flow makes (training: <attention>-<pos_encoding>-seed<k>-<MMDD-HHMMSS>, UTC)"""
    registered_model: str | None = Field("picollm-baseline")
    """register the model under this name; null = don't register"""
    log_model: bool = Field(True)
    """log the model at the end of the run"""
    lock_timeout_s: float = Field(60.0, ge=0)
    """seconds a store write retries while SQLite is locked by another writer, then exit 1"""
    http_timeout_s: float = Field(30.0, ge=3)
    """seconds one request to an http(s) tracking server may take, retries included"""

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
    """Synthetic integer sequences: values live in Z_M with M = vocab_size - 1 and token M is the pad; splits are
    disjoint by generator."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The Transformer and its token mixer."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The trainer: AdamW with linear warmup and cosine decay, batches, evaluation and checkpoints."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Where the run is logged (MLflow) and what is registered."""
    reference: ReferenceResults | None = Field(None)
    """The results this config should reproduce (the docs' numbers) with tolerances from the seeds' spread; a run
    ends with `matches the reference` or names the metrics that drifted, and is tagged `reproduced`. null = no
    check."""

    @model_validator(mode="after")
    def _link_model_to_data(self) -> TrainRunConfig:
        link_vocab(self.model, self.data)
        if self.model.pos_encoding == "learned" and self.data.max_len > self.model.max_seq_len:
            raise ValueError(f"data.max_len ({self.data.max_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        return self
