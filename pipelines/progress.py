"""The CLI's progress output: the training progress bar and the flows' progress lines (rich, on stdout)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()


class RichReporter:
    """Progress bar over training steps, one summary line per epoch."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task: Any = None
        self.steps_per_epoch = 1
        self.running = False

    def on_train_start(self, total_steps: int, steps_per_epoch: int, start_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.progress.start()
        self.running = True
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_epoch * steps_per_epoch, epoch=start_epoch + 1, loss="-"
        )

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        fields = {"loss": f"{metrics['train/loss_step']:.3f}"} if metrics else {}
        self.progress.update(self.task, completed=step, epoch=(step - 1) // self.steps_per_epoch + 1, **fields)

    def on_epoch_end(self, epoch: int, step: int, m: dict[str, float]) -> None:
        line = (
            f"epoch {epoch:>3}  train/loss {m['train/loss']:.4f}  val/loss {m['val/loss']:.4f}  "
            f"val/accuracy {m['val/accuracy']:.4f}"
        )
        if "val/ceiling" in m:
            line += f" (ceiling {m['val/ceiling']:.4f})"
        line += f"  {m['throughput/tokens_per_s']:,.0f} tok/s"
        if "throughput/mfu" in m:
            line += f"  MFU {100 * m['throughput/mfu']:.1f}%"
        self.progress.console.print(line, highlight=False, soft_wrap=True)

    def on_checkpoint(self, checkpoint: dict[str, Any], epoch: int) -> None:
        pass

    def stop(self) -> None:
        if self.running:  # a progress bar never started (or already stopped) prints nothing, not a blank line
            self.progress.stop()
            self.running = False


def progress_line(msg: str) -> None:
    """A flow's progress message, dimmed."""
    console.print(f"[dim]{msg}[/]", highlight=False)
