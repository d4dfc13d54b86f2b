"""The cost model: parameters, FLOPs, seconds, bytes and memory of a transformer job.

Pure functions of a `ModelSpec` (and a few numbers); no I/O, no state. Units are SI:
seconds, bytes, bytes/second, FLOPs; devices are given in effective TFLOPS (10^12
FLOP/s). Callers convert topology units with `gbps_to_bytes_per_s` and `ms_to_s`.

Formulas (h = hidden, f = ffn, k = kv_heads * head_dim, s = seq_len, b = microbatch,
a = heads, V = vocab):

Parameters per layer
    attention  Q, O: 2 h^2; K, V: 2 h k          (+ biases h + 2k + h for gpt)
    MLP        gpt: 2 h f (+ f + h biases);  llama SwiGLU: 3 h f (gate, up, down)
    norms      gpt: 2 LayerNorms = 4 h;  llama: 2 RMSNorms = 2 h
Embedding: V h (+ s h learned positions for gpt). Head: final norm + V h. With tied
embeddings the total counts V h once, but in a pipeline the head stage keeps its own
copy (as Megatron-LM does), so its memory counts it again; a stage that holds both
ends (one stage, or the head at the origin) holds one tensor and counts it once.

Forward FLOPs per layer per sample (Narayanan et al., SC'21, "Efficient Large-Scale
Language Model Training on GPU Clusters", section 5.1): 2 s * (matmul parameters of
the layer) + 4 s^2 h, the last term being QK^T and attention-over-V (2 s^2 h each,
full square: no causal saving, as in that paper). Norms, softmax and biases are not
counted. Head: 2 s h V per sample. Backward = 2 x forward (BACKWARD_FORWARD_RATIO);
full recomputation adds one more forward.

Seconds: FLOPs / (TFLOPS * 1e12), or the model's measured
`seconds_per_layer_per_sample` when given (it replaces the FLOP estimate; the head is
then scaled by its FLOP ratio to a layer).

Communication: link time = latency + bytes / bandwidth. Ring all-reduce over n
ranks = 2 (n-1)/n * bytes / bandwidth + 2 (n-1) * latency (Patarasuk & Yuan 2009).
Activation bytes crossing a stage boundary per microbatch = b s h * dtype bytes (the
same again for the gradient on the way back).

Memory per device for a stage of `layers` layers (bytes):
    parameters * TRAINING_BYTES_PER_PARAM (mixed precision bf16/fp16: 2 weights +
      2 gradients + 12 Adam state = fp32 master, m, v; fp32: 4 + 4 + 8 = 16)
  + in_flight microbatches * activations per layer * layers
  + head stage: the fp32 logits of one microbatch, 4 s b V (the loss runs at once)
  + full recomputation: one layer's stored activations (the recompute working set).
Activations per layer per microbatch follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models", eq. 1: s b h (34 + 5 a s / h)
bytes at 16-bit), generalised to GQA and any ffn width:
    s b (14 h + 4 k + c f) + 5 a s^2 b,  c = 4 for a GeLU MLP, 8 for SwiGLU
(k = h, f = 4h gives 34 s b h). "selective" recomputation drops the 5 a s^2 b
attention-matrix term (as FlashAttention does); "full" keeps only each layer's input,
2 s b h. Counts are at 16-bit and scale by dtype bytes / 2 (fp32 doubles them; the
1-byte dropout masks are then slightly over-counted). Data parallelism divides no
memory (no ZeRO) unless `optimizer_shards` > 1 (ZeRO-1: Adam state split over the
data-parallel group); `tensor_parallel` t divides parameters and activations by t
(Megatron tensor + sequence parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass

from holmes.model import ModelSpec, Recompute
from topology.errors import InputError

BACKWARD_FORWARD_RATIO = 2.0
GIB = 1024**3
GB = 10**9

# bytes per parameter: (weights, gradients, optimizer state) with Adam.
TRAINING_BYTES_PER_PARAM: dict[str, tuple[int, int, int]] = {
    "bf16": (2, 2, 12),
    "fp16": (2, 2, 12),
    "fp32": (4, 4, 8),
}


# --- parameters ---------------------------------------------------------------------


def attention_params(model: ModelSpec) -> int:
    h, k = model.hidden, model.kv_hidden
    weights = 2 * h * h + 2 * h * k
    biases = 2 * h + 2 * k if model.arch == "gpt" else 0
    return weights + biases


def mlp_params(model: ModelSpec) -> int:
    h, f = model.hidden, model.ffn
    if model.arch == "llama":
        return 3 * h * f
    return 2 * h * f + f + h


def norm_params(model: ModelSpec) -> int:
    """One norm: LayerNorm (weight + bias) for gpt, RMSNorm (weight) for llama."""
    return 2 * model.hidden if model.arch == "gpt" else model.hidden


def layer_params(model: ModelSpec) -> int:
    """Parameters of one transformer block (attention + MLP + its two norms)."""
    return attention_params(model) + mlp_params(model) + 2 * norm_params(model)


def embedding_params(model: ModelSpec) -> int:
    """Token embedding, plus learned positions for gpt (llama uses RoPE: none)."""
    positions = model.seq_len * model.hidden if model.arch == "gpt" else 0
    return model.vocab * model.hidden + positions


def head_params(model: ModelSpec) -> int:
    """Final norm + output projection, as held by the stage that computes the loss."""
    return norm_params(model) + model.vocab * model.hidden


def total_params(model: ModelSpec) -> int:
    """Parameters of the whole model (a tied head counted once)."""
    head = head_params(model)
    if model.tie_embeddings:
        head -= model.vocab * model.hidden
    return model.layers * layer_params(model) + embedding_params(model) + head


# --- FLOPs and seconds ----------------------------------------------------------------


def _layer_matmul_params(model: ModelSpec) -> int:
    h, k, f = model.hidden, model.kv_hidden, model.ffn
    mlp = 3 * h * f if model.arch == "llama" else 2 * h * f
    return 2 * h * h + 2 * h * k + mlp


def layer_forward_flops(model: ModelSpec) -> float:
    """Forward FLOPs of one layer for one sample: 2 s * matmul params + 4 s^2 h."""
    s = model.seq_len
    return 2.0 * s * _layer_matmul_params(model) + 4.0 * s * s * model.hidden


def head_forward_flops(model: ModelSpec) -> float:
    """Forward FLOPs of the output projection (logits) for one sample: 2 s h V."""
    return 2.0 * model.seq_len * model.hidden * model.vocab


def train_flops_per_sample(model: ModelSpec) -> float:
    """Forward + backward FLOPs of the whole model for one sample (no recomputation)."""
    forward = model.layers * layer_forward_flops(model) + head_forward_flops(model)
    return (1.0 + BACKWARD_FORWARD_RATIO) * forward


def train_time_factor(recompute: Recompute) -> float:
    """(forward + backward) / forward: 3, or 4 when every layer's forward is recomputed."""
    return 1.0 + BACKWARD_FORWARD_RATIO + (1.0 if recompute == "full" else 0.0)


def layer_forward_seconds(model: ModelSpec, tflops: float | None) -> float:
    """Forward seconds of one layer for one sample: measured, or FLOPs / TFLOPS."""
    if model.seconds_per_layer_per_sample is not None:
        return model.seconds_per_layer_per_sample
    return layer_forward_flops(model) / _flops_per_second(model, tflops)


def head_forward_seconds(model: ModelSpec, tflops: float | None) -> float:
    """Forward seconds of the head for one sample (measured layer time scaled by FLOPs)."""
    if model.seconds_per_layer_per_sample is not None:
        ratio = head_forward_flops(model) / layer_forward_flops(model)
        return model.seconds_per_layer_per_sample * ratio
    return head_forward_flops(model) / _flops_per_second(model, tflops)


def layer_train_seconds(
    model: ModelSpec, microbatch: int, tflops: float | None, recompute: Recompute = "selective"
) -> float:
    """Forward + backward seconds of one layer for one microbatch on one device."""
    return train_time_factor(recompute) * microbatch * layer_forward_seconds(model, tflops)


def head_train_seconds(model: ModelSpec, microbatch: int, tflops: float | None) -> float:
    """Forward + backward seconds of the head and loss for one microbatch."""
    return (1.0 + BACKWARD_FORWARD_RATIO) * microbatch * head_forward_seconds(model, tflops)


def _flops_per_second(model: ModelSpec, tflops: float | None) -> float:
    if tflops is None or tflops <= 0:
        raise InputError(
            f"{model.name}: no compute speed: the device has no tflops and the model "
            "no seconds_per_layer_per_sample"
        )
    return tflops * 1e12


# --- communication --------------------------------------------------------------------


def gbps_to_bytes_per_s(gbps: float) -> float:
    """Gbit/s (10^9 bits) to bytes/s."""
    return gbps * 1e9 / 8.0


def ms_to_s(ms: float) -> float:
    return ms / 1000.0


def boundary_activation_bytes(model: ModelSpec, microbatch: int) -> int:
    """Bytes of one microbatch's hidden states crossing a stage boundary: b s h * dtype."""
    return microbatch * model.seq_len * model.hidden * model.dtype_bytes


def link_seconds(nbytes: float, latency_s: float, bandwidth_bytes_per_s: float) -> float:
    """Time to move `nbytes` over one link: latency + bytes / bandwidth."""
    return latency_s + nbytes / bandwidth_bytes_per_s


def allreduce_seconds(
    nbytes: float, ranks: int, latency_s: float, bandwidth_bytes_per_s: float
) -> float:
    """Ring all-reduce: 2 (n-1)/n * bytes / bandwidth + 2 (n-1) * latency; 0 for n <= 1."""
    if ranks <= 1:
        return 0.0
    steps = 2 * (ranks - 1)
    return steps / ranks * nbytes / bandwidth_bytes_per_s + steps * latency_s


# --- memory ---------------------------------------------------------------------------


def microbatches_in_flight_1f1b(stage: int, stages: int, microbatches: int) -> int:
    """Microbatches whose activations stage `stage` (0-based) holds at peak under 1F1B."""
    return max(1, min(stages - stage, microbatches))


def layer_activation_bytes(
    model: ModelSpec, microbatch: int, recompute: Recompute = "selective"
) -> float:
    """Activation bytes one layer stores for one microbatch until its backward."""
    s, b, h = model.seq_len, microbatch, model.hidden
    scale = model.dtype_bytes / 2.0
    if recompute == "full":
        return 2.0 * s * b * h * scale
    swiglu_or_gelu = 8 if model.arch == "llama" else 4
    per_token = 14 * h + 4 * model.kv_hidden + swiglu_or_gelu * model.ffn
    stored = float(s * b * per_token)
    if recompute == "none":
        stored += 5.0 * model.heads * s * s * b
    return stored * scale


@dataclass(frozen=True)
class StageMemory:
    """Peak bytes on one device of a stage, by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class MemoryTerms:
    """A stage's memory as `fixed + layers * per_layer` bytes (what the partition needs)."""

    per_layer: float
    fixed: float

    def at(self, layers: int) -> float:
        return self.fixed + layers * self.per_layer


def stage_memory(
    model: ModelSpec,
    *,
    layers: int,
    microbatch: int,
    in_flight: int,
    holds_embedding: bool = False,
    holds_head: bool = False,
    recompute: Recompute = "selective",
    tensor_parallel: int = 1,
    optimizer_shards: int = 1,
) -> StageMemory:
    """Peak memory of one device holding `layers` layers (+ embedding / head) of a stage."""
    params = layers * layer_params(model)
    params += embedding_params(model) if holds_embedding else 0
    params += head_params(model) if holds_head else 0
    if holds_embedding and holds_head and model.tie_embeddings:
        params -= model.vocab * model.hidden  # one tensor is both ends
    weight_b, grad_b, optim_b = TRAINING_BYTES_PER_PARAM[model.dtype]
    activations = in_flight * layers * layer_activation_bytes(model, microbatch, recompute)
    activations += _fixed_activation_bytes(model, microbatch, holds_head, recompute)
    t = tensor_parallel
    return StageMemory(
        weights=params * weight_b / t,
        gradients=params * grad_b / t,
        optimizer=params * optim_b / t / optimizer_shards,
        activations=activations / t,
    )


def stage_memory_terms(
    model: ModelSpec,
    *,
    microbatch: int,
    in_flight: int,
    holds_embedding: bool = False,
    holds_head: bool = False,
    recompute: Recompute = "selective",
    tensor_parallel: int = 1,
    optimizer_shards: int = 1,
) -> MemoryTerms:
    """`stage_memory(...).total` as fixed + layers * per_layer bytes (it is linear)."""

    def total(layers: int) -> float:
        return stage_memory(
            model,
            layers=layers,
            microbatch=microbatch,
            in_flight=in_flight,
            holds_embedding=holds_embedding,
            holds_head=holds_head,
            recompute=recompute,
            tensor_parallel=tensor_parallel,
            optimizer_shards=optimizer_shards,
        ).total

    fixed = total(0)
    return MemoryTerms(per_layer=total(1) - fixed, fixed=fixed)


def _fixed_activation_bytes(
    model: ModelSpec, microbatch: int, holds_head: bool, recompute: Recompute
) -> float:
    extra = 0.0
    if holds_head:
        extra += 4.0 * model.seq_len * microbatch * model.vocab
    if recompute == "full":
        extra += layer_activation_bytes(model, microbatch, "selective")
    return extra
