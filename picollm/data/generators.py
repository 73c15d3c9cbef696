"""Synthetic integer-sequence families: their generators, the sequences they make, Bayes ceilings.

Values are residues modulo M = vocab_size - 1 (token M is the pad). A family's *generator* is what
fixes a sequence apart from its length (a random walk's steps stay random):
  family        rule                          generator           space size
  counting      x_{t+1} = x_t + 1             {start}             S
  arithmetic    x_{t+1} = x_t + d             {start, step}       S * |data.arithmetic_steps|
  geometric     x_{t+1} = r * x_t, x_0 != 0   {start, ratio}      S' * |data.geometric_ratios|
  alternating   a, b, a, b, ...  (a != b)     {a, b}              S * (M - 1)
  random_walk   x_{t+1} = x_t + s             {start}             S   (s drawn from data.walk_steps per step)
  mqar          k1 v1 .. kP vP q1 a1 .. qQ aQ  {k_i -> v_i}         C(K, P) * V!/(V-P)! per P in data.mqar_pairs
  copy          s_1 .. s_n s_1 .. s_n         {s_1 .. s_n}        M^n per n in data.copy_len
S = the start values (data.start_range, else all M), S' = those that are not 0. A space is indexed
0..size-1 (`generator_at`), so a split can be cut from it without listing it (alternating has M^2).

The recall families need the whole context, not a local rule. mqar (multi-query associative recall,
Zoology: arXiv:2312.04927): P ~ uniform over data.mqar_pairs, P distinct keys drawn uniformly from
0..K-1 (K = data.mqar_key_vocab), P distinct values from K..K+V-1 (V = data.mqar_value_vocab), laid
out in a random order, then Q = data.mqar_queries (null: P) distinct keys in random order. In Zoology's
layout (data.mqar_layout zoology, the default) the sequence has data.mqar_length tokens: after the pairs,
noise tokens (K+V..M-1: neither keys nor values) with the queries at even offsets 2g, the gaps g
power-law distributed (data.mqar_power_a); a query's target is its value (the *answer*), which is never
an input, and no other position has a target (`targets_of`). Where picollm differs from Zoology: noise
tokens exclude keys and values (Zoology draws them from the whole vocabulary, so a noise token can look
like a query), and keys and values come from configurable ranges. In the fed-back layout (for teaching)
each query is followed by its answer as the next input, which lets a model eliminate the values already
answered. copy: n ~ uniform over data.copy_len, a segment of n tokens
drawn uniformly from Z_M, then the segment again. A recall generator (the key->value assignment, or
the segment) is one of astronomically many, so its split is fixed by a hash of it (`recall_split`):
val and test hold unseen generators in every build, whatever its seed or pair counts, and the order
of pairs and queries is drawn per sequence.
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
from picollm.config.base import RECALL_FAMILIES
from picollm.config.training import NEW_RULE_FAMILIES
from picollm.data.recall_families import (
    natural_length,
    random_recall_generator,
    recall_ceilings,
    recall_length,
    recall_sequence,
    recall_sizes,
)
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
    if family == "mqar":
        k, v = cfg.mqar_key_vocab, cfg.mqar_value_vocab
        return sum(math.comb(k, p) * math.perm(v, p) for p in set(cfg.mqar_pairs))
    if family == "copy":
        return sum(cfg.modulus**n for n in set(cfg.copy_len))
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
    if family in RECALL_FAMILIES:
        raise PicollmError(f"{family!r} generators are drawn (random_recall_generator), not numbered")
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


RULE_KEYS = {"arithmetic": "step", "geometric": "ratio"}  # family -> the generator parameter that is its rule


def generators_with_rules(family: str, rules: list[int], cfg: DataConfig) -> list[Generator]:
    """Every generator of `family` (arithmetic or geometric) whose step or ratio is in `rules`, starts outermost:
    a split of `data.split: new_rules` draws only from these."""
    lo, hi = _start_bounds(cfg)
    first = max(lo, 1) if family == "geometric" else lo  # a geometric sequence from 0 sticks at 0
    return [{"start": s, RULE_KEYS[family]: int(r)} for s in range(first, hi + 1) for r in rules]


def cut_rules(family: str, cfg: DataConfig, names: list[str]) -> dict[str, list[int]]:
    """`data.split: new_rules`: a random partition of the family's steps or ratios, one share per split:
    held_out_share of them (at least one, and at least one left for train) for each split but train, the rest
    for train. Seeded by data.seed on its own stream, so a family's cut does not depend on the others."""
    values = [int(v) for v in getattr(cfg, NEW_RULE_FAMILIES[family])]
    held = [n for n in names if n != "train"]
    k = max(1, min(round(cfg.held_out_share * len(values)), (len(values) - 1) // max(len(held), 1)))
    if k * len(held) >= len(values) + ("train" not in names):
        raise PicollmError(
            f"data: split new_rules needs more {NEW_RULE_FAMILIES[family]} ({len(values)}) than {len(names)} splits"
        )
    order = np.random.default_rng([cfg.seed, sorted(NEW_RULE_FAMILIES).index(family), 101]).permutation(values)
    out = {n: sorted(int(v) for v in order[i * k : (i + 1) * k]) for i, n in enumerate(held)}
    if "train" in names:
        out["train"] = sorted(int(v) for v in order[len(held) * k :])
    return {n: out[n] for n in names}


def is_deterministic(family: str, cfg: DataConfig) -> bool:
    """Whether the generator and the length fix the sequence (all but random walks with several steps
    and mqar, whose pair and query order is drawn per sequence)."""
    if family in RECALL_FAMILIES:
        return family == "copy"
    return family != "random_walk" or len({s % cfg.modulus for s in cfg.walk_steps}) == 1


def sequences_per_generator(family: str, cfg: DataConfig, min_len: int, max_len: int) -> int:
    """Distinct sequences one generator can make with lengths min_len..max_len (capped at 10**12); for
    mqar, the orders of its largest pair count (a generator has one length)."""
    if family == "copy":
        return 1
    if family == "mqar":
        p = max(cfg.mqar_pairs)
        return min(math.factorial(p) * math.perm(p, cfg.mqar_queries or p), 10**12)
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
    """The `length`-token sequence of `gen` (int64); random walks draw their steps from `rng`, mqar
    its pair and query order (a recall generator has one length: `recall_length`)."""
    if family in RECALL_FAMILIES:
        return recall_sequence(family, gen, length, cfg, rng)
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
    if family in RECALL_FAMILIES:  # only those of this length
        generators = [g for g in generators if recall_length(family, g, cfg) == length]
    if not generators:
        raise PicollmError(f"no {family!r} generators to draw from (at length {length})")
    gen = generators[int(rng.integers(len(generators)))]
    return sequence_from_generator(family, gen, length, cfg, rng), gen


def generate_sequence(family: str, length: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """A sequence from a generator drawn uniformly from the family's whole space."""
    if family in RECALL_FAMILIES:
        sizes = [s for s in recall_sizes(family, cfg) if natural_length(family, s, cfg) == length]
        if not sizes:
            raise PicollmError(f"{family!r} makes no sequences of length {length} with these data settings")
        gen = random_recall_generator(family, cfg, rng, sizes)
        return sequence_from_generator(family, gen, length, cfg, rng)
    n = generator_count(family, cfg)
    if n == 0:
        raise PicollmError(f"family {family!r} has no generators with these data settings")
    return sequence_from_generator(family, generator_at(family, int(rng.integers(n)), cfg), length, cfg, rng)


def family_capacity(family: str, cfg: DataConfig) -> float:
    """Number of distinct sequences a family can produce at lengths min_len..max_len (upper bound; inf
    for random walks and mqar; 0 for a recall family none of whose lengths is in range)."""
    if family in RECALL_FAMILIES:
        fits = any(cfg.min_len <= natural_length(family, s, cfg) <= cfg.max_len for s in recall_sizes(family, cfg))
        return (math.inf if family == "mqar" else generator_count(family, cfg)) if fits else 0
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


@dataclass(frozen=True)
class _Space:
    """What the Bayes predictor knows of the config: the values and every family's parameter sets."""

    m: int
    starts: frozenset[int]
    fams: frozenset[str]
    steps: list[int]
    ratios: list[int]
    walk_counts: dict[int, int]  # step -> how often walk_steps lists it
    n_walk: int

    @classmethod
    def of(cls, cfg: DataConfig) -> _Space:
        m = cfg.modulus
        walk = [s % m for s in cfg.walk_steps]
        return cls(
            m, frozenset(_starts(cfg).tolist()), frozenset(cfg.seq_types), [d % m for d in cfg.arithmetic_steps],
            [r % m for r in cfg.geometric_ratios], {s: walk.count(s) for s in set(walk)}, len(walk),
        )  # fmt: skip


def _observe(h: _Hypotheses, sp: _Space, x: list[int], t: int) -> None:
    """Update each family's consistency with the newest transition x_{t-1} -> x_t (t >= 1)."""
    m, prev, cur = sp.m, x[t - 1], x[t]
    h.counting &= (cur - prev) % m == 1
    if t == 1:
        h.arith_step = (cur - prev) % m
        h.arithmetic = h.arith_step in sp.steps
        h.alternating = cur != prev
    else:
        h.arithmetic &= (cur - prev) % m == h.arith_step
        h.alternating &= cur == x[t - 2]
    h.geo_ratios = [r for r in h.geo_ratios if cur == (r * prev) % m]
    h.walk &= ((cur - prev) % m) in sp.walk_counts
    if h.walk:
        h.walk_logp += math.log(sp.walk_counts[(cur - prev) % m] / sp.n_walk)


def _posterior_weights(h: _Hypotheses, sp: _Space, x: list[int], t: int) -> tuple[dict[int, float], float]:
    """Unnormalised probability of each next value after x_0..x_t (the common family prior 1/|families| left
    out), and the floor every other value carries (alternating's unknown b at t = 0)."""
    cur, n_start, fams = x[t], len(sp.starts), sp.fams
    weights: dict[int, float] = {}
    floor = 0.0
    add = partial(_add_weight, weights, sp.m)
    if x[0] in sp.starts:
        if "counting" in fams and h.counting:
            add(cur + 1, -math.log(n_start))
        if "arithmetic" in fams:
            if t == 0:
                for d in sp.steps:
                    add(cur + d, -math.log(n_start * len(sp.steps)))
            elif h.arithmetic:
                n_same = sp.steps.count(h.arith_step)
                add(cur + h.arith_step, math.log(n_same) - math.log(n_start * len(sp.steps)))
        if "alternating" in fams:
            if t == 0:  # b is any value but a: a uniform floor, added below without a loop
                floor = 1.0 / (n_start * (sp.m - 1))
            elif h.alternating:
                add(x[t - 1], -math.log(n_start * (sp.m - 1)))
        if "random_walk" in fams and h.walk:
            base = -math.log(n_start) + h.walk_logp
            for s, c in sp.walk_counts.items():
                add(cur + s, base + math.log(c / sp.n_walk))
    if "geometric" in fams and x[0] != 0 and x[0] in sp.starts:
        n_start_geo = len(sp.starts - {0})
        for r in h.geo_ratios:
            add(cur * r, math.log(sp.ratios.count(r)) - math.log(n_start_geo * len(sp.ratios)))
    # Values not in `weights` (other than cur) carry only the floor; they tie for the argmax only when
    # nothing else is consistent.
    for v in weights:
        if v != cur:
            weights[v] += floor
    return weights, floor


def _expected_hit(weights: dict[int, float], floor: float, sp: _Space, x: list[int], t: int, family: str) -> float:
    """Probability that the argmax of `weights` (ties split evenly) is the true next value x_{t+1}: 1 or 0 for
    a deterministic family, the true step probabilities of the argmax values for a random walk."""
    cur, m = x[t], sp.m
    n_floor_only = (m - 1 - sum(v != cur for v in weights)) if floor > 0 else 0
    best = max([*weights.values(), floor if n_floor_only else 0.0])
    if best == 0.0:
        return 0.0
    argmax = {v for v, w in weights.items() if w >= best * (1 - 1e-9)}
    floor_wins = n_floor_only > 0 and floor >= best * (1 - 1e-9)
    n_argmax = len(argmax) + (n_floor_only if floor_wins else 0)

    def in_argmax(v: int) -> bool:
        return v in argmax or (floor_wins and v not in weights and v != cur)

    if family == "random_walk":
        true_p = {(cur + s) % m: c / sp.n_walk for s, c in sp.walk_counts.items()}
        return sum(p for v, p in true_p.items() if in_argmax(v)) / n_argmax
    return float(in_argmax(x[t + 1])) / n_argmax


def ceiling_per_position(seq: np.ndarray, family: str, cfg: DataConfig) -> np.ndarray:
    """Expected accuracy of the Bayes-optimal predictor for each target x_1..x_{L-1}.

    The ideal predictor knows the generator (families equally likely among data.seq_types,
    parameters uniform over the config's sets, i.e. over the family's whole generator space: it does
    not know which generators a split holds) but not which family or parameters produced this
    sequence. At each prefix it predicts the most probable next value (ties split evenly); its
    expected accuracy is the probability, under the true family's parameters, that this prediction
    is right: 1 or 0 for deterministic families, 1/|walk_steps| per hit for random walks. The
    recall families have their own (`recall_ceilings`); the rule families' ceilings leave them out
    of the hypotheses (their key/value and copy layouts are rarely consistent with a rule).
    """
    if family in RECALL_FAMILIES:
        return recall_ceilings(seq, family, cfg)
    sp = _Space.of(cfg)
    x = [int(v) for v in seq]
    h = _Hypotheses(x0=x[0], geo_ratios=list(dict.fromkeys(sp.ratios)) if x[0] != 0 else [])
    out = np.zeros(len(x) - 1)
    for t in range(len(x) - 1):
        if t >= 1:
            _observe(h, sp, x, t)
        weights, floor = _posterior_weights(h, sp, x, t)
        out[t] = _expected_hit(weights, floor, sp, x, t, family)
    return out


def _add_weight(weights: dict[int, float], m: int, value: int, logw: float) -> None:
    weights[value % m] = weights.get(value % m, 0.0) + math.exp(logw)
