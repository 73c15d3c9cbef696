"""`make ui`'s banner: the URLs that open each experiment's runs table in the MLflow UI.

MLflow 3 opens an experiment on its GenAI overview (traces, token usage) unless the browser remembers
the "Model training" toggle; no experiment tag or server setting changes that default (the UI reads the
`workflowType` query parameter, then its local storage), so the URLs carry `?workflowType=machine_learning`.

    python -m pipelines.ui_url STORE_URI BASE_URL
"""

from __future__ import annotations

import sys
from pathlib import Path

from picollm.tracking.links import RUNS_VIEW, runs_table_url


def experiment_urls(store_uri: str, base: str) -> list[tuple[str, str]]:
    """(experiment name, runs-table URL) of every experiment with runs in the store; none if it does not
    exist yet (a SQLite file is not created just to list it)."""
    if store_uri.startswith("sqlite:///") and not Path(store_uri.removeprefix("sqlite:///")).is_file():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_uri)
    out = []
    for exp in client.search_experiments():
        if exp.name != "Default" or client.search_runs([exp.experiment_id], max_results=1):
            out.append((exp.name, runs_table_url(base, exp.experiment_id)))
    return out


def main(argv: list[str]) -> int:
    store, base = argv[1], argv[2]
    urls = experiment_urls(store, base)
    print(f"MLflow UI on {store}: {base}  (runs tables below; the UI starts in a few seconds)")
    for name, url in urls or [("(no experiments yet)", f"{base.rstrip('/')}/#/experiments?{RUNS_VIEW}")]:
        print(f"  {name:<28} {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
