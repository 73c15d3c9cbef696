"""DPO: loss formulas, log-prob masking, pairs and corruptions, story data, error paths, end to end.

Offline: stories come from tests/fixtures/stories.jsonl (written for this project); the GPT-2 ranks from
../shared/data/tiktoken_cache when it exists, else from tiktoken's normal download.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from picollm.config import CORRUPTIONS, DPODataConfig, DPORunConfig, ModelConfig, load_config
from picollm.data.stories import load_stories
from picollm.dpo.losses import batch_logps, collate, dpo_loss, response_logps, sequence_logps
from picollm.dpo.pairs import (
    Corruptor,
    Example,
    PreferencePair,
    build_preference_data,
    split_sentences,
    split_stories,
)
from picollm.dpo.trainer import DPOTrainer, PairSet, compute_reference_logps
from picollm.errors import ConfigError, PicollmError
from picollm.model.transformer import Transformer

from .conftest import TIKTOKEN_CACHE, point_mlflow, tiktoken_missing

STORIES = Path(__file__).resolve().parent / "fixtures" / "stories.jsonl"
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One SQLite store for the module: creating and migrating a store costs seconds on a busy CPU.
    # Tests keep apart by experiment and registered-model names.
    return tmp_path_factory.mktemp("dpo_store")


@pytest.fixture(autouse=True)
def dpo_store(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MLflow (env, cwd, globals) on the module's store, the hub offline, tiktoken's ranks from the cache."""
    import mlflow

    from picollm.tracking import store as tracking

    uri = point_mlflow(monkeypatch, store_dir)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking._initialised.clear()


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub libraries read HF_HUB_OFFLINE once, at import; set what they saw, whatever the order."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def tiny_text(*overrides: str) -> DPORunConfig:
    base = [
        "data.source=files",
        f"data.path={STORIES}",
        "data.seq_max_len=48",
        "data.prompt_sentences=1",
        "data.continuation_sentences=1",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        "model.d_model=16",
        "model.n_layers=1",
        "model.n_heads=2",
        "sft.epochs=1",
        "sft.batch_size=8",
        "sft.lr=0.01",
        "sft.warmup_steps=1",
        "sft.log_every=1",
        "sft.device=cpu",
        "sft.peak_flops=1.0e11",
        "dpo.train_pairs=16",
        "dpo.val_pairs=6",
        "dpo.test_pairs=6",
        "dpo.batch_size=8",
        "dpo.max_steps=2",
        "dpo.eval_every=2",
        "dpo.lr=0.003",
        "dpo.num_samples=2",
        "dpo.sample_tokens=4",
        "tracking.experiment=dpo-test",
    ]
    return load_config(DPORunConfig, None, base + list(overrides))


# Seconds-long DPO on synthetic sequences (also used by tests/test_faults.py).
TINY_SYNTHETIC = [
    "data.source=synthetic",
    "data.synthetic.vocab_size=32",
    "data.synthetic.min_len=6",
    "data.synthetic.max_len=12",
    "data.synthetic.n_train=8",
    "data.synthetic.n_val=3",
    "data.synthetic.n_test=3",
    "model.d_model=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "sft.epochs=2",
    "sft.batch_size=8",
    "sft.lr=0.01",
    "sft.warmup_steps=1",
    "sft.device=cpu",
    "sft.peak_flops=1.0e11",
    "dpo.corruptions=[swap_tokens,random_tokens]",
    "dpo.train_pairs=40",
    "dpo.val_pairs=12",
    "dpo.test_pairs=12",
    "dpo.batch_size=8",
    "dpo.max_steps=4",
    "dpo.eval_every=2",
    "dpo.lr=0.003",
    "dpo.num_samples=2",
    "dpo.sample_tokens=4",
    "tracking.experiment=dpo-syn",
]


def tiny_synthetic(*overrides: str) -> DPORunConfig:
    return load_config(DPORunConfig, None, TINY_SYNTHETIC + list(overrides))


@pytest.fixture(scope="module")
def story_data():
    """Pairs of every scheme from the fixture (built once; needs no MLflow; needs tiktoken's GPT-2 files)."""
    if reason := tiktoken_missing():
        pytest.skip(reason)
    cfg = tiny_text(
        f"dpo.corruptions=[{','.join(CORRUPTIONS)}]",
        "dpo.train_pairs=200",
        "dpo.val_pairs=60",
        "dpo.test_pairs=60",
        "data.seq_max_len=96",
        "data.prompt_sentences=2",
        "data.continuation_sentences=3",
    )
    with pytest.MonkeyPatch.context() as mp:
        if TIKTOKEN_CACHE.is_dir():
            mp.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
        return cfg, build_preference_data(cfg.data, cfg.dpo)


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    # torch.testing.assert_close spends seconds importing on its first call; this is all we need.
    assert a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol), (a, b)


def runs(experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    exp = MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else MlflowClient().search_runs([exp.experiment_id])


# --------------------------------------------------------------------------------------------------
# Loss


def _logps(*values: float) -> list[torch.Tensor]:
    return [torch.tensor([v], requires_grad=i < 2) for i, v in enumerate(values)]


# policy chosen/rejected, reference chosen/rejected: logits = (-1 + 3) - (-2 + 2.5) = 1.5; beta 0.5
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "expected"),
    [
        ("sigmoid", 0.0, math.log1p(math.exp(-0.75))),
        ("sigmoid", 0.2, 0.8 * math.log1p(math.exp(-0.75)) + 0.2 * math.log1p(math.exp(0.75))),
        ("hinge", 0.0, 0.25),  # relu(1 - 0.75)
        ("ipo", 0.0, 0.25),  # (1.5 - 1 / (2 * 0.5))^2
    ],
)
def test_dpo_loss_hand_computed(loss_type: str, label_smoothing: float, expected: float) -> None:
    pc, pr, rc, rr = _logps(-1.0, -3.0, -2.0, -2.5)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, 0.5, loss_type, label_smoothing)
    assert losses.shape == (1,)
    assert float(losses) == pytest.approx(expected, abs=1e-6)
    assert float(chosen) == pytest.approx(0.5 * (-1 + 2))
    assert float(rejected) == pytest.approx(0.5 * (-3 + 2.5))
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


# chosen length 2, rejected length 4: logps -0.5, -0.75, -1, -0.625 -> logits 0.25 + 0.375 = 0.625
@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [("sigmoid", math.log1p(math.exp(-0.3125))), ("hinge", 1 - 0.3125), ("ipo", (0.625 - 1.0) ** 2)],
)
def test_dpo_loss_length_normalised(loss_type: str, expected: float) -> None:
    pc, pr, rc, rr = _logps(-1.0, -3.0, -2.0, -2.5)
    losses, chosen, rejected = dpo_loss(
        pc, pr, rc, rr, 0.5, loss_type, chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4])
    )
    assert float(losses) == pytest.approx(expected, abs=1e-6)
    assert float(chosen) == pytest.approx(0.5 * (-0.5 + 1.0))
    assert float(rejected) == pytest.approx(0.5 * (-0.75 + 0.625))


def test_simpo_loss_hand_computed() -> None:
    from picollm.dpo.losses import simpo_loss

    # lengths 2 and 4: averages -0.5 and -0.75, beta 2, gamma 0.3: logits = 0.25 - 0.15 = 0.1, beta*logits 0.2
    pc, pr = _logps(-1.0, -3.0)
    lengths = torch.tensor([2]), torch.tensor([4])
    losses, chosen, rejected = simpo_loss(pc, pr, *lengths, beta=2.0, gamma=0.3)
    assert float(losses) == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    assert float(chosen) == pytest.approx(-1.0) and float(rejected) == pytest.approx(-1.5)  # beta * average
    smoothed, _, _ = simpo_loss(pc, pr, *lengths, beta=2.0, gamma=0.3, label_smoothing=0.1)
    assert float(smoothed) == pytest.approx(0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)))
    losses.sum().backward()  # reference-free: the gradient only reaches the policy's log-probs
    s = 1 / (1 + math.exp(0.2))  # -d/dx logsigmoid(x) at 0.2
    assert float(pc.grad) == pytest.approx(-s * 2.0 / 2) and float(pr.grad) == pytest.approx(s * 2.0 / 4)


def test_rpo_term_and_simpo_in_the_trainer() -> None:
    from picollm.dpo.losses import rpo_nll

    assert rpo_nll(torch.tensor([-6.0, -2.0]), torch.tensor([3, 4])).tolist() == [2.0, 0.5]  # NLL per token
    torch.manual_seed(0)
    reference = Transformer(tiny_synthetic().model).eval()
    pairs = PairSet([PreferencePair(i, "x", [1, 2], [3, 4, 5], [5, 4, 3]) for i in range(4)], 31)
    compute_reference_logps(reference, pairs, 4, torch.device("cpu"))
    pc = float(pairs.ref_chosen[0])
    for over, expected in [
        (["dpo.rpo_alpha=0.5"], LN2 - 0.5 * pc / 3),  # policy == reference: ln 2 + alpha * NLL per token
        (["dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.simpo_gamma=0.4"], None),
    ]:
        cfg = tiny_synthetic(*over).dpo
        m = DPOTrainer(copy.deepcopy(reference), cfg, torch.device("cpu")).evaluate(pairs, "val")
        if expected is None:  # SimPO: -logsigmoid(beta * (avg_c - avg_r) - gamma), rewards beta * avg log-probs
            margin = (pc - float(pairs.ref_rejected[0])) / 3
            expected = math.log1p(math.exp(-(2.0 * margin - 0.4)))
            assert m["val/rewards/chosen"] == pytest.approx(2.0 * pc / 3, abs=1e-4)
        assert m["val/loss"] == pytest.approx(expected, abs=1e-4)


def test_dpo_loss_rejects_unknown_type() -> None:
    with pytest.raises(PicollmError, match="loss_type"):
        dpo_loss(*_logps(0.0, 0.0, 0.0, 0.0), 0.1, "kto")


# --------------------------------------------------------------------------------------------------
# Log-probs


def test_sequence_logps_sums_response_tokens_only() -> None:
    torch.manual_seed(0)
    pad = 5
    tokens = torch.tensor([[1, 2, 3, 4, pad], [0, 3, 1, pad, pad]])
    # row 0: prompt [1, 2], response [3, 4]; row 1: prompt [0], response [3, 1]; pads never scored
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    logits = torch.randn(2, 5, 6, dtype=torch.float64)
    lp = logits.log_softmax(-1)
    expected = torch.stack([lp[0, 1, 3] + lp[0, 2, 4], lp[1, 0, 3] + lp[1, 1, 1]]).float()
    got = sequence_logps(logits, tokens, mask)
    assert got.dtype == torch.float32
    assert_close(got, expected)
    # changing the logits of prompt or padding positions changes nothing
    logits2 = logits.clone()
    logits2[0, 0], logits2[0, 3:], logits2[1, 2:] = 9.0, -9.0, 3.0
    assert_close(sequence_logps(logits2, tokens, mask), expected)


def test_response_logps_equals_full_logits_path() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=40)).eval()
    pairs = [
        PreferencePair(0, "x", [1, 2, 3], [4, 5], [5, 4]),
        PreferencePair(1, "x", [7], [8, 9, 10, 11], [1, 2, 3, 4]),
    ]
    batch = collate(pairs, pad_id=39)
    full = sequence_logps(model(batch.tokens), batch.tokens, batch.response_mask)
    assert_close(response_logps(model, batch.tokens, batch.response_mask), full, atol=1e-5, rtol=1e-5)
    assert batch.tokens.shape == (4, 5) and batch.lengths.tolist() == [2, 4, 2, 4]


def test_one_forward_pass_per_step_and_reference_never_rerun() -> None:
    torch.manual_seed(0)
    cfg = tiny_synthetic("dpo.max_steps=3", "dpo.eval_every=100", "dpo.batch_size=4", "dpo.eval_batch_size=16")
    reference = Transformer(cfg.model).eval()
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 30, (n,), generator=g).tolist()  # noqa: E731
    make = lambda k: PairSet([PreferencePair(i, "random_tokens", rand(3), rand(4), rand(4)) for i in range(k)], 31)  # noqa: E731
    train, val = make(12), make(8)
    compute_reference_logps(reference, train, 5, torch.device("cpu"))
    compute_reference_logps(reference, val, 5, torch.device("cpu"))
    policy = copy.deepcopy(reference)
    reference.register_forward_hook(lambda *a: pytest.fail("the reference ran during DPO"))
    calls = []
    policy.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    result = DPOTrainer(policy, cfg.dpo, torch.device("cpu")).fit(train, val)
    # step-0 batch, val at step 0, one pass of 2 x 4 rows per step, val at the last step (2 x 8 rows)
    assert result.steps == 3
    assert calls == [8, 16, 8, 8, 8, 16]


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards() -> None:
    torch.manual_seed(0)
    cfg = tiny_synthetic()
    reference = Transformer(cfg.model).eval()
    g = torch.Generator().manual_seed(2)
    pairs = PairSet(
        [
            PreferencePair(
                i,
                "swap_tokens",
                torch.randint(0, 30, (2 + i % 3,), generator=g).tolist(),
                torch.randint(0, 30, (3 + i % 4,), generator=g).tolist(),
                torch.randint(0, 30, (3 + i % 4,), generator=g).tolist(),
            )
            for i in range(10)
        ],
        31,
    )
    compute_reference_logps(reference, pairs, batch_size=3, device=torch.device("cpu"))  # other padding than below
    trainer = DPOTrainer(copy.deepcopy(reference), cfg.dpo, torch.device("cpu"))
    m = trainer.evaluate(pairs, "val")
    assert m["val/loss"] == pytest.approx(LN2, abs=1e-5)
    assert m["val/rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert m["val/rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert m["val/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert m["val/accuracy"] == m["val/reference_accuracy"]
    idx = torch.arange(len(pairs))
    c, r = batch_logps(trainer.policy, pairs.batch(idx))
    assert_close(c, pairs.ref_chosen, atol=1e-4, rtol=1e-5)
    assert_close(r, pairs.ref_rejected, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Stories, tokenisation, splits


def test_sentence_split_keeps_the_text_and_boundaries() -> None:
    text = 'Tom ran.  "Wait!" said Anna. Is it late?\nYes... It was\n'
    parts = split_sentences(text)
    assert parts == ["Tom ran.", '  "Wait!"', " said Anna.", " Is it late?", "\nYes...", " It was"]
    assert "".join(parts) == text.strip()


def test_prompt_plus_continuation_encodes_like_the_joined_text(story_data) -> None:
    from picollm.data.tokenizers import StoryTokenizer

    tok = StoryTokenizer()
    assert tok.vocab_size == 50258 and tok.pad_id == 50257
    stories = load_stories(DPODataConfig(source="files", path=str(STORIES)))
    assert len(stories) >= 30
    for story in stories:
        sentences = split_sentences(story)
        assert "".join(sentences) == story.strip()
        assert all(s[0].isspace() for s in sentences[1:]) and all(not s[-1].isspace() for s in sentences)
        for cut in range(1, len(sentences)):
            prompt, cont = "".join(sentences[:cut]), "".join(sentences[cut:])
            assert prompt[-1] in ".!?\"'", prompt  # split after a sentence end
            assert tok.encode(prompt) + tok.encode(cont) == tok.encode(prompt + cont)
        assert [t for s in sentences for t in tok.encode(s)] == tok.encode(story.strip())
    _, data = story_data
    assert data.vocab is not None  # data.vocab compact by default: ids are compact ids
    for ex in data.examples["train"]:
        joined = data.decode(ex.prompt) + data.decode(ex.chosen)
        assert ex.prompt + ex.chosen == data.vocab.encode(tok.encode(joined))
        assert len(ex.prompt) + len(ex.chosen) <= 96


def test_splits_are_disjoint_by_story(story_data) -> None:
    parts = split_stories(103, 0.1, 0.2, seed=3)
    sets = [set(v) for v in parts.values()]
    assert sum(map(len, sets)) == 103 and set().union(*sets) == set(range(103))
    assert [len(parts[k]) for k in ("val", "test")] == [10, 21]
    _, data = story_data
    assert data.story_overlap() == 0
    uids = {name: {p.uid for p in pairs} for name, pairs in data.pairs.items()}
    assert not (uids["train"] & uids["val"]) and not (uids["train"] & uids["test"]) and not (uids["val"] & uids["test"])
    prompts = {name: {tuple(p.prompt) for p in pairs} for name, pairs in data.pairs.items()}
    assert not (prompts["train"] & (prompts["val"] | prompts["test"]))
    with pytest.raises(PicollmError, match="too few"):
        split_stories(2, 0.1, 0.1, 0)


@pytest.mark.parametrize("scheme", CORRUPTIONS)
def test_every_corruption_differs_and_keeps_the_length(story_data, scheme: str) -> None:
    _, data = story_data
    pairs = [p for ps in data.pairs.values() for p in ps if p.scheme == scheme]
    assert len(pairs) >= 10, scheme
    for p in pairs:
        assert p.rejected != p.chosen
        assert len(p.rejected) == len(p.chosen)
        assert all(0 <= t < data.pad_id for t in p.rejected)
    if scheme == "shuffle_sentences":  # the same tokens, reordered
        assert all(sorted(p.rejected) == sorted(p.chosen) for p in pairs)
    if scheme == "other_story":  # the start of another story's continuation, from the same split
        for name, split_pairs in data.pairs.items():
            for p in (p for p in split_pairs if p.scheme == scheme):
                assert any(ex.uid != p.uid and ex.rest[: len(p.rejected)] == p.rejected for ex in data.examples[name])


def test_corruptions_on_a_hand_built_example() -> None:
    import numpy as np

    ex = Example(0, [1, 2], [[3, 4, 5], [6, 7]], [None, None], [3, 4, 5, 6, 7, 8, 9])
    other = Example(1, [1], [[9, 9, 9]], [None], [10, 11, 12, 13, 14, 15])
    c = Corruptor(n_values=20, swap_k=1, replace_k=2)
    rng = np.random.default_rng(0)
    assert c("shuffle_sentences", ex, [ex, other], rng) == [6, 7, 3, 4, 5]
    assert c("other_story", ex, [ex, other], rng) == [10, 11, 12, 13, 14]
    swapped = c("swap_tokens", ex, [ex], rng)
    assert sum(a != b for a, b in zip(swapped, ex.chosen, strict=True)) == 2 and sorted(swapped) == ex.chosen
    replaced = c("replace_words", ex, [ex], rng)
    assert sum(a != b for a, b in zip(replaced, ex.chosen, strict=True)) == 2
    single = Example(2, [1], [[3, 4]], [None], [3, 4])
    assert c("shuffle_sentences", single, [single], rng) is None  # one sentence: no pair rather than a copy
    with pytest.raises(PicollmError, match="unknown corruption"):
        c("reverse", ex, [ex], rng)


def test_unknown_corruption_in_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dpo.corruptions"):
        tiny_text("dpo.corruptions=[other_story,reverse_words]")
    with pytest.raises(ConfigError, match="data.path"):
        load_config(DPORunConfig, None, ["data.source=files"])
    with pytest.raises(ConfigError, match="vocab"):
        load_config(DPORunConfig, None, ["model.vocab_size=128"])


# --------------------------------------------------------------------------------------------------
# Bad input


def test_offline_hub_gives_one_clear_error_quickly(hub_offline: None) -> None:
    t0 = time.perf_counter()
    with pytest.raises(PicollmError, match="data.source: files") as err:
        load_stories(DPODataConfig(source="tinystories", limit=5))
    assert time.perf_counter() - t0 < 10
    assert "\n" not in str(err.value)


def test_unreachable_hub_fails_fast_without_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.perf_counter()
    with pytest.raises(PicollmError, match="unreachable.*data.source: files"):
        load_stories(DPODataConfig(source="tinystories", limit=5))
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (None, "missing.jsonl", "not found"),
        ("", "empty.jsonl", "empty"),
        ('{"text": "One. Two. Three."}\n{not json\n', "bad.jsonl", "cannot read"),
        ('{"story": "One. Two. Three."}\n', "field.jsonl", "no 'text' field"),
        ('{"text": 3}\n', "number.jsonl", "not text"),
        ("stories", "stories.csv", "neither .txt nor .jsonl"),
        ("\n\n  \n", "blank.txt", "no stories"),
        ("".join(f'{{"text": "Only sentence {i}."}}\n' for i in range(9)), "short.jsonl", "more than data.prompt"),
    ],
)
def test_bad_data_files_are_one_line_errors(tmp_path: Path, content: str | None, name: str, match: str) -> None:
    if name == "short.jsonl" and (reason := tiktoken_missing()):  # this check comes after tokenizing
        pytest.skip(reason)
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    cfg = tiny_text(f"data.path={path}")
    with pytest.raises(PicollmError, match=match) as err:
        build_preference_data(cfg.data, cfg.dpo)
    assert "\n" not in str(err.value)


def test_bad_input_leaves_no_run(tmp_path: Path) -> None:
    from pipelines.dpo import run

    (tmp_path / "bad.jsonl").write_text('{"text": "One. Two. Three."}\n{not json\n')
    with pytest.raises(PicollmError, match="cannot read"):
        run(tiny_text(f"data.path={tmp_path / 'bad.jsonl'}", "tracking.experiment=dpo-bad"))
    with pytest.raises(PicollmError, match="no registered model"):
        run(tiny_synthetic("dpo.reference=nope", "tracking.experiment=dpo-bad"))
    assert runs("dpo-bad") == []


def test_txt_files_and_directories_load(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("One day. A cat sat.\n\nAnother day. A dog ran.<|endoftext|>Third. Story.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "From json. Yes."}) + "\n")
    stories = load_stories(DPODataConfig(source="files", path=str(tmp_path)))
    assert stories == ["One day. A cat sat.", "Another day. A dog ran.", "Third. Story.", "From json. Yes."]
    assert load_stories(DPODataConfig(source="files", path=str(tmp_path / "*.txt"), limit=2)) == stories[:2]


def test_reference_with_another_vocabulary_is_refused_before_the_run() -> None:
    from picollm.tracking.registry import log_model
    from picollm.tracking.store import init_tracking, tracked_run
    from pipelines.dpo import run

    init_tracking()
    with tracked_run("other"):
        log_model(Transformer(ModelConfig(d_model=8, n_layers=1, n_heads=2, vocab_size=16)), "tiny-16")
    with pytest.raises(PicollmError, match="vocabulary"):
        run(tiny_synthetic("dpo.reference=tiny-16", "tracking.experiment=dpo-vocab"))
    # a compact-vocabulary reference brings its id map (vocab.json); data.vocab gpt2 contradicts it
    from picollm.data.tokenizers import CompactVocab

    compact = Transformer(ModelConfig(d_model=8, n_layers=1, n_heads=2, vocab_size=5))
    compact.text_vocab = CompactVocab((1, 2, 3))
    with tracked_run("other"):
        log_model(compact, "tiny-compact")
    with pytest.raises(PicollmError, match="compact vocabulary: set data.vocab compact"):
        run(tiny_text("dpo.reference=tiny-compact", "data.vocab=gpt2", "tracking.experiment=dpo-vocab"))
    assert runs("dpo-vocab") == []


@pytest.mark.parametrize("vocab", ["compact", "gpt2"])
def test_an_integer_model_as_a_text_reference_is_refused_with_a_hint_that_works(vocab: str) -> None:
    """Neither data.vocab fits an integer-sequence model: the line says what does, not the other data.vocab
    (which used to lead to a second refusal)."""
    from picollm.tracking.registry import log_model
    from picollm.tracking.store import init_tracking, tracked_run
    from pipelines.dpo import run

    init_tracking()
    with tracked_run("other"):
        log_model(Transformer(ModelConfig(d_model=8, n_layers=1, n_heads=2, vocab_size=32)), "tiny-ints")
    with pytest.raises(PicollmError, match="is not a text model") as err:
        run(tiny_text("dpo.reference=tiny-ints", f"data.vocab={vocab}", "tracking.experiment=dpo-vocab"))
    assert "set data.vocab" not in str(err.value) and "data.source synthetic" in str(err.value)
    assert runs("dpo-vocab") == []


# --------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_story_dpo_end_to_end(tiktoken_ranks: None) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    import picollm
    from pipelines.dpo import run

    out = run(tiny_text())
    client = MlflowClient()
    parent = client.get_run(out.run_id)
    children = [r for r in runs("dpo-test") if r.data.tags.get("mlflow.parentRunId") == out.run_id]
    assert parent.info.status == "FINISHED"
    assert len(children) == 1 and children[0].info.status == "FINISHED" and children[0].info.run_id == out.sft_run_id
    assert len(runs("dpo-test")) == 2
    # step-0 loss is ln 2 (policy == reference), logged before any update
    history = client.get_metric_history(out.run_id, "train/loss")
    step0 = [m.value for m in history if m.step == 0]
    assert step0 and step0[0] == pytest.approx(LN2, abs=1e-4)
    assert out.step0_loss == pytest.approx(LN2, abs=1e-4)
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "accuracy",
        "reference_accuracy",
    ):
        assert f"test/{key}" in parent.data.metrics and f"val/{key}" in parent.data.metrics
    assert "test/reference_accuracy/other_story" in parent.data.metrics
    for key in ("test/logits/chosen", "test/logits/rejected", "test/gain", "test/gain_ci_low", "val/logits/chosen"):
        assert key in parent.data.metrics, key
    assert any(m.step > 0 for m in client.get_metric_history(out.run_id, "train/grad_norm"))
    assert "val/loss" in children[0].data.metrics
    assert parent.data.tags["reference"] == "picollm-sft/1"
    arts = {a.path for a in client.list_artifacts(out.run_id, "samples")}
    assert {"samples/generations.json", "samples/generations.md"} <= arts
    table = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=out.run_id, artifact_path="test/per_scheme.json")).read_text()
    )
    assert "all" in str(table) and "gain_ci_low" in table["columns"] and "stories" in table["columns"]
    assert {"report.html", "report.md"} <= {a.path for a in client.list_artifacts(out.run_id)}
    pairs = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=out.run_id, artifact_path="test/pairs.json")).read_text()
    )
    assert pairs["columns"] == ["story", "scheme", "reference_correct", "policy_correct"]
    assert len(pairs["data"]) == sum(table_row[1] for table_row in table["data"][:-1])  # every scheme's pairs
    assert "figures/dpo.png" in {a.path for a in client.list_artifacts(out.run_id, "figures")}
    html = Path(mlflow.artifacts.download_artifacts(run_id=out.run_id, artifact_path="report.html")).read_text()
    assert "data:image/png;base64," in html and "other_story" in html  # self-contained, with the table
    # MLflow orders chart sections by key: the first chart is the headline; bookkeeping is params
    assert min(parent.data.metrics) == "test/accuracy"
    assert {"dpo.best_step", "dpo.steps_run", "dpo.seconds.total", "dpo.step0_loss"} <= set(parent.data.params)
    assert len(out.samples["policy"]) == 2
    policy, sft = picollm.load_model("picollm-dpo@champion"), picollm.load_model("picollm-sft@champion")
    # the compact vocabulary travels with both models (vocab.json) and is the one the data used
    for model in (policy, sft):
        assert model.text_vocab.vocab_size == model.cfg.vocab_size == int(parent.data.params["data.vocab_size"])
    assert int(parent.data.params["data.vocab_size_gpt2"]) == 50258
    assert int(parent.data.params["data.vocab_size_compact"]) == policy.cfg.vocab_size < 50258
    assert any(
        not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), sft.state_dict().values(), strict=True)
    )
    assert mlflow.active_run() is None

    # Text in, text out through pyfunc: the GPT-2 files travel with the model, tiktoken is a requirement.
    from mlflow.exceptions import MlflowException

    from picollm.data.tokenizers import compact_codec
    from picollm.tracking.prompts import continue_prompts

    pyfunc = mlflow.pyfunc.load_model("models:/picollm-dpo@champion")
    [text] = pyfunc.predict(["Once upon a time"], params={"max_new_tokens": 4})
    assert isinstance(text, str) and text
    codec = compact_codec(policy.text_vocab)
    assert [text] == continue_prompts(policy, ["Once upon a time"], max_new_tokens=4, codec=codec)
    with pytest.raises(MlflowException, match="prompt is empty") as err:
        pyfunc.predict([""])
    assert err.value.get_http_status_code() == 400
    local = Path(mlflow.artifacts.download_artifacts("models:/picollm-sft@champion"))
    assert len(list((local / "artifacts" / "tokenizer_files").iterdir())) == 2
    assert (local / "artifacts" / "vocab.json").is_file()
    assert "tiktoken==" in (local / "requirements.txt").read_text()
    # data statistics are params; the test metrics are linked to the logged model
    assert parent.data.params["data.story_overlap"] == "0" and "data.train.pairs" in parent.data.params
    assert not any(k.startswith("data") for k in parent.data.metrics)
    [output] = parent.outputs.model_outputs
    linked = {m.key for m in mlflow.get_logged_model(output.model_id).metrics}
    assert {"test/loss", "test/accuracy"} <= linked


@pytest.mark.slow
def test_synthetic_dpo_end_to_end_and_named_reference() -> None:
    from mlflow.tracking import MlflowClient

    import picollm
    from pipelines.dpo import run

    class Phases:  # the CLI's reporter, reduced to what the flow tells it
        def __init__(self) -> None:
            self.planned, self.parts, self.steps = 0, [], []

        def __call__(self, msg: str) -> None:
            pass

        def plan(self, parts: int, unit: str = "parts") -> None:
            self.planned = parts

        def part(self, label: str, done: int | None = None) -> None:
            self.parts.append(label)

        def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
            self.steps.append((0, total_steps))

        def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
            self.steps.append((step, self.steps[-1][1]))

    names = ("tracking.registered_model=syn-dpo", "tracking.sft_registered_model=syn-sft")
    phases = Phases()
    out = run(tiny_synthetic(*names), echo=phases)
    assert phases.planned == 3 and phases.parts == ["SFT", "reference log-probs", "DPO"]
    assert phases.steps[-1][0] == out.steps  # the DPO phase: its steps on the bar, to the last
    assert out.step0_loss == pytest.approx(LN2, abs=1e-4)
    assert 0.0 <= out.metrics["test/reference_accuracy/random_tokens"] <= 1.0
    assert {r.info.status for r in runs("dpo-syn")} == {"FINISHED"} and len(runs("dpo-syn")) == 2
    assert picollm.load_model("syn-dpo").cfg.vocab_size == 32
    assert out.samples["prompt"][0].split()[0].isdigit()

    # a named reference: no SFT, no nested run, the policy starts from that model
    again = run(tiny_synthetic("dpo.reference=syn-sft@champion", "tracking.log_model=false"))
    assert again.sft_run_id is None and again.reference == "syn-sft@champion"
    assert len(runs("dpo-syn")) == 3
    assert MlflowClient().get_run(again.run_id).data.tags["reference"] == "syn-sft@champion"
    assert again.metrics["test/reference_accuracy"] == pytest.approx(out.metrics["test/reference_accuracy"])

    # a selection run: validation only, no test pair scored, no test prompt continued
    val_only = run(
        tiny_synthetic("dpo.reference=syn-sft@champion", "tracking.log_model=false", "dpo.evaluate_test=false")
    )
    logged = MlflowClient().get_run(val_only.run_id).data.metrics
    assert val_only.split == "val" and val_only.samples == {} and val_only.table == val_only.val_table
    assert not any(k.startswith("test/") for k in logged) and "best_val/gain" in logged
    assert min(logged) == "best_val/accuracy"  # the first chart


def test_bench_step_reports_the_ratio() -> None:
    from pipelines.dpo import bench_step

    res = bench_step(tiny_synthetic("dpo.batch_size=4"), warmup_steps=1, timed_steps=2)
    assert res["dpo_bench.ratio.naive_over_dpo"] > 0 and res["dpo_bench.dpo_step_ms"] > 0
    assert {"dpo_bench.naive_step_ms", "dpo_bench.naive_separate_step_ms", "dpo_bench.full_logits_step_ms"} <= set(res)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["data.source=files", "data.path=missing.jsonl"], "not found"),
        (["dpo.corruptions=[reverse]"], "dpo.corruptions"),
        ([], "data.source: files"),  # the hub, offline
    ],
    ids=["missing-file", "unknown-scheme", "hub-offline"],
)
def test_cli_dpo_user_errors_are_one_line_exit_2(hub_offline: None, overrides: list[str], fragment: str) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    args = ["dpo", str(Path(__file__).resolve().parents[1] / "configs" / "dpo.yaml")]
    for o in [*overrides, "tracking.experiment=dpo-cli"]:
        args += ["--set", o]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert runs("dpo-cli") == []
