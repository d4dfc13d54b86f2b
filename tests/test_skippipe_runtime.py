"""Tests of skippipe.runtime: gradients through real gloo ranks equal a single process.

The multi-rank cases run tests/skippipe_worker.py as one process per rank over 127.0.0.1
and compare every parameter gradient with a single-process reference computed here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from skippipe_worker import activation_shape, launch, make_batch, make_model, make_schedule
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skippipe.runtime import (  # noqa: E402
    PipelineRuntime,
    PipelineSchedule,
    Task,
    _replayed_seconds,
    forward_route,
)
from skippipe.simulate import PipelineSpec, Route, simulate  # noqa: E402

MODEL = {"block_size": 8, "n_layer": 6, "n_head": 2, "n_embd": 16}
TOLERANCE = 1e-5

FULL_PIPELINE = {
    "stages": [["o"], ["a"], ["b"]],
    "layers": [[0, 2], [2, 4], [4, 6]],
    "routes": [[mb, ["o", "a", "b"]] for mb in range(4)],
    "ranks": {"o": 0, "a": 1, "b": 2},
    "model": MODEL,
    "seed": 7,
    "batch": 3,
    "iterations": 2,
}

SKIPPED_AND_SWAPPED = {
    "stages": [["o0", "o1"], ["a"], ["b"], ["c0", "c1"]],
    "layers": [[0, 1], [1, 3], [3, 4], [4, 6]],
    "routes": [
        [0, ["o0", "a", "b", "c0"]],
        [1, ["o1", "b"]],
        [2, ["o0", "c1", "a"]],
        [3, ["o1", "a", "c0", "b"]],
        [4, ["o0"]],
        [5, ["o1", "c1", "b", "a"]],
        [6, ["o0", "b", "a"]],
    ],
    "ranks": {"o0": 0, "o1": 1, "a": 2, "b": 3, "c0": 4, "c1": 5},
    "memory_limit": {"a": 2, "o0": 2},
    "model": MODEL,
    "seed": 11,
    "batch": 2,
    "iterations": 2,
}


def reference(scenario: dict, iteration: int, whole_model: bool) -> tuple[dict, dict]:
    """Gradients of the mean loss and each microbatch's loss, in one process."""
    model = make_model(scenario)
    schedule = make_schedule(scenario)
    losses = {}
    for route in schedule.routes:
        idx, targets = make_batch(scenario, iteration, route.microbatch)
        if whole_model:
            _, loss = model(idx, targets)
        else:
            loss = forward_route(model, schedule.block_ranges(route), idx, targets)
        (loss / len(schedule.routes)).backward()
        losses[route.microbatch] = float(loss.detach())
    grads = {n: p.grad for n, p in model.named_parameters()}
    return grads, losses


def assert_grads_close(got: dict, want: dict) -> None:
    for name, grad in got.items():
        assert want[name].abs().max() > 1e-4, f"{name}: reference gradient is ~0"
        diff = (grad - want[name]).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: max |diff| {diff:.2e}"


@pytest.fixture(scope="module")
def full_pipeline(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch(FULL_PIPELINE, world=3, out=tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def skipped(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch(SKIPPED_AND_SWAPPED, world=6, out=tmp_path_factory.mktemp("skipped"))


# ---------------------------------------------------------------- multi-rank correctness


def test_k0_gradients_equal_the_whole_model_in_one_process(full_pipeline: list[dict]) -> None:
    names = {n for n, _ in make_model(FULL_PIPELINE).named_parameters()}
    held = [n for result in full_pipeline for n in result["names"]]
    assert sorted(held) == sorted(names)  # every parameter is on exactly one rank
    for it in range(FULL_PIPELINE["iterations"]):
        want, losses = reference(FULL_PIPELINE, it, whole_model=True)
        for result in full_pipeline:
            assert_grads_close(result["iterations"][it]["synced"], want)
        got_losses = full_pipeline[0]["iterations"][it]["losses"]
        assert got_losses == pytest.approx(losses, abs=1e-6)


def test_k0_ranks_hold_their_stage_and_count_bytes(full_pipeline: list[dict]) -> None:
    assert [r["names"][:1] for r in full_pipeline] == [
        ["wte.weight"],
        ["blocks.2.ln_1.weight"],
        ["blocks.4.ln_1.weight"],
    ]
    message = 3 * 8 * 16 * 4  # batch x seq x hidden fp32
    per_iteration = 2 * len(FULL_PIPELINE["routes"]) * message  # one activation + one grad
    for result in full_pipeline:
        assert sum(result["bytes_sent"].values()) == 2 * per_iteration


def test_skipped_and_swapped_routes_equal_forward_route(skipped: list[dict]) -> None:
    for it in range(SKIPPED_AND_SWAPPED["iterations"]):
        want, losses = reference(SKIPPED_AND_SWAPPED, it, whole_model=False)
        got_losses: dict[int, float] = {}
        for result in skipped:
            assert_grads_close(result["iterations"][it]["synced"], want)
            got_losses |= result["iterations"][it]["losses"]
        assert got_losses == pytest.approx(losses, abs=1e-6)


def test_unsynced_replica_gradients_sum_to_the_reference(skipped: list[dict]) -> None:
    want, _ = reference(SKIPPED_AND_SWAPPED, 0, whole_model=False)
    for replicas in (("o0", "o1"), ("c0", "c1")):
        parts = [r["iterations"][0]["unsynced"] for r in skipped if r["node"] in replicas]
        assert all(parts)  # every replica got work
        summed = {n: sum(p[n] for p in parts if n in p) for n in parts[0]}
        assert_grads_close(summed, want)
        assert any(not torch.allclose(parts[0][n], want[n]) for n in parts[0])


# ---------------------------------------------------------------- one process, no network


def test_single_node_schedule_runs_in_process() -> None:
    scenario = dict(
        FULL_PIPELINE,
        stages=[["o"]],
        layers=[[0, 6]],
        ranks={"o": 0},
        routes=[[0, ["o"]], [1, ["o"]]],
    )
    model = make_model(scenario)
    runtime = PipelineRuntime(
        model, make_schedule(scenario), 0, activation_shape=activation_shape(scenario)
    )
    losses = runtime.step({mb: make_batch(scenario, 0, mb) for mb in (0, 1)})
    want, want_losses = reference(scenario, 0, whole_model=True)
    assert losses == pytest.approx(want_losses, abs=1e-6)
    assert_grads_close({n: p.grad for n, p in runtime.named_parameters()}, want)
    with pytest.raises(ValueError, match=r"needs batches for microbatches \[0, 1\]"):
        runtime.step({0: make_batch(scenario, 0, 0)})


class _NoHead(nn.Module):
    """Blocks and an embedding but no head_loss."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(6))

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return idx


def test_runtime_refuses_a_model_without_the_contract() -> None:
    schedule = make_schedule(FULL_PIPELINE)
    with pytest.raises(TypeError, match="it has no head_loss"):
        PipelineRuntime(_NoHead(), schedule, 0, activation_shape=(3, 8, 16))
    with pytest.raises(TypeError, match=r"no embed, head_loss, blocks \(an nn.ModuleList\)"):
        PipelineRuntime(nn.Linear(2, 2), schedule, 0, activation_shape=(3, 8, 16))


@pytest.mark.parametrize(("rank", "moved_blocks"), [(0, {0, 1}), (1, {2, 3})])
def test_runtime_moves_only_its_part_of_the_model_to_the_device(rank, moved_blocks) -> None:
    model = make_model(FULL_PIPELINE)
    runtime = PipelineRuntime(model, make_schedule(FULL_PIPELINE), rank,
                              activation_shape=(3, 8, 16), device="meta", stage_group=None)
    for i, block in enumerate(model.blocks):
        want = "meta" if i in moved_blocks else "cpu"
        assert {p.device.type for p in block.parameters()} == {want}, i
    outside = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
    assert {p.device.type for p in outside} == {"meta" if rank == 0 else "cpu"}
    assert {p.device.type for p in runtime.parameters()} == {"meta"}


def test_runtime_rejects_a_foreign_rank_and_a_short_model() -> None:
    schedule = make_schedule(FULL_PIPELINE)
    model = make_model(FULL_PIPELINE)
    with pytest.raises(ValueError, match="rank 5 holds no node"):
        PipelineRuntime(model, schedule, 5, activation_shape=(3, 8, 16))
    short = make_model(dict(FULL_PIPELINE, model=dict(MODEL, n_layer=4)))
    with pytest.raises(ValueError, match="reach block 6, but the model has 4 blocks"):
        PipelineRuntime(short, schedule, 0, activation_shape=(3, 8, 16))


# ---------------------------------------------------------------- schedule validation


def schedule(**overrides: object) -> PipelineSchedule:
    fields: dict = dict(
        stages=[["o"], ["a"], ["b"]],
        layers=[(0, 2), (2, 4), (4, 6)],
        routes=[Route(0, ("o", "a", "b")), Route(1, ("o", "b"))],
        ranks={"o": 0, "a": 1, "b": 2},
    )
    fields.update(overrides)
    return PipelineSchedule(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"routes": [Route(0, ("o", "x"))]}, "microbatch 0 names node 'x', which is in no stage"),
        ({"stages": [["o"], ["a", "o"], ["b"]]}, "node 'o' is in stage 0 and stage 1"),
        ({"routes": [Route(0, ("a", "b"))]}, "starts at 'a' \\(stage 1\\); its origin must be"),
        ({"routes": [Route(0, ("o", "a", "o"))]}, "visits a node more than once"),
        ({"routes": [Route(0, ("o",)), Route(0, ("o", "a"))]}, "more than one route"),
        ({"routes": []}, "no routes"),
        ({"ranks": {"o": 0, "a": 1}}, "node 'b' has no rank"),
        ({"ranks": {"o": 0, "a": 1, "b": 1}}, "share a rank"),
        ({"layers": [(0, 2), (2, 4)]}, "3 stages but 2 block ranges"),
        ({"layers": [(0, 2), (4, 2), (4, 6)]}, r"stage 1 has block range \[4, 2\)"),
        ({"memory_limit": {"o": 0}}, "memory_limit is 0"),
        ({"forward_s": {"zz": 1.0}}, "forward_s names node 'zz', which is in no stage"),
        ({"memory_limit": {"zz": 1}}, "memory_limit names node 'zz', which is in no stage"),
    ],
)
def test_schedule_rejects_bad_input(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        schedule(**overrides)


def test_schedule_lists_block_ranges_and_messages() -> None:
    s = schedule(routes=[Route(0, ("o", "b", "a")), Route(1, ("o",))])
    assert s.block_ranges(s.routes[0]) == [(0, 2), (4, 6), (2, 4)]
    assert [(m.dst, m.kind) for m in s.messages_from("o")] == [
        ("b", "activation"),
        ("a", "gradient"),
    ]
    assert [(m.dst, m.kind) for m in s.messages_from("a")] == [
        ("o", "activation"),
        ("b", "gradient"),
    ]


# ---------------------------------------------------------------- memory caps


def in_flight_peak(tasks: list) -> int:
    peak = current = 0
    for task in tasks:
        current += {"forward": 1, "backward": -1}.get(task.kind, 0)
        peak = max(peak, current)
    return peak


def test_derived_order_respects_memory_caps_and_covers_every_task() -> None:
    stages = [["o"], ["a"], ["b"], ["c"]]
    routes = [Route(mb, ("o", "a", "b", "c")[: 2 + mb % 3]) for mb in range(8)]
    fields = dict(
        stages=stages,
        layers=[(0, 1), (1, 2), (2, 3), (3, 4)],
        routes=routes,
        ranks={"o": 0, "a": 1, "b": 2, "c": 3},
    )
    free = PipelineSchedule(**fields)
    capped = PipelineSchedule(**fields, memory_limit={"o": 2, "a": 2, "b": 2, "c": 2})
    assert in_flight_peak(free.tasks["o"]) > 2  # the cap binds
    for node, tasks in capped.tasks.items():
        assert in_flight_peak(tasks) <= 2
        visiting = [r.microbatch for r in routes if node in r.nodes]
        for mb in visiting:
            kinds = [t.kind for t in tasks if t.microbatch == mb]
            assert kinds == (
                ["forward", "loss", "backward"] if node == "o" else ["forward", "backward"]
            )
        assert len(tasks) == len(visiting) * (3 if node == "o" else 2)


# ---------------------------------------------------------------- the order of work


def full_pipeline_schedule(**overrides: object) -> PipelineSchedule:
    nodes = ["o", "a", "b", "c"]
    fields: dict = dict(stages=[[n] for n in nodes], layers=[(i, i + 1) for i in range(4)],
                        routes=[Route(mb, tuple(nodes)) for mb in range(8)],
                        ranks={n: i for i, n in enumerate(nodes)})
    return PipelineSchedule(**(fields | overrides))


def test_replaying_the_simulated_order_takes_the_simulated_time() -> None:
    s = full_pipeline_schedule()
    units = dict.fromkeys(s.nodes, 1.0)
    plain = s._simulate(units, None, 0.25)
    spec = PipelineSpec(forward_s=units, routes=s.routes, activation_bytes=0.0,
                        latency_s=lambda a, b: 0.0, bandwidth_Bps=lambda a, b: 1.0,
                        loss_s={"o": 0.25})
    assert _replayed_seconds(plain, s.routes, units, 0.25) == simulate(spec).iteration_s


def test_the_kept_order_beats_the_plain_simulated_order_on_a_full_pipeline() -> None:
    # The plain greedy order makes each loss at the origin wait behind a forward.
    s = full_pipeline_schedule()
    units = dict.fromkeys(s.nodes, 1.0)
    plain = s._simulate(units, None, 0.0)
    for loss in (0.0, 0.25, 1.0):
        kept = _replayed_seconds(s.tasks, s.routes, units, loss)
        assert kept < _replayed_seconds(plain, s.routes, units, loss) - 2.0, loss
    capped = full_pipeline_schedule(memory_limit={"o": 2, "a": 2, "b": 2, "c": 2})
    assert all(in_flight_peak(tasks) <= 2 for tasks in capped.tasks.values())


def test_a_replay_of_orders_that_wait_on_each_other_never_ends() -> None:
    s = full_pipeline_schedule(routes=[Route(0, ("o", "a")), Route(1, ("o", "a"))])
    swapped = dict(s.tasks, a=[Task("forward", 1), Task("backward", 1),
                               Task("forward", 0), Task("backward", 0)])
    swapped["o"] = [Task("forward", 0), Task("forward", 1), Task("loss", 0),
                    Task("loss", 1), Task("backward", 0), Task("backward", 1)]
    assert _replayed_seconds(s.tasks, s.routes, dict.fromkeys(s.nodes, 1.0), 0.0) < math.inf
    assert _replayed_seconds(swapped, s.routes, dict.fromkeys(s.nodes, 1.0), 0.0) == math.inf
