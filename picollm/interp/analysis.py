"""Interpretability computations on a trained Transformer, all through its hook points.

Nothing here re-implements the forward pass: activations come from `run_with_cache`, ablations from
`run_with_hooks`. The pure scoring functions (head scores, selectivity, eta squared) take plain
tensors so they can be checked on hand-built numbers.

Conventions
  * attention patterns are (batch, head, query, key); sequences are right-padded, so a query at
    position q < length sees exactly the real keys 0..q.
  * MLP activations are GELU outputs (`blocks.{i}.mlp.hook_post`). GELU's minimum is about -0.170
    (at x = -0.75), so selectivity adds `shift` = 0.17 (or subtracts the observed global minimum)
    to make every activation non-negative before the SI ratio; eta squared is shift-invariant.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from picollm.config import DataConfig
from picollm.data.splits import IGNORE_INDEX, inputs_and_targets, to_padded
from picollm.model.hooks import act_name
from picollm.model.transformer import Transformer
from picollm.runtime.disk_cache import cached_build_data

log = logging.getLogger(__name__)

GELU_MIN = -0.16997  # min_x x * Phi(x), at x = -0.7518
GELU_SHIFT = 0.17  # added to GELU outputs so that they are >= 0 for the selectivity index
_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Running the model in chunks


@torch.no_grad()
def run_cached(
    model: Transformer, tokens: torch.Tensor, names: list[str], batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Activations at `names` for every row of `tokens`, on the CPU. Rows are chunked, but every chunk
    keeps the full padded width, so the per-chunk caches concatenate along the batch dimension."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for chunk in tokens.split(batch_size):
        _, cache = model.run_with_cache(chunk.to(model.device), names_filter=names)
        for n in names:
            parts[n].append(cache[n].float().cpu())
    return {n: torch.cat(v) for n, v in parts.items()}


@torch.no_grad()
def family_losses(
    model: Transformer,
    tokens: torch.Tensor,
    family_ids: torch.Tensor,
    n_families: int,
    fwd_hooks: list | None = None,
    batch_size: int = 256,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy per family, then over all targets: (n_families + 1,), token-weighted.
    `targets` (B, N-1) where they are not the next tokens (zoology's mqar)."""
    model.eval()
    total = torch.zeros(n_families + 1, dtype=torch.float64)
    count = torch.zeros(n_families + 1, dtype=torch.float64)
    lengths = (tokens != model.pad_id).sum(1)
    # Chunks of similar length, each cut to its longest row: right padding costs compute, not accuracy.
    for idx in torch.argsort(lengths, stable=True).split(batch_size):
        width = int(lengths[idx].max())
        chunk, fams = tokens[idx, :width], family_ids[idx]
        explicit = None if targets is None else targets[idx, : width - 1]
        inputs, chunk_targets = inputs_and_targets(chunk.to(model.device), model.pad_id, explicit)
        logits = model.run_with_hooks(inputs, fwd_hooks=fwd_hooks or [])
        nll = F.cross_entropy(
            logits.float().transpose(1, 2), chunk_targets, ignore_index=IGNORE_INDEX, reduction="none"
        ).cpu()
        valid = (chunk_targets != IGNORE_INDEX).cpu()
        per_row, n_row = (nll * valid).sum(1).double(), valid.sum(1).double()
        total[:n_families] += torch.zeros(n_families, dtype=torch.float64).index_add(0, fams, per_row)
        count[:n_families] += torch.zeros(n_families, dtype=torch.float64).index_add(0, fams, n_row)
        total[-1] += per_row.sum()
        count[-1] += n_row.sum()
    return (total / count.clamp(min=1)).float()


# --------------------------------------------------------------------------------------------------
# Embeddings


@dataclass
class EmbeddingAnalysis:
    values: torch.Tensor  # (M,) the number each row stands for
    coords: torch.Tensor  # (M, k) PCA coordinates
    explained: torch.Tensor  # (k,) explained-variance ratios, all components
    cosine: torch.Tensor  # (M, M) cosine similarity of the mean-centred embeddings
    metrics: dict[str, float] = field(default_factory=dict)


def number_tokens(model: Transformer) -> torch.Tensor:
    """Every token id except the pad: the values 0..M-1."""
    ids = torch.arange(model.cfg.vocab_size or 0)
    return ids[ids != model.pad_id]


@torch.no_grad()
def number_embeddings(model: Transformer) -> torch.Tensor:
    """(M, d) embeddings of the number tokens, read at `hook_embed`. Each token is its own length-1
    sequence so no position limit or positional encoding enters."""
    tokens = number_tokens(model)[:, None]
    cache = run_cached(model, tokens, [act_name("embed")], batch_size=len(tokens))
    return cache[act_name("embed")][:, 0]


def pca(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-centred PCA via SVD: (coordinates (n, r), explained-variance ratios (r,))."""
    xc = x.double() - x.double().mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    var = s**2
    return (u * s).float(), (var / var.sum().clamp(min=_EPS)).float()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=_EPS))


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    # Centred first: the embeddings share a common offset that would make every pair look similar.
    xc = x.double() - x.double().mean(0, keepdim=True)
    xn = xc / xc.norm(dim=1, keepdim=True).clamp(min=_EPS)
    return (xn @ xn.T).float()


def analyse_embeddings(emb: torch.Tensor, values: torch.Tensor) -> EmbeddingAnalysis:
    coords, explained = pca(emb)
    cos = cosine_matrix(emb)
    m = len(values)
    off_diag = ~torch.eye(m, dtype=torch.bool)
    # n -> n+1 without the modular wrap (M-1 -> 0): the "number line" neighbours.
    neighbour = torch.diagonal(cos, offset=1)
    corr = [abs(pearson(coords[:, j], values.float())) for j in range(min(3, coords.shape[1]))]
    metrics = {
        "pc1_value_corr": corr[0],
        # the number line need not be the top direction (it is PC2 in some trained models)
        "max_pc_value_corr": max(corr),
        "max_pc_value_corr_index": float(1 + corr.index(max(corr))),
        "explained_var_top2": float(explained[:2].sum()),
        "explained_var_top3": float(explained[:3].sum()),
        "neighbour_cos": float(neighbour.mean()),
        "mean_cos": float(cos[off_diag].mean()),
    }
    return EmbeddingAnalysis(values, coords, explained, cos, metrics)


# --------------------------------------------------------------------------------------------------
# Attention


def query_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) True where the query position holds a real token."""
    return torch.arange(n)[None, :] < lengths[:, None]


def head_scores(pattern: torch.Tensor, lengths: torch.Tensor, max_k: int = 4) -> dict[str, torch.Tensor]:
    """Per-head scores of a (B, H, Q, K) pattern, each (H,), averaged over real query positions q >= 1
    (q = 0 has one allowed key, so it says nothing about a head):

      entropy    -sum_k p log p / log(q + 1): 0 = all weight on one key, 1 = uniform over 0..q
      k_back_k   mean weight on key q - k (over q >= k); k_back_1 is the previous-token score
      pos0       mean weight on key 0
    """
    b, h, n, _ = pattern.shape
    p = pattern.double().clamp(min=0)
    real = query_mask(lengths, n)
    q = torch.arange(n)
    valid = real & (q[None, :] >= 1)  # (B, n)
    w = valid[:, None, :].double()  # broadcast over heads
    denom = w.sum((0, 2)).clamp(min=1)

    plogp = torch.where(p > 0, p * p.clamp(min=_EPS).log(), torch.zeros_like(p)).sum(-1)  # (B, H, n)
    norm = torch.log((q + 1).double()).clamp(min=_EPS)
    entropy = (-plogp / norm) * w
    out = {"entropy": entropy.sum((0, 2)) / denom}
    for k in range(1, max_k + 1):
        if k >= n:
            out[f"k_back_{k}"] = torch.full((h,), math.nan, dtype=torch.float64)
            continue
        diag = torch.diagonal(p, offset=-k, dim1=-2, dim2=-1)  # (B, H, n-k): p[q, q-k] for q = k..n-1
        wk = real[:, None, k:].double()
        out[f"k_back_{k}"] = (diag * wk).sum((0, 2)) / wk.sum((0, 2)).clamp(min=1)
    out["prev_token"] = out["k_back_1"]
    out["pos0"] = (p[..., 0] * w).sum((0, 2)) / denom
    return {k: v.float() for k, v in out.items()}


def mean_pattern(pattern: torch.Tensor, lengths: torch.Tensor, positions: int) -> torch.Tensor:
    """(H, P, P) pattern averaged over the sequences whose query position is a real token
    (NaN where no sequence reaches that position)."""
    p = pattern[:, :, :positions, :positions].double()
    real = query_mask(lengths, p.shape[2]).double()[:, None, :, None]  # (B, 1, P, 1)
    n = real.sum(0)
    mean = (p * real).sum(0) / n.clamp(min=1)
    return torch.where(n > 0, mean, torch.full_like(mean, math.nan)).float()


# --------------------------------------------------------------------------------------------------
# MLP neurons


def family_means(acts: torch.Tensor, family_ids: torch.Tensor, n_families: int) -> torch.Tensor:
    """(F, W) mean activation per family; acts (T, W) over real positions, family_ids (T,)."""
    sums = torch.zeros(n_families, acts.shape[1], dtype=torch.float64).index_add(0, family_ids, acts.double())
    counts = torch.bincount(family_ids, minlength=n_families).double().clamp(min=1)
    return (sums / counts[:, None]).float()


def selectivity_index(means: torch.Tensor) -> torch.Tensor:
    """SI = (mu_max - mu_rest) / (mu_max + mu_rest) per neuron, from (F, W) non-negative family
    means; mu_rest is the mean over the other families. 0 = no preference, 1 = fires for one family."""
    f = means.shape[0]
    if f < 2:
        return torch.zeros(means.shape[1])
    m = means.double()
    mx = m.max(0).values
    rest = (m.sum(0) - mx) / (f - 1)
    return ((mx - rest) / (mx + rest).clamp(min=_EPS)).float()


def eta_squared(acts: torch.Tensor, family_ids: torch.Tensor, n_families: int) -> torch.Tensor:
    """Share of each neuron's variance over positions that the family explains: between-family sum of
    squares / total sum of squares (0 when the neuron is constant)."""
    a = acts.double()
    grand = a.mean(0)
    means = family_means(acts, family_ids, n_families).double()
    counts = torch.bincount(family_ids, minlength=n_families).double()
    between = (counts[:, None] * (means - grand) ** 2).sum(0)
    total = ((a - grand) ** 2).sum(0)
    return torch.where(total > _EPS, between / total.clamp(min=_EPS), torch.zeros_like(total)).float()


@dataclass
class NeuronStats:
    means: torch.Tensor  # (F, W) raw family means
    si: torch.Tensor  # (W,)
    eta2: torch.Tensor  # (W,)
    max_act: torch.Tensor  # (W,)
    dead: torch.Tensor  # (W,) bool
    shift: float


def neuron_stats(
    acts: torch.Tensor,
    family_ids: torch.Tensor,
    n_families: int,
    shift: float | None = GELU_SHIFT,
    dead_threshold: float = 0.01,
) -> NeuronStats:
    """Statistics of every neuron from activations (T, W) at real positions.

    shift: added before SI so activations are non-negative; None = subtract the global minimum.
    A neuron is dead when its activation never exceeds `dead_threshold` on these positions.
    """
    means = family_means(acts, family_ids, n_families)
    s = -float(acts.min()) if shift is None else float(shift)
    if float(acts.min()) + s < -1e-6:
        log.warning("activation minimum %.4f is below -shift (%.4f); SI may be off", float(acts.min()), -s)
    si = selectivity_index((means + s).clamp(min=0))
    max_act = acts.max(0).values
    return NeuronStats(means, si, eta_squared(acts, family_ids, n_families), max_act, max_act <= dead_threshold, s)


# --------------------------------------------------------------------------------------------------
# Mean ablation


def masked_mean(act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, N, ...) over the (B, N) positions where mask is True."""
    m = mask.to(act.dtype).view(*mask.shape, *([1] * (act.dim() - 2)))
    return (act * m).sum((0, 1)) / m.sum().clamp(min=1)


@dataclass
class AblationResult:
    components: list[str]  # "L0H1", ..., "L0 MLP"
    clean: torch.Tensor  # (F + 1,) loss per family, then all
    delta: torch.Tensor  # (C, F + 1) ablated minus clean loss


def mean_ablation(
    model: Transformer,
    tokens: torch.Tensor,
    family_ids: torch.Tensor,
    n_families: int,
    batch_size: int = 256,
    targets: torch.Tensor | None = None,
) -> AblationResult:
    """Delta loss per family when each head's hook_z slice, and each layer's hook_mlp_out, is replaced
    by its mean over all real input positions of the batch."""
    inputs, _ = inputs_and_targets(tokens, model.pad_id)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [act_name("z", i) for i in range(n_layers)] + [act_name("mlp_out", i) for i in range(n_layers)]
    cache = run_cached(model, inputs, names, batch_size)
    real = inputs != model.pad_id
    means = {n: masked_mean(cache[n], real).to(model.device) for n in names}
    clean = family_losses(model, tokens, family_ids, n_families, batch_size=batch_size, targets=targets)

    def replace_head(head: int, mu: torch.Tensor):
        def fn(z: torch.Tensor, hook) -> torch.Tensor:
            z = z.clone()
            z[:, :, head] = mu[head].to(z.dtype)
            return z

        return fn

    def replace_all(mu: torch.Tensor):
        return lambda act, hook: mu.to(act.dtype).expand_as(act).clone()

    components, deltas = [], []
    for layer in range(n_layers):
        for head in range(n_heads):
            hooks = [(act_name("z", layer), replace_head(head, means[act_name("z", layer)]))]
            components.append(f"L{layer}H{head}")
            deltas.append(family_losses(model, tokens, family_ids, n_families, hooks, batch_size, targets) - clean)
    for layer in range(n_layers):
        hooks = [(act_name("mlp_out", layer), replace_all(means[act_name("mlp_out", layer)]))]
        components.append(f"L{layer} MLP")
        deltas.append(family_losses(model, tokens, family_ids, n_families, hooks, batch_size, targets) - clean)
    return AblationResult(components, clean, torch.stack(deltas))


# --------------------------------------------------------------------------------------------------
# The batch every section runs on


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, N) right-padded with the model's pad id
    lengths: torch.Tensor  # (B,)
    family_ids: torch.Tensor  # (B,)
    families: list[str]
    generators: list[dict[str, int]] = field(default_factory=list)  # (B,) e.g. {"start": 5, "step": 3}
    targets: torch.Tensor | None = None  # (B, N-1) where they are not the next tokens (zoology's mqar)

    def rows(self, family: int) -> torch.Tensor:
        return torch.nonzero(self.family_ids == family).flatten()


def analysis_batch(data_cfg: DataConfig, split: str, n_per_family: int, pad_id: int) -> Batch:
    """The first `n_per_family` sequences of every family in `split` (deterministic: same seed, same data)."""
    data = cached_build_data(data_cfg)
    chosen = data.splits()[split]
    padded = to_padded(chosen, pad_id, data.families)
    assert padded.family_ids is not None
    idx = torch.cat([torch.nonzero(padded.family_ids == f).flatten()[:n_per_family] for f in range(len(data.families))])
    sub = padded.subset(idx)
    assert sub.family_ids is not None
    gens = [dict(chosen.generators[i]) for i in idx.tolist()] if chosen.generators else []
    return Batch(sub.tokens, sub.lengths, sub.family_ids, list(data.families), gens, sub.targets)
