"""MQAR as Zoology defines it (data.mqar_layout zoology, the default): the pairs, then queries among noise tokens
at power-law gaps; an answer is only a target, never an input, and no other position has a target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from picollm.config import DataConfig
from picollm.data.generators import ceiling_per_position
from picollm.data.recall_families import NO_TARGET, answer_mask, targets_of
from picollm.data.splits import IGNORE_INDEX, build_data, to_padded
from picollm.runtime import disk_cache

K, V = 8, 8
CFG = DataConfig(
    seq_types=["mqar"], vocab_size=40, max_len=32, mqar_pairs=[2, 4], mqar_key_vocab=K, mqar_value_vocab=V,
    n_train=60, n_val=20, n_test=20, seed=3,
)  # fmt: skip


def parse(seq: np.ndarray) -> tuple[dict[int, int], list[int]]:
    """The pairs of a zoology sequence (keys < K, values K..K+V-1) and the rest of it."""
    x, pairs, i = seq.tolist(), {}, 0
    while i + 1 < len(x) and x[i] < K and x[i] not in pairs and K <= x[i + 1] < K + V:
        pairs[x[i]] = x[i + 1]
        i += 2
    return pairs, x[i:]


@pytest.fixture(scope="module")
def data():
    return build_data(CFG)


def test_layout_pairs_then_noise_and_queries(data):
    for seq, gen in zip(data.train.sequences, data.train.generators, strict=True):
        assert len(seq) == 32  # mqar_length null: max_len
        pairs, region = parse(seq)
        assert pairs == {int(k[1:]): v for k, v in gen.items()} and len(pairs) in (2, 4)
        queries = [t for t in region if t < K]
        assert sorted(queries) == sorted(pairs)  # every key asked once (mqar_queries null)
        assert all(t >= K + V or t in pairs for t in region)  # the rest is noise: neither keys nor values
        assert all(i % 2 == 0 for i, t in enumerate(region) if t < K)  # queries at even offsets, as Zoology


def test_answers_are_only_targets_never_inputs(data):
    for split in data.splits().values():
        for seq, targets in zip(split.sequences, split.targets, strict=True):
            pairs, region = parse(seq)
            start = 2 * len(pairs)
            want = np.full(len(seq) - 1, NO_TARGET)
            for t in range(start, len(seq) - 1):
                if int(seq[t]) in pairs:
                    want[t] = pairs[int(seq[t])]  # the query's own position predicts its value
            assert np.array_equal(targets, want)
            assert not any(K <= t < K + V for t in region)  # no value ever enters after the pairs
            assert all(int(seq[t + 1]) != targets[t] for t in np.nonzero(targets != NO_TARGET)[0] if t + 1 < len(seq))


def test_targets_ceilings_and_answers_agree(data):
    for seq, fam in zip(data.test.sequences, data.test.families, strict=True):
        targets = targets_of(seq, fam, CFG)
        assert targets is not None
        answers = targets != NO_TARGET
        assert np.array_equal(answer_mask(seq, fam, CFG), answers)
        assert np.array_equal(ceiling_per_position(seq, fam, CFG), answers.astype(float))  # only answers, all certain
    padded = to_padded(data.test, CFG.pad_id, data.families)
    _, targets = padded.inputs_and_targets()
    assert torch.equal(targets != IGNORE_INDEX, padded.answers)  # the loss and the metrics see the answers only


def test_query_gaps_follow_the_power_law():
    def mean_offset(power_a: float) -> float:
        cfg = CFG.model_copy(update={"mqar_power_a": power_a, "mqar_pairs": [2], "n_train": 400})
        data = build_data(cfg)
        return float(np.mean([i for s in data.train.sequences for i, t in enumerate(parse(s)[1]) if t < K]))

    near, uniform = mean_offset(0.01), mean_offset(1.0)
    assert near < 8 < uniform  # 14 slots: uniform puts the mean query at offset ~13, a = 0.01 near the pairs


def test_the_fed_back_layout_stays_as_a_named_variant():
    cfg = CFG.model_copy(update={"mqar_layout": "fed_back"})
    data = build_data(cfg)
    assert not data.train.targets  # next-token targets: every answer is the next input
    seq = data.train.sequences[0]
    pairs, rest = parse(seq)
    assert rest[1::2] == [pairs[q] for q in rest[0::2]]


def test_the_cache_keeps_the_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PICOLLM_CACHE", raising=False)
    first, again = disk_cache.cached_build_data(CFG), disk_cache.cached_build_data(CFG)
    for a, b in zip(first.test.targets, again.test.targets, strict=True):
        assert np.array_equal(a, b)
    assert len(again.test.targets) == len(again.test.sequences)
