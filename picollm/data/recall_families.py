"""The recall families, mqar (multi-query associative recall, Zoology: arXiv:2312.04927) and copy: their
generators (drawn, not numbered: a hash of one fixes its split), sequences in either mqar layout, explicit
targets (zoology's answers), answer masks and Bayes ceilings. picollm/data/generators.py describes the layouts
and dispatches every family to its module; this one knows nothing of the rule families."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np

from picollm.config import DataConfig
from picollm.errors import PicollmError

RecallGenerator = dict[str, int]  # mqar {"k<key>": value}, copy {"x<i>": token}


def _check_recall(family: str, cfg: DataConfig) -> None:
    if problem := cfg.recall_problem(family):
        raise PicollmError(f"data: {problem}")


def recall_sizes(family: str, cfg: DataConfig) -> list[int]:
    """The pair counts (mqar) or segment lengths (copy) a sequence draws from, uniformly (a value listed
    twice is drawn twice as often)."""
    return list(cfg.mqar_pairs if family == "mqar" else cfg.copy_len)


def natural_length(family: str, size: int, cfg: DataConfig) -> int:
    if family == "mqar" and cfg.mqar_layout == "zoology":
        return cfg.mqar_length or cfg.max_len
    if family == "mqar":
        return 2 * size + 2 * (cfg.mqar_queries or size)
    return 2 * size


def recall_length(family: str, gen: RecallGenerator, cfg: DataConfig) -> int:
    """The one length a recall generator's sequences have: mqar_length (zoology mqar), 2P + 2Q (fed-back
    mqar), 2n (copy)."""
    return natural_length(family, len(gen), cfg)


def random_recall_generator(
    family: str, cfg: DataConfig, rng: np.random.RecallGenerator, sizes: list[int] | None = None
) -> RecallGenerator:
    """A generator drawn as the family draws them: mqar `{"k<key>": value}` (P distinct keys and P
    distinct values), copy `{"x<i>": token}` (the segment); P or n uniform over `sizes` (default: the
    config's)."""
    _check_recall(family, cfg)
    options = sizes or recall_sizes(family, cfg)
    size = int(options[int(rng.integers(len(options)))])
    if family == "mqar":
        k = cfg.mqar_key_vocab
        keys = rng.permutation(k)[:size]  # P distinct keys (faster than rng.choice without replacement)
        values = k + rng.permutation(cfg.mqar_value_vocab)[:size]
        return {f"k{int(a)}": int(b) for a, b in sorted(zip(keys, values, strict=True))}
    return {f"x{i}": int(v) for i, v in enumerate(rng.integers(cfg.modulus, size=size))}


def recall_split(family: str, gen: RecallGenerator, bounds: list[tuple[str, float]]) -> str:
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


def recall_sequence(
    family: str, gen: RecallGenerator, length: int, cfg: DataConfig, rng: np.random.RecallGenerator | None
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


def _query_region(asked: np.ndarray, width: int, cfg: DataConfig, rng: np.random.RecallGenerator) -> np.ndarray:
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
