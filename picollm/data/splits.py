"""Splits of the synthetic families that share no generator, seen/novel contexts, split logging,
padding and batching.

The families, their generators and Bayes ceilings live in `picollm.generators` (re-exported here).
`build_data` cuts each family's generator space into one pool per split, in proportion to the split
sizes and seeded by data.seed, and draws every split's sequences from its own pool only: no generator
is in two splits (`data.generator_overlap`, 0) and no sequence content either (`data.split_overlap`, 0).

Seen vs novel contexts. A val/test target x_{t+1} has a *seen context* when the tuple
(x_{t-k+1}, ..., x_t, x_{t+1}) occurs at some position of some training sequence of any family, with
k = CONTEXT_K[family]: 1 for the first-order rules (counting, arithmetic, geometric, random walk), 2
for alternating (x_{t+1} = x_{t-1}). A target with fewer than k tokens before it uses those it has
(an alternating sequence's first target: (x_0, x_1)). A lookup table of training n-grams can answer
a seen target; a novel one needs the rule. The recall families (mqar, copy) use k = 1 too, but no
n-gram answers them: a key's value, or a segment's next token, is in this sequence's context only.

Held-out rules (`data.split: new_rules`, arithmetic and geometric only): the steps and ratios are cut into one
share per split (`cut_rules`) and a split's pool holds every start with its own steps or ratios (`cut_by_rule`),
so a val/test transition is new unless another rule happens to make the same pair of values.

Recall families draw no pool from a numbered space: each sequence draws a fresh generator (its key ->
value assignment or segment, `random_recall_generator`), and a hash of the generator says which split
may use it (`recall_split`): a val/test generator is in no train split of any build.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from picollm.config import DataConfig
from picollm.config.base import RECALL_FAMILIES
from picollm.data.generators import (
    RULE_KEYS,
    Generator,
    ceiling_per_position,
    cut_rules,
    generator_at,
    generator_count,
    generators_with_rules,
    is_deterministic,
    sequence_from_generator,
    sequences_per_generator,
)
from picollm.data.recall_families import (
    NO_TARGET,
    answer_mask,
    random_recall_generator,
    recall_bounds,
    recall_length,
    recall_split,
    targets_of,
)
from picollm.errors import PicollmError

if TYPE_CHECKING:
    pass

IGNORE_INDEX = NO_TARGET  # a target the loss and the metrics skip (padding, zoology's non-queries)

CONTEXT_K = {"counting": 1, "arithmetic": 1, "geometric": 1, "alternating": 2, "random_walk": 1, "mqar": 1, "copy": 1}


# --------------------------------------------------------------------------------------------------
# Seen vs novel contexts


def training_ngrams(sequences: list[np.ndarray], sizes: set[int]) -> set[tuple[int, ...]]:
    """Every window of each length in `sizes` of every sequence."""
    out: set[tuple[int, ...]] = set()
    for seq in sequences:
        x = [int(v) for v in seq]
        for n in sizes:
            out.update(tuple(x[i : i + n]) for i in range(len(x) - n + 1))
    return out


def seen_context_flags(
    sequences: list[np.ndarray],
    families: list[str],
    train_sequences: list[np.ndarray],
    targets: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Per sequence, a bool per target: does (last CONTEXT_K tokens, target) occur anywhere in
    `train_sequences` (any family)? See the module docstring. `targets` (per position) where a target is not
    the next token (zoology's mqar); a position without a target counts as unseen."""
    grams = training_ngrams(train_sequences, set(range(2, max(CONTEXT_K[f] for f in {*families, "counting"}) + 2)))
    out = []
    for i, (seq, fam) in enumerate(zip(sequences, families, strict=True)):
        k, x = CONTEXT_K[fam], [int(v) for v in seq]
        y = [int(v) for v in targets[i]] if targets else x[1:]
        out.append(np.array([(*x[max(0, t - k + 1) : t + 1], y[t]) in grams for t in range(len(x) - 1)], dtype=bool))
    return out


# --------------------------------------------------------------------------------------------------
# Splits


@dataclass
class SequenceSplit:
    """One split: variable-length sequences with their family, generator and per-target ceilings, and
    (val/test) per-target seen-context flags; `answers` marks the recall answers (`answer_mask`)."""

    name: str
    sequences: list[np.ndarray]
    families: list[str]
    ceilings: list[np.ndarray]
    generators: list[Generator] = field(default_factory=list)  # e.g. {"start": 5, "step": 3}
    seen: list[np.ndarray] = field(default_factory=list)  # empty for train
    answers: list[np.ndarray] = field(default_factory=list)  # per target bool; empty = no recall answers
    targets: list[np.ndarray] = field(default_factory=list)  # per position target id; empty = the next tokens

    def __len__(self) -> int:
        return len(self.sequences)

    def records(self) -> list[dict[str, Any]]:
        """One `{"family", "tokens", <generator parameters>}` per sequence (the logged jsonl lines)."""
        gens = self.generators or [{}] * len(self)
        out = [
            {"family": f, "tokens": [int(v) for v in s], **g}
            for s, f, g in zip(self.sequences, self.families, gens, strict=True)
        ]
        for rec, s, y in zip(out, self.sequences, self.targets, strict=False):
            if not np.array_equal(y, s[1:]):  # zoology's mqar: the targets are not the next tokens
                rec["targets"] = [int(v) for v in y]
        return out


def split_rules(split: SequenceSplit) -> dict[str, list[int]]:
    """The steps (arithmetic) and ratios (geometric) of the generators the split's sequences come from."""
    out: dict[str, set[int]] = {}
    for fam, gen in zip(split.families, split.generators, strict=False):
        if fam in RULE_KEYS:
            out.setdefault(fam, set()).add(int(gen[RULE_KEYS[fam]]))
    return {fam: sorted(v) for fam, v in out.items()}


def _generator_key(family: str, gen: Generator) -> tuple[Any, ...]:
    return (family, *sorted(gen.items()))


@dataclass
class SyntheticData:
    train: SequenceSplit
    val: SequenceSplit
    test: SequenceSplit
    families: list[str]
    pools: dict[str, dict[str, list[Generator]]] = field(default_factory=dict)  # split -> family -> pool

    def splits(self) -> dict[str, SequenceSplit]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def generator_pool(self, split: str, family: str) -> list[Generator]:
        """The generators of `family` cut for `split` (used or spare), in no other split's pool: draw
        held-out sequences (e.g. longer ones) from `generator_pool("test", family)`."""
        return list(self.pools.get(split, {}).get(family, []))

    def split_overlap(self) -> int:
        """Number of val/test sequences whose content also appears in train (must be 0)."""
        seen = {s.tobytes() for s in self.train.sequences}
        return sum(s.tobytes() in seen for s in self.val.sequences + self.test.sequences)

    def generator_overlap(self) -> int:
        """Number of (family, generator) pairs that sequences of two or more splits use (must be 0)."""
        used = [
            {_generator_key(f, g) for f, g in zip(s.families, s.generators, strict=False)}
            for s in self.splits().values()
        ]
        return sum(sum(key in other for other in used) > 1 for key in set().union(*used))

    def stats(self) -> dict[str, int | str]:
        """Counts of the draw, logged as run params (`data.train.sequences`, `data.split_overlap`, ...):
        facts about the inputs, not measurements, so they stay out of metric tables and charts. Also the arithmetic
        steps and geometric ratios each split's sequences use (`data.test.rules.arithmetic`: "6,11"): disjoint under
        `data.split: new_rules`, the same in every split under the generator split."""
        out: dict[str, int | str] = {
            "data.split_overlap": self.split_overlap(),
            "data.generator_overlap": self.generator_overlap(),
        }
        for name, split in self.splits().items():
            out |= {f"data.{name}.rules.{fam}": ",".join(map(str, r)) for fam, r in split_rules(split).items()}
        for name, split in self.splits().items():
            out[f"data.{name}.sequences"] = len(split)
            out[f"data.{name}.tokens"] = sum(len(s) for s in split.sequences)
            out[f"data.{name}.generators"] = len(
                {_generator_key(f, g) for f, g in zip(split.families, split.generators, strict=False)}
            )
            for fam in self.families:
                out[f"data.{name}.{fam}"] = sum(f == fam for f in split.families)
        return out


def cut_generators(
    family: str, cfg: DataConfig, sizes: dict[str, int], rng: np.random.Generator, min_len: int, max_len: int
) -> dict[str, list[Generator]]:
    """Disjoint pools of `family`'s generators, one per split: a random partition of the space into
    shares (`data.held_out_share` each for val and test; at least one generator each, and enough for the
    split's sequences at min_len..max_len). Only the generators a split could use are listed: min(share, 2n + 8) for n
    sequences (the spares replace draws whose content another family already made)."""
    total = generator_count(family, cfg)
    if total < len(sizes):
        raise PicollmError(
            f"data: family {family!r} has {total} generator(s), too few for {len(sizes)} splits that share "
            f"none; widen its parameters (start_range, arithmetic_steps, geometric_ratios)"
        )
    per_gen = sequences_per_generator(family, cfg, min_len, max_len)
    need = {n: max(1, -(-k // per_gen)) for n, k in sizes.items()}
    if sum(need.values()) > total:
        raise PicollmError(
            f"data: family {family!r} has {total} generators of {per_gen} sequences each, too few for "
            f"{sum(sizes.values())} sequences in splits that share no generator; widen its parameters "
            f"(start_range, steps, ratios, lengths) or lower n_train/n_val/n_test"
        )
    # Shares of the space by split: held_out_share each for val and test, whatever their sizes (a test set
    # of a few generators would measure little); other split layouts in proportion to their sizes.
    weights = (
        {n: cfg.held_out_share if n != "train" else 1 - cfg.held_out_share * (len(sizes) - 1) for n in sizes}
        if "train" in sizes
        else dict(sizes)
    )
    share = _proportional(total, weights, need)
    take = {n: min(share[n], 2 * k + 8) for n, k in sizes.items()}
    picked = rng.choice(total, size=sum(take.values()), replace=False).tolist()
    pools, at = {}, 0
    for n, k in take.items():
        pools[n] = [generator_at(family, i, cfg) for i in picked[at : at + k]]
        at += k
    return pools


def cut_by_rule(
    family: str, cfg: DataConfig, sizes: dict[str, int], rng: np.random.Generator, min_len: int, max_len: int
) -> dict[str, list[Generator]]:
    """`data.split: new_rules`: each split's pool holds generators of its own rules only (`cut_rules`), so no
    val/test step or ratio is ever in train; like `cut_generators`, min(rule space, 2n + 8) of them."""
    rules = cut_rules(family, cfg, list(sizes))
    per_gen = sequences_per_generator(family, cfg, min_len, max_len)
    pools = {}
    for name, k in sizes.items():
        space = generators_with_rules(family, rules[name], cfg)
        if len(space) * per_gen < k:
            raise PicollmError(
                f"data: {name}'s {family} rules {rules[name]} make {len(space) * per_gen} sequences, fewer than "
                f"{k}; widen start_range or the lengths, or lower n_{name}"
            )
        picked = rng.choice(len(space), size=min(len(space), 2 * k + 8), replace=False)
        pools[name] = [space[int(i)] for i in picked]
    return pools


def _proportional(total: int, sizes: dict[str, float], need: dict[str, int]) -> dict[str, int]:
    """Integer shares of `total` proportional to `sizes` (largest remainders), each at least `need`."""
    exact = {n: total * k / sum(sizes.values()) for n, k in sizes.items()}
    share = {n: max(need[n], int(exact[n])) for n in sizes}
    while sum(share.values()) > total:  # the minimums took generators from the others
        n = max((n for n in share if share[n] > need[n]), key=lambda n: share[n] - exact[n])
        share[n] -= 1
    while sum(share.values()) < total:
        n = max(share, key=lambda n: exact[n] - share[n])
        share[n] += 1
    return share


def _draw_split(
    family: str,
    pool: list[Generator],
    n: int,
    name: str,
    cfg: DataConfig,
    max_len: int,
    rng: np.random.Generator,
    seen: set[bytes],
) -> list[tuple[np.ndarray, Generator]]:
    """`n` sequences of new content from `pool`, in passes over it: one per generator while the pool
    lasts, another length (a walk: another draw) of each generator on every further pass."""
    lengths = np.arange(cfg.min_len, max_len + 1)
    deterministic = is_deterministic(family, cfg)
    left: dict[int, list[int]] = {}  # deterministic: the lengths a generator has not been drawn at yet
    out: list[tuple[np.ndarray, Generator]] = []
    while len(out) < n:
        before = len(out)
        for i, gen in enumerate(pool):
            if len(out) == n:
                break
            if deterministic:
                todo = left.setdefault(i, rng.permutation(lengths).tolist())
                draws = (sequence_from_generator(family, gen, todo.pop(), cfg) for _ in range(len(todo)))
            else:
                draws = (
                    sequence_from_generator(family, gen, int(rng.integers(cfg.min_len, max_len + 1)), cfg, rng)
                    for _ in range(50)
                )
            seq = next((s for s in draws if s.tobytes() not in seen), None)
            if seq is not None:
                seen.add(seq.tobytes())
                out.append((seq, gen))
        if len(out) == before:
            raise PicollmError(
                f"data: could not draw {n} distinct {family!r} sequences for {name} from its {len(pool)} "
                f"generators; widen the family's parameters (start_range, steps, ratios, lengths)"
            )
    return out


def _draw_recall_splits(
    family: str, cfg: DataConfig, sizes: dict[str, int], rng: np.random.Generator, seen: set[bytes]
) -> dict[str, list[tuple[np.ndarray, Generator]]]:
    """`sizes[split]` sequences of new content per split, each from a freshly drawn generator that
    hashes into that split (`recall_split`); draws for a full split are dropped."""
    bounds = recall_bounds(sizes, cfg.held_out_share)
    out: dict[str, list[tuple[np.ndarray, Generator]]] = {n: [] for n in sizes}
    attempts, limit = 0, 50 * sum(sizes.values()) + 1000
    while any(len(out[n]) < k for n, k in sizes.items()):
        attempts += 1
        if attempts > limit:
            short = {n: f"{len(out[n])}/{k}" for n, k in sizes.items()}
            raise PicollmError(
                f"data: could not draw distinct {family!r} sequences with held-out generators ({short} after "
                f"{limit} draws); widen mqar_key_vocab, mqar_value_vocab, copy_len or vocab_size, "
                "or lower n_train/n_val/n_test"
            )
        gen = random_recall_generator(family, cfg, rng)
        name = recall_split(family, gen, bounds)
        if len(out[name]) >= sizes[name]:
            continue
        seq = sequence_from_generator(family, gen, recall_length(family, gen, cfg), cfg, rng)
        if seq.tobytes() not in seen:
            seen.add(seq.tobytes())
            out[name].append((seq, gen))
    return out


def build_data(cfg: DataConfig, splits: dict[str, int] | None = None, max_len: int | None = None) -> SyntheticData:
    """Generate the splits: no generator shared between splits, no content shared between or within them.

    Per family, the generator space is cut into a pool per split (`cut_generators`) and each split
    draws from its own pool (`_draw_split`), at random lengths in min_len..max_len. A draw whose content
    was already used anywhere (other families can make it: `5 6 5 6` is alternating and a walk) is
    drawn again. Too few generators for the splits is an error naming the family. Val/test sequences
    carry their seen-context flags against train. Recall families draw their own generators per split
    (`_draw_recall_splits`) at their own lengths (max_len does not apply).
    """
    sizes = splits or {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    rng = np.random.default_rng(cfg.seed)
    hi = max_len or cfg.max_len
    seen: set[bytes] = set()
    explicit = "mqar" in cfg.seq_types and cfg.mqar_layout == "zoology"  # targets that are not the next tokens
    out: dict[str, SequenceSplit] = {n: SequenceSplit(n, [], [], []) for n in sizes}
    pools: dict[str, dict[str, list[Generator]]] = {n: {} for n in sizes}
    for fam in cfg.seq_types:
        if fam in RECALL_FAMILIES:
            drawn = _draw_recall_splits(fam, cfg, sizes, rng, seen)
            cut = {n: list({_generator_key(fam, g): g for _, g in d}.values()) for n, d in drawn.items()}
        else:
            cut = (cut_by_rule if cfg.split == "new_rules" else cut_generators)(fam, cfg, sizes, rng, cfg.min_len, hi)
            drawn = {n: _draw_split(fam, cut[n], k, n, cfg, hi, rng, seen) for n, k in sizes.items()}
        for name in sizes:
            pools[name][fam] = cut[name]
            for seq, gen in drawn[name]:
                out[name].sequences.append(seq)
                out[name].families.append(fam)
                out[name].generators.append(gen)
                out[name].ceilings.append(ceiling_per_position(seq, fam, cfg))
                out[name].answers.append(answer_mask(seq, fam, cfg))
                if explicit:  # every sequence of the split, so the list stays aligned with `sequences`
                    targets = targets_of(seq, fam, cfg)
                    out[name].targets.append(seq[1:].copy() if targets is None else targets)
    for name, split in out.items():
        if name != "train" and "train" in out:
            split.seen = seen_context_flags(split.sequences, split.families, out["train"].sequences, split.targets)
    return SyntheticData(families=list(cfg.seq_types), pools=pools, **out)


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
    seen: torch.Tensor | None = None  # (N, Lmax-1) bool: the target's context occurs in train; False on padding
    answers: torch.Tensor | None = None  # (N, Lmax-1) bool: a recall answer (`answer_mask`); False on padding
    targets: torch.Tensor | None = None  # (N, Lmax-1) target ids where they are not the next tokens; None: they are

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
            seen=None if self.seen is None else self.seen[idx, : max(width - 1, 0)],
            answers=None if self.answers is None else self.answers[idx, : max(width - 1, 0)],
            targets=None if self.targets is None else self.targets[idx, : max(width - 1, 0)],
        )

    def inputs_and_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, Lmax-1) inputs and targets, IGNORE_INDEX on padding and where a position has no target."""
        return inputs_and_targets(self.tokens, self.pad_id, self.targets)


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
    seen = _padded_flags(split.seen, len(split), ceilings.shape)
    answers = _padded_flags(split.answers, len(split), ceilings.shape)
    targets = None
    if split.targets:
        targets = torch.full(ceilings.shape, IGNORE_INDEX, dtype=torch.long)
        for i, y in enumerate(split.targets):
            targets[i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
    return PaddedSplit(
        tokens=tokens,
        lengths=torch.tensor([len(s) for s in split.sequences]),
        pad_id=pad_id,
        family_ids=torch.tensor([families.index(f) for f in split.families]),
        ceilings=ceilings,
        family_names=list(families),
        seen=seen,
        answers=answers if answers is not None and bool(answers.any()) else None,
        targets=targets,
    )


def _padded_flags(flags: list[np.ndarray], n: int, shape: torch.Size) -> torch.Tensor | None:
    """Per-target bool arrays as one (N, Lmax-1) tensor, False on padding; None unless every row has one."""
    if not flags or len(flags) != n:
        return None
    out = torch.zeros(shape, dtype=torch.bool)
    for i, f in enumerate(flags):
        out[i, : len(f)] = torch.as_tensor(f, dtype=torch.bool)
    return out


def inputs_and_targets(
    tokens: torch.Tensor, pad_id: int, targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs (or the explicit `targets` (N, L-1) where given); padding targets become IGNORE_INDEX."""
    inputs = tokens[:, :-1]
    if targets is not None:
        return inputs, targets.to(tokens.device).masked_fill(tokens[:, 1:] == pad_id, IGNORE_INDEX)
    return inputs, tokens[:, 1:].masked_fill(tokens[:, 1:] == pad_id, IGNORE_INDEX)


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
