"""Activation patching (TransformerLens `patching.py`): run the corrupted prompt, replace one
activation by its value on the clean prompt, and measure how much of the clean behaviour returns.

The metric is the logit difference LD = mean logit of the clean answers - mean logit of the
corrupted answers at the last position, averaged over the pairs, and normalised as

    recovered = (LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)

so 0 = the patch changes nothing, 1 = the patch restores the clean answer completely.
Sites: the residual stream per (layer, position) - `hook_resid_pre` of every block and the final
`hook_resid_post` - and, at every position at once, each head's slice of `hook_z` (its output
before the output projection), each layer's `hook_attn_out` and `hook_mlp_out`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from picollm.interp.prompts import PromptPairs
from picollm.model.hooks import HookPoint, act_name
from picollm.model.transformer import Transformer


def logit_diff(logits: torch.Tensor, clean_answers: torch.Tensor, corrupted_answers: torch.Tensor) -> torch.Tensor:
    """Per-pair LD at the last position: logits (n, T, V), answers (n, K) -> (n,)."""
    last = logits[:, -1].float()
    return last.gather(1, clean_answers).mean(1) - last.gather(1, corrupted_answers).mean(1)


@dataclass
class PatchingResult:
    clean_ld: float
    corrupted_ld: float
    resid_sites: list[str]  # "L0 pre", ..., "final": rows of `resid`
    resid: torch.Tensor  # (L + 1, T) recovered fraction per (site, position)
    components: list[str]  # "L0H0", ..., "L0 attn", "L0 mlp", ...
    component_recovered: torch.Tensor  # (C,)


class Patcher:
    """Caches the clean activations of one batch of pairs, then scores any set of patches."""

    def __init__(self, model: Transformer, pairs: PromptPairs) -> None:
        self.model = model.eval()
        self.pairs = pairs
        dev = model.device
        self.clean, self.corrupted = pairs.clean.to(dev), pairs.corrupted.to(dev)
        self.answers = pairs.clean_answers.to(dev), pairs.corrupted_answers.to(dev)
        n = model.cfg.n_layers
        # Not hook_pattern: hooking it switches attention to its explicit (slower, not bit-equal) form.
        names = [name for _, name in resid_sites(n)] + [
            act_name(a, i) for i in range(n) for a in ("z", "attn_out", "mlp_out")
        ]
        with torch.no_grad():
            logits, self.cache = model.run_with_cache(self.clean, names_filter=names)
            self.clean_ld = float(logit_diff(logits, *self.answers).mean())
            self.corrupted_ld = float(logit_diff(model(self.corrupted), *self.answers).mean())

    def recovered(self, fwd_hooks: list[tuple[str, Callable]]) -> float:
        """Normalised LD of the corrupted run with `fwd_hooks` applied (0.0 for no hooks)."""
        with torch.no_grad():
            logits = self.model.run_with_hooks(self.corrupted, fwd_hooks=fwd_hooks)
        return float(self._normalise(logit_diff(logits, *self.answers).mean()))

    def _normalise(self, ld: torch.Tensor) -> torch.Tensor:
        denom = self.clean_ld - self.corrupted_ld  # ~0: clean and corrupted look alike to the model
        return (ld.double() - self.corrupted_ld) / denom if abs(denom) > 1e-9 else torch.full_like(ld, float("nan"))

    def positions(self, name: str) -> torch.Tensor:
        """(T,) recovered fraction when `name` is patched at one position, for every position: the
        corrupted batch is repeated T times and block p patched at position p, so one forward pass
        answers all T patches (the rows do not interact)."""
        n, t = len(self.pairs), self.corrupted.shape[1]
        clean = self.cache[name]

        def fn(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            x = x.clone()
            for p in range(t):
                x[p * n : (p + 1) * n, p] = clean[:, p].to(x.dtype)
            return x

        with torch.no_grad():
            logits = self.model.run_with_hooks(self.corrupted.repeat(t, 1), fwd_hooks=[(name, fn)])
        ld = logit_diff(logits, self.answers[0].repeat(t, 1), self.answers[1].repeat(t, 1)).view(t, n).mean(1)
        return self._normalise(ld).float().cpu()

    # -- patches of whole components: each returns the hooks that write the clean values in --------
    def head(self, layer: int, head: int) -> list[tuple[str, Callable]]:
        name = act_name("z", layer)
        clean = self.cache[name]

        def fn(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            z = z.clone()
            z[:, :, head] = clean[:, :, head].to(z.dtype)
            return z

        return [(name, fn)]

    def whole(self, name: str) -> list[tuple[str, Callable]]:
        clean = self.cache[name]
        return [(name, lambda x, hook: clean.to(x.dtype).clone())]


def resid_sites(n_layers: int) -> list[tuple[str, str]]:
    """(label, hook name) of the residual-stream sites, input of every block then the final output."""
    sites = [(f"L{i} pre", act_name("resid_pre", i)) for i in range(n_layers)]
    return [*sites, ("final", act_name("resid_post", n_layers - 1))]


def patch_all(model: Transformer, pairs: PromptPairs) -> PatchingResult:
    """Every residual (site, position), then every head, attention layer and MLP of `model`."""
    p = Patcher(model, pairs)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sites = resid_sites(n_layers)
    resid = torch.stack([p.positions(name) for _, name in sites])
    components: list[str] = []
    values: list[float] = []
    for layer in range(n_layers):
        for head in range(n_heads):
            components.append(f"L{layer}H{head}")
            values.append(p.recovered(p.head(layer, head)))
        for what in ("attn", "mlp"):
            components.append(f"L{layer} {what}")
            values.append(p.recovered(p.whole(act_name(f"{what}_out", layer))))
    return PatchingResult(p.clean_ld, p.corrupted_ld, [s for s, _ in sites], resid, components, torch.tensor(values))
