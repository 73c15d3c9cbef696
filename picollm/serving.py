"""MLflow models-from-code entry point: `mlflow.pyfunc.load_model(...)` runs this file.

The logged model holds only a state dict (loaded with weights_only=True) and a JSON config, so
loading it never unpickles code. predict() takes prompts of space-separated integers and returns
their continuations in the same format.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class PicoLLMPyfunc(PythonModel):
    # The explicit signature at log time (with a params schema, which type hints cannot express)
    # validates input; this stops MLflow warning that predict() has no type hints.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from picollm.registry import load_from_files

        self.model = load_from_files(context.artifacts["weights"], context.artifacts["config"])

    # No type hints: MLflow would build a stricter schema from them; the signature is explicit.
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        from picollm.registry import continue_prompts

        if hasattr(model_input, "iloc"):  # pandas DataFrame or Series
            model_input = model_input.iloc[:, 0].tolist() if model_input.ndim == 2 else model_input.tolist()
        elif isinstance(model_input, str):
            model_input = [model_input]
        p = params or {}
        return continue_prompts(
            self.model,
            [str(x) for x in model_input],
            max_new_tokens=int(p.get("max_new_tokens", 8)),
            temperature=float(p.get("temperature", 0.0)),
            top_k=int(p["top_k"]) if p.get("top_k") else None,
            top_p=float(p["top_p"]) if p.get("top_p") not in (None, 1.0) else None,
            seed=int(p.get("seed", 0)),
        )


mlflow.models.set_model(PicoLLMPyfunc())
