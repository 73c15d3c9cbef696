"""The recall study is not fooled by heuristics: the baselines a model reaches without binding keys to values
(chance, copying, elimination), per-query accuracy, the recall credit, and the report's section."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from picollm import compare as cmp
from picollm.compare import recall
from picollm.config import DataConfig

K, V = 8, 8


def mqar_cfg(layout: str, seed: int = 0) -> DataConfig:
    return DataConfig(
        seq_types=["mqar"], mqar_layout=layout, vocab_size=40, max_len=32, mqar_pairs=[4], mqar_key_vocab=K,
        mqar_value_vocab=V, n_train=40, n_val=20, n_test=200, seed=seed,
    )  # fmt: skip


class Eliminator(nn.Module):
    """Binds nothing: at every position after the pairs it predicts the first value of the context that has
    not appeared since (in the fed-back layout, the values not yet given as answers)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pred = torch.full_like(tokens, self.vocab - 1)
        for b, row in enumerate(tokens.tolist()):
            p = 0
            while 2 * p + 1 < len(row) and row[2 * p] < K and row[2 * p] not in row[: 2 * p : 2]:
                p += 1
            values = row[1 : 2 * p : 2]
            for t in range(2 * p, len(row)):
                left = [v for v in values if v not in row[2 * p : t + 1]]
                pred[b, t] = left[0] if left else values[0]
        return nn.functional.one_hot(pred, self.vocab).float()


def test_baselines_are_chance_copy_and_elimination_where_it_applies():
    assert recall.baselines(mqar_cfg("zoology"), 4) == {"chance": 1 / V, "copy": 1 / 4}
    fed = recall.baselines(mqar_cfg("fed_back"), 4)
    assert fed["elimination"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2 + 1) / 4)  # H_4 / 4


def test_an_eliminating_model_scores_the_elimination_baseline_and_is_not_credited_with_recall():
    accs, per_query = [], []
    for seed in range(3):
        cfg = mqar_cfg("fed_back", seed)
        [rs] = recall.recall_splits(cfg, [4]).values()
        overall, by_query = recall.recall_scores(Eliminator(40), rs)
        accs.append(overall)
        per_query.append(by_query)
    elimination = recall.baselines(mqar_cfg("fed_back"), 4)["elimination"]
    assert np.mean(accs) == pytest.approx(elimination, abs=0.04)
    assert all(q[4] == 1.0 for q in per_query)  # the last query: one value left, always right
    assert np.mean([q[1] for q in per_query]) == pytest.approx(1 / 4, abs=0.06)  # the first: 1 in 4
    iv = cmp.mean_ci(accs)
    assert not recall.recalls(iv, recall.baselines(mqar_cfg("fed_back"), 4))


def test_in_the_zoology_layout_nothing_can_be_eliminated():
    """Answers are never inputs: the same heuristic falls to copying a context value, 1/P."""
    accs = []
    for seed in range(3):
        [rs] = recall.recall_splits(mqar_cfg("zoology", seed), [4]).values()
        accs.append(recall.recall_accuracy(Eliminator(40), rs))
    assert np.mean(accs) == pytest.approx(1 / 4, abs=0.05)
    assert not recall.recalls(cmp.mean_ci(accs), recall.baselines(mqar_cfg("zoology"), 4))


def test_recall_credit_success_rate_and_learning_speed():
    base = {"chance": 0.125, "copy": 0.25}
    assert recall.recalls(cmp.mean_ci([0.9, 0.95, 0.97]), base)
    assert not recall.recalls(cmp.mean_ci([0.2, 0.9, 0.95]), base)  # the interval reaches below the copy baseline
    assert not recall.recalls(cmp.mean_ci([0.99]), base)  # one run: no interval, no credit
    assert recall.success_rate([0.95, 0.5, 0.91, float("nan")]) == pytest.approx(2 / 3)
    history = [{"epoch": 1.0, "val/x": 0.3}, {"epoch": 2.0, "val/x": 0.95}, {"epoch": 3.0, "val/x": 0.99}]
    assert recall.epochs_to(history, "val/x") == 2.0 and math.isnan(recall.epochs_to(history[:1], "val/x"))


def test_the_section_declares_its_contrasts_and_marks_recall_against_the_baselines():
    good, weak = cmp.mean_ci([0.97, 0.99, 0.98]), cmp.mean_ci([0.2, 0.3, 0.25])
    runs = {"softmax": [{"m": x} for x in (0.97, 0.99, 0.98)], "linear": [{"m": x} for x in (0.2, 0.3, 0.25)]}
    d = cmp.differences(runs, baseline="linear", variant="softmax")["m"]
    study = cmp.RecallStudy(
        per_variant={"softmax": {4: good, 12: weak}, "linear": {4: weak, 12: weak}},
        per_seed={"softmax": {4: [0.97, 0.99, 0.98], 12: [0.2, 0.3, 0.25]}, "linear": {4: [0.2, 0.3, 0.25]}},
        per_query={"softmax": {4: {1: 0.9, 2: 1.0}}, "linear": {4: {1: 0.2, 2: 0.3}}},
        baselines={4: {"chance": 0.125, "copy": 0.25}, 12: {"chance": 0.125, "copy": 1 / 12}},
        trained=[4],
        contrasts=[("softmax", "linear", d, (d.p, d.p_tost))],
        secondary={},
        epochs_to={"softmax": [2.0, 2.0, 3.0], "linear": [math.nan] * 3},
        steps_per_epoch=100,
        setup=["Task: a test."],
    )
    text = cmp.recall_section(study, 0.05, ["softmax", "linear"])
    assert "**Primary contrasts**" in text and "| softmax − linear |" in text and "softmax better" in text
    assert "| softmax | 0.980 ± 0.025 ✓ | 100% |" in text  # above every baseline: credited
    assert "| linear | 0.250 ± 0.124 · | 0% |" in text  # at the copy baseline: not credited
    assert "**Unseen pair counts**" in text and "| *copy* | 0.250 |" in text
    assert "| softmax | 4 | 0.90 1.00 |" in text and "2 (≈ 200 steps)" in text and "not reached" in text


@pytest.mark.parametrize(
    ("contrasts", "message"),
    [
        ([["softmax", "nope"]], r"compare.contrasts \(softmax, nope\) must name two different variants"),
        ([["softmax", "softmax"]], "must name two different variants"),
        ([["softmax", "linear"], ["softmax", "linear"]], "lists a contrast twice"),
    ],
)
def test_contrasts_must_name_the_variants(contrasts, message):
    from pydantic import ValidationError

    from picollm.config import CompareSettings

    assert CompareSettings(contrasts=[["linear", "softmax"]]).contrasts == [("linear", "softmax")]
    with pytest.raises(ValidationError, match=message):
        CompareSettings(contrasts=contrasts)


def test_the_recall_configs_declare_their_design():
    from picollm.config import CompareConfig, load_config

    from .conftest import REPO

    cpu = load_config(CompareConfig, REPO / "configs" / "recall.yaml")
    assert cpu.data.mqar_layout == "zoology" and cpu.model.short_conv and cpu.model.pos_encoding == "none"
    assert len(cpu.compare.lr_grid) >= 4 and cpu.compare.lr_grid_seed not in cpu.compare.seeds
    assert len(cpu.compare.seeds) >= 5 and cpu.compare.contrasts == [("softmax", "linear")]
    assert set(cpu.data.mqar_pairs) < set(cpu.compare.recall_pairs)  # trained counts and unseen ones
    full = load_config(CompareConfig, REPO / "configs" / "recall_zoology.yaml")
    assert len(full.compare.variants) >= 5 and len(full.compare.d_models) >= 3 and len(full.compare.seeds) >= 5
    assert {"based", "deltanet", "deltanet_noconv"} <= set(full.compare.names)
