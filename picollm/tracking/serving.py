"""MLflow models-from-code entry point: `mlflow.pyfunc.load_model(...)` runs this file.

The logged model holds only a state dict (loaded with weights_only=True), a JSON config and the kind
of tokenizer (and, for a compact-vocabulary text model, its GPT-2 id map `vocab.json`), so loading it
never unpickles code; the picollm package travels with it (`code_paths`).
predict() takes prompts and returns their continuations in the same format: space-separated integers
for the synthetic models, text (GPT-2 BPE) for the DPO/SFT ones. A bad prompt or setting is an
MlflowException with INVALID_PARAMETER_VALUE, which `mlflow models serve` answers as HTTP 400 with
our message (any other exception becomes a generic message and a traceback).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class PicoLLMPyfunc(PythonModel):
    # The explicit signature at log time (with a params schema, which type hints cannot express)
    # validates input; this stops MLflow warning that predict() has no type hints.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:  # noqa: ANN001
        from picollm.data.tokenizers import Codec
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

    # No type hints: MLflow would build a stricter schema from them; the signature is explicit.
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        from picollm.errors import PicollmError
        from picollm.tracking.prompts import continue_prompts

        if hasattr(model_input, "iloc"):  # pandas DataFrame or Series
            model_input = model_input.iloc[:, 0].tolist() if model_input.ndim == 2 else model_input.tolist()
        elif isinstance(model_input, str):
            model_input = [model_input]
        p = params or {}
        try:
            return continue_prompts(
                self.model,
                list(model_input),
                max_new_tokens=int(p.get("max_new_tokens", 8)),
                temperature=float(p.get("temperature", 0.0)),
                top_k=int(p["top_k"]) if p.get("top_k") else None,
                top_p=float(p["top_p"]) if p.get("top_p") not in (None, 1.0) else None,
                seed=int(p.get("seed", 0)),
                codec=self.codec,
            )
        except (PicollmError, ValueError, TypeError) as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(PicoLLMPyfunc())
