"""End to end on configs/tiny.yaml: pipelines.train.run -> MLflow run, registry, loading, serving, resume."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

import picollm
from picollm.config import TrainRunConfig, load_config
from picollm.errors import ModelNotFoundError, PicollmError
from picollm.model.weights import load_state_dict
from picollm.tracking.prompts import continue_prompts
from picollm.tracking.registry import promote, resolve_model_uri
from picollm.tracking.runs import CHECKPOINT_PATH
from picollm.training.trainer import NullCallbacks
from pipelines.train import run

from .conftest import TINY, copy_store, load_tiny, mlflow_store, point_mlflow

pytestmark = pytest.mark.slow

REFS = [
    "{name}",
    "{name}@champion",
    "{name}/1",
    "models:/{name}/1",
    "models:/{name}@champion",
    "runs:/{run_id}/model",
    "runs:/{run_id}",
    "{run_id}",
]


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# The shared tiny run (conftest.trained)


def test_run_is_tracked(use_trained, tmp_path):
    client = MlflowClient()
    out = use_trained.outcome
    r = client.get_run(out.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["model.attention"] == "linear"
    assert r.data.params["data.vocab_size"] == "32"
    assert r.data.params["train.epochs"] == "2"
    assert r.data.params["data.split_overlap"] == "0"
    assert r.data.metrics["system/epochs_run"] == 2
    assert "val/loss" in r.data.metrics and "test/accuracy" in r.data.metrics
    assert r.data.tags["registered_model"] == f"{use_trained.name}/1"
    assert len(client.get_metric_history(out.run_id, "val/loss")) == 2  # one per epoch

    top = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config.yaml", "checkpoints", "figures"} <= top
    assert CHECKPOINT_PATH in {a.path for a in client.list_artifacts(out.run_id, "checkpoints")}
    figures = {a.path for a in client.list_artifacts(out.run_id, "figures")}
    assert {"figures/training_curves.png", "figures/test_accuracy_per_family.png"} <= figures

    cfg_path = mlflow.artifacts.download_artifacts(
        run_id=out.run_id, artifact_path="config.yaml", dst_path=str(tmp_path)
    )
    assert load_config(TrainRunConfig, cfg_path) == load_config(TrainRunConfig, TINY)


def test_model_registered_with_champion_alias(use_trained):
    client = MlflowClient()
    name, out = use_trained.name, use_trained.outcome
    assert out.registered_version == "1"
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {"champion": "1"}
    mv = client.get_model_version_by_alias(name, "champion")
    assert str(mv.version) == "1" and mv.run_id == out.run_id


def test_every_reference_loads_the_same_model(use_trained, tmp_path):
    name, run_id = use_trained.name, use_trained.outcome.run_id
    models = {ref: picollm.load_model(ref.format(name=name, run_id=run_id)) for ref in REFS}
    ckpt = load_state_dict(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_PATH, dst_path=str(tmp_path))
    )
    for ref, model in models.items():
        assert isinstance(model, picollm.Transformer) and not model.training, ref
        assert same_state(model.state_dict(), ckpt["model"]), ref  # the final epoch's weights
    assert models["{name}"].cfg == use_trained.cfg.model


def test_resolve_model_uri_forms(use_trained):
    name, run_id = use_trained.name, use_trained.outcome.run_id
    assert resolve_model_uri(name) == f"models:/{name}/1"
    assert resolve_model_uri(f"{name}@champion") == f"models:/{name}@champion"
    # the logged model is named after what it is (its registered name); `runs:/<id>/model` still reaches it
    assert resolve_model_uri(run_id) == f"runs:/{run_id}/{name}"
    assert resolve_model_uri(f"runs:/{run_id}") == f"runs:/{run_id}/{name}"
    assert resolve_model_uri(f"runs:/{run_id}/model") == f"runs:/{run_id}/{name}"


@pytest.mark.parametrize(
    "ref",
    [
        "nope",
        "nope@champion",
        "{name}@nope",
        "{name}/99",
        "models:/{name}/99",
        "{name}/abc",
        "",
        "0123456789abcdef0123456789abcdef",
        "runs:/0123456789abcdef0123456789abcdef/model",
    ],
)
def test_unknown_references(use_trained, ref):
    with pytest.raises(ModelNotFoundError):
        picollm.load_model(ref.format(name=use_trained.name))


def test_pyfunc_predict_on_a_list_of_prompts(use_trained):
    pyfunc = mlflow.pyfunc.load_model(f"models:/{use_trained.name}@champion")
    got = pyfunc.predict(["1 2 3"])
    expected = continue_prompts(picollm.load_model(f"{use_trained.name}@champion"), ["1 2 3"])
    assert isinstance(got, list) and len(got) == 1
    assert re.fullmatch(r"\d+( \d+){7}", got[0])
    assert got == expected


def test_pyfunc_predict_on_a_dataframe(use_trained):
    pyfunc = mlflow.pyfunc.load_model(f"models:/{use_trained.name}@champion")
    prompts = ["1 2 3", "4 6 8 10 12", "7"]
    got = pyfunc.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 5})
    model = picollm.load_model(f"{use_trained.name}@champion")
    assert got == continue_prompts(model, prompts, max_new_tokens=5)
    assert all(len(g.split()) == 5 and all(0 <= int(t) < 31 for t in g.split()) for g in got)


def test_logged_model_is_portable_and_carries_its_test_metrics(use_trained, tmp_path):
    """code_paths with the picollm package, pinned requirements (torch as installed, a CPU wheel
    from PyPI), an input example, and the final test metrics linked to the LoggedModel (not data.*)."""
    from importlib.metadata import version

    client = MlflowClient()
    out = use_trained.outcome
    mv = client.get_model_version(use_trained.name, "1")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{use_trained.name}/1", dst_path=str(tmp_path)))
    code = local / "code" / "picollm"
    assert (code / "tracking" / "serving.py").is_file() and (code / "model" / "transformer.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    reqs = (local / "requirements.txt").read_text().split()
    assert f"torch=={version('torch').split('+')[0]}" in reqs and f"mlflow=={version('mlflow')}" in reqs
    assert {r.split("==")[0] for r in reqs} >= {"numpy", "pydantic", "pyyaml", "filelock"}
    assert not any(r.startswith("tiktoken") for r in reqs)  # an integer model needs no tokenizer
    example = (local / "serving_input_example.json").read_text()
    assert "2 4 6 8" in example
    assert mlflow.pyfunc.load_model(f"models:/{use_trained.name}/1").predict(["2 4 6 8"])

    run = client.get_run(out.run_id)
    [output] = run.outputs.model_outputs
    assert mv.source == f"models:/{output.model_id}"
    linked = {m.key: m.value for m in mlflow.get_logged_model(output.model_id).metrics}
    assert linked["test/accuracy"] == run.data.metrics["test/accuracy"] == out.test_metrics["test/accuracy"]
    assert "val/loss" in linked  # the final epoch's, logged at the same step
    assert not any(k.startswith(("data", "hardware")) for k in linked)
    # data statistics are params, measured hardware figures metrics; `/` is the metric hierarchy
    assert not any(k.startswith("data") for k in run.data.metrics)
    assert run.data.params["data.train.sequences"] == "120" and "data.test.counting" in run.data.params
    assert run.data.metrics["system/peak_flops"] > 0 and "hardware.peak_flops" not in run.data.params
    assert not any("." in k.split("/")[0] for k in run.data.metrics), sorted(run.data.metrics)
    assert re.fullmatch(r"linear-alibi-seed0-\d{4}-\d{6}", run.info.run_name)  # re-runs get their own names


def test_system_metrics_are_opt_in(trained, migrated_store, monkeypatch):
    import os

    default = MlflowClient(trained.uri).get_run(trained.outcome.run_id).data.metrics
    assert "system/cpu_utilization_percentage" not in default  # (system/ also holds picollm's bookkeeping)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow samples every 10 s by default
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    out = run(load_tiny("train.system_metrics=true", "tracking.log_model=false", "train.epochs=1"))
    metrics = MlflowClient().get_run(out.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" not in os.environ  # only around that run


def test_pyfunc_bad_prompt_names_the_problem(use_trained):
    """What `mlflow models serve` answers with HTTP 400: an MlflowException with INVALID_PARAMETER_VALUE."""
    from mlflow.exceptions import MlflowException

    pyfunc = mlflow.pyfunc.load_model(f"models:/{use_trained.name}@champion")
    for prompt, fragment in (
        ("1 2 99", "outside the model's values 0..30"),
        ("one two", "is not an integer"),
        ("", "empty"),
    ):
        with pytest.raises(MlflowException, match=fragment) as err:
            pyfunc.predict([prompt])
        assert err.value.error_code == "INVALID_PARAMETER_VALUE" and err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="max_new_tokens must be at least 1"):
        pyfunc.predict(["1 2"], params={"max_new_tokens": 0})


def test_continue_prompts_batches_like_single_prompts(use_trained):
    model = picollm.load_model(use_trained.name)
    prompts = ["1 2 3", "4 6 8 10 12", "7"]
    batched = continue_prompts(model, prompts, max_new_tokens=6)
    assert batched == [continue_prompts(model, [p], max_new_tokens=6)[0] for p in prompts]
    with pytest.raises(PicollmError):
        continue_prompts(model, ["1 2 31"])
    with pytest.raises(PicollmError):
        continue_prompts(model, ["1 2"], max_new_tokens=0)


# --------------------------------------------------------------------------------------------------
# Resume and promote, in a store of their own


@dataclass
class ResumeRuns:
    directory: Path
    first: Any  # epochs=1, registered v1
    resumed: Any  # the same run continued to epochs=2, v2
    straight: Any  # epochs=2 in one go, v3


# A flat schedule after warmup (min_lr_ratio=1): the learning rate then does not depend on the total
# number of epochs, so "1 epoch, then extended to 2" is the same experiment as "2 epochs".
FLAT = "train.min_lr_ratio=1.0"


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, store_template) -> ResumeRuns:
    directory = tmp_path_factory.mktemp("resume_store")
    copy_store(store_template, directory)
    with mlflow_store(directory):
        first = run(load_tiny("train.epochs=1", FLAT))
        resumed = run(load_tiny("train.epochs=2", FLAT), resume=first.run_id)
        straight = run(load_tiny("train.epochs=2", FLAT))
    return ResumeRuns(directory, first, resumed, straight)


@pytest.fixture
def in_resume_store(resume_runs, mlflow_tmp, monkeypatch) -> ResumeRuns:
    point_mlflow(monkeypatch, resume_runs.directory)
    return resume_runs


def test_extended_resume_equals_a_straight_run(in_resume_store):
    r = in_resume_store
    assert r.resumed.run_id == r.first.run_id
    assert r.resumed.test_metrics["val/loss"] == pytest.approx(r.straight.test_metrics["val/loss"], abs=1e-6)
    assert r.resumed.test_metrics["test/loss"] == pytest.approx(r.straight.test_metrics["test/loss"], abs=1e-6)
    client = MlflowClient()
    assert client.get_run(r.first.run_id).info.status == "FINISHED"
    hist = lambda rid: [m.value for m in sorted(client.get_metric_history(rid, "val/loss"), key=lambda m: m.step)]
    assert hist(r.first.run_id) == pytest.approx(hist(r.straight.run_id), abs=1e-6)
    assert len(hist(r.first.run_id)) == 2


def test_resume_with_a_changed_model_is_refused(in_resume_store):
    n_runs = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    with pytest.raises(PicollmError, match="model.d_model"):
        run(load_tiny("train.epochs=2", FLAT, "model.d_model=32"), resume=in_resume_store.first.run_id)
    with pytest.raises(PicollmError, match="already completed"):
        run(load_tiny("train.epochs=2", FLAT), resume=in_resume_store.first.run_id)
    with pytest.raises(PicollmError, match="no run"):
        run(load_tiny(), resume="0123456789abcdef0123456789abcdef")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == n_runs and all(x.info.status == "FINISHED" for x in runs)


def test_promote_moves_the_champion(in_resume_store):
    name = "picollm-tiny"
    client = MlflowClient()
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    assert versions == [1, 2, 3]
    assert str(client.get_registered_model(name).aliases["champion"]) == "1"  # later versions are not auto-promoted
    promote(name, "2")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert same_state(picollm.load_model(f"{name}@champion").state_dict(), picollm.load_model(f"{name}/2").state_dict())
    assert not same_state(picollm.load_model(f"{name}/2").state_dict(), picollm.load_model(f"{name}/1").state_dict())
    with pytest.raises(ModelNotFoundError):
        promote(name, "99")
    with pytest.raises(ModelNotFoundError):
        promote("nope", "1")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"


class Crash(Exception):
    pass


class CrashAfterFirstCheckpoint(NullCallbacks):
    def on_checkpoint(self, checkpoint, epoch):
        if epoch == 1:
            raise Crash("power cut")


def test_crashed_run_resumes_exactly(trained, migrated_store):
    """Default cosine schedule: a 2-epoch run that dies after epoch 1, resumed, ends like the
    uninterrupted 2-epoch run of the same config (conftest.trained)."""
    cfg = load_tiny()
    with pytest.raises(Crash):
        run(cfg, ui=CrashAfterFirstCheckpoint())
    [crashed] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert crashed.info.status == "FAILED"
    assert "power cut" in crashed.data.tags["error"]
    out = run(load_tiny(), resume=crashed.info.run_id)
    assert out.run_id == crashed.info.run_id
    assert MlflowClient().get_run(out.run_id).info.status == "FINISHED"
    for key in ("val/loss", "val/accuracy", "test/loss"):
        assert out.test_metrics[key] == pytest.approx(trained.outcome.test_metrics[key], abs=1e-6), key
