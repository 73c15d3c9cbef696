"""Where a command's wall time goes: a stopwatch of named phases, logged as `time/<phase>_s`.

A training run logs `time/startup_s` (`picollm train`: process start to the run's first line of work:
interpreter, imports, config, store set-up; 0 for runs started inside a longer process: compare, sweep),
`time/data_s` (data and ceilings, or their cache), `time/setup_s` (model, optimizer, matmul peak),
`time/train_s` (the training steps: the epochs minus their validation and logging), `time/eval_s`
(validation during training and the test evaluation), `time/logging_s` (MLflow: params, inputs,
metrics, checkpoints, figures, model) and `time/total_s` (startup plus everything since); the part of
total that is none of these is `time/other_s`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

PHASES = ("startup", "data", "setup", "train", "eval", "logging")

T = TypeVar("T")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat; else psutil; None if neither)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 (starttime), counted after the ")" of the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # no psutil, or a platform it cannot read: no start-up figure
        return None


class Stopwatch:
    """Charges wall time to one current phase at a time: `switch` moves on to another phase, `phase`
    runs a block as a phase and returns to the previous one (validation inside an epoch counts as
    eval, not train). Time before the first phase is `other`."""

    def __init__(self, startup_s: float = 0.0) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.seconds["startup"] = startup_s
        self.seconds["other"] = 0.0
        self.current = "other"
        self._last = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._last
        self._last = now

    def switch(self, name: str) -> None:
        self._charge()
        self.current = name

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before = self.current
        self.switch(name)
        try:
            yield
        finally:
            self.switch(before)

    def wrap(self, name: str, fn: Callable[..., T]) -> Callable[..., T]:
        """`fn`, with each call timed as phase `name`."""

        def timed(*args: Any, **kwargs: Any) -> T:
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    def breakdown(self) -> dict[str, float]:
        """`time/<phase>_s` for every phase (`other`: none of them) and `time/total_s`, their sum."""
        self._charge()
        out = {f"time/{k}_s": v for k, v in self.seconds.items()}
        out["time/total_s"] = sum(self.seconds.values())
        return out


class TimedCallbacks:
    """Training callbacks whose every call counts as `logging` (MLflow metrics and checkpoints happen
    in them), so the training phase is the steps alone."""

    def __init__(self, inner: Any, watch: Stopwatch) -> None:
        self._inner, self._watch = inner, watch

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        return self._watch.wrap("logging", attr) if callable(attr) else attr
