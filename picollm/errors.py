"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class PicollmError(Exception):
    """A problem with the user's input (config, override, model reference, file, data)."""


class ConfigError(PicollmError):
    """An invalid config file, key or value."""


class ModelNotFoundError(PicollmError):
    """A model reference that names no registered model, version, alias or run."""
