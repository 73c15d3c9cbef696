"""Preference pairs for DPO: stories (or synthetic sequences) -> prompt, chosen and rejected continuations.

A story is split at sentence boundaries; the prompt is its first `prompt_sentences` sentences and the
chosen continuation the next whole sentences that fit in `seq_max_len`. Every sentence after the
first keeps its leading whitespace and ends on non-whitespace, and no GPT-2 pre-token spans a
non-space character followed by whitespace, so encoding the sentences separately and concatenating
gives exactly the encoding of the joined text: the prompt/continuation boundary never merges tokens.

Stories are split into train/val/test before any pair is made (no story in two splits). The rejected
continuation comes from one of the corruption schemes below, each the same length as the chosen one:
  random_tokens      uniform random tokens
  swap_tokens        `swap_k` swaps of adjacent, different tokens
  shuffle_sentences  the chosen sentences in another order (needs two sentences)
  other_story        the continuation of another story of the same split, cut to the same length
  replace_words      `replace_k` names / content words replaced by others of the same kind and token count
Schemes return None where they cannot apply (a one-sentence continuation cannot be shuffled); such a
pair is simply not made. Stories are read by picollm/stories.py; with `data.vocab: compact` every id is
mapped to the compact vocabulary (picollm/text_vocab.py) once the pairs are made.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from picollm.config import CORRUPTIONS, DPOConfig, DPODataConfig
from picollm.data.stories import load_stories
from picollm.data.tokenizers import CompactVocab, StoryTokenizer
from picollm.errors import PicollmError

log = logging.getLogger(__name__)

# A sentence ends at . ! ? (runs allowed), optionally followed by closing quotes/brackets, before whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)")
_WORD = re.compile(r"[A-Za-z]+")
_STOPWORDS = frozenset(  # function words: replacing them tests grammar, not content
    """the and was were are for you your with they them their there then that this these those have has had
    she her him his its not but what when where who why how can could would should will did does don
    all any one two day very said says from into out our just got get too also some more much many
    than only over again back down off away here now like yes okay once upon time""".split()  # noqa: SIM905
)


# --------------------------------------------------------------------------------------------------
# Tokenizer


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (stripped); each after the first keeps its leading whitespace, so
    "".join(split_sentences(t)) == t.strip()."""
    text = text.strip()
    out, prev = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[prev : m.end()])
        prev = m.end()
    if text[prev:].strip():
        out.append(text[prev:])
    return out


def split_stories(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Story indices per split: disjoint by construction, so no story is in two splits."""
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise PicollmError(f"data: {n} stories are too few for train, val and test splits")
    order = np.random.default_rng(seed).permutation(n).tolist()
    return {"train": order[n_val + n_test :], "val": order[:n_val], "test": order[n_val : n_val + n_test]}


# --------------------------------------------------------------------------------------------------
# Examples: prompt + chosen continuation


@dataclass
class Example:
    uid: int  # the story's id; unique across splits
    prompt: list[int]
    segments: list[list[int]]  # the chosen continuation: tokens per sentence (per value for synthetic)
    texts: list[str | None]  # each segment's text (None: synthetic, or a sentence cut by seq_max_len)
    rest: list[int]  # every token after the prompt: what other_story takes from a donor

    @property
    def chosen(self) -> list[int]:
        return [t for s in self.segments for t in s]


def story_example(uid: int, sentences: list[str], encoded: list[list[int]], cfg: DPODataConfig) -> Example | None:
    p = cfg.prompt_sentences
    if len(sentences) <= p:
        return None
    prompt = [t for ids in encoded[:p] for t in ids]
    budget = cfg.seq_max_len - len(prompt)
    if budget < cfg.min_continuation_tokens:
        return None
    segments: list[list[int]] = []
    texts: list[str | None] = []
    used = 0
    for text, ids in zip(sentences[p:], encoded[p:], strict=True):
        if cfg.continuation_sentences is not None and len(segments) >= cfg.continuation_sentences:
            break
        if used + len(ids) > budget:
            if not segments:  # a single over-long sentence: truncate it to seq_max_len
                segments.append(ids[:budget])
                texts.append(None)
                used = budget
            break
        segments.append(ids)
        texts.append(text)
        used += len(ids)
    if used < cfg.min_continuation_tokens:
        return None
    return Example(uid, prompt, segments, texts, [t for ids in encoded[p:] for t in ids])


# --------------------------------------------------------------------------------------------------
# Corruptions


@dataclass
class WordPools:
    """Replacement words seen in the training stories, as occurrence lists (sampling follows frequency)."""

    names: list[str]
    content: list[str]
    name_set: frozenset[str] = frozenset()
    content_set: frozenset[str] = frozenset()

    @classmethod
    def from_sentences(cls, sentences: list[list[str]]) -> WordPools:
        caps, lower = Counter(), Counter()
        for story in sentences:
            for sent in story:
                for i, m in enumerate(_WORD.finditer(sent)):
                    w = m.group()
                    if w[0].isupper() and w[1:].islower() and i > 0:  # capitalised mid-sentence: a name
                        caps[w] += 1
                    elif w.islower():
                        lower[w] += 1
        names = [w for w, c in caps.items() if c >= 2 and w.lower() not in lower]
        content = [w for w, c in lower.items() if c >= 2 and len(w) >= 3 and w not in _STOPWORDS]
        return cls(
            names=[w for w in names for _ in range(caps[w])],
            content=[w for w in content for _ in range(lower[w])],
            name_set=frozenset(names),
            content_set=frozenset(content),
        )


@dataclass
class Corruptor:
    n_values: int  # tokens 0..n_values-1 are real values (the pad is excluded)
    swap_k: int = 2
    replace_k: int = 2
    encode: Callable[[str], list[int]] | None = None  # text sources
    pools: WordPools | None = None
    values: list[int] | None = None  # random_tokens draws from these (a compact vocabulary's ids), not 0..n_values-1

    def __call__(self, scheme: str, ex: Example, split: list[Example], rng: np.random.Generator) -> list[int] | None:
        if scheme not in CORRUPTIONS:
            raise PicollmError(f"unknown corruption scheme {scheme!r} (choose from {', '.join(CORRUPTIONS)})")
        out = getattr(self, f"_{scheme}")(ex, split, rng)
        if out is None or out == ex.chosen:
            return None
        assert len(out) == len(ex.chosen), scheme
        return out

    def _random_tokens(self, ex: Example, split: list[Example], rng: np.random.Generator) -> list[int]:
        if self.values is not None:
            return [self.values[i] for i in rng.integers(0, len(self.values), size=len(ex.chosen)).tolist()]
        return rng.integers(0, self.n_values, size=len(ex.chosen)).tolist()

    def _swap_tokens(self, ex: Example, split: list[Example], rng: np.random.Generator) -> list[int] | None:
        out = list(ex.chosen)
        eligible = [i for i in range(len(out) - 1) if out[i] != out[i + 1]]
        taken: set[int] = set()
        for i in rng.permutation(eligible).tolist() if eligible else []:
            if len(taken) >= 2 * self.swap_k:
                break
            if i in taken or i + 1 in taken:  # non-overlapping, so k swaps really change k pairs
                continue
            out[i], out[i + 1] = out[i + 1], out[i]
            taken |= {i, i + 1}
        return out if taken else None

    def _shuffle_sentences(self, ex: Example, split: list[Example], rng: np.random.Generator) -> list[int] | None:
        if len(ex.segments) < 2:
            return None
        for _ in range(10):
            perm = rng.permutation(len(ex.segments)).tolist()
            out = [t for j in perm for t in ex.segments[j]]
            if out != ex.chosen:
                return out
        return None

    def _other_story(self, ex: Example, split: list[Example], rng: np.random.Generator) -> list[int] | None:
        n = len(ex.chosen)
        for _ in range(50):
            donor = split[int(rng.integers(len(split)))]
            if donor.uid != ex.uid and len(donor.rest) >= n and donor.rest[:n] != ex.chosen:
                return donor.rest[:n]
        return None

    def _replace_words(self, ex: Example, split: list[Example], rng: np.random.Generator) -> list[int] | None:
        if self.pools is None or self.encode is None:  # synthetic: replace k values by other values
            out = list(ex.chosen)
            for i in rng.choice(len(out), size=min(self.replace_k, len(out)), replace=False).tolist():
                out[i] = int((out[i] + rng.integers(1, self.n_values)) % self.n_values)
            return out
        pools = self.pools
        spans = [
            (s, m.start(), m.end(), pools.names if m.group() in pools.name_set else pools.content)
            for s, text in enumerate(ex.texts)
            if text is not None
            for m in _WORD.finditer(text)
            if m.group() in pools.name_set or m.group() in pools.content_set
        ]
        if not spans:
            return None
        texts = list(ex.texts)
        segments = [list(seg) for seg in ex.segments]
        chosen = sorted(
            rng.choice(len(spans), size=min(self.replace_k, len(spans)), replace=False).tolist(),
            key=lambda j: (spans[j][0], -spans[j][1]),
        )  # right to left, so offsets stay valid
        done = 0
        for j in chosen:
            s, start, end, pool = spans[j]
            text = texts[s]
            assert text is not None
            for _ in range(20):  # a same-kind word whose encoding keeps the sentence's token count
                word = pool[int(rng.integers(len(pool)))]
                if word == text[start:end]:
                    continue
                new = text[:start] + word + text[end:]
                ids = self.encode(new)
                if len(ids) == len(segments[s]):
                    texts[s], segments[s] = new, ids
                    done += 1
                    break
        return [t for seg in segments for t in seg] if done else None


# --------------------------------------------------------------------------------------------------
# Pairs


@dataclass
class PreferencePair:
    uid: int  # the story it came from
    scheme: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def build_pairs(
    examples: list[Example], n_pairs: int, schemes: list[str], corruptor: Corruptor, seed: int, max_rounds: int = 20
) -> list[PreferencePair]:
    """Up to n_pairs distinct pairs: every story with every scheme before any story repeats."""
    rng = np.random.default_rng(seed)
    pairs: list[PreferencePair] = []
    seen: set[tuple[int, str, tuple[int, ...]]] = set()
    for _ in range(max_rounds):
        added = 0
        for i in rng.permutation(len(examples)).tolist():
            ex = examples[i]
            for scheme in schemes:
                rejected = corruptor(scheme, ex, examples, rng)
                if rejected is None or (key := (ex.uid, scheme, tuple(rejected))) in seen:
                    continue
                seen.add(key)
                pairs.append(PreferencePair(ex.uid, scheme, ex.prompt, ex.chosen, rejected))
                added += 1
                if len(pairs) >= n_pairs:
                    return pairs
        if not added:
            break
    return pairs


@dataclass
class PreferenceData:
    source: str
    vocab_size: int
    pad_id: int
    decode: Callable[[list[int]], str]
    examples: dict[str, list[Example]]
    pairs: dict[str, list[PreferencePair]] = field(default_factory=dict)
    n_stories: dict[str, int] = field(default_factory=dict)
    vocab: CompactVocab | None = None  # text with data.vocab compact: ids are compact ids
    train_ids: set[int] = field(default_factory=set)  # GPT-2 ids of the training stories (text sources)

    def sft_sequences(self, split: str) -> list[list[int]]:
        """Prompt + chosen continuation of every example: the SFT reference learns the preferred text."""
        return [ex.prompt + ex.chosen for ex in self.examples[split]]

    def story_overlap(self) -> int:
        """Stories that appear in more than one split (must be 0)."""
        ids = [{p.uid for p in ps} | {e.uid for e in self.examples.get(n, [])} for n, ps in self.pairs.items()]
        return sum(len(a & b) for i, a in enumerate(ids) for b in ids[i + 1 :])

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"data.story_overlap": float(self.story_overlap())}
        out["data.vocab_size"] = float(self.vocab_size)  # the model's
        if self.source == "text":  # both sizes, whichever the model uses
            out["data.vocab_size_gpt2"] = float(StoryTokenizer.VOCAB_SIZE)
            out["data.vocab_size_compact"] = float(self.vocab.vocab_size if self.vocab else len(self.train_ids) + 2)
        for name in ("train", "val", "test"):
            out[f"data.{name}.stories"] = float(self.n_stories.get(name, 0))
            out[f"data.{name}.examples"] = float(len(self.examples.get(name, [])))
            ps = self.pairs.get(name, [])
            out[f"data.{name}.pairs"] = float(len(ps))
            for scheme, c in Counter(p.scheme for p in ps).items():
                out[f"data.{name}.pairs.{scheme}"] = float(c)
            if ps:
                out[f"data.{name}.prompt_tokens_mean"] = float(np.mean([len(p.prompt) for p in ps]))
                out[f"data.{name}.response_tokens_mean"] = float(np.mean([len(p.chosen) for p in ps]))
                if self.vocab is not None:  # tokens the training stories never used
                    unk = sum(t == self.vocab.unk_id for p in ps for t in p.prompt + p.chosen)
                    out[f"data.{name}.unk_rate"] = unk / max(1, sum(len(p.prompt) + len(p.chosen) for p in ps))
        return out


def _text_examples(cfg: DPODataConfig) -> tuple[PreferenceData, WordPools, StoryTokenizer]:
    stories = load_stories(cfg)
    tok = StoryTokenizer()
    splits = split_stories(len(stories), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    examples: dict[str, list[Example]] = {}
    train_sentences: list[list[str]] = []
    train_ids: set[int] = set()
    for name, idx in splits.items():
        examples[name] = []
        for uid in idx:
            sentences = split_sentences(stories[uid])
            encoded = [tok.encode(s) for s in sentences]
            ex = story_example(uid, sentences, encoded, cfg)
            if ex is not None:
                examples[name].append(ex)
            if name == "train":
                train_sentences.append(sentences)
                train_ids.update(t for ids in encoded for t in ids)
    data = PreferenceData(
        "text",
        tok.vocab_size,
        tok.pad_id,
        tok.decode,
        examples,
        n_stories={n: len(i) for n, i in splits.items()},
        train_ids=train_ids,
    )
    return data, WordPools.from_sentences(train_sentences), tok


def _synthetic_examples(cfg: DPODataConfig) -> PreferenceData:
    from picollm.data.splits import build_data

    syn = build_data(cfg.synthetic)  # splits already content-disjoint
    examples: dict[str, list[Example]] = {}
    uid = 0
    for name, split in syn.splits().items():
        examples[name] = []
        for seq in split.sequences:
            values = seq.tolist()[: cfg.seq_max_len]
            p = min(max(1, round(len(values) * cfg.synthetic_prompt_fraction)), len(values) - 2)
            cont = values[p:]
            examples[name].append(Example(uid, values[:p], [[v] for v in cont], [None] * len(cont), cont))
            uid += 1
    pad = cfg.synthetic.pad_id

    def decode(ids: list[int]) -> str:
        return " ".join(str(i) for i in ids if i != pad)

    return PreferenceData(
        "synthetic",
        cfg.synthetic.vocab_size,
        pad,
        decode,
        examples,
        n_stories={n: len(s) for n, s in syn.splits().items()},
    )


def build_preference_data(cfg: DPODataConfig, dpo: DPOConfig, vocab: CompactVocab | None = None) -> PreferenceData:
    """Load, split by story, and build the train/val/test pairs. Raises PicollmError on bad input.

    Text with `cfg.vocab` compact: ids are mapped to `vocab` (a reference model's) or, when None, to a
    compact vocabulary of the training stories' GPT-2 ids, built here."""
    vocab_ = None
    if cfg.source == "synthetic":
        data = _synthetic_examples(cfg)
        corruptor = Corruptor(cfg.synthetic.modulus, dpo.swap_k, dpo.replace_k)
    else:
        data, pools, tok = _text_examples(cfg)
        if cfg.vocab == "compact":
            vocab_ = vocab or CompactVocab(tuple(sorted(data.train_ids)))
        values = list(vocab_.gpt2_ids) if vocab_ is not None else None
        corruptor = Corruptor(tok.pad_id, dpo.swap_k, dpo.replace_k, tok.encode, pools, values)
    sizes = {"train": dpo.train_pairs, "val": dpo.val_pairs, "test": dpo.test_pairs}
    for i, (name, n) in enumerate(sizes.items()):
        if not data.examples[name]:
            raise PicollmError(
                f"data: no {name} story has more than data.prompt_sentences ({cfg.prompt_sentences}) sentences "
                f"within data.seq_max_len ({cfg.seq_max_len}) tokens"
            )
        data.pairs[name] = build_pairs(data.examples[name], n, list(dpo.corruptions), corruptor, cfg.seed + 7919 * i)
        if not data.pairs[name]:
            raise PicollmError(f"data: corruptions {list(dpo.corruptions)} produced no {name} pairs")
        if len(data.pairs[name]) < n:
            log.warning(
                "%s: %d pairs (asked for %d): too few stories for more distinct pairs", name, len(data.pairs[name]), n
            )
    if vocab_ is not None:
        compact_examples(data.examples, data.pairs, vocab_)
        gpt2_decode = data.decode
        data.vocab, data.vocab_size, data.pad_id = vocab_, vocab_.vocab_size, vocab_.pad_id
        data.decode = lambda ids: vocab_.decode_text(ids, gpt2_decode)
    return data


def compact_examples(examples: dict[str, list[Any]], pairs: dict[str, list[Any]], vocab: CompactVocab) -> None:
    """Map every split's examples (text_data.Example) and pairs (PreferencePair) to compact ids, in place.
    Corruptions are made on GPT-2 ids first (replace_words re-encodes text), so the map comes last; a pair
    whose two continuations become equal (they differed only in tokens that are both unk) is dropped."""
    enc = vocab.encode
    for split in examples.values():
        for ex in split:
            ex.prompt, ex.rest = enc(ex.prompt), enc(ex.rest)
            ex.segments = [enc(s) for s in ex.segments]
    for name, split in pairs.items():
        for p in split:
            p.prompt, p.chosen, p.rejected = enc(p.prompt), enc(p.chosen), enc(p.rejected)
        pairs[name] = [p for p in split if p.rejected != p.chosen]
