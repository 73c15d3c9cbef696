"""`make docs`: write the generated references, or with --check say which is stale (exit 1).

docs/reference/config.md   every config key, from the schemas' descriptions (picollm/config/reference.py)
docs/reference/mixers.md   every token mixer, from the registry (picollm/model/mixers/catalog.py)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from picollm.config import reference
from picollm.model.mixers import catalog


def references(config_path: Path = reference.DOC) -> dict[Path, Callable[[], str]]:
    """Each generated file and what renders it (the mixer catalog is rendered on demand: it imports torch)."""
    return {config_path: reference.render, catalog.DOC: catalog.render}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs from what generates it")
    parser.add_argument("--config-output", type=Path, default=reference.DOC, help="default: docs/reference/config.md")
    args = parser.parse_args(argv)
    stale = []
    for path, render in references(args.config_output).items():
        text = render()
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {path}")
    missing = [f"{s.__name__}.{name}" for s in reference.schemas() for name in reference.missing_descriptions(s)]
    if missing:
        print(f"warning: fields without a description: {', '.join(missing)}", file=sys.stderr)
    if stale:
        print(f"stale: {', '.join(str(p) for p in stale)}: run `make docs`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
