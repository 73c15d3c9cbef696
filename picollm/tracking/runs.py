"""The run scaffold every flow enters once, and the MLflow training callbacks.

A flow's lifecycle is always the same (as in torchtune's recipes):

    with runs.session("compare", cfg.tracking, device=..., num_threads=...) as s:  # setup
        ...                              # everything that can fail on the user's input: no run yet
        with s.run(run_name, config=cfg, tags=...) as r:                        # the tracked part
            r.log_metrics(...); r.log_figure(...); r.log_model(...)
                                                                                # cleanup on exit

`session` refuses torchrun where a flow can't use it, joins the process group where it can,
initialises the store (rank 0), applies the thread count and picks the device, all in one place.
`Session.run` opens a run (nested or not, new or resumed) that always closes with the right status
(`tracking.tracked_run`), logs the flattened params, the hardware and the resolved config, and hands
back a `RunLog` through which metrics (batched), figures (logged, then closed), texts, tables and
models go.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric
from pydantic import BaseModel

from picollm.config import TrackingConfig, flatten, to_yaml
from picollm.runtime import distributed
from picollm.runtime.distributed import DistContext
from picollm.tracking import links
from picollm.tracking import store as tracking

log = logging.getLogger(__name__)

CHECKPOINT_PATH = "checkpoints/checkpoint.pt"  # the resumable checkpoint's artifact path in a training run
# MLflow's chart view draws a metric whose last value is at step 0 as a bar chart and any other as a line:
# one-off values (test metrics, summaries) go at step 0, so they are bars rather than a single dot.
SINGLE_VALUE_STEP = 0
# MLflow's log_model links every metric logged at its `step` to the model (at step 0: whatever a run logs
# first). Nothing is logged at this step, so only the metrics `RunLog.log_model(link=...)` names are linked.
UNLINKED_STEP = -1
# Bookkeeping (the matmul peak, epoch counts, a flow's seconds) goes under this prefix: MLflow 3.17's run page
# shows `system/...` keys on its *System metrics* tab (beside MLflow's own samples), and the experiment's chart
# view puts them in the last section, so a run's first chart is a result. (`sys/` would sort before `test/`, and
# MLflow refuses key names with `~` or other characters that sort after lowercase letters.)
BOOKKEEPING = "system/"
FIGURE_DPI = 150  # MLflow's default (100) leaves 8-panel figures' labels unreadable in the UI


def unique_name(base: str) -> str:
    """`base` plus a short UTC timestamp (`linear-alibi-seed0-1201-1305`): re-running a config gives runs
    that chart legends and the runs table tell apart (MLflow allows duplicate names)."""
    return f"{base}-{time.strftime('%m%d-%H%M%S', time.gmtime())}"


class RunLog:
    """What a flow logs to its open run. Metrics are buffered (one `log_batch` per flush) and the
    latest value of each is kept in `metrics`; every artifact path logged is kept in `artifacts`."""

    def __init__(self, active: mlflow.ActiveRun) -> None:
        self.active = active
        self.run_id: str = active.info.run_id
        self.metrics: dict[str, float] = {}
        self.artifacts: list[str] = []
        self.figure_files: dict[str, bytes] = {}  # artifact path -> PNG, of the figures logged
        self._logger = tracking.MetricLogger(self.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        tracking.log_params(params)

    def log_config(self, cfg: BaseModel, path: str = "config.yaml", prefix: str = "", exclude: set[str] | None = None):
        """Flattened params of `cfg` (less `exclude`, keys under `prefix`) and its resolved YAML."""
        self.log_params(flatten(cfg.model_dump(mode="json", exclude=exclude), prefix=prefix))
        self.log_text(to_yaml(cfg), path)

    def set_tags(self, tags: dict[str, str]) -> None:
        tracking.store_write(mlflow.set_tags, tags, what="tagging the run")  # retried while SQLite is locked

    def log_metrics(self, metrics: dict[str, float], step: int = 0, flush: bool = False) -> None:
        if metrics:
            self.metrics.update(metrics)
            self._logger.log(metrics, step)
        if flush:
            self.flush()

    def flush(self) -> None:
        self._logger.flush()

    def log_figure(self, fig: Any, path: str) -> None:
        """Log a matplotlib figure as PNG and close it (open figures pile up in long flows). At FIGURE_DPI,
        cropped to its content: multi-panel figures stay legible in MLflow's artifact viewer. The bytes
        are kept (`figure_files`) for reports that inline them."""
        import matplotlib.pyplot as plt  # imported when a figure is logged, not at start-up

        try:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        finally:
            plt.close(fig)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / Path(path).name
            file.write_bytes(buf.getvalue())
            with tracking.deferred_signals():
                mlflow.log_artifact(str(file), artifact_path=str(Path(path).parent) if "/" in path else None)
        self.figure_files[path] = buf.getvalue()
        self.artifacts.append(path)

    def log_text(self, text: str, path: str) -> None:
        tracking.store_write(mlflow.log_text, text, path, what="logging a text")  # looks the run up: locks
        self.artifacts.append(path)

    def log_table(self, columns: dict[str, list[Any]], path: str) -> None:
        """Columns as an MLflow table (a `.json` artifact the UI shows as a table)."""
        tracking.store_write(mlflow.log_table, columns, path, what="logging a table")
        self.artifacts.append(path)

    def log_csv(self, rows: list[dict[str, Any]], path: str) -> None:
        """Rows as CSV, floats to 6 significant digits."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        self.log_text(buf.getvalue(), path)

    def log_model(
        self,
        model: torch.nn.Module,
        registered_name: str | None,
        *,
        tokenizer: str = "integers",
        link: Iterable[str] = (),
        name: str = "model",
    ) -> tuple[str, str | None]:
        """Log the model as `name` (and register it under `registered_name` unless None): (model URI, version).
        The latest values of the metrics named in `link` (the final test and val metrics), already
        logged, are linked to it in that order: the model page and the Models tab show those columns."""
        from picollm.tracking.registry import log_model

        self.flush()  # what was logged must be in the store before `_link` looks for it
        logged = log_model(model, registered_name, tokenizer, step=UNLINKED_STEP, name=name)
        if logged.version:
            mlflow.set_tag("registered_model", f"{registered_name}/{logged.version}")
        self._link(list(dict.fromkeys(link)), logged.model_id)
        return logged.uri, logged.version

    def _link(self, keys: list[str], model_id: str) -> None:
        """Re-log the latest entry of each of `keys` with `model_id`, as MLflow's log_model does for the
        metrics at its `step`: the store keeps one row per (key, timestamp, step, value) and records the link."""
        client = mlflow.MlflowClient()
        entries = []
        for key in keys:
            history = [m for m in client.get_metric_history(self.run_id, key) if m.model_id is None]
            if history:
                m = max(history, key=lambda m: (m.step, m.timestamp))
                entries.append(Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=self.run_id))
        with tracking.deferred_signals():
            for i in range(0, len(entries), 1000):  # log_batch's limit
                client.log_batch(self.run_id, metrics=entries[i : i + 1000])


@dataclass
class Session:
    """What `session` set up: the flow, its store, device and (under torchrun) process group."""

    flow: str
    tracking: TrackingConfig
    device: torch.device
    dist: DistContext = field(default_factory=DistContext)
    uri: str | None = None  # None on DDP ranks other than 0: they never talk to MLflow

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def hardware_params(self) -> dict[str, Any]:
        return {"hardware.device": str(self.device), "hardware.torch_threads": torch.get_num_threads()}

    @contextmanager
    def run(
        self,
        run_name: str | None = None,
        *,
        config: BaseModel | None = None,
        config_path: str = "config.yaml",
        param_prefix: str = "",
        param_exclude: set[str] | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        nested: bool = False,
        run_id: str | None = None,
        system_metrics: bool = False,
    ) -> Iterator[RunLog]:
        """Open (or, with `run_id`, resume) a run in the session's experiment, tagged with the flow.
        Given a `config`, its flattened params, the hardware and the resolved YAML are logged first.
        Buffered metrics are flushed on every way out, so what was measured before a failure is kept.
        `system_metrics`: MLflow samples CPU, memory (and GPU) as `system/...` metrics while the run is open."""
        assert self.uri is not None, "only rank 0 opens runs"
        tracking.init_tracking(self.uri)  # again: a flow may have pointed MLflow at another store meanwhile
        # A resumed run keeps its flow tag (compare re-enters the child runs that training opened).
        all_tags = dict(tags or {}) if run_id else {"picollm.flow": self.flow, **(tags or {})}
        with (
            _system_metrics(system_metrics),
            tracking.tracked_run(self.tracking.experiment, run_name, run_id, all_tags, nested) as active,
        ):
            out = RunLog(active)
            if not nested:  # the CLI prints its link while it works
                links.announce(active.info.experiment_id, out.run_id, active.info.run_name or "")
            try:
                if config is not None:
                    out.log_config(config, config_path, param_prefix, param_exclude)
                    out.log_params(self.hardware_params())
                if params:
                    out.log_params(params)
                yield out
            except BaseException as e:
                if not isinstance(e, tracking.StoreUnavailable):  # else it would wait for the lock once more
                    # After Ctrl-C a locked store gets one short try: the user is waiting for the exit.
                    _flush_quietly(out, 2.0 if isinstance(e, KeyboardInterrupt) else None)
                raise
            else:
                out.flush()  # after a clean run a store failure must fail the run, not lose its metrics


@contextmanager
def _system_metrics(enabled: bool) -> Iterator[None]:
    """MLflow starts its system-metrics monitor in start_run when this variable is true (end_run stops
    it); set only around a run that asked for it, so later runs keep their own choice."""
    if not enabled:  # MLflow's own default (or the user's MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING) applies
        yield
        return
    var = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
    before = os.environ.get(var)
    os.environ[var] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before


def _flush_quietly(out: RunLog, budget_s: float | None = None) -> None:
    try:
        out._logger.flush(budget_s)
    except Exception as e:  # a broken store: the run's own error (if any) is the one to report
        log.debug("could not flush the run's metrics: %s", tracking.first_line(e))


@contextmanager
def session(
    flow: str,
    tracking_cfg: TrackingConfig,
    *,
    device: str = "cpu",
    num_threads: int | None = None,
    distributed_ok: bool = False,
) -> Iterator[Session]:
    """Set a flow up: refuse torchrun unless `distributed_ok`, join the process group (if any), apply
    `num_threads`, pick the device and initialise the store on rank 0. A store that does not answer is
    one clear error before any work starts (on every rank: rank 0 shares its failure)."""
    if not distributed_ok:
        distributed.refuse_under_torchrun(flow)
    if num_threads:
        torch.set_num_threads(num_threads)
    ctx, dev = distributed.setup(device)
    try:
        uri, failure = None, None
        if ctx.is_main:
            try:
                uri = tracking.init_tracking(
                    tracking_cfg.uri,
                    lock_timeout_s=tracking_cfg.lock_timeout_s,
                    http_timeout_s=tracking_cfg.http_timeout_s,
                )
            except Exception as e:
                failure = e
        distributed.share_failure(ctx, failure)
        yield Session(flow, tracking_cfg, dev, ctx, uri)
    except BaseException:
        distributed.teardown(ctx, clean=False)
        raise
    else:
        distributed.teardown(ctx)
