"""User-facing errors: the CLI turns these into one line on stderr and their `exit_code` (2 = bad input)."""


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


class RunStopped(Exception):
    """A run stopped on purpose before its end, e.g. a sweep trial the pruner stopped: not a failure.

    `tracking.tracked_run` closes its run KILLED (not FAILED) with `tags` (e.g. `sweep.pruned=true`)."""

    def __init__(self, message: str, tags: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.tags = dict(tags or {})
