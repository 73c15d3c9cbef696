"""What a generation request may ask for: one set of limits for `picollm generate` and the served model.

The CLI declares its options with these bounds and checks them with these functions (its usage errors
carry the same messages); the pyfunc (`picollm/tracking/serving.py`, what `mlflow models serve` runs)
checks every REST parameter with them before any work, so a request the CLI would refuse is an HTTP 400.

Sampling (both):  1 <= max_new_tokens <= MAX_NEW_TOKENS; temperature finite and >= 0; top_k >= 1 (None,
or 0 over REST, = no limit); 0 <= top_p <= 1 (0 keeps only the best token; None, or 1 over REST, = no
limit); 0 <= seed <= MAX_SEED.

Serving only (`ServeLimits`, read from the environment when the model is loaded):
- PICOLLM_SERVE_MAX_PROMPT_TOKENS (default 1024): the longest prompt, in tokens, of a model without a
  learned positional table (alibi, none, sinusoidal). A `learned` model's limit is its table: prompt plus
  new tokens <= model.max_seq_len.
- PICOLLM_SERVE_MAX_PROMPTS (default 16): prompts in one request. Reading the prompts (at most max_prompts x
  max_prompt_tokens positions; about a second at the defaults) is the one step the time budget cannot stop.
- PICOLLM_SERVE_TIME_BUDGET_S (default 30): the wall time one request may generate for; past it the
  generation stops, the request is answered 504 and the worker takes the next one.

No torch and no MLflow here: the CLI imports this module at start-up.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from picollm.errors import PicollmError

MAX_NEW_TOKENS = 4096  # each new token is one decoding step (and a KV-cache entry per layer)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range

ENV_MAX_PROMPT_TOKENS = "PICOLLM_SERVE_MAX_PROMPT_TOKENS"
ENV_MAX_PROMPTS = "PICOLLM_SERVE_MAX_PROMPTS"
ENV_TIME_BUDGET_S = "PICOLLM_SERVE_TIME_BUDGET_S"


def check_max_new_tokens(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PicollmError(f"max_new_tokens must be an integer, got {value!r}")
    if value < 1:
        raise PicollmError(f"max_new_tokens must be at least 1, got {value}")
    if value > MAX_NEW_TOKENS:
        raise PicollmError(f"max_new_tokens must be at most {MAX_NEW_TOKENS}, got {value}")
    return value


def check_temperature(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PicollmError(f"temperature must be a finite number >= 0 (0 = greedy), got {value!r}")
    return float(value)


def check_top_k(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PicollmError(f"top_k must be an integer >= 1 (a value above the vocabulary = no limit), got {value!r}")
    return value


def check_top_p(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:  # NaN fails too
        raise PicollmError(f"top_p must be between 0 and 1 (0 keeps only the best token), got {value!r}")
    return float(value)


def check_seed(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise PicollmError(f"seed must be an integer in 0..2^63-1, got {value!r}")
    return value


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int
) -> tuple[int, float, int | None, float | None, int]:
    """Every sampling setting checked (PicollmError naming the first bad one); returns them normalised."""
    return (
        check_max_new_tokens(max_new_tokens),
        check_temperature(temperature),
        check_top_k(top_k),
        check_top_p(top_p),
        check_seed(seed),
    )


@dataclass(frozen=True)
class ServeLimits:
    """What one request to the served model may cost (see the module docstring)."""

    max_prompt_tokens: int = 1024
    max_prompts: int = 16
    time_budget_s: float = 30.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServeLimits:
        """The limits from PICOLLM_SERVE_* (unset: the defaults); a bad value is a PicollmError naming it."""
        env = dict(os.environ if env is None else env)
        defaults = cls()

        def read(name: str, default: float, integer: bool) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw) if integer else float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value <= 0:
                kind = "a positive integer" if integer else "a positive number of seconds"
                raise PicollmError(f"{name} must be {kind}, got {raw!r}")
            return value

        return cls(
            max_prompt_tokens=int(read(ENV_MAX_PROMPT_TOKENS, defaults.max_prompt_tokens, True)),
            max_prompts=int(read(ENV_MAX_PROMPTS, defaults.max_prompts, True)),
            time_budget_s=read(ENV_TIME_BUDGET_S, defaults.time_budget_s, False),
        )
