"""Whose messages reach stderr in a picollm command: its own warnings always; those of the libraries under it
(urllib3's "Retrying ..." for a stalled server, MLflow's and SQLAlchemy's loggers, Python warnings) only
with `picollm -v`, so a failure is the one `error:` line the CLI prints.

`configure(verbose)` is the CLI's switch (it sets PICOLLM_LIBRARY_LOGS, which the processes a command
starts, torchrun ranks and sweep workers, inherit). The filter is on the handlers, not on the loggers'
levels: every logger still emits as before (code that reads MLflow's records keeps working) and only what
is printed changes. MLflow installs its own stderr handler when it is imported, after the CLI starts:
`quiet_library_handlers` (called by `tracking.store.init_tracking`, which every command runs before using
MLflow) puts the filter on it. Outside the CLI (picollm used as a library) nothing is filtered.
"""

from __future__ import annotations

import logging
import os

ENV = "PICOLLM_LIBRARY_LOGS"  # "0": picollm's messages only; unset or anything else: everything
OWN = ("picollm", "pipelines", "__main__")
LIBRARY_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey")  # the loggers MLflow gives its own handler


def library_messages() -> bool:
    return os.environ.get(ENV, "1") != "0"


class OwnMessagesOnly(logging.Filter):
    """Passes picollm's records; other libraries' only while library messages are on (`picollm -v`)."""

    picollm_filter = True

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OWN or library_messages()


def _add_filter(handler: logging.Handler) -> None:
    if not any(getattr(f, "picollm_filter", False) for f in handler.filters):
        handler.addFilter(OwnMessagesOnly())


def quiet_library_handlers() -> None:
    """Put the filter on the stderr handlers MLflow installed for its loggers (and on the root's)."""
    for name in ("", *LIBRARY_LOGGERS):
        for handler in logging.getLogger(name).handlers:
            _add_filter(handler)


def configure(verbose: bool) -> None:
    """The CLI's logging: INFO and every library's messages with `verbose`, else WARNING and picollm's only.
    Python warnings go through logging (`py.warnings`), so a library's DeprecationWarning is a library
    message too."""
    os.environ[ENV] = "1" if verbose else "0"
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.captureWarnings(True)
    quiet_library_handlers()
