"""Pydantic schemas for every config file, and loading with dotted `--set` overrides.

Every schema forbids unknown keys, so a typo is an error that names the key rather than a silently
ignored setting. One module per concern: `base` (the strict base and loading), `training` (one training
run), and one per flow (`compare`, `dpo`, `analysis`, `bench`, `server`); everything is importable from
`picollm.config`.
"""

from __future__ import annotations

from picollm.config.analysis import (  # noqa: F401
    ANALYSIS_SECTIONS,
    AnalysisConfig,
)
from picollm.config.base import (  # noqa: F401
    FAMILIES,
    Family,
    StrictModel,
    apply_overrides,
    flatten,
    load_config,
    parse_override,
    read_yaml,
    set_key,
    to_yaml,
    validate,
)
from picollm.config.bench import (  # noqa: F401
    BenchConfig,
    BenchRunsConfig,
    BenchSweepConfig,
)
from picollm.config.compare import (  # noqa: F401
    CompareConfig,
    CompareSettings,
    EfficiencyConfig,
    LearningCurveConfig,
)
from picollm.config.dpo import (  # noqa: F401
    CORRUPTIONS,
    GPT2_VOCAB,
    Corruption,
    DPOConfig,
    DPODataConfig,
    DPORunConfig,
    DPOTrackingConfig,
    SFTConfig,
)
from picollm.config.reference_results import (  # noqa: F401
    ReferenceMetric,
    ReferenceResults,
)
from picollm.config.server import (  # noqa: F401
    ServerConfig,
)
from picollm.config.training import (  # noqa: F401
    DataConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    TrainRunConfig,
    link_vocab,
)
from picollm.model.config import ModelConfig  # noqa: F401  (the model wing's schema, exported with the others)
