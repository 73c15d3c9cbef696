"""Shared fixtures: every test gets its own temporary MLflow store and working directory, offline.

End-to-end tests that need a trained model share one session-scoped run of configs/tiny.yaml
(`trained`); `use_trained` points MLflow at that run's store for the duration of a test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# Tiny models: one intra-op thread is much faster than two fighting over 2 (possibly busy) cores.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# The offline copy of tiktoken's GPT-2 files; PICOLLM_TEST_TIKTOKEN_CACHE points elsewhere (e.g. at
# nothing, to see what a clone without ../shared does).
TIKTOKEN_CACHE = Path(
    os.environ.get("PICOLLM_TEST_TIKTOKEN_CACHE")
    or Path(__file__).resolve().parents[1].parent / "shared/data/tiktoken_cache"
)
TIKTOKEN_HOST = "openaipublic.blob.core.windows.net"
_tiktoken_reason: list[str | None] = []


def tiktoken_missing() -> str | None:
    """Why tests cannot have the GPT-2 ranks (no cached copy, no network), or None. Probed once."""
    if not _tiktoken_reason:
        caches = [TIKTOKEN_CACHE, Path(os.environ.get("TIKTOKEN_CACHE_DIR") or "/nonexistent")]
        if any(c.is_dir() and any(c.iterdir()) for c in caches):
            _tiktoken_reason.append(None)
        else:
            try:
                socket.create_connection((TIKTOKEN_HOST, 443), timeout=3).close()
                _tiktoken_reason.append(None)
            except OSError as e:
                _tiktoken_reason.append(
                    f"GPT-2 tokenizer files unavailable: no {TIKTOKEN_CACHE} (or TIKTOKEN_CACHE_DIR) and "
                    f"no network to {TIKTOKEN_HOST} ({e.strerror or e})"
                )
    return _tiktoken_reason[0]


@pytest.fixture
def tiktoken_ranks() -> None:
    """Skip (with the reason) a test that needs tiktoken's GPT-2 files when they cannot be had."""
    if reason := tiktoken_missing():
        pytest.skip(reason)


def sqlite_uri(directory: Path) -> str:
    return f"sqlite:///{directory}/mlflow.db"


def end_active_runs() -> None:
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def point_mlflow(mp: pytest.MonkeyPatch, directory: Path) -> str:
    """Env, cwd and MLflow's globals all pointing at a store in `directory`."""
    import mlflow

    from picollm.tracking import store as tracking

    uri = sqlite_uri(directory)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.delenv("PICOLLM_DEBUG", raising=False)
    if TIKTOKEN_CACHE.is_dir():
        mp.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    mp.chdir(directory)
    end_active_runs()
    tracking._initialised.clear()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@contextmanager
def mlflow_store(directory: Path) -> Iterator[str]:
    """For session/module fixtures (no function-scoped monkeypatch available)."""
    from picollm.tracking import store as tracking

    with pytest.MonkeyPatch.context() as mp:
        try:
            yield point_mlflow(mp, directory)
        finally:
            end_active_runs()
            tracking._initialised.clear()


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the suite was started in the background
    by a shell without job control (which starts it with SIGINT ignored, so Python installs no handler):
    the signal tests, and the flows they start as subprocesses, rely on it."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session", autouse=True)
def picollm_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One data/peak cache for the session (keyed entries, so sharing is safe), never the user's own;
    subprocesses inherit it through the environment."""
    directory = tmp_path_factory.mktemp("picollm_cache")
    before = os.environ.get("PICOLLM_CACHE_DIR")
    os.environ["PICOLLM_CACHE_DIR"] = str(directory)
    yield directory
    if before is None:
        os.environ.pop("PICOLLM_CACHE_DIR", None)
    else:
        os.environ["PICOLLM_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def mlflow_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from picollm.tracking import store as tracking

    uri = point_mlflow(monkeypatch, tmp_path)
    yield uri
    end_active_runs()
    tracking._initialised.clear()


def load_tiny(*overrides: str):
    from picollm.config import TrainRunConfig, load_config

    return load_config(TrainRunConfig, TINY, list(overrides))


@dataclass
class Trained:
    directory: Path
    uri: str
    cfg: Any
    outcome: Any

    @property
    def name(self) -> str:
        return self.cfg.tracking.registered_model


@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated SQLite store: copying it saves MLflow's migrations (seconds) per store."""
    from picollm.tracking.store import init_tracking

    directory = tmp_path_factory.mktemp("store_template")
    with mlflow_store(directory) as uri:
        init_tracking(uri)
    return directory / "mlflow.db"


def copy_store(template: Path, directory: Path) -> None:
    shutil.copyfile(template, directory / "mlflow.db")


@pytest.fixture
def migrated_store(store_template: Path, mlflow_tmp: str, tmp_path: Path) -> str:
    """This test's store, already created (so MLflow's one-off migration messages are out of the way)."""
    copy_store(store_template, tmp_path)
    return mlflow_tmp


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, store_template: Path) -> Trained:
    """One tiny 2-epoch run (registered as version 1 of picollm-tiny) in its own store."""
    from pipelines.train import run

    directory = tmp_path_factory.mktemp("trained_store")
    copy_store(store_template, directory)
    with mlflow_store(directory) as uri:
        cfg = load_tiny()
        outcome = run(cfg)
    return Trained(directory, uri, cfg, outcome)


@pytest.fixture
def use_trained(trained: Trained, mlflow_tmp: str, monkeypatch: pytest.MonkeyPatch) -> Trained:
    """Point this test's MLflow (env, cwd, globals) at the shared trained store."""
    point_mlflow(monkeypatch, trained.directory)
    assert os.environ["MLFLOW_TRACKING_URI"] == trained.uri
    return trained
