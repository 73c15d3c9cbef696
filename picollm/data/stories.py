"""Story texts for `picollm dpo`: from the Hugging Face hub (streamed) or local .txt/.jsonl files, checked and
deduplicated. Every problem with the input is one PicollmError line, raised in seconds (an unreachable hub is
probed first rather than left to datasets' half-minute of retries)."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from picollm.config import DPODataConfig
from picollm.errors import PicollmError

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".jsonl")
HUB_HINT = "use local stories instead: data.source: files with data.path: a .txt/.jsonl file"
_STORY_SEPARATOR = re.compile(r"<\|endoftext\|>|\n\s*\n")


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs an ERROR line before raising on a bad file; the PicollmError says it once."""
    import datasets

    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hub_offline() -> bool:
    """Offline as the hub libraries see it (they read HF_HUB_OFFLINE once, at import): then
    load_dataset fails at once or uses the local cache; otherwise it would retry for half a minute."""
    import datasets.config
    from huggingface_hub import constants

    return bool(datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE)


def _probe_hub(timeout: float = 5.0) -> None:
    """Fail in seconds, not after datasets' half-minute of retries, when the hub is unreachable."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # the server answered: reachable
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PicollmError(f"the Hugging Face hub ({endpoint}) is unreachable ({reason}); {HUB_HINT}") from None


def _hub_stories(cfg: DPODataConfig) -> list[str]:
    import datasets
    from datasets.exceptions import DatasetsError

    if not _hub_offline():
        _probe_hub()
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(cfg.dataset, split=cfg.split, streaming=True)  # no full download
            if cfg.limit is not None:
                ds = ds.take(cfg.limit)
            rows = [row.get(cfg.text_field) for row in ds]
    except (OSError, DatasetsError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PicollmError(f"cannot load {cfg.dataset!r} from the Hugging Face hub ({first}); {HUB_HINT}") from None
    return _texts(rows, cfg.dataset, cfg.text_field)


def resolve_files(path: str) -> list[Path]:
    """A file, a directory (its .txt/.jsonl files) or a glob -> the story files, checked."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in FILE_SUFFIXES and f.is_file())
        if not files:
            raise PicollmError(f"data.path: directory {p} holds no .txt or .jsonl files")
    elif glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(path)) if Path(f).is_file())
        if not files:
            raise PicollmError(f"data.path: no files match {path}")
    elif p.is_file():
        files = [p]
    else:
        raise PicollmError(f"data.path: {p} not found")
    bad = [f.name for f in files if f.suffix not in FILE_SUFFIXES]
    if bad:
        raise PicollmError(f"data.path: {bad[0]} is neither .txt nor .jsonl")
    for f in files:
        if f.stat().st_size == 0:
            raise PicollmError(f"data.path: {f} is empty")
    return files


def _file_stories(cfg: DPODataConfig) -> list[str]:
    import datasets

    assert cfg.path is not None
    stories: list[str] = []
    for f in resolve_files(cfg.path):
        left = None if cfg.limit is None else cfg.limit - len(stories)
        try:
            # Streamed and cut at data.limit, so a large file is neither cached nor read whole.
            with _quiet_datasets():
                if f.suffix == ".jsonl":
                    ds = datasets.load_dataset("json", data_files=str(f), split="train", streaming=True)
                    rows = [row.get(cfg.text_field) for row in itertools.islice(ds, left)]
                    stories += _texts(rows, str(f), cfg.text_field)
                else:  # stories separated by blank lines or <|endoftext|>
                    ds = datasets.load_dataset(
                        "text", data_files=str(f), split="train", streaming=True, sample_by="paragraph"
                    )
                    for row in ds:
                        stories += [s for s in _STORY_SEPARATOR.split(row["text"]) if s.strip()]
                        if cfg.limit is not None and len(stories) >= cfg.limit:
                            break
        except PicollmError:
            raise
        except Exception as e:  # pyarrow/datasets raise many types for a malformed file
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise PicollmError(f"data.path: cannot read {f}: {first}") from None
        if cfg.limit is not None and len(stories) >= cfg.limit:
            break
    return stories[: cfg.limit] if cfg.limit is not None else stories


def _texts(rows: list[object], source: str, text_field: str) -> list[str]:
    if rows and all(r is None for r in rows):
        raise PicollmError(f"{source}: rows have no {text_field!r} field (set data.text_field)")
    bad = next((r for r in rows if r is not None and not isinstance(r, str)), None)
    if bad is not None:
        raise PicollmError(f"{source}: field {text_field!r} holds {type(bad).__name__}, not text")
    return [r for r in rows if isinstance(r, str) and r.strip()]


def load_stories(cfg: DPODataConfig) -> list[str]:
    """Story texts from the hub (streamed, at most data.limit) or local files; deduplicated."""
    stories = _hub_stories(cfg) if cfg.source == "tinystories" else _file_stories(cfg)
    unique = list(dict.fromkeys(s.strip() for s in stories))
    where = cfg.dataset if cfg.source == "tinystories" else cfg.path
    if not unique:
        raise PicollmError(f"data: no stories in {where}")
    log.info("loaded %d stories (%d duplicates dropped) from %s", len(unique), len(stories) - len(unique), where)
    return unique
