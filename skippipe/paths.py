"""SkipPipe-style path scheduling: which stages, in which order, on which node.

This module owns the choice of one route per microbatch through a pipeline whose
stages each have one or more nodes (SkipPipe, arXiv 2502.19913). It works on plain
inputs -- stage -> node lists, origins with their microbatches, per-node seconds,
per-pair latency and bandwidth, per-node memory -- and imports nothing from holmes.

A route (see `skippipe.simulate`) starts at its origin, a node of stage 0, which also
runs the loss, and must:

* visit exactly ``round((1 - k) * (S - 1))`` of the other ``S - 1`` stages, each once,
  on one node of that stage (``k`` is the skip ratio);
* keep ascending stage order except for at most ``max_swaps`` swaps, each of two
  neighbours in the route whose stages are consecutive (``s + 1`` before ``s``), so a
  stage moves back by at most one place;
* together with the other routes, visit every non-first stage equally often (+-1), so
  that every layer trains on as many samples as every other;
* fit the memory caps: a node holds at most ``memory_limit[node]`` microbatches at once.
  The simulator enforces the cap by making forwards wait; a schedule that deadlocks
  under the caps is never returned.

Collision awareness: the scheduler minimises the *simulated* iteration time
(`skippipe.simulate.simulate`, which models queueing on nodes and links), not path
length. It builds balanced stage sets greedily, places each visit on the node that
would finish it soonest (load + transfer), then runs a seeded local search whose moves
are: move one visit to another node of its stage, exchange the nodes of two visits of
one stage, exchange a visited and a skipped stage between two microbatches (balance
is kept), and add or remove a swap of neighbours. A move is kept when the simulated
time does not grow. The result depends only on the inputs and the seed.

`random_paths` draws valid routes with no collision awareness: the naive baseline.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from skippipe.simulate import LinkParam, PipelineSpec, Route, simulate

__all__ = [
    "PathProblem",
    "PathSchedule",
    "check_routes",
    "full_routes",
    "random_paths",
    "schedule_paths",
    "stages_visited",
]

DEFAULT_ITERATIONS = 1500
# Weights of booked compute against transfer seconds tried for the starting routes.
START_WEIGHTS = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class PathProblem:
    """Plain inputs of the path scheduler.

    ``stages[0]`` are the origins; ``microbatches[origin]`` lists the ids of the
    microbatches that start there (ids unique over all origins). ``forward_s``,
    ``latency_s``, ``bandwidth_Bps``, ``backward_ratio``, ``loss_s``, ``memory_limit``
    and ``tail_s`` mean what they mean in `skippipe.simulate.PipelineSpec`.
    """

    stages: Sequence[Sequence[str]]
    microbatches: Mapping[str, Sequence[int]]
    forward_s: Mapping[str, float]
    activation_bytes: float
    latency_s: LinkParam
    bandwidth_Bps: LinkParam
    skip_ratio: float = 0.0
    max_swaps: int = 2
    memory_limit: Mapping[str, int] | None = None
    backward_ratio: float = 2.0
    loss_s: Mapping[str, float] | float = 0.0
    tail_s: Mapping[str, float] | None = None

    def visits_per_route(self) -> int:
        """How many non-first stages each route visits: round((1 - k) * (S - 1)), with
        Python's rounding (halves to even: k = 0.5 over 5 stages visits 2)."""
        return round((1.0 - self.skip_ratio) * (len(self.stages) - 1))

    def spec(self, routes: Sequence[Route]) -> PipelineSpec:
        """The simulator's input for ``routes`` on this problem."""
        return PipelineSpec(
            forward_s=self.forward_s, routes=list(routes),
            activation_bytes=self.activation_bytes, latency_s=self.latency_s,
            bandwidth_Bps=self.bandwidth_Bps, backward_ratio=self.backward_ratio,
            loss_s=self.loss_s, memory_limit=self.memory_limit, tail_s=self.tail_s,
            loss_at="origin")


@dataclass
class PathSchedule:
    """The routes chosen, their simulated iteration time and how the search went."""

    routes: list[Route]
    iteration_s: float
    initial_s: float
    evaluations: int
    stage_visits: dict[int, int] = field(default_factory=dict)


# ---------------------------------------------------------------- validation


def _limit(problem: PathProblem, node: str) -> float:
    return (problem.memory_limit or {}).get(node, math.inf)


def _check_problem(problem: PathProblem) -> dict[str, int]:
    """Raise ValueError naming the first bad input; return node -> stage index."""
    k = problem.skip_ratio
    if not (isinstance(k, int | float) and 0.0 <= k < 1.0):
        raise ValueError(f"skip ratio must be in [0, 1), got {k!r}")
    if not problem.stages or any(not stage for stage in problem.stages):
        raise ValueError("every stage needs at least one node")
    stage_of: dict[str, int] = {}
    for s, stage in enumerate(problem.stages):
        for node in stage:
            if node in stage_of:
                raise ValueError(f"node {node!r} is in stage {stage_of[node]} and stage {s}")
            if node not in problem.forward_s:
                raise ValueError(f"stage {s} names node {node!r}, which has no forward_s entry")
            stage_of[node] = s
    others = len(problem.stages) - 1
    swaps = problem.max_swaps
    if not isinstance(swaps, int) or swaps < 0 or swaps > others:
        raise ValueError(f"max swaps must be an integer in [0, {others}] (the number of "
                         f"non-first stages), got {swaps!r}")
    _check_origins(problem, stage_of)
    _check_memory(problem)
    return stage_of


def _check_origins(problem: PathProblem, stage_of: Mapping[str, int]) -> None:
    seen: set[int] = set()
    for origin, ids in problem.microbatches.items():
        if stage_of.get(origin) != 0:
            raise ValueError(f"origin {origin!r} is not a node of stage 0")
        for mb in ids:
            if mb in seen:
                raise ValueError(f"microbatch {mb} has more than one origin")
            seen.add(mb)
    if not seen:
        raise ValueError("no microbatches: give at least one origin with a microbatch")


def _check_memory(problem: PathProblem) -> None:
    for origin, ids in problem.microbatches.items():
        if ids and _limit(problem, origin) < 1:
            raise ValueError(f"memory too small for any route: origin {origin!r} has "
                             "memory_limit 0 but microbatches start there")
    if problem.visits_per_route() == 0:
        return
    for s, stage in enumerate(problem.stages[1:], start=1):
        if all(_limit(problem, node) < 1 for node in stage):
            raise ValueError(f"memory too small for any route: every node of stage {s} has "
                             "memory_limit 0, but every route must visit stages equally")


def stages_visited(route: Route, stage_of: Mapping[str, int]) -> list[int]:
    """The stage index of each node of ``route`` after its origin, in visiting order."""
    return [stage_of[node] for node in route.nodes[1:]]


def _swaps(order: Sequence[int]) -> int | None:
    """Swaps that turn sorted(order) into order, or None if the order is not allowed: a
    swap exchanges two neighbours of the route whose stages are consecutive (s, s + 1),
    so no stage moves by more than one place."""
    ranked = sorted(order)
    if len(set(order)) != len(order):
        return None
    swaps, i = 0, 0
    while i < len(order):
        if order[i] == ranked[i]:
            i += 1
            continue
        swapped = (i + 1 < len(order) and order[i] == ranked[i + 1]
                   and order[i + 1] == ranked[i] and ranked[i + 1] - ranked[i] == 1)
        if not swapped:
            return None
        swaps, i = swaps + 1, i + 2
    return swaps


def check_routes(problem: PathProblem, routes: Sequence[Route]) -> None:
    """Raise ValueError if ``routes`` break a rule of the module docstring (memory caps
    are checked by simulating: a deadlock raises)."""
    stage_of = _check_problem(problem)
    want = {mb: origin for origin, ids in problem.microbatches.items() for mb in ids}
    got = {route.microbatch for route in routes}
    if got != set(want) or len(got) != len(routes):
        raise ValueError("routes must give exactly one route per microbatch")
    visits = problem.visits_per_route()
    counts: Counter[int] = Counter()
    for route in routes:
        _check_one_route(problem, route, want[route.microbatch], stage_of, visits)
        counts.update(stages_visited(route, stage_of))
    tally = [counts[s] for s in range(1, len(problem.stages))]
    if tally and max(tally) - min(tally) > 1:
        raise ValueError(f"stages are not visited equally (+-1): visits per stage {tally}")
    simulate(problem.spec(routes), record_timeline=False)


def _check_one_route(problem: PathProblem, route: Route, origin: str,
                     stage_of: Mapping[str, int], visits: int) -> None:
    mb = route.microbatch
    if not route.nodes or route.nodes[0] != origin:
        raise ValueError(f"route of microbatch {mb} must start at its origin {origin!r}")
    unknown = [node for node in route.nodes if node not in stage_of]
    if unknown:
        raise ValueError(f"route of microbatch {mb} names unknown node {unknown[0]!r}")
    order = stages_visited(route, stage_of)
    if len(order) != visits or 0 in order:
        raise ValueError(f"route of microbatch {mb} must visit {visits} non-first stages, "
                         f"visits stages {order}")
    swaps = _swaps(order)
    if swaps is None or swaps > problem.max_swaps:
        raise ValueError(f"route of microbatch {mb} visits stages in order {order}: only "
                         f"up to {problem.max_swaps} swaps of consecutive stages are allowed")


# ---------------------------------------------------------------- construction


@dataclass
class _Draft:
    """Routes under construction: per microbatch, its origin and (stage, node) visits."""

    origin: dict[int, str]
    visits: dict[int, list[tuple[int, str]]]

    def routes(self) -> list[Route]:
        return [Route(mb, (self.origin[mb], *(node for _, node in self.visits[mb])))
                for mb in sorted(self.origin)]

    def copy(self) -> _Draft:
        return _Draft(dict(self.origin), {mb: list(v) for mb, v in self.visits.items()})


def _interleaved(problem: PathProblem) -> list[tuple[int, str]]:
    """(microbatch, origin) taking one microbatch from each origin in turn."""
    queues = [(origin, list(ids)) for origin, ids in problem.microbatches.items()]
    order: list[tuple[int, str]] = []
    while any(ids for _, ids in queues):
        for origin, ids in queues:
            if ids:
                order.append((ids.pop(0), origin))
    return order


def _balanced_stage_sets(problem: PathProblem, order: Sequence[tuple[int, str]],
                         rng: random.Random) -> dict[int, list[int]]:
    """Per microbatch, the stages it visits: each takes the least-visited stages so far
    (ties broken at random), which keeps every stage within one visit of the others."""
    visits = problem.visits_per_route()
    counts = dict.fromkeys(range(1, len(problem.stages)), 0)
    chosen: dict[int, list[int]] = {}
    for mb, _ in order:
        ranked = sorted(counts, key=lambda s: (counts[s], rng.random()))
        chosen[mb] = sorted(ranked[:visits])
        for s in chosen[mb]:
            counts[s] += 1
    return chosen


def _hop_s(problem: PathProblem, a: str, b: str) -> float:
    """Seconds of one transfer from ``a`` to ``b`` on an idle link."""
    def value(param: LinkParam) -> float:
        if isinstance(param, Mapping):
            return float(param.get((a, b), param.get((b, a), math.inf)))
        return float(param(a, b))

    return value(problem.latency_s) + problem.activation_bytes / value(problem.bandwidth_Bps)


class _Costs:
    """Cached per-visit compute seconds and per-hop transfer seconds."""

    def __init__(self, problem: PathProblem) -> None:
        self.problem = problem
        self.hops: dict[tuple[str, str], float] = {}

    def work(self, node: str) -> float:
        return (1.0 + self.problem.backward_ratio) * float(self.problem.forward_s[node])

    def hop(self, a: str, b: str) -> float:
        key = (a, b)
        if key not in self.hops:
            self.hops[key] = _hop_s(self.problem, a, b)
        return self.hops[key]


def _usable(problem: PathProblem) -> list[list[str]]:
    """Per stage, the nodes with room for at least one microbatch."""
    return [[n for n in stage if _limit(problem, n) >= 1] for stage in problem.stages]


def _visit_targets(problem: PathProblem) -> dict[int, int]:
    """Visits per non-first stage: the total split evenly, the remainder going to the
    stages with the most usable nodes (then the lowest index)."""
    others = len(problem.stages) - 1
    total = problem.visits_per_route() * sum(len(ids) for ids in problem.microbatches.values())
    base, extra = divmod(total, others)
    usable = _usable(problem)
    ranked = sorted(range(1, others + 1), key=lambda s: (-len(usable[s]), s))
    return {s: base + (1 if s in ranked[:extra] else 0) for s in range(1, others + 1)}


@dataclass
class _Bookings:
    """Compute seconds booked per node and wire seconds per directed pair so far."""

    node: Counter[str] = field(default_factory=Counter)
    link: Counter[tuple[str, str]] = field(default_factory=Counter)

    def book(self, route: Sequence[str], costs: _Costs) -> None:
        for node in route[1:]:
            self.node[node] += costs.work(node)
        hops = list(zip(route, (*route[1:], route[0]), strict=True))
        for a, b in hops[:-1] if len(route) == 1 else hops:
            self.link[(a, b)] += costs.hop(a, b)
            self.link[(b, a)] += costs.hop(b, a)


def _cheapest_route(problem: PathProblem, origin: str, allowed: set[int], forced: set[int],
                    weight: float, booked: _Bookings, costs: _Costs) -> list[tuple[int, str]]:
    """Dynamic programme over stages in ascending order: visit exactly m of the allowed
    stages (all forced ones among them) minimising, over the route's hops there and back,
    transfer seconds plus the wire already booked on them, plus ``weight`` x the compute
    already booked on each node visited."""
    want = problem.visits_per_route()
    usable = _usable(problem)
    states: dict[tuple[int, str], tuple[float, list[tuple[int, str]]]] = {(0, origin): (0.0, [])}
    for s in range(1, len(problem.stages)):
        nxt: dict[tuple[int, str], tuple[float, list[tuple[int, str]]]] = {}
        for (count, last), (cost, path) in states.items():
            if s not in forced:
                _keep(nxt, (count, last), cost, path)
            if s not in allowed or count == want:
                continue
            for node in usable[s]:
                step = (2 * costs.hop(last, node) + booked.link[(last, node)]
                        + weight * (booked.node[node] + costs.work(node)))
                _keep(nxt, (count + 1, node), cost + step, [*path, (s, node)])
        states = nxt
    finals = [(cost + (2 * costs.hop(last, origin) + booked.link[(last, origin)]
                       if last != origin else 0.0), path)
              for (count, last), (cost, path) in states.items() if count == want]
    return min(finals, key=lambda item: (item[0], item[1]))[1]


def _keep(states: dict[tuple[int, str], tuple[float, list[tuple[int, str]]]],
          key: tuple[int, str], cost: float, path: list[tuple[int, str]]) -> None:
    if key not in states or (cost, path) < states[key]:
        states[key] = (cost, path)


def _planned_draft(problem: PathProblem, order: Sequence[tuple[int, str]], costs: _Costs,
                   weight: float) -> _Draft:
    """Routes one microbatch at a time, each the cheapest (`_cheapest_route`) given what
    the earlier ones booked. Stage visits follow `_visit_targets`: a stage that still needs
    as many visits as microbatches remain is forced, one with none left is closed."""
    remaining = _visit_targets(problem)
    booked = _Bookings()
    draft = _Draft({mb: origin for mb, origin in order}, {})
    for i, (mb, origin) in enumerate(order):
        left = len(order) - i
        forced = {s for s, c in remaining.items() if c >= left}
        allowed = {s for s, c in remaining.items() if c > 0}
        visits = _cheapest_route(problem, origin, allowed, forced, weight, booked, costs)
        for s, _ in visits:
            remaining[s] -= 1
        booked.book([origin, *(node for _, node in visits)], costs)
        draft.visits[mb] = visits
    return draft


# ---------------------------------------------------------------- local search


class _Search:
    """Seeded local search over drafts, scored by the simulator."""

    def __init__(self, problem: PathProblem, seed: int, costs: _Costs) -> None:
        self.problem = problem
        self.costs = costs
        self.rng = random.Random(seed)
        self.evaluations = 0
        self.usable = [[n for n in stage if _limit(problem, n) >= 1]
                       for stage in problem.stages]

    def score(self, draft: _Draft) -> float:
        self.evaluations += 1
        try:
            return simulate(self.problem.spec(draft.routes()),
                            record_timeline=False).iteration_s
        except ValueError:
            return math.inf

    def run(self, draft: _Draft, iterations: int) -> tuple[_Draft, float]:
        """Simulated annealing: a worse draft is kept with probability exp(-worsening / T),
        T falling geometrically from 2% of the start's time to nearly 0; the best draft
        seen is returned."""
        current = best_value = self.score(draft)
        best = draft
        moves = [self.move_node, self.exchange_nodes, self.exchange_stages, self.toggle_swap,
                 self.reroute]
        start_t = 0.02 * current if math.isfinite(current) else 1.0
        for step in range(iterations):
            temperature = start_t * (0.001 ** (step / max(1, iterations)))
            candidate = draft.copy()
            if not self.rng.choice(moves)(candidate):
                continue
            value = self.score(candidate)
            if value <= current or (math.isfinite(value) and self.rng.random()
                                    < math.exp((current - value) / temperature)):
                draft, current = candidate, value
                if value < best_value:
                    best, best_value = candidate, value
        return best, best_value

    def _visit(self, draft: _Draft) -> tuple[int, int] | None:
        """A random (microbatch, position) of a visit, or None if no route visits."""
        mbs = [mb for mb, v in draft.visits.items() if v]
        if not mbs:
            return None
        mb = self.rng.choice(mbs)
        return mb, self.rng.randrange(len(draft.visits[mb]))

    def move_node(self, draft: _Draft) -> bool:
        picked = self._visit(draft)
        if picked is None:
            return False
        mb, i = picked
        s, node = draft.visits[mb][i]
        others = [n for n in self.usable[s] if n != node]
        if not others:
            return False
        draft.visits[mb][i] = (s, self.rng.choice(others))
        return True

    def exchange_nodes(self, draft: _Draft) -> bool:
        picked = self._visit(draft)
        if picked is None:
            return False
        mb, i = picked
        s, node = draft.visits[mb][i]
        partners = [(other, j) for other, v in draft.visits.items()
                    for j, (t, n) in enumerate(v) if t == s and n != node]
        if not partners:
            return False
        other, j = self.rng.choice(partners)
        draft.visits[mb][i] = (s, draft.visits[other][j][1])
        draft.visits[other][j] = (s, node)
        return True

    def exchange_stages(self, draft: _Draft) -> bool:
        """mb visits x but not y, other visits y but not x: trade them (balance holds)."""
        mb, other = self.rng.sample(sorted(draft.visits), 2) if len(draft.visits) > 1 else (0, 0)
        if mb == other:
            return False
        mine = {s for s, _ in draft.visits[mb]}
        theirs = {s for s, _ in draft.visits[other]}
        give, take = sorted(mine - theirs), sorted(theirs - mine)
        if not give or not take:
            return False
        x, y = self.rng.choice(give), self.rng.choice(take)
        node_y = next(n for s, n in draft.visits[other] if s == y)
        node_x = next(n for s, n in draft.visits[mb] if s == x)
        draft.visits[mb] = sorted([(s, n) for s, n in draft.visits[mb] if s != x]
                                  + [(y, node_y)])
        draft.visits[other] = sorted([(s, n) for s, n in draft.visits[other] if s != y]
                                     + [(x, node_x)])
        return True

    def reroute(self, draft: _Draft) -> bool:
        """Re-choose every node of one route, keeping its stages, with the dynamic
        programme against what all the other routes book."""
        mbs = [mb for mb, v in draft.visits.items() if v]
        if not mbs:
            return False
        mb = self.rng.choice(mbs)
        booked = _Bookings()
        for other, visits in draft.visits.items():
            if other != mb:
                booked.book([draft.origin[other], *(n for _, n in visits)], self.costs)
        stages = {s for s, _ in draft.visits[mb]}
        weight = self.rng.choice(START_WEIGHTS)
        draft.visits[mb] = _cheapest_route(self.problem, draft.origin[mb], stages, stages,
                                           weight, booked, self.costs)
        return True

    def toggle_swap(self, draft: _Draft) -> bool:
        picked = self._visit(draft)
        if picked is None or len(draft.visits[picked[0]]) < 2:
            return False
        mb, _ = picked
        visits = draft.visits[mb]
        i = self.rng.randrange(len(visits) - 1)
        trial = visits[:i] + [visits[i + 1], visits[i]] + visits[i + 2:]
        swaps = _swaps([s for s, _ in trial])
        if swaps is None or swaps > self.problem.max_swaps:
            return False
        draft.visits[mb] = trial
        return True


def _stage_counts(routes: Sequence[Route], stage_of: Mapping[str, int]) -> dict[int, int]:
    counts: Counter[int] = Counter()
    for route in routes:
        counts.update(stages_visited(route, stage_of))
    return dict(sorted(counts.items()))


def schedule_paths(problem: PathProblem, seed: int = 0,
                   iterations: int = DEFAULT_ITERATIONS) -> PathSchedule:
    """Collision-aware routes for every microbatch of ``problem`` (module docstring).

    Raises ValueError on bad input, or when no schedule fits the memory caps.
    Deterministic for a given ``seed`` and ``iterations``.
    """
    stage_of = _check_problem(problem)
    costs = _Costs(problem)
    search = _Search(problem, seed, costs)
    draft = min(_starts(problem, costs), key=search.score)
    initial = search.score(draft)
    draft, best = search.run(draft, iterations)
    if not math.isfinite(best):
        raise ValueError("memory too small for any route: every schedule tried deadlocks "
                         "under the memory limits")
    routes = draft.routes()
    check_routes(problem, routes)
    return PathSchedule(routes=routes, iteration_s=best, initial_s=initial,
                        evaluations=search.evaluations,
                        stage_visits=_stage_counts(routes, stage_of))


def _starts(problem: PathProblem, costs: _Costs) -> list[_Draft]:
    """The search's starting drafts: one collision-aware plan per START_WEIGHTS (and the
    full pipeline when routes skip nothing)."""
    order = _interleaved(problem)
    starts = [_planned_draft(problem, order, costs, weight) for weight in START_WEIGHTS]
    if problem.visits_per_route() == len(problem.stages) - 1:
        starts.append(_Draft({mb: o for mb, o in order},
                             {r.microbatch: list(enumerate(r.nodes[1:], start=1))
                              for r in full_routes(problem)}))
    return starts


def starting_schedule_s(problem: PathProblem) -> float:
    """Simulated seconds of the best starting schedule of the route search (no search):
    the same as ``schedule_paths(problem, iterations=0).iteration_s`` at a fraction of its
    cost, a quick score of a placement. ``math.inf`` when every start deadlocks."""
    _check_problem(problem)
    costs = _Costs(problem)
    search = _Search(problem, 0, costs)
    return min(search.score(draft) for draft in _starts(problem, costs))


def random_paths(problem: PathProblem, seed: int = 0) -> PathSchedule:
    """Valid routes with no collision awareness: balanced random stage sets in ascending
    order, each visit on a uniformly random node of its stage (the naive baseline)."""
    stage_of = _check_problem(problem)
    rng = random.Random(seed)
    order = _interleaved(problem)
    stage_sets = _balanced_stage_sets(problem, order, rng)
    usable = [[n for n in stage if _limit(problem, n) >= 1] for stage in problem.stages]
    draft = _Draft({mb: origin for mb, origin in order},
                   {mb: [(s, rng.choice(usable[s])) for s in stage_sets[mb]]
                    for mb, _ in order})
    routes = draft.routes()
    result = simulate(problem.spec(routes), record_timeline=False)
    return PathSchedule(routes=routes, iteration_s=result.iteration_s,
                        initial_s=result.iteration_s, evaluations=1,
                        stage_visits=_stage_counts(routes, stage_of))


def full_routes(problem: PathProblem) -> list[Route]:
    """Every stage in order, microbatch j of the step on node j mod size of each stage
    (the lanes a full pipeline uses); ignores ``skip_ratio``."""
    order = _interleaved(replace(problem, skip_ratio=0.0))
    return [Route(mb, (origin, *(stage[j % len(stage)] for stage in problem.stages[1:])))
            for j, (mb, origin) in enumerate(order)]
