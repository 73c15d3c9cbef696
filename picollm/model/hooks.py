"""TransformerLens-style named hook points, so analysis never re-implements the forward pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]

# Where each activation lives in picollm's Transformer (module attribute paths, TransformerLens names).
_ATTN = ("q", "k", "v", "pattern", "z")
_MLP = ("pre", "post")
_BLOCK = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_TOP = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "normalized": "ln_final.hook_normalized"}


def act_name(name: str, layer: int | None = None) -> str:
    """The hook-point name of an activation, the one place such names are built (TransformerLens's
    `get_act_name`): act_name("pattern", 0) == "blocks.0.attn.hook_pattern", act_name("post", 1) ==
    "blocks.1.mlp.hook_post", act_name("mlp_out", 0) == "blocks.0.hook_mlp_out", act_name("embed") ==
    "hook_embed". A full name ("blocks.0.attn.hook_z") is returned as it is."""
    if name.startswith("hook_") or ".hook_" in name:
        return name
    if name in _TOP:
        if layer is not None:
            raise ValueError(f"{name!r} is not a per-layer activation")
        return _TOP[name]
    if layer is None:
        raise ValueError(f"{name!r} needs a layer")
    if name in _ATTN:
        return f"blocks.{layer}.attn.hook_{name}"
    if name in _MLP:
        return f"blocks.{layer}.mlp.hook_{name}"
    if name in _BLOCK:
        return f"blocks.{layer}.hook_{name}"
    raise ValueError(f"unknown activation {name!r}; known: {', '.join((*_TOP, *_ATTN, *_MLP, *_BLOCK))}")


class HookPoint(nn.Module):
    """Identity module whose name (from `named_modules`) is the hook's address,
    e.g. `blocks.0.attn.hook_pattern`. A hook may return a tensor to replace the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self._fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self._fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._fns:
            out = fn(x, self)
            if out is not None:
                x = out
        return x


class HookedMixin:
    """Adds `hook_points`, `hooks`, `run_with_hooks` and `run_with_cache` to an nn.Module."""

    def _name_hook_points(self) -> None:
        for name, mod in self.named_modules():  # type: ignore[attr-defined]
            if isinstance(mod, HookPoint):
                mod.name = name

    def hook_points(self) -> dict[str, HookPoint]:
        return {n: m for n, m in self.named_modules() if isinstance(m, HookPoint)}  # type: ignore[attr-defined]

    @contextmanager
    def hooks(self, fwd_hooks: list[tuple[str | Callable[[str], bool], HookFn]]) -> Iterator[None]:
        points = self.hook_points()
        added: list[tuple[HookPoint, HookFn]] = []
        try:
            for key, fn in fwd_hooks:
                names = [n for n in points if (key(n) if callable(key) else n == key)]
                if not names:
                    raise KeyError(f"no hook point matches {key!r}; see model.hook_points()")
                for n in names:
                    points[n]._fns.append(fn)
                    added.append((points[n], fn))
            yield
        finally:
            for point, fn in added:
                point._fns.remove(fn)

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks: list, **kwargs) -> torch.Tensor:
        with self.hooks(fwd_hooks):
            return self(tokens, **kwargs)  # type: ignore[operator]

    def run_with_cache(
        self,
        tokens: torch.Tensor,
        names_filter: str | list[str] | Callable[[str], bool] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward pass that also returns the activations at the selected hook points (detached)."""
        if names_filter is None:
            match: Callable[[str], bool] = lambda n: True  # noqa: E731
        elif isinstance(names_filter, str):
            match = lambda n: n == names_filter  # noqa: E731
        elif isinstance(names_filter, list):
            wanted = set(names_filter)
            match = lambda n: n in wanted  # noqa: E731
        else:
            match = names_filter
        cache: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = x.detach()

        names = [n for n in self.hook_points() if match(n)]
        with self.hooks([(n, save) for n in names]):
            logits = self(tokens, **kwargs)  # type: ignore[operator]
        return logits, cache
