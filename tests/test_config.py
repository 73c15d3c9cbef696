from __future__ import annotations

import pytest

from picollm.config import (
    DataConfig,
    ModelConfig,
    TrainRunConfig,
    load_config,
    parse_override,
    to_yaml,
)
from picollm.errors import ConfigError, PicollmError

from .conftest import TINY


def test_tiny_config_loads_and_links_vocab():
    cfg = load_config(TrainRunConfig, TINY)
    assert cfg.data.vocab_size == 32
    assert cfg.model.vocab_size == 32  # null in the file: taken from data.vocab_size
    assert cfg.model.pad_token == 31
    assert cfg.model.attention == "linear"


def test_defaults_without_file():
    cfg = load_config(TrainRunConfig)
    assert cfg == TrainRunConfig()


@pytest.mark.parametrize(
    "override, key",
    [("model.foo=1", "model.foo"), ("train.lrr=0.1", "train.lrr"), ("bogus.x=1", "bogus")],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TrainRunConfig, TINY, [override])
    assert key in str(e.value)
    assert "unknown key" in str(e.value)


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 1\n  epoch_count: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epoch_count"):
        load_config(TrainRunConfig, path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.attention=foo", "model.attention"),
        ("train.lr=-1", "train.lr"),
        ("data.seq_types=[counting, squares]", "data.seq_types"),
        ("train.epochs=many", "train.epochs"),
    ],
)
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TrainRunConfig, TINY, [override])
    assert key in str(e.value)


def test_override_values_are_parsed_as_yaml():
    assert parse_override("train.lr=0.01") == (["train", "lr"], 0.01)
    assert isinstance(parse_override("train.lr=0.01")[1], float)
    assert parse_override("data.seq_types=[counting]") == (["data", "seq_types"], ["counting"])
    assert parse_override("train.grad_clip=null") == (["train", "grad_clip"], None)
    cfg = load_config(TrainRunConfig, TINY, ["train.lr=0.01", "data.seq_types=[counting]", "model.n_layers=3"])
    assert cfg.train.lr == 0.01
    assert cfg.data.seq_types == ["counting"]
    assert cfg.model.n_layers == 3
    assert cfg.model.d_model == 16  # untouched keys keep the file's values


@pytest.mark.parametrize("bad", ["noequals", "=3", "train..lr=1", ".lr=1", "train.=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(TrainRunConfig, TINY, [bad])


def test_override_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(TrainRunConfig, TINY, ["train.lr.x=1"])


def test_d_model_must_divide_by_heads():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(TrainRunConfig, TINY, ["model.d_model=10", "model.n_heads=3"])
    with pytest.raises(ValueError):
        ModelConfig(d_model=10, n_heads=4)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainRunConfig, tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["data: [unclosed\n", "model:\n  d_model: 16\n bad_indent: 1\n"])
def test_invalid_yaml(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainRunConfig, path)


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- data\n- model\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TrainRunConfig, path)


def test_cross_section_checks():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        load_config(TrainRunConfig, TINY, ["model.vocab_size=64"])
    with pytest.raises(ConfigError, match="max_seq_len"):
        load_config(TrainRunConfig, TINY, ["model.pos_encoding=learned", "model.max_seq_len=8"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_len": 10, "max_len": 5},
        {"seq_types": ["counting", "counting"]},
        {"start_range": (5, 2)},
        {"vocab_size": 32, "start_range": (0, 31)},  # 31 is the pad, not a value
        {"vocab_size": 32, "arithmetic_steps": [31]},  # 0 modulo 31
        {"vocab_size": 32, "geometric_ratios": [32]},  # 1 modulo 31
    ],
)
def test_data_config_rejects(kwargs):
    with pytest.raises(ValueError):
        DataConfig(**kwargs)


def test_config_error_is_a_picollm_error():
    assert issubclass(ConfigError, PicollmError)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(TrainRunConfig, TINY, ["data.seq_types=[counting, geometric]", "train.lr=0.02"])
    path = tmp_path / "again.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(TrainRunConfig, path) == cfg
