"""The self-adapting layer partition: how many layers each pipeline stage holds.

Holmes (arXiv 2312.03549) gives faster stages more layers but has the split typed in
by hand; here it is solved. Given the stages in pipeline order, each with

    seconds_per_layer  forward + backward seconds of one layer for one microbatch on
                       the stage's slowest device
    fixed_seconds      extra seconds per microbatch (embedding at the first stage,
                       head + loss where the head is, send/receive if the caller wants)
    bytes_per_layer, fixed_bytes, capacity_bytes
                       memory of `x` layers is fixed_bytes + x * bytes_per_layer and
                       must fit capacity_bytes (the stage's smallest device)

`partition_layers` chooses integer layers x_i (>= 1, or >= 0 with `allow_empty`),
sum x_i = L, minimising the slowest stage max_i (fixed_seconds_i + x_i *
seconds_per_layer_i). The default solver is an integer program in pulp (CBC, one
thread, messages off, zero gap), with times scaled to O(1) for the solver and the
answer re-evaluated exactly. For more than `ILP_MAX_STAGES` stages it uses an exact
greedy instead: give each of the layers left after the minimums, one at a time, to
the stage whose time after taking it is smallest (ties to the later stage). As
every stage's time is increasing in its layers, the greedy takes the R smallest of
all candidate stage times and is optimal; the ILP is kept as the default because it
extends to coupled constraints. Among the partitions that reach the optimum, a second
pass of the ILP picks the most balanced one (least sum of squared stage times, ties
to later stages). The greedy also checks the ILP: if the solver, within its
tolerances, returns a worse bottleneck than the greedy's, the greedy's partition is
used (`Partition.method` says which), as it is when CBC reports no optimum within its time limit
(`ILP_TIME_LIMIT_S`, a safety net: up to 64 stages and 1000 layers it takes < 0.2 s,
while 128 stages can take seconds, hence the greedy there). Both are deterministic.

When the model cannot fit, `InputError` names the tightest stage, its device and the
shortfall in GiB: the memory that stage lacks even at its minimum layer count, or,
when every stage fits its minimum but together they lack room, the least extra
memory in all (exact: each stage's extra memory is convex in its extra layers) and
the least on one stage that would make the model fit.
"""

from __future__ import annotations

import heapq
import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pulp

from topology.errors import InputError

ILP_MAX_STAGES = 64
ILP_TIME_LIMIT_S = 10.0
TIE_BREAK = 1e-6
GIB = 1024**3
Method = Literal["auto", "ilp", "greedy"]


@dataclass(frozen=True)
class StageCost:
    """What the partition knows about one pipeline stage (seconds, bytes)."""

    device: str
    seconds_per_layer: float
    capacity_bytes: float
    bytes_per_layer: float = 0.0
    fixed_seconds: float = 0.0
    fixed_bytes: float = 0.0

    def __post_init__(self) -> None:
        numbers = {
            "seconds_per_layer": self.seconds_per_layer,
            "capacity_bytes": self.capacity_bytes,
            "bytes_per_layer": self.bytes_per_layer,
            "fixed_seconds": self.fixed_seconds,
            "fixed_bytes": self.fixed_bytes,
        }
        for name, value in numbers.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"StageCost {self.device}: {name} must be >= 0, got {value}")

    def seconds(self, layers: int) -> float:
        return self.fixed_seconds + layers * self.seconds_per_layer

    def bytes(self, layers: int) -> float:
        return self.fixed_bytes + layers * self.bytes_per_layer

    def max_layers(self, total_layers: int) -> int:
        """Most layers that fit in memory (capped at `total_layers`; -1: none, not even 0)."""
        room = self.capacity_bytes - self.fixed_bytes
        if room < 0:
            return -1
        if self.bytes_per_layer == 0:
            return total_layers
        return min(total_layers, math.floor(room / self.bytes_per_layer * (1 + 1e-12)))


@dataclass(frozen=True)
class Partition:
    """Layers per stage in pipeline order, each stage's seconds and the slowest."""

    layers: tuple[int, ...]
    stage_seconds: tuple[float, ...]
    bottleneck_s: float
    method: str

    def ranges(self) -> list[tuple[int, int]]:
        """Each stage's layers as [start, end)."""
        bounds, start = [], 0
        for count in self.layers:
            bounds.append((start, start + count))
            start += count
        return bounds


def partition_layers(
    stages: Sequence[StageCost],
    total_layers: int,
    *,
    allow_empty: bool = False,
    model_name: str = "the model",
    method: Method = "auto",
) -> Partition:
    """Integer layers per stage minimising the slowest stage, within memory; see module doc."""
    if not stages:
        raise ValueError("partition_layers needs at least one stage")
    if total_layers < 1:
        raise ValueError(f"total_layers must be >= 1, got {total_layers}")
    minimum = 0 if allow_empty else 1
    if len(stages) * minimum > total_layers:
        raise InputError(
            f"{model_name} has {total_layers} layers, too few for {len(stages)} pipeline "
            "stages of at least one layer each"
        )
    upper = [stage.max_layers(total_layers) for stage in stages]
    _require_fit(stages, upper, minimum, total_layers, model_name)
    use_ilp = method == "ilp" or (method == "auto" and len(stages) <= ILP_MAX_STAGES)
    layers = _solve_ilp(stages, upper, minimum, total_layers) if use_ilp else None
    greedy = _solve_greedy(stages, upper, minimum, total_layers)
    if layers is None or _bottleneck(stages, layers) > _bottleneck(stages, greedy) * (1 + 1e-9):
        layers, name = greedy, "greedy"
    else:
        name = "ilp"
    seconds = tuple(stage.seconds(x) for stage, x in zip(stages, layers, strict=True))
    return Partition(tuple(layers), seconds, max(seconds), name)


def _bottleneck(stages: Sequence[StageCost], layers: Sequence[int]) -> float:
    return max(stage.seconds(x) for stage, x in zip(stages, layers, strict=True))


# --- solvers --------------------------------------------------------------------------


def _solve_greedy(
    stages: Sequence[StageCost], upper: list[int], minimum: int, total_layers: int
) -> list[int]:
    layers = [minimum] * len(stages)
    heap = [
        (stage.seconds(minimum + 1), -i) for i, stage in enumerate(stages) if upper[i] > minimum
    ]
    heapq.heapify(heap)
    for _ in range(total_layers - minimum * len(stages)):
        _, negative_index = heapq.heappop(heap)
        i = -negative_index
        layers[i] += 1
        if layers[i] < upper[i]:
            heapq.heappush(heap, (stages[i].seconds(layers[i] + 1), -i))
    return layers


def _solve_ilp(
    stages: Sequence[StageCost], upper: list[int], minimum: int, total_layers: int
) -> list[int] | None:
    """Min-max ILP, then a balancing pass at that optimum; None if CBC finds no optimum."""
    layers = _ilp_min_bottleneck(stages, upper, minimum, total_layers)
    if layers is None:
        return None
    bottleneck = _bottleneck(stages, layers)
    capped = [
        min(cap, _layers_within(stage, bottleneck))
        for stage, cap in zip(stages, upper, strict=True)
    ]
    return _ilp_balance(stages, capped, minimum, total_layers) or layers


def _ilp_min_bottleneck(
    stages: Sequence[StageCost], upper: list[int], minimum: int, total_layers: int
) -> list[int] | None:
    """min T s.t. T >= fixed_i + per_layer_i * x_i, sum x_i = L, minimum <= x_i <= upper_i."""
    scale = _time_scale(stages)
    problem = pulp.LpProblem("layer_partition", pulp.LpMinimize)
    slowest = problem.add_variable("slowest", lowBound=0)
    counts = [
        problem.add_variable(f"layers_{i}", lowBound=minimum, upBound=cap, cat=pulp.LpInteger)
        for i, cap in enumerate(upper)
    ]
    problem += slowest
    problem += pulp.lpSum(counts) == total_layers
    for i, (stage, count) in enumerate(zip(stages, counts, strict=True)):
        per_layer, fixed = stage.seconds_per_layer / scale, stage.fixed_seconds / scale
        problem += slowest >= fixed + per_layer * count, f"stage_{i}"
    return _solve(problem, counts, upper, minimum, total_layers)


def _ilp_balance(
    stages: Sequence[StageCost], upper: list[int], minimum: int, total_layers: int
) -> list[int] | None:
    """Among partitions with every stage within the optimum, minimise sum of squared times.

    Each layer above the minimum is a binary with its marginal cost T(x)^2 - T(x-1)^2;
    the marginals increase with x, so the relaxation takes them in order and stays integral.
    Ties go to later stages (a tiny extra cost on earlier ones): under 1F1B they hold
    fewer microbatches in flight. The bounds keep every stage within the optimum.
    """
    scale = _time_scale(stages)
    problem = pulp.LpProblem("layer_balance", pulp.LpMinimize)
    steps: list[list[pulp.LpVariable]] = []
    cost = []
    for i, stage in enumerate(stages):
        row = [
            problem.add_variable(f"step_{i}_{x}", cat=pulp.LpBinary)
            for x in range(minimum + 1, upper[i] + 1)
        ]
        steps.append(row)
        tie_break = TIE_BREAK * (len(stages) - i) / len(stages)
        for x, var in enumerate(row, start=minimum + 1):
            marginal = _squared(stage, x, scale) - _squared(stage, x - 1, scale)
            cost.append((marginal + tie_break) * var)
    problem += pulp.lpSum(cost)
    counts = [minimum + pulp.lpSum(row) for row in steps]
    problem += pulp.lpSum(counts) == total_layers
    for row in steps:
        for earlier, later in itertools.pairwise(row):
            problem += earlier >= later
    return _solve(problem, counts, upper, minimum, total_layers)


def _solve(
    problem: pulp.LpProblem, counts: list[Any], upper: list[int], minimum: int, total_layers: int
) -> list[int] | None:
    if pulp.LpStatus[problem.solve(_cbc())] != "Optimal":
        return None
    layers = [int(round(pulp.value(count))) for count in counts]
    valid = sum(layers) == total_layers and all(
        minimum <= x <= cap for x, cap in zip(layers, upper, strict=True)
    )
    return layers if valid else None


def _cbc() -> pulp.LpSolver:
    """CBC, one thread, zero gap, quiet: PuLP's bundled binary, else a `cbc` on PATH."""
    options: dict[str, Any] = {
        "msg": False,
        "threads": 1,
        "gapRel": 0.0,
        "gapAbs": 0.0,
        "timeLimit": ILP_TIME_LIMIT_S,
    }
    bundled = getattr(pulp, "PULP_CBC_CMD", None)
    if bundled is not None:
        with warnings.catch_warnings():  # deprecated for PuLP 4.0, still the bundled CBC
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = bundled(**options)
        if solver.available():
            return solver
    return pulp.COIN_CMD(**options)


def _time_scale(stages: Sequence[StageCost]) -> float:
    """A time unit that makes the solver's coefficients O(1): the largest per-layer time."""
    per_layer = max(s.seconds_per_layer for s in stages)
    fixed = max(s.fixed_seconds for s in stages)
    return per_layer if per_layer > 0 else (fixed if fixed > 0 else 1.0)


def _squared(stage: StageCost, layers: int, scale: float) -> float:
    return (stage.seconds(layers) / scale) ** 2


def _layers_within(stage: StageCost, seconds: float) -> int:
    """Most layers the stage can take and stay within `seconds` (relative tolerance 1e-9)."""
    if stage.seconds_per_layer == 0:
        return 10**9
    room = seconds * (1 + 1e-9) - stage.fixed_seconds
    return max(0, math.floor(room / stage.seconds_per_layer))


# --- infeasibility --------------------------------------------------------------------


def _require_fit(
    stages: Sequence[StageCost], upper: list[int], minimum: int, total_layers: int, model: str
) -> None:
    short = [(stage.bytes(minimum) - stage.capacity_bytes, i) for i, stage in enumerate(stages)]
    short = [(gap, i) for gap, i in short if upper[i] < minimum]
    if short:
        gap, i = max(short)
        others = f" ({len(short) - 1} more stages fall short)" if len(short) > 1 else ""
        noun = "layer" if minimum == 1 else "layers"
        raise InputError(
            f"{model} does not fit: stage {i} ({_describe(stages[i])}) needs "
            f"{_gib(gap)} GiB more even with {minimum} {noun}{others}"
        )
    deficit = total_layers - sum(upper)
    if deficit > 0:
        raise InputError(_aggregate_shortfall(stages, upper, deficit, total_layers, model))


def _aggregate_shortfall(
    stages: Sequence[StageCost], upper: list[int], deficit: int, total_layers: int, model: str
) -> str:
    slack = [s.capacity_bytes - s.bytes(x) for s, x in zip(stages, upper, strict=True)]
    single = min((deficit * s.bytes_per_layer - slack[i], i) for i, s in enumerate(stages))
    total = _least_extra_bytes(stages, slack, deficit)
    i = single[1]
    return (
        f"{model} does not fit: the {len(stages)} stages have room for "
        f"{total_layers - deficit} of its {total_layers} layers and need {_gib(total)} GiB "
        f"more in all; on one stage: stage {i} ({_describe(stages[i])}) needs "
        f"{_gib(single[0])} GiB more to take the other {deficit}"
    )


def _least_extra_bytes(stages: Sequence[StageCost], slack: list[float], deficit: int) -> float:
    """Least total extra memory to place `deficit` more layers (greedy on convex costs)."""
    heap = [(s.bytes_per_layer - slack[i], i) for i, s in enumerate(stages)]
    heapq.heapify(heap)
    total = 0.0
    for _ in range(deficit):
        cost, i = heapq.heappop(heap)
        total += cost
        heapq.heappush(heap, (stages[i].bytes_per_layer, i))
    return total


def _describe(stage: StageCost) -> str:
    return f"device {stage.device}, {stage.capacity_bytes / 1e9:.4g} GB"


def _gib(nbytes: float) -> str:
    value = nbytes / GIB
    return f"{value:.1f}" if value >= 0.1 else f"{value:.2g}"
