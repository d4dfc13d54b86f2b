"""Tests of skippipe.bound: no routes beat the lower bound, and it is not vacuous."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_skippipe_paths import instances, make_problem

from skippipe.bound import lower_bound
from skippipe.paths import PathProblem, _swaps, full_routes, random_paths, schedule_paths
from skippipe.simulate import Route, simulate


def every_valid_route_set(problem: PathProblem) -> list[list[Route]]:
    """All route sets that obey the rules (small instances only)."""
    m = problem.visits_per_route()
    others = range(1, len(problem.stages))
    orders = [order for order in itertools.permutations(others, m)
              if (swaps := _swaps(list(order))) is not None and swaps <= problem.max_swaps]
    paths = [nodes for order in orders
             for nodes in itertools.product(*(problem.stages[s] for s in order))]
    per_mb = [[Route(mb, (origin, *path)) for path in paths]
              for origin, ids in problem.microbatches.items() for mb in ids]
    stage = {n: s for s, nodes in enumerate(problem.stages) for n in nodes}
    valid = []
    for routes in itertools.product(*per_mb):
        counts = Counter(stage[n] for r in routes for n in r.nodes[1:])
        tally = [counts[s] for s in others]
        if m == 0 or max(tally) - min(tally) <= 1:
            valid.append(list(routes))
    return valid


@pytest.mark.parametrize(("widths", "microbatches", "k", "swaps"), [
    ([2, 2, 1, 2], 3, 1 / 3, 1),
    ([1, 2, 2, 2], 2, 0.0, 2),
    ([2, 1, 2, 1, 1], 2, 0.5, 1),
])
def test_no_route_set_beats_the_bound(widths, microbatches, k, swaps):
    problem = make_problem(widths, microbatches, k, swaps=swaps, seed=1)
    times = [simulate(problem.spec(routes), record_timeline=False).iteration_s
             for routes in every_valid_route_set(problem)]
    bound = lower_bound(problem).seconds
    assert times and bound <= min(times) + 1e-9
    assert bound >= 0.5 * min(times)  # not vacuous on these small pipelines


def test_bound_names_a_busy_stage_when_one_stage_is_slow():
    problem = make_problem([2, 1, 1, 1], 8, 0.0)
    slow = {n: (10.0 if n == "s2n0" else 0.1) for n in problem.forward_s}
    bound = lower_bound(replace(problem, forward_s=slow))
    assert bound.reason.startswith("stage 2:")
    assert bound.seconds >= 8 * 3 * 10.0  # 8 visits of forward + 2x backward


def test_bound_names_an_origin_when_losses_dominate():
    problem = replace(make_problem([1, 2, 2], 6, 0.5), loss_s=20.0)
    bound = lower_bound(problem)
    assert bound.reason.startswith("origin s0n0:")
    assert bound.seconds >= 6 * 20.0


def test_bad_input_is_refused_as_by_the_scheduler():
    with pytest.raises(ValueError, match=r"skip ratio must be in \[0, 1\)"):
        lower_bound(make_problem([1, 1, 1], 2, 1.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.integers(0, 2))
def test_scheduled_random_and_full_routes_never_beat_the_bound(problem, seed):
    bound = lower_bound(problem).seconds
    candidates = [schedule_paths(problem, seed=seed, iterations=30).routes,
                  random_paths(problem, seed=seed).routes]
    if problem.visits_per_route() == len(problem.stages) - 1:
        candidates.append(full_routes(problem))
    for routes in candidates:
        try:
            seconds = simulate(problem.spec(routes), record_timeline=False).iteration_s
        except ValueError:  # random routes may deadlock under the memory caps
            continue
        assert bound <= seconds + 1e-9
