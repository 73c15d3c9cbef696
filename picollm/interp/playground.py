"""The analysis page's playground: the model's weights, embedded in the page, and what its JavaScript forward
pass (playground.js, inlined at render time) needs to run them, so a reader types any prompt and sees the
next-token distribution, every head's mixing weights, the logit lens and the top MLP neurons offline.

Weights travel as float32 little-endian, base64 (URL-safe alphabet, padding stripped: no "/" or "=" that
html_view.external_refs could mistake for a reference) per tensor; the JavaScript computes in float64 from
them, so its logits match the PyTorch model's to float32 rounding (tests/test_playground.py: within 1e-4).
float16 weights would halve the page but move the logits by up to 0.03 (docs/analysis.md). Whether a mixer
can run in the page is the mixer's own declaration (`Mixer.js_forward`); where it cannot, the page says so in
one line.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

from picollm.model.transformer import Transformer

MAX_POSITIONS = 128  # longest prompt the page accepts (the learned position table is cut to this many rows)


@dataclass
class Playground:
    payload: str | None  # the JSON the script reads, or None where the page cannot compute this model
    unsupported: str | None  # the one line the page shows instead
    n_params: int  # floats embedded


def encode(t: torch.Tensor) -> str:
    """A tensor as float32 little-endian bytes in URL-safe base64 without padding."""
    raw = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode(text: str, shape: list[int]) -> torch.Tensor:
    """The inverse of `encode` (what the page's script does), for tests."""
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy()).view(shape)


def _tensors(model: Transformer, max_positions: int) -> dict[str, torch.Tensor]:
    """Every parameter the forward pass reads, by state-dict name; the position table cut to the page's
    longest prompt and a tied head sent once (as the embedding)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "head.weight" and model.cfg.tie_embeddings:
            continue
        out[name] = t[:max_positions] if name == "pos_embed.weight" else t
    return out


def script() -> str:
    """playground.js, to inline in the page."""
    return resources.files(__package__).joinpath("playground.js").read_text(encoding="utf-8")


def build(model: Transformer, default_prompt: list[int] | None = None) -> Playground:
    """The playground's data for `model`, or the line saying why the page cannot run it."""
    cfg = model.cfg
    spec = cfg.mixer.js_forward(cfg)
    if spec is None:
        line = (
            f"The playground cannot run this model: its JavaScript forward pass does not implement "
            f"attention={cfg.attention} with these options."
        )
        return Playground(None, line, 0)
    max_positions = min(MAX_POSITIONS, cfg.max_seq_len) if cfg.pos_encoding == "learned" else MAX_POSITIONS
    tensors = _tensors(model, max_positions)
    assert cfg.vocab_size is not None
    data: dict[str, Any] = {
        "cfg": {
            "attention": cfg.attention,
            "mixer": spec,
            "pattern_label": model.blocks[0].attn.pattern_label,
            "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "d_head": cfg.d_head,
            "d_mlp": cfg.mlp_width,
            "pad_id": cfg.pad_token,
            "pos_encoding": cfg.pos_encoding,
            "tied": cfg.tie_embeddings,
            "ln_eps": model.ln_final.eps,
            "max_positions": max_positions,
        },
        "slopes": [float(s) for s in model.blocks[0].attn.slopes.float().cpu()],  # (H,): ALiBi's, or zeros
        "default_prompt": [int(t) for t in (default_prompt or [])][:max_positions],
        "w": {name: [list(t.shape), encode(t)] for name, t in tensors.items()},
    }
    # "</" inside a script element would end it early (base64 and numbers never hold it; names might not)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return Playground(payload, None, sum(t.numel() for t in tensors.values()))
