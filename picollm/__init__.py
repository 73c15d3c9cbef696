"""picollm: tiny decoder-only Transformers on synthetic integer sequences, tracked in MLflow."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_model", "Transformer", "__version__"]

if TYPE_CHECKING:
    from picollm.model.transformer import Transformer


def load_model(ref: str, device: str = "cpu") -> Transformer:
    """The torch model behind a registry or run reference: "picollm-linear" (latest version),
    "picollm-linear@champion", "picollm-linear/3", "models:/...", "runs:/RUN_ID/model" or a run id."""
    from picollm.tracking.registry import load_model as _load

    return _load(ref, device)


def __getattr__(name: str) -> Any:  # lazy, so `import picollm` stays cheap
    if name == "Transformer":
        from picollm.model.transformer import Transformer

        return Transformer
    raise AttributeError(name)
