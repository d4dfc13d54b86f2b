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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from holmes.estimate import (
    Context,
    Estimate,
    assumed_in_flight,
    estimate,
    full_pipeline_specs,
    partition_for,
)
from skippipe.paths import PathProblem, PathSchedule, schedule_paths

DEFAULT_MAX_SWAPS = 2
SEARCH_BUDGET = 96_000
MIN_ITERATIONS = 20


@dataclass(frozen=True)
class SkipChoice:
    """The user's skipping request: ratio k in [0, 1), swaps, search seed and effort."""

    ratio: float = 0.0
    max_swaps: int | None = None  # None: the user left it; DEFAULT_MAX_SWAPS where allowed
    seed: int = 0
    iterations: int = 1500

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
    problems = []
    caps = caps if caps is not None else assumed_in_flight(est.layout, est.partition, ctx, True)
    specs = full_pipeline_specs(est, ctx, caps)
    for stages, spec in zip(est.layout.replicas, specs, strict=True):
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


def search_iterations(choice: SkipChoice, problem: PathProblem) -> int:
    """The route search's iterations for `problem`: the choice's, within the budget."""
    microbatches = sum(len(ids) for ids in problem.microbatches.values())
    return min(choice.iterations, max(MIN_ITERATIONS, SEARCH_BUDGET // max(1, microbatches)))


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
