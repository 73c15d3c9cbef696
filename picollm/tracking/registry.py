"""Log models without pickled code, register them, and load them back by name.

A logged model is an MLflow models-from-code pyfunc (`picollm/serving.py`) whose artifacts are
`weights.pt` (a state dict, loaded with weights_only=True), `model_config.json` and `tokenizer.json`
(plus tiktoken's GPT-2 files for text models, and `vocab.json`, the GPT-2 id map, for compact-vocabulary
ones). It carries the picollm package (`code_paths`), pinned requirements and an input example: it loads
and serves in an environment that never installed picollm.
`load_model` accepts:  NAME (latest version), NAME@ALIAS, NAME/VERSION, models:/..., runs:/RUN_ID[/model]
and a bare run id.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from pydantic import ValidationError

from picollm.config import ModelConfig, TrainRunConfig, read_yaml, validate
from picollm.errors import ModelNotFoundError, PicollmError
from picollm.model.transformer import Transformer
from picollm.model.weights import build_from_state, load_state_dict
from picollm.tracking import store as tracking  # noqa: F401  (sets MLflow env defaults)
from picollm.tracking.prompts import continue_prompts  # noqa: F401  (re-exported: the CLI and tests use it here)

log = logging.getLogger(__name__)

CHAMPION = "champion"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"  # {"kind": "integers" | "gpt2"}: how the pyfunc reads prompts
VOCAB_FILE = "vocab.json"  # text models on a compact vocabulary: their GPT-2 id map (picollm/text_vocab.py)
SOURCE_CONFIG = "config.yaml"  # the resolved config a training run logs beside its model
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


# What `import picollm.registry` (the pyfunc's loader) needs beyond the standard library; tiktoken
# for text models. Pinned to this environment's versions, so a fresh one rebuilds the same stack.
REQUIREMENTS = ("torch", "mlflow", "numpy", "pydantic", "pyyaml", "filelock")


def pip_requirements(tokenizer: str = "integers") -> list[str]:
    from importlib.metadata import version

    names = [*REQUIREMENTS, *(["tiktoken"] if tokenizer == "gpt2" else [])]
    # The local-build suffix (2.13.0+cpu) is no PyPI version: pip would refuse the pin.
    return [f"{n}=={version(n).split('+')[0]}" for n in names]


def signature(tokenizer: str = "integers") -> ModelSignature:
    """Continuations (strings) out; the sampling settings as params. No input schema: MLflow would cut a
    list of token lists or a two-column table down to its first column before predict sees it, so the
    pyfunc checks every input shape itself (`serving.read_prompts`: prompt strings, or a 400 saying why)."""
    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 24 if tokenizer == "gpt2" else 8),
                ParamSpec("temperature", "double", 0.0),
                ParamSpec("top_k", "long", 0),
                ParamSpec("top_p", "double", 1.0),
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


SIGNATURE = signature()


# --------------------------------------------------------------------------------------------------
# Files


def save_files(model: Transformer, directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
    config.write_text(model.cfg.model_dump_json(indent=2))
    files = {"weights": str(weights), "config": str(config)}
    if (vocab := getattr(model, "text_vocab", None)) is not None:  # the id map travels with the model
        (directory / VOCAB_FILE).write_text(vocab.to_json())
        files["vocab"] = str(directory / VOCAB_FILE)
    return files


def load_from_files(weights: str | Path, config: str | Path, vocab: str | Path | None = None) -> Transformer:
    """The model from its files; a compact-vocabulary text model gets its id map as `model.text_vocab`
    (from `vocab`, by default the VOCAB_FILE beside `config` where there is one)."""
    vocab = Path(config).with_name(VOCAB_FILE) if vocab is None else Path(vocab)
    model = _load_from_files(weights, config)
    if vocab.is_file():
        from picollm.data.tokenizers import CompactVocab

        model.text_vocab = CompactVocab.from_file(vocab)
        if model.text_vocab.vocab_size != model.cfg.vocab_size:
            raise PicollmError(
                f"{vocab.name} maps {model.text_vocab.vocab_size} ids but the model has {model.cfg.vocab_size}"
            )
    return model


def _load_from_files(weights: str | Path, config: str | Path) -> Transformer:
    try:
        cfg = ModelConfig.model_validate_json(Path(config).read_text())
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise PicollmError(
            f"cannot read model config {Path(config).name}: {where + ': ' if where else ''}{err['msg']}"
        ) from None
    except (OSError, ValueError) as e:
        raise PicollmError(f"cannot read model config {Path(config).name}: {str(e).splitlines()[0]}") from None
    return build_from_state(load_state_dict(weights), cfg, source=Path(weights).name)


# --------------------------------------------------------------------------------------------------
# Logging and registering


class Logged(NamedTuple):
    uri: str
    version: str | None  # registry version, None when not registered
    model_id: str  # the MLflow 3 LoggedModel (models:/m-...) that metrics can be linked to


def _package_copy(directory: Path) -> Path:
    """The picollm package (sources only) for `code_paths`: the logged model loads without picollm installed."""
    src = Path(__file__).resolve().parents[1]  # picollm/, from picollm/tracking/
    dst = directory / "code" / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def log_model(
    model: Transformer, registered_name: str | None, tokenizer: str = "integers", step: int = 0, name: str = "model"
) -> Logged:
    """Log the model to the active run (and register it): a models-from-code pyfunc carrying the picollm
    package (`code_paths`), complete pinned requirements, a signature and an input example, so that
    `mlflow.pyfunc.load_model` and `mlflow models serve` work in an environment without picollm.
    `tokenizer` is how prompts are read: "integers" (synthetic models) or "gpt2" (text models). `name`: the
    logged model's name (`runs:/<run id>/<name>`; the UI lists it), e.g. the registered name.

    MLflow links the run's metrics logged at `step` to the model (RunLog.log_model passes a step with
    none, and links the final metrics itself).

    The first version of a name gets the alias `champion`; later ones are promoted explicitly.
    """
    from picollm.data.tokenizers import TOKENIZERS, bundle_gpt2_files, example_prompts

    if tokenizer not in TOKENIZERS:
        raise PicollmError(f"unknown tokenizer {tokenizer!r} (known: {', '.join(TOKENIZERS)})")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _mlflow_quiet():
        # MLflow nags about type hints; the signature is explicit.
        warnings.filterwarnings("ignore", message=r"(?s).*type hint", category=UserWarning)
        files = save_files(model, Path(tmp) / "files")
        tok = Path(tmp) / "files" / TOKENIZER_FILE
        tok.write_text(json.dumps({"kind": tokenizer}))
        files["tokenizer"] = str(tok)
        if tokenizer == "gpt2" and (bundle := bundle_gpt2_files(Path(tmp) / "tokenizer_files")) is not None:
            files["tokenizer_files"] = str(bundle)
        assert model.cfg.vocab_size is not None
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("serving.py")),
            artifacts=files,
            code_paths=[str(_package_copy(Path(tmp)))],
            pip_requirements=pip_requirements(tokenizer),
            signature=signature(tokenizer),
            input_example=example_prompts(tokenizer, model.cfg.vocab_size),
            metadata={"picollm.tokenizer": tokenizer, "picollm.vocab": "compact" if "vocab" in files else "full"},
            registered_model_name=registered_name,
            step=step,
        )
    version = None
    if registered_name:
        version = str(info.registered_model_version)
        client = MlflowClient()
        aliases = client.get_registered_model(registered_name).aliases
        if CHAMPION not in aliases:  # the lowest version, so that racing registrations agree on it
            versions = client.search_model_versions(f"name='{registered_name}'")
            first = min((int(v.version) for v in versions), default=int(version))
            try:
                client.set_registered_model_alias(registered_name, CHAMPION, str(first))
            except mlflow.exceptions.MlflowException:
                # A racing registration set it first (SQLite: UNIQUE constraint); it chose the same version.
                if CHAMPION not in client.get_registered_model(registered_name).aliases:
                    raise
    return Logged(info.model_uri, version, info.model_id)


def fail_pending_models(run_id: str) -> list[str]:
    """Mark FAILED the LoggedModels of `run_id` still PENDING, and return their ids. MLflow creates a
    LoggedModel PENDING and marks it READY (or FAILED on an exception) once its files are uploaded; a process
    stopped in between (Ctrl-C, SIGTERM, a kill) leaves it PENDING, and nothing else ever finalises it. A
    resumed run (which holds the run's claim: no other process is logging to it) calls this before it logs
    its model again."""
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    failed, token = [], None
    while True:
        page = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'", page_token=token)
        for m in page:
            if m.status == LoggedModelStatus.PENDING:
                client.set_logged_model_tags(m.model_id, {"picollm.note": "interrupted while logged; run resumed"})
                client.finalize_logged_model(m.model_id, LoggedModelStatus.FAILED)
                failed.append(m.model_id)
        token = page.token
        if not token:
            return failed


def _mlflow_quiet() -> Any:
    """Silence MLflow's own stderr prints ("Successfully registered model ...", "Created version ..."):
    the CLI reports registrations itself, and stderr is kept for errors (one line each). MLflow's
    own counted switch, so its nested uses inside log_model do not turn the prints back on."""
    from mlflow.utils.autologging_utils import MlflowEventsAndWarningsBehaviorGlobally

    return MlflowEventsAndWarningsBehaviorGlobally(
        disable_event_logs=True, disable_warnings=False, reroute_warnings=False
    )


def promote(name: str, version: str, alias: str = CHAMPION) -> None:
    client = MlflowClient()
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise ModelNotFoundError(f"model {name!r} has no version {version}") from None
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:  # reserved (latest, v3) or malformed alias names
        raise PicollmError(f"alias {alias!r}: {e.message.strip().splitlines()[0][:200]}") from None


def list_models() -> list[dict[str, Any]]:
    """Every registered model: name, latest version, number of versions, aliases, and the latest version's
    test metrics ("metrics": its tags `test/...`, else what its source run logged) and description."""
    from picollm.tracking.notes import VERSION_METRICS

    client = MlflowClient()
    out = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        last = max(versions, key=lambda v: int(v.version), default=None)
        metrics: dict[str, float] = {}
        if last is not None:
            metrics = {k: float(v) for k, v in (last.tags or {}).items() if k in VERSION_METRICS}
            if not metrics and last.run_id:  # a version registered before versions carried their metrics
                try:
                    logged = client.get_run(last.run_id).data.metrics
                except MlflowException:
                    logged = {}
                metrics = {k: logged[k] for k in VERSION_METRICS if k in logged}
        out.append(
            {
                "name": rm.name,
                "latest": int(last.version) if last is not None else None,
                "versions": len(versions),
                "aliases": dict(rm.aliases or {}),
                "metrics": metrics,
                "description": (last.description or "") if last is not None else "",
            }
        )
    return out


# --------------------------------------------------------------------------------------------------
# Resolving and loading


def _registered_names() -> list[str]:
    return sorted(rm.name for rm in MlflowClient().search_registered_models())


def resolve_model_uri(ref: str) -> str:
    """Turn a user reference into a models:/ or runs:/ URI, checking that it exists."""
    ref = ref.strip()
    if not ref:
        raise ModelNotFoundError("model reference is empty")
    client = MlflowClient()
    if ref.startswith("runs:/"):
        run_id, _, path = ref.removeprefix("runs:/").partition("/")
        _check_run(client, run_id)
        return f"runs:/{run_id}/{_run_model_path(client, run_id, path.strip('/'))}"
    if _RUN_ID.match(ref):
        _check_run(client, ref)
        return f"runs:/{ref}/{_run_model_path(client, ref, '')}"
    body = ref.removeprefix("models:/")
    if body.startswith("m-"):  # a logged-model id
        try:
            mlflow.get_logged_model(body.split("/")[0])
        except MlflowException:
            raise ModelNotFoundError(f"no logged model {body!r} in {mlflow.get_tracking_uri()}") from None
        return ref if ref.startswith("models:/") else f"models:/{body}"
    if "@" in body:
        name, alias = body.split("@", 1)
        _check_name(client, name)
        try:
            client.get_model_version_by_alias(name, alias)
        except MlflowException:
            raise ModelNotFoundError(f"model {name!r} has no alias {alias!r}") from None
        return f"models:/{name}@{alias}"
    if "/" in body:
        name, version = body.rsplit("/", 1)
        _check_name(client, name)
        if not version.isdigit():
            raise ModelNotFoundError(f"model version must be a number, got {version!r} in {ref!r}")
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise ModelNotFoundError(f"model {name!r} has no version {version}") from None
        return f"models:/{name}/{version}"
    _check_name(client, body)
    versions = client.search_model_versions(f"name='{body}'")
    if not versions:
        raise ModelNotFoundError(f"model {body!r} has no versions")
    return f"models:/{body}/{max(int(v.version) for v in versions)}"


def _check_name(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(_registered_names()) or "none yet"
        raise ModelNotFoundError(f"no registered model named {name!r} (registered: {known})") from None


def _run_model_path(client: MlflowClient, run_id: str, path: str) -> str:
    """The path of a run's model in a runs:/ URI: `path` when given and not `model`, else the name of the
    run's (latest) logged model. Models are logged under what they are (`picollm-linear`, `linear-2L`), older
    runs' as `model`; `runs:/<id>/model` and a bare run id reach either."""
    if path and path != "model":
        return path
    try:
        experiment = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    except MlflowException:  # a store without logged models (a file store, an old server): the old name
        return path or "model"
    names = [m.name for m in sorted(found, key=lambda m: m.creation_timestamp, reverse=True)]
    if path in names:  # an older run's `model`
        return path
    return names[0] if names else "model"


def _check_run(client: MlflowClient, run_id: str) -> None:
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ModelNotFoundError(f"no run with id {run_id!r} in {mlflow.get_tracking_uri()}") from None


def download_model(ref: str) -> tuple[str, Path]:
    uri = resolve_model_uri(ref)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as e:
        raise ModelNotFoundError(f"cannot download {uri}: {e.message.splitlines()[0][:200]}") from None
    files = local / "artifacts"
    if not (files / WEIGHTS_FILE).is_file():
        raise ModelNotFoundError(f"{uri} is not a picollm model (no {WEIGHTS_FILE})")
    return uri, files


def load_model(ref: str, device: str | torch.device = "cpu") -> Transformer:
    """The trained torch model (eval mode, with `generate`) behind a registry or run reference."""
    from picollm.tracking.store import init_tracking

    # MLflow's current URI: one the caller chose with mlflow.set_tracking_uri(), else the environment's,
    # else MLflow's default, which is picollm's (sqlite:///<cwd>/mlflow.db).
    init_tracking(mlflow.get_tracking_uri())
    _, files = download_model(ref)
    return load_from_files(files / WEIGHTS_FILE, files / CONFIG_FILE).to(device)


def model_version_of(ref: str) -> dict[str, str] | None:
    """Name, version and source run of a registry reference (None for run references)."""
    uri = resolve_model_uri(ref)
    if not uri.startswith("models:/") or uri.removeprefix("models:/").startswith("m-"):
        return None
    body = uri.removeprefix("models:/")
    client = MlflowClient()
    if "@" in body:
        name, alias = body.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, version = body.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id or ""}


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved once: the pinned URI (an alias could move while a flow works), the
    registry name and version where there is one, and the training run that produced it."""

    ref: str
    uri: str  # models:/NAME/VERSION for registry references
    name: str | None = None
    version: str | None = None
    run_id: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return f"{self.name} v{self.version}"
        return f"run {self.run_id[:8]}" if self.run_id else self.uri

    def tags(self) -> dict[str, str]:
        """`model.*` tags for a run that uses this model."""
        tags = {"model.ref": self.ref, "model.uri": self.uri}
        for key, value in (
            ("model.name", self.name),
            ("model.version", self.version),
            ("model.source_run", self.run_id),
        ):
            if value:
                tags[key] = value
        return tags

    def load(self) -> Transformer:
        """The model, from the store MLflow points at now (unlike `load_model`, which resolves the store)."""
        _, files = download_model(self.uri)
        return load_from_files(files / WEIGHTS_FILE, files / CONFIG_FILE)

    def training_config(self) -> TrainRunConfig | None:
        """The config its training run logged (`config.yaml`), or None (with a warning) where there is none."""
        if not self.run_id:
            return None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = mlflow.artifacts.download_artifacts(
                    run_id=self.run_id, artifact_path=SOURCE_CONFIG, dst_path=tmp
                )
                return validate(TrainRunConfig, read_yaml(path), source=f"{SOURCE_CONFIG} of run {self.run_id}")
        except (MlflowException, OSError, PicollmError) as e:
            log.warning("run %s has no usable %s: %s", self.run_id, SOURCE_CONFIG, str(e).splitlines()[0][:200])
            return None

    def training_history(self, keys: tuple[str, ...] = ("train/loss", "val/loss")) -> list[dict[str, float]]:
        """Per-epoch metrics of its training run, as the trainer's history records them."""
        if not self.run_id:
            return []
        client = MlflowClient()
        try:
            series = {k: sorted(client.get_metric_history(self.run_id, k), key=lambda m: m.step) for k in keys}
        except MlflowException:
            return []
        n = min(len(v) for v in series.values())
        return [{"epoch": float(i + 1), **{k: v[i].value for k, v in series.items()}} for i in range(n)]


def resolve(ref: str) -> ResolvedModel:
    """Resolve a reference (see `load_model`); ModelNotFoundError (one clear line) if it names nothing."""
    uri = resolve_model_uri(ref)
    info = model_version_of(ref)
    if info is not None:
        pinned = f"models:/{info['name']}/{info['version']}"
        return ResolvedModel(ref, pinned, info["name"], info["version"], info["run_id"] or None)
    if uri.startswith("runs:/"):
        return ResolvedModel(ref, uri, run_id=uri.removeprefix("runs:/").split("/")[0])
    run_id = None
    try:  # models:/m-<id>: a logged model knows the run that produced it
        run_id = mlflow.get_logged_model(uri.removeprefix("models:/")).source_run_id
    except (MlflowException, AttributeError) as e:
        log.warning("cannot find the source run of %s: %s", uri, e)
    return ResolvedModel(ref, uri, run_id=run_id)
