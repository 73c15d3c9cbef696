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

    flow: Literal["train"] = Field("train")
    """the flow a trial runs; only train for now"""
    config: Path = Field(Path("configs/linear.yaml"))
    """base training config"""
    overrides: list[str] = Field(default_factory=list)
    """--set overrides of the base config"""


class ParamSpace(StrictModel):
    """One searched key: a float or int range (linear or log), or categorical choices."""

    type: Literal["float", "int", "categorical"] = Field()
    """a float or int range (low, high; log or step), or categorical choices"""
    low: int | float | None = Field(None)
    """float, int: the lower end of the range (inclusive)"""
    high: int | float | None = Field(None)
    """float, int: the upper end of the range (inclusive), above low"""
    log: bool = Field(False)
    """sample uniformly in log space (needs low > 0; not with step)"""
    step: int | float | None = Field(None, gt=0)
    """grid spacing of a range; null = continuous (int: 1)"""
    choices: list[bool | int | float | str | None] | None = Field(None)
    """categorical: the values, each listed once"""

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
    metric: str = Field("val/loss")
    """a metric every training run logs: val/... (last epoch) or test/..., also per family (val/accuracy/alternating);
    select on val/, report on test/"""
    direction: Literal["minimize", "maximize"] | None = Field(None)
    """null = minimize a loss or perplexity, maximize anything else"""


class SamplerConfig(StrictModel):
    name: Literal["tpe", "random", "grid"] = Field("tpe")
    """Optuna sampler; grid needs a step or choices on every range, and trials at most the grid's size"""
    seed: int | None = Field(0)
    """sampler seed; null = unseeded"""
    startup_trials: int = Field(4, ge=0)
    """tpe: random trials before TPE models the good region"""


class PrunerConfig(StrictModel):
    name: Literal["none", "median", "successive_halving"] = Field("median")
    """Optuna pruner that stops unpromising trials early; none = every trial runs to the end"""
    metric: str = Field("val/loss")
    """per-epoch metric reported to the pruner at step = epoch (val/... or train/loss; negated when it goes the other
    way from the objective)"""
    startup_trials: int = Field(2, ge=0)
    """median: trials that finish before any is pruned"""
    warmup_epochs: int = Field(0, ge=0)
    """median: no pruning up to this epoch"""
    min_epochs: int = Field(1, ge=1)
    """successive_halving: epochs every trial gets (min_resource)"""
    reduction_factor: int = Field(3, ge=2)
    """successive_halving: 1/factor of the trials go on per rung"""


class SweepTrackingConfig(TrackingConfig):
    # Parameters whose default values are overridden from TrackingConfig
    experiment: str = Field("picollm-sweep", min_length=1)
    """MLflow experiment (at most 500 characters)"""
    run_name: str | None = Field(None)
    """the parent run's name; null = the study name"""
    registered_model: str | None = Field("picollm-sweep")
    """promote registers the best config's model under it (only promote registers)"""
    log_model: bool = Field(True)
    """unused: trials and re-runs log no model, the promoted one always does"""


class SweepConfig(StrictModel):
    """`picollm sweep`: an Optuna study over a base training config, one MLflow parent run per study."""

    base: SweepBase = Field(default_factory=SweepBase)
    """What each trial trains: a base config and overrides; the space's values are applied on top."""
    space: dict[str, ParamSpace] = Field(min_length=1)
    """dotted key of the base config (as for --set) -> its range; the keys contain dots, so edit the file (or replace
    space whole) rather than --set one entry"""
    objective: Objective = Field(default_factory=Objective)
    """The metric the study optimises, and which way."""
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    """How Optuna picks the next trial's values."""
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    """Which trials Optuna stops early, on a per-epoch metric."""
    trials: int = Field(12, ge=1)
    """finished (complete + pruned) trials the study should have, in all"""
    workers: int = Field(1, ge=1)
    """local processes working on the study (N-1 started), each with cores / N torch threads"""
    timeout_s: float | None = Field(None, gt=0)
    """a trial running longer is stopped (KILLED, failed in Optuna); null = no limit"""
    storage: str | None = Field(None)
    """Optuna storage: null = sqlite:///optuna.db in the cwd; team = database optuna on the team PostgreSQL; or a URL
    (sqlite:///PATH, postgresql://...)"""
    study: str | None = Field(None)
    """study name; null = <base config name>-sweep"""
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    """params of the first trials, e.g. [{train.lr: 0.003, model.pos_encoding: learned}] (missing keys are sampled)"""
    top_k: int = Field(0, ge=0)
    """re-run the best k trials over top_k_seeds at the end; 0 = off"""
    top_k_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=2)
    """train.seed values of the re-runs, distinct (at least two: a confidence interval)"""
    promote: bool = Field(False)
    """train the best config, register it under tracking.registered_model, move @champion to it"""
    tracking: SweepTrackingConfig = Field(default_factory=SweepTrackingConfig)
    """Where the parent run (one per study) and its trial children are logged."""

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
