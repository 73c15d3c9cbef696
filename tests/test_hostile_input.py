"""Hostile or odd input that the schema used to let through: config files (alias bombs, bad bytes, huge
values), values that failed only inside a run, sampling parameters at their edges, and resumes that
raced, dead-ended or crashed. Each is one capped line and exit 2 before any work, or just works.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from picollm.errors import MAX_LINE, PicollmError
from picollm.model.sampling import Sampling
from picollm.training import optim

from .conftest import TINY
from .test_faults import VICTIM, all_runs, invoke, main_usage_error, one_line, statuses, victim  # noqa: F401

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


def write(tmp_path: Path, content: bytes | str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_an_alias_bomb_is_refused_fast(tmp_path: Path):
    path = write(tmp_path, BOMB)  # under 1 KB; 9^9 nodes expanded
    assert path.stat().st_size < 1024
    t0 = time.perf_counter()
    one_line(invoke("train", path), 2, "expands to more than 100,000 nodes")
    assert time.perf_counter() - t0 < 5
    one_line(invoke("train", write(tmp_path, "a: &a [*a]\n")), 2, "recursive YAML alias")


@pytest.mark.parametrize(
    "content, offset", [(b"train:\n  lr: 0.01  # caf\xe9\n", 24), (b"\xff\xfetrain: {}\n", 0)], ids=["comment", "bom"]
)
def test_bytes_that_are_not_utf8_name_the_file_and_offset(tmp_path: Path, content: bytes, offset: int):
    path = write(tmp_path, content)
    one_line(invoke("train", path), 2, str(path), "not UTF-8", f"offset {offset}")


def test_an_oversized_file_is_refused(tmp_path: Path):
    path = write(tmp_path, "# " + "x" * (2 << 20) + "\n")
    one_line(invoke("train", path), 2, "more than a config may have")


def test_error_lines_are_capped(tmp_path: Path):
    huge = "y" * 100_000
    line = one_line(invoke("train", TINY, "--set", f"model.attention={huge}"), 2, "model.attention")
    assert len(line) <= MAX_LINE + len("error: ")
    line = one_line(invoke("train", write(tmp_path, f"model:\n  {'k' * 1000}: 1\n")), 2, " ... ", "unknown key")
    assert len(line) <= MAX_LINE + len("error: ")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.betas=[0.9, 1.0]", "train.betas.1: Input should be less than 1"),
        ("train.betas=[-0.1, 0.9]", "train.betas.0"),
        ("train.seed=-1", "train.seed"),
        ("train.seed=18446744073709551617", "train.seed"),
        ("data.seed=-5", "data.seed"),
        ("train.lr=.inf", "train.lr: Input should be a finite number"),
        ("train.weight_decay=.nan", "train.weight_decay"),
        ("tracking.registered_model=team/model", "not a valid registered model name"),
        ("tracking.registered_model=..", "not a valid registered model name"),
        ("tracking.registered_model=' '", "not a valid registered model name"),
        ("tracking.http_timeout_s=0", "tracking.http_timeout_s"),
    ],
)
def test_values_that_failed_inside_a_run_are_refused_before_it(migrated_store: str, override: str, fragment: str):
    one_line(invoke("train", TINY, "--set", override), 2, fragment)
    assert all_runs() == []


# --------------------------------------------------------------------------------------------------
# Sampling edges: every accepted value works


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, 0.0), (1e-45, None, None), (1e-300, None, None), (1e300, None, None), (1.0, 10_000, 1.0)],
)
def test_sampling_edges_are_finite_and_sane(temperature: float, top_k, top_p):
    logits = torch.randn(4, 12)
    g = torch.Generator().manual_seed(2**63 - 1)
    out = Sampling(temperature, top_k, top_p, g).next(logits, 11)
    assert ((out >= 0) & (out < 11)).all()
    if top_p == 0.0 or temperature < 1e-30:
        assert torch.equal(out, logits[:, :11].argmax(-1))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-n", "4097"], "--max-new-tokens"),
        (["--temperature", "inf"], "temperature must be a finite number"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-p", "nan"], "--top-p"),
        (["--seed", str(2**63)], "--seed"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_generate_refuses_values_that_cannot_work(args: list[str], fragment: str, monkeypatch, capsys):
    """Through the real entry point, as tests/test_faults.py's usage errors: one line, exit 2."""
    main_usage_error(["generate", VICTIM, "1 2", *args], fragment, monkeypatch, capsys)


def test_generate_at_the_edges_works(victim: Path):  # noqa: F811
    for args in (["--top-p", "0", "--temperature", "1"], ["--temperature", "1e-45"], ["--seed", str(2**63 - 1)]):
        result = invoke("generate", VICTIM, "1 2", "--temperature", "0.7", *args)
        assert result.exit_code == 0, (args, result.output)


# --------------------------------------------------------------------------------------------------
# Resume dead ends


def test_resume_with_an_empty_run_id_is_refused(migrated_store: str):
    one_line(invoke("train", TINY, "--resume", ""), 2, "--resume needs a run id")
    assert all_runs() == []


@pytest.fixture
def interrupted_after_last_epoch(migrated_store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A 2-epoch run killed right after its last checkpoint, before its test metrics and model."""
    from picollm.training.run import MlflowCallbacks

    original = MlflowCallbacks.on_checkpoint

    def then_interrupted(self, checkpoint, epoch):
        original(self, checkpoint, epoch)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(MlflowCallbacks, "on_checkpoint", then_interrupted)
    assert invoke("train", TINY).exit_code == 130
    monkeypatch.setattr(MlflowCallbacks, "on_checkpoint", original)
    [run] = all_runs()
    assert run.info.status == "KILLED" and "test/loss" not in run.data.metrics
    return run.info.run_id


def test_a_run_interrupted_after_its_last_epoch_resumes_into_what_is_left(interrupted_after_last_epoch: str):
    run_id = interrupted_after_last_epoch
    client = MlflowClient()
    assert not client.search_model_versions(f"run_id='{run_id}'")  # stopped before its model
    result = invoke("train", TINY, "--resume", run_id)
    assert result.exit_code == 0, result.output
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test/loss" in run.data.metrics
    assert len(client.get_metric_history(run_id, "train/loss")) == 2  # no epoch trained twice
    [version] = client.search_model_versions(f"run_id='{run_id}'")  # the model logged and registered once
    assert version.status == "READY"
    one_line(invoke("train", TINY, "--resume", run_id), 2, "already completed")


def _checkpoint_of(run_id: str) -> Path:
    [path] = Path.cwd().glob(f"mlruns/**/{run_id}/artifacts/checkpoints/checkpoint.pt")
    return path


@pytest.fixture
def killed_run(migrated_store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A 2-epoch run of configs/tiny.yaml (d_model 16) killed after its first checkpoint."""
    from picollm.training.run import MlflowCallbacks

    original = MlflowCallbacks.on_checkpoint

    def then_interrupted(self, checkpoint, epoch):
        original(self, checkpoint, epoch)
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowCallbacks, "on_checkpoint", then_interrupted)
    assert invoke("train", TINY, "--set", "tracking.log_model=false").exit_code == 130
    monkeypatch.setattr(MlflowCallbacks, "on_checkpoint", original)
    [run] = all_runs()
    assert run.info.status == "KILLED" and run.data.params["model.d_model"] == "16"
    return run.info.run_id


def test_a_checkpoint_of_another_run_is_refused_naming_both_values(killed_run: str):
    """Another run's checkpoint (d_model 32) copied into a killed d_model-16 run: refused whichever d_model
    the resume asks for (the run's own, or the checkpoint's, which the old hint led to), naming which side
    holds which value; the run stays KILLED, its params and weights untouched."""
    run_id = killed_run
    other = invoke("train", TINY, "--set", "model.d_model=32", "--set", "tracking.log_model=false")
    assert other.exit_code == 0, other.output
    [other_run] = [r for r in all_runs() if r.info.run_id != run_id]
    _checkpoint_of(run_id).write_bytes(_checkpoint_of(other_run.info.run_id).read_bytes())
    client = MlflowClient()
    before = client.get_run(run_id)
    for d_model in ("16", "32"):
        args = ["train", TINY, "--set", "tracking.log_model=false", "--set", f"model.d_model={d_model}"]
        one_line(
            invoke(*args, "--resume", run_id),
            2,
            f"the checkpoint of run {run_id} is not this run's",
            "model.d_model is 32 in its checkpoint.pt but 16 in the run's logged params",
        )
        after = client.get_run(run_id)
        assert after.info.status == "KILLED" and after.data.params == before.data.params
        assert after.data.metrics == before.data.metrics


def test_a_config_that_differs_from_the_run_names_both_sides(killed_run: str):
    line = one_line(
        invoke("train", TINY, "--set", "tracking.log_model=false", "--set", "model.d_model=32", "--resume", killed_run),
        2,
        f"model.d_model is 32 in this config but 16 in run {killed_run} (its logged params and checkpoint)",
    )
    assert "--resume" in line
    assert MlflowClient().get_run(killed_run).info.status == "KILLED"


def test_a_model_left_pending_by_an_interrupted_run_is_failed_when_it_resumes(
    migrated_store: str, monkeypatch: pytest.MonkeyPatch
):
    """Ctrl-C while MLflow uploads the model (after it created the LoggedModel, before it marked it READY):
    the resumed run logs the model again and marks the orphan FAILED, so none stays PENDING."""
    import mlflow.pyfunc

    original = mlflow.pyfunc.save_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.pyfunc, "save_model", interrupted)
    assert invoke("train", TINY).exit_code == 130
    monkeypatch.setattr(mlflow.pyfunc, "save_model", original)
    [run] = all_runs()
    client = MlflowClient()

    def models() -> dict[str, str]:
        found = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        return {m.model_id: str(m.status) for m in found}

    [orphan] = models()
    assert run.info.status == "KILLED" and models()[orphan].endswith("PENDING")
    result = invoke("train", TINY, "--resume", run.info.run_id)
    assert result.exit_code == 0, result.output
    statuses = models()
    assert statuses.pop(orphan).endswith("FAILED")
    assert [s.split(".")[-1] for s in statuses.values()] == ["READY"]  # the model logged by the resumed run
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("name", ["checkpoint.pt", "weights.pt"])
def test_a_file_that_is_not_a_torch_file_is_called_so(tmp_path: Path, name: str):
    import pickle
    import random

    from picollm.model.weights import load_state_dict

    load = optim.load_checkpoint if name == "checkpoint.pt" else load_state_dict
    path = tmp_path / name
    noise = random.Random(0).randbytes(4096)
    assert noise[:2] != b"PK" and noise[0] != 0x80
    for content, fragment in (
        (noise, "not a torch file"),
        (b"model: weights\n", "not a torch file"),
        (b"", "the file is empty"),
    ):
        path.write_bytes(content)
        with pytest.raises(PicollmError, match=fragment) as err:
            load(path)
        assert "pickled objects" not in str(err.value)
    path.write_bytes(pickle.dumps(Path("x")))  # a pickle of something other than tensors: that one is
    with pytest.raises(PicollmError, match="pickled objects"):
        load(path)


def corrupt(ckpt: dict, how: str) -> dict:
    bad = {**ckpt, "optimizer": {**ckpt["optimizer"], "state": dict(ckpt["optimizer"]["state"])}}
    state = bad["optimizer"]["state"]
    if how == "moment-shape":
        first = next(iter(state))
        state[first] = {**state[first], "exp_avg": torch.zeros(3)}
    elif how == "param-groups":
        bad["optimizer"]["param_groups"] = bad["optimizer"]["param_groups"][:1]
    elif how == "rng":
        bad["rng_cpu"] = torch.zeros(7, dtype=torch.uint8)
    elif how == "rng-dtype":
        bad["rng_cpu"] = torch.zeros(5056)
    elif how == "scheduler":
        bad["scheduler"] = {**ckpt["scheduler"], "base_lrs": [0.1]}
    elif how == "epoch":
        bad["epoch"] = -1
    elif how == "history":
        bad["history"] = "nope"
    elif how == "missing":
        del bad["scheduler"]
    return bad


BAD_ENTRIES = ["moment-shape", "param-groups", "rng", "rng-dtype", "scheduler", "epoch", "history", "missing"]


@pytest.mark.parametrize("how", BAD_ENTRIES)
def test_validate_checkpoint_names_the_bad_entry(how: str):
    from .test_distributed import fit, train_cfg

    trainer, _ = fit(train_cfg(epochs=1))
    assert trainer.scheduler is not None
    ckpt = trainer.checkpoint(1, trainer.state.step, {})
    model, opt, sched = trainer.model, trainer.optimizer, trainer.scheduler
    optim.validate_checkpoint(ckpt, model, opt, sched)  # the good one passes
    rng = torch.get_rng_state()
    with pytest.raises(ValueError):
        optim.validate_checkpoint(corrupt(ckpt, how), model, opt, sched)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone


def test_a_checkpoint_with_bad_entries_leaves_the_run_as_it_was(migrated_store: str):
    out = invoke("train", TINY, "--set", "tracking.log_model=false", "--set", "train.epochs=1")
    assert out.exit_code == 0, out.output
    [run] = all_runs()
    [path] = Path.cwd().glob(f"mlruns/**/{run.info.run_id}/artifacts/checkpoints/checkpoint.pt")
    good = optim.load_checkpoint(path)
    torch.save(corrupt(good, "moment-shape"), path)
    args = ["train", TINY, "--set", "tracking.log_model=false", "--set", "train.epochs=2", "--resume", run.info.run_id]
    one_line(invoke(*args), 2, "cannot be resumed", "optimizer: exp_avg")
    assert statuses() == ["FINISHED"]


# --------------------------------------------------------------------------------------------------
# Smaller promises


@pytest.mark.parametrize(
    "bad_step, fragment", [(2, "no checkpoint was written yet"), (7, "the checkpoint of epoch 1 is kept")]
)
def test_a_nonfinite_loss_says_which_checkpoint_is_kept(monkeypatch: pytest.MonkeyPatch, bad_step: int, fragment):
    from picollm.errors import TrainingError

    from .test_distributed import fit, poison, train_cfg

    poison(monkeypatch, {bad_step})  # 5 steps per epoch
    with pytest.raises(TrainingError, match=fragment):
        fit(train_cfg())


def test_server_host_problems_are_named_as_such():
    import socket

    from picollm.tracking.server import _port_problem

    assert "cannot be resolved" in (_port_problem("no-such-host.invalid", 5001) or "")
    assert "an address of this machine" in (_port_problem("192.0.2.1", 5001) or "")  # TEST-NET-1: never local
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert "is in use" in (_port_problem("127.0.0.1", s.getsockname()[1]) or "")
