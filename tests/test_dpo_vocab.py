"""The compact text vocabulary (picollm/text_vocab.py): exact round trips, reserved ids, the id map that travels
with a logged model; the DPO gain metrics and their paired bootstrap on hand-built pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from picollm.config import DPODataConfig, ModelConfig, load_config
from picollm.data.tokenizers import UNK_TEXT, CompactVocab
from picollm.errors import PicollmError
from picollm.model.transformer import Transformer

from .conftest import TIKTOKEN_CACHE, tiktoken_missing

STORIES = Path(__file__).resolve().parent / "fixtures" / "stories.jsonl"
SHARED = Path(__file__).resolve().parents[1].parent / "shared/data/tinystories/TinyStories-train-head.jsonl"


@pytest.fixture(scope="module")
def tok():
    if reason := tiktoken_missing():
        pytest.skip(reason)
    with pytest.MonkeyPatch.context() as mp:
        if TIKTOKEN_CACHE.is_dir():
            mp.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
        from picollm.data.tokenizers import StoryTokenizer

        return StoryTokenizer()


def test_reserved_ids_and_the_map() -> None:
    v = CompactVocab((3, 10, 50256))
    assert (v.unk_id, v.pad_id, v.vocab_size) == (3, 4, 5)  # pad is the last id, as the models expect
    assert v.encode([10, 3, 7, 50256]) == [1, 0, 3, 2]  # 7 was never seen: unk
    assert v.decode([1, 0, 3, 4, 2]) == [10, 3, None, 50256]  # unk -> None, pad dropped
    assert v.decode_text([0, 3, 1], lambda ids: "".join(f"<{i}>" for i in ids)) == f"<3>{UNK_TEXT}<10>"
    assert CompactVocab.from_json(v.to_json()) == v
    for bad in ('{"kind": "gpt2"}', '{"kind": "compact", "gpt2_ids": [5, 5]}', "[1, 2]", "not json"):
        with pytest.raises(PicollmError):
            CompactVocab.from_json(bad)


@pytest.mark.parametrize("path", [STORIES, SHARED], ids=["fixture", "shared-sample"])
def test_every_training_story_round_trips_exactly(tok, path: Path) -> None:
    from picollm.data.stories import load_stories
    from picollm.dpo.pairs import split_sentences

    if not path.is_file():
        pytest.skip(f"{path} is absent")
    stories = load_stories(DPODataConfig(source="files", path=str(path), limit=None))
    encoded = [tok.encode(s) for s in stories]
    vocab = CompactVocab.from_sequences(encoded)
    assert vocab.vocab_size < tok.vocab_size
    for story, ids in zip(stories, encoded, strict=True):
        compact = vocab.encode(ids)
        assert vocab.unk_id not in compact and vocab.pad_id not in compact  # reserved: no GPT-2 id maps there
        assert vocab.decode_text(compact, tok.decode) == story  # ids -> text, exactly
        assert "".join(split_sentences(story)) == story


def test_preference_data_uses_the_training_stories_vocabulary(tok) -> None:
    from picollm.config import DPORunConfig
    from picollm.data.stories import load_stories
    from picollm.dpo.pairs import build_preference_data

    over = [f"data.path={STORIES}", "data.source=files", "data.seq_max_len=96", "dpo.train_pairs=40"]
    cfg = load_config(DPORunConfig, None, [*over, "dpo.corruptions=[random_tokens,other_story]"])
    assert cfg.model.vocab_size is None  # compact: set by the flow once the stories are read
    data = build_preference_data(cfg.data, cfg.dpo)
    assert data.vocab is not None and data.vocab_size == data.vocab.vocab_size and data.pad_id == data.vocab.pad_id
    stories = {s.strip() for s in load_stories(cfg.data)}
    for ex in data.examples["train"]:  # prompt + rest is the whole story: no unk, and exact text
        assert data.vocab.unk_id not in ex.prompt + ex.rest
        assert data.decode(ex.prompt + ex.rest) in stories
    for p in data.pairs["train"]:
        assert max(p.rejected) < data.vocab.unk_id  # random tokens come from the compact vocabulary
    stats = data.stats()
    assert stats["data.vocab_size_gpt2"] == 50258 and stats["data.vocab_size_compact"] == data.vocab_size
    full = build_preference_data(load_config(DPORunConfig, None, [*over, "data.vocab=gpt2"]).data, cfg.dpo)
    assert full.vocab is None and full.vocab_size == 50258
    with pytest.raises(PicollmError, match="vocab_size must stay null"):
        load_config(DPORunConfig, None, [*over, "model.vocab_size=100"])


def test_the_id_map_travels_with_the_model_files(tok, tmp_path: Path) -> None:
    from picollm.data.tokenizers import compact_codec
    from picollm.tracking.prompts import continue_prompts
    from picollm.tracking.registry import VOCAB_FILE, load_from_files, save_files

    vocab = CompactVocab.from_sequences([tok.encode("Once upon a time, there was a little dog. The dog ran.")])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=vocab.vocab_size))
    model.text_vocab = vocab
    files = save_files(model, tmp_path)
    assert Path(files["vocab"]).name == VOCAB_FILE
    loaded = load_from_files(files["weights"], files["config"])
    assert loaded.text_vocab == vocab
    codec = compact_codec(vocab)
    assert codec.encode("Once upon a time") == vocab.encode(tok.encode("Once upon a time"))
    assert codec.encode("Once upon a zebra")[-1] == vocab.unk_id
    [out] = continue_prompts(loaded, ["The dog"], max_new_tokens=5, codec=codec)
    assert isinstance(out, str) and out
    Path(files["vocab"]).write_text(CompactVocab((1, 2)).to_json())  # a map of another size is refused
    with pytest.raises(PicollmError, match="maps 4 ids"):
        load_from_files(files["weights"], files["config"])


# --------------------------------------------------------------------------------------------------
# Gain over the reference


def test_paired_bootstrap_hand_computed() -> None:
    from picollm.dpo.metrics import paired_bootstrap_ci

    # d = policy - reference = [1, 0, 0, 1, 0]: gain 0.4; a resampled mean is Binomial(5, 0.4) / 5, whose
    # 2.5% and 97.5% quantiles are 0.0 (P(0) = 0.078) and 0.8 (P(<=4) = 0.990).
    gain, lo, hi = paired_bootstrap_ci(np.array([1, 1, 1, 1, 0]), np.array([0, 1, 1, 0, 0]), n_boot=4000)
    assert (gain, lo, hi) == (pytest.approx(0.4), 0.0, pytest.approx(0.8))
    # the same correctness for both models: no gain, and no width (pairing removes the shared variance)
    assert paired_bootstrap_ci(np.array([1, 0, 1, 0]), np.array([1, 0, 1, 0])) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_ci(np.ones(8), np.zeros(8)) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(np.array([]), np.array([]))


def test_gain_table_and_metrics_on_hand_built_pairs() -> None:
    from picollm.dpo.metrics import PairScores, gain_metrics, gain_table, scores_metrics

    t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    # 4 pairs: scheme a (pairs 0, 1), scheme b (pairs 2, 3). Policy right on 0, 1, 2; reference on 1, 3.
    scores = PairScores(
        losses=t(0.1, 0.2, 0.3, 0.4),
        chosen_rewards=t(0.5, 0.1, 0.2, -0.1),
        rejected_rewards=t(-0.5, 0.0, 0.1, 0.1),
        policy_chosen=t(-1, -2, -3, -4),
        policy_rejected=t(-2, -3, -4, -3),
        ref_chosen=t(-3, -1, -5, -2),
        ref_rejected=t(-2, -2, -4, -3),
        chosen_logits=t(1, 2, 3, 4),
        rejected_logits=t(0, 0, 0, 4),
        schemes=["a", "a", "b", "b"],
    )
    table = gain_table(scores, n_boot=500)
    assert table["scheme"] == ["a", "b", "all"] and table["pairs"] == [2, 2, 4]
    assert table["reference_accuracy"] == [0.5, 0.5, 0.5] and table["accuracy"] == [1.0, 0.5, 0.75]
    assert table["gain"] == [0.5, 0.0, 0.25]
    assert table["logps_chosen"] == [-1.5, -3.5, -2.5] and table["reference_logps_chosen"] == [-2.0, -3.5, -2.75]
    cis = zip(table["gain"], table["gain_ci_low"], table["gain_ci_high"], strict=True)
    assert all(lo <= g <= hi for g, lo, hi in cis)
    m = gain_metrics("test", table)
    assert m["test/gain"] == 0.25 and m["test/gain/a"] == 0.5 and "test/gain_ci_low/b" in m
    sm = scores_metrics("test", scores)
    assert sm["test/logits/chosen"] == 2.5 and sm["test/logits/rejected/b"] == 2.0
    assert sm["test/accuracy/a"] == 1.0 and sm["test/reference_accuracy"] == 0.5
    assert sm["test/rewards/accuracies"] == 0.75 and sm["test/rewards/margins"] == pytest.approx(0.25)
