"""AdamW and a lambda lr schedule, numerically torch's (`torch.optim.AdamW`, `LambdaLR`), without `torch.optim`.

Why not torch's: every `torch.optim.Optimizer` method is wrapped in `torch._disable_dynamo`, whose first
call imports `torch._dynamo` — about 1.3 s of a 27 s `make train-linear` on a 2-core machine, paid by every
process that trains (each sweep trial, each test that trains), for a compiler the default run never uses.

Both keep torch's state-dict layout, so checkpoints move between them in either direction:

    optimizer  {"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{lr, betas, ..., "params": [i]}]}
    scheduler  {"base_lrs", "last_epoch", "_last_lr", "_step_count"}   (LambdaLR's keys; its lambdas are code)

The update is torch's single-tensor AdamW (its CPU default) written with `torch._foreach_*` ops, which
run the same per-element kernels: parameters match torch's to the last bit (tests/test_adamw.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

ParamGroup = dict[str, Any]


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), amsgrad off, dense gradients.

    `groups`: torch-style parameter groups (`{"params": [...], "weight_decay": ...}`), each falling back
    to the keyword defaults. A parameter without a gradient at a step is left alone and its step count
    does not advance, as in torch."""

    def __init__(
        self,
        groups: Iterable[ParamGroup],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        self.defaults: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups: list[ParamGroup] = [{**self.defaults, **g, "params": list(g["params"])} for g in groups]
        if not any(g["params"] for g in self.param_groups):
            raise ValueError("optimizer got an empty parameter list")
        self.state: dict[torch.Tensor, dict[str, Any]] = {}  # per parameter: step (int), exp_avg, exp_avg_sq

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            # foreach ops take one device and dtype per call (a model's parameters usually share both)
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("AdamW does not support sparse gradients")
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                states = [self._state(p) for p in params]
                for s in states:
                    s["step"] += 1
                grads = [p.grad for p in params]
                exp_avgs = [s["exp_avg"] for s in states]
                exp_avg_sqs = [s["exp_avg_sq"] for s in states]
                if wd != 0:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
                # torch's arithmetic, in its order: step size lr / (1 - beta1^t), denominator
                # sqrt(v) / sqrt(1 - beta2^t) + eps
                step_sizes = [-(lr / (1 - beta1 ** s["step"])) for s in states]
                denoms = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_div_(denoms, [(1 - beta2 ** s["step"]) ** 0.5 for s in states])
                torch._foreach_add_(denoms, eps)
                torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        if p not in self.state:
            zeros = lambda: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
            self.state[p] = {"step": 0, "exp_avg": zeros(), "exp_avg_sq": zeros()}
        return self.state[p]

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: parameters by their index over the groups; `step` a float tensor. The moment
        tensors are live, not copies (as torch's)."""
        index = {p: i for i, p in enumerate(self._params())}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
            for g in self.param_groups
        ]
        state = {
            index[p]: {"step": torch.tensor(float(s["step"])), "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
            for p, s in self.state.items()
            if p in index
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load our or torch's AdamW state dict. ValueError (one line, naming the entry) when it does not
        fit these parameters: group count or sizes, a moment's shape, a step that is not a count."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{len(saved_groups)} parameter groups saved, the optimizer has {len(self.param_groups)}")
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("a saved parameter group does not match the size of the optimizer's group")
        by_index = {
            i: p
            for saved, group in zip(saved_groups, self.param_groups, strict=True)
            for i, p in zip(saved["params"], group["params"], strict=True)
        }
        state: dict[torch.Tensor, dict[str, Any]] = {}
        for i, s in state_dict["state"].items():
            p = by_index.get(int(i))
            if p is None:
                raise ValueError(f"state for parameter {i}, which no group holds")
            for key in ("exp_avg", "exp_avg_sq"):
                value = s.get(key)
                if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                    raise ValueError(f"{key} has shape {getattr(value, 'shape', None)}, its parameter {tuple(p.shape)}")
            step = float(s["step"]) if isinstance(s.get("step"), (torch.Tensor, int, float)) else math.nan
            if not (math.isfinite(step) and step >= 0 and step == int(step)):
                raise ValueError(f"step is {s.get('step')!r}, not a count")
            state[p] = {
                "step": int(step),
                "exp_avg": s["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
                "exp_avg_sq": s["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone(),
            }
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k in ("lr", "initial_lr", "eps", "weight_decay")})
            group["betas"] = tuple(saved.get("betas", group["betas"]))
        self.state = state


class LambdaSchedule:
    """Every group's lr is its base lr times `factor(step)`, `step` counting `step()` calls from 0:
    torch's `LambdaLR` (its `initial_lr`, `base_lrs`, `last_epoch`), on `AdamW`."""

    def __init__(self, optimizer: AdamW, factor: Callable[[int], float]) -> None:
        self.optimizer, self.factor = optimizer, factor
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs: list[float] = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        f = self.factor(self.last_epoch)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lrs": list(self.base_lrs),
            "last_epoch": self.last_epoch,
            "_step_count": self.last_epoch + 1,
            "_last_lr": self.get_last_lr(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Our or LambdaLR's state dict; ValueError if it does not fit the optimizer."""
        base_lrs, last = list(state_dict["base_lrs"]), state_dict["last_epoch"]
        if len(base_lrs) != len(self.optimizer.param_groups):
            groups = len(self.optimizer.param_groups)
            raise ValueError(f"{len(base_lrs)} base lrs saved, the optimizer has {groups} groups")
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise ValueError(f"last_epoch is {last!r}, not a step count")
        self.base_lrs, self.last_epoch = [float(b) for b in base_lrs], last
        self._apply()
