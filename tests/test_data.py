from __future__ import annotations

import numpy as np
import pytest
import torch

from picollm.config import FAMILIES, DataConfig
from picollm.data import (
    IGNORE_INDEX,
    build_data,
    ceiling_per_position,
    inputs_and_targets,
    length_bucketed_batches,
    pad_sequences,
    parse_prompt,
    to_padded,
)
from picollm.errors import PicollmError

SMALL = DataConfig(vocab_size=32, min_len=4, max_len=9, n_train=30, n_val=10, n_test=10, seed=3)


@pytest.fixture(scope="module")
def small_data():
    return build_data(SMALL)


# --------------------------------------------------------------------------------------------------
# Splits


def test_splits_are_content_disjoint(small_data):
    assert small_data.split_overlap() == 0
    as_sets = {name: {tuple(int(v) for v in s) for s in split.sequences} for name, split in small_data.splits().items()}
    assert not as_sets["train"] & as_sets["val"]
    assert not as_sets["train"] & as_sets["test"]
    assert not as_sets["val"] & as_sets["test"]


def test_no_repeats_within_a_split(small_data):
    for split in small_data.splits().values():
        tuples = [tuple(int(v) for v in s) for s in split.sequences]
        assert len(set(tuples)) == len(tuples)


def test_split_overlap_counts_shared_content(small_data):
    small_data.val.sequences.append(small_data.train.sequences[0].copy())
    small_data.test.sequences.append(small_data.train.sequences[1].copy())
    try:
        assert small_data.split_overlap() == 2
    finally:
        small_data.val.sequences.pop()
        small_data.test.sequences.pop()


def _follows_rule(seq: list[int], family: str, cfg: DataConfig) -> bool:
    m = cfg.modulus
    diffs = [(b - a) % m for a, b in zip(seq, seq[1:], strict=False)]
    if family == "counting":
        return all(d == 1 for d in diffs)
    if family == "arithmetic":
        return diffs[0] in {s % m for s in cfg.arithmetic_steps} and len(set(diffs)) == 1
    if family == "geometric":
        return seq[0] != 0 and any(
            all(b == (r * a) % m for a, b in zip(seq, seq[1:], strict=False)) for r in cfg.geometric_ratios
        )
    if family == "alternating":
        return seq[0] != seq[1] and all(v == seq[i % 2] for i, v in enumerate(seq))
    if family == "random_walk":
        return all(d in {s % m for s in cfg.walk_steps} for d in diffs)
    raise AssertionError(family)


@pytest.mark.parametrize(
    "cfg",
    [SMALL, SMALL.model_copy(update={"start_range": (3, 10), "max_len": 12, "seed": 7, "walk_steps": [-2, 1, 3]})],
    ids=["default-starts", "start-range"],
)
def test_sequences_follow_their_family_rule(cfg):
    data = build_data(cfg)
    lo, hi = cfg.start_range or (0, cfg.modulus - 1)
    for split in data.splits().values():
        for seq, fam in zip(split.sequences, split.families, strict=True):
            values = [int(v) for v in seq]
            assert _follows_rule(values, fam, cfg), (fam, values)
            assert lo <= values[0] <= hi
            assert all(0 <= v < cfg.modulus for v in values)  # never the pad token
            assert cfg.min_len <= len(values) <= cfg.max_len


def test_per_family_counts(small_data):
    for split, n in ((small_data.train, 30), (small_data.val, 10), (small_data.test, 10)):
        assert len(split) == n * len(FAMILIES)
        for fam in FAMILIES:
            assert split.families.count(fam) == n
    stats = small_data.stats()
    assert stats["data.split_overlap"] == 0
    assert stats["data.val.geometric"] == 10
    assert stats["data.train.tokens"] == sum(len(s) for s in small_data.train.sequences)


def test_same_seed_same_data():
    a, b = build_data(SMALL), build_data(SMALL)
    assert all(np.array_equal(x, y) for x, y in zip(a.train.sequences, b.train.sequences, strict=True))
    c = build_data(SMALL.model_copy(update={"seed": 4}))
    assert any(not np.array_equal(x, y) for x, y in zip(a.train.sequences, c.train.sequences, strict=False))


def test_too_small_parameter_space_is_an_error():
    cfg = DataConfig(
        seq_types=["counting"], vocab_size=32, start_range=(0, 1), min_len=3, max_len=4, n_train=10, n_val=1, n_test=1
    )
    with pytest.raises(PicollmError, match="counting"):
        build_data(cfg)


def test_exhausted_random_walk_is_an_error():
    # start 0, length 3, steps +-1: only 4 distinct walks, 6 wanted (capacity is unbounded on paper)
    cfg = DataConfig(
        seq_types=["random_walk"], vocab_size=32, start_range=(0, 0), min_len=3, max_len=3, n_train=4, n_val=1, n_test=1
    )
    with pytest.raises(PicollmError, match="random_walk"):
        build_data(cfg)


# --------------------------------------------------------------------------------------------------
# Bayes ceilings, worked out by hand (M = 127 for the default vocab_size 128)

DEFAULT = DataConfig()


def ceil(seq, family, cfg=DEFAULT):
    return ceiling_per_position(np.array(seq), family, cfg).tolist()


def test_ceiling_counting_default():
    # cur+1 is backed by counting (1/M) and the walk's +1 (1/2M): nothing else comes close
    assert ceil([10, 11, 12, 13, 14, 15], "counting") == [1.0] * 5
    assert ceil([125, 126, 0, 1], "counting") == [1.0] * 3  # wraps modulo M


def test_ceiling_random_walk_default():
    # the ideal guess is always one of cur+-1 (counting backs +1 while it is consistent; afterwards
    # +1 and -1 tie): each is right with probability 1/2
    assert ceil([10, 11, 12, 11, 10, 9], "random_walk") == [0.5] * 5


def test_ceiling_alternating_default():
    # first target: b is any of M-1 values, so the guess (10+1) is wrong; then only alternating fits
    assert ceil([10, 50, 10, 50], "alternating") == [0.0, 1.0, 1.0]


def test_ceiling_arithmetic_default():
    # [10, 13]: step 3 (1/(4M)) beats alternating's return to 10 (1/(M(M-1)))
    assert ceil([10, 13, 16, 19], "arithmetic") == [0.0, 1.0, 1.0]


def test_ceiling_geometric_beats_arithmetic_with_same_prefix():
    # first target: 6 (counting + walk, 1.5/M) beats 10 (arith d=5 1/(4M) + geo r=2 1/(2(M-1))).
    # prefix [5, 10]: arithmetic d=5 -> 15 weighs 1/(4M); geometric r=2 -> 20 weighs 1/(2(M-1)): 20 wins.
    assert ceil([5, 10, 20, 40], "geometric") == [0.0, 1.0, 1.0]


def test_ceiling_single_family():
    only_counting = DataConfig(seq_types=["counting"])
    assert ceil([10, 11, 12, 13], "counting", only_counting) == [1.0, 1.0, 1.0]
    # alternating alone: the first target is a uniform guess among the M-1 values != a
    only_alt = DataConfig(seq_types=["alternating"])
    assert ceil([10, 50, 10, 50], "alternating", only_alt) == pytest.approx([1 / 126, 1.0, 1.0])


def test_ceiling_ties_split_evenly():
    # 10 starts (1..10, no 0) x 2 steps == 10 starts x 2 ratios: both hypotheses weigh 1/20.
    cfg = DataConfig(
        seq_types=["arithmetic", "geometric"], start_range=(1, 10), arithmetic_steps=[5, 7], geometric_ratios=[2, 3]
    )
    # t=0: 10 is backed by d=5 and r=2 (2/20) -> right. t=1: d=5 -> 15 vs r=2 -> 20 tie -> 1/2.
    # t=2: only r=2 is left -> right.
    assert ceil([5, 10, 20, 40], "geometric", cfg) == [1.0, 0.5, 1.0]


def test_ceiling_walk_with_unequal_steps():
    cfg = DataConfig(seq_types=["random_walk"], walk_steps=[1, 1, -1])
    # +1 has probability 2/3: always guessed, right 2/3 of the time, whatever the walk did
    assert ceil([10, 9, 8, 9, 10], "random_walk", cfg) == pytest.approx([2 / 3] * 4)
    # equal steps: +1 and -1 always tie
    cfg2 = DataConfig(seq_types=["random_walk"])
    assert ceil([10, 9, 8, 9, 10], "random_walk", cfg2) == pytest.approx([0.5] * 4)


def test_ceiling_walk_prior_shrinks_with_length():
    """[1, 2, 4, 8] is geometric (r=2) and, for two steps, also a walk with steps {1, 2}."""
    cfg = DataConfig(seq_types=["geometric", "random_walk"], walk_steps=[1, 2], geometric_ratios=[2, 3, 5])
    # geometric: 1/(126 * 3) = 1/378 per ratio; walk: (1/127) (1/2)^t (1/2) per step after t steps.
    # t=0 (cur 1): 2 and 3 both get 1/378 + 1/254, 5 gets 1/378 -> tie {2, 3}: 1/2
    # t=1 (cur 2): r=2 -> 4 (1/378) adds to the walk's 4 (1/508) -> 4 wins: 1
    # t=2 (cur 4): r=2 -> 8 (1/378 ~ .00265) beats the walk's 5, 6 (1/1016 ~ .00098): 1
    #   (without the (1/2)^t factor the walk would weigh 1/254 ~ .00394 and win)
    assert ceil([1, 2, 4, 8], "geometric", cfg) == pytest.approx([0.5, 1.0, 1.0])


def test_build_data_ceilings_match_positions(small_data):
    for split in small_data.splits().values():
        for seq, c, fam in zip(split.sequences, split.ceilings, split.families, strict=True):
            assert len(c) == len(seq) - 1
            assert np.all((c >= 0) & (c <= 1))
            if fam == "counting":
                assert np.all(c == 1.0)


# --------------------------------------------------------------------------------------------------
# Padding, batching, prompts


def test_pad_sequences_both_sides():
    right = pad_sequences([[1, 2, 3], [4]], pad_id=9)
    left = pad_sequences([[1, 2, 3], [4]], pad_id=9, side="left")
    assert right.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert left.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert right.dtype == torch.long


def test_inputs_and_targets_ignore_padding():
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 9, 9]])
    inputs, targets = inputs_and_targets(tokens, pad_id=9)
    assert inputs.tolist() == [[1, 2, 3], [5, 6, 9]]
    assert targets.tolist() == [[2, 3, 4], [6, IGNORE_INDEX, IGNORE_INDEX]]


def test_to_padded_and_subset(small_data):
    split = to_padded(small_data.val, SMALL.pad_id, list(FAMILIES))
    assert split.tokens.shape == (50, max(len(s) for s in small_data.val.sequences))
    for i, s in enumerate(small_data.val.sequences):
        assert split.tokens[i, : len(s)].tolist() == s.tolist()
        assert (split.tokens[i, len(s) :] == SMALL.pad_id).all()
        assert split.ceilings[i, : len(s) - 1].tolist() == pytest.approx(small_data.val.ceilings[i].tolist())
        assert (split.ceilings[i, len(s) - 1 :] == 0).all()
    assert split.n_target_tokens == sum(len(s) - 1 for s in small_data.val.sequences)
    short = torch.argsort(split.lengths)[:3]
    sub = split.subset(short)
    assert sub.tokens.shape[1] == int(split.lengths[short].max())


def test_length_bucketed_batches_partition_and_bucket():
    lengths = torch.tensor([5, 9, 3, 7, 7, 4, 9, 3, 6, 8, 5, 4])
    batches = length_bucketed_batches(lengths, 4, torch.Generator().manual_seed(0))
    flat = torch.cat(batches).tolist()
    assert sorted(flat) == list(range(len(lengths)))
    assert all(len(b) <= 4 for b in batches)
    spans = sorted((int(lengths[b].min()), int(lengths[b].max())) for b in batches)
    for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False):
        assert hi <= lo  # buckets of similar length do not interleave
    again = length_bucketed_batches(lengths, 4, torch.Generator().manual_seed(0))
    assert [b.tolist() for b in again] == [b.tolist() for b in batches]
    ordered = length_bucketed_batches(lengths, 4, None, shuffle=False)
    assert torch.equal(lengths[torch.cat(ordered)], lengths.sort().values)


def test_parse_prompt():
    assert parse_prompt("2 4 6 8", 32) == [2, 4, 6, 8]
    assert parse_prompt(" 0, 30 ", 32) == [0, 30]
    for bad, msg in (
        ("", "empty"),
        ("   ", "empty"),
        ("1 x 3", "not an integer"),
        ("1 31", "outside"),
        ("-1", "outside"),
        ("2.5", "not an integer"),
    ):
        with pytest.raises(PicollmError, match=msg):
            parse_prompt(bad, 32)
