"""The model.yaml schema (version 1) and the built-in model presets.

Owns what a training job *is*: the transformer's shape (`ModelSpec`) and the job
(`TrainingSpec`), bundled as a `ModelConfig`. `load_model(name_or_path)` accepts a
path to a model.yaml, the name of a built-in preset (`list_presets()`), so
`--model llama-7b` works without a file, or `hf:SOURCE`, a Hugging Face config
(`holmes.hf_config`). Every wrong file becomes one `InputError`
naming the file and the field. What the shape costs (parameters, FLOPs, bytes) lives
in `holmes.costs`.

A model.yaml:

    version: 1
    model:
      name: llama-7b
      arch: llama          # gpt: LayerNorm, GeLU, learned positions; llama: RMSNorm, SwiGLU
      layers: 32
      hidden: 4096
      heads: 32
      kv_heads: 32         # optional (grouped-query attention); default = heads
      ffn: 11008
      vocab: 32000
      seq_len: 4096
      dtype: bf16          # bf16 | fp16 | fp32
      tie_embeddings: false
      seconds_per_layer_per_sample: 0.055   # optional measured forward time; replaces FLOPs
    training:
      global_batch: 1024   # samples per optimizer step
      microbatch: 1        # samples per pipeline microbatch
      steps: 1000
      recompute: selective # none | selective | full (activation recomputation)
    costs:                 # optional: the cost model's assumptions (holmes.assumptions)
      in_flight: auto      # auto | memory | a number of microbatches per device
      backward_ratio: 2.0
      head_loss: flops     # flops | a fraction of the forward of the stage that runs it
      hop_seconds: 0.0
      compute_efficiency: 1.0
      link_efficiency: 1.0
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import model_validator

from holmes import hf_config
from holmes.assumptions import CostAssumptions
from topology.errors import InputError
from topology.files import load_yaml_mapping
from topology.schema import Name
from topology.validation import Strict, Version, bounded_float, bounded_int, validate_as

MODEL_VERSION = 1

# The partition and the simulator loop over layers and microbatches: these bound them.
MAX_LAYERS = 1024
MAX_MICROBATCHES = 4096

Layers = bounded_int(1, MAX_LAYERS)
Hidden = bounded_int(1, 1 << 20)
Heads = bounded_int(1, 1 << 16)
Ffn = bounded_int(1, 1 << 22)
Vocab = bounded_int(1, 1 << 24)
SeqLen = bounded_int(1, 1 << 24, "tokens")
GlobalBatch = bounded_int(1, 1 << 20, "samples")
Microbatch = bounded_int(1, 1 << 16, "samples")
Dtype = Literal["bf16", "fp16", "fp32"]
Arch = Literal["gpt", "llama"]
Recompute = Literal["none", "selective", "full"]

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}


class ModelSpec(Strict):
    """The transformer's shape. `ffn` is the MLP's inner width (SwiGLU: per projection)."""

    name: Name
    arch: Arch
    layers: Layers
    hidden: Hidden
    heads: Heads
    kv_heads: Heads | None = None
    ffn: Ffn
    vocab: Vocab
    seq_len: SeqLen
    dtype: Dtype = "bf16"
    tie_embeddings: bool = False
    seconds_per_layer_per_sample: bounded_float(1e-9, 3600, "s") | None = None

    @model_validator(mode="after")
    def _heads_fit(self) -> Self:
        if self.hidden % self.heads:
            raise ValueError(f"heads: {self.heads} heads do not divide hidden {self.hidden}")
        if self.kv_heads is not None and (self.kv_heads > self.heads or self.heads % self.kv_heads):
            raise ValueError(
                f"kv_heads: {self.kv_heads} kv heads must divide the {self.heads} query heads"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_hidden(self) -> int:
        """Width of the K (and of the V) projection: kv_heads * head_dim."""
        return (self.kv_heads or self.heads) * self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


class TrainingSpec(Strict):
    """The job: samples per optimizer step, samples per microbatch, steps, recomputation."""

    global_batch: GlobalBatch
    microbatch: Microbatch
    steps: bounded_int(1, 10**9)
    recompute: Recompute = "selective"

    @model_validator(mode="after")
    def _batch_divides(self) -> Self:
        if self.global_batch % self.microbatch:
            raise ValueError(
                f"global_batch: {self.global_batch} is not divisible by "
                f"microbatch {self.microbatch}"
            )
        if self.microbatches > MAX_MICROBATCHES:
            raise ValueError(
                f"global_batch: {self.global_batch} / microbatch {self.microbatch} is "
                f"{self.microbatches} microbatches per step, more than {MAX_MICROBATCHES} "
                "(raise the microbatch)"
            )
        return self

    @property
    def microbatches(self) -> int:
        """Microbatches per optimizer step over all data-parallel replicas together."""
        return self.global_batch // self.microbatch


class ModelConfig(Strict):
    """A whole model.yaml: version, model shape, training job, and optionally the cost
    model's assumptions (`holmes.assumptions`; `--costs` overrides them)."""

    version: Version
    model: ModelSpec
    training: TrainingSpec
    costs: CostAssumptions | None = None

    @model_validator(mode="after")
    def _known_version(self) -> Self:
        if self.version != MODEL_VERSION:
            raise ValueError(
                f"version: unsupported version {self.version}, expected {MODEL_VERSION}"
            )
        return self

    def to_plain(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_plain(), sort_keys=False, width=100)


def _preset(model: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    return {"version": MODEL_VERSION, "model": model, "training": training}


# Published shapes. tiny-gpt matches bench/tinygpt.py's family (byte-level, tied head).
# gpt-1.3b: GPT-3 XL / GPT-Neo 1.3B (24 x 2048, 16 heads, 50257 BPE, tied): 1.32e9 params.
# llama-7b / llama-70b: Llama 2 (Touvron et al. 2023), 6.74e9 and 68.98e9 params; 70B
# uses grouped-query attention with 8 KV heads. skippipe-llama-24l: the model of
# SkipPipe's experiments (gensyn-ai/skippipe: dim 1024, 16 heads, 24 layers, context
# 1024, SentencePiece 32000, batches of 8, fp32, 0.055 s forward per sample per layer
# measured), ffn from Llama's rule (2/3 * 4 * dim rounded up to 256).
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-gpt": _preset(
        {
            "name": "tiny-gpt",
            "arch": "gpt",
            "layers": 8,
            "hidden": 128,
            "heads": 4,
            "ffn": 512,
            "vocab": 256,
            "seq_len": 128,
            "dtype": "fp32",
            "tie_embeddings": True,
        },
        {"global_batch": 16, "microbatch": 4, "steps": 200},
    ),
    "gpt-1.3b": _preset(
        {
            "name": "gpt-1.3b",
            "arch": "gpt",
            "layers": 24,
            "hidden": 2048,
            "heads": 16,
            "ffn": 8192,
            "vocab": 50257,
            "seq_len": 2048,
            "dtype": "bf16",
            "tie_embeddings": True,
        },
        {"global_batch": 512, "microbatch": 4, "steps": 1000},
    ),
    "llama-7b": _preset(
        {
            "name": "llama-7b",
            "arch": "llama",
            "layers": 32,
            "hidden": 4096,
            "heads": 32,
            "ffn": 11008,
            "vocab": 32000,
            "seq_len": 4096,
            "dtype": "bf16",
        },
        {"global_batch": 1024, "microbatch": 1, "steps": 1000},
    ),
    "llama-70b": _preset(
        {
            "name": "llama-70b",
            "arch": "llama",
            "layers": 80,
            "hidden": 8192,
            "heads": 64,
            "kv_heads": 8,
            "ffn": 28672,
            "vocab": 32000,
            "seq_len": 4096,
            "dtype": "bf16",
        },
        {"global_batch": 1024, "microbatch": 1, "steps": 1000, "recompute": "full"},
    ),
    "skippipe-llama-24l": _preset(
        {
            "name": "skippipe-llama-24l",
            "arch": "llama",
            "layers": 24,
            "hidden": 1024,
            "heads": 16,
            "ffn": 2816,
            "vocab": 32000,
            "seq_len": 1024,
            "dtype": "fp32",
            "seconds_per_layer_per_sample": 0.055,
        },
        {"global_batch": 240, "microbatch": 8, "steps": 1000, "recompute": "none"},
    ),
}


def list_presets() -> list[str]:
    """Names of the built-in models, in a stable order."""
    return sorted(_PRESETS)


def parse_model(data: dict[str, Any], path: str | Path = "<model>") -> ModelConfig:
    """Validate a plain mapping as a ModelConfig, or raise one InputError naming the field."""
    return validate_as(ModelConfig, data, path)


def preset_model(name: str) -> ModelConfig:
    """A built-in model by name; an unknown name is an InputError listing the presets."""
    if name not in _PRESETS:
        raise InputError(
            f"unknown model preset '{name}' (presets: {', '.join(list_presets())}; "
            "or give a path to a model.yaml)"
        )
    return parse_model(copy.deepcopy(_PRESETS[name]), f"<preset {name}>")


def load_model(name_or_path: str | Path) -> ModelConfig:
    """Load a model.yaml, or a preset when `name_or_path` is a preset name and not a file.

    An existing file wins over a preset of the same name. Something that looks like a
    path (a separator or a .yaml/.yml/.json suffix) and does not exist is "file not found".
    `hf:SOURCE` derives the model.yaml from a Hugging Face config (`holmes.hf_config`).
    """
    if hf_config.is_hf_source(str(name_or_path)):
        return parse_model(hf_config.model_yaml(str(name_or_path)), str(name_or_path))
    path = Path(name_or_path)
    if path.is_file() or _looks_like_path(str(name_or_path)):
        return parse_model(load_yaml_mapping(path), path)
    return preset_model(str(name_or_path))


def _looks_like_path(text: str) -> bool:
    """A separator or a model-file suffix: meant as a file, never as a preset name."""
    return "/" in text or "\\" in text or text.endswith((".yaml", ".yml", ".json"))
