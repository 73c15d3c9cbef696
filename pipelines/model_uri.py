"""`make serve`'s model: MODEL read as every picollm command reads a model reference (NAME = its latest
version, NAME@ALIAS, NAME/VERSION, models:/..., runs:/RUN_ID/..., a run id), printed as the URI that
`mlflow models serve -m` takes (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/...`). A reference that
names nothing, or a PICOLLM_SERVE_* limit that is not a positive number, is one `error:` line and exit 2,
before MLflow starts.

    python -m pipelines.model_uri MODEL_REF      (the store: MLFLOW_TRACKING_URI, else ./mlflow.db)
"""

from __future__ import annotations

import sys
from pathlib import Path


def model_uri(ref: str) -> str:
    from picollm.errors import ModelNotFoundError
    from picollm.tracking.registry import resolve_model_uri
    from picollm.tracking.store import init_tracking, resolve_uri, sqlite_path

    store = resolve_uri()
    db = sqlite_path(store)
    if db is not None and not Path(db).is_file():  # not created just to look a name up in it
        raise ModelNotFoundError(f"no model {ref!r}: the tracking store {store} does not exist")
    init_tracking(store)
    return resolve_model_uri(ref)


def main(argv: list[str]) -> int:
    from picollm.errors import PicollmError, elide
    from picollm.runtime import logs

    logs.configure(verbose=False)
    if len(argv) != 2:
        print("usage: python -m pipelines.model_uri MODEL_REF", file=sys.stderr)
        return 2
    try:
        from picollm.tracking.limits import ServeLimits

        ServeLimits.from_env()  # the served model reads PICOLLM_SERVE_* when it loads: a bad one is refused here
        print(model_uri(argv[1]))
    except PicollmError as e:
        print(f"error: {elide(str(e))}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
