"""What a flow reports its progress to: lines, its parts (runs, trials, sections, phases) and, through the
trainer's callbacks, their steps. The CLI's reporter (pipelines/progress.py) draws them as one bar with an ETA;
`as_progress` turns a plain line callback (or nothing: logging) into one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from picollm.training.trainer import NullCallbacks

log = logging.getLogger(__name__)


class FlowProgress(Protocol):
    """What a flow reports to; `picollm.training.trainer.TrainCallbacks` for the steps."""

    def __call__(self, msg: str) -> None: ...
    def plan(self, parts: int, unit: str = "parts") -> None: ...
    def part(self, label: str, done: int | None = None) -> None: ...
    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float] | None) -> None: ...
    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None: ...


class LineProgress(NullCallbacks):
    """A plain line callback (or logging) as a FlowProgress: parts become lines, steps are ignored."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.say = say or (lambda msg: log.info("%s", msg))
        self.parts, self.done = 0, 0

    def __call__(self, msg: str) -> None:
        self.say(msg)

    def plan(self, parts: int, unit: str = "parts") -> None:
        self.parts, self.done = parts, 0

    def part(self, label: str, done: int | None = None) -> None:
        self.done = self.done + 1 if done is None else done + 1
        self.say(f"{label} ({self.done}/{self.parts})" if self.parts else label)


def as_progress(progress: FlowProgress | Callable[[str], None] | None) -> FlowProgress:
    """A flow's `progress` argument as a FlowProgress (a bare callable or None: lines only)."""
    if progress is not None and hasattr(progress, "plan"):
        return progress  # type: ignore[return-value]
    return LineProgress(progress)
