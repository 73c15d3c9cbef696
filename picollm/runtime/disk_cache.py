"""A per-user cache of what a run would otherwise recompute identically every time: the data splits with
their Bayes ceilings and seen-context flags (keyed by the data config's digest), and the matmul peak
(keyed by the machine, the torch version and the thread count).

Where: `$PICOLLM_CACHE_DIR`, else `$XDG_CACHE_HOME/picollm`, else `~/.cache/picollm`;
`PICOLLM_CACHE=off` turns both caches off. Delete the directory to re-measure the peak.

Keys. A data entry's key is the SHA-256 of the data config (every field, JSON with sorted keys), the
build arguments, the source of picollm/data/{splits,generators,recall_families}.py, and this module's own
source and `LAYOUT` (how an entry is laid out): a changed config, generator or cache layout never reads an
old entry. The key is also stored inside the entry and checked on load, with a SHA-256 of the payload, and
the data read back is checked for its shape (lists of arrays of one length per split, families as
strings). An entry that cannot be read for any reason (truncated, corrupted, mislabelled, of another
layout) is recomputed and rewritten, with one warning line; it never fails the run.
Writes go to a temporary file in the same directory, then `os.replace`:
processes racing on one key (DDP ranks, sweep workers) each write a whole file, and readers only ever
see a whole one. Entries hold only tensors, strings and numbers, read back with torch's weights-only
loader: like every other load in picollm, reading the cache never unpickles code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from picollm.config import DataConfig
    from picollm.data.splits import SyntheticData

log = logging.getLogger(__name__)

MAGIC = b"picollm-cache v1\n"
LAYOUT = 2  # of a data entry (`_data_state`); part of its key, with this module's source
_SOURCES = ("splits.py", "generators.py", "recall_families.py")  # in picollm/data/


def cache_dir() -> Path | None:
    """The cache directory, or None when caching is off."""
    if os.environ.get("PICOLLM_CACHE", "").lower() in ("0", "off", "false", "no"):
        return None
    if os.environ.get("PICOLLM_CACHE_DIR"):
        return Path(os.environ["PICOLLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "picollm"


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _code_fingerprint() -> str:
    """The data code that builds an entry and this module, which lays it out and reads it back."""
    here = Path(__file__).resolve().parents[1] / "data"
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def data_key(cfg: DataConfig, splits: dict[str, int] | None = None, max_len: int | None = None) -> str:
    """The digest of everything `build_data(cfg, splits, max_len)` depends on."""
    return digest(
        {
            "kind": "data",
            "config": cfg.model_dump(mode="json"),
            "splits": splits,
            "max_len": max_len,
            "layout": LAYOUT,
            "code": _code_fingerprint(),
        }
    )


def read_entry(path: Path, key: str) -> Any | None:
    """The object stored at `path` under `key`, or None if it is missing (silently) or cannot be used: not a
    cache entry, for another key, damaged, unreadable (one warning line each: the caller recomputes)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cache: %s cannot be read (%s); recomputing", path, e.strerror or e)
        return None
    head = len(MAGIC)
    if not raw.startswith(MAGIC) or len(raw) < head + 130:
        log.warning("cache: %s is not a cache entry; recomputing", path)
        return None
    stored_key = raw[head : head + 64].decode(errors="replace")
    body_sha, body = raw[head + 65 : head + 129], raw[head + 130 :]
    if stored_key != key or hashlib.sha256(body).hexdigest().encode() != body_sha:
        log.warning("cache: %s is stale or damaged; recomputing", path)
        return None
    import torch

    try:
        return torch.load(io.BytesIO(body), weights_only=True)
    except Exception as e:  # a checksummed payload that still will not load (another picollm version)
        log.warning("cache: %s does not load (%s); recomputing", path, _first_line(e))
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def write_entry(path: Path, key: str, obj: Any) -> None:
    """Store `obj` under `key` atomically (temporary file + os.replace); a failure only costs the cache."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    body = buf.getvalue()
    blob = MAGIC + key.encode() + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        log.warning("cache: could not write %s (%s); continuing without caching it", path, e)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def cached_build_data(
    cfg: DataConfig, splits: dict[str, int] | None = None, max_len: int | None = None
) -> SyntheticData:
    """`build_data(cfg, splits, max_len)`, from the cache when an entry of the same key is there."""
    from picollm.data.splits import build_data

    root = cache_dir()
    if root is None:
        return build_data(cfg, splits, max_len)
    key = data_key(cfg, splits, max_len)
    path = root / "data" / f"{key}.pt"
    hit = read_entry(path, key)
    if hit is not None:
        try:
            return _checked(_data_from_state(hit))
        except Exception as e:  # another layout (an older picollm wrote it under this key): recompute
            log.warning("cache: %s has another layout (%s: %s); recomputing", path, type(e).__name__, _first_line(e))
    data = build_data(cfg, splits, max_len)  # errors (too few generators) surface here, uncached
    write_entry(path, key, _data_state(data))
    return data


def _ragged(arrays: list[np.ndarray]) -> dict[str, Any]:
    """Variable-length arrays as one flat tensor plus lengths: a few tensors, not thousands."""
    import torch

    lengths = [len(a) for a in arrays]
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return {"flat": torch.from_numpy(np.ascontiguousarray(flat)), "lengths": lengths}


def _unragged(state: dict[str, Any]) -> list[np.ndarray]:
    flat, lengths = state["flat"].numpy(), state["lengths"]
    ends = np.cumsum(lengths)
    return [flat[e - n : e].copy() for n, e in zip(lengths, ends, strict=True)]


def _data_state(data: SyntheticData) -> dict[str, Any]:
    """`data` as tensors, strings and numbers only (what `torch.load(weights_only=True)` reads)."""
    splits = {
        name: {
            "sequences": _ragged(s.sequences),
            "families": list(s.families),
            "ceilings": _ragged(s.ceilings),
            "generators": [dict(g) for g in s.generators],
            "seen": _ragged(s.seen),
            "answers": _ragged(s.answers),
            "targets": _ragged(s.targets),
        }
        for name, s in data.splits().items()
    }
    return {"splits": splits, "families": list(data.families), "pools": data.pools}


def _checked(data: SyntheticData) -> SyntheticData:
    """`data` read back from an entry, if it has the shape a run reads (ValueError naming what is off)."""
    if not isinstance(data.families, list) or not all(isinstance(f, str) for f in data.families):
        raise ValueError("families are not a list of names")
    for name, s in data.splits().items():
        n, rows = len(s.sequences), (s.sequences, s.ceilings, s.seen, s.answers, getattr(s, "targets", []))
        if not all(isinstance(a, np.ndarray) and a.ndim == 1 for r in rows for a in r):
            raise ValueError(f"{name}: not every sequence, ceiling, seen, answer or target row is a 1-d array")
        if not all(a.dtype.kind in "iu" for a in s.sequences):
            raise ValueError(f"{name}: sequences are not integers")
        if len(s.families) != n or len(s.ceilings) != n or any(len(x) not in (0, n) for x in (s.generators, *rows[2:])):
            raise ValueError(f"{name}: its lists have different lengths")
        if not set(s.families) <= set(data.families) or not all(isinstance(g, dict) for g in s.generators):
            raise ValueError(f"{name}: families or generators of another kind")
    return data


def _data_from_state(state: dict[str, Any]) -> SyntheticData:
    from picollm.data.splits import SequenceSplit, SyntheticData

    splits = {
        name: SequenceSplit(
            name=name,
            sequences=_unragged(s["sequences"]),
            families=list(s["families"]),
            ceilings=_unragged(s["ceilings"]),
            generators=[dict(g) for g in s["generators"]],
            seen=_unragged(s["seen"]),
            answers=_unragged(s["answers"]),
            targets=_unragged(s["targets"]),
        )
        for name, s in state["splits"].items()
    }
    return SyntheticData(**splits, families=list(state["families"]), pools=state["pools"])


# --------------------------------------------------------------------------------------------------
# The matmul peak


def machine_key(device: torch.device) -> dict[str, Any]:
    """What the peak depends on: the machine, its accelerator, the torch build and the thread count."""
    import torch

    key: dict[str, Any] = {
        "kind": "matmul_peak",
        "node": platform.node(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch": str(torch.__version__),  # TorchVersion, a str subclass weights_only refuses
        "threads": torch.get_num_threads(),
        "device": device.type,
    }
    if device.type == "cuda":
        key["accelerator"] = torch.cuda.get_device_name(device)
    return key


def cached_matmul_peak(device: torch.device, world_size: int = 1) -> float:
    """`hardware.measure_matmul_peak(device)`, measured once per machine key and then read back
    (`world_size` is part of the key: DDP ranks measure at once, sharing the hardware)."""
    from picollm.runtime.hardware import measure_matmul_peak

    root = cache_dir()
    if root is None:
        return measure_matmul_peak(device)
    key = digest({**machine_key(device), "world_size": world_size})
    path = root / "peak" / f"{key}.pt"
    hit = read_entry(path, key)
    if isinstance(hit, dict) and isinstance(hit.get("peak_flops"), float) and hit["peak_flops"] > 0:
        return hit["peak_flops"]
    if hit is not None:
        log.warning("cache: %s has another layout (no positive peak_flops); measuring again", path)
    peak = measure_matmul_peak(device)
    write_entry(path, key, {"peak_flops": peak, "measured_at": time.time(), **machine_key(device)})
    return peak
