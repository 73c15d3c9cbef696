"""README stays true: every config key, CLI command and make target is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from picollm import config as cfgmod
from picollm.config import sweep as sweep_space

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _schemas() -> list[type[BaseModel]]:
    found = [
        obj
        for module in (cfgmod, sweep_space)  # every module that defines config schemas
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, cfgmod.StrictModel) and obj is not cfgmod.StrictModel
    ]
    return list(dict.fromkeys(found))


@pytest.mark.parametrize("schema", _schemas(), ids=lambda s: s.__name__)
def test_every_config_key_is_documented(schema: type[BaseModel]) -> None:
    missing = [key for key in schema.model_fields if f"`{key}`" not in README]
    assert not missing, f"{schema.__name__} keys missing from README.md: {missing}"


def test_every_cli_command_is_documented() -> None:
    import typer.main

    from pipelines.cli import app

    group = typer.main.get_command(app)
    names = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        names += [f"picollm {name} {sub}" for sub in subs] if subs else [f"picollm {name}"]
    missing = [n for n in names if n not in README]
    assert not missing, f"commands missing from README.md: {missing}"


def test_every_make_target_is_documented() -> None:
    targets = re.findall(r"^([a-z][a-z-]*):.*## ", (ROOT / "Makefile").read_text(), flags=re.M)
    assert "train-linear" in targets and "test" in targets
    missing = [t for t in targets if f"make {t}" not in README]
    assert not missing, f"make targets missing from README.md: {missing}"


def test_quick_start_comes_first() -> None:
    first_block = README.split("```")[1]
    assert first_block.strip().splitlines()[1].startswith("make train-linear")
    assert "make test" in first_block
