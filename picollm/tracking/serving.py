"""MLflow models-from-code entry point: `mlflow.pyfunc.load_model(...)` runs this file.

The logged model holds only a state dict (loaded with weights_only=True), a JSON config and the kind
of tokenizer (and, for a compact-vocabulary text model, its GPT-2 id map `vocab.json`), so loading it
never unpickles code; the picollm package travels with it (`code_paths`).

predict() takes prompts and returns their continuations in the same format: space-separated integers
for the synthetic models, text (GPT-2 BPE) for the DPO/SFT ones. Every request is checked before any
work, with the CLI's limits (picollm/tracking/limits.py) and the server's (`ServeLimits`, from the
environment when the model is loaded):

- inputs: prompt strings, as a list, a single string, or a one-column table; anything else (a list of
  token lists, numbers, several columns, named inputs, nulls) is refused naming what came;
- params: the signature's (max_new_tokens, temperature, top_k, top_p, seed), each in the CLI's range;
  an unknown one is refused (MLflow drops it with a warning in the server log; we refuse the request);
- cost: at most `max_prompts` prompts, prompts of at most `max_prompt_tokens` tokens (the learned table
  for `learned` models), and `time_budget_s` of generation, after which it stops.

A refused request is an MlflowException that `mlflow models serve` answers with our message only: HTTP 400
(INVALID_PARAMETER_VALUE) for bad input, 504 (DEADLINE_EXCEEDED) past the time budget, 500 for anything
unexpected (its traceback goes to the server log, never into the response).
"""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

log = logging.getLogger("picollm.tracking.serving")

PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")  # the signature's (registry.signature)
_IGNORED = re.compile(r"Unrecognized params (\[.*?\]) are ignored")
_CONTEXT_KEY = "_picollm_ignored_params"


class RequestError(MlflowException):
    """A refused request. Serialised with our message alone: MLflow's scoring server prefixes `message`
    with the whole request ("Failed to predict data '<every prompt>'"), which for a 30 MB prompt would be
    a 30 MB error body."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        from picollm.errors import elide

        super().__init__(elide(message, 1000), error_code=error_code)
        self.reason = self.message

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.reason})


class _IgnoredParams(logging.Handler):
    """Catches MLflow's "Unrecognized params [...] are ignored" warning (logged while it checks the params,
    just before it calls predict, on the same thread and inside the same prediction context) and notes the
    names on that context, where predict finds them."""

    picollm_ignored_params = True

    def emit(self, record: logging.LogRecord) -> None:
        match = _IGNORED.search(record.getMessage())
        if not match:
            return
        from mlflow.pyfunc.context import get_prediction_context

        ctx = get_prediction_context()
        if ctx is None:
            return
        try:
            names = [str(n) for n in ast.literal_eval(match.group(1))]
        except (ValueError, SyntaxError):
            names = [match.group(1)]
        setattr(ctx, _CONTEXT_KEY, sorted(names))


def watch_ignored_params() -> None:
    """Install `_IgnoredParams` once per process, and make sure the warning it reads is emitted."""
    lg = logging.getLogger("mlflow.models.utils")
    if not any(getattr(h, "picollm_ignored_params", False) for h in lg.handlers):
        lg.addHandler(_IgnoredParams())
    if not lg.isEnabledFor(logging.WARNING):
        lg.setLevel(logging.WARNING)


def ignored_params() -> list[str]:
    """The parameters MLflow dropped from this request (and forgets them)."""
    from mlflow.pyfunc.context import get_prediction_context

    ctx = get_prediction_context()
    names = getattr(ctx, _CONTEXT_KEY, None) if ctx is not None else None
    if names is not None:
        delattr(ctx, _CONTEXT_KEY)
    return list(names or [])


def read_prompts(model_input, example: str) -> list[str]:  # noqa: ANN001
    """The prompt strings of any input MLflow hands over (list, string, array, Series, one-column table),
    or a PicollmError saying what came instead and what to send (`example`: a valid prompt)."""
    import numpy as np

    from picollm.errors import PicollmError

    send = f'send prompt strings, e.g. {{"inputs": ["{example}"]}}'
    if hasattr(model_input, "columns"):  # a pandas DataFrame (dataframe_split, dataframe_records, CSV, ...)
        columns = [str(c) for c in model_input.columns]
        if len(columns) != 1:
            raise PicollmError(f"expected one column of prompts, got {len(columns)} ({', '.join(columns)}); {send}")
        model_input = model_input.iloc[:, 0].tolist()
    elif hasattr(model_input, "iloc"):  # a pandas Series
        model_input = model_input.tolist()
    elif isinstance(model_input, np.ndarray):
        if model_input.ndim == 0:
            model_input = [model_input.item()]
        elif model_input.ndim > 1:
            raise PicollmError(
                f"expected a list of prompt strings, got a {model_input.ndim}-d array (a list of lists); {send}"
            )
        else:
            model_input = model_input.tolist()
    elif isinstance(model_input, str):
        model_input = [model_input]
    elif isinstance(model_input, dict):
        names = ", ".join(str(k) for k in model_input)[:200]
        raise PicollmError(f"named inputs ({names}) are not supported; {send}")
    elif not isinstance(model_input, (list, tuple)):
        raise PicollmError(f"expected a list of prompt strings, got {type(model_input).__name__}; {send}")
    prompts = list(model_input)
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            continue
        if p is None:
            raise PicollmError(f"prompt {i + 1} is null; {send}")
        if isinstance(p, (list, tuple, dict, np.ndarray)):
            what = "a list of token lists" if not isinstance(p, dict) else "a list of objects"
            raise PicollmError(f"expected a list of prompt strings, got {what}; {send}")
        raise PicollmError(f"prompt {i + 1} is {type(p).__name__} {p!r}, not a string; {send}")
    return prompts


def _integer(value):  # noqa: ANN001, ANN202
    """numpy integers as int; anything else as it came (the limits' checks name it)."""
    import numpy as np

    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) else value


def _number(value):  # noqa: ANN001, ANN202
    import numpy as np

    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    return float(value) if real else value


class PicoLLMPyfunc(PythonModel):
    # The explicit signature at log time (a params schema, which type hints cannot express; no input schema:
    # `read_prompts` checks the inputs) is what MLflow validates; this stops it warning that predict() has no
    # type hints.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:  # noqa: ANN001
        from picollm.data.tokenizers import Codec, example_prompts
        from picollm.tracking.limits import ServeLimits
        from picollm.tracking.registry import load_from_files

        art = context.artifacts
        self.model = load_from_files(art["weights"], art["config"], art.get("vocab"))
        kind = json.loads(Path(art["tokenizer"]).read_text())["kind"] if "tokenizer" in art else "integers"
        assert self.model.cfg.vocab_size is not None
        if (vocab := getattr(self.model, "text_vocab", None)) is not None:  # text -> GPT-2 ids -> compact ids
            from picollm.data.tokenizers import compact_codec

            self.codec = compact_codec(vocab, art.get("tokenizer_files"))
        else:
            self.codec = Codec(kind, self.model.cfg.vocab_size, art.get("tokenizer_files"))
        self.example = example_prompts(kind, self.model.cfg.vocab_size)[0]
        self.limits = ServeLimits.from_env()
        watch_ignored_params()

    # No type hints: MLflow would build a stricter schema from them; the signature is explicit.
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        from picollm.errors import PicollmError, TimeBudgetExceeded

        try:
            return self._predict(model_input, params or {})
        except TimeBudgetExceeded as e:
            raise RequestError(str(e), DEADLINE_EXCEEDED) from None
        except (PicollmError, ValueError, TypeError) as e:
            raise RequestError(str(e)) from None
        except MlflowException:
            raise
        except Exception as e:  # a bug: the traceback goes to the server log, never into the response
            log.exception("predict failed")
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise RequestError(
                f"internal error ({type(e).__name__}: {first}); see the server log", INTERNAL_ERROR
            ) from None

    def _predict(self, model_input, p: dict) -> list[str]:  # noqa: ANN001
        from picollm.errors import PicollmError
        from picollm.tracking.limits import ENV_MAX_PROMPTS, check_top_k, check_top_p
        from picollm.tracking.prompts import continue_prompts

        if unknown := ignored_params() or sorted(set(p) - set(PARAMS)):
            raise PicollmError(f"unknown parameter(s) {', '.join(unknown)} (known: {', '.join(PARAMS)})")
        prompts = read_prompts(model_input, self.example)
        if len(prompts) > self.limits.max_prompts:
            raise PicollmError(
                f"{len(prompts)} prompts in one request; the served model takes at most "
                f"{self.limits.max_prompts} ({ENV_MAX_PROMPTS})"
            )
        top_k = _integer(p.get("top_k", 0))
        top_p = _number(p.get("top_p", 1.0))
        top_p = check_top_p(top_p)  # before 1.0 is read as "no limit": 2 is refused, not ignored
        return continue_prompts(
            self.model,
            prompts,
            max_new_tokens=_integer(p.get("max_new_tokens", 8)),
            temperature=_number(p.get("temperature", 0.0)),
            top_k=None if top_k == 0 else check_top_k(top_k),  # 0, the signature's default: no limit
            top_p=None if top_p == 1.0 else top_p,
            seed=_integer(p.get("seed", 0)),
            codec=self.codec,
            max_prompt_tokens=self.limits.max_prompt_tokens,
            time_budget_s=self.limits.time_budget_s,
        )


mlflow.models.set_model(PicoLLMPyfunc())
