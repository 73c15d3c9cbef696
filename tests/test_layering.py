"""The house's layering, read from the code (AST over picollm/): wings import only the wings below them, the
library never imports pipelines, the model and data never import MLflow, and no module-level import circle.

Wings, bottom to top (a module may import its own wing and any wing below):
  errors < model < config < data < runtime < tracking < training < dpo, interp, compare, sweep < picollm/__init__
Imports inside functions count too (they are kept there for start-up time, not to hide an upward edge).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WINGS = {
    "errors": 0,
    "model": 1,
    "config": 2,
    "data": 3,
    "runtime": 4,
    "tracking": 5,
    "training": 6,
    "dpo": 7,
    "interp": 7,
    "compare": 7,
    "sweep": 7,
    "__init__": 8,  # picollm/__init__.py: the package's facade (load_model, Transformer)
}
NO_MLFLOW = ("model", "data")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    parts = module.split(".")
    return "__init__" if module == "picollm" else parts[1]


def read_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in sorted((ROOT / "picollm").rglob("*.py"))}


def imports(source: str, module: str) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import of the source; `from a import b` yields
    a.b when that is a module of the tree, else a."""
    tree = ast.parse(source)
    top = {id(n) for n in tree.body}
    top |= {id(c) for n in tree.body if isinstance(n, ast.If | ast.Try) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                base = ".".join([*pkg, base] if base else pkg)
            out += [(f"{base}.{a.name}", id(node) in top, node.lineno) for a in node.names]
            out.append((base, id(node) in top, node.lineno))
    return out


def problems(sources: dict[str, str]) -> list[str]:
    """Every violation of the layering in `sources` (module name -> code)."""
    found: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for mod, src in sources.items():
        for target, at_top, line in imports(src, mod):
            if target.split(".")[0] == "pipelines":
                found.append(f"{mod}:{line} imports {target}: the library never imports pipelines")
            if target.split(".")[0] == "mlflow" and wing(mod) in NO_MLFLOW:
                found.append(f"{mod}:{line} imports mlflow: the {wing(mod)} wing never does")
            if target not in sources or target == mod:
                continue
            if WINGS[wing(target)] > WINGS[wing(mod)]:
                found.append(f"{mod}:{line} imports {target}: {wing(mod)} climbs up to {wing(target)}")
            if at_top:
                graph[mod].add(target)
    found += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    return sorted(set(found))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append([*sorted(comp), sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_every_module_belongs_to_a_wing():
    assert {wing(m) for m in read_sources()} <= set(WINGS)


def test_the_library_keeps_its_layering():
    assert problems(read_sources()) == []


@pytest.mark.parametrize(
    ("module", "planted", "word"),
    [
        ("picollm.model.transformer", "from picollm.tracking import runs\n", "model climbs up to tracking"),
        ("picollm.data.splits", "def f():\n    from picollm.training import trainer\n", "data climbs up to training"),
        ("picollm.model.hooks", "import mlflow\n", "model wing never does"),
        ("picollm.compare.stats", "from pipelines import cli\n", "never imports pipelines"),
        ("picollm.training.optim", "from picollm.training import trainer\n", "import circle"),
    ],
)
def test_a_planted_violation_is_found(module, planted, word):
    sources = read_sources()
    sources[module] = planted + sources[module]
    assert any(word in p for p in problems(sources)), problems(sources)


# Config keys that happen to spell a mixer's name (not a branch on one): compare's two-model shorthand
# `compare.linear` (the second variant's registered models).
KEYS_NOT_MIXERS = {("picollm/config/compare.py", "linear")}


def mixer_names_in_code(path: Path, names: set[str]) -> list[str]:
    """String constants equal to a mixer name, docstrings aside."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef) and n.body and isinstance(n.body[0], ast.Expr)
    }
    rel = str(path.relative_to(ROOT))
    return [
        f"{rel}:{n.lineno} {n.value!r}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value in names and id(n) not in docstrings
        and (rel, n.value) not in KEYS_NOT_MIXERS
    ]  # fmt: skip


def test_no_code_outside_the_mixers_names_a_mixer():
    from picollm.model import mixers

    names = set(mixers.names())
    files = [*sorted((ROOT / "picollm").rglob("*.py")), *sorted((ROOT / "pipelines").rglob("*.py"))]
    outside = [p for p in files if (ROOT / "picollm" / "model" / "mixers") not in p.parents]
    assert [hit for p in outside for hit in mixer_names_in_code(p, names)] == []
    assert mixer_names_in_code(ROOT / "picollm" / "model" / "mixers" / "__init__.py", names)  # the check sees names
