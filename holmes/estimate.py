"""Estimates: how fast a layout runs, from the cost model and the pipeline simulator.

For a `Layout` this module splits the layers (`partition_for`, the ILP in
`holmes.partition`), builds the simulator's plain inputs (per-device forward seconds,
per-pair latency and bandwidth, one route per microbatch, memory limits, the
data-parallel all-reduce as each device's tail) and runs `skippipe.simulate` for every
replica. Sync between replicas is either a per-step all-reduce (added to the tail) or
streaming DiLoCo (amortised: only the part of each fragment's exchange that does not fit
in its overlap window stalls training).

When every stage of a replica has the same number of devices, the replica is a set of
lanes and only its slowest lane is simulated; each host pair's bandwidth is then shared
by the lanes that cross it. The head and loss run where the layout says (`loss_at`).

Links run on the transport that will really be in effect (`holmes.transports`): RDMA
between hosts of one RDMA fabric, sockets elsewhere, and sockets for every link of a
process that per-process NCCL selection (or gloo, on CPU devices) puts on sockets.

Memory: a GPU's capacity is its memory less GPU_RESERVED_GB for what the cost model does
not count: the CUDA context (CUDA_CONTEXT_GB; PyTorch issue #34323 measured 781 MB used
on a GPU by a process that only initialised CUDA) and NCCL's buffers
(NCCL_COMMUNICATOR_GB per communicator; NVIDIA/nccl issue #964 measured 544 MB for a
2-GPU and 688 MB for a larger PyTorch group on A100s) for NCCL_COMMUNICATORS_PER_GPU
communicators (the data group, the cross-replica group and the pipeline's two
point-to-point neighbours).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from holmes import calibration, costs, tensor_parallel
from holmes.assumptions import CostAssumptions, default_costs
from holmes.fabric import Fabric
from holmes.model import ModelConfig
from holmes.network import INTRA_HOST_LATENCY_MS, Network, host_of
from holmes.partition import Method, Partition, StageCost, partition_layers
from holmes.placement import Layout, Stages
from holmes.transports import Selection, fabric_transport, layout_groups, socket_devices
from skippipe.simulate import PipelineSpec, Route, SimResult, simulate
from topology.errors import InputError
from topology.schema import Device, Topology

QUANTIZED_BYTES_PER_PARAM = {"fp4": 0.5 + 2 / 32, "int8": 1.0 + 4 / 128, "bf16": 2.0,
                             "none": 4.0}
CUDA_CONTEXT_GB = 0.8
NCCL_COMMUNICATOR_GB = 0.6
NCCL_COMMUNICATORS_PER_GPU = 4
GPU_RESERVED_GB = CUDA_CONTEXT_GB + NCCL_COMMUNICATORS_PER_GPU * NCCL_COMMUNICATOR_GB


def usable_memory_gb(device: Device) -> float:
    """What the cost model may fill: a GPU's memory less GPU_RESERVED_GB (see above)."""
    return device.memory_gb - (GPU_RESERVED_GB if device.kind == "gpu" else 0.0)


@dataclass(frozen=True)
class DilocoChoice:
    sync_every: int = 100
    fragments: int = 4
    pattern: str = "strided"
    overlap_steps: int = 2
    alpha: float = 0.5
    quantization: str = "fp4"
    exchange: str = "sharded"


@dataclass
class Estimate:
    """One evaluated candidate: layout, layers per stage, sync and the predicted speed."""

    layout: Layout
    partition: Partition
    sync: str
    iteration_s: float
    sync_s_per_step: float
    tokens_per_s: float
    bubble_fraction: float
    bytes_per_step: dict[str, float]
    memory_gb: dict[str, float]
    routes: list[list[Route]]
    simulation: SimResult
    notes: list[str] = field(default_factory=list)
    in_flight: dict[str, int] | None = None  # per-device caps when not 1F1B's

    @property
    def step_s(self) -> float:
        return self.iteration_s + self.sync_s_per_step


@dataclass
class Context:
    """Everything an estimate reads besides the layout."""

    topology: Topology
    fabrics: list[Fabric]
    network: Network
    config: ModelConfig
    diloco: DilocoChoice = field(default_factory=DilocoChoice)
    selection: Selection = "per-communicator"
    optimizer_sharding: str = "zero1"  # or "none": see `optimizer_shards`
    assumptions: CostAssumptions = field(default_factory=default_costs)
    busy_fraction: float = 1.0  # of a step a worker computes (CPU sharing: holmes.calibration)
    # Memos of what many layouts share (planning 16,384 GPUs looks them up thousands of
    # times): replica shares by (lanes, speeds, microbatches), stage extremes by devices.
    # Not init fields: a context made with dataclasses.replace starts with empty ones.
    shares_seen: dict[tuple, tuple[int, ...]] = field(default_factory=dict, repr=False,
                                                      init=False)
    extremes_seen: dict[tuple[str, ...], tuple[str, str]] = field(default_factory=dict,
                                                                   repr=False, init=False)

    @property
    def microbatch(self) -> int:
        return self.config.training.microbatch

    def tflops(self, device: str) -> float | None:
        """The device's effective TFLOPS: stated (calibrated, and shared among a machine's
        CPU workers: `holmes.calibration`) x its compute efficiency."""
        raw = self._raw_tflops[device]
        return None if raw is None else raw * self.efficiency(device)

    def efficiency(self, device: str) -> float:
        host, name = device.split(":", 1)
        return self.assumptions.efficiency(host, name, self._device(device).kind)

    def layer_forward_s(self, device: str) -> float:
        """Forward seconds of one layer for one sample on `device` (efficiency applied)."""
        raw = self._raw_tflops[device]
        return costs.layer_forward_seconds(self.config.model, raw) / self.efficiency(device)

    @property
    def backward_ratio(self) -> float:
        """Backward / forward seconds of a layer, one more forward with full recompute."""
        full = self.config.training.recompute == "full"
        return self.assumptions.backward_ratio + (1.0 if full else 0.0)

    def layer_train_s(self, device: str) -> float:
        """Forward + backward seconds of one layer for one microbatch on `device`."""
        return (1.0 + self.backward_ratio) * self.microbatch * self.layer_forward_s(device)

    def head_loss_s(self, device: str, layers: int) -> float:
        """Seconds of the head + loss of one microbatch on `device`, whose stage holds
        `layers` layers: from the head's FLOPs, or a fraction of the stage's forward."""
        share = self.assumptions.head_loss
        if share == "flops":
            raw = self._raw_tflops[device]
            head = costs.head_forward_seconds(self.config.model, raw) / self.efficiency(device)
            return (1.0 + self.assumptions.backward_ratio) * self.microbatch * head
        return share * (layers * self.microbatch * self.layer_forward_s(device))

    @functools.cached_property
    def _raw_tflops(self) -> dict[str, float | None]:
        return calibration.device_tflops(self.topology, self.config.model,
                                         self.config.training.recompute, self.busy_fraction)

    def memory_bytes(self, device: str) -> float:
        return usable_memory_gb(self._device(device)) * costs.GB

    def fabrics_of(self, host: str) -> frozenset[int]:
        """Indexes of the fabrics `host` belongs to."""
        return self._fabric_index.get(host, frozenset())

    @functools.cached_property
    def _fabric_index(self) -> dict[str, frozenset[int]]:
        index: dict[str, set[int]] = {}
        for i, fabric in enumerate(self.fabrics):
            for host in fabric.hosts:
                index.setdefault(host, set()).add(i)
        return {host: frozenset(found) for host, found in index.items()}

    def is_cpu(self, device: str) -> bool:
        return self._device(device).kind == "cpu"

    def _device(self, device: str) -> Device:
        return self._devices[device]

    @functools.cached_property
    def _devices(self) -> dict[str, Device]:
        return {f"{h.name}:{d.name}": d for h in self.topology.hosts for d in h.devices}


def socket_forced(layout: Layout, ctx: Context, sync: str) -> frozenset[str]:
    """The devices of `layout` whose traffic runs on sockets even inside an RDMA fabric:
    all of them when any is a CPU (gloo is TCP); under per-process NCCL selection the
    closure of the socket groups (`holmes.transports.socket_devices`); else none."""
    devices = layout.devices()
    if any(ctx.is_cpu(d) for d in devices):
        return frozenset(devices)
    if ctx.selection == "per-communicator":
        return frozenset()
    groups = {name: devs for name, (_, devs) in
              layout_groups(layout, sync, ctx.fabrics, fabric_pipelines=False).items()}
    wanted = {name: fabric_transport(ctx.fabrics, [host_of(d) for d in devs])
              for name, devs in groups.items()}
    return frozenset(socket_devices(groups, wanted))


def in_flight_cap(stage: int, stages: int, microbatches: int, loss_at: str = "last") -> int:
    """Microbatches stage `stage` holds at once: 1F1B's stages - stage.

    With the head at the origin a microbatch goes back to stage 0 for its loss before its
    backward starts, so every stage waits one hop longer and holds one more. The partition
    reserves memory for exactly this many; the simulator caps each device at it.
    """
    extra = 1 if loss_at == "origin" else 0
    return max(1, min(stages - stage + extra, microbatches))


def replica_microbatches(config: ModelConfig, layout: Layout, ctx: Context) -> list[int]:
    """Each replica's share of the step's microbatches. A replica's time grows with
    ceil(share / lanes) / speed (speed: its slowest device's TFLOPS); microbatches are
    handed out one at a time to the replica that would finish it soonest, which balances
    whole microbatches per lane, not just fractions. Every replica gets at least one."""
    lanes = [min(len(stage) for stage in replica) for replica in layout.replicas]
    speeds = [_slowest_tflops(replica, ctx) for replica in layout.replicas]
    key = (tuple(lanes), tuple(speeds), config.training.microbatches)
    if key not in ctx.shares_seen:
        ctx.shares_seen[key] = tuple(_hand_out(lanes, speeds, config.training.microbatches))
    return list(ctx.shares_seen[key])


def _hand_out(lanes: list[int], speeds: list[float], microbatches: int) -> list[int]:
    shares = [1] * len(lanes)

    def finish(r: int) -> tuple[float, int]:
        return math.ceil((shares[r] + 1) / lanes[r]) / speeds[r], r

    heap = [finish(r) for r in range(len(shares))]
    heapq.heapify(heap)
    for _ in range(max(0, microbatches - len(shares))):
        _, r = heapq.heappop(heap)  # the least (finish, index): min's choice, ties too
        shares[r] += 1
        heapq.heappush(heap, finish(r))
    return shares


def _slowest_tflops(replica: Stages, ctx: Context) -> float:
    speeds = [ctx.tflops(d) for stage in replica for d in stage]
    known = [t for t in speeds if t is not None]
    return min(known) if len(known) == len(speeds) else 1.0


def _first_ids(shares: list[int]) -> list[int]:
    return [sum(shares[:r]) for r in range(len(shares))]


def partition_for(layout: Layout, ctx: Context, equal: bool = False,
                  method: Method = "auto") -> Partition:
    """Layers per stage index (shared by all replicas), minimising the slowest stage."""
    model = ctx.config.model
    stage_costs = stage_costs_for(layout, ctx, equal)
    if equal:
        return _equal_partition(stage_costs, model.layers, model.name)
    return partition_layers(stage_costs, model.layers, model_name=model.name, method=method)


def stage_costs_for(layout: Layout, ctx: Context, equal: bool = False) -> list[StageCost]:
    """What the partition knows of each stage: its slowest device's seconds per layer,
    its head's seconds (none when `equal`), its smallest device's memory."""
    model, training = ctx.config.model, ctx.config.training
    in_flight_of = max(share // min(len(stage) for stage in replica)
                       for share, replica in zip(replica_microbatches(ctx.config, layout, ctx),
                                                 layout.replicas, strict=True))
    stage_costs = []
    for s in range(layout.stages):
        slowest, smallest = _extremes(ctx, tuple(m for replica in layout.replicas
                                                 for d in replica[s] for m in layout.members(d)))
        head = s == layout.head_stage
        t = layout.tp(s)
        memory = costs.stage_memory_terms(
            model, microbatch=ctx.microbatch,
            in_flight=_reserved_in_flight(ctx, s, layout.stages, in_flight_of, layout.loss_at),
            holds_embedding=s == 0, holds_head=head, recompute=training.recompute,
            tensor_parallel=t, optimizer_shards=optimizer_shards(layout, s, ctx))
        per_layer, fixed = _tp_layer_s(ctx, t, slowest), 0.0
        if head and ctx.assumptions.head_loss == "flops":
            fixed = _tp_head_s(ctx, t, slowest, ctx.head_loss_s(slowest, 0))
        elif head:  # a fraction of the stage's forward grows with its layers
            per_layer += ctx.head_loss_s(slowest, 1) / t
        stage_costs.append(StageCost(
            device=smallest, capacity_bytes=ctx.memory_bytes(smallest),
            seconds_per_layer=per_layer,
            bytes_per_layer=memory.per_layer, fixed_bytes=memory.fixed,
            fixed_seconds=0.0 if equal else fixed))
    return stage_costs


def _extremes(ctx: Context, devices: tuple[str, ...]) -> tuple[str, str]:
    """(slowest, smallest) of `devices`, remembered per device tuple."""
    if devices not in ctx.extremes_seen:
        ctx.extremes_seen[devices] = (min(devices, key=lambda d: ctx.tflops(d) or math.inf),
                                      min(devices, key=ctx.memory_bytes))
    return ctx.extremes_seen[devices]


def lower_bound_s(layout: Layout, partition: Partition, ctx: Context,
                  uniform: list[StageCost] | None = None) -> float:
    """A lower bound on `estimate(...).step_s` for any sync (transfers, all-reduces and
    sync left out). In each replica, with n microbatches on a lane and w_s the work of
    one microbatch on stage s, stage k cannot start before microbatch 0 has gone forward
    through stages 0..k-1 and the step cannot end before the last one has come back
    through them: T >= sum_{s<k} w_s + n w_k, for every k (1F1B's fill and drain).

    With `partition` as it will be simulated, w_s is taken on each replica's fastest
    device of stage s. With `uniform` (the stage costs of a layout whose stages all have
    alike devices) the bound holds for every split whose slowest stage is
    `partition.bottleneck_s`, so a greedy split bounds the ILP's: stages k.. hold at most
    the layers that fit in that time (`cap`), the others hold the rest."""
    if uniform is not None:
        return _uniform_lower_bound(layout, partition, ctx, uniform)
    bound = 0.0
    shares = replica_microbatches(ctx.config, layout, ctx)
    for replica, share in zip(layout.replicas, shares, strict=True):
        work = []
        for s, stage in enumerate(replica):
            fastest = min(stage, key=ctx.layer_train_s)
            t = layout.tp(s)
            seconds = partition.layers[s] * _tp_layer_s(ctx, t, fastest)
            if s == layout.head_stage:
                seconds += _tp_head_s(ctx, t, fastest,
                                      ctx.head_loss_s(fastest, partition.layers[s]))
            work.append((seconds, share // len(stage)))
        bound = max(bound, _fill_drain(work))
    return bound * (1 - 1e-9)


def _fill_drain(work: list[tuple[float, int]]) -> float:
    """max_k sum_{s<k} w_s + n_k w_k over (w_s, n_s) in pipeline order."""
    best, before = 0.0, 0.0
    for seconds, n in work:
        best = max(best, before + n * seconds)
        before += seconds
    return best


def _uniform_lower_bound(layout: Layout, partition: Partition, ctx: Context,
                         stage_costs: list[StageCost]) -> float:
    layers = ctx.config.model.layers
    top = partition.bottleneck_s * (1 + 1e-9)
    caps = [min(c.max_layers(layers), max(0, math.floor((top - c.fixed_seconds)
                                                        / c.seconds_per_layer)))
            if c.seconds_per_layer > 0 else layers for c in stage_costs]
    shares = replica_microbatches(ctx.config, layout, ctx)
    bound = 0.0
    for replica, share in zip(layout.replicas, shares, strict=True):
        for k, cost in enumerate(stage_costs):
            before_layers = max(k, layers - sum(caps[k:]))
            own = max(1, layers - before_layers - sum(caps[k + 1:]))
            before = before_layers * min(c.seconds_per_layer for c in stage_costs[:k]) \
                if k else 0.0
            bound = max(bound, before + (share // len(replica[k])) * cost.seconds(own))
        bound = max(bound, partition.bottleneck_s * min(share // len(stage)
                                                        for stage in replica))
    return bound * (1 - 1e-9)


def tp_link(ctx: Context, device: str) -> tuple[float, float]:
    """(latency s, bytes/s each way) between the GPUs of `device`'s host: a TP group's link."""
    gbps, _ = ctx.network.intra_host(host_of(device))
    return INTRA_HOST_LATENCY_MS / 1000, costs.gbps_to_bytes_per_s(gbps)


def _reserved_in_flight(ctx: Context, stage: int, stages: int, microbatches: int,
                        loss_at: str) -> int:
    """Microbatches the layer split reserves memory for on `stage`: the assumed number,
    else 1F1B's cap."""
    wanted = ctx.assumptions.in_flight
    if isinstance(wanted, int):
        return wanted
    return in_flight_cap(stage, stages, microbatches, loss_at)


def assumed_in_flight(layout: Layout, partition: Partition, ctx: Context,
                      skipping: bool = False) -> dict[str, int] | None:
    """Per device, the microbatches it may hold under the cost assumptions: a number for
    every device, what memory allows (`memory`, or `auto` with skip routes), or None
    (`auto`: 1F1B's `in_flight_cap`)."""
    wanted = ctx.assumptions.in_flight
    if isinstance(wanted, int):
        return dict.fromkeys(layout.devices(), wanted)
    if wanted == "memory" or skipping:
        return memory_in_flight(layout, partition, ctx)
    return None


def _tp_layer_s(ctx: Context, t: int, device: str) -> float:
    """Forward + backward seconds of one layer for one microbatch on `device`'s TP group."""
    allreduce = tensor_parallel.activation_allreduce_seconds(
        ctx.config.model, ctx.microbatch, t, *tp_link(ctx, device)) if t > 1 else 0.0
    return tensor_parallel.split_seconds(
        ctx.layer_train_s(device), t,
        tensor_parallel.allreduces_per_layer(ctx.config.training.recompute), allreduce)


def _tp_head_s(ctx: Context, t: int, device: str, seconds: float) -> float:
    """The head and loss of one microbatch (`seconds` on one GPU) on a TP group of t."""
    allreduce = tensor_parallel.activation_allreduce_seconds(
        ctx.config.model, ctx.microbatch, t, *tp_link(ctx, device)) if t > 1 else 0.0
    return tensor_parallel.split_seconds(seconds, t, 1, allreduce)


def _equal_partition(stage_costs: list[StageCost], layers: int, name: str) -> Partition:
    """Megatron's split: the same number of layers everywhere (remainder to the first)."""
    n = len(stage_costs)
    counts = [layers // n + (1 if i < layers % n else 0) for i in range(n)]
    for i, (cost, count) in enumerate(zip(stage_costs, counts, strict=True)):
        if cost.bytes(count) > cost.capacity_bytes:
            short = (cost.bytes(count) - cost.capacity_bytes) / costs.GIB
            raise InputError(f"{name} split equally does not fit: stage {i} (device "
                             f"{cost.device}) needs {short:.1f} GiB more for {count} layers")
    seconds = tuple(c.seconds(k) for c, k in zip(stage_costs, counts, strict=True))
    return Partition(tuple(counts), seconds, max(seconds), "equal")


def routes_of(replica: Stages, microbatches: int, first_id: int = 0) -> list[Route]:
    """Full-pipeline routes: microbatch m uses device m mod size of every stage."""
    return [Route(first_id + m, tuple(stage[m % len(stage)] for stage in replica))
            for m in range(microbatches)]


def _slowest_lane(replica: Stages, ctx: Context, lanes: int) -> int:
    """The lane to simulate for all: the one whose slowest device is slowest."""
    if lanes == 1:
        return 0

    def speed(j: int) -> float:
        return min(ctx.tflops(stage[j]) or math.inf for stage in replica)

    return min(range(lanes), key=speed)


def _lane_sampled(replica: Stages) -> bool:
    return len({len(stage) for stage in replica}) == 1 and len(replica[0]) > 1


def estimate(layout: Layout, partition: Partition, ctx: Context, sync: str,
             routes: list[list[Route]] | None = None, timeline: bool = True,
             in_flight: Mapping[str, int] | None = None) -> Estimate:
    """`_estimate`; with a calibration, where CPU workers share a machine's cores, again
    with the busy fraction it predicts (workers waiting in a bubble leave their core to
    the others; `holmes.calibration`), CPU_SHARING_ROUNDS times. Without one every worker
    counts as always busy (docs/fidelity.md has both, measured)."""
    result = _estimate(layout, partition, ctx, sync, routes, timeline, in_flight)
    if ctx.topology.calibration is None or not calibration.shares_cores(ctx.topology,
                                                                        layout.devices()):
        return result
    for _ in range(CPU_SHARING_ROUNDS):
        busy = calibration.busy_fraction(result.bubble_fraction, result.iteration_s,
                                         result.step_s)
        result = _estimate(layout, partition, dataclasses.replace(ctx, busy_fraction=busy),
                           sync, routes, timeline, in_flight)
    return result


CPU_SHARING_ROUNDS = 2


def _estimate(layout: Layout, partition: Partition, ctx: Context, sync: str,
              routes: list[list[Route]] | None = None, timeline: bool = True,
              in_flight: Mapping[str, int] | None = None) -> Estimate:
    """Simulate every replica with `partition` and add the sync between replicas.

    `routes` (per replica) default to full-pipeline routes; a plan's own routes may be
    given instead (skipping routes are simulated as they are, without lane sampling).
    `in_flight` caps the microbatches each device holds at once (default: 1F1B's
    `in_flight_cap`); the memory estimate follows it.
    """
    shares = replica_microbatches(ctx.config, layout, ctx)
    if in_flight is None:
        in_flight = assumed_in_flight(layout, partition, ctx)
    all_routes = routes or [routes_of(replica, share, first)
                            for replica, share, first in zip(layout.replicas, shares,
                                                             _first_ids(shares), strict=True)]
    results = []
    alike: dict[tuple, SimResult] = {}  # replicas whose simulated lane is the same
    bytes_per_step: Counter[str] = Counter()
    forced = socket_forced(layout, ctx, sync)
    for r, replica in enumerate(layout.replicas):
        routes = all_routes[r]
        full = all(len(rt.nodes) == len(replica) for rt in routes)
        # Lanes beyond the replica's microbatches stay idle: sample only busy ones.
        lanes = min(len(replica[0]), len(routes)) if full and _lane_sampled(replica) else 1
        simulated = routes[_slowest_lane(replica, ctx, lanes)::lanes]
        spec = _spec(layout, replica, partition, ctx, simulated, lanes, forced, in_flight)
        key = _lane_key(spec, ctx)
        result = alike.get(key) if key is not None else None
        if result is None:
            result = simulate(spec, record_timeline=timeline and r == 0)
            if key is not None:
                alike[key] = result
        results.append(result)
        for (a, b), nbytes in result.bytes_per_link.items():
            bytes_per_step[_link_class(ctx, a, b)] += nbytes * lanes
        _add_data_parallel_bytes(bytes_per_step, layout, replica, partition, ctx)
        _add_tensor_parallel_bytes(bytes_per_step, layout, replica, partition, ctx,
                                   len(routes))
    iteration_s = max(r.iteration_s for r in results) + calibration.step_overhead_s(ctx.topology)
    sync_s, notes = _sync_cost(layout, partition, ctx, sync, iteration_s, bytes_per_step,
                               forced)
    step_s = iteration_s + sync_s
    tokens = ctx.config.training.global_batch * ctx.config.model.seq_len
    return Estimate(
        layout=layout, partition=partition, sync=sync, iteration_s=iteration_s,
        sync_s_per_step=sync_s, tokens_per_s=tokens / step_s if step_s > 0 else 0.0,
        bubble_fraction=max(r.bubble_fraction() for r in results),
        bytes_per_step=dict(bytes_per_step), memory_gb=_memory_gb(layout, partition, ctx,
                                                                   in_flight),
        routes=all_routes, simulation=results[0], notes=notes,
        in_flight=dict(in_flight) if in_flight else None)


def _lane_key(spec: PipelineSpec, ctx: Context) -> tuple | None:
    """Everything the simulation of `spec` depends on when all its routes take one path
    (a sampled lane): per stage its seconds, tail and memory cap, per hop its latency,
    bandwidth and link class, the loss. Two replicas with equal keys simulate alike (a
    layout of one replica per site or fabric has many), so one result serves both; None
    when the routes differ (skipping, unequal widths)."""
    paths = {route.nodes for route in spec.routes}
    if len(paths) != 1:
        return None
    path = paths.pop()
    hops = list(itertools.pairwise(path)) + ([(path[-1], path[0])]
                                             if spec.loss_at == "origin" else [])
    link = [(spec.latency_s(a, b), spec.bandwidth_Bps(a, b), spec.latency_s(b, a),
             spec.bandwidth_Bps(b, a), _link_class(ctx, a, b)) for a, b in hops]
    loss = spec.loss_s if isinstance(spec.loss_s, float) else \
        tuple(spec.loss_s.get(d, 0.0) for d in path)
    return (len(spec.routes), spec.activation_bytes, spec.backward_ratio, spec.loss_at, loss,
            tuple(spec.forward_s[d] for d in path),
            tuple((spec.tail_s or {}).get(d, 0.0) for d in path),
            tuple((spec.memory_limit or {}).get(d) for d in path), tuple(link))


def full_pipeline_specs(est: Estimate, ctx: Context,
                        in_flight: Mapping[str, int] | None = None) -> list[PipelineSpec]:
    """Per replica of `est`, the simulator's input for its full-pipeline routes over every
    device (no lane sampling): the starting point of a path scheduler."""
    return layout_specs(est.layout, est.partition, est.sync, ctx, in_flight)


def layout_specs(layout: Layout, partition: Partition, sync: str, ctx: Context,
                 in_flight: Mapping[str, int] | None = None) -> list[PipelineSpec]:
    """`full_pipeline_specs` of a layout not yet estimated (no simulation is run)."""
    shares = replica_microbatches(ctx.config, layout, ctx)
    forced = socket_forced(layout, ctx, sync)
    if in_flight is None:
        in_flight = assumed_in_flight(layout, partition, ctx)
    return [_spec(layout, replica, partition, ctx, routes_of(replica, share, first), 1,
                  forced, in_flight)
            for replica, share, first in zip(layout.replicas, shares, _first_ids(shares),
                                             strict=True)]


def _spec(layout: Layout, replica: Stages, partition: Partition, ctx: Context,
          routes: list[Route], lanes: int, forced: frozenset[str],
          in_flight: Mapping[str, int] | None = None) -> PipelineSpec:
    model = ctx.config.model
    forward, tails, limits = {}, {}, {}
    share = _lane_share(replica, layout.loss_at) if lanes > 1 else Counter()
    used = {d for route in routes for d in route.nodes}
    for s, stage in enumerate(replica):
        t = layout.tp(s)
        allreduce = _stage_allreduce_s(stage, partition.layers[s], _holds(layout, s), ctx,
                                       forced, t) if ctx.assumptions.data_parallel == "counted" \
            else 0.0
        for device in (d for d in stage if d in used):
            forward[device] = partition.layers[s] * ctx.microbatch * ctx.layer_forward_s(device) \
                if t == 1 else \
                partition.layers[s] * _tp_layer_s(ctx, t, device) / (1.0 + ctx.backward_ratio)
            tails[device] = allreduce
            limits[device] = (in_flight or {}).get(device) or in_flight_cap(
                s, len(replica), len(routes), layout.loss_at)
    ratio = ctx.backward_ratio
    head_layers, head_tp = partition.layers[layout.head_stage], layout.tp(layout.head_stage)
    loss = {d: _tp_head_s(ctx, head_tp, d, ctx.head_loss_s(d, head_layers))
            for d in replica[layout.head_stage] if d in used}
    hop_s, link_share = ctx.assumptions.hop_seconds, ctx.assumptions.link_efficiency

    def link(a: str, b: str) -> tuple[float, float]:
        return ctx.network.device_link(a, b, socket=a in forced or b in forced)

    def latency(a: str, b: str) -> float:
        return link(a, b)[0] / 1000 + hop_s

    def bandwidth(a: str, b: str) -> float:
        shared = share.get(frozenset((host_of(a), host_of(b))), 1)
        return costs.gbps_to_bytes_per_s(link(a, b)[1]) * link_share / max(1, shared)

    return PipelineSpec(
        forward_s=forward, routes=routes,
        activation_bytes=costs.boundary_activation_bytes(model, ctx.microbatch),
        latency_s=latency, bandwidth_Bps=bandwidth, backward_ratio=ratio, loss_s=loss,
        memory_limit=limits, tail_s=tails, loss_at=layout.loss_at)


def _lane_share(replica: Stages, loss_at: str) -> Counter[frozenset[str]]:
    """How many lanes cross each host pair (with the loss at the origin, a lane's hops
    include the return from its last stage to its first)."""
    share: Counter[frozenset[str]] = Counter()
    for j in range(len(replica[0])):
        hosts = [host_of(stage[j]) for stage in replica]
        hops = list(itertools.pairwise(hosts))
        if loss_at == "origin":
            hops.append((hosts[-1], hosts[0]))
        share.update({frozenset(hop) for hop in hops if hop[0] != hop[1]})
    return share


def _holds(layout: Layout, stage: int) -> tuple[bool, bool]:
    """(embedding, head) held by `stage`."""
    return stage == 0, stage == layout.head_stage


def _stage_params(model, layers: int, holds: tuple[bool, bool]) -> int:  # noqa: ANN001
    params = layers * costs.layer_params(model)
    params += costs.embedding_params(model) if holds[0] else 0
    params += costs.head_params(model) if holds[1] else 0
    return params


def _gradient_bytes(ctx: Context, layers: int, holds: tuple[bool, bool]) -> float:
    grad_bytes = costs.TRAINING_BYTES_PER_PARAM[ctx.config.model.dtype][1]
    return _stage_params(ctx.config.model, layers, holds) * grad_bytes


def _ring_link(devices: list[str], ctx: Context, forced: frozenset[str]
               ) -> tuple[float, float]:
    """(latency s, bytes/s) of the slowest hop of a ring over `devices` in host order,
    on sockets when any member's traffic is `forced` there."""
    hosts = list(dict.fromkeys(host_of(d) for d in devices))
    socket = any(d in forced for d in devices)
    if len(hosts) == 1:
        latency_ms, gbps = ctx.network.host_link(hosts[0], hosts[0])
    else:
        hops = [ctx.network.host_link(a, b, socket)
                for a, b in zip(hosts, hosts[1:] + hosts[:1], strict=True)]
        latency_ms, gbps = max(h[0] for h in hops), min(h[1] for h in hops)
    return latency_ms / 1000, costs.gbps_to_bytes_per_s(gbps) * ctx.assumptions.link_efficiency


def _stage_allreduce_s(stage: tuple[str, ...], layers: int, holds: tuple[bool, bool],
                       ctx: Context, forced: frozenset[str], t: int = 1) -> float:
    """The stage's data-parallel all-reduce; with TP degree t, t rings (one per TP rank)
    over 1/t of the gradients each, sharing the links."""
    latency, bandwidth = _ring_link(list(stage), ctx, forced)
    return costs.allreduce_seconds(_gradient_bytes(ctx, layers, holds) / t, len(stage),
                                   latency, bandwidth / t)


def _add_data_parallel_bytes(total: Counter[str], layout: Layout, replica: Stages,
                             partition: Partition, ctx: Context) -> None:
    for s, stage in enumerate(replica):
        n = len(stage)
        if n > 1:
            moved = 2 * (n - 1) * _gradient_bytes(ctx, partition.layers[s], _holds(layout, s))
            total[_group_class(ctx, list(stage))] += moved


def _add_tensor_parallel_bytes(total: Counter[str], layout: Layout, replica: Stages,
                               partition: Partition, ctx: Context, microbatches: int) -> None:
    """The TP all-reduces of every microbatch through each stage (inside hosts)."""
    model, training = ctx.config.model, ctx.config.training
    for s in range(len(replica)):
        per_layer = tensor_parallel.allreduce_bytes_per_layer(
            model, ctx.microbatch, training.recompute, layout.tp(s))
        if per_layer:
            total["intra_host"] += per_layer * partition.layers[s] * microbatches


def _sync_cost(layout: Layout, partition: Partition, ctx: Context, sync: str,
               iteration_s: float, total: Counter[str],
               forced: frozenset[str]) -> tuple[float, list[str]]:
    replicas = len(layout.replicas)
    if replicas == 1 or sync == "none":
        return 0.0, []
    seconds, notes = 0.0, []
    for s in range(layout.stages):
        across = [replica[s][0] for replica in layout.replicas]
        latency, bandwidth = _ring_link(across, ctx, forced)
        rings = _parallel_rings(layout, s)
        grads = _gradient_bytes(ctx, partition.layers[s], _holds(layout, s))
        group_class = _group_class(ctx, across)
        if sync == "allreduce":  # one shard per lane, then a broadcast in each stage
            seconds = max(seconds, costs.allreduce_seconds(grads, replicas, latency,
                                                           bandwidth * rings))
            total[group_class] += 2 * (replicas - 1) * grads
            for replica in layout.replicas:
                if len(replica[s]) > 1:
                    total[_group_class(ctx, list(replica[s]))] += (len(replica[s]) - 1) * grads
            continue
        lanes = min(len(replica[s]) for replica in layout.replicas)
        stall, moved = _diloco_stage_cost(ctx, partition.layers[s], _holds(layout, s),
                                          replicas, latency, bandwidth, iteration_s,
                                          lanes, rings)
        seconds = max(seconds, stall)
        total[group_class] += moved * (lanes if ctx.diloco.exchange == "per_lane" else 1)
        if lanes > 1 and ctx.diloco.exchange != "per_lane":  # passed on inside each stage
            relayed = _diloco_relay_bytes(ctx, partition.layers[s], _holds(layout, s), lanes)
            for replica in layout.replicas:
                total[_group_class(ctx, list(replica[s][:lanes]))] += relayed
    if sync == "diloco":
        notes.append(f"DiLoCo exchange per step amortised over H={ctx.diloco.sync_every}")
    return seconds, notes


def _parallel_rings(layout: Layout, stage: int) -> int:
    """Hosts per replica in `stage`: a hierarchical all-reduce runs one cross-replica ring
    per host (each on its own NIC) over a shard of the stage's gradients."""
    return min(len({host_of(d) for d in replica[stage]}) for replica in layout.replicas)


def diloco_exchange_s(est: Estimate, ctx: Context) -> float:
    """Seconds of the slowest single DiLoCo exchange of `est`: one fragment of a stage
    all-reduced between the replicas over that stage's slowest cross-replica hop (what a
    replica waits for at worst when nothing overlaps it); 0 with one replica."""
    layout, partition = est.layout, est.partition
    if len(layout.replicas) == 1:
        return 0.0
    forced = socket_forced(layout, ctx, est.sync)
    slowest = 0.0
    for s in range(layout.stages):
        latency, bandwidth = _ring_link([r[s][0] for r in layout.replicas], ctx, forced)
        bandwidth *= _parallel_rings(layout, s)
        fragment = _fragment_bytes(ctx, partition.layers[s], _holds(layout, s))
        slowest = max(slowest, costs.allreduce_seconds(fragment, len(layout.replicas),
                                                       latency, bandwidth))
    return slowest


def _fragment_bytes(ctx: Context, layers: int, holds: tuple[bool, bool]) -> float:
    d = ctx.diloco
    params = _stage_params(ctx.config.model, layers, holds)
    return params * QUANTIZED_BYTES_PER_PARAM[d.quantization] / d.fragments


def _diloco_stage_cost(ctx: Context, layers: int, holds: tuple[bool, bool], replicas: int,
                       latency: float, bandwidth: float, iteration_s: float, lanes: int,
                       rings: int) -> tuple[float, float]:
    """(stall seconds per step, bytes one lane moves across replicas per step) of
    streaming DiLoCo for one stage of `lanes` lanes on `rings` hosts per replica. `lead`:
    one lane exchanges each fragment on one ring; `sharded`: each lane 1/lanes of it on its
    own ring; `per_lane`: every lane all of it, each on its own ring (the passing on inside
    the stage, fp32 on the stage's fast links, is left out of the time)."""
    d = ctx.diloco
    fragment = _fragment_bytes(ctx, layers, holds)
    if d.exchange == "lead" or lanes == 1:
        exchange = costs.allreduce_seconds(fragment, replicas, latency, bandwidth)
    elif d.exchange == "sharded":
        exchange = costs.allreduce_seconds(fragment / lanes, replicas, latency,
                                           bandwidth * rings / lanes)
    else:
        exchange = costs.allreduce_seconds(fragment, replicas, latency,
                                           bandwidth * rings / lanes)
    stall_per_event = max(0.0, exchange - d.overlap_steps * iteration_s)
    per_step = d.fragments / d.sync_every
    return stall_per_event * per_step, 2 * (replicas - 1) * fragment * per_step


def _diloco_relay_bytes(ctx: Context, layers: int, holds: tuple[bool, bool],
                        lanes: int) -> float:
    """Bytes per step that one replica's stage of `lanes` lanes moves inside itself to share
    one DiLoCo exchange: each fragment's fp32 average reaches the other lanes once (lead's
    broadcast and the sharded all-gather move the same)."""
    d = ctx.diloco
    params = _stage_params(ctx.config.model, layers, holds)
    return (lanes - 1) * params * 4.0 / d.sync_every


def _link_class(ctx: Context, a: str, b: str) -> str:
    return _host_class(ctx, host_of(a), host_of(b))


def _group_class(ctx: Context, devices: list[str]) -> str:
    hosts = list(dict.fromkeys(host_of(d) for d in devices))
    order = ["intra_host", "intra_fabric", "inter_fabric", "inter_site"]
    classes = [_host_class(ctx, a, b) for a in hosts for b in hosts if a < b] or ["intra_host"]
    return max(classes, key=order.index)


def _host_class(ctx: Context, a: str, b: str) -> str:
    if a == b:
        return "intra_host"
    if ctx.fabrics_of(a) & ctx.fabrics_of(b):
        return "intra_fabric"
    if ctx.topology.host(a).site == ctx.topology.host(b).site:
        return "inter_fabric"
    return "inter_site"


def _memory_gb(layout: Layout, partition: Partition, ctx: Context,
               in_flight: Mapping[str, int] | None = None) -> dict[str, float]:
    memory = {}
    shares = replica_microbatches(ctx.config, layout, ctx)
    for replica, share in zip(layout.replicas, shares, strict=True):
        lanes = len(replica[0]) if _lane_sampled(replica) else 1
        for s, stage in enumerate(replica):
            by_held: dict[int, float] = {}  # every device of a stage holding as many alike
            for device in stage:
                held = (in_flight or {}).get(device) or in_flight_cap(
                    s, layout.stages, share // lanes, layout.loss_at)
                if held not in by_held:
                    by_held[held] = round(_device_memory(layout, partition, ctx, s, held)
                                          / costs.GB, 3)
                memory.update(dict.fromkeys(layout.members(device), by_held[held]))
    return memory


def _device_memory(layout: Layout, partition: Partition, ctx: Context, stage: int,
                   in_flight: int) -> float:
    """Bytes a device of `stage` uses holding `in_flight` microbatches."""
    return costs.stage_memory(
        ctx.config.model, layers=partition.layers[stage], microbatch=ctx.microbatch,
        in_flight=in_flight, holds_embedding=stage == 0,
        holds_head=stage == layout.head_stage, recompute=ctx.config.training.recompute,
        tensor_parallel=layout.tp(stage), optimizer_shards=optimizer_shards(layout, stage,
                                                                            ctx)).total


def optimizer_shards(layout: Layout, stage: int, ctx: Context) -> int:
    """Over how many devices a device of `stage` shares its optimizer state: the stage's
    narrowest data-parallel width with ZeRO-1 (each replica shards over its own width;
    the narrowest is the one that holds most per device), 1 without sharding."""
    if ctx.optimizer_sharding == "none":
        return 1
    return min(len(replica[stage]) for replica in layout.replicas)


def memory_in_flight(layout: Layout, partition: Partition, ctx: Context) -> dict[str, int]:
    """Per device, the most microbatches whose activations fit in its memory beside its
    weights, gradients and optimizer state (at least 1, at most its replica's share).
    Skip routes are not lock-step like 1F1B, so they get what memory allows."""
    caps = {}
    shares = replica_microbatches(ctx.config, layout, ctx)
    for replica, share in zip(layout.replicas, shares, strict=True):
        for s, stage in enumerate(replica):
            fixed = _device_memory(layout, partition, ctx, s, 0)
            per = _device_memory(layout, partition, ctx, s, 1) - fixed
            for device in stage:
                room = ctx.memory_bytes(device) - fixed
                fits = int(room // per) if per > 0 else share
                caps[device] = max(1, min(share, fits))
    return caps
