"""The strict base schema and config loading: YAML files, dotted `--set` overrides, validation with
one-line errors, flattening for MLflow params."""

from __future__ import annotations

import difflib
import posixpath
from collections.abc import Iterable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from picollm.config.yaml_safe import load_text, read_text
from picollm.errors import ConfigError, elide

# The rule families (each token follows from the last one or two) are the default workload; the recall
# families (picollm.generators) need the whole context and are chosen explicitly (`data.seq_types`).
RULE_FAMILIES = ("counting", "arithmetic", "geometric", "alternating", "random_walk")
RECALL_FAMILIES = ("mqar", "copy")
FAMILIES = RULE_FAMILIES + RECALL_FAMILIES
Family = Literal["counting", "arithmetic", "geometric", "alternating", "random_walk", "mqar", "copy"]


# Seeds reach numpy (non-negative, < 2^64) and torch generators (< 2^64), also as sums and products
# (data.seed + seed, seed * 1_000_003 + epoch): 31 bits leave room for all of them.
MAX_SEED = 2**31 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Beta = Annotated[float, Field(ge=0, lt=1)]  # an AdamW beta of 1 or more fails inside torch, at the first step


def model_name_problem(name: str) -> str | None:
    """Why MLflow's model registry would refuse `name` (its rules: not blank, no '/' or ':', a plain,
    normalised path segment), or None; checked before training, not after it."""
    if not name.strip():
        return "must not be blank"
    if "/" in name or ":" in name:
        return "must not contain '/' or ':'"
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        return "must be a plain name (no '.', '..' or redundant separators)"
    return None


class StrictModel(BaseModel):
    # No NaN or inf in any float: `lr: .inf` would otherwise pass and fail deep inside a run.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


# --------------------------------------------------------------------------------------------------
# Loading

C = TypeVar("C", bound=BaseModel)


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate `word` most likely misspells, or None: every "did you mean" of the configs and the sweep."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def _models_in(tp: Any) -> list[Any]:
    """`tp` with Annotated, Optional and unions unwrapped: its alternatives."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _models_in(get_args(tp)[0])
    if origin in (Union, UnionType):
        return [m for a in get_args(tp) for m in _models_in(a)]
    return [tp]


def known_keys(schema: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """The keys a mapping at `path` (a validation error's location) may have, read from the schema: through
    sections, lists and dicts of sections; parts that name no field (a union's tag) are stepped over."""
    types: list[Any] = [schema]
    for part in path:
        nxt = []
        for tp in (m for t in types for m in _models_in(t)):
            origin, args = get_origin(tp), get_args(tp)
            if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
                if part in tp.model_fields:
                    nxt.append(tp.model_fields[part].annotation)
            elif origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
                nxt.append(args[0])
            elif origin is dict and len(args) == 2:
                nxt.append(args[1])
        types = nxt or types
    keys = [
        k
        for t in types
        for m in _models_in(t)
        if isinstance(m, type) and issubclass(m, BaseModel)
        for k in m.model_fields
    ]
    return list(dict.fromkeys(keys))


def first_error(err: ValidationError, schema: type[BaseModel] | None = None, prefix: str = "") -> str:
    """`<prefix><key>: <why>` of the first error (and how many more); an unknown key names the known key it
    most likely misspells (with `schema`, the one validated)."""
    first = err.errors()[0]
    path = tuple(first["loc"])
    loc = prefix + ".".join(str(p) for p in path) if path else prefix.rstrip(".")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
        near = closest(str(path[-1]), known_keys(schema, path[:-1])) if schema is not None and path else None
        if near is not None:
            msg += f" (did you mean {prefix}{'.'.join(str(p) for p in (*path[:-1], near))}?)"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {elide(repr(first['input']), 80)})"  # a huge value must not flood the line
    msg = msg.removeprefix("Value error, ")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`model.d_model=64` -> (["model", "d_model"], 64); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = load_text(raw, f"override {key}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_key(raw: dict[str, Any], path: list[str], value: Any, what: str = "override") -> None:
    """raw[path[0]][path[1]]... = value, creating sections on the way (`what` names it in errors)."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        set_key(raw, path, value, f"override {item!r}")
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = read_text(path)  # size limit; not UTF-8 -> the byte offset
    try:
        raw = load_text(text, str(path)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def validate(schema: type[C], raw: dict[str, Any], source: str = "config") -> C:
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {first_error(e, schema)}") from None


def load_config(schema: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read a YAML config (or start from defaults), apply `key=value` overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return validate(schema, raw, source=str(path) if path is not None else "config")


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
