"""The logit lens: decode each layer's residual stream through the model's own final norm and head.

Sites are `hook_resid_pre` of block 0 ("embed": token + position embeddings) and `hook_resid_post`
of every block ("L0", "L1", ...); the last site decoded this way is exactly the model's output.
Accuracy and loss are next-token ones on the real (non-pad) targets, per family and over all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from picollm.data.splits import IGNORE_INDEX, inputs_and_targets
from picollm.interp.analysis import run_cached
from picollm.model.hooks import act_name
from picollm.model.transformer import Transformer


def lens_sites(n_layers: int) -> list[tuple[str, str]]:
    """(label, hook name) of every residual-stream site the lens reads, first to last."""
    return [("embed", act_name("resid_pre", 0))] + [(f"L{i}", act_name("resid_post", i)) for i in range(n_layers)]


@torch.no_grad()
def decode(model: Transformer, resid: torch.Tensor) -> torch.Tensor:
    """Logits of a residual stream (..., d) through the final norm and the head."""
    w = next(model.parameters())
    return model.head(model.ln_final(resid.to(device=w.device, dtype=w.dtype)))


@dataclass
class LensResult:
    sites: list[str]
    groups: list[str]  # families, then "all"
    accuracy: torch.Tensor  # (S, F + 1)
    loss: torch.Tensor  # (S, F + 1) nats per target


@torch.no_grad()
def logit_lens(
    model: Transformer,
    tokens: torch.Tensor,
    family_ids: torch.Tensor,
    families: list[str],
    batch_size: int = 256,
    targets: torch.Tensor | None = None,
) -> LensResult:
    """Next-token accuracy and loss of every lens site on right-padded `tokens` (B, N); `targets` (B, N-1)
    where they are not the next tokens."""
    inputs, targets = inputs_and_targets(tokens, model.pad_id, targets)
    sites = lens_sites(model.cfg.n_layers)
    cache = run_cached(model, inputs, [name for _, name in sites], batch_size)
    valid = targets != IGNORE_INDEX
    fam = family_ids[:, None].expand_as(targets)[valid]
    tgt = targets[valid]
    n_fam = len(families)
    acc, loss = torch.zeros(len(sites), n_fam + 1), torch.zeros(len(sites), n_fam + 1)
    for s, (_, name) in enumerate(sites):
        logits = torch.cat([decode(model, chunk).float().cpu() for chunk in cache[name].split(batch_size)])[valid]
        correct = (logits.argmax(-1) == tgt).double()
        nll = F.cross_entropy(logits, tgt, reduction="none").double()
        for f in range(n_fam):
            m = fam == f
            acc[s, f], loss[s, f] = correct[m].mean(), nll[m].mean()
        acc[s, -1], loss[s, -1] = correct.mean(), nll.mean()
    return LensResult([label for label, _ in sites], [*families, "all"], acc, loss)
