"""README stays true and short: every CLI command and make target is documented, links resolve, no changelog."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))

MAX_README_LINES = 300
# Sentences that describe a change rather than the project: they belong in commit messages.
CHANGELOG_PATTERNS = [
    r"\bwas [0-9][0-9,.]* in\b",  # "136 keys, was 2,475 in 920"
    r"\bthis (release|session|change|PR)\b",
    r"\bnow\b",
    r"\bno longer\b",
    r"\bused to\b",
    r"\bfaster than before\b",
    r"\bbefore this\b",
]


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


def test_readme_fits_on_a_screen_or_two() -> None:
    n = len(README.splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/"


def _relative_links(text: str) -> list[str]:
    """Targets of markdown links and images outside code, without external URLs and pure anchors."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # fenced code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    targets = re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", t)]


def test_link_helper_finds_relative_links_only() -> None:
    text = "[a](docs/x.md#y) ![b](img.png) [c](https://e.org) [d](#top) `[e](f.md)`\n```\n[g](h.md)\n```\n"
    assert _relative_links(text) == ["docs/x.md#y", "img.png"]


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page: Path) -> None:
    broken = [
        target for target in _relative_links(page.read_text()) if not (page.parent / target.split("#", 1)[0]).exists()
    ]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_has_no_changelog_sentences() -> None:
    hits = [
        f"line {i}: {line.strip()}"
        for i, line in enumerate(README.splitlines(), 1)
        for pattern in CHANGELOG_PATTERNS
        if re.search(pattern, line, flags=re.I)
    ]
    assert not hits, "README.md describes changes, not the project:\n" + "\n".join(hits)
