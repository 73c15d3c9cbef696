"""DDP (gloo on CPU), bf16 autocast, torch.compile wiring and non-finite losses.

The core claim of the DDP trainer: with the same global batch size, N ranks compute the same
gradient as one process, so the weights after training agree to float round-off.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from picollm.config import DataConfig, ModelConfig, TrainConfig
from picollm.data.splits import build_data, to_padded
from picollm.errors import PicollmError, TrainingError
from picollm.model.mixers import linear as la
from picollm.model.transformer import Transformer
from picollm.runtime import distributed
from picollm.training.evaluation import evaluate
from picollm.training.trainer import Trainer
from tests.conftest import REPO, TINY

# 5 families x 7 = 35 sequences in batches of 8: the last global batch has 3 rows, so with 2 ranks
# one rank gets 2 rows and the other 1 (uneven shards must still agree).
DATA = DataConfig(vocab_size=32, min_len=5, max_len=12, n_train=7, n_val=4, n_test=4, seed=3)
MODEL = ModelConfig(attention="linear", d_model=16, n_heads=2, n_layers=1, vocab_size=32)


def train_cfg(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 8, "lr": 0.01, "warmup_steps": 2, "log_every": 1, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def splits():
    data = build_data(DATA)
    return {name: to_padded(s, DATA.pad_id, data.families) for name, s in data.splits().items()}


def fit(cfg: TrainConfig, ctx: distributed.DistContext | None = None, model_cfg: ModelConfig = MODEL):
    sp = splits()
    torch.manual_seed(0)
    trainer = Trainer(Transformer(model_cfg), cfg, torch.device("cpu"), dist=ctx)
    result = trainer.fit(sp["train"], lambda m: evaluate(m, sp["val"], "val"))
    return trainer, result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, attention: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ctx, _ = distributed.setup("cpu")
    try:
        trainer, result = fit(train_cfg(), ctx, MODEL.model_copy(update={"attention": attention}))
        # The helpers the pipeline relies on: rank 0's bytes/JSON/checkpoint reach every rank.
        assert distributed.broadcast_json(ctx, {"r": rank} if ctx.is_main else None) == {"r": 0}
        ckpt = distributed.broadcast_checkpoint(ctx, {"w": torch.arange(3.0)} if ctx.is_main else None)
        assert torch.equal(ckpt["w"], torch.arange(3.0))
        assert distributed.any_rank(ctx, rank == 1) and not distributed.any_rank(ctx, False)
        torch.save({"state": trainer.model.state_dict(), "history": result.history}, f"{out}/rank{rank}.pt")
    finally:
        distributed.teardown(ctx)


# Two processes each; softmax's case (the same DDP path, another mixer) runs in make test-integration (CI).
@pytest.mark.parametrize("attention", ["linear", pytest.param("softmax", marks=pytest.mark.integration)])
def test_two_gloo_ranks_train_the_same_weights_as_one_process(tmp_path: Path, attention: str):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), attention), nprocs=2, join=True)
    single, single_result = fit(train_cfg(), model_cfg=MODEL.model_copy(update={"attention": attention}))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, ref in single.model.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r["state"][name], ref, atol=2e-5, rtol=1e-4, msg=name)
    # Training loss is reduced over ranks; validation comes from rank 0 and is shared.
    for key in ("train/loss", "val/loss", "val/accuracy"):
        for r in ranks:
            got = [h[key] for h in r["history"]]
            assert got == pytest.approx([h[key] for h in single_result.history], rel=1e-4), key


def test_sharding_covers_every_row_once():
    ctxs = [distributed.DistContext(rank=r, world_size=3) for r in range(3)]
    for n in (1, 2, 7, 9):
        rows = sorted(i for c in ctxs for i in range(n)[c.shard(n)])
        assert rows == list(range(n))


def test_single_process_context_is_a_no_op(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx, device = distributed.setup("cpu")
    assert not ctx.enabled and ctx.is_main and device.type == "cpu"
    assert distributed.all_reduce_sum(ctx, 2.0, torch.tensor(3.0)) == [2.0, 3.0]
    assert distributed.broadcast_json(ctx, {"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="boom"):
        distributed.share_failure(ctx, ValueError("boom"))


def test_flows_without_ddp_refuse_under_torchrun(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PicollmError, match="dpo does not support torchrun/DDP"):
        distributed.refuse_under_torchrun("dpo")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(PicollmError, match="not an integer"):
        distributed.env_world_size()


@pytest.mark.slow
@pytest.mark.integration  # several processes at once: make test-integration (CI), not make test
def test_torchrun_records_one_run_and_resumes(tmp_path: Path, migrated_store: str):
    """`torchrun -m pipelines.cli train`: one MLflow run from rank 0 with the world size, a registered
    version; then a single-process run resumed under DDP ends where a single-process resume ends."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": migrated_store, "HF_HUB_OFFLINE": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cli = ["-m", "pipelines.cli", "train", str(TINY)]

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    run([*torchrun, *cli, "--set", "tracking.registered_model=ddp-tiny", "--set", "train.epochs=1"])
    client = MlflowClient(migrated_store)
    exp = client.get_experiment_by_name("picollm-tiny")
    [ddp_run] = client.search_runs([exp.experiment_id])
    assert ddp_run.info.status == "FINISHED"
    assert ddp_run.data.params["distributed.world_size"] == "2"
    assert ddp_run.data.params["distributed.backend"] == "gloo"
    assert [v.version for v in client.search_model_versions("name='ddp-tiny'")] == [1]

    # Resume the same 1-epoch run to 2 epochs twice: once on 2 ranks, once on 1 process.
    base = run([sys.executable, *cli, "--set", "tracking.log_model=false", "--set", "train.epochs=1"])
    assert base.returncode == 0
    first = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
    mlflow.set_tracking_uri(migrated_store)
    ckpt_dir = mlflow.artifacts.download_artifacts(run_id=first.info.run_id, artifact_path="checkpoints")
    # A second copy of the run to resume the other way (a run can be resumed once to the same end).
    twin = client.create_run(exp.experiment_id)
    client.log_artifact(twin.info.run_id, f"{ckpt_dir}/checkpoint.pt", artifact_path="checkpoints")
    client.set_terminated(twin.info.run_id, "KILLED")
    more = ["--set", "tracking.log_model=false", "--set", "train.epochs=2"]
    run([*torchrun, *cli, *more, "--resume", first.info.run_id])
    run([sys.executable, *cli, *more, "--resume", twin.info.run_id])
    a, b = (client.get_run(r.info.run_id) for r in (first, twin))
    assert a.info.status == b.info.status == "FINISHED"
    assert a.data.tags["distributed.resumed_world_size"] == "2"
    for key in ("test/loss", "test/accuracy", "val/loss", "train/loss"):
        assert a.data.metrics[key] == pytest.approx(b.data.metrics[key], rel=1e-5), key


# --------------------------------------------------------------------------------------------------
# Precision and compile


def test_bf16_autocast_keeps_linear_attention_state_in_fp32(monkeypatch: pytest.MonkeyPatch):
    seen = []
    real = la.quadratic

    def spy(fq, fk, v, log_decay, eps):
        seen.append((fq.dtype, fk.dtype, torch.is_autocast_enabled("cpu")))
        out = real(fq, fk, v, log_decay, eps)
        seen.append((out.dtype,))
        return out

    monkeypatch.setattr(la, "quadratic", spy)
    torch.manual_seed(0)
    model = Transformer(MODEL)
    tokens = torch.randint(0, 31, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert seen[0] == (torch.float32, torch.float32, False)
    assert seen[1] == (torch.float32,)
    assert logits.dtype == torch.bfloat16  # the head's matmul did run in bf16
    fp32 = model(tokens)
    torch.testing.assert_close(logits.float(), fp32, atol=0.1, rtol=0.05)


def test_bf16_training_on_cpu_tracks_fp32():
    _, fp32 = fit(train_cfg(precision="fp32"))
    trainer, bf16 = fit(train_cfg(precision="bf16"))
    assert trainer.precision == "bf16"
    for a, b in zip(fp32.history, bf16.history, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=0.02)
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=0.02)


def test_precision_auto_is_fp32_on_cpu():
    trainer, _ = fit(train_cfg(epochs=1, precision="auto"))
    assert trainer.precision == "fp32"


def test_compiled_model_trains_and_checkpoints_plain_weights(monkeypatch: pytest.MonkeyPatch):
    """The compile path: the trainer steps through torch.compile's module, while checkpoints and the
    returned model stay the plain module (no `_orig_mod.` keys). Inductor itself takes minutes on
    2 CPU cores, so the test compiles with the `aot_eager` backend (same graph capture and autograd)."""
    real_compile = torch.compile
    compiled = []
    monkeypatch.setattr(
        torch, "compile", lambda m, **kw: compiled.append(m) or real_compile(m, backend="aot_eager", dynamic=True)
    )
    trainer, result = fit(train_cfg(compile=True))
    assert compiled and trainer.train_model is not trainer.model
    assert all(not k.startswith("_orig_mod") for k in trainer.model.state_dict())
    _, plain = fit(train_cfg())
    assert result.history[-1]["val/loss"] == pytest.approx(plain.history[-1]["val/loss"], rel=1e-4)


# --------------------------------------------------------------------------------------------------
# Non-finite losses


def poison(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int]) -> list[int]:
    """Make the loss NaN at the given steps (1-based, counted over the whole run)."""
    calls = []
    real = Trainer._forward

    def forward(self, batch):
        loss, n = real(self, batch)
        calls.append(1)
        return (loss * float("nan"), n) if len(calls) in bad_steps else (loss, n)

    monkeypatch.setattr(Trainer, "_forward", forward)
    return calls


def test_nonfinite_loss_stops_with_step_and_metric(monkeypatch: pytest.MonkeyPatch):
    poison(monkeypatch, {7})  # 5 steps per epoch: step 7 is in epoch 2
    with pytest.raises(TrainingError, match=r"train/loss is not finite at step 7 \(epoch 2"):
        fit(train_cfg())


def test_skip_batch_drops_the_bad_step_and_goes_on(monkeypatch: pytest.MonkeyPatch):
    poison(monkeypatch, {3, 8})
    trainer, result = fit(train_cfg(nonfinite="skip_batch"))
    assert result.history[-1]["train/skipped_batches"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(torch.tensor(h["val/loss"])) for h in result.history)


def test_skip_batch_gives_up_after_max_skipped(monkeypatch: pytest.MonkeyPatch):
    poison(monkeypatch, {2, 3, 4})
    with pytest.raises(TrainingError, match="more than train.max_skipped_batches"):
        fit(train_cfg(nonfinite="skip_batch", max_skipped_batches=2))


def test_nonfinite_run_is_failed_and_keeps_its_last_checkpoint(monkeypatch: pytest.MonkeyPatch, migrated_store: str):
    from typer.testing import CliRunner

    from pipelines.cli import app

    poison(monkeypatch, {12})  # tiny.yaml: 8 steps per epoch, so epoch 1 completes and is checkpointed
    res = CliRunner().invoke(app, ["train", str(TINY)])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "train/loss is not finite at step 12 (epoch 2" in lines[0]
    assert "Traceback" not in res.output
    client = MlflowClient(migrated_store)
    [r] = client.search_runs([client.get_experiment_by_name("picollm-tiny").experiment_id])
    assert r.info.status == "FAILED"
    assert "TrainingError" in r.data.tags["error"]
    assert [a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")] == ["checkpoints/checkpoint.pt"]
    assert r.data.metrics["epoch"] == 1.0  # epoch 1's metrics were logged before the fault


def test_dpo_log_probs_under_bf16_are_fp32_sums_close_to_fp32():
    import math

    from picollm.dpo.losses import batch_logps, collate, dpo_loss
    from picollm.dpo.pairs import PreferencePair

    torch.manual_seed(0)
    model = Transformer(MODEL.model_copy(update={"attention": "softmax"})).eval()
    pairs = [
        PreferencePair(0, "swap_tokens", [1, 2, 3], [4, 5, 6, 7], [4, 6, 5, 7]),
        PreferencePair(1, "other_story", [9, 8], [7, 6, 5], [1, 1, 2, 3, 4]),
    ]
    batch = collate(pairs, pad_id=31)
    with torch.no_grad():
        fp32 = batch_logps(model, batch)
        bf16 = batch_logps(model, batch, precision="bf16")
    for a, b in zip(fp32, bf16, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0.02, atol=0.05)
    # Policy == reference under the same precision: the loss is exactly ln 2 at step 0.
    losses, _, _ = dpo_loss(*bf16, *bf16, beta=0.1)
    assert float(losses.mean()) == pytest.approx(math.log(2), abs=1e-6)
