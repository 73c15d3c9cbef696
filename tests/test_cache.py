"""The run caches (data + ceilings by config digest, the matmul peak by machine) and the time breakdown."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from picollm.config import DataConfig
from picollm.data.splits import build_data
from picollm.runtime import disk_cache as cache
from picollm.runtime import timing
from picollm.tracking import runs
from picollm.training import run as train_run
from tests.conftest import REPO, load_tiny

SMALL = {"vocab_size": 32, "min_len": 6, "max_len": 10, "n_train": 12, "n_val": 4, "n_test": 4}

# One changed value per DataConfig field: every field affects the draw, so every one must change the key.
CHANGED = {
    "seq_types": ["counting", "arithmetic"],
    "vocab_size": 33,
    "min_len": 7,
    "max_len": 11,
    "n_train": 13,
    "n_val": 5,
    "n_test": 5,
    "held_out_share": 0.2,
    "seed": 1,
    "split": "new_rules",
    "start_range": (0, 20),
    "arithmetic_steps": [2, 3],
    "geometric_ratios": [2],
    "walk_steps": [-2, 2],
    "mqar_pairs": [2, 3],
    "mqar_key_vocab": 8,
    "mqar_value_vocab": 8,
    "mqar_queries": 1,
    "mqar_layout": "fed_back",
    "mqar_length": 20,
    "mqar_power_a": 0.5,
    "copy_len": [3],
}


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PICOLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PICOLLM_CACHE", raising=False)
    return tmp_path / "cache"


def same_data(a, b) -> bool:
    return all(
        len(x.sequences) == len(y.sequences)
        and all(np.array_equal(s, t) for s, t in zip(x.sequences, y.sequences, strict=True))
        and all(np.array_equal(s, t) for s, t in zip(x.ceilings, y.ceilings, strict=True))
        and all(np.array_equal(s, t) for s, t in zip(x.answers, y.answers, strict=True))
        and all(np.array_equal(s, t) for s, t in zip(x.targets, y.targets, strict=True))
        and x.families == y.families
        and x.generators == y.generators
        for x, y in zip(a.splits().values(), b.splits().values(), strict=True)
    )


def test_every_data_field_changes_the_key():
    assert set(CHANGED) == set(DataConfig.model_fields), "a new DataConfig field needs a changed value here"
    base = DataConfig(**SMALL)
    keys = {cache.data_key(base)}
    for name, value in CHANGED.items():
        keys.add(cache.data_key(base.model_copy(update={name: value})))
    assert len(keys) == 1 + len(CHANGED)
    assert cache.data_key(base, splits={"train": 3}) != cache.data_key(base)
    assert cache.data_key(base, max_len=20) != cache.data_key(base)
    assert cache.data_key(DataConfig(**SMALL)) == cache.data_key(base)  # and equal configs share one


def test_cached_data_equals_a_fresh_build_and_a_changed_config_rebuilds(cache_dir: Path):
    cfg = DataConfig(**SMALL)
    first = cache.cached_build_data(cfg)
    assert len(list((cache_dir / "data").glob("*.pt"))) == 1
    again = cache.cached_build_data(cfg)  # read back
    assert same_data(again, build_data(cfg)) and same_data(first, again)
    changed = cfg.model_copy(update={"seed": 1})
    assert same_data(cache.cached_build_data(changed), build_data(changed))
    assert not same_data(cache.cached_build_data(changed), first)
    assert len(list((cache_dir / "data").glob("*.pt"))) == 2


def test_cached_recall_data_keeps_its_answers(cache_dir: Path):
    cfg = DataConfig(**SMALL, seq_types=["mqar", "copy", "counting"], mqar_pairs=[2], mqar_key_vocab=6, copy_len=[4])
    first = cache.cached_build_data(cfg)
    again = cache.cached_build_data(cfg)  # read back
    assert same_data(first, again) and same_data(again, build_data(cfg))
    assert sum(int(a.sum()) for a in again.train.answers) == 12 * 2 + 12 * 4  # 2 answers per mqar, 4 per copy


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "other_key"])
def test_a_damaged_or_stale_entry_is_recomputed(cache_dir: Path, damage: str):
    cfg = DataConfig(**SMALL)
    cache.cached_build_data(cfg)
    [path] = (cache_dir / "data").glob("*.pt")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        path.write_bytes(raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:])
    elif damage == "garbage":
        path.write_bytes(b"not a cache entry")
    else:  # a whole, valid entry of another config under this key's name
        other = DataConfig(**{**SMALL, "seed": 5})
        cache.write_entry(path, cache.data_key(other), cache._data_state(build_data(other)))
    assert cache.read_entry(path, cache.data_key(cfg)) is None
    assert same_data(cache.cached_build_data(cfg), build_data(cfg))
    assert cache.read_entry(path, cache.data_key(cfg)) is not None  # rewritten whole


WRITER = """
import sys
from pathlib import Path
from picollm.runtime import disk_cache as cache
path, key, tag = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for i in range(40):
    cache.write_entry(path, key, {"tag": tag, "i": i, "blob": bytes(200_000)})
"""


def test_concurrent_writers_never_expose_a_partial_entry(cache_dir: Path):
    """Processes racing on one key (DDP ranks, sweep workers) while another reads: every read is a whole
    entry of that key (temporary file + os.replace), and no temporary file is left behind."""
    path, key = cache_dir / "data" / "k.pt", "0" * 64
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), key, str(n)], cwd=REPO) for n in range(3)]
    reads = 0
    while any(p.poll() is None for p in procs):
        hit = cache.read_entry(path, key)
        if hit is not None:
            assert len(hit["blob"]) == 200_000
            reads += 1
    assert all(p.wait() == 0 for p in procs)
    assert cache.read_entry(path, key)["i"] == 39
    assert [p.name for p in path.parent.iterdir()] == ["k.pt"]


def test_caching_can_be_turned_off(cache_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PICOLLM_CACHE", "off")
    cache.cached_build_data(DataConfig(**SMALL))
    assert cache.cache_dir() is None and not cache_dir.exists()


def test_matmul_peak_is_measured_once_per_machine_key(cache_dir: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []

    def fake_measure(device: torch.device, *args, **kwargs) -> float:
        calls.append(device)
        return 1.5e10

    monkeypatch.setattr("picollm.runtime.hardware.measure_matmul_peak", fake_measure)
    cpu = torch.device("cpu")
    assert cache.cached_matmul_peak(cpu) == 1.5e10
    assert cache.cached_matmul_peak(cpu) == 1.5e10
    assert len(calls) == 1
    cache.cached_matmul_peak(cpu, world_size=2)  # DDP ranks measure sharing the machine: their own key
    assert len(calls) == 2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before > 1 else 2)
        cache.cached_matmul_peak(cpu)  # another thread count: another key
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 3


def test_stopwatch_charges_one_phase_at_a_time():
    w = timing.Stopwatch(startup_s=2.0)
    with w.phase("train"):
        time.sleep(0.05)
        w.wrap("eval", time.sleep)(0.05)
    w.switch("logging")
    time.sleep(0.02)
    t = w.breakdown()
    assert t["time/startup_s"] == 2.0
    assert 0.04 < t["time/train_s"] < 0.09 and 0.04 < t["time/eval_s"] < 0.09 and t["time/logging_s"] >= 0.02
    assert t["time/total_s"] == pytest.approx(sum(v for k, v in t.items() if k != "time/total_s"))


def test_a_training_run_logs_its_time_breakdown(migrated_store: str, cache_dir: Path):
    cfg = load_tiny()
    with runs.session("train", cfg.tracking, device="cpu") as s:
        out = train_run.train(s, cfg)
    logged = MlflowClient().get_run(out.run_id).data.metrics
    keys = {f"time/{p}_s" for p in (*timing.PHASES, "other", "total")}
    assert keys <= set(logged) and keys == set(out.timing)
    assert all(logged[k] == pytest.approx(out.timing[k]) for k in keys)
    assert logged["time/train_s"] > 0 and logged["time/eval_s"] > 0 and logged["time/logging_s"] > 0
    assert logged["time/total_s"] == pytest.approx(sum(logged[k] for k in keys - {"time/total_s"}), rel=1e-6)
    assert len(list((cache_dir / "data").glob("*.pt"))) == 1  # the run's data went through the cache


# --------------------------------------------------------------------------------------------------
# Entries of another layout: a valid key and checksum over an older structure


def _older_layouts(data) -> dict[str, object]:
    """Whole, checksummed entries of structures an older (or newer) picollm could have written under a key."""
    state = cache._data_state(data)
    no_targets = {
        **state,
        "splits": {n: {k: v for k, v in s.items() if k != "targets"} for n, s in state["splits"].items()},
    }
    plain_lists = {  # sequences as lists, not ragged tensors: `.numpy()` on a list is an AttributeError
        **state,
        "splits": {
            n: {**s, "sequences": {"flat": s["sequences"]["flat"].tolist(), "lengths": s["sequences"]["lengths"]}}
            for n, s in state["splits"].items()
        },
    }
    short_families = {**state, "splits": {n: {**s, "families": s["families"][:1]} for n, s in state["splits"].items()}}
    return {
        "no-targets": no_targets,
        "plain-lists": plain_lists,
        "short-families": short_families,
        "a-list": [1, 2, 3],
        "no-splits": {"families": ["counting"]},
    }


@pytest.mark.parametrize("layout", ["no-targets", "plain-lists", "short-families", "a-list", "no-splits"])
def test_an_entry_of_another_layout_is_recomputed_with_one_warning(cache_dir: Path, layout: str, caplog):
    cfg = DataConfig(**SMALL)
    key = cache.data_key(cfg)
    path = cache_dir / "data" / f"{key}.pt"
    cache.write_entry(path, key, _older_layouts(build_data(cfg))[layout])
    with caplog.at_level("WARNING", logger="picollm.runtime.disk_cache"):
        assert same_data(cache.cached_build_data(cfg), build_data(cfg))
    [record] = [r for r in caplog.records if r.name == "picollm.runtime.disk_cache"]
    assert "another layout" in record.getMessage() and "recomputing" in record.getMessage()
    assert same_data(cache._data_from_state(cache.read_entry(path, key)), build_data(cfg))  # rewritten whole


def test_the_key_covers_the_caches_own_layout(monkeypatch: pytest.MonkeyPatch):
    cfg = DataConfig(**SMALL)
    before = cache.data_key(cfg)
    monkeypatch.setattr(cache, "LAYOUT", cache.LAYOUT + 1)
    assert cache.data_key(cfg) != before
    monkeypatch.undo()
    source = Path(cache.__file__).read_bytes()
    real_read = Path.read_bytes
    monkeypatch.setattr(
        Path, "read_bytes", lambda p: source + b"\n# edited" if p == Path(cache.__file__) else real_read(p)
    )
    assert cache.data_key(cfg) != before  # an edit of the module that reads entries back changes every key


def test_a_training_run_over_an_old_layout_entry_recomputes_it(migrated_store: str, cache_dir: Path):
    """`picollm train` (and so compare and sweep, which read data the same way) with an unreadable entry at
    its data key: a normal run, not an AttributeError."""
    from .test_faults import invoke

    cfg = load_tiny()
    key = cache.data_key(cfg.data)
    path = cache_dir / "data" / f"{key}.pt"
    cache.write_entry(path, key, _older_layouts(build_data(cfg.data))["plain-lists"])
    result = invoke(
        "train", REPO / "configs" / "tiny.yaml", "--set", "train.epochs=1", "--set", "tracking.log_model=false"
    )
    assert result.exit_code == 0, result.output
    assert same_data(cache._data_from_state(cache.read_entry(path, key)), build_data(cfg.data))
