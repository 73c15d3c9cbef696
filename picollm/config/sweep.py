"""What `picollm sweep` searches: the sweep config (`SweepConfig`, configs/sweep.yaml) and the ranges
of its space, each over a dotted key of the base training config (the keys `--set` takes).

A range checks itself (non-empty, log only above 0, whole numbers for int), names the values checked
against the base config before any work (`samples`), enumerates itself for a grid (`grid`) and draws
from a trial (`suggest`). The search itself (base config, study, storage) is picollm/sweep.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from picollm.config import StrictModel, TrackingConfig

if TYPE_CHECKING:
    from optuna.trial import Trial


class SweepBase(StrictModel):
    """What each trial trains: a base config and overrides; the space's values are applied on top."""

    flow: Literal["train"] = Field("train", description="the flow a trial runs; only train for now")
    config: Path = Field(Path("configs/linear.yaml"), description="base training config")
    overrides: list[str] = Field(default_factory=list, description="--set overrides of the base config")


class ParamSpace(StrictModel):
    """One searched key: a float or int range (linear or log), or categorical choices."""

    type: Literal["float", "int", "categorical"]
    low: int | float | None = None
    high: int | float | None = None
    log: bool = Field(False, description="sample uniformly in log space (low > 0)")
    step: int | float | None = Field(None, gt=0, description="grid spacing of a range; null = continuous (int: 1)")
    choices: list[bool | int | float | str | None] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpace:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty choices list")
            if any(v is not None for v in (self.low, self.high, self.step)) or self.log:
                raise ValueError("categorical takes choices only (no low, high, log, step)")
            if len({json.dumps(c) for c in self.choices}) != len(self.choices):
                raise ValueError("choices lists a value twice")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low and high, not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs low and high")
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.type == "int":
            for name in ("low", "high", "step"):
                v = getattr(self, name)
                if v is not None and not float(v).is_integer():
                    raise ValueError(f"int range: {name} must be a whole number (got {v})")
        return self

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return json.dumps(value) in {json.dumps(c) for c in self.choices or []}
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high and (self.type == "float" or float(value).is_integer())

    def describe(self) -> str:
        """One line for the parent run's params, e.g. `float [0.0003, 0.01] log`."""
        if self.type == "categorical":
            return f"categorical {json.dumps(self.choices)}"
        extra = " log" if self.log else (f" step {self.step:g}" if self.step is not None else "")
        return f"{self.type} [{self.low:g}, {self.high:g}]{extra}"

    def samples(self) -> list[Any]:
        """Values checked against the base config before any work: both ends, or every choice."""
        return list(self.choices or []) if self.type == "categorical" else [self.low, self.high]

    def grid(self) -> list[Any] | None:
        """Every value of a grid search; None for a continuous range."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None:
            return None
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]

    def suggest(self, trial: Trial, key: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(key, self.choices or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(key, float(self.low), float(self.high), step=self.step, log=self.log)


class Objective(StrictModel):
    metric: str = Field("val/loss", description="a metric every training run logs: val/... or test/...")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="null = minimize a loss or perplexity, maximize anything else"
    )


class SamplerConfig(StrictModel):
    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: int | None = Field(0, description="null = unseeded")
    startup_trials: int = Field(4, ge=0, description="tpe: random trials before TPE takes over")


class PrunerConfig(StrictModel):
    name: Literal["none", "median", "successive_halving"] = "median"
    metric: str = Field("val/loss", description="per-epoch metric reported to the pruner (val/... or train/loss)")
    startup_trials: int = Field(2, ge=0, description="median: trials that finish before any is pruned")
    warmup_epochs: int = Field(0, ge=0, description="median: no pruning up to this epoch")
    min_epochs: int = Field(1, ge=1, description="successive_halving: epochs every trial gets (min_resource)")
    reduction_factor: int = Field(3, ge=2, description="successive_halving: 1/factor of the trials go on per rung")


class SweepTrackingConfig(TrackingConfig):
    # Parameters whose default values are overridden from TrackingConfig
    experiment: str = Field("picollm-sweep", min_length=1)
    registered_model: str | None = Field("picollm-sweep", description="--promote registers the best under it")


class SweepConfig(StrictModel):
    """`picollm sweep`: an Optuna study over a base training config, one MLflow parent run per study."""

    base: SweepBase = Field(default_factory=SweepBase)
    space: dict[str, ParamSpace] = Field(min_length=1, description="dotted key (as for --set) -> its range")
    objective: Objective = Field(default_factory=Objective)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    trials: int = Field(12, ge=1, description="finished (complete + pruned) trials the study should have")
    workers: int = Field(1, ge=1, description="local processes working on the study, the cores shared")
    timeout_s: float | None = Field(None, gt=0, description="a trial running longer is stopped (failed)")
    storage: str | None = Field(None, description="null = sqlite:///optuna.db in the cwd; team; or a database URL")
    study: str | None = Field(None, description="study name; null = <base config name>-sweep")
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="params of the first trials")
    top_k: int = Field(0, ge=0, description="re-run the best k trials over top_k_seeds at the end")
    top_k_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=2, description="train.seed values")
    promote: bool = Field(False, description="train the best config, register it, move @champion to it")
    tracking: SweepTrackingConfig = Field(default_factory=SweepTrackingConfig)

    @field_validator("top_k_seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("top_k_seeds lists a seed twice")
        return seeds

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if self.top_k > self.trials:
            raise ValueError(f"top_k ({self.top_k}) exceeds trials ({self.trials})")
        if self.promote and not self.tracking.registered_model:
            raise ValueError("promote needs tracking.registered_model (the name to register the best under)")
        return self


def direction_of(metric: str) -> str:
    """Which way a metric is better: down for a loss or perplexity, up for anything else."""
    last = metric.split("/")[1] if "/" in metric else metric
    return "minimize" if last in ("loss", "perplexity") else "maximize"
