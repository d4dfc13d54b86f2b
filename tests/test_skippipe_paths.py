"""Tests of skippipe.paths: every rule of a route, on hand-made and random instances."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skippipe.paths import (
    PathProblem,
    check_routes,
    full_routes,
    random_paths,
    schedule_paths,
)
from skippipe.simulate import Route, simulate


def make_problem(widths: list[int], microbatches: int, k: float, *, swaps: int = 2,
                 memory: int | None = None, seed: int = 0) -> PathProblem:
    """Stages of `widths` nodes; node speeds and link speeds vary with a simple hash."""
    stages = [[f"s{s}n{i}" for i in range(w)] for s, w in enumerate(widths)]
    nodes = [n for stage in stages for n in stage]
    origins = stages[0]
    ids: dict[str, list[int]] = {o: [] for o in origins}
    for mb in range(microbatches):
        ids[origins[mb % len(origins)]].append(mb)

    def spread(a: str, b: str) -> float:
        return 1 + (hash((min(a, b), max(a, b), seed)) % 7)

    return PathProblem(
        stages=stages, microbatches={o: v for o, v in ids.items() if v},
        forward_s={n: 1.0 + (i * 7 + seed) % 3 * 0.5 for i, n in enumerate(nodes)},
        activation_bytes=1e6, latency_s=lambda a, b: 0.01 * spread(a, b),
        bandwidth_Bps=lambda a, b: 1e6 * spread(a, b), skip_ratio=k, max_swaps=swaps,
        memory_limit=None if memory is None else dict.fromkeys(nodes, memory),
        backward_ratio=2.0, loss_s=0.5)


def stage_of(problem: PathProblem) -> dict[str, int]:
    return {n: s for s, stage in enumerate(problem.stages) for n in stage}


def assert_valid(problem: PathProblem, routes: list[Route]) -> None:
    """Each rule checked here directly, independently of `check_routes`."""
    where = stage_of(problem)
    origin_of = {mb: o for o, ids in problem.microbatches.items() for mb in ids}
    assert sorted(r.microbatch for r in routes) == sorted(origin_of)
    others = len(problem.stages) - 1
    visits = round((1 - problem.skip_ratio) * others)
    counts: Counter[int] = Counter()
    for route in routes:
        assert route.nodes[0] == origin_of[route.microbatch]
        order = [where[n] for n in route.nodes[1:]]
        assert len(order) == visits and len(set(order)) == visits and 0 not in order
        ranked = sorted(order)
        moved = [i for i, s in enumerate(order) if s != ranked[i]]
        pairs = list(zip(moved[::2], moved[1::2], strict=True))
        for i, j in pairs:  # each swap: route neighbours, consecutive stages
            assert j == i + 1 and order[i] == order[j] + 1
        assert len(pairs) <= problem.max_swaps
        counts.update(order)
    tally = [counts[s] for s in range(1, others + 1)]
    if visits:
        assert max(tally) - min(tally) <= 1
    result = simulate(problem.spec(routes), record_timeline=False)
    for node, peak in result.peak_in_flight.items():
        assert peak <= (problem.memory_limit or {}).get(node, peak)


# ---------------------------------------------------------------- hand-made cases


def test_k_zero_visits_every_stage_in_order():
    problem = make_problem([2, 2, 1, 2], 6, 0.0)
    schedule = schedule_paths(problem, iterations=100)
    assert_valid(problem, schedule.routes)
    assert schedule.stage_visits == {1: 6, 2: 6, 3: 6}
    assert schedule.iteration_s <= simulate(problem.spec(full_routes(problem))).iteration_s


def test_visit_count_is_rounded_skip_ratio():
    # 6 other stages: k=1/3 -> 4 visits, k=0.5 -> 3, k=0.9 -> round(0.6) = 1.
    for k, visits in [(1 / 3, 4), (0.5, 3), (0.9, 1)]:
        problem = make_problem([2, 1, 1, 1, 1, 1, 1], 8, k)
        schedule = schedule_paths(problem, iterations=50)
        assert {len(r.nodes) - 1 for r in schedule.routes} == {visits}
        assert_valid(problem, schedule.routes)


def test_schedule_is_deterministic_for_a_seed():
    problem = make_problem([3, 2, 2, 2, 2], 12, 0.25)
    a = schedule_paths(problem, seed=3, iterations=200)
    b = schedule_paths(problem, seed=3, iterations=200)
    assert a.routes == b.routes and a.iteration_s == b.iteration_s


def test_search_never_returns_worse_than_its_start():
    problem = make_problem([3, 2, 2, 2, 2, 2], 15, 1 / 3)
    schedule = schedule_paths(problem, iterations=300)
    assert schedule.iteration_s <= schedule.initial_s
    assert schedule.iteration_s == simulate(problem.spec(schedule.routes)).iteration_s


def test_collision_aware_schedule_beats_random_routes():
    # A fast and a slow node per stage: random routes queue on the slow ones.
    problem = make_problem([2, 2, 2, 2, 2], 16, 0.25)
    problem = PathProblem(**{**problem.__dict__, "forward_s": {
        n: (1.0 if n.endswith("n0") else 4.0) for n in problem.forward_s}})
    best = schedule_paths(problem, iterations=300).iteration_s
    assert all(best < random_paths(problem, seed=s).iteration_s for s in range(3))


def test_memory_cap_holds_in_the_simulation():
    problem = make_problem([2, 2, 2, 2], 10, 1 / 3, memory=2)
    schedule = schedule_paths(problem, iterations=200)
    assert_valid(problem, schedule.routes)
    peaks = simulate(problem.spec(schedule.routes)).peak_in_flight
    assert max(peaks.values()) <= 2


def test_random_paths_are_valid():
    problem = make_problem([3, 2, 1, 2, 2], 11, 0.25)
    for seed in range(3):
        assert_valid(problem, random_paths(problem, seed=seed).routes)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("k", [-0.1, 1.0, 1.5])
def test_skip_ratio_outside_range_is_refused(k):
    with pytest.raises(ValueError, match=r"skip ratio must be in \[0, 1\)"):
        schedule_paths(make_problem([1, 1, 1], 2, k))


def test_more_swaps_than_stages_is_refused():
    with pytest.raises(ValueError, match="max swaps must be an integer in \\[0, 2\\]"):
        schedule_paths(make_problem([1, 1, 1], 2, 0.0, swaps=3))


def test_memory_too_small_for_any_route_is_refused():
    problem = make_problem([1, 2, 1], 2, 0.0)
    problem = PathProblem(**{**problem.__dict__, "memory_limit": {"s1n0": 0, "s1n1": 0}})
    with pytest.raises(ValueError, match="memory too small for any route: every node of "
                                         "stage 1"):
        schedule_paths(problem)


def test_route_naming_an_unknown_node_is_refused():
    problem = make_problem([1, 1, 1], 1, 0.0)
    with pytest.raises(ValueError, match="unknown node 'ghost'"):
        check_routes(problem, [Route(0, ("s0n0", "ghost", "s2n0"))])


def test_check_routes_refuses_unbalanced_and_misordered_routes():
    problem = make_problem([1, 1, 1, 1, 1], 2, 0.5)  # 2 of 4 stages per route
    with pytest.raises(ValueError, match="not visited equally"):
        check_routes(problem, [Route(0, ("s0n0", "s1n0", "s2n0")),
                               Route(1, ("s0n0", "s1n0", "s2n0"))])
    with pytest.raises(ValueError, match="only up to 2 swaps of consecutive stages"):
        check_routes(problem, [Route(0, ("s0n0", "s4n0", "s1n0")),
                               Route(1, ("s0n0", "s2n0", "s3n0"))])
    check_routes(problem, [Route(0, ("s0n0", "s2n0", "s1n0")),
                           Route(1, ("s0n0", "s4n0", "s3n0"))])


def test_swaps_beyond_the_limit_are_refused():
    problem = make_problem([1, 1, 1, 1, 1], 1, 0.0, swaps=1)
    with pytest.raises(ValueError, match="only up to 1 swaps"):
        check_routes(problem, [Route(0, ("s0n0", "s2n0", "s1n0", "s4n0", "s3n0"))])


# ---------------------------------------------------------------- random instances


@st.composite
def instances(draw: st.DrawFn) -> PathProblem:
    widths = draw(st.lists(st.integers(1, 3), min_size=2, max_size=6))
    microbatches = draw(st.integers(1, 12))
    k = draw(st.sampled_from([0.0, 0.2, 0.25, 1 / 3, 0.5, 0.75]))
    swaps = draw(st.integers(0, len(widths) - 1))
    memory = draw(st.one_of(st.none(), st.integers(1, 4)))
    return make_problem(widths, microbatches, k, swaps=swaps, memory=memory,
                        seed=draw(st.integers(0, 5)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.integers(0, 3))
def test_every_rule_holds_on_random_instances(problem, seed):
    schedule = schedule_paths(problem, seed=seed, iterations=40)
    assert_valid(problem, schedule.routes)
    check_routes(problem, schedule.routes)
