"""The model's config: sizes, positions, and the token mixer with the options it reads.

`attention` names a mixer of the registry (picollm/model/mixers/__init__.py). Some keys are mixer options
(`MIXER_OPTIONS`): each mixer class declares the ones it reads, and a non-default value for one it does not
read is an error. Checking that imports the mixer's module (torch); importing this one does not.
The model wing owns this schema (picollm.config re-exports it) and imports nothing from picollm.config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from picollm.model import mixers

# ModelConfig keys that only some mixers read (the others refuse a non-default value).
MIXER_OPTIONS = ("feature_map", "feature_dim", "normalizer", "window")


class ModelConfig(BaseModel):
    # The config package's StrictModel settings (tests/test_config.py checks they stay the same): no unknown
    # key, validated assignments, no NaN or inf.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, use_attribute_docstrings=True
    )

    attention: str = Field(
        mixers.DEFAULT,
        description="The token mixer, a name of the mixer registry: "
        + ", ".join(f"`{n}`" for n in mixers.names())
        + " (docs/reference/mixers.md).",
    )
    pos_encoding: Literal["alibi", "none", "sinusoidal", "learned"] = Field("alibi")
    """`alibi`: softmax adds the ALiBi bias -m_h * distance, and the mixers with a fixed decay decay by g_h =
    exp(-m_h); `none`; `sinusoidal` (added at the embedding's scale); `learned` (a table of max_seq_len rows)."""
    alibi_exponent: float = Field(4.0, gt=0)
    """ALiBi slopes m_h = 2^(-alibi_exponent * h / n_heads), h = 1..n_heads (the paper uses 8; 4 gives the more local
    heads that 8-32-token sequences need)."""
    d_model: int = Field(128, ge=4)
    """Residual stream width."""
    n_layers: int = Field(2, ge=1)
    """Number of Transformer blocks."""
    n_heads: int = Field(4, ge=1)
    """Heads per mixer; d_model must be divisible by it (d_head = d_model / n_heads)."""
    d_mlp: int | None = Field(None, ge=1)
    """MLP width (GELU); null = 4 * d_model."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings, attention and residual branches."""
    vocab_size: int | None = Field(None, ge=2)
    """Token ids 0..vocab_size-1; null = taken from data.vocab_size."""
    pad_id: int | None = Field(None)
    """The padding token; null = vocab_size - 1."""
    max_seq_len: int = Field(1024, ge=1)
    """Rows of the `learned` positional table (the only encoding with a length limit)."""
    tie_embeddings: bool = Field(False)
    """Share the output head with the token embedding (untied learned counting and arithmetic faster on the reference
    workload)."""
    linear_chunk_size: int = Field(64, ge=1)
    """Recurrent mixers: sequences longer than this use the chunkwise form, of chunks this long."""
    linear_eps: float = Field(1e-6, gt=0)
    """Linear mixers: the denominator's epsilon, and the per-head RMSNorm's."""
    feature_map: Literal["elu", "relu", "taylor"] = Field("elu")
    """Kernel mixers (linear, gated_linear): phi = elu(x)+1, relu(x), or Based's 2nd-order Taylor map (phi(q).phi(k) =
    1 + s + s^2/2, s = q.k / sqrt(d))."""
    feature_dim: int | None = Field(None, ge=1, le=64)
    """feature_map taylor only: q and k are projected to this width per head before the map (phi has 1 + f + f(f+1)/2
    features); null = d_head."""
    normalizer: Literal["denominator", "rmsnorm"] = Field("denominator")
    """Kernel mixers: `denominator` (divide by phi(q).z, Katharopoulos) or `rmsnorm` (the numerator alone, each head's
    output RMS-normalised, as fla does; no z in the state)."""
    short_conv: int | None = Field(None, ge=1, le=16)
    """Every mixer: width k of a causal depthwise convolution over the mixer's input, added to it and zero at init
    (Zoology puts one before every mixer; it lets one layer see the previous tokens); null = none."""
    window: int = Field(64, ge=1)
    """sliding_window: each query sees itself and the window-1 keys before it."""

    @field_validator("attention")
    @classmethod
    def _known_mixer(cls, name: str) -> str:
        if name not in mixers.MIXERS:
            raise ValueError(f"unknown mixer {name!r} (known: {', '.join(mixers.names())})")
        return name

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        wrong = self.inapplicable_options()
        if wrong:
            readers = {key: [n for n in mixers.names() if key in mixers.mixer_class(n).options] for key, _ in wrong}
            raise ValueError(
                f"{', '.join(f'{k}={v}' for k, v in wrong)} does not apply to attention={self.attention}"
                + (f", feature_map={self.feature_map}" if "feature_map" in self.mixer.options else "")
                + " ("
                + "; ".join(f"{k}: {', '.join(r) or 'no mixer'}" for k, r in readers.items())
                + ")"
            )
        return self

    def inapplicable_options(self) -> list[tuple[str, object]]:
        """Mixer options set to a non-default value that this config's mixer does not read."""
        applies = self.mixer.applicable_options(self)
        fields = type(self).model_fields
        return [
            (key, getattr(self, key))
            for key in MIXER_OPTIONS
            if key not in applies and getattr(self, key) != fields[key].default
        ]

    @property
    def mixer(self) -> type:
        """The mixer class (a picollm.model.mixers.base.Mixer subclass)."""
        return mixers.mixer_class(self.attention)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    @property
    def pad_token(self) -> int:
        assert self.vocab_size is not None
        return self.vocab_size - 1 if self.pad_id is None else self.pad_id
