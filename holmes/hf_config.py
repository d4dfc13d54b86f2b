"""The `hf:` model source: a Hugging Face `config.json` read as plain JSON, and the
model.yaml the planner derives from it.

`hetsched plan ... -m hf:SOURCE` and `holmes.runtime.hf` both start here, so the plan
and the model they build agree on layers, hidden, heads, ffn and vocab. SOURCE is one of

- a built-in name (`builtin_names()`: tiny Llama, Qwen2, Qwen3, Mistral and GPT-2
  configs, 4 layers of width 64 over bytes, shipped in `holmes/hf_configs/`): random init;
- a path to a `config.json` file: random init;
- a local directory with `config.json` and safetensors weights: those weights.

Nothing is downloaded and transformers is not imported here. The derived model.yaml takes
`seq_len = min(max_position_embeddings, MAX_SEQ_LEN)` and the training job of the
tiny-gpt preset (global batch 16, microbatch 4, 200 steps); write a model.yaml of your
own for other values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topology.errors import InputError

HF_PREFIX = "hf:"
BUILTIN_DIR = Path(__file__).resolve().parent / "hf_configs"
MAX_SEQ_LEN = 2048
SUPPORTED_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
TRAINING_DEFAULTS: dict[str, Any] = {"global_batch": 16, "microbatch": 4, "steps": 200}

# config.json key of each model.yaml field, per family (GPT-2 uses its own names).
_KEYS: dict[str, dict[str, str]] = {
    "gpt2": {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head",
             "vocab": "vocab_size", "positions": "n_positions"},
    "llama": {"layers": "num_hidden_layers", "hidden": "hidden_size",
              "heads": "num_attention_heads", "vocab": "vocab_size",
              "positions": "max_position_embeddings", "ffn": "intermediate_size",
              "kv_heads": "num_key_value_heads"},
}
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class HFSource:
    """Where an `hf:` model comes from: its config (parsed) and, for a directory, its
    weights folder (None: random init from the config)."""

    spec: str
    name: str
    config_path: Path
    config: dict[str, Any]
    weights_dir: Path | None

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])


def builtin_names() -> list[str]:
    """The shipped configs, by name."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def is_hf_source(text: str) -> bool:
    return text.startswith(HF_PREFIX)


def resolve(spec: str) -> HFSource:
    """Find and parse the config of `spec` (with or without the `hf:` prefix)."""
    spec = spec.removeprefix(HF_PREFIX)
    if spec in builtin_names():
        path = BUILTIN_DIR / f"{spec}.json"
        return HFSource(spec, spec, path, _read_config(path), None)
    path = Path(spec)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise InputError("no config.json in this directory (hf: needs a directory with "
                             "config.json and safetensors weights)", path)
        return HFSource(spec, _name(path.resolve().name), config_path,
                        _read_config(config_path), path)
    if path.is_file():
        return HFSource(spec, _name(path.resolve().parent.name), path, _read_config(path), None)
    raise InputError(f"not found: hf: takes a built-in ({', '.join(builtin_names())}), "
                     "a config.json or a directory with config.json and safetensors weights",
                     spec or "<empty>")


def model_yaml(spec: str) -> dict[str, Any]:
    """The plain model.yaml mapping (see the module docstring) of an `hf:` source."""
    source = resolve(spec)
    config, path = source.config, source.config_path
    family = "gpt2" if source.model_type == "gpt2" else "llama"
    keys = _KEYS[family]
    shape = {field: _positive(config, key, path) for field, key in keys.items()
             if field not in ("ffn", "kv_heads")}
    if family == "gpt2":
        inner = config.get("n_inner")
        ffn = 4 * shape["hidden"] if inner is None else _positive(config, "n_inner", path)
    else:
        ffn = _positive(config, keys["ffn"], path)
    model: dict[str, Any] = {
        "name": source.name,
        "arch": "gpt" if family == "gpt2" else "llama",
        "layers": shape["layers"], "hidden": shape["hidden"], "heads": shape["heads"],
        "ffn": ffn, "vocab": shape["vocab"],
        "seq_len": min(shape["positions"], MAX_SEQ_LEN),
        "dtype": _dtype(config, path),
        "tie_embeddings": _tied(config, family, path),
    }
    if family == "llama" and config.get(keys["kv_heads"]) is not None:
        model["kv_heads"] = _positive(config, keys["kv_heads"], path)
    return {"version": 1, "model": model, "training": dict(TRAINING_DEFAULTS)}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {exc.__class__.__name__}", path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"line {exc.lineno}, column {exc.colno}: {exc.msg}", path) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", path)
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise InputError(f"{model_type!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_TYPES)})", path, "model_type")
    return data


def _positive(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key)
    if value is None:
        raise InputError("missing", path, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"must be an integer > 0, got {value!r}", path, key)
    return value


def _dtype(config: dict[str, Any], path: Path) -> str:
    key = "dtype" if "dtype" in config else "torch_dtype"
    value = config.get(key)
    if value is None:
        return "fp32"
    if value not in _DTYPES:
        raise InputError(f"{value!r} is not one of {', '.join(_DTYPES)}", path, key)
    return _DTYPES[value]


def _tied(config: dict[str, Any], family: str, path: Path) -> bool:
    value = config.get("tie_word_embeddings", family == "gpt2")
    if not isinstance(value, bool):
        raise InputError(f"must be true or false, got {value!r}", path, "tie_word_embeddings")
    return value


def _name(text: str) -> str:
    """A model name the schema accepts, from a folder name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", text).lstrip("._-")[:63]
    return cleaned or "hf-model"
