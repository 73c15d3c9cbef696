"""The optimisation core (picollm/optim.py) both trainers share: the non-finite guard runs before any
update, early stopping, the checkpoint state, and the optimiser config section."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from picollm.config import DataConfig, DPOConfig, ModelConfig, OptimConfig, SFTConfig, TrainConfig
from picollm.data.splits import build_data, to_padded
from picollm.dpo.pairs import PreferencePair
from picollm.dpo.trainer import DPOTrainer, PairSet, compute_reference_logps
from picollm.errors import TrainingError
from picollm.model.transformer import Transformer
from picollm.training import optim
from picollm.training import trainer as training
from picollm.training.evaluation import evaluate
from picollm.training.optim import EarlyStopping, TrainState
from picollm.training.trainer import Trainer

MODEL = ModelConfig(attention="linear", d_model=16, n_heads=2, n_layers=1, vocab_size=32)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


# --------------------------------------------------------------------------------------------------
# Non-finite losses never reach the weights


def dpo_sets() -> tuple[PairSet, PairSet, nn.Module]:
    torch.manual_seed(0)
    reference = Transformer(MODEL.model_copy(update={"attention": "softmax"})).eval()
    g = torch.Generator().manual_seed(1)

    def make(k: int) -> PairSet:
        rand = lambda n: torch.randint(0, 30, (n,), generator=g).tolist()  # noqa: E731
        return PairSet([PreferencePair(i, "random_tokens", rand(3), rand(4), rand(4)) for i in range(k)], 31)

    train, val = make(16), make(8)
    for pairs in (train, val):
        compute_reference_logps(reference, pairs, 8, torch.device("cpu"))
    return train, val, reference


def test_dpo_nonfinite_loss_leaves_the_policy_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    train, val, reference = dpo_sets()
    cfg = DPOConfig(max_steps=6, eval_every=100, batch_size=4, eval_batch_size=16, lr=0.01, precision="fp32")
    trainer = DPOTrainer(copy.deepcopy(reference), cfg, torch.device("cpu"))
    real, steps, before = DPOTrainer._terms, [], {}

    def terms(self, batch, ref_c, ref_r):
        out = real(self, batch, ref_c, ref_r)
        if not torch.is_grad_enabled():  # step-0 metrics and evaluation
            return out
        steps.append(1)
        if len(steps) < 3:
            return out
        before.update(weights(self.policy))  # the weights after 2 good steps
        return (out[0] * float("nan"), *out[1:])

    monkeypatch.setattr(DPOTrainer, "_terms", terms)
    with pytest.raises(TrainingError) as err:
        trainer.fit(train, val)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("DPO train/loss is not finite at step 3 (epoch 1: nan)")
    assert "lower dpo.lr" in msg and err.value.exit_code == 1
    assert_same_weights(trainer.policy, before)  # bit-identical: the bad step never ran
    assert not all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())  # 2 steps did


def trainer_splits():
    data_cfg = DataConfig(vocab_size=32, min_len=5, max_len=10, n_train=8, n_val=4, n_test=4, seed=1)
    data = build_data(data_cfg)
    return {name: to_padded(s, data_cfg.pad_id, data.families) for name, s in data.splits().items()}


def poisoned_trainer(monkeypatch: pytest.MonkeyPatch, bad_step: int, **cfg) -> tuple[Trainer, dict]:
    """A Trainer whose loss is NaN at `bad_step`; the dict gets the weights just before that step."""
    real, calls, before = Trainer._forward, [], {}

    def forward(self, batch):
        loss, n = real(self, batch)
        calls.append(1)
        if len(calls) != bad_step:
            return loss, n
        before.update(weights(self.model))
        return loss * float("nan"), n

    monkeypatch.setattr(Trainer, "_forward", forward)
    torch.manual_seed(0)
    base = {"epochs": 2, "batch_size": 8, "lr": 0.01, "warmup_steps": 2, "device": "cpu"}
    return Trainer(Transformer(MODEL), TrainConfig(**{**base, **cfg}), torch.device("cpu")), before


def test_trainer_nonfinite_loss_stops_before_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    sp = trainer_splits()
    trainer, before = poisoned_trainer(monkeypatch, bad_step=3)
    with pytest.raises(TrainingError) as err:
        trainer.fit(sp["train"], lambda m: evaluate(m, sp["val"], "val"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("train/loss is not finite at step 3 (epoch 1: nan); training stopped")
    assert_same_weights(trainer.model, before)


def test_trainer_skipped_batch_leaves_the_weights_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    sp = trainer_splits()
    last = math.ceil(len(sp["train"]) / 8)  # the last step of a one-epoch run
    trainer, before = poisoned_trainer(monkeypatch, bad_step=last, epochs=1, nonfinite="skip_batch")
    result = trainer.fit(sp["train"], lambda m: evaluate(m, sp["val"], "val"))
    assert result.steps == last and result.history[-1]["train/skipped_batches"] == 1.0
    assert_same_weights(trainer.model, before)


# --------------------------------------------------------------------------------------------------
# Early stopping


def test_early_stopping_min_mode_counts_patience() -> None:
    model = nn.Linear(2, 1)
    es = EarlyStopping("min", patience=2)
    seen = []
    for at, score in enumerate([3.0, 2.0, 2.5, 2.6], start=1):
        seen.append(es.update(score, at, model))
        if at == 2:
            best = weights(model)
            with torch.no_grad():
                model.weight.add_(1.0)  # later weights differ from the kept copy
        assert es.should_stop == (at == 4)
    assert seen == [True, True, False, False]
    assert (es.best, es.best_at, es.bad) == (2.0, 2, 2)
    es.restore_best(model)
    assert_same_weights(model, best)


def test_early_stopping_max_mode_and_nan() -> None:
    model = nn.Linear(2, 1)
    es = EarlyStopping("max", patience=3, keep_state=False)
    assert es.best == -math.inf
    for at, score in enumerate([0.1, 0.5, 0.4, 0.6, math.nan], start=1):
        es.update(score, at, model)
    assert (es.best, es.best_at, es.bad) == (0.6, 4, 1)  # a NaN score is never the best
    assert es.best_state is None and not es.should_stop
    none = EarlyStopping("min")  # no patience: never stops
    for at in range(10):
        none.update(float(at), at, model)
    assert none.bad == 9 and not none.should_stop


# --------------------------------------------------------------------------------------------------
# Checkpoint state

CHECKPOINT_KEYS = [  # today's checkpoints, and those written before picollm/optim.py, hold exactly these
    "model",
    "optimizer",
    "scheduler",
    "rng_cpu",
    "epoch",
    "step",
    "skipped_batches",
    "history",
    "best",
    "best_epoch",
    "bad_epochs",
    "best_state",
    "config",
]


def test_train_state_round_trip() -> None:
    model = nn.Linear(3, 2)
    state = TrainState(epoch=3, step=42, history=[{"epoch": 1.0, "val/loss": 2.0}], skipped_batches=1)
    state.early.update(2.0, 3, model)
    state.early.update(2.5, 4, model)
    restored = TrainState()
    restored.load_state_dict(state.state_dict())
    assert (restored.epoch, restored.step, restored.history, restored.skipped_batches) == (3, 42, state.history, 1)
    assert restored.early == state.early  # best, best_at, bad (the weights are compared below)
    assert_same_weights(model, restored.early.best_state)
    old = TrainState()  # a checkpoint with only the required keys: defaults for the rest
    old.load_state_dict({"epoch": 2, "step": 10})
    assert (old.epoch, old.step, old.history, old.skipped_batches, old.early.best) == (2, 10, [], 0, math.inf)


def test_checkpoint_keys_and_restore() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    cfg = TrainConfig(lr=0.1, warmup_steps=1)
    opt = optim.make_optimizer(model, cfg)
    sched = optim.make_scheduler(opt, cfg, 10)
    for _ in range(3):
        optim.update(model(torch.randn(4, 3)).pow(2).mean(), model, opt, sched, cfg.grad_clip)
    state = TrainState(epoch=1, step=3)
    ckpt = copy.deepcopy(optim.checkpoint(model, opt, sched, state, {"config": {"x": 1}}))
    assert list(ckpt) == CHECKPOINT_KEYS
    assert set(optim.REQUIRED_CHECKPOINT_KEYS) <= set(ckpt)

    torch.manual_seed(1)
    model2 = nn.Linear(3, 2)
    opt2 = optim.make_optimizer(model2, cfg)
    sched2 = optim.make_scheduler(opt2, cfg, 10)
    state2 = TrainState()
    torch.randn(5)  # moves the RNG: restore sets it back
    optim.restore(ckpt, model2, opt2, sched2, state2)
    assert_same_weights(model2, ckpt["model"])
    assert sched2.get_last_lr() == sched.get_last_lr() and (state2.epoch, state2.step) == (1, 3)
    assert torch.equal(torch.get_rng_state(), ckpt["rng_cpu"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_trainer_checkpoint_keeps_its_keys() -> None:
    sp = trainer_splits()
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, device="cpu", early_stopping_patience=1)
    trainer = Trainer(Transformer(MODEL), cfg, torch.device("cpu"))
    saved = []

    class Save(training.NullCallbacks):
        def on_checkpoint(self, checkpoint, epoch):
            saved.append(copy.deepcopy(checkpoint))

    trainer.fit(sp["train"], lambda m: evaluate(m, sp["val"], "val"), Save(), checkpoint_extra={"config": {}})
    [ckpt] = saved
    assert list(ckpt) == CHECKPOINT_KEYS
    assert (ckpt["epoch"], ckpt["best_epoch"], ckpt["bad_epochs"], ckpt["skipped_batches"]) == (1, 1, 0, 0)
    assert ckpt["best"] == ckpt["history"][0]["val/loss"] and ckpt["best_state"] is not None


# --------------------------------------------------------------------------------------------------
# The optimiser config section


def test_dpo_and_train_configs_inherit_the_optimiser_section() -> None:
    shared = OptimConfig.model_fields
    assert set(shared) == {"lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "grad_clip"}
    for cls in (TrainConfig, SFTConfig, DPOConfig):
        assert issubclass(cls, OptimConfig)
    assert not set(vars(TrainConfig).get("__annotations__", {})) & set(shared)  # none copied
    assert not set(vars(SFTConfig).get("__annotations__", {})) & set(shared)
    # DPOConfig overrides defaults only (TRL's DPOConfig style): same type, bounds and description.
    assert set(vars(DPOConfig)["__annotations__"]) & set(shared) == {"lr", "warmup_steps"}
    for name, base in shared.items():
        field = DPOConfig.model_fields[name]
        assert (field.annotation, field.metadata) == (base.annotation, base.metadata), name
        assert field.description == base.description and base.description, name
    defaults = {name: f.default for name, f in DPOConfig.model_fields.items() if name in shared}
    assert defaults == {
        "lr": 5e-4,
        "min_lr_ratio": 0.1,
        "warmup_steps": 10,
        "weight_decay": 0.0,
        "betas": (0.9, 0.98),
        "grad_clip": 1.0,
    }
    assert TrainConfig().lr == 3e-3 and TrainConfig().warmup_steps == 20 and SFTConfig().warmup_steps == 20


def test_the_trainers_share_the_optimiser() -> None:
    assert training.make_optimizer is optim.make_optimizer and training.lr_lambda is optim.lr_lambda
    torch.manual_seed(0)
    model = Transformer(MODEL)
    cfg = DPOConfig(lr=0.02, weight_decay=0.1, max_steps=8, warmup_steps=100)
    opt = DPOTrainer(model, cfg, torch.device("cpu")).optimizer
    decay, no_decay = opt.param_groups
    assert (decay["lr"], decay["weight_decay"], no_decay["weight_decay"]) == (0.02 * 1 / 4, 0.1, 0.0)  # warmup 4
    assert all(p.dim() >= 2 for p in decay["params"]) and model.embed.weight in no_decay["params"]
