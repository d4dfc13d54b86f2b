"""Skip routes on the geo examples built from SkipPipe's region figures (geo5x4, geo6x4):
every route rule holds on the planner's own layouts (hypothesis), the placement refined for
skip routes never scores worse than the one it started from, and `data_parallel: ignored`
drops exactly the data-parallel all-reduce."""

from __future__ import annotations

import functools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_skippipe_paths import assert_valid

from holmes.assumptions import CostAssumptions, load_costs
from holmes.estimate import Estimate, estimate
from holmes.model import load_model
from holmes.planner import Decision, PlanOptions, decide
from holmes.skipping import SkipChoice, layout_problems, refine_for_skipping, with_origin_loss
from skippipe.paths import check_routes, schedule_paths, starting_schedule_s
from topology.schema import load_topology

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL = "skippipe-llama-24l"


@functools.cache
def planned(example: str, stages: int, profile: str = "skippipe") -> Decision:
    """The geo planner's layout of `example` at `stages` (a short refinement)."""
    return decide(load_topology(EXAMPLES / example / "topology.yaml"), load_model(MODEL),
                  PlanOptions(regime="geo", stages=stages, refine_rounds=5,
                              costs=load_costs(profile), nccl_net="per-communicator"))


def origin_layout(example: str, stages: int) -> tuple[Estimate, Decision]:
    decision = planned(example, stages)
    return with_origin_loss(decision.chosen, decision.context), decision


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["geo5x4", "geo6x4"]), st.integers(3, 6),
       st.sampled_from([0.0, 0.25, 1 / 3, 0.5, 0.75]), st.integers(0, 2), st.integers(0, 3))
def test_every_route_rule_holds_on_the_geo_examples(example: str, stages: int, k: float,
                                                    swaps: int, seed: int) -> None:
    est, decision = origin_layout(example, stages)
    choice = SkipChoice(ratio=k, max_swaps=min(swaps, stages - 1), seed=seed)
    problem = layout_problems(est.layout, est.partition, est.sync, decision.context,
                              choice)[0]
    schedule = schedule_paths(problem, seed=seed, iterations=30)
    assert_valid(problem, schedule.routes)
    check_routes(problem, schedule.routes)


def quick_s(est: Estimate, decision: Decision, choice: SkipChoice) -> float:
    problem = layout_problems(est.layout, est.partition, est.sync, decision.context,
                              choice)[0]
    quick = starting_schedule_s(problem)
    assert quick == schedule_paths(problem, seed=choice.seed, iterations=0).iteration_s
    return quick


def test_the_skip_placement_refinement_never_scores_worse() -> None:
    est, decision = origin_layout("geo6x4", 5)
    choice = SkipChoice(ratio=1 / 3).fitted(5)[0]
    refined = refine_for_skipping(est, decision.context, choice, rounds=15)
    assert quick_s(refined, decision, choice) <= quick_s(est, decision, choice)
    assert refined.partition == est.partition
    assert sorted(refined.layout.devices()) == sorted(est.layout.devices())
    assert [len(s) for s in refined.layout.replicas[0]] == \
        [len(s) for s in est.layout.replicas[0]]


def test_data_parallel_ignored_drops_only_the_all_reduce() -> None:
    decision = planned("geo5x4", 4, "default")
    counted = decision.chosen
    ctx = decision.context
    ignored_ctx = type(ctx)(ctx.topology, ctx.fabrics, ctx.network, ctx.config, ctx.diloco,
                            ctx.selection, ctx.optimizer_sharding,
                            CostAssumptions(data_parallel="ignored"))
    ignored = estimate(counted.layout, counted.partition, ignored_ctx, counted.sync)
    assert any(len(stage) > 1 for stage in counted.layout.replicas[0])
    assert ignored.iteration_s < counted.iteration_s
    assert ignored.simulation.busy_s == counted.simulation.busy_s  # same compute
