"""Weights in and out without unpickling code: a state dict read with weights_only=True, with one clear line
for a damaged or foreign file, and a model built from a state dict and its config."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from picollm.errors import PicollmError
from picollm.model.config import ModelConfig
from picollm.model.transformer import Transformer


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True (nothing but tensors and plain containers is ever
    unpickled); a damaged or foreign file is one clear PicollmError."""
    path = Path(path)
    if not path.is_file():
        raise PicollmError(f"weights file not found: {path}")
    if (why := _not_a_torch_file(path)) is not None:
        raise PicollmError(f"cannot load {path.name}: {why}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PicollmError(f"cannot load {path.name}: {_load_failure(e)}") from None
    if not isinstance(state, dict):
        raise PicollmError(f"cannot load {path.name}: it holds a {type(state).__name__}, not a state dict")
    return state


def _not_a_torch_file(path: str | Path) -> str | None:
    """Why `path` cannot be a torch file by its first bytes, or None: `torch.save` writes a zip archive ("PK")
    and older torch a pickle (0x80, protocol 2-5). Anything else (random bytes, text, another format) would
    reach torch's weights-only unpickler, whose refusal reads as if the file held pickled objects."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return None  # load_state_dict names it
    if not head:
        return "the file is empty"
    if head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return None
    return "it is not a torch file (neither a torch.save archive nor a pickle: random bytes or another format)"


def _load_failure(e: Exception) -> str:
    text = str(e).strip()
    if "Weights only load failed" in text:
        return "it holds pickled objects other than tensors (refused: loading never unpickles code)"
    if isinstance(e, EOFError) or any(
        m in text for m in ("PytorchStreamReader", "central directory", "invalid load key", "truncated")
    ):
        return "the file is truncated or corrupted"
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def build_from_state(state: dict[str, Any], cfg: ModelConfig, source: str = "weights") -> Transformer:
    model = Transformer(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).splitlines()
        hint = next((ln.strip() for ln in detail[1:] if ln.strip()), detail[0])
        raise PicollmError(f"{source} do not match the model config: {hint[:200]}") from None
    return model.eval()
