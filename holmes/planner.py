"""The planner: from a topology and a model to the best plan it can find, and why.

Steps: find the fabrics; choose the regime (geo-distributed when there are three or more
fabrics of at most two hosts each, data-centre islands otherwise); list candidate
layouts, each data-centre one also at every tensor-parallel degree that keeps TP groups
inside hosts (`holmes.tensor_parallel`); split the layers of each with the ILP; simulate
it with each way to sync replicas; keep the fastest. Data-centre candidates are
simulated in the order of a lower bound on their iteration (`estimate.lower_bound_s`:
the slowest stage's work with pipeline fill and drain), and one whose bound exceeds
ALLREDUCE_TOLERANCE x the fastest step found so far is skipped: it could not be chosen
(not when skipping is asked for, which filters candidates by depth later). Per-step
all-reduce between replicas is kept where it costs at most ALLREDUCE_TOLERANCE more than
streaming DiLoCo (DiLoCo changes the optimiser, so it must earn its place); the user can
force either. `naive_estimate` is the Megatron-style baseline the benchmarks compare with
(`naive_like_estimate` the same rank order with the plan's replicas and sync, to tell
placement from sync gains).

Estimates rest on a probe's timings, which are noisy (the compute timing of hosts that
share cores varies by several percent from one probe to the next), so a choice between
candidates closer than that noise is a coin toss. `noise` (relative, default
ESTIMATE_NOISE) turns it into a rule: among the candidates whose step time is within
(1 + noise) of the one the speed rules pick, the planner takes the one that moves the
fewest bytes across sites per step, then the fewest bytes in all, then the fastest
(`tie_break`); the plan's header says so.

Hosts that cannot or should not take part (unreachable, no devices, CPU-only in a GPU
job) are left out first (`holmes.hosts`), and links are estimated on the NCCL network
selection the plan will run with (`holmes.transports`: auto = what the installed torch
offers).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Literal

from holmes import costs, tensor_parallel
from holmes.assumptions import CostAssumptions, default_costs
from holmes.estimate import (
    Context,
    DilocoChoice,
    Estimate,
    estimate,
    lower_bound_s,
    partition_for,
    stage_costs_for,
)
from holmes.fabric import Fabric, find_fabrics
from holmes.hosts import LeftOut, left_out_hosts, without_hosts
from holmes.model import ModelConfig
from holmes.network import Network
from holmes.placement import (
    GeoCosts,
    Layout,
    datacentre_layouts,
    device_ids,
    geo_layout,
    naive_layout,
)
from holmes.skipping import (
    SkipChoice,
    skip_estimate,
    skips_a_stage,
)
from holmes.transports import Selection, choose_selection
from topology.errors import InputError
from topology.schema import Topology

ALLREDUCE_TOLERANCE = 1.10
# Relative spread of a probe's compute timing on a loaded machine (bench/e2e_lab.py
# --repeat reports it; docs/planner.md has the figures): estimates closer than this are
# ties, broken by traffic.
ESTIMATE_NOISE = 0.10
GEO_MAX_STAGES = 8
GEO_DEPTHS = 5  # geo depths tried without --stages: the deepest five up to GEO_MAX_STAGES
REFINE_BUDGET = 96_000
MIN_REFINE_ROUNDS = 10
Regime = Literal["auto", "datacentre", "geo"]
Sync = Literal["auto", "allreduce", "diloco"]
OptimizerSharding = Literal["zero1", "none"]
NcclNet = Literal["auto", "per-communicator", "per-process"]


@dataclass(frozen=True)
class PlanOptions:
    regime: Regime = "auto"
    sync: Sync = "auto"
    stages: int | None = None
    max_stages: int = 64
    refine_rounds: int = 200
    diloco: DilocoChoice = field(default_factory=DilocoChoice)
    skip: SkipChoice | None = None
    optimizer_sharding: OptimizerSharding = "zero1"  # ZeRO-1 over each stage's data group
    nccl_net: NcclNet = "auto"
    include_cpu_hosts: bool = False
    # estimates within (1 + noise) of each other are ties; None: ESTIMATE_NOISE where device
    # speeds are CPU matmul timings (noisy on shared cores), else 0 (speed alone)
    noise: float | None = None
    costs: CostAssumptions | None = None  # None: the model's `costs:`, else `default`
    tensor_parallel: int | None = None  # None: the planner picks among TP_DEGREES


@dataclass
class Decision:
    """The chosen estimate, the runners-up, and what could not be planned and why.

    `context.topology` is the topology planned on (without the `left_out` hosts);
    `source` is the one given (its sha256 goes into the plan)."""

    chosen: Estimate
    candidates: list[Estimate]
    regime: str
    fabrics: list[Fabric]
    context: Context
    rejected: list[str] = field(default_factory=list)
    full_pipeline: Estimate | None = None  # the chosen layout without skipping
    skip: SkipChoice | None = None
    left_out: list[LeftOut] = field(default_factory=list)
    source: Topology | None = None
    selection_detail: str = ""
    noise: float = 0.0  # the tie band the choice was made with
    ties: list[Estimate] = field(default_factory=list)  # candidates within it, chosen first
    regime_note: str = ""  # why this regime, when auto weighed more than one
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per step
    skipped: int = 0  # layouts not simulated: their lower bound could not win

    def by_depth(self) -> list[Estimate]:
        """The fastest candidate of each (regime, depth), in that order: what each depth
        the planner tried is predicted to take (why this depth was chosen)."""
        best: dict[tuple[str, int], Estimate] = {}
        for e in self.candidates:
            key = (e.layout.regime, e.layout.stages)
            if key not in best or e.step_s < best[key].step_s:
                best[key] = e
        return [best[key] for key in sorted(best)]


@dataclass
class _Search:
    """Candidates found so far over one or more regimes, and what did not fit."""

    candidates: list[Estimate] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    errors: list[tuple[int, InputError]] = field(default_factory=list)
    skipped: int = 0
    clock: _Clock = field(default_factory=lambda: _Clock())


def decide(topology: Topology, config: ModelConfig, options: PlanOptions) -> Decision:
    search = _Search()
    left_out = left_out_hosts(topology, options.include_cpu_hosts)
    if len(left_out) == len(topology.hosts):
        reasons = "; ".join(f"{h.host}: {h.reason}" for h in left_out[:3])
        raise InputError(f"no host can take part ({reasons})", field="hosts")
    source, topology = topology, without_hosts(topology, [h.host for h in left_out])
    options = replace(options, noise=default_noise(topology, options.noise))
    fabrics = find_fabrics(topology)
    _require_devices(topology, config)
    selection, detail = _selection(topology, fabrics, options.nccl_net)
    assumptions = options.costs or config.costs or default_costs()
    context = Context(topology, fabrics, Network(topology, fabrics), config, options.diloco,
                      selection, options.optimizer_sharding, assumptions)
    search.clock.lap("fabrics")
    wanted = _regimes(fabrics, options.regime)
    for regime in wanted:
        _search(regime, context, options, search)
    why = _why_geo(search, options) if "geo" not in wanted and options.regime == "auto" else ""
    if why:
        _search("geo", context, options, search)
    pool = _pool(search, options)
    fastest, note = _choose(pool, options, "geo" in wanted or bool(why))
    chosen, ties = tie_break(pool, fastest, options.sync, options.noise)
    regime = chosen.layout.regime
    if options.sync == "diloco" and chosen.sync != "diloco":
        raise InputError(f"DiLoCo needs two or more replicas, but every layout of the {regime} "
                         "regime is one pipeline; pass --regime datacentre to make fabrics "
                         "(sites) replicas, or leave --sync to the planner", field="--sync")
    decision = Decision(chosen, search.candidates, regime, fabrics, context, search.rejected,
                        left_out=left_out, source=source, selection_detail=detail,
                        regime_note="; ".join(part for part in (why, note) if part),
                        phases=search.clock.laps, skipped=search.skipped,
                        noise=options.noise, ties=ties)
    return _with_skipping(decision, options.skip) if options.skip else decision


def _search(regime: str, ctx: Context, options: PlanOptions, found: _Search) -> None:
    """Add every layout of `regime` that fits, estimated with each sync, to `found`."""
    try:
        layouts = _layouts(regime, ctx, options)
    except InputError as exc:
        found.errors.append((-1, exc))
        return
    layouts = [lay for lay in layouts if lay.stages <= ctx.config.model.layers] or layouts
    found.clock.lap("layouts")
    if regime == "datacentre" and options.skip is None:
        _datacentre_candidates(layouts, ctx, options, found)
        found.clock.lap("ILP split and simulate")
        return
    for layout in layouts:
        try:
            partition = partition_for(layout, ctx)
        except InputError as exc:
            found.rejected.append(f"{layout.description}: {exc.message}")
            found.errors.append((layout.stages, exc))
            continue
        for sync in _syncs(layout, options.sync):
            estimated = estimate(layout, partition, ctx, sync)
            found.candidates.append(estimated)
            if regime == "geo":
                found.candidates.append(refine_by_simulation(
                    estimated, ctx, refine_rounds(options.refine_rounds, ctx.config)))
    found.clock.lap("ILP split and simulate")


def _why_geo(found: _Search, options: PlanOptions) -> str:
    """Why the auto regime must also look at one pipeline over every device (geo) when
    skipping is asked for: the data-centre layouts lack the asked depth, or skipping would
    skip nothing in them."""
    skip = options.skip
    if skip is None:
        return ""
    depths = sorted({e.layout.stages for e in found.candidates})
    if options.stages is not None and options.stages not in depths:
        return f"no data-centre layout has {options.stages} stages"
    if not any(skips_a_stage(d, skip.ratio) for d in depths):
        return (f"skip ratio {skip.ratio:g} skips no stage of a data-centre layout "
                f"({'/'.join(map(str, depths)) or 'no'} stages)")
    return ""


def _pool(found: _Search, options: PlanOptions) -> list[Estimate]:
    """The candidates the choice is made from: those where skipping applies when it is
    asked for. None: the most telling refusal, in one line."""
    pool = found.candidates
    skip = options.skip
    if skip is not None and pool:
        pool = [e for e in pool if skips_a_stage(e.layout.stages, skip.ratio)]
        if not pool:
            depths = "/".join(str(d) for d in sorted({e.layout.stages
                                                      for e in found.candidates}))
            least = _least_stages(skip.ratio)
            way_out = ("pass --regime geo (one pipeline over every device)"
                       if options.regime == "datacentre" else
                       f"pass --stages {least} or more" if least else "lower --skip-ratio")
            raise InputError(f"skip ratio {skip.ratio:g} skips no stage of any layout "
                             f"considered ({depths} stages; a route skips round(k (S - 1)) "
                             f"of S - 1 stages): {way_out}", field="--skip-ratio")
    if not pool:
        # The deepest pipeline spreads the model thinnest: its shortfall is the one to show.
        raise max(found.errors, key=lambda e: e[0])[1] if found.errors else \
            InputError("no layout fits")
    return pool


def _least_stages(ratio: float, most: int = 64) -> int | None:
    """The fewest stages in which skip ratio `ratio` skips a stage (None: none up to most)."""
    return next((s for s in range(2, most + 1) if skips_a_stage(s, ratio)), None)


def _choose(pool: list[Estimate], options: PlanOptions, weighed: bool) -> tuple[Estimate, str]:
    """The best candidate of each regime (`_best`), then the faster of those; with
    `weighed` (auto looked at both regimes) a note says what each estimated."""
    regimes = sorted({e.layout.regime for e in pool})
    bests = {r: _best([e for e in pool if e.layout.regime == r], options.sync) for r in regimes}
    finalists = list(bests.values())
    if options.sync == "diloco":
        finalists = [e for e in finalists if e.sync == "diloco"] or finalists
    chosen = min(finalists, key=lambda e: e.step_s)
    if not weighed or len(bests) < 2:
        return chosen, ""
    figures = " vs ".join(f"{r} {e.tokens_per_s:,.0f} tokens/s ({e.sync})"
                          for r, e in sorted(bests.items(), key=lambda kv: kv[1].step_s))
    return chosen, f"auto weighed {figures} and took the faster"


def _with_tp_candidates(layouts: list[Layout], wanted: int | None, ctx: Context
                        ) -> list[Layout]:
    """Each layout at every TP degree whose groups stay inside hosts (TP 1 included), or
    only at `wanted` when one is forced. Only GPUs form TP groups (NVLink or PCIe between
    them); layouts with CPU devices stay at TP 1."""
    allowed = tensor_parallel.TP_DEGREES if wanted is None else (wanted,)
    found = [lay for lay in layouts if 1 in allowed]
    found += [tensor_parallel.with_tensor_parallel(lay, t) for lay in layouts
              if not any(ctx.is_cpu(d) for d in lay.devices())
              for t in tensor_parallel.degrees(lay, allowed)]
    if not found:
        raise InputError(f"tensor parallel {wanted} does not divide the devices every host "
                         "gives a stage in any layout", field="--tensor-parallel")
    return found


class _Clock:
    """Wall seconds per planning step, for `Decision.phases` (bench/planning_time.py)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


def _datacentre_candidates(layouts: list[Layout], ctx: Context, options: PlanOptions,
                           found: _Search) -> None:
    """Simulate the layouts that could be chosen, in the order of their lower bound
    (`lower_bound_s`): a layout whose bound exceeds ALLREDUCE_TOLERANCE x (1 + noise) x the
    fastest step so far is skipped, as it could be neither the fastest, nor the all-reduce
    kept within the tolerance, nor a tie within the noise of either. Where every stage's
    devices are alike, the bound is taken on the greedy split, whose slowest stage is the
    ILP's (both are optimal); otherwise on the ILP's own. Adds the candidates to `found`
    and counts the layouts skipped."""
    bounded = []
    for layout in layouts:
        uniform = _uniform_stages(layout, ctx)
        try:
            split = partition_for(layout, ctx, method="greedy" if uniform else "auto")
        except InputError as exc:
            found.rejected.append(f"{layout.description}: {exc.message}")
            found.errors.append((layout.stages, exc))
            continue
        stage_costs = stage_costs_for(layout, ctx) if uniform else None
        bounded.append((lower_bound_s(layout, split, ctx, stage_costs), len(bounded), layout,
                        None if uniform else split))
    found.clock.lap("split and bound")
    best, reach = math.inf, ALLREDUCE_TOLERANCE * (1 + options.noise) * (1 + 1e-9)
    for bound, _, layout, split in sorted(bounded, key=lambda b: b[:2]):
        if bound > reach * best:
            found.skipped += 1
            continue
        partition = split or partition_for(layout, ctx)
        for sync in _syncs(layout, options.sync):
            found.candidates.append(estimate(layout, partition, ctx, sync))
            best = min(best, found.candidates[-1].step_s)


def _uniform_stages(layout: Layout, ctx: Context) -> bool:
    """Whether the devices of each stage (all replicas) have one speed and one GPU link."""
    for s in range(layout.stages):
        devices = [m for replica in layout.replicas for d in replica[s]
                   for m in layout.members(d)]
        kinds = {(ctx.tflops(d), ctx.network.intra_host(d.split(":", 1)[0])[0])
                 for d in devices}
        if len(kinds) > 1:
            return False
    return True


def _selection(topology: Topology, fabrics: list[Fabric], wanted: NcclNet
               ) -> tuple[Selection, str]:
    """The NCCL network selection. Only GPUs use NCCL; and where every group must run on
    the same network (no RDMA fabric, or a single fabric) NCCL_NET per process is exact
    and needs nothing of torch, so `auto` looks torch up only when groups can differ."""
    if not any(d.kind == "gpu" for h in topology.hosts for d in h.devices):
        return "per-communicator", "no GPUs: gloo"
    if wanted == "auto" and (len(fabrics) == 1 or not any(f.rdma for f in fabrics)):
        return "per-process", "every group runs on the same network"
    return choose_selection(wanted)


def _with_skipping(decision: Decision, choice: SkipChoice) -> Decision:
    """Give the chosen layout collision-aware skip routes (SkipPipe); keep its
    full-pipeline estimate (head at the origin, same memory) for comparison."""
    ctx = decision.context
    choice, note = choice.fitted(decision.chosen.layout.stages)
    try:
        skipped = skip_estimate(decision.chosen, ctx, choice)
    except ValueError as exc:
        option = "--max-swaps" if str(exc).startswith("max swaps") else "--skip-ratio"
        raise InputError(str(exc), field=option) from exc
    return replace(decision, chosen=skipped.estimate, full_pipeline=skipped.full_pipeline,
                   skip=choice, notes=decision.notes + ([note] if note else []))


def _require_devices(topology: Topology, config: ModelConfig) -> None:
    devices = device_ids(topology)
    if not devices:
        raise InputError("the topology has no devices to train on", field="hosts[].devices")
    if config.model.seconds_per_layer_per_sample is not None:
        return
    slow = [f"{h.name}:{d.name}" for h in topology.hosts for d in h.devices if d.tflops is None]
    if slow:
        more = f" (and {len(slow) - 1} more)" if len(slow) > 1 else ""
        raise InputError(f"device {slow[0]}{more} has no tflops, and model {config.model.name} "
                         "gives no seconds_per_layer_per_sample: probe with --flops or set one",
                         field="hosts[].devices[].tflops")


def _regimes(fabrics: list[Fabric], wanted: Regime) -> list[str]:
    """The regimes to search: the one asked for; with auto, data-centre islands, and also
    one geo pipeline when the fabrics are scattered (three or more, of at most two hosts
    each), the faster estimate winning."""
    if wanted != "auto":
        return [wanted]
    scattered = len(fabrics) >= 3 and all(len(f.hosts) <= 2 for f in fabrics)
    return ["datacentre", "geo"] if scattered else ["datacentre"]


def _layouts(regime: str, ctx: Context, options: PlanOptions) -> list[Layout]:
    if regime == "geo":
        return [_geo(ctx, options, stages) for stages in geo_depths(ctx, options)]
    layouts = datacentre_layouts(ctx.topology, ctx.fabrics, ctx.network, options.max_stages)
    if options.stages is not None:
        layouts = [lay for lay in layouts if lay.stages == options.stages]
    if not layouts:
        raise InputError(f"no data-centre layout with {options.stages} stages (pass --regime "
                         "geo for one pipeline over every device)", field="--stages")
    return _with_tp_candidates(layouts, options.tensor_parallel, ctx)


def geo_depths(ctx: Context, options: PlanOptions) -> list[int]:
    """The pipeline depths the geo regime tries: `--stages`, else the GEO_DEPTHS deepest
    up to GEO_MAX_STAGES (and the devices and layers); the fastest estimate wins."""
    if options.stages is not None:
        return [options.stages]
    deepest = min(len(device_ids(ctx.topology)), ctx.config.model.layers, GEO_MAX_STAGES)
    return list(range(max(1, deepest - GEO_DEPTHS + 1), deepest + 1))


def _geo(ctx: Context, options: PlanOptions, stages: int) -> Layout:
    devices = device_ids(ctx.topology)
    model, training = ctx.config.model, ctx.config.training
    if not 0 < stages <= len(devices):
        raise InputError(f"cannot make {stages} stages from {len(devices)} devices",
                         field="--stages")
    per_stage_layers = max(1, model.layers // stages)
    grad_bytes = costs.TRAINING_BYTES_PER_PARAM[model.dtype][1]
    geo_costs = GeoCosts(
        stage_gradient_bytes=per_stage_layers * costs.layer_params(model) * grad_bytes,
        activation_bytes=costs.boundary_activation_bytes(model, training.microbatch),
        microbatches=training.microbatches)
    return geo_layout(devices, stages, ctx.network, geo_costs)


def refine_rounds(wanted: int, config: ModelConfig) -> int:
    """Each round simulates the whole step: at most REFINE_BUDGET simulated microbatches
    in all (never fewer than MIN_REFINE_ROUNDS rounds), so a 4096-microbatch step still
    plans in seconds while steps of up to 480 microbatches keep every round."""
    return min(wanted, max(MIN_REFINE_ROUNDS, REFINE_BUDGET // config.training.microbatches))


def refine_by_simulation(start: Estimate, ctx: Context, rounds: int, seed: int = 0) -> Estimate:
    """Local search on top of a placement: swap two nodes of different stages, keep the swap
    when the simulated step gets faster. The cost model of DT-FM ranks placements by
    link costs alone; the simulator also sees queueing, the loss trip back to the origin and
    the all-reduce tails, so it can still improve the DT-FM optimum."""
    if len(start.layout.replicas[0]) < 2:  # one stage: no two stages to swap nodes between
        return start
    rng = random.Random(seed)
    best, kept = start, 0
    for _ in range(rounds):
        stages = [list(stage) for stage in best.layout.replicas[0]]
        i, j = rng.sample(range(len(stages)), 2)
        a, b = rng.randrange(len(stages[i])), rng.randrange(len(stages[j]))
        stages[i][a], stages[j][b] = stages[j][b], stages[i][a]
        layout = replace(best.layout, replicas=(tuple(tuple(s) for s in stages),))
        trial = estimate(layout, best.partition, ctx, best.sync, timeline=False)
        if trial.step_s < best.step_s:
            best, kept = trial, kept + 1
    description = f"{start.layout.description}, refined by simulation ({kept} swaps kept)"
    return estimate(replace(best.layout, description=description), best.partition, ctx,
                    best.sync)


def _syncs(layout: Layout, wanted: Sync) -> list[str]:
    if len(layout.replicas) == 1:
        return ["none"]
    return ["allreduce", "diloco"] if wanted == "auto" else [wanted]


def _best(candidates: list[Estimate], wanted: Sync) -> Estimate:
    """The fastest candidate; with `auto` sync, the fastest without DiLoCo when it is
    within ALLREDUCE_TOLERANCE of the fastest overall; with `diloco`, the fastest DiLoCo
    candidate when there is one (a forced choice, even if it is slower)."""
    if wanted == "diloco":
        candidates = [e for e in candidates if e.sync == "diloco"] or candidates
    fastest = min(candidates, key=lambda e: e.step_s)
    plain = [e for e in candidates if e.sync != "diloco"]
    if wanted != "auto" or not plain:
        return fastest
    best_plain = min(plain, key=lambda e: e.step_s)
    return best_plain if best_plain.step_s <= ALLREDUCE_TOLERANCE * fastest.step_s else fastest


def default_noise(topology: Topology, asked: float | None) -> float:
    """The tie band: as asked, else ESTIMATE_NOISE when some device is a CPU (its speed is
    a matmul timed on cores other work shares, which moves by tens of percent between
    probes) and 0 otherwise (GPU speeds are stable figures: plan for speed alone)."""
    if asked is not None:
        return asked
    cpus = any(d.kind == "cpu" for h in topology.hosts for d in h.devices)
    return ESTIMATE_NOISE if cpus else 0.0


def tie_break(candidates: list[Estimate], fastest: Estimate, wanted: Sync,
              noise: float) -> tuple[Estimate, list[Estimate]]:
    """The candidate to plan among those within `noise` of `fastest` (the speed rules'
    pick), and all of those, the chosen first. Ties are candidates of `fastest`'s kind (a
    forced or preferred all-reduce stays all-reduce, forced DiLoCo stays DiLoCo) that use
    as many devices as it (leaving devices idle is not a way to save traffic) and whose
    step time is at most (1 + noise) x `fastest`'s; the one with the fewest bytes across
    sites per step wins, then the fewest bytes between hosts (a host's own GPU link, which
    tensor parallelism uses, is not the network the rule spares), then the fastest. Ties are between
    shapes (replicas x stages x lanes, sync): of candidates of one shape (say a DT-FM
    placement and its refinement) only the fastest is one."""
    if wanted == "diloco":
        pool = [e for e in candidates if e.sync == fastest.sync]
    elif fastest.sync == "diloco":
        pool = candidates
    else:
        pool = [e for e in candidates if e.sync != "diloco"]
    used = len(fastest.layout.devices())
    pool = [e for e in pool if len(e.layout.devices()) >= used]
    best_of_shape: dict[tuple[int, int, int, str], Estimate] = {_shape(fastest): fastest}
    for e in pool:
        if e.step_s < best_of_shape.setdefault(_shape(e), e).step_s:
            best_of_shape[_shape(e)] = e
    ties = [e for e in best_of_shape.values() if e.step_s <= fastest.step_s * (1 + noise)]
    ties.sort(key=_traffic_rank)
    return ties[0], ties


def _shape(e: Estimate) -> tuple[int, int, int, str]:
    lanes = max(len(stage) for stage in e.layout.replicas[0])
    return len(e.layout.replicas), e.layout.stages, lanes, e.sync


def _traffic_rank(e: Estimate) -> tuple[float, float, float]:
    between_hosts = sum(v for k, v in e.bytes_per_step.items() if k != "intra_host")
    return (e.bytes_per_step.get("inter_site", 0.0), between_hosts, e.step_s)


def naive_estimate(topology: Topology, config: ModelConfig, like: Estimate,
                   assumptions: CostAssumptions | None = None) -> Estimate:
    """What one would run without hetsched: Megatron's rank order on as many devices as
    `like` uses, with its pipeline depth, one pipeline whose data-parallel groups take
    devices / depth consecutive ranks, per-step all-reduce inside them, equal layers and
    NCCL's own transport (see `naive_shape_estimate`)."""
    stages = like.layout.stages
    return naive_shape_estimate(topology, config, stages,
                                max(1, len(like.layout.devices()) // stages),
                                assumptions=assumptions)


def naive_like_estimate(topology: Topology, config: ModelConfig, like: Estimate,
                        diloco: DilocoChoice | None = None,
                        assumptions: CostAssumptions | None = None) -> Estimate:
    """The naive rank order cut into `like`'s replicas and synced like it: the plan and
    this differ only in placement and layer split (with one replica it is
    `naive_estimate`). `naive_estimate` / this is what the replicas and their sync gain."""
    replicas, stages = len(like.layout.replicas), like.layout.stages
    dp = max(1, len(like.layout.devices()) // (stages * replicas))
    return naive_shape_estimate(topology, config, stages, dp, replicas, like.sync, diloco,
                                assumptions)


def naive_shape_estimate(topology: Topology, config: ModelConfig, stages: int, dp: int,
                         replicas: int = 1, sync: str = "allreduce",
                         diloco: DilocoChoice | None = None,
                         assumptions: CostAssumptions | None = None) -> Estimate:
    """The naive placement of `replicas` x `stages` x `dp` devices. With one replica this
    is exactly Megatron's rank order for pipeline depth `stages`. Its links run where NCCL
    would put them by itself: RDMA between hosts of one RDMA fabric, sockets otherwise
    (per hop for the pipeline, which is generous: Megatron's pipeline group spanning
    fabrics would run all its hops on one network). With several replicas it syncs them
    by `sync` (the plan's), so only placement and layer split differ from the plan.
    `topology` is the one the plan was made on (without its left-out hosts)."""
    fabrics = find_fabrics(topology)
    network = Network(topology, fabrics)
    context = Context(topology, fabrics, network, config, diloco or DilocoChoice(),
                      "per-communicator",
                      assumptions=assumptions or config.costs or default_costs())
    layout = naive_layout(topology, stages, dp, replicas)
    partition = partition_for(layout, context, equal=True)
    sync = (sync if sync != "none" else "allreduce") if replicas > 1 else "none"
    return estimate(layout, partition, context, sync)
