"""Token mixers: one module per family, one registry.

Each `model.attention` value names a class below; the Transformer builds `mixer_class(cfg.attention)(cfg)`
as every block's `attn`. A mixer (base.Mixer) owns its parameters, its forms (the recurrent reference and
the fast ones), its hook pattern, its fused decode step, its state size and the config options it reads.
Adding a mixer is one module and one line here (docs/contributing.md, "Add a mixer"); no other code
branches on a mixer's name.

This module imports nothing heavy: the config validates names against `MIXERS` without importing torch,
and a class is imported when it is first asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:Class" under picollm.model.mixers
MIXERS: dict[str, str] = {
    "softmax": "softmax:Softmax",
    "sliding_window": "softmax:SlidingWindow",
    "linear": "linear:Linear",
    "gated_linear": "linear:GatedLinear",
    "deltanet": "deltanet:DeltaNet",
    "gated_deltanet": "deltanet:GatedDeltaNet",
    "retention": "retention:Retention",
}
DEFAULT = "softmax"  # model.attention's default
REFERENCE_PAIR = ("softmax", "linear")  # what `compare` and `bench` set side by side unless told otherwise


def names() -> tuple[str, ...]:
    return tuple(MIXERS)


def mixer_class(name: str) -> Any:
    """The class registered as `name`, a base.Mixer subclass (importing its module, hence torch)."""
    try:
        module, cls = MIXERS[name].split(":")
    except KeyError:
        raise KeyError(f"unknown mixer {name!r} (known: {', '.join(MIXERS)})") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def state_floats(cfg: Any, context: int) -> int:
    """Floats of generation state per layer and sequence after `context` positions (KV cache or S, z) of the
    model config `cfg`, with the short convolution's last k-1 inputs."""
    conv = cfg.d_model * (cfg.short_conv - 1) if cfg.short_conv else 0
    return mixer_class(cfg.attention).state_floats(cfg, context) + conv
