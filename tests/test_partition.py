"""holmes.partition: hand-checkable splits, brute-force optimality, clear infeasibility."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from holmes import costs
from holmes.model import load_model
from holmes.partition import GIB, ILP_MAX_STAGES, StageCost, partition_layers
from topology.errors import InputError

BIG = 1e15  # bytes: memory that never binds


def stage(seconds: float, device: str = "d", **kw: float) -> StageCost:
    return StageCost(
        device=device, seconds_per_layer=seconds, capacity_bytes=kw.pop("cap", BIG), **kw
    )


# --- hand-checkable cases -----------------------------------------------------------


@pytest.mark.parametrize("method", ["ilp", "greedy"])
def test_two_equal_stages_split_evenly(method: str) -> None:
    result = partition_layers([stage(1.0), stage(1.0)], 8, method=method)
    assert result.layers == (4, 4)
    assert result.bottleneck_s == 4.0
    assert result.ranges() == [(0, 4), (4, 8)]
    odd = partition_layers([stage(1.0), stage(1.0)], 9, method=method)
    assert sorted(odd.layers) == [4, 5] and odd.bottleneck_s == 5.0


@pytest.mark.parametrize("method", ["ilp", "greedy"])
def test_twice_as_fast_stage_gets_twice_the_layers(method: str) -> None:
    result = partition_layers([stage(2.0), stage(1.0)], 12, method=method)
    assert result.layers == (4, 8)
    assert result.stage_seconds == (8.0, 8.0)


@pytest.mark.parametrize("method", ["ilp", "greedy"])
def test_memory_cap_forces_fewer_layers(method: str) -> None:
    small = stage(1.0, "small", cap=10.0, bytes_per_layer=4.0, fixed_bytes=1.0)  # room for 2
    result = partition_layers([stage(1.0), small, stage(1.0)], 12, method=method)
    assert result.layers == (5, 2, 5)
    assert small.bytes(2) <= small.capacity_bytes < small.bytes(3)


@pytest.mark.parametrize("method", ["ilp", "greedy"])
def test_extra_time_at_first_stage_shifts_layers_away(method: str) -> None:
    result = partition_layers([stage(1.0, fixed_seconds=2.0), stage(1.0)], 10, method=method)
    assert result.layers == (4, 6)
    assert result.stage_seconds == (6.0, 6.0)


def test_optimum_is_balanced_and_ties_go_to_later_stages() -> None:
    slow_first = [stage(1.0, fixed_seconds=5.0)] + [stage(1.0) for _ in range(3)]
    assert partition_layers(slow_first, 12, method="ilp").layers == (1, 3, 4, 4)
    assert partition_layers(slow_first, 12, method="greedy").layers == (1, 3, 4, 4)
    equal = [stage(1.0) for _ in range(8)]
    assert partition_layers(equal, 20).layers == (2, 2, 2, 2, 3, 3, 3, 3)
    assert partition_layers(equal, 20, method="greedy").layers == (2, 2, 2, 2, 3, 3, 3, 3)


def test_allow_empty_lets_a_hopeless_stage_hold_nothing() -> None:
    stages = [stage(1.0), stage(1.0, fixed_seconds=100.0), stage(1.0)]
    assert partition_layers(stages, 6).layers[1] == 1
    assert partition_layers(stages, 6, allow_empty=True).layers == (3, 0, 3)


def test_deterministic_and_auto_switches_to_greedy_for_many_stages() -> None:
    stages = [stage(1.0 + (i % 5) / 10, f"d{i}") for i in range(32)]
    first = partition_layers(stages, 80)
    assert first == partition_layers(stages, 80)
    assert first.method == "ilp" and sum(first.layers) == 80
    many = [stage(1.0 + (i % 7) / 10, f"d{i}") for i in range(ILP_MAX_STAGES + 1)]
    wide = partition_layers(many, 200)
    assert wide.method == "greedy" and sum(wide.layers) == 200


# --- optimality against brute force ---------------------------------------------------


def brute_force(stages: list[StageCost], total: int, minimum: int) -> float | None:
    best = None
    for split in itertools.product(range(minimum, total + 1), repeat=len(stages)):
        if sum(split) != total:
            continue
        if any(s.bytes(x) > s.capacity_bytes for s, x in zip(stages, split, strict=True)):
            continue
        slowest = max(s.seconds(x) for s, x in zip(stages, split, strict=True))
        best = slowest if best is None else min(best, slowest)
    return best


stage_strategy = st.builds(
    StageCost,
    device=st.just("d"),
    seconds_per_layer=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 0.001]),
    capacity_bytes=st.integers(1, 12).map(float),
    bytes_per_layer=st.integers(0, 3).map(float),
    fixed_seconds=st.sampled_from([0.0, 0.0, 0.25, 1.0, 2.5]),
    fixed_bytes=st.integers(0, 4).map(float),
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    stages=st.lists(stage_strategy, min_size=1, max_size=4),
    total=st.integers(1, 8),
    allow_empty=st.booleans(),
)
def test_ilp_and_greedy_equal_brute_force(
    stages: list[StageCost], total: int, allow_empty: bool
) -> None:
    minimum = 0 if allow_empty else 1
    best = brute_force(stages, total, minimum)
    event("infeasible" if best is None else "feasible")
    if best is None:
        with pytest.raises(InputError):
            partition_layers(stages, total, allow_empty=allow_empty)
        return
    for method in ("ilp", "greedy"):
        result = partition_layers(stages, total, allow_empty=allow_empty, method=method)
        assert result.method == method
        assert result.bottleneck_s == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert sum(result.layers) == total and min(result.layers) >= minimum
        for s, x in zip(stages, result.layers, strict=True):
            assert s.bytes(x) <= s.capacity_bytes


# --- infeasibility --------------------------------------------------------------------


def test_stage_that_cannot_hold_one_layer_is_named_with_the_gib_shortfall() -> None:
    stages = [
        stage(1.0, "h1:gpu0", cap=80e9, bytes_per_layer=20e9),
        stage(1.0, "h7:gpu0", cap=80e9, bytes_per_layer=20e9, fixed_bytes=70e9),
    ]
    with pytest.raises(InputError) as info:
        partition_layers(stages, 8, model_name="llama-70b")
    assert str(info.value) == (
        "llama-70b does not fit: stage 1 (device h7:gpu0, 80 GB) needs 9.3 GiB more "
        "even with 1 layer"
    )


def test_stages_short_of_room_together_report_total_and_single_stage_shortfall() -> None:
    stages = [
        stage(1.0, "a", cap=10 * GIB, bytes_per_layer=3 * GIB),
        stage(1.0, "b", cap=10 * GIB, bytes_per_layer=3 * GIB),
    ]
    with pytest.raises(InputError) as info:
        partition_layers(stages, 8, model_name="m")
    assert str(info.value) == (
        "m does not fit: the 2 stages have room for 6 of its 8 layers and need 4.0 GiB more "
        "in all; on one stage: stage 0 (device a, 10.74 GB) needs 5.0 GiB more to take the "
        "other 2"
    )


def test_too_few_layers_for_the_stages() -> None:
    with pytest.raises(InputError, match="too few for 3 pipeline stages"):
        partition_layers([stage(1.0)] * 3, 2)
    assert partition_layers([stage(1.0)] * 3, 2, allow_empty=True).layers.count(0) == 1


def test_bad_numbers_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        stage(-1.0)
    with pytest.raises(ValueError):
        stage(math.nan)
    with pytest.raises(ValueError):
        partition_layers([], 4)


# --- with the cost model --------------------------------------------------------------


def pipeline(model_name: str, devices: int, capacity_gb: float, tflops: float) -> list[StageCost]:
    config = load_model(model_name)
    m, t = config.model, config.training
    result = []
    for i in range(devices):
        first, last = i == 0, i == devices - 1
        terms = costs.stage_memory_terms(
            m,
            microbatch=t.microbatch,
            recompute=t.recompute,
            holds_embedding=first,
            holds_head=last,
            in_flight=costs.microbatches_in_flight_1f1b(i, devices, t.microbatches),
        )
        head = costs.head_train_seconds(m, t.microbatch, tflops) if last else 0.0
        result.append(
            StageCost(
                device=f"h{i}:gpu0",
                capacity_bytes=capacity_gb * 1e9,
                seconds_per_layer=costs.layer_train_seconds(m, t.microbatch, tflops, t.recompute),
                bytes_per_layer=terms.per_layer,
                fixed_bytes=terms.fixed,
                fixed_seconds=head,
            )
        )
    return result


def test_llama_7b_on_four_gpus_memory_binds_the_first_stage() -> None:
    roomy = partition_layers(pipeline("llama-7b", 4, 80, 300), 32)
    assert roomy.layers == (8, 8, 8, 8)  # the head costs less than a layer: no shift
    stages = pipeline("llama-7b", 4, 48, 300)
    # 1F1B: stage 0 holds 4 microbatches in flight and the embedding: room for 7 layers.
    assert [s.max_layers(32) for s in stages] == [7, 9, 10, 11]
    result = partition_layers(stages, 32, model_name="llama-7b")
    assert result.layers[0] == 7 and sum(result.layers) == 32
    assert result.bottleneck_s == pytest.approx(9 * stages[2].seconds_per_layer)
    for s, x in zip(stages, result.layers, strict=True):
        assert s.bytes(x) <= s.capacity_bytes
    with pytest.raises(InputError, match="room for 30 of its 32 layers"):
        partition_layers(pipeline("llama-7b", 4, 40, 300), 32, model_name="llama-7b")


def test_llama_70b_does_not_fit_four_80gb_gpus() -> None:
    with pytest.raises(InputError, match=r"^llama-70b does not fit: .* GiB more in all"):
        partition_layers(pipeline("llama-70b", 4, 80, 300), 80, model_name="llama-70b")
