"""Models, checkpoints and a registered model saved by an older picollm (tests/fixtures/legacy, made at
main 9ed9937 before the mixer registry) load and behave exactly as they did then."""

from __future__ import annotations

import json
import sqlite3
import tarfile
from pathlib import Path

import pytest
import torch

from picollm.config import ModelConfig
from picollm.model.transformer import Transformer

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
MIXERS = torch.load(LEGACY / "mixers_v0.pt", weights_only=True)


@pytest.mark.parametrize("variant", sorted(MIXERS))
def test_saved_mixer_loads_and_behaves_the_same(variant: str) -> None:
    saved = MIXERS[variant]
    model = Transformer(ModelConfig.model_validate(saved["config"]))
    model.load_state_dict(saved["state_dict"])  # strict: the same parameter names and shapes
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(saved["tokens"]), saved["logits"], rtol=1e-5, atol=1e-5)
        _, cache = model.run_with_cache(saved["tokens"][:, :12], names_filter=lambda n: n.endswith("hook_pattern"))
    assert cache.keys() == saved["patterns"].keys()
    for name, pattern in saved["patterns"].items():
        torch.testing.assert_close(cache[name], pattern, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(saved["prompts"], max_new_tokens=12), saved["greedy"])
    sampled = model.generate(
        saved["prompts"], 12, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(sampled, saved["sampled"])


def _relocate(db: Path, old: str, new: str) -> int:
    """Rewrite the store's absolute paths (artifact locations, sources) from `old` to `new`."""
    con = sqlite3.connect(db)
    changed = 0
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
        for col in con.execute(f"PRAGMA table_info('{table}')").fetchall():
            if "CHAR" in col[2].upper() or "TEXT" in col[2].upper():
                cur = con.execute(
                    f'UPDATE "{table}" SET "{col[1]}" = REPLACE("{col[1]}", ?, ?) WHERE "{col[1]}" LIKE ?',
                    (old, new, f"%{old}%"),
                )
                changed += cur.rowcount
    con.commit()
    con.close()
    return changed


@pytest.fixture
def legacy_store(tmp_path: Path, mlflow_tmp: str) -> dict:
    meta = json.loads((LEGACY / "store_v0.json").read_text())
    with tarfile.open(LEGACY / "store_v0.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    assert _relocate(tmp_path / "mlflow.db", meta["root"], str(tmp_path)) > 0
    return meta


def test_registered_model_saved_before_loads_by_name_and_generates_the_same(legacy_store: dict) -> None:
    import picollm

    meta = legacy_store
    prompts = torch.tensor(meta["prompts"])
    for ref in (meta["model"], f"{meta['model']}@champion", f"{meta['model']}/1", meta["run_id"]):
        model = picollm.load_model(ref)
        with torch.no_grad():
            torch.testing.assert_close(model(prompts), torch.tensor(meta["logits"]), rtol=1e-5, atol=1e-5)
        assert model.generate(prompts, max_new_tokens=6).tolist() == meta["greedy"]
        sampled = model.generate(prompts, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
        assert sampled.tolist() == meta["sampled"]


def test_checkpoint_saved_before_restores_the_same_model(legacy_store: dict) -> None:
    import mlflow

    from picollm.model.weights import build_from_state
    from picollm.training.optim import load_checkpoint

    path = mlflow.artifacts.download_artifacts(f"runs:/{legacy_store['run_id']}/checkpoints/checkpoint.pt")
    checkpoint = load_checkpoint(path)
    cfg = ModelConfig.model_validate(checkpoint["config"]["model"])
    model = build_from_state(checkpoint["model"], cfg, source="checkpoint")
    prompts = torch.tensor(legacy_store["prompts"])
    assert model.generate(prompts, max_new_tokens=6).tolist() == legacy_store["greedy"]


def test_cli_generates_from_the_registered_model_saved_before(legacy_store: dict, capsys) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["generate", legacy_store["model"], "2 4 6 8", "-n", "6"])
    assert result.exit_code == 0, result.output
    assert " ".join(map(str, legacy_store["greedy"][0])) in result.output


INIT = json.loads((LEGACY / "init_v0.json").read_text())


@pytest.mark.parametrize("variant", sorted(INIT))
def test_a_seed_gives_the_initial_weights_it_gave_before(variant: str) -> None:
    """The sum and sum of squares of every initial tensor at torch.manual_seed(0), as the older picollm drew
    them: studies rerun from a seed start from the same weights."""
    saved = INIT[variant]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.model_validate(saved["config"]))
    state = model.state_dict()
    assert state.keys() == saved["params"].keys()
    for name, (total, squares) in saved["params"].items():
        t = state[name].double()
        assert float(t.sum()) == pytest.approx(total, abs=1e-9) and float(t.pow(2).sum()) == pytest.approx(squares)
