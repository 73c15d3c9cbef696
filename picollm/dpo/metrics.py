"""DPO metrics: TRL's names per split and scheme, and the gain over the reference with its CI.

A pair is *correct* for a model when it gives the chosen continuation the higher log-prob. The gain of DPO
on a set of pairs is mean(policy correct) - mean(reference correct); both models score the same pairs, and
the pairs of one story are correlated, so its CI comes from a bootstrap over stories (picollm/dpo/stats.py)
of d_i = policy_correct_i - reference_correct_i. `paired_bootstrap_ci` (pairs resampled as if independent)
is kept to show how much narrower that would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PairScores:
    """Per-pair values of one evaluation (all (N,), same order as `schemes`)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    policy_chosen: torch.Tensor  # log-probs (length-averaged when the loss uses them so)
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_logits: torch.Tensor | None  # mean output logit over response positions (TRL's logits/chosen)
    rejected_logits: torch.Tensor | None
    schemes: list[str]
    uids: list[int] | None = None  # the story of each pair

    @property
    def policy_correct(self) -> np.ndarray:
        return (self.policy_chosen > self.policy_rejected).numpy()

    @property
    def reference_correct(self) -> np.ndarray | None:
        if self.ref_chosen is None or self.ref_rejected is None:
            return None
        return (self.ref_chosen > self.ref_rejected).numpy()


def pair_metrics(
    prefix: str,
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    chosen_logits: torch.Tensor | None = None,
    rejected_logits: torch.Tensor | None = None,
    schemes: list[str] | None = None,
) -> dict[str, float]:
    """TRL's names under `prefix/`, plus the policy's and the reference's own ranking accuracy
    (how often each gives the chosen continuation the higher log-prob), overall and per scheme."""

    def block(sel: torch.Tensor, sfx: str) -> dict[str, float]:
        out = {
            f"{prefix}/loss{sfx}": float(losses[sel].mean()),
            f"{prefix}/rewards/chosen{sfx}": float(chosen_rewards[sel].mean()),
            f"{prefix}/rewards/rejected{sfx}": float(rejected_rewards[sel].mean()),
            f"{prefix}/rewards/margins{sfx}": float((chosen_rewards[sel] - rejected_rewards[sel]).mean()),
            f"{prefix}/rewards/accuracies{sfx}": float((chosen_rewards[sel] > rejected_rewards[sel]).float().mean()),
            f"{prefix}/logps/chosen{sfx}": float(policy_chosen[sel].mean()),
            f"{prefix}/logps/rejected{sfx}": float(policy_rejected[sel].mean()),
            f"{prefix}/accuracy{sfx}": float((policy_chosen[sel] > policy_rejected[sel]).float().mean()),
        }
        if chosen_logits is not None and rejected_logits is not None:
            out[f"{prefix}/logits/chosen{sfx}"] = float(chosen_logits[sel].mean())
            out[f"{prefix}/logits/rejected{sfx}"] = float(rejected_logits[sel].mean())
        if ref_chosen is not None and ref_rejected is not None:
            out[f"{prefix}/reference_accuracy{sfx}"] = float((ref_chosen[sel] > ref_rejected[sel]).float().mean())
            out[f"{prefix}/reference_logps/chosen{sfx}"] = float(ref_chosen[sel].mean())
        return out

    metrics = block(torch.ones(len(losses), dtype=torch.bool), "")
    for scheme in sorted(set(schemes or [])) if schemes and len(set(schemes)) > 1 else []:
        metrics |= block(torch.tensor([s == scheme for s in schemes]), f"/{scheme}")
    if schemes and len(set(schemes)) == 1:  # one scheme: name it too, so runs compare by key
        metrics |= {f"{k}/{schemes[0]}": v for k, v in list(metrics.items())}
    return metrics


def scores_metrics(prefix: str, s: PairScores) -> dict[str, float]:
    return pair_metrics(
        prefix,
        s.losses,
        s.chosen_rewards,
        s.rejected_rewards,
        s.policy_chosen,
        s.policy_rejected,
        s.ref_chosen,
        s.ref_rejected,
        s.chosen_logits,
        s.rejected_logits,
        s.schemes,
    )


# --------------------------------------------------------------------------------------------------
# Gain over the reference


def paired_bootstrap_ci(
    policy_correct: np.ndarray, reference_correct: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(gain, low, high): mean(policy - reference) over pairs and its percentile bootstrap CI, resampling
    pairs (the same indices for both models: the test is paired)."""
    d = np.asarray(policy_correct, dtype=np.float64) - np.asarray(reference_correct, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("paired_bootstrap_ci needs two equal-length, non-empty 1-d arrays")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))  # (n_boot, N) resampled pairs
    means = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def gain_table(scores: PairScores, n_boot: int = 2000, seed: int = 0) -> dict[str, list]:
    """Per scheme (and `all`): pairs, stories, reference and policy accuracy, gain with its 95% CI from a
    bootstrap over stories (all pairs of a drawn story kept: `stats.story_bootstrap`; over pairs when the
    scores carry no story ids), and mean chosen and rejected log-probs of both: the run's per-scheme table."""
    from picollm.dpo.stats import story_bootstrap

    ref = scores.reference_correct
    assert ref is not None and scores.ref_chosen is not None and scores.ref_rejected is not None
    pol = scores.policy_correct
    schemes = np.asarray(scores.schemes)
    uids = np.asarray(scores.uids if scores.uids is not None else range(len(schemes)))
    cols: dict[str, list] = {
        k: []
        for k in (
            "scheme",
            "pairs",
            "stories",
            "reference_accuracy",
            "accuracy",
            "gain",
            "gain_ci_low",
            "gain_ci_high",
            "reference_logps_chosen",
            "logps_chosen",
            "reference_logps_rejected",
            "logps_rejected",
        )
    }
    for name in [*sorted(set(scores.schemes)), "all"]:
        sel = np.ones(len(schemes), dtype=bool) if name == "all" else schemes == name
        d = pol[sel].astype(np.float64) - ref[sel].astype(np.float64)
        gain, lo, hi = story_bootstrap([d], [uids[sel]], n_boot, seed=seed)
        row = [
            name,
            int(sel.sum()),
            len(set(uids[sel].tolist())),
            float(ref[sel].mean()),
            float(pol[sel].mean()),
            gain,
            lo,
            hi,
            float(scores.ref_chosen.numpy()[sel].mean()),
            float(scores.policy_chosen.numpy()[sel].mean()),
            float(scores.ref_rejected.numpy()[sel].mean()),
            float(scores.policy_rejected.numpy()[sel].mean()),
        ]
        for k, v in zip(cols, row, strict=True):
            cols[k].append(v)
    return cols


def gain_metrics(prefix: str, table: dict[str, list]) -> dict[str, float]:
    """`prefix/gain[/scheme]`, `prefix/gain_ci_low[...]`, `prefix/gain_ci_high[...]` from a gain table."""
    out: dict[str, float] = {}
    for i, scheme in enumerate(table["scheme"]):
        sfx = "" if scheme == "all" else f"/{scheme}"
        for k in ("gain", "gain_ci_low", "gain_ci_high"):
            out[f"{prefix}/{k}{sfx}"] = float(table[k][i])
    return out
