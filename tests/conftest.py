"""Shared fixtures: every test gets its own temporary MLflow store and working directory, offline.

End-to-end tests that need a trained model share one session-scoped run of configs/tiny.yaml
(`trained`); `use_trained` points MLflow at that run's store for the duration of a test.
"""

from __future__ import annotations

import os
import shutil
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
TIKTOKEN_CACHE = Path(__file__).resolve().parents[1].parent / "shared/data/tiktoken_cache"


def sqlite_uri(directory: Path) -> str:
    return f"sqlite:///{directory}/mlflow.db"


def end_active_runs() -> None:
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def point_mlflow(mp: pytest.MonkeyPatch, directory: Path) -> str:
    """Env, cwd and MLflow's globals all pointing at a store in `directory`."""
    import mlflow

    from picollm import tracking

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
    from picollm import tracking

    with pytest.MonkeyPatch.context() as mp:
        try:
            yield point_mlflow(mp, directory)
        finally:
            end_active_runs()
            tracking._initialised.clear()


@pytest.fixture(autouse=True)
def mlflow_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from picollm import tracking

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
    from picollm.tracking import init_tracking

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
