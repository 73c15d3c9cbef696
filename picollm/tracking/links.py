"""Links into the MLflow UI: a run's charts, an artifact, a runs table, a model version.

The UI is a single-page app whose routes follow `#` (MLflow 3.17's `mlflow/server/js` routes):

    #/experiments/<eid>?workflowType=machine_learning                       the runs table
    #/experiments/<eid>/runs/<rid>/model-metrics?workflowType=...           a run's charts
    #/experiments/<eid>/runs/<rid>/artifacts/<path>?workflowType=...        an artifact, rendered
    #/models/<name>/versions/<version>?workflowType=...                     a model version

MLflow 3 opens an experiment (and the pages under it) in its GenAI mode unless the browser remembers the
"Model training" toggle; `workflowType=machine_learning` chooses the runs view, so every link carries it.
The base is the tracking server when MLflow talks to one over HTTP, else the `make ui` address
(http://127.0.0.1:5000, or UI_PORT's port).

A flow announces each top-level run it opens (`announce`, called by `runs.Session.run`); the CLI listens
(`listen`) to print the run's link while the run works: the library prints nothing itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

RUNS_VIEW = "workflowType=machine_learning"
UI_HOST = "127.0.0.1"
UI_PORT = 5000  # `make ui`'s default (the Makefile's UI_PORT)
RUN_CHARTS_TAB = "model-metrics"
REPORTS = ("report.html", "report.md")  # a run's report, the rendered one first
VERDICT = "verdict.html"  # a compare parent's verdict-first page (picollm.compare.verdict_page)


def ui_base(tracking_uri: str | None = None, env: dict[str, str] | None = None) -> str:
    """The UI's address for `tracking_uri` (default: MLflow's current one): the server itself when it is
    HTTP(S), else the `make ui` address on UI_PORT (from `env`, default the process's environment)."""
    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    port = (os.environ if env is None else env).get("UI_PORT", "").strip() or str(UI_PORT)
    return f"http://{UI_HOST}:{port}"


def runs_table_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?{RUNS_VIEW}"


def run_url(base: str, experiment_id: str, run_id: str, tab: str | None = RUN_CHARTS_TAB) -> str:
    """A run's page, on its charts (`tab=None`: the overview, with the description and metric table)."""
    page = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{page}/{tab}?{RUNS_VIEW}" if tab else f"{page}?{RUNS_VIEW}"


def artifact_url(base: str, experiment_id: str, run_id: str, path: str) -> str:
    """An artifact of a run, opened in the run's artifact viewer (HTML and images render there)."""
    return run_url(base, experiment_id, run_id, f"artifacts/{quote(path.strip('/'))}")


def model_version_url(base: str, name: str, version: str | int) -> str:
    return f"{base.rstrip('/')}/#/models/{quote(name, safe='')}/versions/{version}?{RUNS_VIEW}"


# --------------------------------------------------------------------------------------------------
# A parent's children grouped by a tag: one chart per metric, each group's mean and band

SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: an experiment tag holding a view's state (the UI's "Share")


def grouped_view_key(parent_run_id: str) -> str:
    return f"picollm-{parent_run_id[:12]}"


def grouped_view_state(parent_run_id: str, tag: str, charts: str = "") -> dict[str, object]:
    """The UI state of the runs table showing `parent_run_id`'s children grouped by `tag` (average with a
    band per group, on charts whose names contain `charts`), as MLflow 3.17's shared views store it."""
    return {
        "searchFilter": f"tags.mlflow.parentRunId = '{parent_run_id}'",
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": tag}]},
        "useGroupedValuesInCharts": True,
        "chartsSearchFilter": charts,
    }


def share_grouped_view(experiment_id: str, parent_run_id: str, tag: str, charts: str = "") -> str:
    """Store the grouped view of `parent_run_id`'s children as a shared view of the experiment (what the UI's
    Share button does): `grouped_view_url` opens it. Returns its key."""
    import json

    from mlflow.tracking import MlflowClient

    key = grouped_view_key(parent_run_id)
    state = json.dumps(grouped_view_state(parent_run_id, tag, charts))
    MlflowClient().set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, state)
    return key


def grouped_view_url(base: str, experiment_id: str, key: str) -> str:
    """The runs page in its chart view, with the shared view `key` applied."""
    query = f"viewStateShareKey={key}&compareRunsMode=CHART&{RUNS_VIEW}"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


@dataclass(frozen=True)
class RunLinks:
    """The links of one run: its charts, its report (None without one), its verdict page (a compare parent's)
    and its runs table."""

    run_id: str
    run: str
    runs_table: str
    report: str | None = None
    grouped: str | None = None  # its children grouped by a tag (a compare parent: by variant)
    verdict: str | None = None  # a compare parent's verdict.html


def run_links(run_id: str, base: str | None = None) -> RunLinks:
    """Look `run_id` up in MLflow's current store: its experiment, and its report (REPORTS) and verdict page
    (VERDICT) among its top-level artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    base = base or ui_base()
    eid = client.get_run(run_id).info.experiment_id
    try:
        names = {a.path for a in client.list_artifacts(run_id)}
    except Exception:  # an artifact store that cannot be listed: the run's links are still useful
        names = set()
    report = next((artifact_url(base, eid, run_id, r) for r in REPORTS if r in names), None)
    key = grouped_view_key(run_id)
    shared = SHARED_VIEW_TAG + key in client.get_experiment(eid).tags
    grouped = grouped_view_url(base, eid, key) if shared else None
    verdict = artifact_url(base, eid, run_id, VERDICT) if VERDICT in names else None
    return RunLinks(run_id, run_url(base, eid, run_id), runs_table_url(base, eid), report, grouped, verdict)


# --------------------------------------------------------------------------------------------------
# Announcing runs as they start

Listener = Callable[[str, str, str], None]  # (experiment id, run id, run name)
_listener: list[Listener] = []


def listen(listener: Listener | None) -> None:
    """Have `listener` told of every top-level run a flow opens from now on (None: nobody)."""
    _listener[:] = [listener] if listener is not None else []


def announce(experiment_id: str, run_id: str, run_name: str) -> None:
    """A flow opened a top-level run. A listener's failure never fails the run."""
    for listener in list(_listener):
        try:
            listener(experiment_id, run_id, run_name)
        except Exception:  # a printing problem must not cost a training run
            import logging

            logging.getLogger(__name__).debug("run listener failed", exc_info=True)
