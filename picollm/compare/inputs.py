"""What a comparison runs on, built and checked before its parent run exists: the variants' child training
configs (train mode) or their loaded models (registry mode), and the data draws they are evaluated on.

Train mode: one child per (variant, seed), `data.seed + seed` its data draw (compare.resample_data), the same
`train.seed` for every variant of a seed (so the same data order, and the same initial weights wherever the
architectures agree). Registry mode: each variant's `models` are loaded and evaluated on the data of their
training runs (data configs that may differ in `seed` only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from picollm.compare.evaluation import coverage, long_sequences
from picollm.config import CompareConfig, DataConfig, TrackingConfig, TrainRunConfig, validate
from picollm.config.compare import Variant
from picollm.data.splits import PaddedSplit, build_data, to_padded
from picollm.errors import PicollmError
from picollm.model.transformer import Transformer
from picollm.tracking import registry

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One model run of the comparison: a child run, its model and what it measured."""

    variant: str
    label: str  # seed<k> or the model reference
    model: Transformer
    run_id: str = ""
    data_seed: int = 0  # the data it was trained and is evaluated on
    seed: int | None = None  # train.seed (train mode)
    source_run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class EvalSet:
    """One data draw (one data seed): the splits and long sequences its models are evaluated on."""

    data_cfg: DataConfig
    families: list[str]
    splits: dict[str, PaddedSplit]
    long: dict[int, PaddedSplit]  # length factor -> sequences of factor x data.max_len
    coverage: dict[str, dict[str, float]]
    cov_long: dict[int, dict[str, float]]


@dataclass
class Inputs:
    """Everything the comparison needs. The report's coverage, figures and data description use the
    first data seed's draw (`first`)."""

    mode: str
    members: list[Member]  # registry mode: loaded; train mode: filled as children finish
    child_cfgs: dict[tuple[str, int], TrainRunConfig]  # (variant, seed) -> its training config
    data_source: str
    evalsets: dict[int, EvalSet]  # data seed -> its draw

    @property
    def first(self) -> EvalSet:
        return next(iter(self.evalsets.values()))

    @property
    def data_cfg(self) -> DataConfig:
        return self.first.data_cfg

    @property
    def families(self) -> list[str]:
        return self.first.families

    @property
    def train_len(self) -> int:
        return self.data_cfg.max_len


def data_seed(cfg: CompareConfig, seed: int) -> int:
    """The data draw of a seed's runs: its own (data.seed + seed) unless compare.resample_data is off."""
    return cfg.data.seed + seed if cfg.compare.resample_data else cfg.data.seed


def child_config(
    cfg: CompareConfig,
    variant: Variant,
    seed: int,
    run_name: str | None = None,
    register: bool = True,
    d_model: int | None = None,
    **train: float | int,
) -> TrainRunConfig:
    """The training config of `variant` on `seed`: the shared sections with the variant's overrides, its
    data draw, `train` updates (e.g. a grid lr or epochs) and `d_model` (compare.d_models). Registered as
    `<tracking.registered_model>-<variant>` (one version per seed) when `register`."""
    prefix = cfg.tracking.registered_model
    name = run_name or f"{variant.name}-seed{seed}"
    raw = {
        "data": {**cfg.data.model_dump(mode="json"), "seed": data_seed(cfg, seed)},
        "model": cfg.variant_model(variant, d_model).model_dump(mode="json"),
        "train": cfg.variant_train(variant, seed=seed, **train).model_dump(mode="json"),
        "tracking": TrackingConfig(
            uri=cfg.tracking.uri,
            experiment=cfg.tracking.experiment,
            run_name=name,
            registered_model=f"{prefix}-{variant.name}" if prefix and register else None,
            log_model=cfg.tracking.log_model and register,
        ).model_dump(mode="json"),
    }
    return validate(TrainRunConfig, raw, source=f"child config {name}")


def build_inputs(cfg: CompareConfig, say: Callable[[str], None]) -> Inputs:
    cc = cfg.compare
    child_cfgs: dict[tuple[str, int], TrainRunConfig] = {}
    if cc.registry:
        members, data_cfgs, data_source = load_members(cfg)
    else:
        members, data_source = [], "the compare config"
        child_cfgs = {(v.name, s): child_config(cfg, v, s) for s in cc.seeds for v in cc.variants}
        data_cfgs = {data_seed(cfg, s): child_cfgs[(cc.baseline, s)].data for s in cc.seeds}
    if cc.length_factors:
        say(f"drawing length-generalisation sequences ({', '.join(f'{f}x' for f in cc.length_factors)})")
    evalsets = {seed: evalset(cfg, d) for seed, d in data_cfgs.items()}
    return Inputs("registry" if cc.registry else "train", members, child_cfgs, data_source, evalsets)


def evalset(cfg: CompareConfig, data_cfg: DataConfig) -> EvalSet:
    """The splits of one data draw, its long sequences (content-disjoint from every split) and coverage."""
    cc = cfg.compare
    data = build_data(data_cfg)
    families, train_len, pad = data.families, data_cfg.max_len, data_cfg.pad_id
    splits = {name: to_padded(s, pad, families) for name, s in data.splits().items()}
    used = {s.tobytes() for split in data.splits().values() for s in split.sequences}
    held_out = {fam: data.generator_pool("test", fam) for fam in families}  # no training generator
    long_raw = {
        f: long_sequences(data_cfg, f * train_len, cc.n_long, used, held_out) for f in sorted(cc.length_factors)
    }
    cov_long = {f: coverage(data.train, s, data_cfg.modulus) for f, s in long_raw.items()}
    cov = {"test split": coverage(data.train, data.test, data_cfg.modulus)}
    cov |= {f"{f}× ({f * train_len})": c for f, c in cov_long.items()}
    for name, c in cov.items():
        if c["value_coverage"] < 1:  # e.g. a narrow data.start_range: long sequences reach unseen values
            log.warning("%s: only %.1f%% of the values occur in training", name, 100 * c["value_coverage"])
    long = {f: to_padded(s, pad, families) for f, s in long_raw.items()}
    return EvalSet(data_cfg, families, splits, long, cov, cov_long)


def load_members(cfg: CompareConfig) -> tuple[list[Member], dict[int, DataConfig], str]:
    """The referenced models of every variant, each with the data config of its training run (they may
    differ in data.seed only: each model is evaluated on the draw it was trained on)."""
    members: list[Member] = []
    data_cfgs: dict[str, DataConfig] = {}
    for v in cfg.compare.variants:
        expected = v.model.get("attention")
        for ref in v.models or []:
            source = registry.resolve(ref)
            label = source.label.replace(" ", "-")
            model = source.load()  # not registry.load_model: that resolves the store anew, ignoring tracking.uri
            if expected is not None and model.cfg.attention != expected:
                raise PicollmError(
                    f"compare.variants {v.name}: {ref} is a {model.cfg.attention}-attention model, expected {expected}"
                )
            trained = source.training_config()
            seed = trained.data.seed if trained is not None else cfg.data.seed
            history = source.training_history()
            members.append(Member(v.name, label, model, data_seed=seed, source_run_id=source.run_id, history=history))
            if trained is not None:
                data_cfgs[label] = trained.data
    if len({d.model_copy(update={"seed": 0}).model_dump_json() for d in data_cfgs.values()}) > 1:
        raise PicollmError(
            "compare: the referenced models were trained on different data ("
            + ", ".join(data_cfgs)
            + "); compare models trained on the same data config"
        )
    if data_cfgs:
        base, data_source = next(iter(data_cfgs.values())), "the referenced models' training runs"
    else:
        log.warning("no training config found for the referenced models: using the data section of the config")
        base, data_source = cfg.data, "the compare config (no training config found)"
    by_seed = {m.data_seed: base.model_copy(update={"seed": m.data_seed}) for m in members}
    _check_members(cfg, members, base)
    return members, by_seed, data_source


def _check_members(cfg: CompareConfig, members: list[Member], data_cfg: DataConfig) -> None:
    longest = max(cfg.compare.length_factors, default=1) * data_cfg.max_len
    for m in members:
        if m.model.cfg.vocab_size != data_cfg.vocab_size:
            raise PicollmError(
                f"compare: {m.label} has vocab_size {m.model.cfg.vocab_size}, its data {data_cfg.vocab_size}"
            )
        if m.model.cfg.pos_encoding == "learned" and longest > m.model.cfg.max_seq_len:
            raise PicollmError(
                f"compare: {m.label} has learned positions up to {m.model.cfg.max_seq_len}, "
                f"length generalisation needs {longest}"
            )
