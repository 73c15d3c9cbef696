from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from picollm.config import DataConfig
from picollm.config.base import RULE_FAMILIES
from picollm.data.generators import (
    ceiling_per_position,
    draw_from_generators,
    generate_sequence,
    generator_at,
    generator_count,
    sequence_from_generator,
)
from picollm.data.splits import (
    IGNORE_INDEX,
    PaddedSplit,
    SequenceSplit,
    build_data,
    inputs_and_targets,
    length_bucketed_batches,
    pad_sequences,
    seen_context_flags,
    to_padded,
)
from picollm.data.tokenizers import parse_prompt
from picollm.errors import PicollmError
from picollm.tracking.runs import RunLog
from picollm.training.evaluation import accuracy_metrics
from picollm.training.run import log_splits

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
        assert len(split) == n * len(RULE_FAMILIES)
        for fam in RULE_FAMILIES:
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
    # starts 0..2, length 3, steps +-1: 4 distinct walks per start, and train's 5 need two starts of the
    # three, one left for val and test each (capacity is unbounded on paper)
    cfg = DataConfig(
        seq_types=["random_walk"], vocab_size=32, start_range=(0, 2), min_len=3, max_len=3, n_train=5, n_val=1, n_test=1
    )
    with pytest.raises(PicollmError, match="random_walk"):
        build_data(cfg)


# --------------------------------------------------------------------------------------------------
# Held-out generators

TINY_VOCAB = DataConfig(vocab_size=16, min_len=4, max_len=8, n_train=30, n_val=8, n_test=8)


def _generator_keys(split: SequenceSplit, family: str) -> set[tuple]:
    return {tuple(sorted(g.items())) for g, f in zip(split.generators, split.families, strict=True) if f == family}


@pytest.mark.parametrize("family", RULE_FAMILIES)
@pytest.mark.parametrize("cfg", [SMALL, TINY_VOCAB, DataConfig()], ids=["vocab32", "vocab16", "default"])
@pytest.mark.parametrize("seed", [0, 1, 5])
def test_no_generator_is_in_two_splits(family, cfg, seed):
    cfg = cfg.model_copy(update={"seed": seed, "seq_types": [family]})
    data = build_data(cfg)
    for split in data.splits().values():
        assert len(split.generators) == len(split)
        for seq, gen in zip(split.sequences, split.generators, strict=True):  # the records are the truth
            if family == "random_walk":
                assert gen == {"start": int(seq[0])}
            else:
                assert np.array_equal(sequence_from_generator(family, gen, len(seq), cfg), seq), (gen, seq)
    keys = {name: _generator_keys(split, family) for name, split in data.splits().items()}
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    pools = {name: {tuple(sorted(g.items())) for g in data.generator_pool(name, family)} for name in keys}
    for name in keys:
        assert keys[name] <= pools[name]
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"] and not pools["val"] & pools["test"]
    assert data.generator_overlap() == 0 and data.split_overlap() == 0


def test_generators_cut_by_held_out_share_and_distinct_first():
    data = build_data(DataConfig())  # 2000:80:80 per family
    counting = {n: len(data.generator_pool(n, "counting")) for n in ("train", "val", "test")}
    assert counting == {"train": 89, "val": 19, "test": 19}  # 127 starts: held_out_share 0.15 each for val, test
    # 168 alternating generators in val's pool (of 2,286 cut for it): 80 sequences, 80 generators
    assert len(_generator_keys(data.val, "alternating")) == 80
    # 19 counting starts for 80 test sequences: every start is used, at several lengths
    assert len(_generator_keys(data.test, "counting")) == 19
    wider = build_data(DataConfig(seq_types=["counting"], n_train=50, held_out_share=0.3))
    assert {n: len(wider.generator_pool(n, "counting")) for n in ("val", "test")} == {"val": 38, "test": 38}


def test_generator_overlap_is_logged_and_counts_shared_generators(small_data):
    assert small_data.stats()["data.generator_overlap"] == 0
    small_data.test.sequences.append(small_data.train.sequences[0] + 0)
    small_data.test.families.append(small_data.train.families[0])
    small_data.test.generators.append(small_data.train.generators[0])
    try:
        assert small_data.generator_overlap() == 1
    finally:
        for field in ("sequences", "families", "generators"):
            getattr(small_data.test, field).pop()


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(seq_types=["counting"], vocab_size=32, start_range=(0, 1)),  # 2 starts, 3 splits
        DataConfig(seq_types=["geometric"], vocab_size=32, start_range=(0, 2), geometric_ratios=[2]),  # 0 is no start
        DataConfig(seq_types=["alternating"], vocab_size=32, start_range=(4, 5), min_len=4, max_len=4),  # 60 < 74
    ],
    ids=["counting", "geometric", "alternating"],
)
def test_too_few_generators_is_a_one_line_error(cfg):
    with pytest.raises(PicollmError, match=cfg.seq_types[0]) as err:
        build_data(cfg.model_copy(update={"n_train": 50, "n_val": 12, "n_test": 12}))
    assert "\n" not in str(err.value) and "generator" in str(err.value)


def test_generator_spaces_at_the_defaults():
    cfg = DataConfig()
    sizes = {f: generator_count(f, cfg) for f in RULE_FAMILIES}
    assert sizes == {
        "counting": 127,
        "arithmetic": 127 * 4,
        "geometric": 126 * 2,
        "alternating": 127 * 126,
        "random_walk": 127,
    }
    for fam in RULE_FAMILIES:
        gens = [generator_at(fam, i, cfg) for i in range(sizes[fam])]
        assert len({tuple(sorted(g.items())) for g in gens}) == sizes[fam]
    assert generator_at("alternating", 0, cfg) == {"a": 0, "b": 1}
    assert generator_at("alternating", 126, cfg) == {"a": 1, "b": 0}


def test_draw_from_generators_stays_in_the_pool():
    data = build_data(SMALL)
    rng = np.random.default_rng(0)
    for fam in RULE_FAMILIES:
        pool = data.generator_pool("test", fam)
        for _ in range(5):
            seq, gen = draw_from_generators(fam, pool, 40, SMALL, rng)
            assert len(seq) == 40 and gen in pool
            if fam != "random_walk":
                assert np.array_equal(seq, sequence_from_generator(fam, gen, 40, SMALL))


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
    assert ceil([10, 41, 10, 41], "alternating") == [0.0, 1.0, 1.0]
    # 30 = 3 * 10: geometric r=3 (1/(126 * 2)) beats alternating's return to 10 (1/(M(M-1))) until x_2
    assert ceil([10, 30, 10, 30], "alternating") == [0.0, 0.0, 1.0]


def test_ceiling_arithmetic_default():
    # [10, 13]: step 3 (1/(4M), 4 steps) beats alternating's return to 10 (1/(M(M-1)))
    assert ceil([10, 13, 16, 19], "arithmetic") == [0.0, 1.0, 1.0]


def test_ceiling_geometric_beats_arithmetic_with_same_prefix():
    # first target: 6 (counting + walk, 1.5/M) beats 10 (arith d=5 1/(11M) + geo r=2 1/(5(M-1))).
    # prefix [5, 10]: arithmetic d=5 -> 15 weighs 1/(11M); geometric r=2 -> 20 weighs 1/(5(M-1)): 20 wins.
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


def test_ceiling_walk_path_probability_uses_step_frequencies():
    """A walk's prior weight is the probability of the steps it took, not 1/|walk_steps| per step."""
    cfg = DataConfig(vocab_size=32, seq_types=["alternating", "random_walk"], walk_steps=[-1, -1, -1, 1])
    # prefix [10, 11, 10] took +1 (1/4) then -1 (3/4). Next: 9 weighs (3/16)(3/4)/31 ~ .0045; 11 weighs
    # (3/16)(1/4)/31 ~ .0015 plus alternating's 1/(31 * 30) ~ .0011: 9 wins, right 3/4 of the time.
    # (With (1/4)^t for the path, 11 would win: .0005 + .0011 against .0015.)
    assert ceil([10, 11, 10, 9], "random_walk", cfg)[2] == pytest.approx(3 / 4)


def test_build_data_ceilings_match_positions(small_data):
    for split in small_data.splits().values():
        for seq, c, fam in zip(split.sequences, split.ceilings, split.families, strict=True):
            assert len(c) == len(seq) - 1
            assert np.all((c >= 0) & (c <= 1))
            if fam == "counting":
                assert np.all(c == 1.0)


def naive_ceiling(seq: list[int], family: str, cfg: DataConfig) -> list[float]:
    """The Bayes ceiling by brute force: every generator of every family, weighted 1/|space|."""
    m, x = cfg.modulus, [int(v) for v in seq]
    rows, weights = [], []
    for fam in cfg.seq_types:
        if fam != "random_walk":
            n = generator_count(fam, cfg)
            rows += [sequence_from_generator(fam, generator_at(fam, i, cfg), len(x), cfg) for i in range(n)]
            weights += [1 / n] * n
    rows, weights = np.array(rows).reshape(-1, len(x)), np.array(weights)
    walk = [s % m for s in cfg.walk_steps]
    n_walk_starts = generator_count("random_walk", cfg)
    lo, hi = cfg.start_range or (0, m - 1)
    out = []
    for t in range(len(x) - 1):
        pred = np.zeros(m)
        match = (rows[:, : t + 1] == x[: t + 1]).all(1)
        np.add.at(pred, rows[match, t + 1], weights[match])
        if "random_walk" in cfg.seq_types and lo <= x[0] <= hi:
            p_path = np.prod([walk.count((b - a) % m) / len(walk) for a, b in zip(x[:t], x[1 : t + 1], strict=True)])
            for s in walk:
                pred[(x[t] + s) % m] += p_path / n_walk_starts / len(walk)
        best = pred.max()
        argmax = set(np.flatnonzero(pred >= best * (1 - 1e-9)).tolist()) if best > 0 else set()
        if not argmax:
            out.append(0.0)
        elif family == "random_walk":
            out.append(sum((x[t] + s) % m in argmax for s in walk) / len(walk) / len(argmax))
        else:
            out.append(float(x[t + 1] in argmax) / len(argmax))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        DEFAULT,
        DataConfig(vocab_size=14),  # M = 13: the steps are every residue but 0 and 1, so prefixes are ambiguous
        DataConfig(vocab_size=16, start_range=(1, 9), walk_steps=[1, 1, -1, 4]),  # composite M, unequal steps
        DataConfig(vocab_size=20, seq_types=["arithmetic", "geometric", "alternating"], geometric_ratios=[2, 6]),
        DataConfig(vocab_size=32, seq_types=["alternating", "random_walk"], walk_steps=[-1, -1, -1, 1]),
    ],
    ids=["default", "vocab14", "vocab16-walk", "three-families", "skewed-walk"],
)
def test_ceiling_matches_brute_force(cfg):
    rng = np.random.default_rng(0)
    cases = [[5, 10, 20, 40], [10, 50, 10, 50], [3, 4, 3, 4, 3], [10, 11, 10, 9, 8]]
    for fam in cfg.seq_types:
        for _ in range(12):
            seq = generate_sequence(fam, 7, cfg, rng)
            assert ceiling_per_position(seq, fam, cfg).tolist() == pytest.approx(naive_ceiling(seq, fam, cfg)), (
                fam,
                seq,
            )
    for seq in cases:
        for fam in cfg.seq_types:
            if all(0 <= v < cfg.modulus for v in seq):
                assert ceil(seq, fam, cfg) == pytest.approx(naive_ceiling(seq, fam, cfg)), (fam, seq)


# --------------------------------------------------------------------------------------------------
# Seen vs novel contexts


def test_seen_context_flags_by_hand():
    train = [np.array([1, 2, 3, 4]), np.array([7, 9, 7, 9])]  # a counting and an alternating sequence
    seqs = [[2, 3, 4, 5], [3, 4, 3, 4], [9, 7, 9, 7], [2, 4, 6], [2, 3, 2]]
    fams = ["counting", "alternating", "alternating", "arithmetic", "random_walk"]
    flags = seen_context_flags([np.array(s) for s in seqs], fams, train)
    assert [f.tolist() for f in flags] == [
        [True, True, False],  # (2,3) (3,4) in train, (4,5) not
        [True, False, False],  # first target: only (3,4) before it, seen in the counting sequence; (3,4,3) is not
        [True, True, True],  # (9,7) (9,7,9) (7,9,7): windows of the training alternation
        [False, False],
        [True, False],  # (2,3) seen (in a counting sequence: any family counts), (3,2) not
    ]


def test_novel_context_metrics_on_a_hand_built_split():
    pad = 9
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 5, pad], [1, 3, pad, pad]])  # 3 + 2 + 1 targets
    seen = torch.tensor([[True, True, True], [True, False, False], [False, True, False]])
    correct = torch.tensor([[True, False, True], [True, False, True], [False, True, False]])  # padding: ignored
    split = PaddedSplit(tokens, torch.tensor([4, 3, 2]), pad, torch.tensor([0, 1, 0]), None, ["a", "b"], seen)
    m = accuracy_metrics(split, correct, torch.zeros(3, 3), "test")
    assert m["test/accuracy"] == pytest.approx(3 / 6)
    # seen: row 0 (right, wrong, right) and row 1's first (right); novel: row 1's second, row 2's (both wrong)
    assert m["test/accuracy/seen_context"] == pytest.approx(3 / 4)
    assert m["test/accuracy/novel_context"] == 0.0
    assert m["test/novel_context_fraction"] == pytest.approx(2 / 6)
    assert m["test/accuracy/seen_context/a"] == pytest.approx(2 / 3)
    assert m["test/accuracy/novel_context/a"] == 0.0
    assert m["test/novel_context_fraction/a"] == pytest.approx(1 / 4)
    assert m["test/accuracy/seen_context/b"] == 1.0
    assert m["test/novel_context_fraction/b"] == pytest.approx(1 / 2)
    # a family with no novel target has a fraction of 0 and no novel accuracy
    all_seen = PaddedSplit(
        tokens, split.lengths, pad, split.family_ids, None, ["a", "b"], torch.ones(3, 3, dtype=torch.bool)
    )
    m = accuracy_metrics(all_seen, correct, torch.zeros(3, 3), "val")
    assert m["val/novel_context_fraction"] == 0.0 and "val/accuracy/novel_context" not in m
    # no flags (the train split): no seen/novel metrics
    plain = PaddedSplit(tokens, split.lengths, pad, split.family_ids, None, ["a", "b"])
    assert not any("context" in k for k in accuracy_metrics(plain, correct, torch.zeros(3, 3), "train"))


def test_built_splits_carry_seen_flags_through_padding(small_data):
    assert small_data.train.seen == []
    for split in (small_data.val, small_data.test):
        again = seen_context_flags(split.sequences, split.families, small_data.train.sequences)
        assert [f.tolist() for f in split.seen] == [f.tolist() for f in again]
        padded = to_padded(split, SMALL.pad_id, list(RULE_FAMILIES))
        for i, f in enumerate(split.seen):
            assert padded.seen[i, : len(f)].tolist() == f.tolist()
            assert not padded.seen[i, len(f) :].any()
        sub = padded.subset(torch.tensor([0, 3]))
        assert sub.seen.shape == (2, sub.tokens.shape[1] - 1)
    assert to_padded(small_data.train, SMALL.pad_id, list(RULE_FAMILIES)).seen is None


# --------------------------------------------------------------------------------------------------
# Logged splits


def test_logged_splits_round_trip(migrated_store, small_data, tmp_path):
    with mlflow.start_run() as active:
        log_splits(RunLog(active), small_data)
    run = mlflow.get_run(active.info.run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    assert len({d.digest for d in inputs.values()}) == 3
    for name, split in small_data.splits().items():
        assert inputs[name].name == f"synthetic-{name}"
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=f"data/{name}.jsonl", dst_path=str(tmp_path / name)
        )
        with open(path) as fh:
            rows = [json.loads(line) for line in fh]
        assert len(rows) == len(split)
        for row, seq, fam, gen in zip(rows, split.sequences, split.families, split.generators, strict=True):
            assert row["family"] == fam and row["tokens"] == seq.tolist()
            assert {k: v for k, v in row.items() if k not in ("family", "tokens")} == gen
            if fam != "random_walk":  # the logged generator rebuilds the logged tokens
                assert sequence_from_generator(fam, gen, len(row["tokens"]), SMALL).tolist() == row["tokens"]


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
    split = to_padded(small_data.val, SMALL.pad_id, list(RULE_FAMILIES))
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
