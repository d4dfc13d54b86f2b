"""holmes.costs: formulas against published numbers and against hand computation."""

from __future__ import annotations

import pytest

from holmes import costs
from holmes.model import ModelSpec, load_model, preset_model
from topology.errors import InputError


def spec(name: str) -> ModelSpec:
    return preset_model(name).model


def gpt(**changes: object) -> ModelSpec:
    """A GPT-3-style shape (ffn = 4h, kv = h) where Korthikanti's 34 s b h holds exactly."""
    fields = {
        "name": "g",
        "arch": "gpt",
        "layers": 4,
        "hidden": 256,
        "heads": 8,
        "ffn": 1024,
        "vocab": 1000,
        "seq_len": 512,
        "dtype": "bf16",
    }
    fields.update(changes)
    return ModelSpec.model_validate(fields)


# --- parameters: published counts ---------------------------------------------------


def test_llama_7b_and_70b_match_the_published_counts_exactly() -> None:
    # Llama 2 (Touvron et al. 2023; Hugging Face checkpoints): 6,738,415,616 and
    # 68,976,648,192 parameters.
    assert costs.total_params(spec("llama-7b")) == 6_738_415_616
    assert costs.total_params(spec("llama-70b")) == 68_976_648_192
    assert costs.total_params(spec("llama-7b")) == pytest.approx(6.7e9, rel=0.02)


def test_gpt_1_3b_is_1_3_billion() -> None:
    total = costs.total_params(spec("gpt-1.3b"))
    assert total == pytest.approx(1.3e9, rel=0.05)
    # GPT-Neo 1.3B has 1,315,575,808; our GPT also counts the QKV biases (3 h per layer).
    assert total - 1_315_575_808 == 24 * 3 * 2048


def test_layer_parameter_parts() -> None:
    llama = spec("llama-70b")
    h, k, f = 8192, 1024, 28672
    assert costs.attention_params(llama) == 2 * h * h + 2 * h * k
    assert costs.mlp_params(llama) == 3 * h * f
    assert costs.layer_params(llama) == 2 * h * h + 2 * h * k + 3 * h * f + 2 * h
    g = gpt()
    assert costs.layer_params(g) == 12 * 256**2 + 13 * 256
    assert costs.embedding_params(g) == 1000 * 256 + 512 * 256


def test_tied_head_counted_once_in_total_but_held_by_the_head_stage() -> None:
    untied, tied = gpt(), gpt(tie_embeddings=True)
    assert costs.total_params(untied) - costs.total_params(tied) == 1000 * 256
    assert costs.head_params(tied) == costs.head_params(untied) == 2 * 256 + 1000 * 256


# --- FLOPs and seconds --------------------------------------------------------------


def test_flops_match_narayanan_et_al_with_full_recomputation() -> None:
    # Narayanan et al. SC'21: 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) per iteration with
    # activation recomputation (4 forward passes of the layers, 3 of the head).
    m = spec("gpt-1.3b")
    s, layers, h, v = m.seq_len, m.layers, m.hidden, m.vocab
    published = 96 * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))
    layer_flops = costs.train_time_factor("full") * costs.layer_forward_flops(m)
    ours = layers * layer_flops + 3 * costs.head_forward_flops(m)
    assert ours == pytest.approx(published, rel=1e-12)


def test_training_flops_near_six_n_per_token() -> None:
    m = spec("llama-7b")
    six_n = 6 * costs.total_params(m) * m.seq_len
    assert costs.train_flops_per_sample(m) == pytest.approx(six_n, rel=0.25)
    assert costs.train_flops_per_sample(m) > six_n  # attention scores come on top


def test_forward_seconds_from_tflops_or_measured() -> None:
    m = spec("llama-7b")
    assert costs.layer_forward_seconds(m, 100.0) == costs.layer_forward_flops(m) / 1e14
    assert costs.layer_train_seconds(m, 4, 100.0) == pytest.approx(
        3 * 4 * costs.layer_forward_flops(m) / 1e14
    )
    assert costs.layer_train_seconds(m, 1, 100.0, "full") == pytest.approx(
        4 * costs.layer_forward_seconds(m, 100.0)
    )
    measured = spec("skippipe-llama-24l")
    assert costs.layer_forward_seconds(measured, None) == 0.055
    assert costs.layer_forward_seconds(measured, 1000.0) == 0.055
    assert costs.layer_train_seconds(measured, 8, None, "none") == pytest.approx(3 * 8 * 0.055)
    ratio = costs.head_forward_flops(measured) / costs.layer_forward_flops(measured)
    assert costs.head_forward_seconds(measured, None) == pytest.approx(0.055 * ratio)
    assert costs.head_train_seconds(measured, 8, None) == pytest.approx(3 * 8 * 0.055 * ratio)


def test_no_speed_at_all_is_an_input_error() -> None:
    with pytest.raises(InputError, match="no tflops"):
        costs.layer_forward_seconds(spec("llama-7b"), None)


# --- communication ------------------------------------------------------------------


def test_boundary_bytes_and_link_time() -> None:
    assert costs.boundary_activation_bytes(spec("skippipe-llama-24l"), 8) == 8 * 1024 * 1024 * 4
    assert costs.boundary_activation_bytes(spec("llama-7b"), 1) == 4096 * 4096 * 2
    bandwidth = costs.gbps_to_bytes_per_s(1.0)
    assert bandwidth == 1.25e8
    assert costs.link_seconds(1e6, costs.ms_to_s(10), bandwidth) == pytest.approx(0.018)


def test_ring_allreduce() -> None:
    assert costs.allreduce_seconds(1e9, 1, 0.1, 1e9) == 0.0
    assert costs.allreduce_seconds(1e9, 4, 0.0, 1e9) == pytest.approx(1.5)
    assert costs.allreduce_seconds(1e9, 4, 0.01, 1e9) == pytest.approx(1.5 + 6 * 0.01)
    assert costs.allreduce_seconds(0, 2, 0.005, 1e9) == pytest.approx(0.01)


# --- memory -------------------------------------------------------------------------


def test_bytes_per_parameter_is_sixteen_for_adam() -> None:
    for dtype, parts in costs.TRAINING_BYTES_PER_PARAM.items():
        assert sum(parts) == 16, dtype
    m = gpt()
    memory = costs.stage_memory(m, layers=2, microbatch=1, in_flight=0)
    params = 2 * costs.layer_params(m)
    assert (memory.weights, memory.gradients, memory.optimizer) == (
        2 * params,
        2 * params,
        12 * params,
    )
    assert memory.activations == 0
    fp32 = costs.stage_memory(gpt(dtype="fp32"), layers=2, microbatch=1, in_flight=0)
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * params, 4 * params, 8 * params)


def test_activations_follow_korthikanti() -> None:
    m = gpt()
    s, b, h, a = 512, 2, 256, 8
    assert costs.layer_activation_bytes(m, b, "none") == s * b * h * (34 + 5 * a * s / h)
    assert costs.layer_activation_bytes(m, b, "selective") == 34 * s * b * h
    assert costs.layer_activation_bytes(m, b, "full") == 2 * s * b * h
    fp32 = gpt(dtype="fp32")
    assert costs.layer_activation_bytes(fp32, b, "selective") == 2 * 34 * s * b * h
    # GQA and SwiGLU: s b (14 h + 4 k + 8 f) at 16-bit.
    llama = spec("llama-70b")
    assert costs.layer_activation_bytes(llama, 1) == 4096 * (14 * 8192 + 4 * 1024 + 8 * 28672)


def test_stage_memory_adds_in_flight_embedding_and_head() -> None:
    m = gpt()
    act = costs.layer_activation_bytes(m, 2)
    base = costs.stage_memory(m, layers=3, microbatch=2, in_flight=4)
    assert base.activations == 4 * 3 * act
    head = costs.stage_memory(m, layers=3, microbatch=2, in_flight=1, holds_head=True)
    assert head.activations == 3 * act + 4 * 512 * 2 * 1000
    assert head.weights - costs.stage_memory(m, layers=3, microbatch=2, in_flight=1).weights == (
        2 * costs.head_params(m)
    )
    first = costs.stage_memory(m, layers=3, microbatch=2, in_flight=1, holds_embedding=True)
    assert first.optimizer - base.optimizer == 12 * costs.embedding_params(m)


def test_stage_memory_terms_are_linear_in_layers() -> None:
    m = spec("llama-7b")
    for recompute in ("none", "selective", "full"):
        terms = costs.stage_memory_terms(
            m, microbatch=1, in_flight=3, holds_head=True, recompute=recompute
        )
        for layers in (0, 1, 7):
            expected = costs.stage_memory(
                m, layers=layers, microbatch=1, in_flight=3, holds_head=True, recompute=recompute
            ).total
            assert terms.at(layers) == pytest.approx(expected, rel=1e-12)


def test_data_parallel_divides_nothing_unless_asked() -> None:
    m = spec("llama-7b")
    plain = costs.stage_memory(m, layers=4, microbatch=1, in_flight=2)
    zero1 = costs.stage_memory(m, layers=4, microbatch=1, in_flight=2, optimizer_shards=4)
    assert zero1.optimizer == plain.optimizer / 4
    assert (zero1.weights, zero1.gradients, zero1.activations) == (
        plain.weights,
        plain.gradients,
        plain.activations,
    )
    tp = costs.stage_memory(m, layers=4, microbatch=1, in_flight=2, tensor_parallel=2)
    assert tp.total == pytest.approx(plain.total / 2)


def test_in_flight_under_1f1b() -> None:
    assert [costs.microbatches_in_flight_1f1b(i, 4, 8) for i in range(4)] == [4, 3, 2, 1]
    assert costs.microbatches_in_flight_1f1b(0, 4, 2) == 2


def test_llama_70b_needs_about_a_terabyte_of_training_state() -> None:
    m = load_model("llama-70b").model
    state = costs.stage_memory(
        m, layers=80, microbatch=1, in_flight=0, holds_embedding=True, holds_head=True
    ).total
    logits = 4 * 4096 * 32000  # fp32 logits of the one microbatch at the loss
    assert state == 16 * costs.total_params(m) + logits  # untied: all of it is the total
    assert 1.1e12 < state < 1.12e12


def test_a_stage_with_both_ends_of_a_tied_model_holds_one_copy() -> None:
    m = load_model("tiny-gpt").model
    assert m.tie_embeddings
    whole = costs.stage_memory(m, layers=m.layers, microbatch=1, in_flight=0,
                               holds_embedding=True, holds_head=True)
    assert whole.weights == 4 * costs.total_params(m)  # fp32: the model, counted once
    last = costs.stage_memory(m, layers=1, microbatch=1, in_flight=0, holds_head=True)
    assert last.weights == 4 * (costs.layer_params(m) + costs.head_params(m))  # its own copy
