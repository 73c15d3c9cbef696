"""Faults that must lose nothing, in-process (CliRunner): crashes, bad input, damaged or crafted
files, an unreachable tracking server, a failing artifact store, torchrun refusals, signal shielding.

The interruption and concurrency faults, which need real processes, are in test_faults_processes.py.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from picollm.config import ModelConfig
from picollm.errors import PicollmError
from picollm.model.transformer import Transformer
from picollm.tracking import registry
from picollm.tracking import store as tracking
from picollm.training import optim
from pipelines.cli import app

from .conftest import REPO, TINY, load_tiny
from .test_dpo import TINY_SYNTHETIC

runner = CliRunner()
DPO_YAML = REPO / "configs" / "dpo.yaml"
COMPARE_TINY = REPO / "configs" / "compare_tiny.yaml"
BENCH_YAML = REPO / "configs" / "bench.yaml"
SWEEP_TINY = REPO / "configs" / "sweep_tiny.yaml"
FAKE_RUN = "0123456789abcdef0123456789abcdef"

# tests/test_dpo.py's tiny synthetic DPO, shortened further (later overrides win)
DPO_TINY = [
    *TINY_SYNTHETIC,
    "sft.epochs=1",
    "dpo.train_pairs=16",
    "dpo.val_pairs=8",
    "dpo.test_pairs=8",
    "dpo.max_steps=2",
    "dpo.num_samples=1",
    "dpo.sample_tokens=2",
]


def invoke(*args: object, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def one_line(result, code: int, *fragments: str) -> str:
    """Exit `code`, exactly one `error:` line on stderr naming the problem, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return lines[0]


def all_runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def statuses() -> list[str]:
    return sorted(r.info.status for r in all_runs())


def assert_none_running() -> None:
    assert "RUNNING" not in statuses()


# --------------------------------------------------------------------------------------------------
# A logged model to damage: learned positions, max_seq_len 16 (so generate -n has a limit)

VICTIM = "victim"


@pytest.fixture
def victim(migrated_store: str) -> Path:
    """Registers VICTIM v1 (random weights; nothing to train) and returns its weights.pt."""
    tracking.init_tracking()
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, pos_encoding="learned", max_seq_len=16)
    torch.manual_seed(0)
    with tracking.tracked_run("victims"):
        registry.log_model(Transformer(cfg), VICTIM)
    [weights] = Path.cwd().glob(f"mlruns/**/{registry.WEIGHTS_FILE}")  # the one logged model of this store
    return weights


class Marker:
    """A pickle whose loading would create a file: proof that nothing was unpickled."""

    path: Path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def crafted(path: Path, marker: Path, via_torch: bool) -> None:
    Marker.path = marker
    if via_torch:
        torch.save({"embed.weight": Marker()}, path)
    else:
        path.write_bytes(pickle.dumps(Marker()))


def damage(path: Path, how: str, marker: Path) -> None:
    good = path.read_bytes()
    if how == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random-bytes":
        path.write_bytes(os.urandom(4096))
    elif how == "crafted-pickle":
        crafted(path, marker, via_torch=False)
    elif how == "crafted-torch-save":
        crafted(path, marker, via_torch=True)
    elif how == "not-a-dict":
        torch.save([1, 2, 3], path)
    elif how == "other-config":
        torch.save(Transformer(ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2)).state_dict(), path)
    else:
        raise AssertionError(how)


DAMAGES = ["truncated", "empty", "random-bytes", "crafted-pickle", "crafted-torch-save", "not-a-dict", "other-config"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_weights_are_one_line_and_never_unpickled(victim: Path, how: str, tmp_path: Path):
    marker = tmp_path / "unpickled-code-ran"
    assert invoke("generate", VICTIM, "1 2 3").exit_code == 0  # the intact model works
    damage(victim, how, marker)
    fragment = "do not match the model config" if how == "other-config" else "cannot load weights.pt"
    one_line(invoke("generate", VICTIM, "1 2 3"), 2, fragment)
    with pytest.raises(PicollmError):  # the pyfunc flavour loads through the same code
        mlflow.pyfunc.load_model(f"models:/{VICTIM}/1")
    assert not marker.exists()


def test_damaged_model_config_is_one_line(victim: Path):
    config = victim.with_name(registry.CONFIG_FILE)
    config.write_text('{"d_model": ')
    one_line(invoke("generate", VICTIM, "1"), 2, "model_config.json", "Invalid JSON")
    config.write_text('{"vocab_size": 32, "d_model": 17, "n_heads": 2}')
    one_line(invoke("generate", VICTIM, "1"), 2, "model_config.json", "divisible")
    victim.unlink()
    one_line(invoke("generate", VICTIM, "1"), 2, "no weights.pt")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["1_2"], "'1_2' is not an integer"),  # int() would take it as 12
        (["١٢"], "not an integer"),  # so would it these Arabic-Indic digits
        (["1 2.5"], "'2.5' is not an integer"),
        (["1 -1"], "outside"),
        (["1 31"], "outside"),  # the pad token
        ([""], "empty"),
        (["1 2 3", "-n", "14"], "max_seq_len (16)"),  # 3 + 14 positions > the learned table
        (["1 " * 16, "-n", "1"], "max_seq_len (16)"),
    ],
    ids=["underscore", "unicode-digits", "float", "negative", "pad", "empty", "n-past-table", "prompt-past-table"],
)
def test_bad_prompts(victim: Path, args: list[str], fragment: str):
    one_line(invoke("generate", VICTIM, *args), 2, fragment)


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("nope", "no registered model"),
        (f"{VICTIM}@nope", "no alias"),
        (f"{VICTIM}/9", "no version 9"),
        (f"{VICTIM}/x", "must be a number"),
        (FAKE_RUN, "no run"),
        ("models:/m-0123", "no logged model"),
    ],
)
def test_unknown_model_references(victim: Path, ref: str, fragment: str):
    one_line(invoke("generate", ref, "1 2"), 2, fragment)
    one_line(invoke("analyze", ref), 2, fragment)
    assert statuses() == ["FINISHED"]  # the victim's run only: no analysis run was started


@pytest.mark.parametrize("alias, fragment", [("latest", "reserved"), ("v3", "reserved"), ("bad/alias", "Invalid")])
def test_promote_bad_alias_or_version(victim: Path, alias: str, fragment: str):
    one_line(invoke("models", "promote", VICTIM, "1", "--alias", alias), 2, f"alias {alias!r}", fragment)
    one_line(invoke("models", "promote", VICTIM, "7"), 2, "no version 7")
    one_line(invoke("models", "promote", "nope", "1"), 2, "no version")


# --------------------------------------------------------------------------------------------------
# Resuming from a damaged checkpoint


@pytest.fixture
def finished_run(migrated_store: str) -> tuple[str, Path]:
    from pipelines.train import run

    out = run(load_tiny("train.epochs=1", "tracking.log_model=false"))
    [ckpt] = Path.cwd().glob(f"mlruns/**/{out.run_id}/artifacts/checkpoints/checkpoint.pt")
    return out.run_id, ckpt


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "random-bytes", "crafted-pickle", "crafted-torch-save", "not-a-dict"])
def test_resume_from_a_damaged_checkpoint(finished_run, how: str, tmp_path: Path):
    run_id, ckpt = finished_run
    marker = tmp_path / "unpickled-code-ran"
    damage(ckpt, how, marker)
    one_line(invoke("train", TINY, "--set", "train.epochs=2", "--resume", run_id), 2, "checkpoint.pt")
    assert not marker.exists()
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"  # refused before the run was reopened


@pytest.mark.slow
def test_resume_with_a_checkpoint_of_another_config(finished_run):
    from pipelines.train import run

    run_id, ckpt = finished_run
    other = run(load_tiny("train.epochs=1", "tracking.log_model=false", "model.d_model=32"))
    [other_ckpt] = Path.cwd().glob(f"mlruns/**/{other.run_id}/artifacts/checkpoints/checkpoint.pt")
    ckpt.write_bytes(other_ckpt.read_bytes())
    one_line(invoke("train", TINY, "--set", "train.epochs=2", "--resume", run_id), 2, "model.d_model")
    assert statuses() == ["FINISHED", "FINISHED"]


@pytest.mark.slow
def test_load_checkpoint_checks_structure_and_shapes(finished_run, tmp_path: Path):
    """optim.load_checkpoint: what a resume should read a checkpoint with (see the report)."""
    _, ckpt = finished_run
    good = optim.load_checkpoint(ckpt)
    assert good["epoch"] == 1
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": good["model"]}, path)
    with pytest.raises(PicollmError, match="not a picollm training checkpoint"):
        optim.load_checkpoint(path)
    torch.save({**good, "model": {k: v[..., :1] for k, v in good["model"].items()}}, path)
    with pytest.raises(PicollmError, match="size mismatch"):
        optim.load_checkpoint(path)


def test_no_code_path_unpickles():
    """Static guard: every torch.load passes weights_only=True; no pickle/cloudpickle loading."""
    offenders = []
    for path in [*REPO.glob("picollm/**/*.py"), *REPO.glob("pipelines/**/*.py")]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth and end < len(text):  # to the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            if "weights_only=True" not in text[m.start() : end]:
                offenders.append(f"{path.name}: {text[m.start() : end]}")
        offenders += [f"{path.name}: {m[0]}" for m in re.finditer(r"\b(c?pickle)\.loads?\(", text)]
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------------
# Crashes inside a flow


def boom(*args, **kwargs):
    raise RuntimeError("boom: something broke\nsecond line of the message")


def test_crash_marks_the_run_failed_with_one_line(migrated_store: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("picollm.training.trainer.Trainer.fit", boom)
    line = one_line(invoke("train", TINY), 1, "RuntimeError: boom: something broke", "--debug")
    assert "second line" not in line
    [run] = all_runs()
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("RuntimeError: boom")
    tb = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/error_traceback.txt")
    assert "Traceback" in tb and "boom" in tb


@pytest.mark.parametrize("how", ["--debug", "PICOLLM_DEBUG=1"])
def test_crash_with_debug_shows_the_traceback(migrated_store: str, monkeypatch: pytest.MonkeyPatch, how: str):
    monkeypatch.setattr("picollm.training.trainer.Trainer.fit", boom)
    args = ["--debug", "train", TINY] if how == "--debug" else ["train", TINY]
    result = invoke(*args, env={"PICOLLM_DEBUG": "1"} if how != "--debug" else None)
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)  # propagated: Python prints its traceback
    assert statuses() == ["FAILED"]
    # not sticky: the next call without --debug is one line again
    one_line(invoke("train", TINY), 1, "RuntimeError: boom")


@pytest.mark.slow
def test_crash_in_dpo_fails_the_parent_and_keeps_the_sft(migrated_store: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("pipelines.dpo.generate_samples", boom)
    one_line(invoke("dpo", DPO_YAML, *sets(DPO_TINY)), 1, "RuntimeError: boom")
    runs = {r.data.tags["picollm.flow"]: r for r in all_runs()}
    assert runs["dpo"].info.status == "FAILED" and "boom" in runs["dpo"].data.tags["error"]
    assert runs["sft"].info.status == "FINISHED"
    assert "test/loss" in runs["dpo"].data.metrics  # logged before the crash: kept


def test_dpo_nonfinite_step_keeps_the_weights_and_fails_the_run(migrated_store: str, monkeypatch: pytest.MonkeyPatch):
    from picollm.dpo.trainer import DPOTrainer

    real, seen = DPOTrainer._terms, {}

    def terms(self, batch, ref_c, ref_r):  # the first training step's loss is NaN
        out = real(self, batch, ref_c, ref_r)
        if not torch.is_grad_enabled() or seen:  # step-0 metrics and evaluations run without grad
            return out
        seen["policy"] = self.policy
        seen["before"] = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        return (out[0] * float("nan"), *out[1:])

    monkeypatch.setattr(DPOTrainer, "_terms", terms)
    one_line(invoke("dpo", DPO_YAML, *sets(DPO_TINY)), 1, "DPO train/loss is not finite at step 1")
    for k, v in seen["policy"].state_dict().items():
        assert torch.equal(v, seen["before"][k]), k  # the bad step never reached the weights
    runs = {r.data.tags["picollm.flow"]: r for r in all_runs()}
    assert runs["dpo"].info.status == "FAILED" and "TrainingError" in runs["dpo"].data.tags["error"]
    assert runs["sft"].info.status == "FINISHED"
    assert_none_running()


# --------------------------------------------------------------------------------------------------
# Tracking store unreachable or unusable: one line, before any work


UNREACHABLE = "http://127.0.0.1:1"
TRACKING_COMMANDS = {
    "train": ["train", TINY],
    "compare": ["compare", COMPARE_TINY],
    "dpo": ["dpo", DPO_YAML, *sets(DPO_TINY)],
    "analyze": ["analyze", "picollm-tiny"],
    "generate": ["generate", "picollm-tiny", "1 2"],
    "models-list": ["models", "list"],
    "models-promote": ["models", "promote", "picollm-tiny", "1"],
    "bench": ["bench", BENCH_YAML],
    "sweep": ["sweep", SWEEP_TINY, "--set", f"base.config={TINY}"],
}


@pytest.mark.parametrize("command", TRACKING_COMMANDS)
def test_unreachable_tracking_server(command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    mlflow.set_tracking_uri(UNREACHABLE)  # as in a fresh process, where only the environment says it
    t0 = time.perf_counter()
    one_line(invoke(*TRACKING_COMMANDS[command]), 2, f"tracking server {UNREACHABLE} is unreachable")
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("ftp://host/x", "unsupported scheme 'ftp'"),
        ("postgresql://u:p@127.0.0.1:1/db", "tracking database 127.0.0.1:1 is unreachable"),
        ("sqlite:///{tmp}/not-a-db.sqlite", "file is not a database"),
        ("sqlite:///{tmp}/a-file/mlflow.db", "is not usable"),
    ],
    ids=["scheme", "database-port", "not-sqlite", "parent-is-a-file"],
)
def test_unusable_tracking_store(uri: str, fragment: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    (tmp_path / "not-a-db.sqlite").write_text("hello")
    (tmp_path / "a-file").write_text("hello")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    one_line(invoke("models", "list"), 2, fragment)
    one_line(invoke("train", TINY), 2, fragment)


# --------------------------------------------------------------------------------------------------
# Artifact store failures


def test_unwritable_artifact_root_fails_the_run_before_training(migrated_store: str, tmp_path: Path):
    (tmp_path / "mlruns").write_text("a regular file where the artifact root should be")
    one_line(invoke("train", TINY), 1, "artifact store", "not writable")
    [run] = all_runs()
    assert run.info.status == "FAILED" and "not writable" in run.data.tags["error"]
    assert "val/loss" not in run.data.metrics  # it failed before any training work


def test_failed_upload_mid_run_keeps_the_metrics(migrated_store: str, monkeypatch: pytest.MonkeyPatch):
    """A real file-system failure at a real upload: once training has started, `figures/` in the run's
    artifact directory becomes a regular file, so logging the figures after the last epoch fails."""
    from pipelines.cli import RichReporter

    start = RichReporter.on_train_start

    def sabotage(self, *args):
        artifacts = Path(mlflow.get_artifact_uri().removeprefix("file://"))
        (artifacts / "figures").write_text("not a directory")
        start(self, *args)

    monkeypatch.setattr(RichReporter, "on_train_start", sabotage)
    one_line(invoke("train", TINY, "--set", "train.epochs=2"), 1, "I/O error", "figures")
    [run] = all_runs()
    assert run.info.status == "FAILED" and "I/O error" in run.data.tags["error"]
    client = MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2  # both epochs kept
    assert "test/accuracy" in run.data.metrics  # and the test metrics logged before the figures
    assert "checkpoints" in {a.path for a in client.list_artifacts(run.info.run_id)}


# --------------------------------------------------------------------------------------------------
# torchrun: flows without DDP refuse


@pytest.mark.parametrize(
    "args",
    [["dpo", DPO_YAML, *sets(DPO_TINY)], ["compare", COMPARE_TINY], ["analyze", "picollm-tiny"]],
    ids=["dpo", "compare", "analyze"],
)
def test_flows_without_ddp_refuse_torchrun(migrated_store: str, args: list):
    flow = args[0]
    result = invoke(*args, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    one_line(result, 2, f"{flow} does not support torchrun/DDP (WORLD_SIZE=2)")
    assert all_runs() == []


# --------------------------------------------------------------------------------------------------
# Bad input elsewhere: DPO data files, usage errors


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.jsonl", "", "is empty"),
        ("blank.txt", "\n\n  \n", "no stories"),
        ("broken.jsonl", '{"text": "Once upon a time."\n', "cannot read"),
        ("other-field.jsonl", '{"story": "Once upon a time."}\n', "no 'text' field"),
        ("number.jsonl", '{"text": 5}\n', "holds int"),
        ("binary.txt", b"\xff\xfe\x00\x81" * 64, "cannot read"),
        ("stories.csv", "text\nOnce.\n", "neither .txt nor .jsonl"),
    ],
)
def test_dpo_bad_data_files(migrated_store: str, tmp_path: Path, name: str, content, fragment: str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line(invoke("dpo", DPO_YAML, "--set", "data.source=files", "--set", f"data.path={path}"), 2, fragment)
    assert all_runs() == []


def main_usage_error(argv: list, fragment: str, monkeypatch, capsys) -> None:
    """Run the real entry point (pipelines.cli:main) on `argv`: exit 2 and one `error:` line with `fragment`."""
    from pipelines import cli

    monkeypatch.setattr("sys.argv", ["picollm", *map(str, argv)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        for s, h in handlers.items():  # main() installs its own
            signal.signal(s, h)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["generate", "m"], "Missing argument 'prompt'"),
        (["generate", "m", "1", "--top-k", "0"], "--top-k"),
        (["generate", "m", "1", "-n", "x"], "--max-new-tokens"),
        (["train", TINY, "--bogus"], "No such option"),
        (["nosuchcommand"], "No such command"),
    ],
    ids=["missing-arg", "option-range", "option-type", "unknown-option", "unknown-command"],
)
def test_usage_errors_are_one_line(argv: list, fragment: str, monkeypatch, capsys):
    """The real entry point, not CliRunner: click's usage box becomes one line."""
    main_usage_error(argv, fragment, monkeypatch, capsys)


# --------------------------------------------------------------------------------------------------
# Closing a run is shielded from a second Ctrl-C


def test_deferred_signals_hold_then_deliver():
    got = []
    with pytest.raises(KeyboardInterrupt), tracking.deferred_signals():
        signal.raise_signal(signal.SIGINT)
        got.append("the block ran to its end")
    assert got == ["the block ran to its end"]
    with tracking.deferred_signals(redeliver=False):
        signal.raise_signal(signal.SIGINT)  # dropped: nothing raised


def test_second_ctrl_c_while_closing_still_marks_killed(migrated_store: str, monkeypatch: pytest.MonkeyPatch):
    tracking.init_tracking()
    end_run = mlflow.end_run

    def impatient_end_run(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C again while the run is being closed
        return end_run(*args, **kwargs)

    monkeypatch.setattr(mlflow, "end_run", impatient_end_run)
    with pytest.raises(KeyboardInterrupt), tracking.tracked_run("shielded"):
        raise KeyboardInterrupt
    monkeypatch.setattr(mlflow, "end_run", end_run)
    [run] = all_runs()
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted"


def test_concurrent_registrations_get_distinct_versions(migrated_store: str):
    """Four runs register the same name at the same instant (threads released by one barrier)."""
    tracking.init_tracking()
    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2))
    n = 4
    barrier, versions, errors = threading.Barrier(n), [], []

    def register(i: int) -> None:
        try:
            with tracking.tracked_run("race", f"racer-{i}"):
                barrier.wait(timeout=60)
                versions.append(registry.log_model(model, "raced")[1])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(int(v) for v in versions) == list(range(1, n + 1))
    assert statuses() == ["FINISHED"] * n
    assert str(MlflowClient().get_registered_model("raced").aliases["champion"]) == "1"  # all racers agree
