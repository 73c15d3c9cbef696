"""Synthetic integer-sequence families: their generators, the sequences they make, Bayes ceilings.

Values are residues modulo M = vocab_size - 1 (token M is the pad). A family's *generator* is what
fixes a sequence apart from its length (a random walk's steps stay random):
  family        rule                          generator           space size
  counting      x_{t+1} = x_t + 1             {start}             S
  arithmetic    x_{t+1} = x_t + d             {start, step}       S * |data.arithmetic_steps|
  geometric     x_{t+1} = r * x_t, x_0 != 0   {start, ratio}      S' * |data.geometric_ratios|
  alternating   a, b, a, b, ...  (a != b)     {a, b}              S * (M - 1)
  random_walk   x_{t+1} = x_t + s             {start}             S   (s drawn from data.walk_steps per step)
S = the start values (data.start_range, else all M), S' = those that are not 0. A space is indexed
0..size-1 (`generator_at`), so a split can be cut from it without listing it (alternating has M^2).
Modular values (rather than clamping or shortening) keep every family well defined at every length:
nothing sticks at a bound, geometric sequences reach the 8-32 default lengths, and sequences longer
than training never contain values the model has not seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from picollm.config import DataConfig
from picollm.errors import PicollmError

Generator = dict[str, int]  # e.g. {"start": 5, "step": 3}


# --------------------------------------------------------------------------------------------------
# Generator spaces


def _start_bounds(cfg: DataConfig) -> tuple[int, int]:
    return cfg.start_range if cfg.start_range is not None else (0, cfg.modulus - 1)


def _starts(cfg: DataConfig) -> np.ndarray:
    lo, hi = _start_bounds(cfg)
    return np.arange(lo, hi + 1)


def generator_count(family: str, cfg: DataConfig) -> int:
    """Number of generators of `family` (distinct parameters; the validators keep steps and ratios
    distinct modulo M)."""
    lo, hi = _start_bounds(cfg)
    n_start = hi - lo + 1
    if family in ("counting", "random_walk"):
        return n_start
    if family == "arithmetic":
        return n_start * len(cfg.arithmetic_steps)
    if family == "geometric":
        return (hi - max(lo, 1) + 1) * len(cfg.geometric_ratios)
    if family == "alternating":
        return n_start * (cfg.modulus - 1)
    raise PicollmError(f"unknown sequence family {family!r}")


def generator_at(family: str, index: int, cfg: DataConfig) -> Generator:
    """The generator with number `index` in 0..generator_count-1 (starts outermost)."""
    lo, _ = _start_bounds(cfg)
    i = int(index)
    if family in ("counting", "random_walk"):
        return {"start": lo + i}
    if family == "arithmetic":
        q, r = divmod(i, len(cfg.arithmetic_steps))
        return {"start": lo + q, "step": int(cfg.arithmetic_steps[r])}
    if family == "geometric":
        q, r = divmod(i, len(cfg.geometric_ratios))
        return {"start": max(lo, 1) + q, "ratio": int(cfg.geometric_ratios[r])}
    if family == "alternating":
        q, j = divmod(i, cfg.modulus - 1)
        a = lo + q
        return {"a": a, "b": j + (j >= a)}
    raise PicollmError(f"unknown sequence family {family!r}")


def is_deterministic(family: str, cfg: DataConfig) -> bool:
    """Whether the generator and the length fix the sequence (all but random walks with several steps)."""
    return family != "random_walk" or len({s % cfg.modulus for s in cfg.walk_steps}) == 1


def sequences_per_generator(family: str, cfg: DataConfig, min_len: int, max_len: int) -> int:
    """Distinct sequences one generator can make with lengths min_len..max_len (capped at 10**12)."""
    n_len = max_len - min_len + 1
    if is_deterministic(family, cfg):
        return n_len
    k, total = len({s % cfg.modulus for s in cfg.walk_steps}), 0
    for length in range(min_len, max_len + 1):  # k^(L-1) step sequences of each length
        total += k ** min(length - 1, 40)
        if total >= 10**12:
            return 10**12
    return total


def sequence_from_generator(
    family: str, gen: Generator, length: int, cfg: DataConfig, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The `length`-token sequence of `gen` (int64); random walks draw their steps from `rng`."""
    m = cfg.modulus
    t = np.arange(length, dtype=np.int64)
    if family == "counting":
        return (gen["start"] + t) % m
    if family == "arithmetic":
        return (gen["start"] + gen["step"] * t) % m
    if family == "geometric":
        r = gen["ratio"] % m
        return np.array([gen["start"] * pow(r, int(i), m) % m for i in t], dtype=np.int64)
    if family == "alternating":
        return np.where(t % 2 == 0, gen["a"], gen["b"]).astype(np.int64)
    if family == "random_walk":
        if rng is None:
            raise PicollmError("a random walk needs a random generator for its steps")
        steps = rng.choice(np.asarray(cfg.walk_steps, dtype=np.int64), size=length - 1)
        return (gen["start"] + np.concatenate([[0], np.cumsum(steps)])) % m
    raise PicollmError(f"unknown sequence family {family!r}")


def draw_from_generators(
    family: str, generators: list[Generator], length: int, cfg: DataConfig, rng: np.random.Generator
) -> tuple[np.ndarray, Generator]:
    """One sequence of `length` tokens from a generator drawn uniformly from `generators` (e.g. a
    split's pool, `SyntheticData.generator_pool`), and that generator."""
    if not generators:
        raise PicollmError(f"no {family!r} generators to draw from")
    gen = generators[int(rng.integers(len(generators)))]
    return sequence_from_generator(family, gen, length, cfg, rng), gen


def generate_sequence(family: str, length: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """A sequence from a generator drawn uniformly from the family's whole space."""
    n = generator_count(family, cfg)
    if n == 0:
        raise PicollmError(f"family {family!r} has no generators with these data settings")
    return sequence_from_generator(family, generator_at(family, int(rng.integers(n)), cfg), length, cfg, rng)


def family_capacity(family: str, cfg: DataConfig) -> float:
    """Number of distinct sequences a family can produce (upper bound; inf for random walks)."""
    if not is_deterministic(family, cfg):
        return math.inf
    return generator_count(family, cfg) * (cfg.max_len - cfg.min_len + 1)


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
    walk_logp: float = 0.0  # log probability of the walk's steps so far


def ceiling_per_position(seq: np.ndarray, family: str, cfg: DataConfig) -> np.ndarray:
    """Expected accuracy of the Bayes-optimal predictor for each target x_1..x_{L-1}.

    The ideal predictor knows the generator (families equally likely among data.seq_types,
    parameters uniform over the config's sets, i.e. over the family's whole generator space: it does
    not know which generators a split holds) but not which family or parameters produced this
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
            if h.walk:
                h.walk_logp += math.log(walk_counts[(cur - prev) % m] / len(walk))
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
                base = -math.log(n_start) + h.walk_logp
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
