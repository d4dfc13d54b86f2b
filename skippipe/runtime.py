"""The pipeline runtime: executes skip/reorder routes with ``torch.distributed`` P2P.

This module owns the execution of one pipeline-parallel training iteration on real
processes (gloo on CPU, NCCL on GPU), given the same plain inputs as the simulator
(``skippipe.simulate``): stage -> nodes lists, a block range per stage, one ``Route``
per microbatch, and node -> global rank. It imports torch and ``skippipe.simulate``
only.

**The model contract** (``SkippableModel``). A model is an ``nn.Module`` with

* ``embed(idx) -> h``: the input layer (token + position embedding), run at the origin;
* ``blocks``: an ``nn.ModuleList`` of residual, shape-preserving blocks ``h -> h``; any
  of them may be skipped and contiguous ranges of them may run in any order;
* ``head_loss(h, targets) -> loss``: final norm, head and a scalar loss, run at the origin.

A tiny GPT satisfies it with two extra methods (``bench/tinygpt.py``'s ``TinyGPT`` is the
full version)::

    class TinyGPT(nn.Module):
        def __init__(self, vocab: int = 256, width: int = 64, depth: int = 8, seq: int = 64):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq, width)
            self.blocks = nn.ModuleList(Block(width) for _ in range(depth))  # x + f(x)
            self.ln_f, self.lm_head = nn.LayerNorm(width), nn.Linear(width, vocab)

        def embed(self, idx: Tensor) -> Tensor:
            return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))

        def head_loss(self, h: Tensor, targets: Tensor) -> Tensor:
            logits = self.lm_head(self.ln_f(h))
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

**Semantics** (those of ``skippipe.simulate``). Stage ``s`` holds blocks
``layers[s] = (start, end)``; every node of stage ``s`` holds a replica of them, and the
nodes of stage 0 also hold the embedding and the head. A route ``(o, n1, ..., nk)`` of
distinct nodes starts at its origin ``o`` (a stage-0 node): ``o`` embeds the
microbatch and runs its stage-0 blocks, then ``n1`` ... ``nk`` run their blocks in route
order (stages may be skipped or visited out of order), the output of ``nk`` goes back to
``o``, which runs ``head_loss`` and its backward, and the gradient travels back along
the reversed route, ending with stage 0's blocks and the embedding at ``o``.

**Order of work.** ``PipelineSchedule`` runs the simulator (unit costs unless
``forward_s`` is given) and reads each node's compute tasks off the timeline, so every
rank executes a simulated 1F1B-style order, which respects ``memory_limit`` (at most
that many microbatches between their forward and backward on a node). The simulator's
greedy choices are not always the fastest order: with the head at the origin, an origin
busy with forwards makes every loss wait (4 stages x 8 microbatches: 38 time units where
an order that paces the forwards takes 34). So it is run for a few candidates, in-flight
caps of ``stages - s + slack`` per stage-s node (within ``memory_limit``) and a guessed
head + loss cost, and each candidate order is replayed (every node runs its order,
waiting for each input) for head + loss costs of 0 to 1 forward; the order kept is the
one whose worst ratio to the best replay is least (the plain order on ties). A rank runs
its tasks one by one and blocks only to receive an input; sends are asynchronous.
Executing every node's tasks in a simulated order cannot deadlock: a simulated timeline
is a valid order of all tasks.

**Messages.** Each hop carries one tensor of the activation shape: activations forward
(including the last node's output back to the origin) and gradients backward. Every
message has a distinct tag per (microbatch, direction); in addition a receiver takes
the messages of each sender in the order the sender sends them (stashing early ones),
so matching also holds on backends that ignore tags (NCCL). Each loss is scaled by
``1 / len(routes)``, so the gradients are those of the mean loss over the iteration.
A hop's messages go over the process group ``p2p_group(src, dst)`` gives (the default
group when none is given or it returns None), so a caller can put each hop on a
communicator of its own network; a pair always uses one group, which keeps its order.
P2P between ranks is tested on gloo only; on CUDA with NCCL only a one-rank plan has run
(the GPU machine lent for checks had one GPU). NCCL runs a pair's sends and receives in
order on one stream, so two nodes that both send large messages to each other before
receiving may stall there; ``batch_isend_irecv`` would be the fix if that shows up.

**Gradient sync.** With ``sync="stage"`` each stage's gradients are summed
(all-reduce) over that stage's nodes at the end of ``step``; with ``sync="none"`` they
are left for the caller (DiLoCo), who may call ``sync_gradients`` itself. Process groups
for every stage with more than one node are created in the constructor, in stage order,
by every rank.

Public names: ``SkippableModel``, ``forward_route``, ``Task``, ``Message``,
``PipelineSchedule``, ``PipelineRuntime``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from skippipe.simulate import PipelineSpec, Route, simulate

__all__ = [
    "Message",
    "PipelineRuntime",
    "PipelineSchedule",
    "Recorder",
    "SkippableModel",
    "Task",
    "forward_route",
]

TaskKind = Literal["forward", "loss", "backward"]
P2PGroup = Callable[[str, str], "dist.ProcessGroup | None"]
MessageKind = Literal["activation", "gradient"]
_TAG_OFFSET: dict[MessageKind, int] = {"activation": 0, "gradient": 1}


class Recorder(Protocol):
    """Where the runtime reports what it did (``holmes.runtime.timings.Timings`` is one):
    each compute task, each blocking receive and each send, with ``time.time()`` starts."""

    def task(self, kind: str, microbatch: int, start: float) -> None: ...

    def recv(self, peer: int, microbatch: int, kind: str, nbytes: int, start: float) -> None: ...

    def send(self, peer: int, microbatch: int, kind: str, nbytes: int) -> None: ...


class SkippableModel(Protocol):
    """What the runtime needs of a model (see the module docstring for an example)."""

    blocks: nn.ModuleList

    def embed(self, idx: Tensor) -> Tensor: ...

    def head_loss(self, h: Tensor, targets: Tensor) -> Tensor: ...


def forward_route(
    model: SkippableModel,
    block_ranges: Sequence[tuple[int, int]],
    idx: Tensor,
    targets: Tensor,
) -> Tensor:
    """The loss of one microbatch run in a single process along ``block_ranges``.

    ``block_ranges`` are the block ranges of the route's stages in visit order (see
    ``PipelineSchedule.block_ranges``); the whole model is ``[(0, len(model.blocks))]``.
    """
    h = model.embed(idx)
    for start, end in block_ranges:
        for block in model.blocks[start:end]:
            h = block(h)
    return model.head_loss(h, targets)


class Task(NamedTuple):
    """One compute task of a node: "forward", "loss" (origin only) or "backward"."""

    kind: TaskKind
    microbatch: int


class Message(NamedTuple):
    """One tensor that ``src`` sends to ``dst`` during an iteration."""

    src: str
    dst: str
    microbatch: int
    kind: MessageKind

    @property
    def tag(self) -> int:
        """Distinct per (microbatch, direction); a directed pair never repeats one."""
        return 2 * self.microbatch + _TAG_OFFSET[self.kind]


# ---------------------------------------------------------------- the schedule


@dataclass
class PipelineSchedule:
    """Who holds what, the route of every microbatch, and each node's task order.

    ``stages[s]`` lists the nodes of stage ``s``; ``layers[s] = (start, end)`` is its
    block range; ``ranks`` maps every node to its global rank. ``forward_s`` (seconds
    per forward per node; 1.0 when missing) and ``memory_limit`` (microbatches in
    flight per node) shape the order the simulator produces. Raises ``ValueError`` on
    an inconsistent schedule or when the memory limits deadlock.
    """

    stages: list[list[str]]
    layers: list[tuple[int, int]]
    routes: list[Route]
    ranks: dict[str, int]
    forward_s: dict[str, float] | None = None
    memory_limit: dict[str, int] | None = None
    stage_of: dict[str, int] = field(init=False)
    tasks: dict[str, list[Task]] = field(init=False)

    def __post_init__(self) -> None:
        self.stage_of = _stage_of(self.stages, self.layers)
        _check_ranks(self.ranks, self.stage_of)
        _check_routes(self.routes, self.stage_of)
        self.tasks = self._simulated_tasks()

    @property
    def nodes(self) -> list[str]:
        return list(self.stage_of)

    @property
    def num_blocks(self) -> int:
        return max(end for _, end in self.layers)

    def block_ranges(self, route: Route) -> list[tuple[int, int]]:
        """The block ranges ``route`` runs, in visit order (for ``forward_route``)."""
        return [self.layers[self.stage_of[node]] for node in route.nodes]

    def messages_from(self, node: str) -> list[Message]:
        """What ``node`` sends to other nodes in one iteration, in sending order."""
        routes = {r.microbatch: r for r in self.routes}
        sent = (_message_after(task, routes[task.microbatch], node) for task in self.tasks[node])
        return [m for m in sent if m is not None]

    def _simulated_tasks(self) -> dict[str, list[Task]]:
        for what, mapping in (("forward_s", self.forward_s), ("memory_limit", self.memory_limit)):
            for node in mapping or {}:
                if node not in self.stage_of:
                    raise ValueError(f"{what} names node {node!r}, which is in no stage")
        forward_s = {node: 1.0 for node in self.stage_of} | dict(self.forward_s or {})
        orders = [self._simulate(forward_s, self.memory_limit, 0.0)]  # raises on a deadlock
        for slack in _CAP_SLACK:
            caps = self._caps(slack)
            for loss in _LOSS_GUESSES:
                try:
                    order = self._simulate(forward_s, caps, loss)
                except ValueError:  # these caps deadlock the routes: not a candidate
                    continue
                if order not in orders:
                    orders.append(order)
        return _fastest_in_the_worst_case(orders, self.routes, forward_s)

    def _caps(self, slack: int) -> dict[str, int]:
        """In-flight caps of a 1F1B-style order: a stage-s node holds at most
        ``stages - s + slack`` microbatches, never more than ``memory_limit`` allows."""
        limit = self.memory_limit or {}
        stages = len(self.stages)
        return {node: min(limit.get(node, stages + slack), stages - stage + slack)
                for node, stage in self.stage_of.items()}

    def _simulate(self, forward_s: dict[str, float], memory_limit: Mapping[str, int] | None,
                  loss: float) -> dict[str, list[Task]]:
        spec = PipelineSpec(
            forward_s=forward_s,
            routes=self.routes,
            activation_bytes=0.0,
            latency_s=lambda src, dst: 0.0,
            bandwidth_Bps=lambda src, dst: 1.0,
            memory_limit=memory_limit,
            loss_s={r.nodes[0]: loss * forward_s[r.nodes[0]] for r in self.routes},
        )
        tasks: dict[str, list[Task]] = {node: [] for node in self.stage_of}
        for event in simulate(spec).timeline:
            if event.kind in ("forward", "loss", "backward") and event.microbatch is not None:
                tasks[event.node].append(Task(event.kind, event.microbatch))
        return tasks


# Candidate orders (see "Order of work" in the module docstring): in-flight caps of
# stages - s + slack per stage-s node, head + loss seconds guessed as these fractions of the
# origin's forward, judged over these true fractions.
_CAP_SLACK = (0, 1, 2, 3)
_LOSS_GUESSES = (0.0, 0.25, 1.0)
_LOSS_SCENARIOS = (0.0, 0.25, 0.5, 1.0)
_BACKWARD_RATIO = 2.0


def _fastest_in_the_worst_case(orders: list[dict[str, list[Task]]], routes: Sequence[Route],
                               forward_s: Mapping[str, float]) -> dict[str, list[Task]]:
    """The order whose replayed time is closest to the best one in every loss scenario
    (the worst ratio is smallest); ties go to the earlier candidate (the plain order)."""
    if len(orders) == 1:
        return orders[0]
    times = [[_replayed_seconds(order, routes, forward_s, loss) for loss in _LOSS_SCENARIOS]
             for order in orders]
    best = [min(column) for column in zip(*times, strict=True)]
    regret = [max(t / b for t, b in zip(row, best, strict=True)) for row in times]
    return orders[regret.index(min(regret))]


def _replayed_seconds(tasks: Mapping[str, list[Task]], routes: Sequence[Route],
                      forward_s: Mapping[str, float], loss: float) -> float:
    """How long the runtime takes when every node runs its tasks in ``tasks`` order and
    waits for each input (transfers free; a loss costs ``loss`` x the origin's forward);
    ``math.inf`` if the orders wait on each other forever."""
    by_mb = {r.microbatch: r for r in routes}
    done: dict[tuple[str, TaskKind, int], float] = {}
    clock = dict.fromkeys(tasks, 0.0)
    position = dict.fromkeys(tasks, 0)
    progress = True
    while progress:
        progress = False
        for node, order in tasks.items():
            while position[node] < len(order):
                task = order[position[node]]
                needs = _input_of(task, by_mb[task.microbatch], node)
                if needs is not None and needs not in done:
                    break
                cost = forward_s[node] * {"forward": 1.0, "loss": loss,
                                          "backward": _BACKWARD_RATIO}[task.kind]
                clock[node] = max(clock[node], done.get(needs, 0.0)) + cost
                done[(node, task.kind, task.microbatch)] = clock[node]
                position[node] += 1
                progress = True
    if any(position[node] < len(order) for node, order in tasks.items()):
        return math.inf
    return max(clock.values())


def _input_of(task: Task, route: Route, node: str) -> tuple[str, TaskKind, int] | None:
    """The task whose output ``task`` needs (None: the microbatch's own data)."""
    position, mb = route.nodes.index(node), task.microbatch
    if task.kind == "forward":
        return (route.nodes[position - 1], "forward", mb) if position else None
    if task.kind == "loss":
        return (route.nodes[-1], "forward", mb)
    if position == len(route.nodes) - 1:
        return (route.nodes[0], "loss", mb)
    return (route.nodes[position + 1], "backward", mb)


def _stage_of(stages: list[list[str]], layers: list[tuple[int, int]]) -> dict[str, int]:
    if not stages or any(not nodes for nodes in stages):
        raise ValueError("every stage needs at least one node")
    if len(layers) != len(stages):
        raise ValueError(f"{len(stages)} stages but {len(layers)} block ranges in layers")
    for s, (start, end) in enumerate(layers):
        if not 0 <= start <= end:
            raise ValueError(f"stage {s} has block range [{start}, {end}); need 0 <= start <= end")
    stage_of: dict[str, int] = {}
    for s, nodes in enumerate(stages):
        for node in nodes:
            if node in stage_of:
                raise ValueError(f"node {node!r} is in stage {stage_of[node]} and stage {s}")
            stage_of[node] = s
    return stage_of


def _check_ranks(ranks: Mapping[str, int], stage_of: Mapping[str, int]) -> None:
    for node in stage_of:
        if node not in ranks:
            raise ValueError(f"node {node!r} has no rank in ranks")
    for node, rank in ranks.items():
        if node not in stage_of:
            raise ValueError(f"ranks names node {node!r}, which is in no stage")
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank of node {node!r} must be an integer >= 0, got {rank!r}")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError("two nodes share a rank; each node needs its own process")


def _check_routes(routes: Sequence[Route], stage_of: Mapping[str, int]) -> None:
    if not routes:
        raise ValueError("no routes: give at least one microbatch route")
    seen: set[int] = set()
    for route in routes:
        mb = route.microbatch
        if not isinstance(mb, int) or mb < 0:
            raise ValueError(f"microbatch ids must be integers >= 0, got {mb!r}")
        if mb in seen:
            raise ValueError(f"microbatch {mb} has more than one route")
        seen.add(mb)
        if not route.nodes:
            raise ValueError(f"route of microbatch {mb} is empty")
        for node in route.nodes:
            if node not in stage_of:
                raise ValueError(
                    f"route of microbatch {mb} names node {node!r}, which is in no stage"
                )
        if stage_of[route.nodes[0]] != 0:
            raise ValueError(
                f"route of microbatch {mb} starts at {route.nodes[0]!r} "
                f"(stage {stage_of[route.nodes[0]]}); its origin must be in stage 0"
            )
        if len(set(route.nodes)) != len(route.nodes):
            raise ValueError(f"route of microbatch {mb} visits a node more than once")


def _next_node(route: Route, position: int) -> str:
    """Where the output of hop ``position`` goes: the next node, or back to the origin."""
    return route.nodes[position + 1] if position + 1 < len(route.nodes) else route.nodes[0]


def _message_after(task: Task, route: Route, node: str) -> Message | None:
    """The message ``node`` sends once ``task`` is done (None: none, or to itself)."""
    position = route.nodes.index(node)
    mb = task.microbatch
    if task.kind == "forward":
        message = Message(node, _next_node(route, position), mb, "activation")
    elif task.kind == "loss":
        message = Message(node, route.nodes[-1], mb, "gradient")
    elif position > 0:
        message = Message(node, route.nodes[position - 1], mb, "gradient")
    else:
        return None
    return message if message.dst != node else None


# ---------------------------------------------------------------- the runtime


class _Inbox:
    """Receives each sender's messages in that sender's order; stashes early arrivals."""

    def __init__(
        self,
        expected: Mapping[int, Sequence[Message]],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        groups: Mapping[int, dist.ProcessGroup | None],
        recorder: Recorder | None = None,
    ) -> None:
        self._recorder = recorder
        self._pending = {src: deque(messages) for src, messages in expected.items()}
        self._groups = groups
        self._stash: dict[tuple[int, str], Tensor] = {}
        self._shape, self._dtype, self._device = shape, dtype, device

    def receive(self, src_rank: int, microbatch: int, kind: MessageKind) -> Tensor:
        key = (microbatch, kind)
        if key in self._stash:
            return self._stash.pop(key)
        pending = self._pending[src_rank]
        while pending:
            message = pending.popleft()
            buffer = torch.empty(self._shape, dtype=self._dtype, device=self._device)
            start = time.time()
            dist.recv(buffer, src=src_rank, group=self._groups.get(src_rank), tag=message.tag)
            if self._recorder is not None:
                self._recorder.recv(src_rank, message.microbatch, message.kind,
                                    buffer.numel() * buffer.element_size(), start)
            if (message.microbatch, message.kind) == key:
                return buffer
            self._stash[(message.microbatch, message.kind)] = buffer
        raise RuntimeError(f"rank {src_rank} sends no {kind} of microbatch {microbatch} here")

    def check_drained(self) -> None:
        left = [src for src, pending in self._pending.items() if pending]
        if left or self._stash:
            raise RuntimeError(
                f"iteration ended with unreceived messages from ranks {left} "
                f"or unused ones {sorted(self._stash)}"
            )


@dataclass
class _Iteration:
    """Per-iteration state of one rank."""

    batches: dict[int, tuple[Tensor, Tensor]]
    inbox: _Inbox
    inputs: dict[int, Tensor | None] = field(default_factory=dict)
    outputs: dict[int, Tensor] = field(default_factory=dict)
    local: dict[tuple[int, MessageKind], Tensor] = field(default_factory=dict)
    sends: list[tuple[dist.Work, Tensor]] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)


class PipelineRuntime:
    """One rank's part of a pipeline: its stage's blocks (+ embedding and head at stage 0).

    ``model`` is the whole model built the same way on every rank (same seed); the
    runtime uses, and ``parameters()`` returns, only what this rank's stage holds: its
    blocks and, on stage-0 nodes, every parameter outside ``model.blocks``.
    ``activation_shape`` is the ``(batch, seq, hidden)`` shape of every microbatch's
    activations; ``dtype``/``device`` default to those of the model's first parameter.
    Given a ``device``, the runtime moves this rank's part of the model there (the other
    stages' blocks stay where they are).
    ``step`` adds into ``.grad`` as ``loss.backward()`` does: zero them between steps.
    ``bytes_sent`` counts the P2P payload bytes this rank handed over, per peer rank.
    ``stage_group`` is the group that sums this stage's gradients; by default the
    constructor makes one per stage, which needs every rank of the world to be in the
    schedule (a caller with several pipelines creates the groups itself and passes it).
    ``p2p_group(src, dst)`` names the group a hop's messages use (default: the world).
    ``recorder`` (default none) is told of every task, blocking receive and send.
    """

    def __init__(
        self,
        model: SkippableModel,
        schedule: PipelineSchedule,
        rank: int,
        *,
        activation_shape: Sequence[int],
        sync: Literal["stage", "none"] = "stage",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        stage_group: dist.ProcessGroup | None | Literal["create"] = "create",
        p2p_group: P2PGroup | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.recorder = recorder
        if sync not in ("stage", "none"):
            raise ValueError(f"sync must be 'stage' or 'none', got {sync!r}")
        nodes = [node for node, r in schedule.ranks.items() if r == rank]
        if not nodes:
            raise ValueError(f"rank {rank} holds no node of the schedule")
        _check_model(model, schedule)
        self.schedule, self.rank, self.node, self.sync = schedule, rank, nodes[0], sync
        self.stage = schedule.stage_of[self.node]
        start, end = schedule.layers[self.stage]
        self._model = model
        self._blocks = list(model.blocks[start:end])
        if device is not None:
            _move_owned(model, self._blocks, self.stage == 0, torch.device(device))
        self._named = _owned_parameters(model, self._blocks, holds_ends=self.stage == 0)
        first = next(iter(model.parameters()))
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.activation_shape = tuple(int(n) for n in activation_shape)
        self.bytes_sent: dict[int, int] = {}
        self._routes = {r.microbatch: r for r in schedule.routes}
        self._tasks = schedule.tasks[self.node]
        self._expected = self._expected_messages()
        group_of = p2p_group or (lambda src, dst: None)
        node_of = {r: node for node, r in schedule.ranks.items()}
        self._recv_groups = {rank: group_of(node_of[rank], self.node) for rank in self._expected}
        self._send_groups = {m.dst: group_of(self.node, m.dst)
                             for m in schedule.messages_from(self.node)}
        self._stage_group = (_stage_groups(schedule)[self.stage] if stage_group == "create"
                             else stage_group)

    # ---- what this rank holds

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters this rank trains, with their names in ``model``."""
        yield from self._named

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, parameter in self._named:
            yield parameter

    def origin_microbatches(self) -> list[int]:
        """The microbatches whose route starts here (``step`` needs their batches)."""
        return sorted(mb for mb, r in self._routes.items() if r.nodes[0] == self.node)

    # ---- one iteration

    def step(self, batches: Mapping[int, tuple[Tensor, Tensor]]) -> dict[int, float]:
        """Run one iteration; ``batches`` maps each origin microbatch to (idx, targets).

        Returns the (unscaled) loss of each microbatch that originates here. Every rank
        of the schedule must call ``step`` once per iteration.
        """
        mine = self.origin_microbatches()
        if sorted(batches) != mine:
            raise ValueError(
                f"rank {self.rank} needs batches for microbatches {mine}, got {sorted(batches)}"
            )
        on_device = {mb: (x.to(self.device), y.to(self.device)) for mb, (x, y) in batches.items()}
        inbox = _Inbox(self._expected, self.activation_shape, self.dtype, self.device,
                       self._recv_groups, self.recorder)
        state = _Iteration(on_device, inbox)
        run = {"forward": self._forward, "loss": self._loss, "backward": self._backward}
        for task in self._tasks:
            start = time.time()
            run[task.kind](task.microbatch, state)
            if self.recorder is not None:
                self.recorder.task(task.kind, task.microbatch, start)
        for work, _ in state.sends:
            work.wait()
        inbox.check_drained()
        if self.sync == "stage":
            self.sync_gradients()
        return state.losses

    def sync_gradients(self) -> None:
        """Sum this stage's gradients over the stage's nodes (every one of them calls it)."""
        if self._stage_group is None:
            return
        params = [p for _, p in self._named]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._stage_group)
        for param, summed in zip(params, flat.split([p.numel() for p in params]), strict=True):
            param.grad = summed.view_as(param)

    # ---- tasks

    def _forward(self, mb: int, state: _Iteration) -> None:
        route = self._routes[mb]
        position = route.nodes.index(self.node)
        if position == 0:
            x = None
            h = self._model.embed(state.batches[mb][0])
        else:
            x = self._receive(route.nodes[position - 1], mb, "activation", state)
            h = x.requires_grad_()
        for block in self._blocks:
            h = block(h)
        state.inputs[mb], state.outputs[mb] = x, h
        self._send(h.detach(), _next_node(route, position), mb, "activation", state)

    def _loss(self, mb: int, state: _Iteration) -> None:
        last = self._routes[mb].nodes[-1]
        h = self._receive(last, mb, "activation", state).requires_grad_()
        loss = self._model.head_loss(h, state.batches[mb][1])
        (loss / len(self._routes)).backward()
        state.losses[mb] = float(loss.detach())
        self._send(h.grad, last, mb, "gradient", state)

    def _backward(self, mb: int, state: _Iteration) -> None:
        route = self._routes[mb]
        position = route.nodes.index(self.node)
        grad = self._receive(_next_node(route, position), mb, "gradient", state)
        x, h = state.inputs.pop(mb), state.outputs.pop(mb)
        torch.autograd.backward(h, grad)
        if x is not None:
            self._send(x.grad, route.nodes[position - 1], mb, "gradient", state)

    # ---- messages

    def _send(
        self, tensor: Tensor | None, dst: str, mb: int, kind: MessageKind, state: _Iteration
    ) -> None:
        if tensor is None:
            raise RuntimeError(f"no {kind} to send for microbatch {mb}: is a block detached?")
        if dst == self.node:
            state.local[(mb, kind)] = tensor
            return
        payload = tensor.contiguous()
        dst_rank = self.schedule.ranks[dst]
        work = dist.isend(payload, dst=dst_rank, group=self._send_groups.get(dst),
                          tag=Message(self.node, dst, mb, kind).tag)
        state.sends.append((work, payload))
        nbytes = payload.numel() * payload.element_size()
        if self.recorder is not None:
            self.recorder.send(dst_rank, mb, kind, nbytes)
        self.bytes_sent[dst_rank] = self.bytes_sent.get(dst_rank, 0) + nbytes

    def _receive(self, src: str, mb: int, kind: MessageKind, state: _Iteration) -> Tensor:
        if src == self.node:
            return state.local.pop((mb, kind)).detach()
        return state.inbox.receive(self.schedule.ranks[src], mb, kind)

    def _expected_messages(self) -> dict[int, list[Message]]:
        expected = {}
        for node in self.schedule.nodes:
            incoming = [m for m in self.schedule.messages_from(node) if m.dst == self.node]
            if incoming:
                expected[self.schedule.ranks[node]] = incoming
        return expected


def _check_model(model: SkippableModel, schedule: PipelineSchedule) -> None:
    """Refuse a model that breaks the contract. Checked attribute by attribute: since
    Python 3.12 ``isinstance`` against a Protocol looks attributes up statically and so
    misses an ``nn.Module``'s submodules (``blocks``), which live in ``_modules``."""
    missing = [name for name in ("embed", "head_loss") if not callable(getattr(model, name, None))]
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        missing.append("blocks (an nn.ModuleList)")
    if not isinstance(model, nn.Module) or missing:
        raise TypeError("the model must be an nn.Module with embed, blocks and head_loss"
                        + (f"; it has no {', '.join(missing)}" if missing else ""))
    if schedule.num_blocks > len(model.blocks):
        raise ValueError(
            f"the schedule's layers reach block {schedule.num_blocks}, "
            f"but the model has {len(model.blocks)} blocks"
        )


def _move_owned(model: nn.Module, blocks: Sequence[nn.Module], holds_ends: bool,
                device: torch.device) -> None:
    """Put this rank's blocks on ``device``, and at stage 0 everything outside the blocks."""
    for block in blocks:
        block.to(device)
    if not holds_ends:
        return
    for child in model.children():
        if child is not model.blocks:
            child.to(device)
    for param in model.parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buffer in model.named_buffers(recurse=False):
        setattr(model, name, buffer.to(device))


def _owned_parameters(
    model: nn.Module, blocks: Sequence[nn.Module], holds_ends: bool
) -> list[tuple[str, nn.Parameter]]:
    """This rank's parameters: its blocks', plus everything outside the blocks at stage 0."""
    in_blocks = {id(p) for p in model.blocks.parameters()}
    mine = {id(p) for block in blocks for p in block.parameters()}
    return [
        (name, p)
        for name, p in model.named_parameters()
        if id(p) in mine or (holds_ends and id(p) not in in_blocks)
    ]


def _stage_groups(schedule: PipelineSchedule) -> list[dist.ProcessGroup | None]:
    """One process group per stage with more than one node (all ranks call new_group)."""
    groups: list[dist.ProcessGroup | None] = []
    for nodes in schedule.stages:
        ranks = sorted(schedule.ranks[node] for node in nodes)
        groups.append(dist.new_group(ranks) if len(ranks) > 1 else None)
    return groups
