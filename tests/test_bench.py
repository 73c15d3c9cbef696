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
    assert run.data.metrics["tracking.sqlite.overhead_pct"] == pytest.approx(r["tracking.sqlite.overhead_pct"])
    assert "bench.md" in [a.path for a in client.list_artifacts(out.run_id)]
    # The timed training runs went to their own temporary stores, not into the user's.
    assert {e.name for e in client.search_experiments()} <= {"picollm-bench", "Default"}


@pytest.mark.slow
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
    assert bench_run.data.metrics["sweep.w1.trials_per_min"] == pytest.approx(r["sweep.w1.trials_per_min"])
    assert any("per-trial overhead" in line for line in out.report)
