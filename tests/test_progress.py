"""Progress output (pipelines/progress.py): the overall fraction and its ETA, the heartbeat outside a terminal
(a fake clock, no waiting), the terminal bar's columns, and the CLI's heartbeat through a pipe."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console

from pipelines.progress import LineProgress, RichReporter, as_progress, hms

from .conftest import TINY


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def piped(clock: FakeClock, **kw) -> tuple[RichReporter, io.StringIO]:
    buf = io.StringIO()
    out = Console(file=buf, width=80, force_terminal=False)
    return RichReporter("train", out=out, live=False, interval=10, clock=clock, beat_thread=False, **kw), buf


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_heartbeat_at_start_then_only_after_the_interval():
    clock = FakeClock()
    rep, buf = piped(clock)
    rep.start()
    assert lines(buf) == ["train: starting  0%  elapsed 0:00:00  remaining ?"]
    clock.now += 4
    rep.on_train_start(total_steps=100, steps_per_epoch=10, start_epoch=0)
    clock.now += 5
    rep.on_step(50, {"train/loss_step": 2.5})
    assert len(lines(buf)) == 1  # 9 s since the last line: quiet
    clock.now += 3
    rep.on_step(60, None)
    # 60 % after 8 s of training: 0.4 / 0.6 * 8 s = 5.33 s left; elapsed counts from the start (12 s)
    assert lines(buf)[-1] == "train: epoch 6  step 60/100  loss 2.500  60%  elapsed 0:00:12  remaining 0:00:05"
    clock.now += 1
    rep.on_epoch_end(6, 60, {"train/loss": 2.0, "val/loss": 2.1, "val/accuracy": 0.5, "throughput/tokens_per_s": 9.0})
    assert lines(buf)[-1].startswith("epoch   6  train/loss 2.0000")
    clock.now += 9.5
    rep.on_step(61, None)
    assert len(lines(buf)) == 3  # any line resets the interval
    clock.now += 0.5
    rep.on_step(100, None)
    assert lines(buf)[-1].startswith("train: evaluating and logging  step 100/100")
    assert lines(buf)[-1].endswith("100%  elapsed 0:00:23  remaining 0:00:00")
    rep.stop()
    rep.stop()  # idempotent, prints nothing
    assert len(lines(buf)) == 4


def test_parts_give_the_overall_fraction_and_eta():
    clock = FakeClock()
    rep, buf = piped(clock, epoch_lines=False)
    rep.start()
    rep.plan(4, "runs")
    rep.part("training a seed0")
    assert lines(buf)[-1] == "training a seed0 (1/4)"
    rep.on_train_start(10, 5, 0)
    clock.now += 10
    rep.on_step(5, None)  # half of the first of four runs: 1/8 done in 10 s, 70 s left
    assert rep.fraction() == pytest.approx(0.125)
    assert rep.remaining() == pytest.approx(70.0)
    assert "run 1/4  step 5/10" in lines(buf)[-1] and lines(buf)[-1].endswith("remaining 0:01:10")
    rep.part("training b seed0")
    assert rep.fraction() == pytest.approx(0.25) and lines(buf)[-1] == "training b seed0 (2/4)"
    rep.part("trial 7", done=3)  # another process finished some: the count given wins
    assert rep.fraction() == pytest.approx(0.75)
    rep.stop()


def test_a_negative_interval_is_silent_and_a_line_callback_is_a_flow_progress():
    rep, buf = piped(FakeClock())
    rep.interval = -1
    rep.start()
    rep.on_train_start(10, 5, 0)
    rep.on_step(10, None)
    rep.stop()
    assert buf.getvalue() == ""

    said: list[str] = []
    p = as_progress(said.append)
    assert isinstance(p, LineProgress)
    p.plan(2, "sections")
    p.part("embeddings")
    p.on_step(1, None)
    p.part("heads")
    assert said == ["embeddings (1/2)", "heads (2/2)"]
    assert as_progress(rep) is rep
    assert hms(3725.9) == "1:02:05"


def test_the_terminal_bar_shows_elapsed_and_remaining_within_80_columns():
    clock = FakeClock()
    term = Console(file=io.StringIO(), width=80, force_terminal=True)
    rep = RichReporter("compare", out=term, clock=clock)
    assert rep.live
    rep.start()
    rep.plan(10, "runs")
    rep.part("training linear seed0")
    rep.on_train_start(100, 10, 0)
    clock.now += 30
    rep.on_step(50, {"train/loss_step": 1.25})
    assert rep.progress is not None
    shown = Console(width=80, record=True)
    shown.print(rep.progress.make_tasks_table(rep.progress.tasks))
    text = shown.export_text()
    rep.stop()
    assert len(text.splitlines()) == 1, text  # one line, nothing wrapped
    assert "run 1/10 step 50/100" in text and "5%" in text and "ETA 0:09:30" in text, text


@pytest.mark.slow
def test_train_piped_to_cat_prints_heartbeat_lines(mlflow_tmp: str):
    """`picollm train ... | cat`: a progress line first, then a heartbeat on every event (interval 0 here; 10 s
    by default), each with the counts, the elapsed and the remaining time; no terminal control codes."""
    env = {**os.environ, "PICOLLM_HEARTBEAT_S": "0", "MLFLOW_TRACKING_URI": mlflow_tmp}
    cmd = f"{sys.executable} -m pipelines.cli train {TINY} --set train.epochs=1 2>&1 | cat"
    out = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert out.returncode == 0, out.stdout
    got = out.stdout.splitlines()
    assert got[0].startswith("train: starting  0%  elapsed 0:00:00"), got[:3]
    beats = [line for line in got if line.startswith("train: ")]
    assert any("step 1/" in b for b in beats) and any("100%" in b and "remaining 0:00:00" in b for b in beats)
    assert all("elapsed" in b and "remaining" in b for b in beats)
    assert "\x1b[" not in out.stdout


class Recorder(LineProgress):
    """A FlowProgress that records the plan, the parts and how many steps each part reported."""

    def __init__(self) -> None:
        super().__init__(lambda msg: None)
        self.planned: list[tuple[int, str]] = []
        self.labels: list[str] = []
        self.steps: list[int] = []

    def plan(self, parts: int, unit: str = "parts") -> None:
        self.planned.append((parts, unit))

    def part(self, label: str, done: int | None = None) -> None:
        self.labels.append(label)
        self.steps.append(0)

    def on_step(self, step: int, metrics: dict[str, float] | None) -> None:
        self.steps[-1] += 1


@pytest.mark.slow
def test_compare_plans_as_many_parts_as_it_runs(monkeypatch: pytest.MonkeyPatch):
    """The bar's total is right: every run (lr grid and seeds) and the efficiency timing is one planned part,
    and each training run moves its part along by its steps."""
    import pipelines.compare
    from picollm.config import CompareConfig, load_config

    monkeypatch.setattr(pipelines.compare, "_figures", lambda *a, **k: [])  # checked in test_compare
    cfg = load_config(
        CompareConfig, TINY.parent / "compare_tiny.yaml", ["compare.lr_grid=[0.01,0.02]", "compare.lr_grid_epochs=1"]
    )
    rec = Recorder()
    pipelines.compare.run(cfg, progress=rec)
    assert rec.planned == [(2 * 2 + 2 * 2 + 1, "runs")]  # lr grid 2 variants x 2 lrs, 2 seeds x 2 variants, efficiency
    assert len(rec.labels) == 9 and rec.labels[-1].startswith("efficiency")
    assert [label.split(":")[0] for label in rec.labels[:4]] == ["lr grid"] * 4
    assert all(n > 0 for n in rec.steps[:-1]) and rec.steps[-1] == 0
