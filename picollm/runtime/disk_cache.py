"""A per-user cache of what a run would otherwise recompute identically every time: the data splits with
their Bayes ceilings and seen-context flags (keyed by the data config's digest), and the matmul peak
(keyed by the machine, the torch version and the thread count).

Where: `$PICOLLM_CACHE_DIR`, else `$XDG_CACHE_HOME/picollm`, else `~/.cache/picollm`;
`PICOLLM_CACHE=off` turns both caches off. Delete the directory to re-measure the peak.

Keys. A data entry's key is the SHA-256 of the data config (every field, JSON with sorted keys), the
build arguments and the source of picollm/data.py and picollm/generators.py: a changed config or a
changed generator never reads an old entry. The key is also stored inside the entry and checked on
load, with a SHA-256 of the payload, so a truncated, corrupted or mislabelled file is recomputed (and
rewritten), never trusted. Writes go to a temporary file in the same directory, then `os.replace`:
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
_SOURCES = ("splits.py", "generators.py")  # in picollm/data/


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
    here = Path(__file__).resolve().parents[1] / "data"
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def data_key(cfg: DataConfig, splits: dict[str, int] | None = None, max_len: int | None = None) -> str:
    """The digest of everything `build_data(cfg, splits, max_len)` depends on."""
    return digest(
        {
            "kind": "data",
            "config": cfg.model_dump(mode="json"),
            "splits": splits,
            "max_len": max_len,
            "code": _code_fingerprint(),
        }
    )


def read_entry(path: Path, key: str) -> Any | None:
    """The object stored at `path` under `key`, or None if it is missing, for another key, or damaged."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    head = len(MAGIC)
    if not raw.startswith(MAGIC) or len(raw) < head + 130:
        log.debug("cache: %s is not a cache entry; recomputing", path)
        return None
    stored_key = raw[head : head + 64].decode(errors="replace")
    body_sha, body = raw[head + 65 : head + 129], raw[head + 130 :]
    if stored_key != key or hashlib.sha256(body).hexdigest().encode() != body_sha:
        log.debug("cache: %s is stale or damaged; recomputing", path)
        return None
    import torch

    try:
        return torch.load(io.BytesIO(body), weights_only=True)
    except Exception:  # a checksummed payload that still will not load (another picollm version)
        log.debug("cache: %s does not load; recomputing", path)
        return None


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
            return _data_from_state(hit)
        except (KeyError, TypeError, ValueError, IndexError):  # another layout: recompute
            log.debug("cache: %s has another layout; recomputing", path)
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
        }
        for name, s in data.splits().items()
    }
    return {"splits": splits, "families": list(data.families), "pools": data.pools}


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
    peak = measure_matmul_peak(device)
    write_entry(path, key, {"peak_flops": peak, "measured_at": time.time(), **machine_key(device)})
    return peak
