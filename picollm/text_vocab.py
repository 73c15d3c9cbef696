"""A compact vocabulary for the text models: the GPT-2 ids the training stories use, plus unk and pad.

The tokenizer stays GPT-2 BPE (tiktoken); only the model's id space shrinks. On the shared 2,316-story
TinyStories sample the training stories use about 6,400 of GPT-2's 50,257 ids, so the output head (and
its softmax), which dominates a small model's cost, is ~8x smaller. Compact ids:

  0 .. n-1   the GPT-2 ids seen in the training stories, in increasing GPT-2 order
  n          unk: any other GPT-2 id (a val/test story may use one the training stories never did)
  n + 1      pad (the last id, as picollm's models expect)

The trade-off: the model can never emit a token the training stories lack (it could not have learned one
anyway), and a prompt's unseen tokens all read as unk. The map travels with a logged model as
`vocab.json` (plain JSON, no pickle); a loaded model carries it as `model.text_vocab`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from picollm.errors import PicollmError

VOCAB_KINDS = ("compact", "gpt2")
GPT2_IDS = 50257  # tiktoken's GPT-2 ranks; picollm's GPT-2 vocabulary adds one pad id (50,258)
UNK_TEXT = "\ufffd"  # how an unk id reads in decoded text (Unicode's replacement character)


@dataclass(frozen=True)
class CompactVocab:
    """compact id i <-> GPT-2 id `gpt2_ids[i]`; `unk_id` and `pad_id` map to no GPT-2 id."""

    gpt2_ids: tuple[int, ...]  # sorted, distinct, each in [0, GPT2_IDS)

    def __post_init__(self) -> None:
        ids = np.asarray(self.gpt2_ids, dtype=np.int64)
        if ids.size == 0:
            raise PicollmError("a compact vocabulary needs at least one GPT-2 id")
        if np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= GPT2_IDS:
            raise PicollmError(f"a compact vocabulary's GPT-2 ids must be sorted, distinct and in [0, {GPT2_IDS})")
        table = np.full(GPT2_IDS, len(ids), dtype=np.int64)  # GPT-2 id -> compact id (unk by default)
        table[ids] = np.arange(len(ids))
        object.__setattr__(self, "_to_compact", table)
        object.__setattr__(self, "_to_gpt2", ids)

    @classmethod
    def from_sequences(cls, sequences: Iterable[list[int]]) -> CompactVocab:
        """The GPT-2 ids that occur in `sequences` (the training stories' tokens)."""
        seen: set[int] = set()
        for seq in sequences:
            seen.update(seq)
        return cls(tuple(sorted(seen)))

    @property
    def unk_id(self) -> int:
        return len(self.gpt2_ids)

    @property
    def pad_id(self) -> int:
        return len(self.gpt2_ids) + 1

    @property
    def vocab_size(self) -> int:
        return len(self.gpt2_ids) + 2

    def encode(self, gpt2: list[int]) -> list[int]:
        """GPT-2 ids -> compact ids (unseen ones -> unk_id)."""
        return self._to_compact[np.asarray(gpt2, dtype=np.int64)].tolist() if gpt2 else []

    def decode(self, compact: list[int]) -> list[int | None]:
        """Compact ids -> GPT-2 ids; unk -> None; pad dropped."""
        n = len(self.gpt2_ids)
        return [int(self._to_gpt2[i]) if 0 <= i < n else None for i in compact if i != self.pad_id]

    def decode_text(self, compact: list[int], decode_gpt2: Callable[[list[int]], str]) -> str:
        """Compact ids -> text: runs of known ids decoded together (BPE bytes may span tokens), unk as UNK_TEXT."""
        out, run = [], []
        for t in self.decode(compact):
            if t is None:
                out += [decode_gpt2(run), UNK_TEXT]
                run = []
            else:
                run.append(t)
        return "".join([*out, decode_gpt2(run)])

    # Logged beside the model's weights: plain JSON.
    def to_json(self) -> str:
        return json.dumps({"kind": "compact", "gpt2_ids": list(self.gpt2_ids)})

    @classmethod
    def from_json(cls, text: str, source: str = "vocab.json") -> CompactVocab:
        try:
            obj = json.loads(text)
            ids = obj["gpt2_ids"] if isinstance(obj, dict) and obj.get("kind") == "compact" else None
        except (ValueError, KeyError):
            ids = None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise PicollmError(f"{source} is not a compact vocabulary (expected kind compact and a gpt2_ids list)")
        return cls(tuple(ids))

    @classmethod
    def from_file(cls, path: str | Path) -> CompactVocab:
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PicollmError(f"cannot read {path.name}: {str(e).splitlines()[0][:200]}") from None
        return cls.from_json(text, path.name)


def compact_codec(vocab: CompactVocab, files: str | Path | None = None):  # noqa: ANN201  (a prompts.Codec)
    """A prompts.Codec for a compact-vocabulary model: text <-> GPT-2 BPE <-> compact ids."""
    from picollm.prompts import Codec

    codec = Codec("gpt2", GPT2_IDS + 1, files)
    gpt2_encode, gpt2_decode = codec._encode, codec._decode
    codec.vocab_size = vocab.vocab_size
    codec._encode = lambda text: vocab.encode(gpt2_encode(text))
    codec._decode = lambda ids: vocab.decode_text(ids, gpt2_decode)
    return codec


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
