"""geo12: full-pipeline iteration time of hetsched's placement vs DT-FM and naive placements.

On `examples/geo12` (20 nodes round-robin over SkipPipe's 12 regions) with the
skippipe-llama-24l preset (24 layers, dim 1024, 8 samples per microbatch, 0.055 s per
sample per layer) and 6 pipeline stages, three placements are simulated with the same
estimator (`holmes.estimate.estimate`, full-pipeline routes, one replica):

- **hetsched**: `holmes.planner.decide(..., PlanOptions(stages=6)).chosen`.
- **DT-FM** (Yuan et al. NeurIPS'22): `holmes.placement.geo_layout` with the DT-FM cost
  (data-parallel cost + 2 x pipeline cost; stage gradient bytes of layers/stages layers,
  one microbatch's boundary activations), seed 0. If hetsched's placement is exactly
  this one the output says so. The local search is also run with seeds 1..4 to show
  how much its result varies (a microbatch's route pairs the j-th nodes of consecutive
  stages, so one unlucky pairing can put a route on the 2 Mbit/s NL-London link).
- **naive**: nodes in file order, stage sizes [5,3,3,3,3,3] (`stage_sizes`, as SkipPipe).

Each baseline placement is evaluated twice: with the layer split hetsched would give it
(the ILP, `partition_for`) and with equal layers (remainder to stage 0); hetsched's row
uses its own split. Printed: iteration seconds, ratio to hetsched (> 1 = slower than
hetsched), layers per stage, the slowest link on any route, and each stage's nodes.
The issue sets no target here: report only, exit status 0.

    .venv/bin/python bench/geo12_placement.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from planner_common import load_example, print_table, short_device, timed

from holmes import costs
from holmes.estimate import Context, Estimate, estimate, partition_for
from holmes.model import ModelConfig, load_model
from holmes.placement import GeoCosts, Layout, device_ids, geo_layout, stage_sizes
from holmes.planner import PlanOptions, decide

EXAMPLE = "geo12"
MODEL = "skippipe-llama-24l"
STAGES = 6
EXTRA_SEEDS = [1, 2, 3, 4]


def dtfm_costs(config: ModelConfig, stages: int) -> GeoCosts:
    """DT-FM's inputs: one stage's gradient bytes and one microbatch's activations."""
    model, training = config.model, config.training
    grad_bytes = costs.TRAINING_BYTES_PER_PARAM[model.dtype][1]
    return GeoCosts(
        stage_gradient_bytes=max(1, model.layers // stages)
        * costs.layer_params(model)
        * grad_bytes,
        activation_bytes=costs.boundary_activation_bytes(model, training.microbatch),
        microbatches=training.microbatches,
    )


def dtfm_layout(ctx: Context, seed: int = 0) -> Layout:
    devices = device_ids(ctx.topology)
    return geo_layout(devices, STAGES, ctx.network, dtfm_costs(ctx.config, STAGES), seed=seed)


def naive_geo_layout(ctx: Context) -> Layout:
    devices = device_ids(ctx.topology)
    stages, start = [], 0
    for size in stage_sizes(len(devices), STAGES):
        stages.append(tuple(devices[start : start + size]))
        start += size
    return Layout(
        "naive", (tuple(stages),), f"file order, stage sizes {stage_sizes(len(devices), STAGES)}"
    )


def evaluate(layout: Layout, ctx: Context, equal: bool) -> Estimate:
    return estimate(layout, partition_for(layout, ctx, equal=equal), ctx, "none")


def same_placement(a: Layout, b: Layout) -> bool:
    """Same stages in the same order, ignoring the order of nodes inside a stage."""
    return [set(s) for s in a.replicas[0]] == [set(s) for s in b.replicas[0]]


def slowest_hop(est: Estimate, ctx: Context) -> tuple[float, str, str]:
    """(Gbit/s, a, b) of the slowest link any microbatch crosses, the trip back included."""
    hops = {
        (a, b)
        for route in est.routes[0]
        for a, b in zip(route.nodes, (*route.nodes[1:], route.nodes[0]), strict=True)
        if a != b
    }
    a, b = min(sorted(hops), key=lambda hop: ctx.network.device_link(*hop)[1])
    return ctx.network.device_link(a, b)[1], short_device(a), short_device(b)


def hop_text(est: Estimate, ctx: Context) -> str:
    gbps, a, b = slowest_hop(est, ctx)
    return f"{gbps:.3g} Gbit/s {a}-{b}"


@dataclass
class Row:
    name: str
    est: Estimate


def mapping_lines(row: Row) -> list[str]:
    lines, start = [], 0
    for s, (stage, layers) in enumerate(
        zip(row.est.layout.replicas[0], row.est.partition.layers, strict=True)
    ):
        nodes = " ".join(short_device(d) for d in stage)
        lines.append(f"    stage {s} layers [{start},{start + layers}): {nodes}")
        start += layers
    return lines


def print_rows(rows: list[Row], ctx: Context) -> None:
    base = rows[0].est.iteration_s
    table = [
        [
            r.name,
            f"{r.est.iteration_s:.1f}",
            f"{r.est.iteration_s / base:.3f}",
            f"{r.est.tokens_per_s:,.0f}",
            f"{r.est.bubble_fraction:.0%}",
            ",".join(map(str, r.est.partition.layers)),
            hop_text(r.est, ctx),
        ]
        for r in rows
    ]
    print_table(
        [
            "placement",
            "iteration s",
            "vs hetsched",
            "tok/s",
            "bubble",
            "layers",
            "slowest hop on a route",
        ],
        table,
        right=[False, True, True, True, True, False, False],
    )
    print("\nstage -> nodes:")
    for r in rows:
        print(f"  {r.name}:")
        print("\n".join(mapping_lines(r)))


def main() -> int:
    topology = load_example(EXAMPLE)
    config = load_model(MODEL)
    options = PlanOptions(stages=STAGES, nccl_net="per-communicator")
    decision, plan_s = timed(lambda: decide(topology, config, options))
    ctx = decision.context
    dtfm, naive = dtfm_layout(ctx), naive_geo_layout(ctx)
    rows = [
        Row("hetsched", decision.chosen),
        Row("DT-FM, ILP layers", evaluate(dtfm, ctx, equal=False)),
        Row("DT-FM, equal layers", evaluate(dtfm, ctx, equal=True)),
        Row("naive, ILP layers", evaluate(naive, ctx, equal=False)),
        Row("naive, equal layers", evaluate(naive, ctx, equal=True)),
    ]
    print(
        f"== {EXAMPLE}: {MODEL}, {STAGES} stages, {config.training.microbatches} "
        f"microbatches of {config.training.microbatch}, full-pipeline routes "
        "(report only) =="
    )
    print(f"hetsched: {decision.chosen.layout.description} (planned in {plan_s:.2f} s)")
    if same_placement(decision.chosen.layout, dtfm):
        print(
            "hetsched's chosen placement IS the DT-FM placement (same nodes in the same "
            "stages); its rows differ only in the layer split"
        )
    print()
    print_rows(rows, ctx)
    base = rows[0].est.iteration_s
    print("\nDT-FM local search with other seeds (ILP layers):")
    for seed in EXTRA_SEEDS:
        est = evaluate(dtfm_layout(ctx, seed), ctx, equal=False)
        print(
            f"  seed {seed}: {est.iteration_s:.1f} s ({est.iteration_s / base:.3f} x "
            f"hetsched), slowest hop {hop_text(est, ctx)}"
        )
    print("\nreport only: no target in the issue for this comparison")
    return 0


if __name__ == "__main__":
    sys.exit(main())
