"""Timings carry their noise: the rules of picollm.runtime.noise on synthetic timings, and the repeats, load
and warnings reaching the compare flow's params, report.html and CLI."""

from __future__ import annotations

import math
import statistics

import pytest
from mlflow.tracking import MlflowClient

from picollm.compare.efficiency import Efficiency
from picollm.compare.report import report_html
from picollm.compare.report_efficiency import efficiency_section
from picollm.runtime import noise
from picollm.runtime.noise import RULES, Load, NoiseRules, Timing
from tests.conftest import REPO

QUIET = Load(0.4, 0.9, 2)


def test_timing_statistics_and_reported_value():
    samples = [3.0, 1.0, 2.5, 9.0]
    t = Timing.of(samples)
    assert (t.n, t.min, t.max, t.median) == (4, 1.0, 9.0, statistics.median(samples))
    assert t.value == t.min  # the reported figure is the fastest repeat
    assert t.spread == 2.75  # the median repeat over the fastest: the outlier 9.0 does not count
    assert Timing.of([1.0, 4.0]).spread == 2.5 and Timing.of([2.0]).spread == 1.0  # one repeat: noise unmeasured
    assert Timing.of([0.0, 1.0]).spread == math.inf
    assert t.cell(1) == "1.0 – 9.0" and Timing.of([1234.5]).cell(0) == "1,234"
    assert t.scaled(1000).min == 1000.0
    with pytest.raises(ValueError):
        Timing.of([])


def test_time_repeats_counts_warmup_and_repeats():
    calls = []
    t = noise.time_repeats(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and t.n == 5 and 0 <= t.min <= t.max


def test_large_spread_is_flagged_stable_is_not():
    # The case: decode steps of 0.19 ms in isolation, 15.975 ms under load (most steps slowed).
    noisy = {256: Timing.of([1.0, 1.1, 1.05]), 4096: Timing.of([0.19, 15.975, 12.0, 0.2])}
    w = RULES.spread("linear generation per token", noisy, " ms")
    assert w is not None and "at 4096" in w and "32.1×" in w and "256" not in w.split("worst")[0]
    assert "0.19–16 ms" in w  # the worst timing's whole range
    stable = {64: Timing.of([10.0, 10.4, 11.0]), 256: Timing.of([20.0, 21.0, 19.5])}
    assert RULES.spread("softmax training step", stable) is None
    # A quiet machine's slow outliers (2026-12-04: 5.7 ms among 0.21 ms decode steps) are not noise.
    quiet = Timing.of([5.669, 0.678, 0.489, 0.418, 0.337, 0.26, 0.238, 0.225, 0.228, 0.221, 0.216, 0.216, 0.213])
    assert RULES.spread("softmax decode", {4096: quiet}) is None
    assert RULES.spread("one repeat", {64: Timing.of([5.0])}) is None  # its noise is not measured
    assert NoiseRules(max_spread=1.03).spread("strict", stable) is not None  # the threshold is the rule's


def test_busy_machine_is_flagged_quiet_is_not():
    w = RULES.load(Load(1.2, 4.1, 2))
    assert w is not None and "4.10 at the end" in w and "2 core(s)" in w
    assert RULES.load(QUIET) is None
    assert RULES.load(Load(2.0, 2.4, 2)) is None  # our own threads on every core, and a little housekeeping
    assert RULES.load(Load(2.0, 3.0, 2)) is not None  # one more busy thread than cores
    assert RULES.load(Load(math.nan, math.nan, 2)) is None  # no load average on this platform


def test_a_curve_that_must_grow_but_falls_is_flagged():
    # The linear training step: 2,261 ms at N=256, 1,059 ms at N=4096.
    w = RULES.curve("linear training step", {64: 900.0, 256: 2261.0, 1024: 1500.0, 4096: 1059.0}, " ms")
    assert w is not None and "2.26e+03 ms at 256" in w and "at 1024" in w
    assert RULES.curve("softmax", {64: 1.0, 256: 3.0, 1024: 12.0}) is None  # grows
    assert RULES.curve("linear", {64: 10.0, 256: 8.0, 1024: 9.0}) is None  # flat within the allowed 1.5×
    assert RULES.curve("nan", {64: math.nan, 256: 1.0}) is None


def fake_efficiency(gen_4096: list[float], step_4096: float, load: Load) -> Efficiency:
    e = Efficiency([256, 4096], {256: 16, 4096: 1}, [256, 4096], threads=2, load=load)
    for att, scale in (("softmax", 2.0), ("linear", 1.0)):
        e.step[att] = {
            256: Timing.of([1000.0 * scale, 1010.0 * scale, 1030.0 * scale]),
            4096: Timing.of([step_4096] * 3),
        }
        e.gen[att] = {256: Timing.of([0.18, 0.19, 0.2]), 4096: Timing.of(gen_4096)}
        e.prefill[att] = {256: Timing.of([5.0, 5.1, 5.2]), 4096: Timing.of([80.0, 81.0, 82.0])}
    return e


def test_efficiency_warnings_params_and_report_section():
    quiet = fake_efficiency([0.19, 0.2, 0.21], 2100.0, QUIET)
    assert quiet.warnings() == []
    noisy = fake_efficiency([0.19, 12.0, 15.975], 1059.0 / 2, Load(3.5, 4.0, 2))
    warnings = noisy.warnings()
    assert warnings[0].startswith("the machine was busy")
    assert any(w.startswith("linear generation per token (by context): repeats disagree") for w in warnings)
    assert any(w.startswith("linear training step (by N) falls") for w in warnings)
    params = noisy.params()
    assert params["efficiency.noisy"] is True and quiet.params()["efficiency.noisy"] is False
    assert params["efficiency.load_avg_1m_end"] == 4.0 and params["efficiency.cpus"] == 2
    assert (params["efficiency.repeats.step"], params["efficiency.repeats.gen"]) == (3, 3)
    metrics = noisy.metrics()
    assert metrics[("scaling/gen_ms_per_token/linear", 4096)] == 0.19
    assert metrics[("scaling/gen_ms_per_token_max/linear", 4096)] == 15.975

    section = "\n".join(efficiency_section(noisy))
    page = report_html(section, {})
    assert "<blockquote>" in page and "Noisy timings" in page
    assert all(w.split(":")[0] in page for w in warnings)
    assert "190 – 15,975" in page  # µs/token, min – max, beside the timing
    assert "3.50 at the start, 4.00 at the end, on 2 core(s)" in page
    calm = "\n".join(efficiency_section(quiet))
    assert "<blockquote>" not in report_html(calm, {}) and "none flagged" in calm

    from picollm.compare.plots import efficiency_figure

    assert efficiency_figure(noisy)._suptitle.get_text().startswith("NOISY TIMINGS")
    assert efficiency_figure(quiet)._suptitle is None


def test_compare_logs_and_reports_the_noise_of_its_timings(migrated_store: str, monkeypatch: pytest.MonkeyPatch):
    """The compare flow's efficiency step on the tiny config (real timings, the load average faked high):
    repeats, max and load reach the parent's params and metrics, report.html and the CLI's warning line."""
    from picollm.config import CompareConfig, load_config
    from picollm.tracking import runs
    from picollm.training.progress import as_progress
    from pipelines import cli, compare

    monkeypatch.setattr(compare, "load_average", lambda: 99.0)
    cfg = load_config(CompareConfig, REPO / "configs" / "compare_tiny.yaml", ["efficiency.timed_steps=2"])
    archs = {v.name: cfg.variant_model(v) for v in cfg.compare.variants}
    with runs.session("compare", cfg.tracking) as s, s.run("timing", config=cfg) as parent:
        eff = compare._efficiency(parent, cfg, archs, as_progress(None))
    assert eff is not None and eff.warnings()[0].startswith("the machine was busy")
    run = MlflowClient().get_run(parent.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["efficiency.noisy"] == "True" and params["efficiency.load_avg_1m_start"] == "99.0"
    assert params["efficiency.repeats.step"] == "2" and int(params["efficiency.cpus"]) == noise.cpu_count()
    assert metrics["scaling/step_ms_max/linear"] >= metrics["scaling/step_ms/linear"] > 0
    page = report_html("\n".join(efficiency_section(eff)), {})
    assert "Noisy timings" in page and "load average (1 min) 99.00 at the start" in page
    step = eff.step["linear"][32]
    assert f"{step.min:,.1f} – {step.max:,.1f}" in page

    printed = []
    monkeypatch.setattr(cli.console, "print", lambda text, **kw: printed.append(text))
    cli.timing_warnings(eff.warnings())
    assert len(printed) == len(eff.warnings()) and printed[0].startswith("[bold yellow]warning: noisy timing:[/]")
