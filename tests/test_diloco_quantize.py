"""Wire formats: quantize -> dequantize error bounds and payload sizes, per format."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diloco.quantize import E2M1_GRID, FP4E2M1Codec, Int8Codec, make_codec, roundtrip

BLOCK = 32


@st.composite
def vectors(draw: st.DrawFn) -> torch.Tensor:
    """Blocks of floats spanning many magnitudes, with zeros and sign changes."""
    blocks = draw(st.integers(1, 6))
    exponent = draw(st.integers(-30, 10))
    values = draw(
        st.lists(
            st.floats(-1e3, 1e3, allow_nan=False, width=32),
            min_size=blocks * BLOCK,
            max_size=blocks * BLOCK,
        )
    )
    return torch.tensor(values, dtype=torch.float32) * 2.0**exponent


def block_scales(codec: FP4E2M1Codec | Int8Codec, x: torch.Tensor) -> torch.Tensor:
    """The scale of each element's block, read back from the payload."""
    payload = codec.encode(x)
    code_bytes = x.numel() // 2 if isinstance(codec, FP4E2M1Codec) else x.numel()
    scales = payload[code_bytes:].contiguous().view(torch.bfloat16).float()
    return scales.repeat_interleave(codec.block)


@settings(max_examples=150, deadline=None)
@given(vectors())
def test_fp4_error_is_at_most_a_quarter_of_max_value_and_scale(x: torch.Tensor) -> None:
    codec = FP4E2M1Codec(block=BLOCK)
    q = roundtrip(codec, x)
    s = block_scales(codec, x)
    amax = x.view(-1, BLOCK).abs().amax(1).repeat_interleave(BLOCK)
    assert torch.all(s >= amax / 6)  # the scale is rounded up: nothing clips
    assert torch.all(s <= amax / 6 * (1 + 2**-7) + 1e-38)
    bound = torch.maximum(x.abs(), s) / 4
    assert torch.all((x - q).abs() <= bound * (1 + 1e-6) + 1e-37)
    assert torch.all(torch.sign(q) * torch.sign(x) >= 0)  # never flips a sign


@settings(max_examples=150, deadline=None)
@given(vectors())
def test_int8_error_is_at_most_half_a_step(x: torch.Tensor) -> None:
    codec = Int8Codec(block=BLOCK)
    q = roundtrip(codec, x)
    s = block_scales(codec, x)
    assert torch.all((x - q).abs() <= s / 2 * (1 + 1e-6) + 1e-37)


@settings(max_examples=100, deadline=None)
@given(vectors())
def test_bf16_relative_error_is_at_most_2_to_minus_8(x: torch.Tensor) -> None:
    q = roundtrip(make_codec("bf16"), x)
    assert torch.all((x - q).abs() <= x.abs() * 2**-8 + 1e-37)


@settings(max_examples=50, deadline=None)
@given(vectors())
def test_no_quantization_is_exact(x: torch.Tensor) -> None:
    assert torch.equal(roundtrip(make_codec(None), x), x)


def test_fp4_grid_points_with_power_of_two_scale_are_exact() -> None:
    grid = torch.tensor(E2M1_GRID + tuple(-g for g in E2M1_GRID), dtype=torch.float32)
    x = torch.cat([grid, grid]) * 2.0**-12  # block max 6 * 2**-12 -> scale 2**-12
    assert torch.equal(roundtrip(FP4E2M1Codec(block=BLOCK), x), x)


def test_fp4_rounds_to_nearest_grid_point() -> None:
    x = torch.zeros(BLOCK)
    x[0] = 6.0  # scale 1
    x[1:6] = torch.tensor([0.2, 0.3, 2.4, 2.6, -4.9])
    q = roundtrip(FP4E2M1Codec(block=BLOCK), x)
    assert q[:6].tolist() == [6.0, 0.0, 0.5, 2.0, 3.0, -4.0]


@pytest.mark.parametrize(
    "name, bits_per_element", [("fp4", 4.5), ("int8", 8.5), ("bf16", 16), (None, 32)]
)
def test_payload_size_and_dtype(name: str | None, bits_per_element: float) -> None:
    codec = make_codec(name)
    x = torch.randn(4 * BLOCK)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == codec.payload_bytes(x.numel()) == x.numel() * bits_per_element / 8


def test_zero_blocks_and_bad_lengths() -> None:
    for name in ("fp4", "int8"):
        codec = make_codec(name)
        assert torch.equal(roundtrip(codec, torch.zeros(BLOCK)), torch.zeros(BLOCK))
        with pytest.raises(ValueError):
            codec.encode(torch.zeros(BLOCK + 2))
    with pytest.raises(ValueError):
        make_codec("fp8")


def test_error_feedback_transmits_the_running_sum_up_to_one_error() -> None:
    """With the residual fed back, what was sent over K rounds sums to the true sum minus
    only the last residual (one replica: the all-gather re-encodes exactly)."""
    from diloco_worker import single_process_group

    from diloco import CountingComm, SyncRecord, average_across_replicas

    codec = make_codec("fp4")
    torch.manual_seed(0)
    deltas = [torch.randn(128) * 1e-3 for _ in range(20)]
    with single_process_group():
        comm = CountingComm()
        residual = torch.zeros(128)
        sent_total = torch.zeros(128)
        for delta in deltas:
            new_residual = torch.empty(128)
            record = SyncRecord("sync", 0, 0)
            sent = average_across_replicas(delta + residual, codec, comm, record, new_residual)
            sent_total += sent
            residual = new_residual
    true_total = torch.stack(deltas).sum(0)
    torch.testing.assert_close(sent_total, true_total - residual, rtol=0, atol=1e-6)
    assert residual.abs().max() < 0.5 * delta.abs().max()  # bounded, not accumulating
    no_feedback = sum(roundtrip(codec, d) for d in deltas)
    assert (sent_total - true_total).norm() < 0.5 * (no_feedback - true_total).norm()
