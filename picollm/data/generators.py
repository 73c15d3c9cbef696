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

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from picollm.config import DataConfig
from picollm.config.base import RECALL_FAMILIES
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
        return _recall_sequence(family, gen, length, cfg, rng)
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
        sizes = [s for s in _recall_sizes(family, cfg) if _natural_length(family, s, cfg) == length]
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
        fits = any(cfg.min_len <= _natural_length(family, s, cfg) <= cfg.max_len for s in _recall_sizes(family, cfg))
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


# --------------------------------------------------------------------------------------------------
# Recall families: mqar and copy


def _check_recall(family: str, cfg: DataConfig) -> None:
    if problem := cfg.recall_problem(family):
        raise PicollmError(f"data: {problem}")


def _recall_sizes(family: str, cfg: DataConfig) -> list[int]:
    """The pair counts (mqar) or segment lengths (copy) a sequence draws from, uniformly (a value listed
    twice is drawn twice as often)."""
    return list(cfg.mqar_pairs if family == "mqar" else cfg.copy_len)


def _natural_length(family: str, size: int, cfg: DataConfig) -> int:
    if family == "mqar" and cfg.mqar_layout == "zoology":
        return cfg.mqar_length or cfg.max_len
    if family == "mqar":
        return 2 * size + 2 * (cfg.mqar_queries or size)
    return 2 * size


def recall_length(family: str, gen: Generator, cfg: DataConfig) -> int:
    """The one length a recall generator's sequences have: mqar_length (zoology mqar), 2P + 2Q (fed-back
    mqar), 2n (copy)."""
    return _natural_length(family, len(gen), cfg)


def random_recall_generator(
    family: str, cfg: DataConfig, rng: np.random.Generator, sizes: list[int] | None = None
) -> Generator:
    """A generator drawn as the family draws them: mqar `{"k<key>": value}` (P distinct keys and P
    distinct values), copy `{"x<i>": token}` (the segment); P or n uniform over `sizes` (default: the
    config's)."""
    _check_recall(family, cfg)
    options = sizes or _recall_sizes(family, cfg)
    size = int(options[int(rng.integers(len(options)))])
    if family == "mqar":
        k = cfg.mqar_key_vocab
        keys = rng.permutation(k)[:size]  # P distinct keys (faster than rng.choice without replacement)
        values = k + rng.permutation(cfg.mqar_value_vocab)[:size]
        return {f"k{int(a)}": int(b) for a, b in sorted(zip(keys, values, strict=True))}
    return {f"x{i}": int(v) for i, v in enumerate(rng.integers(cfg.modulus, size=size))}


def recall_split(family: str, gen: Generator, bounds: list[tuple[str, float]]) -> str:
    """The split a recall generator belongs to: a hash of it, uniform in [0, 1), falls in one of the
    `bounds` (split name, upper end), as `recall_bounds` lays them out."""
    text = family + ":" + ",".join(f"{k}={v}" for k, v in sorted(gen.items()))
    u = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2.0**64
    return next((name for name, hi in bounds if u < hi), bounds[-1][0])


def recall_bounds(sizes: dict[str, int], held_out_share: float) -> list[tuple[str, float]]:
    """Hash intervals per split: test [0, s), val [s, 2s), train the rest (s = data.held_out_share), so
    a generator's split is the same in every build; other split layouts in proportion to their sizes."""
    order = sorted(sizes, key=lambda n: {"test": 0, "val": 1, "train": 3}.get(n, 2))
    if "train" in sizes:
        weights = {n: held_out_share if n != "train" else 1 - held_out_share * (len(sizes) - 1) for n in sizes}
    else:
        weights = {n: float(k) for n, k in sizes.items()}
    total, at, out = sum(weights.values()), 0.0, []
    for n in order:
        at += weights[n] / total
        out.append((n, at))
    return out


def _recall_sequence(
    family: str, gen: Generator, length: int, cfg: DataConfig, rng: np.random.Generator | None
) -> np.ndarray:
    if length != recall_length(family, gen, cfg):
        natural = recall_length(family, gen, cfg)
        raise PicollmError(f"a {family!r} generator of size {len(gen)} makes {natural}-token sequences, not {length}")
    if family == "copy":
        seg = np.array([gen[f"x{i}"] for i in range(len(gen))], dtype=np.int64)
        return np.concatenate([seg, seg])
    if rng is None:
        raise PicollmError("an mqar sequence needs a random generator for its pair and query order")
    keys = np.array([int(k[1:]) for k in gen], dtype=np.int64)
    values = np.array(list(gen.values()), dtype=np.int64)
    order = rng.permutation(len(keys))
    queries = rng.permutation(len(keys))[: cfg.mqar_queries or len(keys)]
    context = np.stack([keys[order], values[order]], axis=1).reshape(-1)  # (P, 2) -> k1 v1 k2 v2 ...
    if cfg.mqar_layout == "zoology":
        return np.concatenate([context, _query_region(keys[queries], length - len(context), cfg, rng)])
    asked = np.stack([keys[queries], values[queries]], axis=1).reshape(-1)  # (Q, 2) -> q1 a1 q2 a2 ...
    return np.concatenate([context, asked])


def _query_region(asked: np.ndarray, width: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Zoology's query region of `width` tokens: noise tokens (neither keys nor values), the keys `asked`
    at even offsets 2g, the gaps g drawn without replacement with p(g) ~ (g + 1)^(a - 1), a = mqar_power_a."""
    noise_lo = cfg.mqar_key_vocab + cfg.mqar_value_vocab
    region = rng.integers(noise_lo, cfg.modulus, size=width, dtype=np.int64)
    space = width // 2
    p = np.arange(1, space + 1, dtype=np.float64) ** (cfg.mqar_power_a - 1)
    gaps = rng.choice(space, size=len(asked), replace=False, p=p / p.sum())
    region[2 * gaps] = asked
    return region


# Target ids of the positions with no target (Zoology's -100; torch's cross-entropy ignore_index).
NO_TARGET = -100


def targets_of(seq: np.ndarray, family: str, cfg: DataConfig) -> np.ndarray | None:
    """The targets of `seq`'s positions 0..L-2 when they are not the next tokens, else None. Zoology's mqar:
    a query's target is its key's value (never an input), every other position has none (NO_TARGET)."""
    if family != "mqar" or cfg.mqar_layout != "zoology":
        return None
    x = seq.astype(np.int64)
    p = _mqar_pairs_in(x, cfg.mqar_key_vocab)
    value_of = {int(x[2 * i]): int(x[2 * i + 1]) for i in range(p)}
    out = np.full(len(x) - 1, NO_TARGET, dtype=np.int64)
    for t in range(2 * p, len(x) - 1):
        if int(x[t]) in value_of:  # noise is never a key: every key after the pairs is a query
            out[t] = value_of[int(x[t])]
    return out


def _mqar_pairs_in(seq: np.ndarray, key_vocab: int) -> int:
    """P: the keys (even positions) before the first repeated one or the first token that is no key."""
    keys: set[int] = set()
    for key in seq[::2].tolist():
        if key in keys or key >= key_vocab:
            break
        keys.add(key)
    return len(keys)


def answer_mask(seq: np.ndarray, family: str, cfg: DataConfig) -> np.ndarray:
    """Per target: is it a recall answer (mqar: a query's value; copy: the repeated half)? The targets
    Zoology scores; none for the rule families."""
    out = np.zeros(len(seq) - 1, dtype=bool)
    if (targets := targets_of(seq, family, cfg)) is not None:
        return targets != NO_TARGET
    if family == "mqar":
        out[2 * _mqar_pairs_in(seq, cfg.mqar_key_vocab) :: 2] = True  # target t predicts x_{t+1}: x_t is a query
    elif family == "copy":
        out[len(seq) // 2 - 1 :] = True
    return out


def recall_ceilings(seq: np.ndarray, family: str, cfg: DataConfig) -> np.ndarray:
    """Bayes ceilings of a recall sequence for an ideal predictor that knows the family and the draw
    (sizes, keys, values and tokens uniform, as `random_recall_generator` draws them) but not this
    sequence's P or n. 1 on every answer; zoology's mqar has no other targets. Fed-back mqar: 1/(V-i+1) for
    the i-th value; for the (i+1)-th key, 1/(K-i) if another pair is more likely than the first query
    (P(P > i | P >= i) / (K - i) against
    (1 - that) / i), else 0 (1/K on a tie); the first query 1/P if the queries are the likelier (else
    0); a later query 1/(keys not yet asked); the last of every key asked is certain (1). copy: 1/M
    on the random half; on the repeat, whether the repeat of the likeliest consistent segment length
    is the true one (1 except where a shorter candidate copies by chance)."""
    x = [int(v) for v in seq]
    out = np.zeros(len(x) - 1)
    if family == "copy":
        m, n_true, lens = cfg.modulus, len(x) // 2, Counter(cfg.copy_len)
        # A candidate length n fits the prefix x_0..x_{nxt-1} while nxt <= its first mismatch x_s != x_{s-n}.
        fits_to = {n: next((s for s in range(n, len(x)) if x[s] != x[s - n]), len(x)) for n in lens}
        out[: n_true - 1] = 1 / m
        for t in range(n_true - 1, len(x) - 1):
            nxt = t + 1
            logw = {
                n: math.log(c) - min(nxt, n) * math.log(m) for n, c in lens.items() if 2 * n > nxt and fits_to[n] >= nxt
            }
            top = max(logw.values())
            point: dict[int, float] = {}
            for n, lw in logw.items():
                if nxt >= n:  # this length says the token repeats x_{nxt-n}; shorter ones leave a uniform floor
                    point[x[nxt - n]] = point.get(x[nxt - n], 0.0) + math.exp(lw - top)
            best = max(point.values(), default=0.0)
            argmax = {v for v, w in point.items() if w >= best * (1 - 1e-9)} if best > 0 else set(range(m))
            out[t] = float(x[nxt] in argmax) / len(argmax)
        return out
    if (targets := targets_of(seq, family, cfg)) is not None:  # zoology: the answers are the only targets
        return (targets != NO_TARGET).astype(np.float64)
    k, v, pairs = cfg.mqar_key_vocab, cfg.mqar_value_vocab, cfg.mqar_pairs
    p = _mqar_pairs_in(seq, k)
    for t in range(len(x) - 1):
        nxt = t + 1
        if nxt < 2 * p and nxt % 2 == 1:  # the value of pair (nxt + 1) / 2
            out[t] = 1 / (v - (nxt - 1) // 2)
        elif nxt <= 2 * p:  # a new key, or (nxt == 2p) the first query, after i pairs
            i = nxt // 2
            more = sum(q > i for q in pairs) / sum(q >= i for q in pairs)
            new_key = more / (k - i) if k > i else 0.0
            old_key = (1 - more) / i
            if math.isclose(new_key, old_key, rel_tol=1e-9):
                out[t] = 1 / k
            elif nxt < 2 * p:
                out[t] = 1 / (k - i) if new_key > old_key else 0.0
            else:
                out[t] = 1 / p if old_key > new_key else 0.0
        elif (nxt - 2 * p) % 2 == 1:
            out[t] = 1.0
        else:  # a later query: one of the keys not yet asked
            out[t] = 1 / (p - (nxt - 2 * p) // 2)
    return out
