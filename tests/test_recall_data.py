"""The recall families (mqar in its fed-back layout, copy): layout, Bayes ceilings, held-out generators, mixing
with the rule families, validation, the answer metric and training on predictable targets only. Zoology's
mqar layout (the default): tests/test_mqar_zoology.py."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from picollm.config import DataConfig, TrainConfig, TrainRunConfig, load_config
from picollm.data.generators import ceiling_per_position, sequence_from_generator
from picollm.data.recall_families import answer_mask, random_recall_generator
from picollm.data.splits import PaddedSplit, build_data, to_padded
from picollm.errors import PicollmError
from picollm.training.evaluation import accuracy_metrics
from picollm.training.trainer import Trainer, lm_loss

MQAR = DataConfig(
    seq_types=["mqar"], mqar_layout="fed_back", vocab_size=16, max_len=16, mqar_pairs=[3], mqar_key_vocab=5,
    mqar_value_vocab=6, seed=2,
)  # fmt: skip


def pairs_of(seq: list[int], p: int) -> dict[int, int]:
    return dict(zip(seq[0 : 2 * p : 2], seq[1 : 2 * p : 2], strict=True))


def test_mqar_layout_answers_are_the_queried_keys_values():
    data = build_data(MQAR.model_copy(update={"n_train": 40, "n_val": 10, "n_test": 10}))
    for seq, gen, answers in zip(data.train.sequences, data.train.generators, data.train.answers, strict=True):
        x = seq.tolist()
        assert len(x) == 12  # 3 pairs, 3 queries
        context = pairs_of(x, 3)
        assert context == {int(k[1:]): v for k, v in gen.items()}  # the generator is the assignment
        assert set(context) <= set(range(5)) and set(context.values()) <= set(range(5, 11))
        assert len(set(context.values())) == 3  # distinct values
        assert sorted(x[6::2]) == sorted(context)  # every key asked once
        assert all(x[i + 1] == context[x[i]] for i in range(6, 12, 2))
        assert answers.tolist() == [False] * 6 + [True, False, True, False, True]  # targets x_7, x_9, x_11
    # Hand-checked draw: the assignment {0: 7, 3: 5} in a drawn order, then both keys in a drawn order.
    seq = sequence_from_generator("mqar", {"k0": 7, "k3": 5}, 8, MQAR, np.random.default_rng(0)).tolist()
    assert sorted([seq[0:2], seq[2:4]]) == [[0, 7], [3, 5]] and sorted([seq[4:6], seq[6:8]]) == [[0, 7], [3, 5]]
    with pytest.raises(PicollmError, match="8-token sequences, not 9"):
        sequence_from_generator("mqar", {"k0": 7, "k3": 5}, 9, MQAR, np.random.default_rng(0))


def test_copy_layout_repeats_the_segment():
    cfg = DataConfig(seq_types=["copy"], vocab_size=16, max_len=8, copy_len=[2, 4], n_train=20, n_val=4, n_test=4)
    data = build_data(cfg)
    for seq, gen, answers in zip(data.train.sequences, data.train.generators, data.train.answers, strict=True):
        n = len(seq) // 2
        assert n in (2, 4) and seq[:n].tolist() == seq[n:].tolist() == [gen[f"x{i}"] for i in range(n)]
        assert answers.tolist() == [False] * (n - 1) + [True] * n
    assert {len(s) for s in data.train.sequences} == {4, 8}


def test_mqar_ceilings_are_hand_computed():
    cfg = DataConfig(seq_types=["mqar"], mqar_layout="fed_back", vocab_size=64, max_len=16, mqar_pairs=[2, 4])
    two = np.array([0, 17, 12, 20, 12, 20, 0, 17])
    # v1: 1/16 values; k2: another pair is certain (P >= 2), 1/15 new keys; v2: 1/15; q1: P = 2 or 4 equally,
    # a seen key (0.5 / 2) beats a new one (0.5 / 14): 1/2; answers 1; the last key asked is certain.
    assert ceiling_per_position(two, "mqar", cfg).tolist() == pytest.approx([1 / 16, 1 / 15, 1 / 15, 1 / 2, 1, 1, 1])
    four = np.array([0, 16, 1, 17, 2, 18, 3, 19, 2, 18, 0, 16, 3, 19, 1, 17])
    # k3 after 2 pairs: the Bayes bet is a query (0.25 each > 0.5/14), wrong here: 0; k4: P = 4 now: 1/13.
    expected = [1 / 16, 1 / 15, 1 / 15, 0, 1 / 14, 1 / 13, 1 / 13, 1 / 4, 1, 1 / 3, 1, 1 / 2, 1, 1, 1]
    assert ceiling_per_position(four, "mqar", cfg).tolist() == pytest.approx(expected)
    assert answer_mask(four, "mqar", cfg).nonzero()[0].tolist() == [8, 10, 12, 14]


def test_copy_ceilings_are_hand_computed():
    cfg = DataConfig(seq_types=["copy"], vocab_size=16, max_len=6, copy_len=[2, 3])  # M = 15
    assert ceiling_per_position(np.array([1, 2, 3, 1, 2, 3]), "copy", cfg).tolist() == pytest.approx(
        [1 / 15, 1 / 15, 1, 1, 1]
    )
    # 1 2 1 also fits a 2-token segment (x_2 = x_0), 15 times likelier than the 3-token one: it bets on 2.
    assert ceiling_per_position(np.array([1, 2, 1, 1, 2, 1]), "copy", cfg).tolist() == pytest.approx(
        [1 / 15, 1 / 15, 0, 1, 1]
    )


def brute_force_ceilings(seq: list[int], hypotheses: list[tuple[tuple[int, ...], float]]) -> list[float]:
    """The Bayes ceiling by enumeration: predict the most probable next token over every sequence the
    family can draw that fits the prefix; score it under the sequences of the true one's length (its P or n)."""
    out = []
    for nxt in range(1, len(seq)):
        fits = [(h, p) for h, p in hypotheses if len(h) > nxt and list(h[:nxt]) == seq[:nxt]]
        pred: dict[int, float] = {}
        for h, p in fits:
            pred[h[nxt]] = pred.get(h[nxt], 0.0) + p
        best = max(pred.values())
        argmax = {v for v, p in pred.items() if p >= best * (1 - 1e-9)}
        truth = [(h[nxt], p) for h, p in fits if len(h) == len(seq)]
        out.append(sum(p for v, p in truth if v in argmax) / sum(p for _, p in truth) / len(argmax))
    return out


def test_recall_ceilings_equal_brute_force_enumeration():
    k, v, pairs = 3, 3, [1, 2, 2]  # P = 2 twice as likely as P = 1
    cfg = DataConfig(
        seq_types=["mqar"], mqar_layout="fed_back", vocab_size=8, max_len=8, mqar_pairs=pairs, mqar_key_vocab=k,
        mqar_value_vocab=v,
    )  # fmt: skip
    hyps = []
    for p in set(pairs):
        prob = pairs.count(p) / len(pairs) / (math.perm(k, p) * math.perm(v, p) * math.factorial(p))
        for keys in itertools.permutations(range(k), p):
            for values in itertools.permutations(range(k, k + v), p):
                for asked in itertools.permutations(range(p)):
                    context = [t for pair in zip(keys, values, strict=True) for t in pair]
                    hyps.append((tuple(context + [t for i in asked for t in (keys[i], values[i])]), prob))
    for seq in {h for h, _ in hyps[:: len(hyps) // 12]}:
        assert ceiling_per_position(np.array(seq), "mqar", cfg).tolist() == pytest.approx(
            brute_force_ceilings(list(seq), hyps)
        ), seq
    lens, m = [1, 2, 3], 7
    cfg = DataConfig(seq_types=["copy"], vocab_size=m + 1, max_len=6, copy_len=lens)
    hyps = [(seg + seg, 1 / 3 / m**n) for n in lens for seg in itertools.product(range(m), repeat=n)]
    for seq, _ in hyps[::5] + [((1, 2, 1, 1, 2, 1), 0), ((3, 3, 3, 3, 3, 3), 0)]:  # and two chance repeats
        assert ceiling_per_position(np.array(seq), "copy", cfg).tolist() == pytest.approx(
            brute_force_ceilings(list(seq), hyps)
        ), seq


def test_splits_hold_out_generators_in_every_build():
    cfg = MQAR.model_copy(update={"n_train": 300, "n_val": 30, "n_test": 30})
    data = build_data(cfg)
    assert data.generator_overlap() == 0 and data.split_overlap() == 0

    def sets(split) -> set[tuple]:
        return {tuple(sorted(g.items())) for g in split.generators}

    train = sets(data.train)
    assert not train & sets(data.test) and not train & sets(data.val)
    other = build_data(cfg.model_copy(update={"seed": 5}))  # another draw: its held-out sets are still unseen
    assert not train & sets(other.test) and not sets(other.train) & sets(data.test)
    assert len(train & sets(other.train)) > 0  # the same space: a seed alone does not separate them


def test_mixed_with_rule_families_and_answer_metric():
    cfg = DataConfig(
        seq_types=["counting", "mqar", "copy"],
        vocab_size=32,
        min_len=4,
        max_len=16,
        n_train=20,
        n_val=6,
        n_test=6,
        mqar_key_vocab=8,
        mqar_value_vocab=8,
        mqar_layout="fed_back",
    )
    cfg = cfg.model_copy(update={"mqar_pairs": [2], "copy_len": [3]})  # as the compare flow overrides it
    data = build_data(cfg)
    assert data.stats()["data.train.mqar"] == 20 and data.stats()["data.test.copy"] == 6
    split = to_padded(data.test, cfg.pad_id, data.families)
    correct = split.answers.clone()  # a model right exactly on the answers
    metrics = accuracy_metrics(split, correct, torch.zeros(correct.shape), "test")
    assert metrics["test/accuracy_answer/mqar"] == metrics["test/accuracy_answer/copy"] == 1.0
    assert "test/accuracy_answer/counting" not in metrics
    # mqar's last query is certain too: accuracy_predictable counts it, accuracy_answer does not.
    assert metrics["test/accuracy_predictable/mqar"] == pytest.approx(2 / 3)
    rules = build_data(DataConfig(vocab_size=32, n_train=4, n_val=2, n_test=2))
    assert to_padded(rules.test, 31, rules.families).answers is None  # no recall answers: no tensor


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"vocab_size": 24}, r"mqar_key_vocab \+ mqar_value_vocab \(16 \+ 16\) and at least one noise token exceeds"),
        ({"vocab_size": 33}, r"\(16 \+ 16\) and at least one noise token exceeds the 32 values"),
        ({"vocab_size": 33, "mqar_layout": "fed_back"}, None),
        ({"mqar_pairs": [5], "mqar_key_vocab": 4}, "mqar_pairs up to 5 needs that many distinct keys"),
        ({"mqar_pairs": [2, 4], "mqar_queries": 3}, r"mqar_queries \(3\) exceeds the fewest mqar_pairs \(2\)"),
        ({"mqar_pairs": [9]}, r"9 pairs and 9 queries need 36 tokens, more than mqar_length \(null: max_len\) \(32\)"),
        ({"mqar_pairs": [4], "mqar_length": 14}, r"4 pairs and 4 queries need 16 tokens, more than mqar_length"),
        ({"mqar_pairs": [9], "mqar_layout": "fed_back"}, r"9 pairs and 9 queries need 36 tokens, more than max_len"),
        ({"seq_types": ["copy"], "copy_len": [17]}, r"copy sequences of copy_len 17 have 34 tokens"),
        ({"mqar_pairs": [0]}, "greater than or equal to 1"),
    ],
)
def test_bad_recall_settings_fail_validation(update, message):
    if message is None:  # the fed-back layout needs no noise token
        DataConfig(**{"seq_types": ["mqar"], **update})
        return
    with pytest.raises(ValidationError, match=message):
        DataConfig(**{"seq_types": ["mqar"], **update})


def test_unvalidated_recall_settings_fail_with_one_clear_error():
    cfg = DataConfig(seq_types=["mqar"]).model_copy(update={"mqar_pairs": [20]})  # skips validation
    with pytest.raises(PicollmError, match="data: mqar_pairs up to 20 needs that many distinct keys"):
        random_recall_generator("mqar", cfg, np.random.default_rng(0))
    tiny = DataConfig(seq_types=["copy"], vocab_size=8, max_len=3, copy_len=[1], n_train=30, n_val=30, n_test=30)
    with pytest.raises(PicollmError, match="could not draw distinct 'copy' sequences"):  # only 7 segments exist
        build_data(tiny)


# --------------------------------------------------------------------------------------------------
# Training on predictable targets only


class TableModel(nn.Module):
    """logits = table[input token]: the loss can be worked out by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.table[inputs]


TABLE = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 3.0, 0.0], [1.0, 1.0, 1.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
TOKENS = torch.tensor([[0, 1, 2, 3], [2, 0, 1, 2]])  # pad 3
CEILINGS = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.1, 1.0]])  # the pad target (row 0) has ceiling 0


def nll(i: int, t: int) -> float:
    row = TABLE[i].tolist()
    return -(row[t] - math.log(sum(math.exp(x) for x in row)))


def test_loss_on_predictable_is_the_hand_computed_masked_loss():
    kept = [(1, 2), (2, 0), (1, 2)]  # (input, target) where the ceiling is 1: row 0 t=1, row 1 t=0 and t=2
    loss, n = lm_loss(TableModel(TABLE.clone()), TOKENS, 3, CEILINGS)
    assert n == 3 and float(loss) == pytest.approx(sum(nll(i, t) for i, t in kept) / 3, rel=1e-6)
    batch = PaddedSplit(TOKENS, torch.tensor([3, 4]), 3, ceilings=CEILINGS)
    for loss_on, pairs in (("predictable", kept), ("all", [(0, 1), (1, 2), (2, 0), (0, 1), (1, 2)])):
        trainer = Trainer(TableModel(TABLE.clone()), TrainConfig(loss_on=loss_on, device="cpu"), torch.device("cpu"))
        total, n_tok = trainer._forward(batch)  # the trainer's loss: summed, with its normaliser
        assert n_tok == len(pairs) and float(total) == pytest.approx(sum(nll(i, t) for i, t in pairs), rel=1e-6)
    with pytest.raises(PicollmError, match="loss_on=predictable needs data with Bayes ceilings"):
        trainer = Trainer(TableModel(TABLE.clone()), TrainConfig(loss_on="predictable"), torch.device("cpu"))
        trainer._forward(PaddedSplit(TOKENS, torch.tensor([3, 4]), 3))


def test_mqar_config_is_valid_and_trains_on_answers():
    cfg = load_config(TrainRunConfig, Path(__file__).resolve().parents[1] / "configs" / "mqar.yaml")
    assert cfg.data.seq_types == ["mqar"] and cfg.data.mqar_layout == "zoology" and cfg.model.short_conv
    data = build_data(cfg.data.model_copy(update={"n_train": 20, "n_val": 5, "n_test": 5}))
    split = to_padded(data.train, cfg.data.pad_id, data.families)
    _, targets = split.inputs_and_targets()
    assert torch.equal(targets != -100, split.answers)  # loss_on all: the answers are the only targets
