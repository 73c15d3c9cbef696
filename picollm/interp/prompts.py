"""Inputs built to ask one question each: clean/corrupted pairs for patching, sequences for head detection.

A patching pair differs in what determines the next token, and nothing else of the format: both
prompts have the same length, and the answer (a set of tokens, one for deterministic families) of
the clean prompt differs from the corrupted one's:
  counting     the start shifted by a random offset (every token changes)
  arithmetic   the step d changed to another of data.arithmetic_steps (same start)
  geometric    the ratio r changed to another of data.geometric_ratios (same start)
  alternating  a and b swapped (the answer becomes the other value)
  random_walk  the last step changed to another of data.walk_steps (only the last token changes);
               the answer is the set of values one walk step away from the last token
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from picollm.config import DataConfig
from picollm.data.generators import Generator, sequence_from_generator


@dataclass
class PromptPairs:
    """Equal-length prompt pairs: tokens (n, T); answers (n, K) token ids (K = 1 unless several next
    tokens are equally right, as in a random walk)."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    clean_answers: torch.Tensor
    corrupted_answers: torch.Tensor

    def __len__(self) -> int:
        return self.clean.shape[0]


def _other(values: list[int], current: int, m: int, rng: np.random.Generator) -> int:
    """Another entry of `values` than `current` (mod m); current + 1 if there is none."""
    others = [v for v in values if (v - current) % m]
    return int(rng.choice(others)) if others else current + 1


def _pair(
    family: str, gen: Generator, length: int, cfg: DataConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """One (clean, corrupted, clean answers, corrupted answers); sequences have `length` tokens."""
    m = cfg.modulus
    if family == "random_walk":
        full = sequence_from_generator(family, gen, length, cfg, rng)
        step = int(full[-1] - full[-2]) % m
        corrupted = full.copy()
        corrupted[-1] = (full[-2] + _other(list(cfg.walk_steps), step, m, rng)) % m
        steps = sorted({s % m for s in cfg.walk_steps})
        return full, corrupted, [(full[-1] + s) % m for s in steps], [(corrupted[-1] + s) % m for s in steps]
    if family == "counting":
        other = {"start": (gen["start"] + int(rng.integers(1, m))) % m}
    elif family == "arithmetic":
        other = {**gen, "step": _other(list(cfg.arithmetic_steps), gen["step"], m, rng)}
    elif family == "geometric":
        other = {**gen, "ratio": _other(list(cfg.geometric_ratios), gen["ratio"], m, rng)}
    elif family == "alternating":
        other = {"a": gen["b"], "b": gen["a"]}
    else:
        raise ValueError(f"no corruption defined for family {family!r}")
    clean = sequence_from_generator(family, gen, length + 1, cfg, rng)
    corrupted = sequence_from_generator(family, other, length + 1, cfg, rng)
    return clean[:-1], corrupted[:-1], [int(clean[-1])], [int(corrupted[-1])]


def patching_pairs(
    family: str, generators: list[Generator], length: int, cfg: DataConfig, n: int, seed: int = 0
) -> PromptPairs | None:
    """Up to `n` pairs of `length`-token prompts from `generators` (in order, each used once); pairs
    whose answers coincide are dropped. None when no pair is left."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[np.ndarray, np.ndarray, list[int], list[int]]] = []
    for gen in generators:
        if len(rows) == n:
            break
        clean, corrupted, a, b = _pair(family, gen, length, cfg, rng)
        if set(a) != set(b):
            rows.append((clean, corrupted, a, b))
    if not rows:
        return None

    def stack(i: int) -> torch.Tensor:
        return torch.as_tensor(np.stack([np.asarray(r[i], dtype=np.int64) for r in rows]))

    return PromptPairs(stack(0), stack(1), stack(2), stack(3))


# --------------------------------------------------------------------------------------------------
# Head-eliciting sequences


def random_tokens(n: int, length: int, n_values: int, seed: int = 0) -> torch.Tensor:
    """(n, length) sequences of distinct random values (no repeats when length <= n_values), so a
    head's preference for a position is not confounded by a repeated token."""
    g = torch.Generator().manual_seed(seed)
    if length > n_values:
        return torch.randint(0, n_values, (n, length), generator=g)
    return torch.stack([torch.randperm(n_values, generator=g)[:length] for _ in range(n)])


def repeated_tokens(n: int, half: int, n_values: int, seed: int = 0) -> torch.Tensor:
    """(n, 2 * half): a random sequence of distinct values followed by itself, the induction prompt."""
    first = random_tokens(n, half, n_values, seed)
    return torch.cat([first, first], dim=1)
