"""Descriptions that carry a run's headline: the runs' notes (MLflow's `mlflow.note.content` tag, shown as the
run's *Description*), the model versions' descriptions and metric tags, and the names logged models get.

Each headline is one line built from the numbers the run logged, so that the runs table, the run page and the
registry answer "how good is it?" without opening anything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

NOTE_TAG = "mlflow.note.content"  # MLflow's run description
# The metrics a model version carries as tags (the registry's pages and `picollm models list` show them).
VERSION_METRICS = ("test/accuracy", "test/accuracy_vs_ceiling", "test/loss")


def _num(metrics: Mapping[str, float], key: str) -> float | None:
    v = metrics.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def training_note(metrics: Mapping[str, float], prefix: str = "test") -> str:
    """ "test accuracy 0.838 = 0.962 of the Bayes ceiling, test loss 0.512" from a run's final metrics
    (missing parts are left out)."""
    parts = []
    if (acc := _num(metrics, f"{prefix}/accuracy")) is not None:
        part = f"{prefix} accuracy {acc:.3f}"
        if (rel := _num(metrics, f"{prefix}/accuracy_vs_ceiling")) is not None:
            part += f" = {rel:.3f} of the Bayes ceiling"
        parts.append(part)
    if (loss := _num(metrics, f"{prefix}/loss")) is not None:
        parts.append(f"{prefix} loss {loss:.3f}")
    return ", ".join(parts) or "no test metrics"


def contrast_note(rows: Sequence[Mapping[str, str]], limit: int = 1) -> str:
    """The primary contrast(s) of a comparison from its headline rows (as the compare summary gives them:
    "metric", "variant", "baseline", "diff", "p" and "verdict", any of them missing):
    "linear − softmax: test loss (NLL) +0.026 ± 0.004, Holm p 0.002 (softmax better)". The first `limit`
    rows per variant."""
    lines, seen = [], {}
    for r in rows:
        v = r.get("variant", "")
        seen[v] = seen.get(v, 0) + 1
        if seen[v] > limit:
            continue
        head = f"{v} − {r['baseline']}: " if v and r.get("baseline") else ""
        line = f"{head}{r.get('metric', '?')} {r.get('diff', '-')}"
        if (p := r.get("p")) not in (None, "", "-"):
            line += f", Holm p {p}"
        if verdict := r.get("verdict"):
            line += f" ({verdict})"
        lines.append(line)
    return "; ".join(lines) or "no comparison rows"


def model_name(registered: str | None, attention: str, n_layers: int) -> str:
    """The name a logged model gets: its registered name, else what it is (`<mixer>-<layers>L`). MLflow
    allows letters, digits, `-`, `_` and `.` in it."""
    name = registered or f"{attention}-{n_layers}L"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def version_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    return {k: f"{v:.4f}" for k in VERSION_METRICS if (v := _num(metrics, k)) is not None}


def describe_version(name: str, version: str, headline: str, metrics: Mapping[str, float]) -> None:
    """A model version's description (its headline) and its test metrics as tags."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.update_model_version(name, version, description=headline)
    for key, value in version_tags(metrics).items():
        client.set_model_version_tag(name, version, key, value)
