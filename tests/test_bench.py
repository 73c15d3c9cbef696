"""`picollm bench`: every section runs on a tiny config and lands in one MLflow run."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from picollm.config import BenchConfig, load_config
from pipelines import bench
from tests.conftest import REPO, TINY


def tiny_bench(*overrides: str) -> BenchConfig:
    return load_config(
        BenchConfig,
        REPO / "configs" / "bench.yaml",
        [
            "lengths=[8,16]",
            "timed_steps=1",
            "warmup_steps=0",
            f"runs.config={TINY}",
            "runs.overrides=[train.epochs=1]",
            "runs.http_server=false",
            "runs.repeats=1",
            *overrides,
        ],
    )


def test_steps_and_tracking_sections(migrated_store: str):
    out = bench.run(tiny_bench("sections=[steps,tracking]"))
    r = out.results
    assert {"step_ms.softmax@8", "step_ms.linear@16", "kernel_ms.chunkwise@16"} <= set(r)
    assert r["ratio.linear_over_softmax@8"] == pytest.approx(r["step_ms.linear@8"] / r["step_ms.softmax@8"])
    none, sqlite = r["tracking.none.wall_s"], r["tracking.sqlite.wall_s"]
    assert none > 0 and sqlite > 0
    assert r["tracking.sqlite.overhead_pct"] == pytest.approx(100 * (sqlite - none) / sqlite)
    assert "tracking.http.wall_s" not in r  # http_server=false
    client = MlflowClient(migrated_store)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["tracking/sqlite/overhead_pct"] == pytest.approx(r["tracking.sqlite.overhead_pct"])
    assert "bench.md" in [a.path for a in client.list_artifacts(out.run_id)]
    # The timings carry their noise: each step time's max beside its min, the load average and the cores as
    # params, and bench.md opens with them (and with the warnings, when the noise rules flag any).
    assert r["step_ms.linear_max@16"] >= r["step_ms.linear@16"]
    params = run.data.params
    assert {"bench.load_avg_1m_start", "bench.load_avg_1m_end", "bench.cpus", "bench.noisy"} <= set(params)
    assert params["bench.noisy"] == str(bool(out.warnings)) and int(params["bench.cpus"]) >= 1
    assert out.report[0].startswith("Timings: the min of their repeats") and "load average (1 min)" in out.report[0]
    assert all(f"- warning: {w}" in out.report for w in out.warnings)
    # The timed training runs went to their own temporary stores, not into the user's.
    assert {e.name for e in client.search_experiments()} <= {"picollm-bench", "Default"}


@pytest.mark.slow
@pytest.mark.integration  # several processes at once: make test-integration (CI), not make test
def test_ddp_section_compares_one_process_with_torchrun(migrated_store: str):
    out = bench.run(tiny_bench("sections=[ddp]"))
    r = out.results
    for name in ("single", "single_1thread", "ddp2"):
        assert r[f"ddp.{name}.tokens_per_s"] > 0
    # Same global batch, same seed: DDP trains the same model, so the same test accuracy.
    assert r["ddp.ddp2.test_accuracy"] == pytest.approx(r["ddp.single.test_accuracy"], abs=1e-6)
    assert r["ddp.speedup_vs_single"] == pytest.approx(r["ddp.ddp2.tokens_per_s"] / r["ddp.single.tokens_per_s"])
    assert math.isfinite(r["ddp.speedup_vs_single_1thread"])
    assert any("DDP speedup" in line for line in out.report)


@pytest.mark.slow
def test_sweep_section_times_whole_studies(migrated_store: str):
    sweep = REPO / "configs" / "sweep_tiny.yaml"
    out = bench.run(
        tiny_bench(
            "sections=[sweep]",
            f"sweep.config={sweep}",
            f"sweep.overrides=[base.config={TINY}]",
            "sweep.trials=2",
            "sweep.workers=[1]",
        )
    )
    r = out.results
    assert r["sweep.w1.trials"] == 2
    assert r["sweep.w1.trials_per_min"] == pytest.approx(60 * 2 / r["sweep.w1.wall_s"])
    assert 0 < r["sweep.w1.overhead_s_median"] < r["sweep.w1.wall_s"]
    bench_run = MlflowClient().get_run(out.run_id)
    assert bench_run.data.metrics["sweep/w1/trials_per_min"] == pytest.approx(r["sweep.w1.trials_per_min"])
    assert any("per-trial overhead" in line for line in out.report)


def test_breakdown_section_aggregates_whole_processes_against_the_reference(
    migrated_store: str, monkeypatch: pytest.MonkeyPatch
):
    """The section's medians, spread, ratios, table and metrics, on canned processes (the real process
    runner, `_train_cli`, is the ddp section's, tested there; the reference loop is tested below)."""
    walls = iter([9.0, 6.0, 4.0])  # the first is the cold run
    calls: list[dict] = []

    def fake_train(rc, uri, nproc, *extra, env_extra=None, log_model=False):
        calls.append({"env": env_extra, "log_model": log_model})
        wall = next(walls)
        phases = {"startup": 1.0, "data": 0.5, "setup": 0.5, "train": wall / 2, "eval": 0.2, "logging": 0.3}
        metrics = {f"time/{k}_s": v for k, v in phases.items()} | {"time/other_s": 0.0, "test/accuracy": 0.8}
        metrics["time/total_s"] = sum(phases.values())
        return wall, metrics

    ref_walls = iter([30.0, 24.0, 20.0])
    monkeypatch.setattr(bench, "_train_cli", fake_train)
    monkeypatch.setattr(
        bench, "_reference_cli", lambda config, epochs: (next(ref_walls), {"train_s": 10.0, "test_accuracy": 0.5})
    )
    out = bench.run(tiny_bench("sections=[breakdown]", "runs.breakdown_repeats=3"))
    r = out.results
    assert r["breakdown.cold.wall_s"] == 9.0
    assert r["breakdown.wall_s"] == 5.0 and (r["breakdown.wall_s_min"], r["breakdown.wall_s_max"]) == (4.0, 6.0)
    assert r["breakdown.train_s"] == 2.5 and r["breakdown.wall_over_train"] == pytest.approx(2.0)
    assert r["ratio.reference_over_picollm"] == pytest.approx((24 / 6 + 20 / 4) / 2)  # pairs of the warm runs
    assert r["reference.wall_s"] == 24.0 and r["reference.test_accuracy"] == 0.5
    assert all(c["log_model"] for c in calls) and len({c["env"]["PICOLLM_CACHE_DIR"] for c in calls}) == 1
    assert any("Reference / picollm wall time" in line for line in out.report)
    metrics = MlflowClient(migrated_store).get_run(out.run_id).data.metrics
    assert metrics["ratio/reference_over_picollm"] == pytest.approx(r["ratio.reference_over_picollm"])
    assert metrics["breakdown/logging_s_max"] == 0.3


def test_reference_loop_trains_and_reports():
    from picollm.training import reference_loop as bench_reference

    out = bench_reference.run(str(TINY), epochs=1)
    assert out["epochs"] == 1 and 0 <= out["test_accuracy"] <= 1 and 0 < out["train_s"] <= out["wall_s"]


def test_generation_section_logs_ms_per_token_by_context(migrated_store: str):
    cfg = tiny_bench(
        "sections=[generation]",
        "generation.contexts=[8,16]",
        "generation.batch_sizes=[1,2]",
        "generation.new_tokens=2",
        "generation.repeats=1",
    )
    out = bench.run(cfg)
    assert any("Decode ms per step at batch 2" in line for line in out.report)
    client = MlflowClient(migrated_store)
    history = client.get_metric_history(out.run_id, "gen_ms/linear/fast/b1")
    assert sorted(m.step for m in history) == [8, 16]  # step = context
    assert "gen_speedup/softmax/b2" in client.get_run(out.run_id).data.metrics


def test_steps_and_generation_time_every_variant():
    cfg = tiny_bench(
        "model.d_model=16",
        "model.n_heads=2",
        "variants=[{name: softmax}, {name: lin, model: {attention: linear}},"
        " {name: delta, model: {attention: deltanet}}]",
        "generation.contexts=[8]",
        "generation.batch_sizes=[1]",
        "generation.new_tokens=2",
        "generation.repeats=1",
        "kernels=false",
    )
    rows, _ = bench.time_steps(cfg)
    assert set(rows[8]) == {
        *(f"{k}.{v}" for k in ("step_ms", "tokens_per_s") for v in ("softmax", "lin", "delta")),
        *(f"step_ms.{v}_max" for v in ("softmax", "lin", "delta")),
        "ratio.lin_over_softmax",
        "ratio.delta_over_softmax",
    }
    assert rows[16]["ratio.delta_over_softmax"] == pytest.approx(
        rows[16]["step_ms.delta"] / rows[16]["step_ms.softmax"]
    )
    assert all(rows[n][f"step_ms.{v}"] <= rows[n][f"step_ms.{v}_max"] for n in rows for v in ("softmax", "lin"))
    results = {f"{k}@{n}": v for n, row in rows.items() for k, v in row.items()}
    assert (
        "| N | batch | softmax ms/step | lin ms/step | delta ms/step | lin/softmax | delta/softmax |"
        in bench.steps_table(cfg, results)
    )
    gen, _ = bench.time_generation(cfg)
    assert {"gen_ms.delta.fast.b1", "gen_ms.delta.fast.b1_max", "gen_speedup.lin.b1"} <= set(gen[8])
    assert "delta fast" in "\n".join(bench.generation_table(cfg.generation, gen, ["softmax", "lin", "delta"]))


def test_bench_variants_are_checked():
    from picollm.errors import ConfigError

    with pytest.raises(ConfigError, match="variant b: model.feature_map"):
        tiny_bench("variants=[{name: a}, {name: b, model: {feature_map: nope}}]")
