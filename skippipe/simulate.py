"""Discrete-event simulator of one pipeline-parallel training iteration.

This module owns the timing model that the planner (holmes) and the skip/reorder
path scheduler (skippipe.paths) use to predict how long an iteration takes. It
works on plain inputs only -- node names, per-node seconds, per-pair latency and
bandwidth, one route per microbatch -- and imports nothing from the rest of
hetsched.

Model (everything here is deterministic):

* **Work of one microbatch.** A route ``(o, n1, ..., nk)`` starts at its origin
  ``o`` (which holds stage 0: embedding, first layers, and the head/loss). The
  microbatch runs forward on ``o``, ``n1``, ..., ``nk`` in that order; the
  activations go back from ``nk`` to ``o``; ``o`` runs the *loss* task (head
  forward + loss + head backward, ``loss_s``); the gradient goes to ``nk``; then
  backward runs on ``nk``, ..., ``n1`` and last on ``o`` (its stage-0 layers).
  A single-node route has no transfers. With ``loss_at="last"`` (Megatron's layout:
  the head on the last stage) the loss runs on ``nk`` right after its forward and
  backward starts there, so nothing travels back to the origin; SkipPipe's partial
  routes need the default, ``"origin"``. Backward time on a node is
  ``backward_ratio * forward_s[node]``. A node may appear at most once per route.
* **Compute.** A node runs one compute task (forward, loss, backward) at a time
  and never preempts one. When it is idle and has ready tasks it picks, in this
  order: backward-side work (loss and backward) before forward work, then the
  lowest microbatch id (1F1B-style priority). All tasks that become ready at the
  same instant are queued before any idle node picks, so ties follow the
  priority, not event order.
* **Memory.** A microbatch is *in flight* at a node from the start of its
  forward there until the end of its backward there. A node starts a forward
  only while its in-flight count is below ``memory_limit[node]`` (no entry:
  unlimited). If the limits make progress impossible, ``simulate`` raises
  ``ValueError`` naming the stuck microbatches and nodes.
* **Links.** Each hop sends ``activation_bytes`` (activations forward,
  gradients backward). A transfer on the directed pair ``(src, dst)`` takes
  ``latency + bytes / bandwidth`` when the pair is idle. Each directed pair is
  a FIFO channel whose *wire* (the ``bytes / bandwidth`` part) carries one
  transfer at a time; the latency part is propagation and overlaps with the
  next transfer's wire time, as on a TCP stream. So a transfer that finds the
  pair busy starts when the previous one has left the sender. Different
  directed pairs never contend, even when they share a sender or a receiver
  (``a->c`` and ``b->c`` overlap; ``a->b`` and ``b->a`` overlap). Transfers
  do not occupy the compute of either end.
* **Tail.** ``tail_s[node]`` (e.g. a data-parallel all-reduce) runs on the node
  after its last backward ends (at time 0 if it has no backward); it counts in
  the iteration time but not in ``busy_s``.

The result gives the iteration time (end of the last event), compute-busy
seconds per node, bytes per directed link, the peak number of microbatches in
flight per node, and optionally the timeline of every event.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Literal, NamedTuple

__all__ = ["Event", "PipelineSpec", "Route", "SimResult", "simulate"]

LinkParam = Callable[[str, str], float] | Mapping[tuple[str, str], float]

# Step kinds of a microbatch's chain (ints for speed in the event loop).
_FORWARD, _LOSS, _BACKWARD, _SEND = 0, 1, 2, 3
_KIND_NAMES = ("forward", "loss", "backward", "send")
# One step of a microbatch's chain: (kind, node index or pair index, seconds, latency).
# For a send, seconds is the wire time (bytes / bandwidth); latency is 0 for compute.
_Step = tuple[int, int, float, float]


@dataclass(frozen=True)
class Route:
    """The path of one microbatch: ``nodes[0]`` is its origin (stage 0 + head/loss)."""

    microbatch: int
    nodes: tuple[str, ...]


@dataclass
class PipelineSpec:
    """Plain inputs of one simulated iteration (see the module docstring for semantics).

    ``latency_s`` and ``bandwidth_Bps`` are either a function ``(src, dst) -> value``
    or a mapping keyed by ``(src, dst)``; a mapping without ``(src, dst)`` falls
    back to ``(dst, src)`` (links measured once for both directions).
    ``loss_s`` as a mapping is keyed by the node that runs the loss (the origin, or the
    last node with ``loss_at="last"``); a missing node costs 0.
    """

    forward_s: Mapping[str, float]
    routes: Sequence[Route]
    activation_bytes: float
    latency_s: LinkParam
    bandwidth_Bps: LinkParam
    backward_ratio: float = 2.0
    loss_s: Mapping[str, float] | float = 0.0
    memory_limit: Mapping[str, int] | None = None
    tail_s: Mapping[str, float] | None = None
    loss_at: Literal["origin", "last"] = "origin"


class Event(NamedTuple):
    """One box of the timeline.

    ``kind`` is "forward", "loss", "backward", "send" or "tail". ``node`` is the
    node that computes; for "send" it is the sender, and ``src``/``dst`` name the
    directed pair (both ``None`` otherwise). A send spans from the moment its
    bytes start leaving ``src`` to their arrival at ``dst``. ``microbatch`` is
    ``None`` for "tail".
    """

    kind: str
    microbatch: int | None
    start: float
    end: float
    node: str
    src: str | None = None
    dst: str | None = None


@dataclass
class SimResult:
    """What one simulated iteration produced."""

    iteration_s: float
    busy_s: dict[str, float]
    bytes_per_link: dict[tuple[str, str], float]
    peak_in_flight: dict[str, int]
    timeline: list[Event] = field(default_factory=list)

    def bubble_fraction(self) -> float:
        """1 - mean compute-busy time / iteration time, over every node in ``forward_s``."""
        if self.iteration_s <= 0 or not self.busy_s:
            return 0.0
        mean_busy = sum(self.busy_s.values()) / len(self.busy_s)
        return 1.0 - mean_busy / self.iteration_s


# ---------------------------------------------------------------- validation


def _check_seconds(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return value


def _check_known(
    mapping: Mapping[str, object] | None, known: Mapping[str, float], what: str
) -> None:
    for node in mapping or ():
        if node not in known:
            raise ValueError(f"{what} names node {node!r}, which has no forward_s entry")


def _check_routes(spec: PipelineSpec) -> list[Route]:
    if not spec.routes:
        raise ValueError("no routes: give at least one microbatch route")
    seen: set[int] = set()
    limits = spec.memory_limit or {}
    for route in spec.routes:
        mb = route.microbatch
        if mb in seen:
            raise ValueError(f"microbatch {mb} has more than one route")
        seen.add(mb)
        if not route.nodes:
            raise ValueError(f"route of microbatch {mb} is empty")
        for node in route.nodes:
            if node not in spec.forward_s:
                raise ValueError(f"route of microbatch {mb} names node {node!r}, "
                                 "which has no forward_s entry")
            if limits.get(node, 1) < 1:
                raise ValueError(f"route of microbatch {mb} visits node {node!r}, "
                                 "whose memory_limit is 0")
        if len(set(route.nodes)) != len(route.nodes):
            twice = next(n for n in route.nodes if route.nodes.count(n) > 1)
            raise ValueError(f"route of microbatch {mb} visits node {twice!r} more than once")
    return sorted(spec.routes, key=lambda r: r.microbatch)


def _check_spec(spec: PipelineSpec) -> list[Route]:
    for node, seconds in spec.forward_s.items():
        _check_seconds(seconds, f"forward_s[{node!r}]")
    _check_seconds(spec.activation_bytes, "activation_bytes")
    _check_seconds(spec.backward_ratio, "backward_ratio")
    if isinstance(spec.loss_s, Mapping):
        _check_known(spec.loss_s, spec.forward_s, "loss_s")
        for node, seconds in spec.loss_s.items():
            _check_seconds(seconds, f"loss_s[{node!r}]")
    else:
        _check_seconds(spec.loss_s, "loss_s")
    _check_known(spec.tail_s, spec.forward_s, "tail_s")
    for node, seconds in (spec.tail_s or {}).items():
        _check_seconds(seconds, f"tail_s[{node!r}]")
    _check_known(spec.memory_limit, spec.forward_s, "memory_limit")
    for node, limit in (spec.memory_limit or {}).items():
        if not isinstance(limit, Integral) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"memory_limit[{node!r}] must be an integer >= 0, got {limit!r}")
    return _check_routes(spec)


def _link_value(param: LinkParam, src: str, dst: str, what: str) -> float:
    if isinstance(param, Mapping):
        value = param.get((src, dst), param.get((dst, src)))
        if value is None:
            raise ValueError(f"no {what} for link {src}->{dst}")
        return float(value)
    try:
        return float(param(src, dst))
    except LookupError as error:
        raise ValueError(f"no {what} for link {src}->{dst}: {error!r}") from error


def _link_times(spec: PipelineSpec, src: str, dst: str) -> tuple[float, float]:
    """(wire seconds, latency seconds) of one transfer on ``src -> dst``."""
    latency = _link_value(spec.latency_s, src, dst, "latency_s")
    bandwidth = _link_value(spec.bandwidth_Bps, src, dst, "bandwidth_Bps")
    if not math.isfinite(latency) or latency < 0:
        raise ValueError(f"latency_s of link {src}->{dst} must be finite and >= 0, "
                         f"got {latency!r}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth_Bps of link {src}->{dst} must be > 0, got {bandwidth!r}")
    return spec.activation_bytes / bandwidth, latency


# ---------------------------------------------------------------- compilation


@dataclass
class _Plan:
    """The spec flattened into integer-indexed chains for the event loop."""

    nodes: list[str]
    limits: list[float]
    pairs: list[tuple[str, str]]
    steps: list[list[_Step]]  # per microbatch (sorted by id), its chain of steps
    microbatch_ids: list[int]


def _chain(route: Route, index: dict[str, int], send_step: Callable[[str, str], _Step],
           forward: list[float], ratio: float, loss: float, loss_at_origin: bool) -> list[_Step]:
    """The ordered steps of one microbatch (see the module docstring)."""
    nodes = route.nodes
    steps: list[_Step] = []
    for hop, name in enumerate(nodes):
        if hop:
            steps.append(send_step(nodes[hop - 1], name))
        steps.append((_FORWARD, index[name], forward[index[name]], 0.0))
    round_trip = loss_at_origin and len(nodes) > 1
    if round_trip:
        steps.append(send_step(nodes[-1], nodes[0]))
    steps.append((_LOSS, index[nodes[0] if loss_at_origin else nodes[-1]], loss, 0.0))
    if round_trip:
        steps.append(send_step(nodes[0], nodes[-1]))
    for hop in range(len(nodes) - 1, -1, -1):
        name = nodes[hop]
        if hop < len(nodes) - 1:
            steps.append(send_step(nodes[hop + 1], name))
        steps.append((_BACKWARD, index[name], ratio * forward[index[name]], 0.0))
    return steps


def _compile(spec: PipelineSpec) -> _Plan:
    routes = _check_spec(spec)
    nodes = list(spec.forward_s)
    index = {name: i for i, name in enumerate(nodes)}
    forward = [float(spec.forward_s[name]) for name in nodes]
    limits_in = spec.memory_limit or {}
    limits = [float(limits_in.get(name, math.inf)) for name in nodes]
    pairs: list[tuple[str, str]] = []
    send_steps: dict[tuple[str, str], _Step] = {}

    def send_step(src: str, dst: str) -> _Step:
        step = send_steps.get((src, dst))
        if step is None:
            wire, latency = _link_times(spec, src, dst)
            step = send_steps[(src, dst)] = (_SEND, len(pairs), wire, latency)
            pairs.append((src, dst))
        return step

    steps = []
    ratio = float(spec.backward_ratio)
    at_origin = spec.loss_at == "origin"
    for route in routes:
        where = route.nodes[0] if at_origin else route.nodes[-1]
        loss = spec.loss_s.get(where, 0.0) if isinstance(spec.loss_s, Mapping) else spec.loss_s
        steps.append(_chain(route, index, send_step, forward, ratio, float(loss), at_origin))
    return _Plan(nodes, limits, pairs, steps, [r.microbatch for r in routes])


# ---------------------------------------------------------------- event loop


class _Run:
    """Mutable state of one simulation; ``run`` advances it to the end."""

    def __init__(self, plan: _Plan, record: bool) -> None:
        n = len(plan.nodes)
        self.plan = plan
        self.record = record
        self.events: list[tuple[float, int]] = []  # (time, mb): mb's current step ends
        self.ready: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # (class, mb)
        self.idle = [True] * n
        self.in_flight = [0] * n
        self.peak = [0] * n
        self.busy = [0.0] * n
        self.last_backward = [0.0] * n
        self.link_free = [0.0] * len(plan.pairs)
        self.link_uses = [0] * len(plan.pairs)
        self.position = [-1] * len(plan.steps)
        self.finished = 0
        self.end = 0.0
        self.timeline: list[Event] = []
        self.touched: set[int] = set()

    def advance(self, mb: int, now: float) -> None:
        """Microbatch ``mb`` finished its current step at ``now``; queue its next one."""
        chain = self.plan.steps[mb]
        pos = self.position[mb] + 1
        self.position[mb] = pos
        if pos == len(chain):
            self.finished += 1
            return
        kind, where, seconds, latency = chain[pos]
        if kind == _SEND:
            start = max(now, self.link_free[where])
            self.link_free[where] = start + seconds
            arrival = start + seconds + latency
            self.link_uses[where] += 1
            heapq.heappush(self.events, (arrival, mb))
            if self.record:
                src, dst = self.plan.pairs[where]
                self.timeline.append(Event("send", self.plan.microbatch_ids[mb], start, arrival,
                                           src, src, dst))
        else:
            heapq.heappush(self.ready[where], (kind == _FORWARD, mb))
            self.touched.add(where)

    def dispatch(self, node: int, now: float) -> None:
        """Start the best ready task on ``node`` if it is idle and memory allows."""
        queue = self.ready[node]
        if not self.idle[node] or not queue:
            return
        is_forward, mb = queue[0]
        if is_forward:
            if self.in_flight[node] >= self.plan.limits[node]:
                return
            self.in_flight[node] += 1
            self.peak[node] = max(self.peak[node], self.in_flight[node])
        heapq.heappop(queue)
        kind, _, seconds, _ = self.plan.steps[mb][self.position[mb]]
        self.idle[node] = False
        self.busy[node] += seconds
        heapq.heappush(self.events, (now + seconds, mb))
        if self.record:
            self.timeline.append(Event(_KIND_NAMES[kind], self.plan.microbatch_ids[mb], now,
                                       now + seconds, self.plan.nodes[node]))

    def finish_step(self, mb: int, now: float) -> None:
        """The event of ``mb`` fired at ``now``: free its node if it was computing."""
        kind, node, _, _ = self.plan.steps[mb][self.position[mb]]
        if kind != _SEND:
            self.idle[node] = True
            self.touched.add(node)
            if kind == _BACKWARD:
                self.in_flight[node] -= 1
                self.last_backward[node] = now
        self.advance(mb, now)

    def run(self) -> None:
        events = self.events
        for mb in range(len(self.plan.steps)):
            self.advance(mb, 0.0)
        now = 0.0
        while True:
            for node in self.touched:
                self.dispatch(node, now)
            self.touched.clear()
            if not events:
                break
            now = events[0][0]
            while events and events[0][0] == now:
                self.finish_step(heapq.heappop(events)[1], now)
        self.end = now
        if self.finished < len(self.plan.steps):
            raise ValueError(self.deadlock_message())

    def deadlock_message(self) -> str:
        plan = self.plan
        stuck = []
        for node, queue in enumerate(self.ready):
            for _, mb in sorted(queue):
                holders = sorted(
                    plan.microbatch_ids[other] for other in range(len(plan.steps))
                    if other != mb and self._holds(other, node)
                )
                stuck.append(f"microbatch {plan.microbatch_ids[mb]} waits to start its forward "
                             f"on node {plan.nodes[node]!r} (memory_limit "
                             f"{int(plan.limits[node])}, in flight there: microbatches "
                             f"{holders})")
        return "deadlock: memory limits make progress impossible: " + "; ".join(stuck)

    def _holds(self, mb: int, node: int) -> bool:
        """Whether ``mb`` has started its forward on ``node`` but not finished its backward."""
        done = self.plan.steps[mb][: self.position[mb]]  # nothing runs once deadlocked
        started = any(k == _FORWARD and w == node for k, w, _, _ in done)
        finished = any(k == _BACKWARD and w == node for k, w, _, _ in done)
        return started and not finished


def _tails(spec: PipelineSpec, run: _Run) -> float:
    """Record the tail events; return the latest tail end (0 if none)."""
    latest = 0.0
    for name, seconds in (spec.tail_s or {}).items():
        node = run.plan.nodes.index(name)
        start = run.last_backward[node]
        latest = max(latest, start + seconds)
        if run.record:
            run.timeline.append(Event("tail", None, start, start + seconds, name))
    return latest


def simulate(spec: PipelineSpec, *, record_timeline: bool = True) -> SimResult:
    """Simulate one iteration of ``spec``; raise ``ValueError`` on bad input or deadlock.

    With ``record_timeline=False`` the timeline is left empty (faster, for search loops).
    The timeline is sorted by start time; events that start at the same instant keep
    the order in which the simulation started them, so one microbatch's events are
    always in causal order, even those that take no time.
    """
    plan = _compile(spec)
    run = _Run(plan, record_timeline)
    run.run()
    iteration = max(run.end, _tails(spec, run))
    bytes_per_link = {pair: uses * float(spec.activation_bytes)
                      for pair, uses in zip(plan.pairs, run.link_uses, strict=True)}
    timeline = sorted(run.timeline, key=lambda e: e.start)
    return SimResult(
        iteration_s=iteration,
        busy_s=dict(zip(plan.nodes, run.busy, strict=True)),
        bytes_per_link=bytes_per_link,
        peak_in_flight=dict(zip(plan.nodes, run.peak, strict=True)),
        timeline=timeline,
    )
