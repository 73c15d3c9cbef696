from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from picollm.config import DataConfig, ModelConfig, TrainConfig
from picollm.data.splits import build_data, to_padded
from picollm.model.transformer import Transformer
from picollm.training.evaluation import accuracy_metrics, evaluate, predict_split
from picollm.training.optim import lr_lambda
from picollm.training.trainer import Trainer, lm_loss

# --------------------------------------------------------------------------------------------------
# Loss


class TableModel(nn.Module):
    """logits = table[input token]: the loss can be worked out by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.table[inputs]


def test_lm_loss_is_hand_computed_cross_entropy():
    table = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 3.0, 0.0], [1.0, 1.0, 1.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    pad = 3
    tokens = torch.tensor([[0, 1, 2, 3], [2, 0, 3, 3]])
    # non-pad (input -> target) pairs: 0->1, 1->2, 2->0; every pair with target 3 (the pad) is ignored
    pairs = [(0, 1), (1, 2), (2, 0)]

    def nll(i: int, t: int) -> float:
        row = table[i].tolist()
        return -(row[t] - math.log(sum(math.exp(x) for x in row)))

    expected = sum(nll(i, t) for i, t in pairs) / len(pairs)
    loss, n = lm_loss(TableModel(table), tokens, pad)
    assert n == 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule


def test_lr_lambda_warmup_then_cosine():
    f = lr_lambda(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)  # cosine starts at the top
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert f(14) == pytest.approx(0.1)
    assert f(30) == pytest.approx(0.1)  # stays at the floor
    after = [f(s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))


def test_lr_lambda_without_warmup():
    f = lr_lambda(warmup=0, total=10, min_ratio=0.0)
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Trainer on tiny data

DATA = DataConfig(vocab_size=32, min_len=5, max_len=10, n_train=8, n_val=4, n_test=4, seed=1)


@pytest.fixture(scope="module")
def splits():
    data = build_data(DATA)
    return {name: to_padded(s, DATA.pad_id, data.families) for name, s in data.splits().items()}


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(attention="linear", d_model=16, n_heads=2, n_layers=1, vocab_size=32, **kw)


def train_cfg(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 8, "lr": 0.01, "warmup_steps": 2, "log_every": 1, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


class Recorder:
    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}
        self.checkpoints: dict[int, dict] = {}
        self.epochs: list[int] = []

    def on_train_start(self, total_steps, steps_per_epoch, start_epoch):
        self.start = (total_steps, steps_per_epoch, start_epoch)

    def on_step(self, step, metrics):
        if metrics:
            self.steps[step] = metrics

    def on_epoch_end(self, epoch, step, metrics):
        self.epochs.append(epoch)

    def on_checkpoint(self, checkpoint, epoch):
        self.checkpoints[epoch] = copy.deepcopy(checkpoint)  # live tensors: copy before training goes on


def fit(splits, tcfg: TrainConfig, mcfg: ModelConfig | None = None, resume=None, seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(mcfg or model_cfg())
    rec = Recorder()
    trainer = Trainer(model, tcfg, torch.device("cpu"))
    result = trainer.fit(splits["train"], lambda m: evaluate(m, splits["val"], "val"), rec, resume=resume)
    return result, rec, trainer


def comparable(history):
    return [{k: v for k, v in h.items() if not k.startswith("throughput/")} for h in history]


def assert_histories_equal(a, b, tol=1e-6):
    a, b = comparable(a), comparable(b)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=tol, rel=tol), k


def test_training_reduces_loss_and_reports_metrics(splits):
    result, rec, _ = fit(splits, train_cfg(epochs=3, lr=0.02))
    assert result.epochs_run == 3 and rec.epochs == [1, 2, 3]
    steps_per_epoch = math.ceil(len(splits["train"]) / 8)
    assert result.steps == 3 * steps_per_epoch
    assert rec.start == (3 * steps_per_epoch, steps_per_epoch, 0)
    h = result.history
    assert h[-1]["train/loss"] < h[0]["train/loss"]
    assert h[0]["train/loss"] < math.log(32) + 0.5  # starts near uniform over the vocabulary
    for key in ("val/loss", "val/accuracy", "val/ceiling", "val/accuracy/counting", "val/perplexity"):
        assert key in h[-1]
    assert h[-1]["val/perplexity"] == pytest.approx(math.exp(h[-1]["val/loss"]))


def test_same_seed_same_metrics(splits):
    a, _, ta = fit(splits, train_cfg(), model_cfg(dropout=0.1))
    b, _, tb = fit(splits, train_cfg(), model_cfg(dropout=0.1))
    assert_histories_equal(a.history, b.history, tol=0)
    for k, v in ta.model.state_dict().items():
        assert torch.equal(v, tb.model.state_dict()[k])
    c, _, _ = fit(splits, train_cfg(seed=5), model_cfg(dropout=0.1))  # another batch order
    assert c.history[-1]["val/loss"] != a.history[-1]["val/loss"]


def test_lr_follows_the_schedule(splits):
    tcfg = train_cfg(epochs=3, warmup_steps=100, min_lr_ratio=0.2)  # warmup is capped at half the steps
    result, rec, _ = fit(splits, tcfg)
    total = result.steps
    f = lr_lambda(total // 2, total, 0.2)
    for step, m in rec.steps.items():  # logged after `step` scheduler steps
        assert m["lr"] == pytest.approx(0.01 * f(step))
    assert sorted(rec.steps) == list(range(1, total + 1))


def test_log_every_windows_the_loss(splits):
    _, rec, _ = fit(splits, train_cfg(log_every=3))
    assert sorted(rec.steps) == [s for s in range(1, 2 * math.ceil(len(splits["train"]) / 8) + 1) if s % 3 == 0]


def test_resume_equals_uninterrupted(splits):
    tcfg = train_cfg(epochs=2, checkpoint_every=1)
    mcfg = model_cfg(dropout=0.1)  # dropout: the CPU RNG state must be restored too
    straight, rec, _ = fit(splits, tcfg, mcfg)
    assert sorted(rec.checkpoints) == [1, 2]
    ckpt = rec.checkpoints[1]
    assert ckpt["epoch"] == 1 and ckpt["step"] == straight.steps // 2
    resumed, rec2, trainer = fit(splits, tcfg, mcfg, resume=ckpt, seed=123)  # different init: overwritten
    assert rec2.start[2] == 1
    assert rec2.epochs == [2]
    assert resumed.steps == straight.steps
    assert_histories_equal(resumed.history, straight.history)
    final = rec.checkpoints[2]["model"]
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, final[k], atol=1e-6, rtol=1e-6)


def test_early_stopping_restores_the_best_epoch(splits):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0, 0.5])  # best at epoch 2, then 2 epochs without improvement
    states = []

    def fake_eval(model):
        states.append(copy.deepcopy(model.state_dict()))
        return {"val/loss": next(scripted)}

    torch.manual_seed(0)
    trainer = Trainer(Transformer(model_cfg()), train_cfg(epochs=6, early_stopping_patience=2), torch.device("cpu"))
    rec = Recorder()
    result = trainer.fit(splits["train"], fake_eval, rec)
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2
    assert sorted(rec.checkpoints) == [1, 2, 3, 4]  # the last epoch run is always checkpointed
    for k, v in trainer.model.state_dict().items():  # the model handed back is epoch 2's
        assert torch.equal(v, states[1][k])
    assert not torch.equal(states[1]["embed.weight"], states[3]["embed.weight"])


# --------------------------------------------------------------------------------------------------
# Evaluation


def test_evaluation_matches_a_direct_computation(splits):
    torch.manual_seed(0)
    model = Transformer(model_cfg()).eval()
    val = splits["val"]
    preds, correct, nll = predict_split(model, val, batch_size=7)  # batches cut across lengths
    n_ok, n_all, total_nll = 0, 0, 0.0
    with torch.no_grad():
        for i in range(len(val)):
            length = int(val.lengths[i])
            seq = val.tokens[i, :length]
            logits = model(seq[None, :-1])[0]
            targets = seq[1:]
            assert torch.equal(preds[i, : length - 1], logits.argmax(-1))
            n_ok += int((logits.argmax(-1) == targets).sum())
            total_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            n_all += length - 1
    m = accuracy_metrics(val, correct, nll, "val")
    assert m["val/accuracy"] == pytest.approx(n_ok / n_all)
    assert m["val/loss"] == pytest.approx(total_nll / n_all, rel=1e-5)
    ceilings = torch.cat([val.ceilings[i, : int(val.lengths[i]) - 1] for i in range(len(val))])
    assert m["val/ceiling"] == pytest.approx(float(ceilings.mean()))
