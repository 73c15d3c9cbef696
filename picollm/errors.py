"""User-facing errors: the CLI turns these into one line on stderr and their `exit_code` (2 = bad input)."""

MAX_LINE = 300
"""The longest error line the CLI prints: a value quoted in a message is elided, never a 34 MB "line"."""


def elide(text: str, limit: int = MAX_LINE) -> str:
    """`text` on one line and at most `limit` characters: the middle is cut, so the start (what failed)
    and the end (often the reason) both stay."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    tail = max(0, min(60, limit // 4))
    head = limit - tail - 5
    return f"{flat[:head]} ... {flat[len(flat) - tail :]}" if tail else flat[: limit - 3] + "..."


class PicollmError(Exception):
    """A problem with the user's input (config, override, model reference, file, data)."""

    exit_code = 2


class ConfigError(PicollmError):
    """An invalid config file, key or value."""


class ModelNotFoundError(PicollmError):
    """A model reference that names no registered model, version, alias or run."""


class TrainingError(PicollmError):
    """Training could not go on (e.g. a non-finite loss): not the input's fault, so exit code 1."""

    exit_code = 1


class StorageError(PicollmError):
    """The tracking or artifact store failed under a run (unwritable, disk full, gone): exit code 1.

    What the run logged before the failure stays in the store; the run is marked FAILED."""

    exit_code = 1


class TimeBudgetExceeded(PicollmError):
    """A generation that ran past its time budget (the served model's PICOLLM_SERVE_TIME_BUDGET_S) and was
    stopped: the request asked for more than the budget allows. HTTP 504 from `mlflow models serve`."""


class RunBusy(PicollmError):
    """A run another process is training or resuming right now (its claim is held): exit code 2."""


class RunStopped(Exception):
    """A run stopped on purpose before its end, e.g. a sweep trial the pruner stopped: not a failure.

    `tracking.tracked_run` closes its run KILLED (not FAILED) with `tags` (e.g. `sweep.pruned=true`)."""

    def __init__(self, message: str, tags: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.tags = dict(tags or {})
