"""data.split new_rules (held-out steps and ratios), the novelty metric, targets 1-3 vs the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from picollm.compare.report_studies import rule_split_section, split_rules
from picollm.compare.stats import Interval
from picollm.config import DataConfig
from picollm.data.generators import cut_rules
from picollm.data.splits import PaddedSplit, build_data, to_padded
from picollm.training.evaluation import EARLY_TARGETS, accuracy_metrics

# M = 31 is prime: a geometric ratio is x_1 / x_0, unique
NEW = DataConfig(
    vocab_size=32,
    min_len=4,
    max_len=9,
    n_train=40,
    n_val=10,
    n_test=10,
    seed=5,
    seq_types=["arithmetic", "geometric"],
    split="new_rules",
    arithmetic_steps=[2, 3, 4, 5, 6, 7, 8],
    geometric_ratios=[2, 3, 5, 6, 7],
)


@pytest.fixture(scope="module")
def new_data():
    return build_data(NEW)


def _rule_of(seq: np.ndarray, family: str, m: int) -> int:
    """The step or ratio read off the tokens (not the generator record)."""
    x0, x1 = int(seq[0]), int(seq[1])
    return (x1 - x0) % m if family == "arithmetic" else x1 * pow(x0, -1, m) % m


def test_new_rules_share_no_step_or_ratio_between_splits(new_data):
    m, test_rules = NEW.modulus, {}
    for fam, values in (("arithmetic", NEW.arithmetic_steps), ("geometric", NEW.geometric_ratios)):
        used = {
            name: {_rule_of(s, f, m) for s, f in zip(split.sequences, split.families, strict=True) if f == fam}
            for name, split in new_data.splits().items()
        }
        assert all(used.values()), used
        test_rules[fam] = sorted(used["test"])
        assert not used["train"] & used["test"] and not used["train"] & used["val"] and not used["val"] & used["test"]
        assert set().union(*used.values()) <= {v % m for v in values}
        for s, f in zip(new_data.test.sequences, new_data.test.families, strict=True):  # every step follows the rule
            assert all(_rule_of(s[t:], f, m) == _rule_of(s, f, m) for t in range(len(s) - 1))
    assert new_data.generator_overlap() == 0 and new_data.split_overlap() == 0
    stats = new_data.stats()
    test_steps = cut_rules("arithmetic", NEW, ["train", "val", "test"])["test"]
    assert stats["data.test.rules.arithmetic"] == ",".join(map(str, test_steps))
    assert test_steps == test_rules["arithmetic"]


def test_the_rule_cut_is_seeded_and_sized():
    names = ["train", "val", "test"]
    cut = cut_rules("arithmetic", NEW, names)
    assert cut == cut_rules("arithmetic", NEW, names)  # the same config, the same cut (the report recomputes it)
    assert [len(cut[n]) for n in names] == [5, 1, 1]  # round(0.15 * 7) = 1 each held out
    assert sorted(sum(cut.values(), [])) == NEW.arithmetic_steps
    three = NEW.model_copy(update={"arithmetic_steps": [2, 3, 4], "held_out_share": 0.45})
    assert [len(v) for v in cut_rules("arithmetic", three, names).values()] == [1, 1, 1]  # train keeps one
    assert split_rules(NEW)["test"]["geometric"] == cut_rules("geometric", NEW, ["train", "val", "test"])["test"]
    assert split_rules(NEW.model_copy(update={"split": "generators"})) == {}


def test_new_rules_config_refuses_families_without_a_rule_to_hold_out():
    with pytest.raises(ValidationError, match="seq_types may list only arithmetic and geometric, not counting"):
        DataConfig(split="new_rules", seq_types=["arithmetic", "counting"], arithmetic_steps=[2, 3, 4])
    with pytest.raises(ValidationError, match="at least 3 geometric_ratios"):
        DataConfig(split="new_rules", seq_types=["geometric"])
    assert DataConfig().split == "generators"


def test_novelty_metric_matches_a_brute_force_count(new_data):
    test, train = new_data.test, [[int(v) for v in s] for s in new_data.train.sequences]

    def occurs(window: list[int]) -> bool:  # any contiguous occurrence in any training sequence
        n = len(window)
        return any(t[i : i + n] == window for t in train for i in range(len(t) - n + 1))

    rng = np.random.default_rng(0)
    padded = to_padded(test, NEW.pad_id, list(NEW.seq_types))
    correct = torch.as_tensor(rng.random(padded.tokens.shape[1] - 1) < 0.5)[None, :].repeat(len(test), 1)
    correct = correct ^ torch.as_tensor(rng.random(correct.shape) < 0.3)
    m = accuracy_metrics(padded, correct, torch.zeros(correct.shape), "test")
    novel = hits = total = 0
    per_fam: dict[str, list[int]] = {}
    for i, (seq, fam) in enumerate(zip(test.sequences, test.families, strict=True)):
        x = [int(v) for v in seq]
        for t in range(len(x) - 1):
            total += 1
            if not occurs([x[t], x[t + 1]]):  # k = 1 for both families
                novel += 1
                hits += int(correct[i, t])
                per_fam.setdefault(fam, []).append(int(correct[i, t]))
    assert novel > 0.8 * total  # held-out rules: mostly new transitions
    assert m["test/novel_context_fraction"] == pytest.approx(novel / total)
    assert m["test/accuracy/novel_context"] == pytest.approx(hits / novel)
    for fam, h in per_fam.items():
        assert m[f"test/accuracy/novel_context/{fam}"] == pytest.approx(sum(h) / len(h))


def test_early_and_late_targets_by_hand():
    assert EARLY_TARGETS == 3
    pad = 9
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6], [5, 6, 5, pad, pad, pad], [1, 3, pad, pad, pad, pad]])
    # targets: row 0 has 5 (3 early, 2 late), row 1 has 2 (early), row 2 has 1 (early)
    correct = torch.tensor(
        [[True, False, True, True, False], [False, True, True, True, True], [True, False, False, False, False]]
    )
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0, 6.0], [5.0, 6.0, 0.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0, 0.0]])
    ceil = torch.tensor([[0.5, 1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0, 0, 0], [0.5, 0, 0, 0, 0]])
    seen = torch.tensor([[True, True, False, False, True], [False, True, False, False, False], [False] * 5])
    split = PaddedSplit(tokens, torch.tensor([6, 3, 2]), pad, torch.tensor([0, 1, 0]), ceil, ["a", "b"], seen)
    m = accuracy_metrics(split, correct, nll, "test")
    # early: row 0 (T, F, T), row 1 (F, T), row 2 (T) -> 4/6; late: row 0 (T, F) -> 1/2
    assert m["test/accuracy_early"] == pytest.approx(4 / 6)
    assert m["test/accuracy_late"] == pytest.approx(1 / 2)
    assert m["test/loss_early"] == pytest.approx((1 + 2 + 3 + 5 + 6 + 7) / 6)
    assert m["test/loss_late"] == pytest.approx((4 + 6) / 2)
    assert m["test/ceiling_early"] == pytest.approx((0.5 + 1 + 1 + 0 + 1 + 0.5) / 6)
    assert m["test/ceiling_late"] == 1.0
    assert m["test/accuracy_early/a"] == pytest.approx(3 / 4) and m["test/accuracy_early/b"] == pytest.approx(1 / 2)
    assert "test/accuracy_late/b" not in m  # b's only sequence has no fourth target
    # novel targets: row 0's 3rd and 4th, row 1's 1st, row 2's 1st; their ceiling 1, 1, 0, 0.5
    assert m["test/ceiling/novel_context"] == pytest.approx(2.5 / 4)
    assert m["test/accuracy/novel_context"] == pytest.approx(3 / 4)


def test_the_report_section_says_what_the_split_tests():
    iv = Interval(0.25, 0.2, 0.3, 0.01, 2)
    agg = {
        v: {"eval/test/accuracy/novel_context": iv, "eval/test/accuracy_early/arithmetic": iv}
        for v in ("base", "other")
    }
    agg["base"] |= {"eval/test/novel_context_fraction": Interval(0.95, 0.95, 0.95, 0, 2)}
    agg["base"] |= {"eval/test/ceiling/novel_context": Interval(0.9, 0.9, 0.9, 0, 2)}
    curve = [{"model": "base", "n_train": 40, "family": "all", "novel_accuracy": 0.5, "novel_share": 0.9}]
    text = rule_split_section(agg, ["base", "other"], ["arithmetic", "geometric"], NEW, curve)
    assert "data.split: new_rules" in text and f"test {split_rules(NEW)['test']['arithmetic']}" in text
    assert "| *novel share* | 0.950 |" in text and "| *ceiling* | 0.900 |" in text
    assert f"| *chance* | {1 / NEW.modulus:.3f} |" in text and "| base | 0.250 ± 0.050 |" in text
    assert "| base | 0.500 / 0.900 |" in text and "| other | - / - |" in text
    assert "No test target here is novel" not in text
    agg["base"]["eval/test/novel_context_fraction"] = Interval(0.0, 0.0, 0.0, 0, 2)
    plain = rule_split_section(agg, ["base", "other"], ["counting"], DataConfig(), None)
    assert "data.split: generators" in plain and "Rules each split" not in plain and "Learning curve" not in plain
    assert "No test target here is novel" in plain
