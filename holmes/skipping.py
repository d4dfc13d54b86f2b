"""Skip/reorder paths for a planned layout: from an `Estimate` to SkipPipe routes.

This module owns the bridge between the planner and `skippipe.paths`: it turns one
replica of an estimate (its devices, layer split, links, memory caps and all-reduce
tails) into a plain `PathProblem`, schedules collision-aware routes for every replica,
and re-estimates the layout with those routes. Skipping needs the head and loss at the
origin (a partial route ends where it began), so a layout with the head on its last
stage is moved to `loss_at="origin"` and its layers are split again first.

The route search simulates the replica's whole step once per iteration, so its time
grows with iterations x microbatches; the iterations are cut to SEARCH_BUDGET simulated
microbatches per replica (never below MIN_ITERATIONS), which keeps planning at the
largest allowed batch (4096 microbatches) to seconds and leaves steps of up to 64
microbatches per replica the full search.

A one-pipeline layout (the geo regime) first has its placement refined for skip routes
(`refine_for_skipping`): its placement was refined for full-pipeline routes, but a skip
route visits one node of only some stages, so nodes near the origins pay off more.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

from holmes.estimate import (
    Context,
    Estimate,
    assumed_in_flight,
    estimate,
    layout_specs,
    partition_for,
)
from holmes.partition import Partition
from holmes.placement import Layout
from skippipe.paths import PathProblem, PathSchedule, schedule_paths, starting_schedule_s

DEFAULT_MAX_SWAPS = 2
SEARCH_BUDGET = 96_000
MIN_ITERATIONS = 20
MIN_PLACEMENT_ROUNDS = 5
START_DRAFTS = 3  # schedules a quick placement score simulates (the route search's starts)


@dataclass(frozen=True)
class SkipChoice:
    """The user's skipping request: ratio k in [0, 1), swaps, search seed and effort."""

    ratio: float = 0.0
    max_swaps: int | None = None  # None: the user left it; DEFAULT_MAX_SWAPS where allowed
    seed: int = 0
    iterations: int = 1500
    placement_rounds: int = 200  # node swaps tried for skip routes (one-pipeline layouts)

    def swaps(self, stages: int) -> int:
        """The swaps asked for; left unset, DEFAULT_MAX_SWAPS or the most `stages` allow
        (a route can swap at most its non-first stages)."""
        if self.max_swaps is not None:
            return self.max_swaps
        return min(DEFAULT_MAX_SWAPS, max(0, stages - 1))

    def fitted(self, stages: int) -> tuple[SkipChoice, str | None]:
        """This choice with its swaps fixed for a `stages`-stage pipeline, and a note when
        an unset --max-swaps was lowered below its default."""
        swaps = self.swaps(stages)
        note = None
        if self.max_swaps is None and swaps < DEFAULT_MAX_SWAPS:
            note = (f"--max-swaps left unset: {swaps}, the most a {stages}-stage pipeline "
                    f"allows (default {DEFAULT_MAX_SWAPS})")
        return replace(self, max_swaps=swaps), note


def skips_a_stage(stages: int, ratio: float) -> bool:
    """Whether skip ratio `ratio` makes routes of a `stages`-stage pipeline skip anything:
    each visits round((1 - k) (S - 1)) of the S - 1 non-first stages
    (`skippipe.paths.PathProblem.visits_per_route`)."""
    return stages >= 2 and round((1.0 - ratio) * (stages - 1)) < stages - 1


def with_origin_loss(est: Estimate, ctx: Context) -> Estimate:
    """`est` with the head at the origin (re-partitioned and re-estimated if needed)."""
    if est.layout.loss_at == "origin":
        return est
    layout = replace(est.layout, loss_at="origin",
                     description=f"{est.layout.description}, head at the origin")
    return estimate(layout, partition_for(layout, ctx), ctx, est.sync)


def path_problems(est: Estimate, ctx: Context, choice: SkipChoice,
                  caps: Mapping[str, int] | None = None) -> list[PathProblem]:
    """One `PathProblem` per replica of `est` (whose loss must be at the origin); each
    device may hold `caps[device]` microbatches (default: as many as its memory allows,
    `memory_in_flight`, or the cost assumptions' number)."""
    return layout_problems(est.layout, est.partition, est.sync, ctx, choice, caps)


def layout_problems(layout: Layout, partition: Partition, sync: str, ctx: Context,
                    choice: SkipChoice, caps: Mapping[str, int] | None = None
                    ) -> list[PathProblem]:
    """`path_problems` of a layout not yet estimated."""
    problems = []
    caps = caps if caps is not None else assumed_in_flight(layout, partition, ctx, True)
    specs = layout_specs(layout, partition, sync, ctx, caps)
    for stages, spec in zip(layout.replicas, specs, strict=True):
        origins = {d: [r.microbatch for r in spec.routes if r.nodes[0] == d]
                   for d in stages[0]}
        problems.append(PathProblem(
            stages=stages, microbatches={d: ids for d, ids in origins.items() if ids},
            forward_s=spec.forward_s, activation_bytes=spec.activation_bytes,
            latency_s=spec.latency_s, bandwidth_Bps=spec.bandwidth_Bps,
            skip_ratio=choice.ratio, max_swaps=choice.swaps(len(stages)),
            memory_limit=spec.memory_limit, backward_ratio=spec.backward_ratio,
            loss_s=spec.loss_s, tail_s=spec.tail_s))
    return problems


def refine_for_skipping(est: Estimate, ctx: Context, choice: SkipChoice, rounds: int,
                        seed: int = 0) -> Estimate:
    """A one-pipeline layout's placement refined for skip routes: swap two nodes of
    different stages and keep the swap when the route search's starting schedule (its
    collision-aware drafts, scored by the simulator, no annealing:
    `skippipe.paths.starting_schedule_s`) gets faster. The
    full-pipeline refinement ranks placements for routes through every stage; a skip
    route visits one node of only some stages, so its best placement differs (each
    origin wants a near node in every stage). Layers, memory caps and sync are kept."""
    layout = est.layout
    if len(layout.replicas) != 1 or not skips_a_stage(layout.stages, choice.ratio):
        return est
    rng = random.Random(seed)

    def quick(trial: Layout) -> float:
        return starting_schedule_s(layout_problems(trial, est.partition, est.sync, ctx,
                                                   choice)[0])

    best, best_s, kept = layout, quick(layout), 0
    for _ in range(rounds):
        stages = [list(stage) for stage in best.replicas[0]]
        i, j = rng.sample(range(len(stages)), 2)
        a, b = rng.randrange(len(stages[i])), rng.randrange(len(stages[j]))
        stages[i][a], stages[j][b] = stages[j][b], stages[i][a]
        trial = replace(best, replicas=(tuple(tuple(s) for s in stages),))
        seconds = quick(trial)
        if seconds < best_s:
            best, best_s, kept = trial, seconds, kept + 1
    if best is layout:
        return est
    description = f"{layout.description}, refined for skip routes ({kept} swaps kept)"
    return estimate(replace(best, description=description), est.partition, ctx, est.sync)


def search_iterations(choice: SkipChoice, problem: PathProblem) -> int:
    """The route search's iterations for `problem`: the choice's, within the budget."""
    microbatches = sum(len(ids) for ids in problem.microbatches.values())
    return min(choice.iterations, max(MIN_ITERATIONS, SEARCH_BUDGET // max(1, microbatches)))


def placement_rounds(choice: SkipChoice, est: Estimate, ctx: Context) -> int:
    """Swaps `refine_for_skipping` tries: the choice's, within SEARCH_BUDGET simulated
    microbatches (each try simulates START_DRAFTS schedules; never below MIN_PLACEMENT_ROUNDS)."""
    microbatches = ctx.config.training.microbatches
    budget = SEARCH_BUDGET // (START_DRAFTS * max(1, microbatches))
    return min(choice.placement_rounds, max(MIN_PLACEMENT_ROUNDS, budget))


@dataclass
class Skipped:
    """A layout with skip routes, the same layout with full routes (same layers and
    memory caps, the baseline), and the schedules that made the routes."""

    estimate: Estimate
    full_pipeline: Estimate
    schedules: list[PathSchedule]


def skip_estimate(est: Estimate, ctx: Context, choice: SkipChoice) -> Skipped:
    """`est` re-estimated with collision-aware skip routes in every replica."""
    base = with_origin_loss(est, ctx)
    base = refine_for_skipping(base, ctx, choice, placement_rounds(choice, base, ctx))
    caps = assumed_in_flight(base.layout, base.partition, ctx, skipping=True)
    schedules = [schedule_paths(problem, seed=choice.seed,
                                iterations=search_iterations(choice, problem))
                 for problem in path_problems(base, ctx, choice, caps)]
    routes = [schedule.routes for schedule in schedules]
    description = (f"{base.layout.description}; skip ratio {choice.ratio:g}, "
                   f"at most {choice.swaps(base.layout.stages)} swaps")
    layout = replace(base.layout, description=description)
    return Skipped(
        estimate=estimate(layout, base.partition, ctx, base.sync, routes=routes,
                          in_flight=caps),
        full_pipeline=estimate(base.layout, base.partition, ctx, base.sync, in_flight=caps),
        schedules=schedules)
