"""holmes.model: presets load, files round-trip, every bad model.yaml is one InputError."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from holmes.model import ModelConfig, list_presets, load_model, parse_model, preset_model
from topology.errors import InputError


def valid() -> dict[str, Any]:
    return preset_model("gpt-1.3b").to_plain()


def test_required_presets_exist_and_load() -> None:
    presets = list_presets()
    for name in ("tiny-gpt", "gpt-1.3b", "llama-7b", "llama-70b", "skippipe-llama-24l"):
        assert name in presets
    for name in presets:
        config = load_model(name)
        assert isinstance(config, ModelConfig)
        assert config.model.name == name


def test_preset_shapes_are_the_published_ones() -> None:
    tiny = load_model("tiny-gpt").model
    shape = (tiny.layers, tiny.hidden, tiny.heads, tiny.ffn, tiny.vocab, tiny.seq_len)
    assert shape == (8, 128, 4, 512, 256, 128)
    assert tiny.dtype == "fp32"
    big = load_model("llama-70b").model
    assert (big.layers, big.hidden, big.heads, big.kv_heads, big.ffn) == (80, 8192, 64, 8, 28672)
    assert big.kv_hidden == 1024
    skip = load_model("skippipe-llama-24l")
    assert (skip.model.layers, skip.model.hidden, skip.training.microbatch) == (24, 1024, 8)
    assert skip.model.seconds_per_layer_per_sample == 0.055


def test_presets_are_independent_copies() -> None:
    first = load_model("tiny-gpt")
    first.model.layers = 99
    assert load_model("tiny-gpt").model.layers == 8


def test_file_round_trip(tmp_path: Path) -> None:
    original = load_model("llama-70b")
    path = tmp_path / "model.yaml"
    path.write_text(original.to_yaml())
    assert load_model(path) == original
    assert load_model(str(path)) == original


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(InputError) as info:
        load_model("llama-8b")
    message = str(info.value)
    assert "llama-8b" in message
    for name in list_presets():
        assert name in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InputError) as info:
        load_model(missing)
    assert str(info.value) == f"{missing}: file not found"


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    target = data
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return data


_DELETE = object()

BAD_CASES = [
    ("model.colour", "blue", "model.colour", "Extra inputs"),
    ("model.heads", 30, "model.heads", "do not divide hidden"),
    ("model.kv_heads", 5, "model.kv_heads", "must divide"),
    ("training.global_batch", 1002, "training.global_batch", "not divisible by microbatch"),
    ("training.microbatch", 3, "training.global_batch", "not divisible"),
    ("version", 2, "version", "unsupported version 2"),
    ("model.layers", 0, "model.layers", "must be a number in [1, 1024], got 0"),
    ("model.layers", 2.5, "model.layers", "integer"),
    ("model.dtype", "int4", "model.dtype", "bf16"),
    ("model.arch", "mamba", "model.arch", "gpt"),
    ("model.hidden", _DELETE, "model.hidden", "Field required"),
    ("training", _DELETE, "training", "Field required"),
    ("model.seconds_per_layer_per_sample", -1.0, "model.seconds_per_layer_per_sample",
     "must be a number in [1e-09, 3600] s, got -1"),
]


@pytest.mark.parametrize(("dotted", "value", "field", "words"), BAD_CASES)
def test_bad_model_file_is_one_error_naming_file_and_field(
    tmp_path: Path, dotted: str, value: Any, field: str, words: str
) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(_set(valid(), dotted, value)))
    with pytest.raises(InputError) as info:
        load_model(path)
    error = info.value
    assert error.path == str(path)
    assert error.field == field
    assert words in error.message
    assert "\n" not in str(error)


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_model(path)
    path.write_text("model: {name: x\n")
    with pytest.raises(InputError, match="model.yaml: line"):
        load_model(path)


def test_parse_defaults_and_derived_values() -> None:
    data = valid()
    del data["model"]["dtype"]
    del data["training"]["recompute"]
    config = parse_model(data)
    assert config.model.dtype == "bf16"
    assert config.training.recompute == "selective"
    assert config.model.kv_hidden == config.model.hidden
    assert config.training.microbatches == 128
