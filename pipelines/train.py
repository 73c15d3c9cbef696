"""Flow: build data, train one model, evaluate, log everything to MLflow, register the model.

Runs under torchrun too (DDP): every rank trains, rank 0 tracks (see picollm.train_run)."""

from __future__ import annotations

from picollm.config import TrainRunConfig
from picollm.runtime import timing
from picollm.tracking import runs
from picollm.training import run as train_run
from picollm.training.run import TrainOutcome
from picollm.training.trainer import TrainCallbacks


def run(cfg: TrainRunConfig, resume: str | None = None, ui: TrainCallbacks | None = None) -> TrainOutcome:
    """Train, evaluate, log and register; `resume` continues that run id from its last checkpoint."""
    t = cfg.train
    with runs.session("train", cfg.tracking, device=t.device, num_threads=t.num_threads, distributed_ok=True) as s:
        # The process's age here is its start-up: interpreter, imports, config, store set-up.
        return train_run.train(s, cfg, resume=resume, ui=ui, startup_s=timing.process_age_s() or 0.0)
