"""picollm.adamw against torch.optim: the same parameters step for step, state dicts that move between them,
the schedule against LambdaLR, and no torch._dynamo import on the training path."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from picollm.config import TrainConfig
from picollm.training import optim
from picollm.training.adamw import AdamW, LambdaSchedule


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 11))


def _groups(model: nn.Module, wd: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 11, (4, 5), generator=g)
    return nn.functional.cross_entropy(model(x).flatten(0, 1), torch.randint(0, 11, (20,), generator=g))


def _train(model: nn.Module, opt, sched, steps: range, freeze_at: int | None = None) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=True)
        _loss(model, step).backward()
        if step == freeze_at:  # a parameter without a gradient this step: left alone, its count paused
            model[2].weight.grad = None
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_equals_torch_step_for_step(foreach: bool) -> None:
    ours, theirs = _model(), _model()
    kw = {"lr": 0.01, "betas": (0.9, 0.98), "eps": 1e-8}
    opt = AdamW(_groups(ours, 0.1), **kw)
    ref = torch.optim.AdamW(_groups(theirs, 0.1), foreach=foreach, **kw)
    f = optim.lr_lambda(3, 12, 0.1)
    sched, ref_sched = LambdaSchedule(opt, f), torch.optim.lr_scheduler.LambdaLR(ref, f)
    for step in range(12):
        _train(ours, opt, sched, range(step, step + 1), freeze_at=5)
        _train(theirs, ref, ref_sched, range(step, step + 1), freeze_at=5)
        assert sched.get_last_lr() == ref_sched.get_last_lr()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            # torch's CPU default (single-tensor) runs the same kernels: equal to the bit
            torch.testing.assert_close(a, b, rtol=0, atol=0 if not foreach else 1e-7)
    ours_sd, ref_sd = opt.state_dict(), ref.state_dict()
    assert ours_sd["state"].keys() == ref_sd["state"].keys()
    for i, s in ref_sd["state"].items():
        assert float(ours_sd["state"][i]["step"]) == float(s["step"])  # the frozen one is a step behind
    assert [float(ours_sd["state"][i]["step"]) for i in ours_sd["state"]].count(11.0) == 1


def test_state_dicts_move_between_torch_and_picollm() -> None:
    """A checkpoint written before picollm.adamw (torch's AdamW and LambdaLR) resumes to the same weights."""
    f = optim.lr_lambda(2, 10, 0.1)
    torch_model = _model()
    ref = torch.optim.AdamW(_groups(torch_model, 0.1), lr=0.02)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, f)
    _train(torch_model, ref, ref_sched, range(4))
    saved = copy.deepcopy({"model": torch_model.state_dict(), "opt": ref.state_dict(), "sched": ref_sched.state_dict()})
    _train(torch_model, ref, ref_sched, range(4, 8))  # torch goes on

    resumed = _model(seed=1)
    resumed.load_state_dict(saved["model"])
    opt = AdamW(_groups(resumed, 0.1), lr=0.02)
    sched = LambdaSchedule(opt, f)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert sched.last_epoch == 4 and sched.get_last_lr() == saved["sched"]["_last_lr"]
    _train(resumed, opt, sched, range(4, 8))  # picollm goes on from the same point
    for a, b in zip(resumed.parameters(), torch_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    back_model = _model(seed=2)  # and ours loads into torch's, which goes on as ours does
    back_model.load_state_dict(resumed.state_dict())
    back = torch.optim.AdamW(_groups(back_model, 0.1), lr=0.02)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i, s in back.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], opt.state_dict()["state"][i]["exp_avg"]) and float(s["step"]) == 8.0
    _train(back_model, back, None, range(8, 10))
    _train(resumed, opt, None, range(8, 10))
    for a, b in zip(back_model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd["param_groups"].pop(), "parameter groups saved"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "does not match the size"),
        (lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3)), "exp_avg has shape"),
        (lambda sd: sd["state"][0].update(step=torch.tensor(float("nan"))), "not a count"),
        (lambda sd: sd["state"].update({99: sd["state"][0]}), "no group holds"),
    ],
)
def test_a_state_dict_that_does_not_fit_is_refused_in_one_line(corrupt, message: str) -> None:
    model = _model()
    opt = AdamW(_groups(model, 0.1), lr=0.01)
    _train(model, opt, None, range(2))
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    fresh = AdamW(_groups(_model(), 0.1), lr=0.01)
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(sd)
    assert fresh.state == {}  # nothing half-loaded


def test_schedule_refuses_a_state_of_another_shape() -> None:
    opt = AdamW(_groups(_model(), 0.1), lr=0.01)
    sched = LambdaSchedule(opt, lambda s: 1.0)
    with pytest.raises(ValueError, match="base lrs"):
        sched.load_state_dict({"base_lrs": [0.1], "last_epoch": 3})
    with pytest.raises(ValueError, match="last_epoch"):
        sched.load_state_dict({"base_lrs": [0.1, 0.1], "last_epoch": -1})


def test_make_optimizer_is_picollms_with_torchs_defaults() -> None:
    model = _model()
    cfg = TrainConfig(lr=0.004, weight_decay=0.05)
    opt = optim.make_optimizer(model, cfg)
    assert isinstance(opt, AdamW)
    assert opt.param_groups[0]["eps"] == torch.optim.AdamW(model.parameters()).defaults["eps"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_training_never_imports_torch_dynamo() -> None:
    """What picollm.adamw is for: a training run's process does not pay for torch._dynamo's import."""
    code = textwrap.dedent(
        """
        import sys, torch
        from picollm.config import ModelConfig, TrainConfig
        from picollm.model.transformer import Transformer
        from picollm.training.trainer import Trainer, lm_loss
        from picollm.training import optim
        model = Transformer(ModelConfig(attention="linear", vocab_size=16, d_model=16, n_layers=1, n_heads=2))
        trainer = Trainer(model, TrainConfig(device="cpu"), torch.device("cpu"))
        sched = optim.make_scheduler(trainer.optimizer, trainer.cfg, 4)
        loss, _ = lm_loss(model, torch.randint(0, 15, (2, 9)), model.pad_id)
        optim.update(loss, model, trainer.optimizer, sched, 1.0)
        print("torch._dynamo" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
