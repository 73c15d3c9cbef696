"""The CLI's progress output: one overall bar with elapsed and remaining time in a terminal, a heartbeat line
at a fixed interval elsewhere (a pipe, a CI log), and the flows' progress lines.

Flows report through `FlowProgress`: a callable for lines (the old `say`), `plan`/`part` for the parts of a
multi-part command (compare's runs, a sweep's trials, analyze's sections) and the trainer's callbacks
(picollm.training.trainer.TrainCallbacks) for the steps of the part that is training. The overall fraction is
(finished parts + the running part's step fraction) / parts; the remaining time is extrapolated from it.

    p = as_progress(progress)            # a flow's argument: a ConsoleProgress, a plain callable or None
    p.plan(10, "runs")
    p.part("training linear seed0")      # the next part starts (the last one is done)
    train_run.train(s, child, ui=p)      # its steps move the bar within the part
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

# The flows' side of progress lives in the library; re-exported for the CLI and its tests.
from picollm.training.progress import FlowProgress as FlowProgress
from picollm.training.progress import LineProgress as LineProgress
from picollm.training.progress import as_progress as as_progress

console = Console()
log = logging.getLogger(__name__)

# Outside a terminal, a line whenever nothing was printed for this long (`PICOLLM_HEARTBEAT_S` to change it).
HEARTBEAT_S = 10.0
Clock = Callable[[], float]


def hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def heartbeat_interval() -> float:
    try:
        return float(os.environ.get("PICOLLM_HEARTBEAT_S", HEARTBEAT_S))
    except ValueError:
        return HEARTBEAT_S


def epoch_line(epoch: int, m: dict[str, float]) -> str:
    line = (
        f"epoch {epoch:>3}  train/loss {m['train/loss']:.4f}  val/loss {m['val/loss']:.4f}  "
        f"val/accuracy {m['val/accuracy']:.4f}"
    )
    if "val/ceiling" in m:
        line += f" (ceiling {m['val/ceiling']:.4f})"
    line += f"  {m['throughput/tokens_per_s']:,.0f} tok/s"
    if "throughput/mfu" in m:
        line += f"  MFU {100 * m['throughput/mfu']:.1f}%"
    return line


class RichReporter:
    """A command's progress: `what` is its name (train, compare, ...). In a terminal (`live`), one transient
    bar: label, bar, counts, percent, elapsed, remaining. Elsewhere a heartbeat line (label, counts, percent,
    elapsed, remaining) at once, then whenever nothing was printed for `interval` seconds: from a thread, so
    start-up, evaluation and model logging are covered too, and on every event (a fake `clock` makes it
    deterministic). Also the trainer's callbacks (one summary line per epoch) and a FlowProgress."""

    def __init__(
        self,
        what: str = "train",
        *,
        out: Console | None = None,
        live: bool | None = None,
        interval: float | None = None,
        clock: Clock = time.monotonic,
        epoch_lines: bool = True,
        beat_thread: bool = True,
        after_training: str = "evaluating and logging",
    ) -> None:
        self.console = out or console
        self.what, self.clock, self.epoch_lines, self.beat_thread = what, clock, epoch_lines, beat_thread
        self.live = self.console.is_terminal if live is None else live
        self.interval = heartbeat_interval() if interval is None else interval
        self.lock = threading.RLock()
        self.parts, self.unit, self.done = 1, "", 0
        self.label = "starting"
        self.after_training = after_training  # the label once the (one) training run's last step is done
        self.in_part = False
        self.steps: tuple[int, int] | None = None  # (step, total) of the running part's training
        self.steps_per_epoch = 1
        self.loss: float | None = None
        self.t_start = self.t0 = self.last_line = clock()
        self.f0 = 0.0  # fraction at t0: the rate is measured from the start of real progress
        self.progress: Progress | None = None
        self.task: Any = None
        self.running = False
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    # -- life cycle

    def start(self) -> RichReporter:
        """Show the bar (terminal) or print the first heartbeat line and start the heartbeat thread."""
        with self.lock:
            if self.running:
                return self
            self.running = True
            self.stopped.clear()
            if self.live:
                self.progress = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(bar_width=10),
                    TextColumn("{task.fields[counts]}"),
                    TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(),
                    TextColumn("[cyan]ETA {task.fields[eta]}"),
                    console=self.console,
                    transient=True,
                )
                self.task = self.progress.add_task(self.what, total=1.0, counts="", eta="-:--:--")
                self.progress.start()
                self._render()
            elif self.interval >= 0:  # a negative interval: silent (a DDP rank other than 0)
                self._beat()
                if self.interval > 0 and self.beat_thread:  # without the thread: beats on events only (tests)
                    self.thread = threading.Thread(target=self._heartbeats, name="picollm-heartbeat", daemon=True)
                    self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            if not self.running:  # never started (or already stopped): prints nothing, not a blank line
                return
            self.running = False
            self.stopped.set()
            if self.progress is not None:
                self.progress.stop()
                self.progress = None
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
            self.thread = None

    def __enter__(self) -> RichReporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the numbers

    def fraction(self) -> float:
        sub = self.steps[0] / self.steps[1] if self.steps and self.steps[1] else 0.0
        return min(1.0, (self.done + sub) / max(self.parts, 1))

    def remaining(self) -> float | None:
        f = self.fraction()
        if f <= self.f0 or f >= 1.0:
            return 0.0 if f >= 1.0 else None
        return (self.clock() - self.t0) * (1.0 - f) / (f - self.f0)

    def counts(self, compact: bool = False) -> str:
        """`run 3/10  step 40/120  loss 2.310`; `compact` (the bar's column): no loss beside a part count."""
        bits = [f"{self.unit[:-1] if self.unit.endswith('s') else self.unit} {self.done + 1}/{self.parts}"]
        if self.parts <= 1 or not self.unit:
            bits = []
        if self.steps:
            bits.append(f"step {self.steps[0]}/{self.steps[1]}")
        if self.loss is not None and not (compact and bits and self.parts > 1):
            bits.append(f"loss {self.loss:.3f}")
        return (" " if compact else "  ").join(bits)

    def status(self) -> str:
        """The heartbeat line."""
        eta = self.remaining()
        left = "?" if eta is None else hms(eta)
        counts = self.counts()
        return (
            f"{self.what}: {self.label}" + (f"  {counts}" if counts else "") + f"  {100 * self.fraction():.0f}%"
            f"  elapsed {hms(self.clock() - self.t_start)}  remaining {left}"
        )

    # -- output

    def _render(self) -> None:
        if self.progress is None:
            return
        eta = self.remaining()
        label = f"{self.what}: starting" if self.label == "starting" else self.label  # the command is on screen
        self.progress.update(
            self.task,
            completed=self.fraction(),
            description=label if len(label) <= 24 else label[:23] + "…",
            counts=self.counts(compact=True),
            eta="-:--:--" if eta is None else hms(eta),
        )

    def _beat(self) -> None:
        self._print(self.status(), style="dim")

    def _print(self, line: str, style: str | None = None) -> None:
        with self.lock:
            self.last_line = self.clock()
            target = self.progress.console if self.progress is not None else self.console
            target.print(line, style=style, highlight=False, soft_wrap=True, markup=False)

    def _maybe_beat(self) -> None:
        if self.live:
            self._render()
        elif self.running and self.interval >= 0 and self.clock() - self.last_line >= self.interval:
            self._beat()

    def _heartbeats(self) -> None:
        poll = min(self.interval, 1.0)
        while not self.stopped.wait(poll):
            with self.lock:
                if self.running:
                    self._maybe_beat()

    # -- FlowProgress

    def __call__(self, msg: str) -> None:
        self._print(msg, style="dim")

    def plan(self, parts: int, unit: str = "parts") -> None:
        with self.lock:
            self.parts, self.unit, self.done, self.steps = max(parts, 1), unit, 0, None
            self.t0, self.f0 = self.clock(), 0.0
            self._maybe_beat()

    def part(self, label: str, done: int | None = None) -> None:
        with self.lock:
            if done is not None:
                self.done = done
            elif self.in_part:
                self.done += 1
            self.label, self.steps, self.loss, self.in_part = label, None, None, True
            self.done = min(self.done, self.parts - 1)
            if not self.live:
                self._print(f"{label} ({self.done + 1}/{self.parts})" if self.parts > 1 else label, style="dim")
            self._maybe_beat()

    # -- TrainCallbacks

    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
        if not self.running:  # a caller that never started it (or stopped it for a line): the bar is back
            self.start()
        with self.lock:
            self.steps_per_epoch = max(steps_per_epoch, 1)
            self.steps = (start_epoch * steps_per_epoch, total_steps)
            if self.parts <= 1:  # one training run is the whole command: its rate starts now (resumes too)
                self.label = f"epoch {start_epoch + 1}"
                self.t0, self.f0 = self.clock(), self.fraction()
            self._maybe_beat()

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        with self.lock:
            total = self.steps[1] if self.steps else step
            self.steps = (step, total)
            if metrics and "train/loss_step" in metrics:
                self.loss = metrics["train/loss_step"]
            if self.parts <= 1:
                self.label = f"epoch {(step - 1) // self.steps_per_epoch + 1}"
                if step >= total:
                    self.label = self.after_training
            self._maybe_beat()

    def on_epoch_end(self, epoch: int, step: int, m: dict[str, float]) -> None:
        if self.epoch_lines:
            self._print(epoch_line(epoch, m))

    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None:
        pass


def reporter(what: str, **kw: Any) -> RichReporter:
    """The command's reporter: quiet (no bar, no heartbeat) on a DDP rank other than 0, which reports nothing."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        return RichReporter(what, live=False, interval=-1, **kw)
    return RichReporter(what, **kw)


def timing_warnings(warnings: list[str]) -> None:
    """The noise rules' warnings on a flow's timings (picollm.runtime.noise), one highlighted line each."""
    for warning in warnings:
        console.print(f"[bold yellow]warning: noisy timing:[/] {escape(warning)}", highlight=False)
