"""Prompts in, continuations out: the text interface of a trained model (CLI, pyfunc, serving).

Two tokenizers, chosen when the model is logged (`registry.log_model(tokenizer=...)`):
- `integers`: the synthetic models; a prompt is space-separated integers ("2 4 6 8"), so is the answer;
- `gpt2`: the DPO/SFT text models; GPT-2 BPE from tiktoken plus the pad token as the last id. The
  logged model carries tiktoken's GPT-2 files (`tokenizer/`), so a server without internet can load it.

Every problem with a prompt is a `PicollmError` naming it; the pyfunc turns those into HTTP 400.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from picollm.data import pad_sequences, parse_prompt
from picollm.errors import PicollmError
from picollm.model import Transformer

log = logging.getLogger(__name__)

TOKENIZERS = ("integers", "gpt2")
# The files tiktoken's "gpt2" encoding reads, cached under sha1(url) (tiktoken.load.read_file_cached).
GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


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
    from picollm.text_data import StoryTokenizer

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
            from picollm.text_data import StoryTokenizer

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


def continue_prompts(
    model: Transformer,
    prompts: list[str],
    max_new_tokens: int = 8,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    codec: Codec | None = None,
) -> list[str]:
    """Prompts -> their continuations (in the same format), batched. Integer prompts unless `codec`."""
    if max_new_tokens < 1:
        raise PicollmError("max_new_tokens must be at least 1")
    vocab = model.cfg.vocab_size
    assert vocab is not None
    codec = codec or Codec("integers", vocab)
    ids = [codec.encode(p) for p in prompts]
    if not ids:
        return []
    longest = max(len(i) for i in ids) + max_new_tokens
    if model.cfg.pos_encoding == "learned" and longest > model.cfg.max_seq_len:
        raise PicollmError(
            f"prompt plus {max_new_tokens} new tokens ({longest}) exceeds the model's "
            f"max_seq_len ({model.cfg.max_seq_len})"
        )
    tokens = pad_sequences(ids, model.pad_id, side="left").to(model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = model.generate(tokens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    return [codec.decode(row[tokens.shape[1] :].tolist()) for row in out]
