"""Head detection in the manner of TransformerLens's `detect_head` ("mul" error measure):

    score = sum(pattern * detection) / sum(pattern)    over the scored query rows

i.e. the share of a head's attention that falls on the query-key pairs the detection pattern
marks. Differences from TransformerLens: scores are averaged over a batch of sequences, and only
query rows where the detection pattern marks at least one key are scored (TransformerLens scores
every row, so a perfect previous-token head gets (n - 1) / n there, not 1).

Detection patterns, each (B, N, N) and lower-triangular:
  previous_token  key q - 1;  k_back_k  key q - k;  first_token  key 0 (rows q >= 1)
  duplicate       earlier keys holding the query's token (TransformerLens's duplicate_token_head)
  induction       the key just after an earlier occurrence of the query's token (induction_head)
"""

from __future__ import annotations

import torch

from picollm.interp.analysis import run_cached
from picollm.model.hooks import act_name
from picollm.model.transformer import Transformer


def k_back_pattern(n: int, k: int) -> torch.Tensor:
    """(N, N) with ones at (q, q - k)."""
    return torch.diag(torch.ones(max(n - k, 0)), -k) if k < n else torch.zeros(n, n)


def first_token_pattern(n: int) -> torch.Tensor:
    p = torch.zeros(n, n)
    p[1:, 0] = 1.0
    return p


def duplicate_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, N): 1 where key j < q holds the same token as query q."""
    eq = (tokens[:, :, None] == tokens[:, None, :]).float()
    return torch.tril(eq, diagonal=-1)


def induction_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, N): 1 at key j + 1 wherever key j < q holds the query's token (the token that followed
    its earlier copy), lower-triangular as in TransformerLens."""
    dup = duplicate_pattern(tokens)
    shifted = torch.zeros_like(dup)
    shifted[:, :, 1:] = dup[:, :, :-1]  # duplicate at key j -> attend to key j + 1
    return torch.tril(shifted)


def detection_score(pattern: torch.Tensor, detection: torch.Tensor) -> torch.Tensor:
    """pattern (B, H, N, N), detection (B, N, N) or (N, N) -> (H,) scores in [0, 1]."""
    det = detection.expand(pattern.shape[0], *detection.shape[-2:]).double()
    p = pattern.double().clamp(min=0)
    rows = (det.sum(-1) > 0)[:, None, :, None].double()  # (B, 1, N, 1): scored query rows
    hit = (p * det[:, None] * rows).sum((0, 2, 3))
    total = (p * rows).sum((0, 2, 3))
    return (hit / total.clamp(min=1e-12)).float()


def head_patterns(model: Transformer, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(B, L, H, N, N) attention patterns: each mixer's hook_pattern (softmax weights, kernel weights,
    or the delta rule's value-to-output matrix, whose negative entries the scores clamp to 0)."""
    names = [act_name("pattern", i) for i in range(model.cfg.n_layers)]
    cache = run_cached(model, tokens, names, batch_size)
    return torch.stack([cache[n] for n in names], 1)


def detect_heads(
    model: Transformer, plain: torch.Tensor, repeated: torch.Tensor, max_k: int = 3, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Scores (L, H) per detector: positional detectors on `plain` sequences of distinct random
    tokens, duplicate/induction on `repeated` ones (a random half followed by itself)."""
    pat = head_patterns(model, plain, batch_size)
    n = plain.shape[1]
    dets: dict[str, torch.Tensor] = {"previous_token": k_back_pattern(n, 1)}
    dets.update({f"k_back_{k}": k_back_pattern(n, k) for k in range(2, max_k + 1) if k < n})
    dets["first_token"] = first_token_pattern(n)
    out = {name: torch.stack([detection_score(pat[:, i], d) for i in range(pat.shape[1])]) for name, d in dets.items()}
    rep = head_patterns(model, repeated, batch_size)
    for name, d in (("duplicate", duplicate_pattern(repeated)), ("induction", induction_pattern(repeated))):
        out[name] = torch.stack([detection_score(rep[:, i], d) for i in range(rep.shape[1])])
    return out
