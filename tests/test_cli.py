"""The `picollm` command line: user errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from typer.testing import CliRunner

import picollm
from picollm.tracking.prompts import continue_prompts
from pipelines.cli import app

from .conftest import TINY

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for f in fragments:
        assert f in lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def no_runs() -> bool:
    return mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.fixture
def bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("model: [d_model\n")
    return path


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "model.attention=foo"], ["model.attention"]),
        (["--set", "model.foo=1"], ["model.foo", "unknown key"]),
        (["--set", "train.lr"], ["section.key=value"]),
        (["--set", "model.d_model=10", "--set", "model.n_heads=3"], ["divisible"]),
    ],
    ids=["bad-value", "unknown-key", "bad-override-syntax", "d_model-heads"],
)
def test_train_config_errors(args, fragments):
    assert_user_error(invoke("train", TINY, *args), *fragments)


def test_train_missing_config_file():
    assert_user_error(invoke("train", "nope.yaml"), "nope.yaml", "not found")


def test_train_invalid_yaml(bad_yaml):
    assert_user_error(invoke("train", bad_yaml), "not valid YAML")


def test_bad_config_leaves_no_run(tmp_path):
    assert_user_error(invoke("train", TINY, "--set", "model.attention=foo"), "model.attention")
    assert not (tmp_path / "mlflow.db").exists()  # failed before even opening the store: no run possible


@pytest.mark.slow
def test_user_error_in_a_new_store_is_one_line(tmp_path):
    """The first command in a new directory creates the store; MLflow's migration log lines must not
    surround the error line."""
    assert not (tmp_path / "mlflow.db").exists()
    assert_user_error(invoke("generate", "nope", "1 2 3"), "nope")


def test_bad_data_settings_leave_no_run(migrated_store):
    # validated by the schema, but too small a parameter space: found after the store is opened
    result = invoke("train", TINY, "--set", "data.start_range=[0,1]")
    assert_user_error(result, "counting")
    assert no_runs()  # in particular, nothing left RUNNING


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_user_error(migrated_store):
    assert_user_error(invoke("train", TINY, "--set", "train.device=cuda"), "cuda")
    assert no_runs()


def test_resume_unknown_run(migrated_store):
    assert_user_error(invoke("train", TINY, "--resume", "0123456789abcdef0123456789abcdef"), "no run")
    assert no_runs()


def test_subprocess_bad_config(tmp_path):
    exe = Path(sys.executable).with_name("picollm")
    env = {**os.environ, "PICOLLM_DEBUG": ""}
    proc = subprocess.run(
        [str(exe), "train", str(TINY), "--set", "model.attention=foo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "model.attention" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# --------------------------------------------------------------------------------------------------
# With a trained model (conftest.trained)


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt, fragment",
    [("1 x 3", "not an integer"), ("1 2 99", "outside"), ("1 31", "outside"), ("", "empty"), ("   ", "empty")],
    ids=["non-integer", "out-of-range", "pad-token", "empty", "blank"],
)
def test_generate_bad_prompts(use_trained, prompt, fragment):
    assert_user_error(invoke("generate", use_trained.name, prompt), fragment)


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["nope", "{name}@nope", "{name}/7", "0123456789abcdef0123456789abcdef"])
def test_generate_unknown_model(use_trained, ref):
    assert_user_error(invoke("generate", ref.format(name=use_trained.name), "1 2 3"))


@pytest.mark.slow
def test_models_list_and_promote_errors(use_trained):
    result = invoke("models", "list")
    assert result.exit_code == 0, result.output
    assert use_trained.name in result.stdout and "@champion=v1" in result.stdout
    assert_user_error(invoke("models", "promote", use_trained.name, "42"), "42")


@pytest.mark.slow
def test_train_then_generate(migrated_store):
    result = invoke("train", TINY, "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert "registered picollm-tiny v1" in result.stdout
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout

    result = invoke("generate", "picollm-tiny", "1 2 3")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert re.fullmatch(r"1 2 3 \d+( \d+){7}", line), line
    expected = continue_prompts(picollm.load_model("picollm-tiny@champion"), ["1 2 3"])[0]
    assert line == f"1 2 3 {expected}"

    result = invoke("generate", "picollm-tiny@champion", "1 2 3", "-n", "3")
    assert result.exit_code == 0 and len(result.stdout.split()) == 6


def test_family_table_shows_answer_accuracy_for_recall_families():
    from rich.console import Console

    from pipelines.cli import family_table

    def render(metrics: dict[str, float], families: list[str]) -> str:
        out = Console(width=200, record=True)
        out.print(family_table(metrics, families))
        return out.export_text()

    recall = render({"test/accuracy/mqar": 0.5, "test/accuracy_answer/mqar": 0.998, "test/accuracy": 0.5}, ["mqar"])
    assert "acc answers" in recall and "0.9980" in recall
    assert "acc answers" not in render({"test/accuracy/counting": 0.9, "test/accuracy": 0.9}, ["counting"])


# --------------------------------------------------------------------------------------------------
# Help that matches the code, tables within 80 columns


def _commands(group=None, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command's path (`models list`, `server start`, ...)."""
    import typer

    group = group or typer.main.get_command(app)
    found = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (Typer's own click)
            found += _commands(cmd, (*path, name))
        else:
            found.append((*path, name))
    return found


def _help(*path: str) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_every_example_config_in_the_help_exists_and_is_valid_for_its_command():
    from picollm.config import (
        AnalysisConfig,
        BenchConfig,
        CompareConfig,
        DPORunConfig,
        ServerConfig,
        TrainRunConfig,
        read_yaml,
        validate,
    )
    from picollm.config.sweep import SweepConfig

    schemas = {
        "train": TrainRunConfig,
        "dpo": DPORunConfig,
        "compare": CompareConfig,
        "bench": BenchConfig,
        "sweep": SweepConfig,
        "analyze": AnalysisConfig,
        "server": ServerConfig,
    }
    repo = TINY.parents[1]
    checked = set()
    for path in _commands():
        for example in re.findall(r"configs/[\w.-]+\.ya?ml", _help(*path)):
            assert (repo / example).is_file(), f"{' '.join(path)} --help names {example}, which does not exist"
            schema = schemas.get(path[0])
            assert schema is not None, f"{' '.join(path)} --help names {example}: add its schema here"
            validate(schema, read_yaml(repo / example), source=f"{' '.join(path)} --help: {example}")
            checked.add(path[0])
    assert checked == set(schemas)  # every command with a config shows an example


def test_analyze_help_lists_every_section():
    from typing import get_args

    from picollm.config.analysis import ANALYSIS_SECTIONS, Section

    assert set(get_args(Section)) == set(ANALYSIS_SECTIONS)  # the flow asserts its registry is this list
    text = " ".join(_help("analyze").split())
    description = text.split("Sections:")[1].split(".")[0]
    assert [s.strip() for s in description.split(",")] == list(ANALYSIS_SECTIONS)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert re.fullmatch(r"picollm \S+ \(torch \S+, mlflow \S+, Python \S+\)\n", result.stdout), result.stdout
    assert f"torch {torch.__version__}" in result.stdout and f"mlflow {mlflow.__version__}" in result.stdout


def test_flags_take_no_value_in_any_help():
    for path in [(), ("models",), ("server",), *_commands()]:
        text = _help(*path)
        assert "<bool>" not in text, (path, text)
        assert "--help" in text
    assert re.search(r"--resume\s+Continue the study", _help("sweep"))
    result = invoke("sweep", "--resume", "true")  # a flag takes no value: `true` is an extra argument
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("command", "override", "message"),
    [
        ("train", "train.epoch=3", "train.epoch: unknown key (did you mean train.epochs?)"),
        ("train", "modle.d_model=8", "modle: unknown key (did you mean model?)"),
        ("train", "model.xyz=1", "model.xyz: unknown key"),
        ("compare", "efficiency.lenghts=[8]", "efficiency.lenghts: unknown key (did you mean efficiency.lengths?)"),
        ("compare", "compare.variants=[{name: a, modle: {}}, {name: b}]", "did you mean compare.variants.0.model?"),
        ("compare", "compare.variants=[{name: a}, {name: b, model: {n_head: 2}}]", "did you mean model.n_heads?"),
        ("bench", "variants=[{name: a, model: {d_modl: 8}}]", "did you mean model.d_model?"),
        ("sweep", "objective.metrc=val/loss", "objective.metrc: unknown key (did you mean objective.metric?)"),
    ],
)
def test_unknown_keys_say_what_they_probably_mean(command, override, message):
    configs = TINY.parent
    config = {"train": TINY, "compare": configs / "compare_tiny.yaml", "bench": configs / "bench.yaml"}.get(command)
    result = invoke(command, str(config or configs / "sweep_tiny.yaml"), "--set", override)
    assert_user_error(result, message)
    if "did you mean" not in message:
        assert "did you mean" not in result.stderr  # nothing close: no guess


def _fits(renderable, width: int = 80) -> str:
    """The renderable at `width` columns, asserting it needs no more lines there than on a wide console
    (nothing wrapped or cut) and no line is wider."""
    from rich.console import Console

    narrow, wide = Console(width=width, record=True), Console(width=400, record=True)
    narrow.print(renderable)
    wide.print(renderable)
    text = narrow.export_text()
    assert "…" not in text, text
    assert len(text.splitlines()) == len(wide.export_text().splitlines()), text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width, text
    return text


def test_the_family_table_fits_80_columns():
    from picollm.config.base import FAMILIES
    from pipelines.cli import family_table

    metrics = {
        f"test/{k}{sfx}": 0.8123
        for sfx in ["", *(f"/{f}" for f in FAMILIES)]
        for k in ("accuracy", "ceiling", "accuracy_vs_ceiling", "accuracy_predictable", "accuracy_answer")
    }
    text = _fits(family_table(metrics, list(FAMILIES)))
    assert "random_walk" in text and "acc answers" in text


def test_bench_tables_fit_80_columns_with_every_number_whole():
    from pipelines.tables import markdown

    wide_cell = "15.975 [0.190-15975.123]"
    report = [
        "## Training steps",
        "| N | batch | softmax ms/step | linear ms/step | linear/softmax |",
        "|---|---|---|---|---|",
        "| 4096 | 1 | 1059.1 | 2261.0 | 2.13 |",
        "",
        "| context | softmax cached | softmax fast | linear cached | linear fast | softmax gain | linear gain |",
        "|---|---|---|---|---|---|---|",
        f"| 4096 | {wide_cell} | {wide_cell} | {wide_cell} | {wide_cell} | 1.0x | 12.3x |",
    ]
    from rich.console import Group

    text = _fits(Group(*markdown(report, 80)))
    assert "2261.0" in text and text.count(wide_cell) == 4 and "linear gain" in text
    assert "|" not in text  # tables, not markdown
