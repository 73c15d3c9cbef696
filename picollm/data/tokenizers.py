"""Tokenizers: text <-> token ids for every model picollm trains, in one place.

- `parse_prompt`: the synthetic models' prompts, space-separated integers ("2 4 6 8");
- `StoryTokenizer`: GPT-2 BPE (tiktoken) plus one pad token, for the DPO/SFT text models; the logged model
  carries tiktoken's GPT-2 files (`bundle_gpt2_files`), so a server without internet can load it;
- `CompactVocab`: the GPT-2 ids the training stories use, plus unk and pad (a smaller output head);
- `Codec`: the one a logged model reads prompts with (`integers` or `gpt2`, chosen when it is logged), and
  `compact_codec` for a compact-vocabulary model.

Every problem with a prompt is a `PicollmError` naming it; the pyfunc turns those into HTTP 400.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from picollm.errors import PicollmError

log = logging.getLogger(__name__)

TOKENIZERS = ("integers", "gpt2")
# The files tiktoken's "gpt2" encoding reads, cached under sha1(url) (tiktoken.load.read_file_cached).
GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


_INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_prompt(text: str, vocab_size: int) -> list[int]:
    """'2 4 6 8' -> [2, 4, 6, 8]; every value must be a token in [0, vocab_size-2]."""
    parts = text.replace(",", " ").split()
    if not parts:
        raise PicollmError("prompt is empty: give space-separated integers, e.g. '2 4 6 8'")
    out = []
    for p in parts:
        if not _INTEGER.fullmatch(p):  # int() would also take '1_0', '١' or ' +1'
            raise PicollmError(f"prompt token {p!r} is not an integer")
        v = int(p)
        if not 0 <= v <= vocab_size - 2:
            raise PicollmError(f"prompt token {v} is outside the model's values 0..{vocab_size - 2}")
        out.append(v)
    return out


# --------------------------------------------------------------------------------------------------
# GPT-2


class StoryTokenizer:
    """GPT-2 BPE (tiktoken) plus one pad token as the last id: vocab 50258, pad 50257."""

    VOCAB_SIZE = 50258

    def __init__(self) -> None:
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no TIKTOKEN_CACHE_DIR holding the ranks
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise PicollmError(
                f"cannot load the GPT-2 tokenizer ({first}); with no internet, point TIKTOKEN_CACHE_DIR "
                "at a folder holding tiktoken's gpt2 files"
            ) from None
        self.pad_id = self.enc.n_vocab
        self.vocab_size = self.enc.n_vocab + 1

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a story that contains "<|endoftext|>" is text, not a special token.
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([i for i in ids if i != self.pad_id])


def _cache_key(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()


def tiktoken_cache_dir() -> Path:
    """Where tiktoken keeps its downloads in this environment (its own lookup order)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def bundle_gpt2_files(directory: Path) -> Path | None:
    """Copy tiktoken's cached GPT-2 files into `directory`; None (with a warning) if they are not cached,
    in which case a loading environment downloads them itself."""
    StoryTokenizer()  # makes sure they are cached (downloads them once where there is a network)
    cache = tiktoken_cache_dir()
    files = [cache / _cache_key(u) for u in GPT2_URLS]
    if not all(f.is_file() for f in files):
        log.warning("tiktoken's GPT-2 files are not in %s: the logged model will download them when loaded", cache)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, directory / f.name)
    return directory


@contextmanager
def _tiktoken_cache(directory: str | Path | None) -> Iterator[None]:
    """Point tiktoken at `directory` (the model's bundled files) while the encoding is built."""
    if directory is None:
        yield
        return
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = before


class Codec:
    """Prompt text <-> token ids for one model."""

    def __init__(self, kind: str, vocab_size: int, files: str | Path | None = None) -> None:
        if kind not in TOKENIZERS:
            raise PicollmError(f"unknown tokenizer {kind!r} (known: {', '.join(TOKENIZERS)})")
        self.kind, self.vocab_size = kind, vocab_size
        self._encode: Callable[[str], list[int]] = lambda text: parse_prompt(text, vocab_size)
        self._decode: Callable[[list[int]], str] = lambda ids: " ".join(str(t) for t in ids)
        if kind == "gpt2":
            with _tiktoken_cache(files):
                tok = StoryTokenizer()
            if tok.vocab_size != vocab_size:
                raise PicollmError(f"the model's vocabulary ({vocab_size}) is not GPT-2's plus a pad")
            self._encode, self._decode = tok.encode, tok.decode

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise PicollmError(f"a prompt must be a string, got {type(text).__name__}")
        ids = self._encode(text)
        if not ids:
            raise PicollmError("prompt is empty")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)


def example_prompts(kind: str, vocab_size: int) -> list[str]:
    """The logged model's input example: a prompt valid for its tokenizer and vocabulary."""
    if kind == "gpt2":
        return ["Once upon a time, there was a little dog"]
    return [" ".join(str(i % (vocab_size - 1)) for i in (2, 4, 6, 8))]


# --------------------------------------------------------------------------------------------------
# A compact vocabulary for the text models: the GPT-2 ids the training stories use, plus unk and pad.
#
# The tokenizer stays GPT-2 BPE (tiktoken); only the model's id space shrinks. On the shared 2,316-story
# TinyStories sample the training stories use about 6,400 of GPT-2's 50,257 ids, so the output head (and
# its softmax), which dominates a small model's cost, is ~8x smaller. Compact ids:
#
#   0 .. n-1   the GPT-2 ids seen in the training stories, in increasing GPT-2 order
#   n          unk: any other GPT-2 id (a val/test story may use one the training stories never did)
#   n + 1      pad (the last id, as picollm's models expect)
#
# The trade-off: the model can never emit a token the training stories lack (it could not have learned one
# anyway), and a prompt's unseen tokens all read as unk. The map travels with a logged model as
# `vocab.json` (plain JSON, no pickle); a loaded model carries it as `model.text_vocab`.

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


def compact_codec(vocab: CompactVocab, files: str | Path | None = None) -> Codec:
    """A Codec for a compact-vocabulary model: text <-> GPT-2 BPE <-> compact ids."""
    codec = Codec("gpt2", GPT2_IDS + 1, files)
    gpt2_encode, gpt2_decode = codec._encode, codec._decode
    codec.vocab_size = vocab.vocab_size
    codec._encode = lambda text: vocab.encode(gpt2_encode(text))
    codec._decode = lambda ids: vocab.decode_text(ids, gpt2_decode)
    return codec
