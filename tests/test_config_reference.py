"""docs/reference/config.md is generated from the config schemas' descriptions (picollm.config.reference):
it must be current, every field must have a description, and every key must be in it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from picollm.config import ServerConfig, TrainConfig, read_yaml, validate
from picollm.config import reference as ref
from picollm.config.base import StrictModel

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ref.schemas()


def test_committed_reference_is_current() -> None:
    problem = ref.check()
    assert problem is None, f"{problem} (make docs)"


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_every_field_has_a_description(schema: type[BaseModel]) -> None:
    missing = ref.missing_descriptions(schema)
    assert not missing, f"{schema.__name__} fields without Field(description=...): {missing}"


@pytest.mark.parametrize("kind", ref.KINDS, ids=lambda k: k.name)
def test_every_key_is_in_the_reference(kind: ref.Kind) -> None:
    text = ref.render()
    missing = [key for key in ref.keys(kind.schema) if f"`{key}`" not in text]
    assert not missing, f"{kind.schema.__name__} keys missing from docs/reference/config.md: {missing}"


def test_every_schema_field_name_is_a_documented_key() -> None:
    documented = {k.split(".")[-1] for k in re.findall(r"`([\w.*<>\[\]]+)`", ref.render())}
    missing = [f"{s.__name__}.{n}" for s in SCHEMAS for n in s.model_fields if n not in documented]
    assert not missing


def test_schemas_reach_every_nested_model() -> None:
    names = {s.__name__ for s in SCHEMAS}
    # ModelConfig through TrainRunConfig.model, list items (Variant) and mapping values (ParamSpace)
    assert {"TrainRunConfig", "ModelConfig", "Variant", "ParamSpace", "SFTConfig", "BenchRunsConfig"} <= names


def test_every_config_file_is_listed_once_and_validates() -> None:
    listed = [name for kind in ref.KINDS for name in kind.configs.split()]
    on_disk = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert sorted(listed) == on_disk
    for kind in ref.KINDS:
        for name in kind.configs.split():
            validate(kind.schema, read_yaml(ROOT / "configs" / f"{name}.yaml"), source=name)


def test_render_is_deterministic_and_portable() -> None:
    first, second = ref.render(), ref.render()
    assert first == second
    assert str(ROOT) not in first and "\r" not in first
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", first)  # no date
    assert first.startswith("# Config reference") and "make docs" in first.split("\n## ")[0]


def test_a_removed_description_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    doc = tmp_path / "config.md"
    doc.write_text(ref.render(), encoding="utf-8")
    assert ref.check(doc) is None
    monkeypatch.setattr(TrainConfig.model_fields["epochs"], "description", "")
    assert ref.missing_descriptions(TrainConfig) == ["epochs"]
    assert "stale" in (ref.check(doc) or "")


def test_an_added_field_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    doc = tmp_path / "config.md"
    doc.write_text(ref.render(), encoding="utf-8")

    class Grown(ServerConfig):
        new_knob: int = 3

    kinds = tuple(
        k if k.schema is not ServerConfig else ref.Kind(k.name, Grown, k.command, k.configs) for k in ref.KINDS
    )
    monkeypatch.setattr(ref, "KINDS", kinds)
    assert "stale" in (ref.check(doc) or "")
    assert Grown in ref.schemas() and ref.missing_descriptions(Grown) == ["new_knob"]
    assert "| `new_knob` | `int` | `3` |  |" in ref.render()


class _Inner(StrictModel):
    depth: int = Field(2, ge=1, le=8, description="how deep")


class _Outer(StrictModel):
    mode: Literal["a", "b"] | None = Field(None, description="which")
    ratio: float = Field(0.5, gt=0, lt=1, description="a share | of it")
    names: list[str] = Field(min_length=1, description="at least one <name>")
    inner: _Inner = Field(default_factory=lambda: _Inner(depth=3), description="the inner part")
    items: list[_Inner] = Field(default_factory=list, description="several")
    table: dict[str, _Inner] = Field(default_factory=dict, description="by name")


def test_nested_models_become_dotted_sections() -> None:
    kind = ref.Kind("Test", _Outer, "test CONFIG", "test")
    r = ref._Renderer()
    r.table(kind, "", _Outer, None)
    text = "\n".join(r.lines)
    assert '| `mode` | `"a" \\| "b" \\| null` | `null` | which |' in text
    assert "| `ratio` | `float in (0, 1)` | `0.5` | a share \\| of it |" in text
    assert "| `names` | `non-empty list[str]` | required | at least one \\<name> |" in text
    assert (
        "### `inner`" in text and "| `inner.depth` | `int in [1, 8]` | `3` | how deep |" in text
    )  # the parent's default
    assert "### `items[*]`" in text and "| `items[*].depth` | `int in [1, 8]` | `2` | how deep |" in text
    assert "### `table.<key>`" in text and "`table.<key>.depth`" in text
    assert list(ref.keys(_Outer)) == [
        "mode", "ratio", "names", "inner", "inner.depth", "items", "items[*].depth", "table", "table.<key>.depth"
    ]  # fmt: skip


def test_types_and_defaults_read_as_yaml() -> None:
    assert ref.type_text(int | None) == "int | null"
    assert ref.type_text(tuple[int, int]) == "[int, int]"
    assert ref.type_text(Path) == "path"
    assert ref.type_text(str) == "str"  # e.g. model.attention once it is checked against a registry
    assert ref.default_text(Path("configs/linear.yaml")) == '"configs/linear.yaml"'
    long = ref.default_text([{"name": f"variant{i}", "model": {}} for i in range(20)])
    assert long.endswith("(20 items)") and len(long) < 100


def test_check_command_exits_1_when_stale(tmp_path: Path) -> None:
    from pipelines import docs

    doc = tmp_path / "config.md"
    doc.write_text("# old\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "pipelines.docs", "--check", "--config-output", str(doc)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert out.returncode == 1 and "make docs" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert str(doc) in out.stderr and "mixers.md" not in out.stderr  # only the stale one is named
    assert docs.main(["--config-output", str(doc)]) == 0 and docs.main(["--check", "--config-output", str(doc)]) == 0
    assert doc.read_text(encoding="utf-8") == ref.render()


def test_reference_imports_no_torch() -> None:
    code = "import sys, picollm.config.reference; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
