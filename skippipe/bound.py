"""A lower bound on the iteration time that any valid routes of a `PathProblem` reach.

This module owns `lower_bound`: a number of seconds that no set of routes obeying the
rules of `skippipe.paths` can beat in the simulator (`skippipe.simulate`), however they
are chosen. It tells a reader how far a schedule is from the best possible one, and
whether a target is reachable at all on a given placement and layer split. It works on
the same plain inputs as the scheduler and ignores ``tail_s`` (tails only add time).

Two arguments, each a relaxation of the real problem (so each is a valid bound):

* **A busy non-first stage.** Every non-first stage ``s`` gets at least
  ``floor(m * M / (S - 1))`` visits (M microbatches, m visits per route, balanced to
  +-1), so one of its nodes ``n`` gets at least ``V = ceil(that / nodes of s)``, each
  costing ``(1 + backward_ratio) * forward_s[n]``. That node's first task is a forward,
  which cannot start before the earliest *arrival* at ``n``; its last task is a
  backward, after which its microbatch still has to *drain*: go back through the nodes
  it visited before ``n`` (their backward) to its origin (its backward there). So the
  iteration lasts at least ``arrive(n) + V * work(n) + drain(n)`` for that node, and at
  least the smallest of these over the nodes of ``s``.
* **An origin.** An origin with ``M_o`` microbatches runs ``M_o`` losses one after the
  other, none before its first microbatch made the shortest round trip; after the last
  loss that microbatch still needs the shortest way back and its stage-0 backward.

How many nodes come before stage ``s`` on a route: at least ``m - (S - 1 - s) - 1``
other visited stages are below ``s`` (at most ``S - 1 - s`` stages are above it), and a
swap moves ``s`` ahead of at most one of them. Arrival and drain are the cheapest
*walks* (hops at their idle-link time, plus the compute of the nodes passed) with at
least that many intermediate nodes, each from a non-first stage other than ``s``: a
superset of real route prefixes, so the minimum is no larger than the true one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from skippipe.paths import PathProblem, _check_problem, _Costs, _usable

__all__ = ["LowerBound", "lower_bound"]


@dataclass(frozen=True)
class LowerBound:
    """The bound in seconds, and in words which node or origin sets it and why."""

    seconds: float
    reason: str


def lower_bound(problem: PathProblem) -> LowerBound:
    """The larger of the stage and origin bounds (module docstring); ValueError on bad
    input, as `skippipe.paths.schedule_paths` raises it."""
    _check_problem(problem)
    costs = _Costs(problem)
    origins = [origin for origin, ids in problem.microbatches.items() if ids]
    bounds = [_origin_bound(problem, costs, origin) for origin in origins]
    if problem.visits_per_route() > 0:
        bounds += [_stage_bound(problem, costs, origins, s)
                   for s in range(1, len(problem.stages))]
    return max(bounds, key=lambda b: b.seconds)


@dataclass
class _Walks:
    """From one origin, per number p of intermediate nodes, the cheapest forward walk
    (hop + forward of each node) and backward walk (the reverse hop + backward of each
    node) ending at each intermediate node: ``forward[p][v]``, ``backward[p][v]``."""

    forward: list[dict[str, float]]
    backward: list[dict[str, float]]


def _walks(problem: PathProblem, costs: _Costs, origin: str, middle: Sequence[str],
           most: int) -> _Walks:
    forward_s = problem.forward_s
    return _Walks(
        _cheapest(origin, middle, most, lambda u, v: costs.hop(u, v) + float(forward_s[v])),
        _cheapest(origin, middle, most, lambda u, v: costs.hop(v, u) + _backward(problem, v)))


def _cheapest(start: str, middle: Sequence[str], most: int,
              cost: Callable[[str, str], float]) -> list[dict[str, float]]:
    """``walks[p][v]``: the cheapest walk from ``start`` through exactly ``p`` nodes of
    ``middle`` (repeats allowed) ending at ``v``, each step ``u -> v`` costing
    ``cost(u, v)``; p = 1 .. most (``walks[0]`` is empty)."""
    walks: list[dict[str, float]] = [{}]
    previous = {start: 0.0}
    for _ in range(most):
        previous = {v: min((c + cost(u, v) for u, c in previous.items() if u != v),
                           default=math.inf) for v in middle}
        walks.append(previous)
    return walks


def _backward(problem: PathProblem, node: str) -> float:
    return problem.backward_ratio * float(problem.forward_s[node])


def _loss(problem: PathProblem, origin: str) -> float:
    loss = problem.loss_s
    return float(loss.get(origin, 0.0)) if isinstance(loss, Mapping) else float(loss)


def _ends(problem: PathProblem, costs: _Costs, origin: str, walks: _Walks, node: str,
          least: int) -> tuple[float, float]:
    """(cheapest arrival at ``node`` after the origin's forward, cheapest drain after a
    backward on ``node``) over walks with ``least`` or more intermediate nodes."""
    arrive, drain = math.inf, math.inf
    for p in range(least, len(walks.forward)):
        if p == 0:
            arrive = min(arrive, costs.hop(origin, node))
            drain = min(drain, costs.hop(node, origin))
            continue
        arrive = min(arrive, min((c + costs.hop(u, node) for u, c in walks.forward[p].items()
                                  if u != node), default=math.inf))
        drain = min(drain, min((c + costs.hop(node, u) for u, c in walks.backward[p].items()
                                if u != node), default=math.inf))
    return (float(problem.forward_s[origin]) + arrive, drain + _backward(problem, origin))


def _stage_bound(problem: PathProblem, costs: _Costs, origins: Sequence[str],
                 s: int) -> LowerBound:
    stages, m = problem.stages, problem.visits_per_route()
    total = m * sum(len(ids) for ids in problem.microbatches.values())
    usable = _usable(problem)
    visits = math.ceil((total // (len(stages) - 1)) / len(usable[s]))
    below = max(0, m - (len(stages) - 1 - s) - 1)
    least = max(0, below - (1 if problem.max_swaps > 0 else 0))
    middle = [n for t, nodes in enumerate(usable) if t not in (0, s) for n in nodes]
    most = min(m - 1, len(stages) - 2) if middle else 0
    walks = {o: _walks(problem, costs, o, middle, most) for o in origins}
    best = LowerBound(math.inf, "")
    for node in usable[s]:
        ends = [_ends(problem, costs, o, walks[o], node, least) for o in origins]
        arrive, drain = min(a for a, _ in ends), min(d for _, d in ends)
        work = visits * costs.work(node)
        if arrive + work + drain < best.seconds:
            best = LowerBound(arrive + work + drain, (
                f"stage {s}: some node has >= {visits} visits; the best placed, {node}, "
                f"starts no earlier than {arrive:.2f} s, computes {work:.2f} s and drains "
                f"for >= {drain:.2f} s"))
    return best


def _origin_bound(problem: PathProblem, costs: _Costs, origin: str) -> LowerBound:
    m = problem.visits_per_route()
    count = len(problem.microbatches[origin])
    forward_s = float(problem.forward_s[origin])
    out, back = 0.0, 0.0
    if m > 0:
        middle = [n for nodes in _usable(problem)[1:] for n in nodes]
        walks = _walks(problem, costs, origin, middle, m)
        out = min(c + costs.hop(u, origin) for u, c in walks.forward[m].items())
        back = min(c + costs.hop(origin, u) for u, c in walks.backward[m].items())
    losses = count * _loss(problem, origin)
    seconds = forward_s + out + losses + back + _backward(problem, origin)
    return LowerBound(seconds, (
        f"origin {origin}: {count} losses of {_loss(problem, origin):.2f} s, the first "
        f"after a round trip of >= {forward_s + out:.2f} s, the last followed by >= "
        f"{back + _backward(problem, origin):.2f} s back"))
