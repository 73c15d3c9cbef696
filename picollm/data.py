"""Synthetic integer-sequence families, content-disjoint splits, Bayes ceilings and batching.

Values are residues modulo M = vocab_size - 1 (token M is the pad):
  counting      x_{t+1} = x_t + 1
  arithmetic    x_{t+1} = x_t + d,        d from data.arithmetic_steps
  geometric     x_{t+1} = r * x_t,        r from data.geometric_ratios, x_0 != 0
  alternating   a, b, a, b, ...           a != b
  random_walk   x_{t+1} = x_t + s,        s drawn uniformly from data.walk_steps at every step
Modular values (rather than clamping or shortening) keep every family well defined at every length:
nothing sticks at a bound, geometric sequences reach the 8-32 default lengths, and sequences longer
than training never contain values the model has not seen.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from picollm.config import DataConfig
from picollm.errors import PicollmError

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------
# Generators


def _starts(cfg: DataConfig) -> np.ndarray:
    lo, hi = cfg.start_range if cfg.start_range is not None else (0, cfg.modulus - 1)
    return np.arange(lo, hi + 1)


def generate_sequence(family: str, length: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    m = cfg.modulus
    starts = _starts(cfg)
    t = np.arange(length)
    if family == "counting":
        return (rng.choice(starts) + t) % m
    if family == "arithmetic":
        return (rng.choice(starts) + rng.choice(cfg.arithmetic_steps) * t) % m
    if family == "geometric":
        nonzero = starts[starts != 0]
        x0, r = int(rng.choice(nonzero)), int(rng.choice(cfg.geometric_ratios)) % m
        return np.array([x0 * pow(r, int(i), m) % m for i in t])
    if family == "alternating":
        a = int(rng.choice(starts))
        b = int(rng.choice([v for v in range(m) if v != a]))
        return np.where(t % 2 == 0, a, b)
    if family == "random_walk":
        x0 = rng.choice(starts)
        steps = rng.choice(cfg.walk_steps, size=length - 1)
        return (x0 + np.concatenate([[0], np.cumsum(steps)])) % m
    raise PicollmError(f"unknown sequence family {family!r}")


def family_capacity(family: str, cfg: DataConfig) -> float:
    """Number of distinct sequences a family can produce (upper bound; inf for random walks)."""
    n_len = cfg.max_len - cfg.min_len + 1
    n_start = len(_starts(cfg))
    m = cfg.modulus
    if family == "counting":
        return n_start * n_len
    if family == "arithmetic":
        return n_start * len({d % m for d in cfg.arithmetic_steps}) * n_len
    if family == "geometric":
        return (n_start - (0 in _starts(cfg))) * len({r % m for r in cfg.geometric_ratios}) * n_len
    if family == "alternating":
        return n_start * (m - 1) * n_len
    if len({s % m for s in cfg.walk_steps}) == 1:
        return n_start * n_len
    return math.inf


# --------------------------------------------------------------------------------------------------
# Bayes ceiling


@dataclass
class _Hypotheses:
    """Running consistency of a prefix with each family's parameters (one pass over the sequence)."""

    x0: int
    counting: bool = True
    arith_step: int | None = None  # set once x1 is seen
    arithmetic: bool = True
    geo_ratios: list[int] = field(default_factory=list)
    alternating: bool = True
    walk: bool = True


def ceiling_per_position(seq: np.ndarray, family: str, cfg: DataConfig) -> np.ndarray:
    """Expected accuracy of the Bayes-optimal predictor for each target x_1..x_{L-1}.

    The ideal predictor knows the generator (families equally likely among data.seq_types,
    parameters uniform over the config's sets) but not which family or parameters produced this
    sequence. At each prefix it predicts the most probable next value (ties split evenly); its
    expected accuracy is the probability, under the true family's parameters, that this prediction
    is right: 1 or 0 for deterministic families, 1/|walk_steps| per hit for random walks.
    """
    m = cfg.modulus
    starts = set(_starts(cfg).tolist())
    fams = set(cfg.seq_types)
    n_start = len(starts)
    n_start_geo = len(starts - {0})
    steps = [d % m for d in cfg.arithmetic_steps]
    ratios = [r % m for r in cfg.geometric_ratios]
    walk = [s % m for s in cfg.walk_steps]
    walk_counts = {s: walk.count(s) for s in set(walk)}

    x = [int(v) for v in seq]
    h = _Hypotheses(x0=x[0], geo_ratios=list(dict.fromkeys(ratios)) if x[0] != 0 else [])
    in_starts = x[0] in starts
    out = np.zeros(len(x) - 1)
    for t in range(len(x) - 1):
        if t >= 1:  # update consistency with the newest transition x_{t-1} -> x_t
            prev, cur = x[t - 1], x[t]
            h.counting &= (cur - prev) % m == 1
            if t == 1:
                h.arith_step = (cur - prev) % m
                h.arithmetic = h.arith_step in steps
                h.alternating = cur != prev
            else:
                h.arithmetic &= (cur - prev) % m == h.arith_step
                h.alternating &= cur == x[t - 2]
            h.geo_ratios = [r for r in h.geo_ratios if cur == (r * prev) % m]
            h.walk &= ((cur - prev) % m) in walk_counts
        cur = x[t]
        weights: dict[int, float] = {}
        floor = 0.0
        add = partial(_add_weight, weights, m)
        # Log prior weights, leaving out the common family prior 1/|families|.
        if in_starts:
            if "counting" in fams and h.counting:
                add(cur + 1, -math.log(n_start))
            if "arithmetic" in fams:
                if t == 0:
                    for d in steps:
                        add(cur + d, -math.log(n_start * len(steps)))
                elif h.arithmetic:
                    n_same = steps.count(h.arith_step)
                    add(cur + h.arith_step, math.log(n_same) - math.log(n_start * len(steps)))
            if "alternating" in fams:
                if t == 0:  # b is any value but a: a uniform floor, added below without a loop
                    floor = 1.0 / (n_start * (m - 1))
                elif h.alternating:
                    add(x[t - 1], -math.log(n_start * (m - 1)))
            if "random_walk" in fams and h.walk:
                base = -math.log(n_start) - t * math.log(len(walk))
                for s, c in walk_counts.items():
                    add(cur + s, base + math.log(c / len(walk)))
        if "geometric" in fams and x[0] != 0 and x[0] in starts:
            for r in h.geo_ratios:
                n_r = ratios.count(r)
                add(cur * r, math.log(n_r) - math.log(n_start_geo * len(ratios)))
        # Values not in `weights` (other than cur) carry only the floor; they tie for the argmax
        # only when nothing else is consistent.
        for v in weights:
            if v != cur:
                weights[v] += floor
        n_floor_only = (m - 1 - sum(v != cur for v in weights)) if floor > 0 else 0
        best = max([*weights.values(), floor if n_floor_only else 0.0])
        if best == 0.0:
            out[t] = 0.0
            continue
        argmax = {v for v, w in weights.items() if w >= best * (1 - 1e-9)}
        floor_wins = n_floor_only > 0 and floor >= best * (1 - 1e-9)
        n_argmax = len(argmax) + (n_floor_only if floor_wins else 0)

        def in_argmax(v: int, argmax=argmax, floor_wins=floor_wins, weights=weights, cur=cur) -> bool:
            return v in argmax or (floor_wins and v not in weights and v != cur)

        if family == "random_walk":
            true_p = {(cur + s) % m: c / len(walk) for s, c in walk_counts.items()}
            out[t] = sum(p for v, p in true_p.items() if in_argmax(v)) / n_argmax
        else:
            out[t] = float(in_argmax(x[t + 1])) / n_argmax
    return out


def _add_weight(weights: dict[int, float], m: int, value: int, logw: float) -> None:
    weights[value % m] = weights.get(value % m, 0.0) + math.exp(logw)


# --------------------------------------------------------------------------------------------------
# Splits


@dataclass
class SequenceSplit:
    """One split: variable-length sequences with their family and per-target ceilings."""

    name: str
    sequences: list[np.ndarray]
    families: list[str]
    ceilings: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.sequences)


@dataclass
class SyntheticData:
    train: SequenceSplit
    val: SequenceSplit
    test: SequenceSplit
    families: list[str]

    def splits(self) -> dict[str, SequenceSplit]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def split_overlap(self) -> int:
        """Number of val/test sequences whose content also appears in train (must be 0)."""
        seen = {s.tobytes() for s in self.train.sequences}
        return sum(s.tobytes() in seen for s in self.val.sequences + self.test.sequences)

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"data.split_overlap": float(self.split_overlap())}
        for name, split in self.splits().items():
            out[f"data.{name}.sequences"] = float(len(split))
            out[f"data.{name}.tokens"] = float(sum(len(s) for s in split.sequences))
            for fam in self.families:
                out[f"data.{name}.{fam}"] = float(sum(f == fam for f in split.families))
        return out


def build_data(cfg: DataConfig, splits: dict[str, int] | None = None, max_len: int | None = None) -> SyntheticData:
    """Generate the splits with no sequence content shared between or within them.

    Sequences are drawn family by family; a draw whose content was already used anywhere is drawn
    again, so a split is never padded with repeats. A family whose parameter space cannot hold that
    many distinct sequences is an error naming the family.
    """
    sizes = splits or {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    rng = np.random.default_rng(cfg.seed)
    seen: set[bytes] = set()
    out: dict[str, SequenceSplit] = {n: SequenceSplit(n, [], [], []) for n in sizes}
    hi = max_len or cfg.max_len
    need = sum(sizes.values())
    for fam in cfg.seq_types:
        cap = family_capacity(fam, cfg)
        if cap < need:
            raise PicollmError(
                f"data: family {fam!r} has only {int(cap)} distinct sequences, but the splits need "
                f"{need}; widen its parameters (start_range, steps, lengths) or lower n_train/n_val/n_test"
            )
        for name, n in sizes.items():
            attempts = 0
            got = 0
            while got < n:
                attempts += 1
                if attempts > 50 * n + 1000:
                    raise PicollmError(
                        f"data: could not draw {n} new distinct {fam!r} sequences for {name}; "
                        f"widen the family's parameters"
                    )
                length = int(rng.integers(cfg.min_len, hi + 1))
                seq = generate_sequence(fam, length, cfg, rng).astype(np.int64)
                key = seq.tobytes()
                if key in seen:
                    continue
                seen.add(key)
                out[name].sequences.append(seq)
                out[name].families.append(fam)
                out[name].ceilings.append(ceiling_per_position(seq, fam, cfg))
                got += 1
    return SyntheticData(families=list(cfg.seq_types), **out)


# --------------------------------------------------------------------------------------------------
# Padding and batching


@dataclass
class PaddedSplit:
    """A split as padded tensors; targets are the inputs shifted by one, IGNORE_INDEX on padding."""

    tokens: torch.Tensor  # (N, Lmax) int64, right-padded with pad_id
    lengths: torch.Tensor  # (N,)
    pad_id: int
    family_ids: torch.Tensor | None = None  # (N,)
    ceilings: torch.Tensor | None = None  # (N, Lmax-1) float, 0 on padding
    family_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_target_tokens(self) -> int:
        return int((self.lengths - 1).clamp(min=0).sum())

    def subset(self, idx: torch.Tensor) -> PaddedSplit:
        width = int(self.lengths[idx].max()) if len(idx) else 1
        return PaddedSplit(
            tokens=self.tokens[idx, :width],
            lengths=self.lengths[idx],
            pad_id=self.pad_id,
            family_ids=None if self.family_ids is None else self.family_ids[idx],
            ceilings=None if self.ceilings is None else self.ceilings[idx, : max(width - 1, 0)],
            family_names=self.family_names,
        )


def pad_sequences(seqs: list[np.ndarray] | list[list[int]], pad_id: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.as_tensor(np.asarray(s), dtype=torch.long)
        if side == "right":
            out[i, : len(t)] = t
        else:
            out[i, width - len(t) :] = t
    return out


def to_padded(split: SequenceSplit, pad_id: int, families: list[str]) -> PaddedSplit:
    tokens = pad_sequences(split.sequences, pad_id)
    ceilings = torch.zeros(len(split), max(tokens.shape[1] - 1, 0))
    for i, c in enumerate(split.ceilings):
        ceilings[i, : len(c)] = torch.as_tensor(c, dtype=torch.float32)
    return PaddedSplit(
        tokens=tokens,
        lengths=torch.tensor([len(s) for s in split.sequences]),
        pad_id=pad_id,
        family_ids=torch.tensor([families.index(f) for f in split.families]),
        ceilings=ceilings,
        family_names=list(families),
    )


def inputs_and_targets(tokens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs; targets that are padding become IGNORE_INDEX."""
    inputs = tokens[:, :-1]
    targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == pad_id, IGNORE_INDEX)
    return inputs, targets


def length_bucketed_batches(
    lengths: torch.Tensor, batch_size: int, generator: torch.Generator | None, shuffle: bool = True
) -> list[torch.Tensor]:
    """Index batches of similar length (little padding); random within equal lengths and in order."""
    n = len(lengths)
    if shuffle:
        perm = torch.randperm(n, generator=generator)
        order = perm[torch.argsort(lengths[perm], stable=True)]
    else:
        order = torch.argsort(lengths, stable=True)
    batches = list(order.split(batch_size))
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def iter_batches(
    split: PaddedSplit, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True
) -> Iterator[PaddedSplit]:
    for idx in length_bucketed_batches(split.lengths, batch_size, generator, shuffle):
        yield split.subset(idx)


# --------------------------------------------------------------------------------------------------
# Prompts


_INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_prompt(text: str, vocab_size: int) -> list[int]:
    """'2 4 6 8' -> [2, 4, 6, 8]; every value must be a token in [0, vocab_size-2]."""
    parts = text.replace(",", " ").split()
    if not parts:
        raise PicollmError("prompt is empty: give space-separated integers, e.g. '2 4 6 8'")
    out = []
    for p in parts:
        if not _INTEGER.fullmatch(p):  # int() would also take '1_0', '١' or ' +1'
            raise PicollmError(f"prompt token {p!r} is not an integer")
        v = int(p)
        if not 0 <= v <= vocab_size - 2:
            raise PicollmError(f"prompt token {v} is outside the model's values 0..{vocab_size - 2}")
        out.append(v)
    return out
