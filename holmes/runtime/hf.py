"""Hugging Face causal LMs as pipeline models: transformers' Llama, Qwen2, Qwen3, Mistral
and GPT-2 in the runtime's contract (`skippipe.runtime.SkippableModel`).

`load_hf_model("hf:tiny-llama")` (any `holmes.hf_config` source: a built-in, a
config.json, or a local directory with config.json and safetensors weights) returns an
`HFCausalLM`, made of the transformers model's own modules:

- `embed(idx)`: the token embedding (GPT-2: plus its learned positions, then dropout);
- `blocks`: one `DecoderBlock` per decoder layer. A block computes what its layer needs
  from the activation's shape alone: positions `0..T-1`, the attention mask of the
  layer's kind (causal, or sliding-window for Mistral and Qwen's sliding layers, made
  by transformers' own mask functions), and for rotary families the `(cos, sin)`
  position embeddings from its own copy of the rotary module. So every stage that runs
  blocks has them, whichever stages a route skips;
- `head_loss(h, targets)`: final norm, LM head and mean cross-entropy over the targets
  (next tokens, already shifted; -100 is ignored), in float32 as transformers does.

Tied input/output embeddings stay one `nn.Parameter`: the runtime gives everything
outside `blocks` to stage 0 (`skippipe.runtime._owned_parameters`), so the embedding
and the head live together at the origin, the parameter appears once among the rank's
parameters and its gradient adds both uses. `hf_names()` maps the adapter's parameter
names to the transformers model's; `hf_model` is that model (it shares the adapter's
parameters, so `hf_model.save_pretrained(...)` writes what was trained).

transformers is imported only when a model is built; the core package never needs it.
Built from a config, the weights are transformers' own init under `seed`, identical on
every rank; nothing is downloaded (`local_files_only`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from holmes import hf_config
from topology.errors import InputError

__all__ = ["DecoderBlock", "HFCausalLM", "load_hf_model"]

IGNORE_INDEX = -100


class DecoderBlock(nn.Module):
    """One transformers decoder layer as a block `h -> h` (see the module docstring)."""

    def __init__(self, layer: nn.Module, config: Any, make_mask: Callable[..., Any],
                 rotary: nn.Module | None) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self._config = config
        self._make_mask = make_mask

    def forward(self, h: Tensor) -> Tensor:
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = self._make_mask(config=self._config, inputs_embeds=h, attention_mask=None,
                               cache=None, position_ids=positions)
        extra = {} if self.rotary is None else {"position_embeddings": self.rotary(h, positions)}
        out = self.layer(h, attention_mask=mask, position_ids=positions, **extra)
        return out[0] if isinstance(out, tuple) else out


class HFCausalLM(nn.Module):
    """A transformers causal LM split into `embed`, `blocks` and `head_loss`."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        config = lm.config
        gpt2 = config.model_type == "gpt2"
        body = lm.transformer if gpt2 else lm.model
        self.config = config
        self.embed_tokens: nn.Embedding = body.wte if gpt2 else body.embed_tokens
        self.embed_positions: nn.Embedding | None = body.wpe if gpt2 else None
        self.embed_dropout: nn.Module = body.drop if gpt2 else nn.Identity()
        layers = body.h if gpt2 else body.layers
        rotary = None if gpt2 else body.rotary_emb
        self.blocks = nn.ModuleList(
            DecoderBlock(layer, config, _mask_function(config, i),
                         None if rotary is None else copy.deepcopy(rotary))
            for i, layer in enumerate(layers))
        self.norm: nn.Module = body.ln_f if gpt2 else body.norm
        self.lm_head: nn.Linear = lm.lm_head
        self._hf = (lm,)  # a tuple: not a submodule, so only the adapter's layout counts

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model; it shares every parameter with this adapter."""
        return self._hf[0]

    def hf_names(self) -> dict[str, str]:
        """Adapter parameter name -> the transformers model's name for it."""
        theirs = {id(p): name for name, p in self.hf_model.named_parameters()}
        return {name: theirs[id(p)] for name, p in self.named_parameters()}

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight

    def embed(self, idx: Tensor) -> Tensor:
        h = self.embed_tokens(idx)
        if self.embed_positions is not None:
            h = h + self.embed_positions(torch.arange(idx.shape[1], device=idx.device))
        return self.embed_dropout(h)

    def head_loss(self, h: Tensor, targets: Tensor) -> Tensor:
        logits = self.lm_head(self.norm(h)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                               ignore_index=IGNORE_INDEX)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """The whole model in one process: the mean loss of `targets` given `idx`."""
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h)
        return self.head_loss(h, targets)


def load_hf_model(spec: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> HFCausalLM:
    """Build the model of an `hf:` source (see the module docstring) in training mode.

    A directory must hold config.json and safetensors weights (`model.safetensors`, or
    `model.safetensors.index.json` and its shards); a missing one is an `InputError`.
    """
    source = hf_config.resolve(spec)
    transformers = _transformers()
    if source.weights_dir is None:
        config = transformers.AutoConfig.from_pretrained(str(source.config_path),
                                                         local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        _check_weights(source.weights_dir)
        lm = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.weights_dir), local_files_only=True, dtype=dtype)
    lm.train()
    return HFCausalLM(lm)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("hf: models need transformers: pip install 'hetsched[hf]'") from None
    return transformers


def _check_weights(folder: Path) -> None:
    """One clear line for what from_pretrained would otherwise report with a traceback."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InputError("not a safetensors index (no weight_map)", index) from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise InputError(f"shard {missing[0]} is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                             index)
        return
    if not (folder / "model.safetensors").is_file():
        other = [p.name for p in folder.glob("*.bin")]
        hint = f" ({other[0]} is not read: convert it to safetensors)" if other else ""
        raise InputError(f"no model.safetensors or model.safetensors.index.json{hint}", folder)


def _mask_function(config: Any, index: int) -> Callable[..., Any]:
    """transformers' mask maker for layer `index`: sliding-window or plain causal, as the
    family's own model chooses it (Qwen: `layer_types`; Mistral: `sliding_window`)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = layer_types[index] == "sliding_attention"
    else:
        sliding = getattr(config, "sliding_window", None) is not None
    return create_sliding_window_causal_mask if sliding else create_causal_mask
