"""Turning the planner's decision into a Plan (plan.yaml) and its summary in words.

Ranks follow the `launch` section: hosts in topology order, devices in host order.
Groups (`holmes.transports.layout_groups`): one `pipeline` group per replica (its P2P
traffic, plus one per RDMA fabric for the hops inside it when NCCL picks its network per
communicator), one `data` group per stage with several devices, and one `diloco` (or
`replica`, for per-step all-reduce) group per stage lane when there are several replicas.
Each group carries the transport it really runs on, the `ncclConfig_t` fields that ask
NCCL for it, and the environment for its NICs (`holmes.nics`). Hosts left out and devices
no stage uses are listed with the reason (`left_out`, `idle`).
"""

from __future__ import annotations

import math
from collections import Counter

from holmes.estimate import Estimate, diloco_exchange_s, optimizer_shards
from holmes.fabric import fabric_of_host
from holmes.network import host_of
from holmes.nics import group_env
from holmes.plan import (
    PLAN_VERSION,
    DepthEstimate,
    DilocoSettings,
    Estimates,
    Group,
    IdleDevice,
    LaunchHost,
    LaunchPolicy,
    LeftOutHost,
    MicrobatchPath,
    OptimizerSettings,
    Plan,
    PlanModel,
    Replica,
    Skipping,
    Stage,
)
from holmes.planner import Decision
from holmes.transports import effective_transports, layout_groups, nccl_config
from topology.schema import Topology

IDLE_WARNING_FRACTION = 0.10

RDZV_PORT = 29400
HANG_TIMEOUT_FLOOR_S = 60.0
HANG_TIMEOUT_STEPS = 10
HANG_EXCHANGES = 2
DILOCO_TIMEOUT_FLOOR_S = 60.0
DILOCO_TIMEOUT_EXCHANGES = 10
DILOCO_AFTER_HANG_S = 30.0


def build_plan(decision: Decision, topology_file: str | None = None,
               model_source: str | None = None) -> Plan:
    chosen, ctx = decision.chosen, decision.context
    topology, config = ctx.topology, ctx.config
    launch = _launch(topology, chosen)
    ranks = {d: i for i, d in enumerate(d for h in launch for d in h.devices)}
    backend = "gloo" if any(_device_kind(topology, d) == "cpu" for d in ranks) else "nccl"
    exchange_s = diloco_exchange_s(chosen, ctx) if chosen.sync == "diloco" else 0.0
    hang_s = hang_timeout_s(chosen.step_s, exchange_s)
    return Plan(
        version=PLAN_VERSION,
        topology_sha256=(decision.source or topology).sha256(),
        topology_file=topology_file,
        model=PlanModel(name=config.model.name, source=model_source, layers=config.model.layers,
                        hidden=config.model.hidden, seq_len=config.model.seq_len,
                        microbatch=config.training.microbatch,
                        global_batch=config.training.global_batch, dtype=config.model.dtype),
        sync="diloco" if chosen.sync == "diloco" else "allreduce",
        replicas=_replicas(decision),
        stages=_stages(chosen),
        paths=[MicrobatchPath(microbatch=r.microbatch, origin=r.nodes[0], route=list(r.nodes))
               for routes in chosen.routes for r in routes],
        skipping=_skipping(decision),
        groups=_groups(decision, ranks, backend),
        nccl_net_selection=ctx.selection if backend == "nccl" else None,
        diloco=_diloco(decision, diloco_timeout_s(exchange_s, hang_s))
        if chosen.sync == "diloco" else None,
        optimizer=OptimizerSettings(sharding=ctx.optimizer_sharding),
        launch=launch,
        launch_policy=LaunchPolicy(hang_timeout_s=hang_s),
        estimates=Estimates(
            iteration_s=round(chosen.step_s, 6), tokens_per_s=round(chosen.tokens_per_s, 1),
            bytes_per_step={k: round(v) for k, v in sorted(chosen.bytes_per_step.items())},
            memory_gb=chosen.memory_gb, bubble_fraction=round(chosen.bubble_fraction, 4),
            sync_s_per_step=round(chosen.sync_s_per_step, 6)),
        costs=ctx.assumptions,
        depths=[DepthEstimate(regime=e.layout.regime, stages=e.layout.stages,
                              iteration_s=round(e.step_s, 6),
                              tokens_per_s=round(e.tokens_per_s, 1))
                for e in decision.by_depth()],
        left_out=[LeftOutHost(host=h.host, reason=h.reason) for h in decision.left_out],
        idle=idle_devices(decision),
    )


def hang_timeout_s(step_s: float, exchange_s: float = 0.0) -> float:
    """How long a host may make no progress before the launcher calls it hung: ten of the
    plan's estimated steps, never under a minute, and at least twice the slowest DiLoCo
    exchange (a step may wait for one that nothing overlapped)."""
    return float(max(HANG_TIMEOUT_FLOOR_S, math.ceil(HANG_TIMEOUT_STEPS * step_s),
                     math.ceil(HANG_EXCHANGES * exchange_s)))


def _device_kind(topology: Topology, device: str) -> str:
    host, name = device.split(":", 1)
    return next(d.kind for d in topology.host(host).devices if d.name == name)


def _launch(topology: Topology, chosen: Estimate) -> list[LaunchHost]:
    used = set(chosen.layout.devices())
    hosts = []
    for host in topology.hosts:
        devices = [f"{host.name}:{d.name}" for d in host.devices if f"{host.name}:{d.name}" in used]
        if devices:
            hosts.append((host, devices))
    first = hosts[0][0].address or hosts[0][0].name
    endpoint = f"[{first}]:{RDZV_PORT}" if ":" in first else f"{first}:{RDZV_PORT}"
    return [LaunchHost(host=h.name, address=h.address or h.name, node_rank=i,
                       nproc_per_node=len(devices), devices=devices, rdzv_endpoint=endpoint)
            for i, (h, devices) in enumerate(hosts)]


def _replicas(decision: Decision) -> list[Replica]:
    layout = decision.chosen.layout
    replicas = []
    for r, replica in enumerate(layout.replicas):
        hosts = {host_of(d) for stage in replica for d in stage}
        fabrics = [f.name for f in decision.fabrics if hosts & set(f.hosts)]
        replicas.append(Replica(id=r, fabrics=fabrics,
                                stages=[r * layout.stages + s for s in range(layout.stages)]))
    return replicas


def _stages(chosen: Estimate) -> list[Stage]:
    layout, ranges = chosen.layout, chosen.partition.ranges()
    def holds(s: int) -> list[str]:
        return (["embedding"] if s == 0 else []) + (["head"] if s == layout.head_stage else [])

    return [Stage(id=r * layout.stages + s, replica=r, layers=ranges[s],
                  devices=[m for d in stage for m in layout.members(d)], holds=holds(s),
                  tensor_parallel=layout.tp(s))
            for r, replica in enumerate(layout.replicas) for s, stage in enumerate(replica)]


def _groups(decision: Decision, ranks: dict[str, int], backend: str) -> list[Group]:
    ctx = decision.context
    selection = ctx.selection if backend == "nccl" else "per-process"
    members = layout_groups(decision.chosen.layout, decision.chosen.sync, decision.fabrics,
                            fabric_pipelines=selection == "per-communicator")
    transports = effective_transports({n: d for n, (_, d) in members.items()},
                                      decision.fabrics, selection)
    groups = []
    for name, (kind, devices) in members.items():
        transport = "socket" if backend == "gloo" else transports[name]
        env = group_env(ctx.topology, [host_of(d) for d in devices], backend, transport,
                        selection)
        groups.append(Group(
            name=name, kind=kind, ranks=sorted(ranks[d] for d in devices), backend=backend,
            transport=transport,
            nccl_config=nccl_config(transport, selection) if backend == "nccl" else {},
            env=env.common, env_per_host=env.per_host))
    return groups


def idle_devices(decision: Decision) -> list[IdleDevice]:
    """Every device of the given topology that no stage uses, with the reason."""
    topology = decision.source or decision.context.topology
    used = set(decision.chosen.layout.devices())
    left = {h.host: h.reason for h in decision.left_out}
    idle = []
    for host in topology.hosts:
        for device in host.devices:
            name = f"{host.name}:{device.name}"
            if name in used:
                continue
            reason = f"host left out: {left[host.name]}" if host.name in left \
                else _idle_reason(decision, host.name)
            idle.append(IdleDevice(device=name, reason=reason))
    return idle


def _idle_reason(decision: Decision, host: str) -> str:
    fabric = fabric_of_host(decision.fabrics, host)
    layout = decision.chosen.layout
    devices = [f"{h}:{d.name}" for h in fabric.hosts
               for d in decision.context.topology.host(h).devices]
    stages = [stage for replica in layout.replicas for stage in replica
              if host_of(stage[0]) in fabric.hosts]
    if not stages:
        return f"fabric {fabric.name} ({len(devices)} devices) holds no stage of the chosen " \
               f"layout ({layout.description})"
    widths = "/".join(str(w) for w in sorted({len(s) for s in stages}))
    used = sum(len(s) for s in stages)
    return f"fabric {fabric.name}: stages of {widths} devices use {used} of its {len(devices)}"


def _skipping(decision: Decision) -> Skipping | None:
    choice, full = decision.skip, decision.full_pipeline
    if choice is None or full is None:
        return None
    return Skipping(ratio=choice.ratio, max_swaps=choice.max_swaps, seed=choice.seed,
                    in_flight=decision.chosen.in_flight or {},
                    full_pipeline_s=round(full.step_s, 6))


def _diloco(decision: Decision, timeout_s: float) -> DilocoSettings:
    d = decision.context.diloco
    return DilocoSettings(sync_every=d.sync_every, fragments=d.fragments, pattern=d.pattern,
                          overlap_steps=d.overlap_steps, alpha=d.alpha,
                          quantization=d.quantization, exchange=d.exchange,
                          timeout_s=timeout_s)


def diloco_timeout_s(exchange_s: float, hang_s: float) -> float:
    """How long a replica waits for a DiLoCo exchange: ten times the slowest exchange's
    estimate on the measured links, never under a minute, and longer than the launcher's
    hang timeout, so that a hung replica is named by the launcher before its peers give
    up waiting for it."""
    return float(max(DILOCO_TIMEOUT_FLOOR_S, math.ceil(DILOCO_TIMEOUT_EXCHANGES * exchange_s),
                     hang_s + DILOCO_AFTER_HANG_S))


def summary(decision: Decision, plan: Plan, topology_name: str) -> list[str]:
    """The plan in words: the header comment of plan.yaml and what `plan` prints. The
    first line says so when more than IDLE_WARNING_FRACTION of the devices sit idle."""
    chosen, model = decision.chosen, plan.model
    layout = chosen.layout
    fabrics = decision.fabrics
    sizes = ", ".join(f"{f.name}: {_count(len(f.hosts), 'host')}" for f in fabrics)
    lines = [
        f"hetsched plan for {model.name} on {topology_name} "
        f"(topology {plan.topology_sha256[:12]}).{idle_warning(plan)}",
        f"Regime: {decision.regime}"
        f"{f' ({decision.regime_note})' if decision.regime_note else ''}; "
        f"{_count(len(fabrics), 'fabric')} ({sizes}).",
        f"Layout: {layout.description}; {len(layout.replicas)} replica(s) x "
        f"{layout.stages} stages, layers per stage {list(chosen.partition.layers)} "
        f"({chosen.partition.method}).",
        tensor_parallel_line(plan),
    ]
    lines += _depth_lines(decision)
    lines += _sync_lines(decision)
    lines += tie_lines(decision)
    lines += _skip_lines(decision)
    lines += [f"Note: {note}." for note in decision.notes]
    lines.append(_optimizer_line(decision))
    lines += transport_lines(plan, decision.selection_detail)
    per_class = ", ".join(f"{k} {v / 1e9:.3g} GB"
                          for k, v in sorted(chosen.bytes_per_step.items())) or "none"
    lines.append(f"Estimated: {chosen.step_s:.4g} s/iteration, {chosen.tokens_per_s:,.0f} "
                 f"tokens/s, bubble {chosen.bubble_fraction:.0%}; bytes/step: {per_class}.")
    lines.append(f"Cost assumptions: {decision.context.assumptions.summary()}.")
    if decision.context.network.assumed:
        lines.append(f"{len(decision.context.network.assumed)} host pairs had no measured link; "
                     "their fabric or Ethernet NIC speed was assumed.")
    if decision.rejected:
        lines.append(f"{len(decision.rejected)} layouts did not fit in memory.")
    if decision.skipped:
        lines.append(f"{decision.skipped} layouts were not simulated: a lower bound on their "
                     "iteration (the slowest stage's work, pipeline fill and drain) could not "
                     "beat the plans found.")
    lines += left_out_lines(plan) + idle_lines(plan)
    return lines


def tensor_parallel_line(plan: Plan) -> str:
    """Tensor parallelism in words (the header and `show` say it either way)."""
    degrees = sorted({s.tensor_parallel for s in plan.stages})
    if degrees == [1]:
        return "Tensor parallel: none (TP 1: every device holds whole layers)."
    groups = sum(len(s.devices) // s.tensor_parallel for s in plan.stages
                 if s.tensor_parallel > 1)
    return (f"Tensor parallel: TP {'/'.join(map(str, degrees))} inside hosts ({groups} TP "
            "groups; each layer, the embedding and the head split over a group; per layer "
            "and microbatch 2 all-reduces of the activations forward and 2 backward over "
            "the host's GPU link, 2 more with full recomputation).")


def tie_lines(decision: Decision) -> list[str]:
    """The tie-break rule, and what it decided when other candidates were within it."""
    if decision.noise <= 0:
        return []
    rule = (f"Ties: candidates within {decision.noise:.0%} of the fastest estimate (the "
            "probe's noise) are ranked by bytes across sites, then bytes between hosts, then speed")
    others = [e for e in decision.ties if e is not decision.chosen]
    if not others:
        return [rule + "; no other candidate was that close."]
    beaten = "; ".join(f"{candidate_words(e)} {e.step_s:.4g} s/step, "
                       f"{e.bytes_per_step.get('inter_site', 0) / 1e6:.3g} MB/step across "
                       "sites" for e in others[:3])
    chosen = decision.chosen
    return [rule + f"; chosen {candidate_words(chosen)} ({chosen.step_s:.4g} s/step, "
            f"{chosen.bytes_per_step.get('inter_site', 0) / 1e6:.3g} MB/step across sites) "
            f"over {beaten}."]


def candidate_words(e: Estimate) -> str:
    """A candidate in a few words: replicas x stages x lanes and its sync."""
    lanes = max(len(stage) for stage in e.layout.replicas[0])
    return (f"{len(e.layout.replicas)} replica(s) x {e.layout.stages} stage(s) x {lanes} "
            f"lane(s), {e.sync}")


def _optimizer_line(decision: Decision) -> str:
    """How the optimizer state is held, and the memory that follows from it."""
    chosen, ctx = decision.chosen, decision.context
    memory = chosen.memory_gb
    peak = max(memory, key=memory.get) if memory else None
    at_peak = f"; peak {memory[peak]:.3g} GB per device ({peak})" if peak else ""
    if ctx.optimizer_sharding == "none":
        return f"Optimizer state: not sharded, whole on every device{at_peak}."
    widths = [optimizer_shards(chosen.layout, s, ctx) for s in range(chosen.layout.stages)]
    split = "/".join(str(w) for w in widths) if len(set(widths)) > 1 else str(widths[0])
    return (f"Optimizer state: ZeRO-1, split over each stage's data-parallel devices "
            f"({split} per stage){at_peak}.")


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def idle_share(plan: Plan) -> tuple[int, int]:
    """(idle devices, all devices of the topology), those of left-out hosts included."""
    return len(plan.idle), sum(len(s.devices) for s in plan.stages) + len(plan.idle)


def idle_warning(plan: Plan) -> str:
    """A sentence for the plan's first line when too many devices sit idle, else ''."""
    idle, total = idle_share(plan)
    if total == 0 or idle / total <= IDLE_WARNING_FRACTION:
        return ""
    return f" WARNING: {idle} of {total} devices ({idle / total:.0%}) sit idle (see idle)."


def left_out_lines(plan: Plan) -> list[str]:
    if not plan.left_out:
        return []
    hosts = "; ".join(f"{h.host}: {h.reason}" for h in plan.left_out[:5])
    more = f"; and {len(plan.left_out) - 5} more" if len(plan.left_out) > 5 else ""
    return [f"Left out: {_count(len(plan.left_out), 'host')} ({hosts}{more})."]


def fault_lines(plan: Plan) -> list[str]:
    """How the run is watched for faults: the launcher's hang timeout, DiLoCo's wait."""
    lines = [f"Faults: a host is hung after {plan.launch_policy.hang_timeout_s:g} s without "
             "a heartbeat or progress (launch_policy.hang_timeout_s)."]
    if plan.diloco is not None:
        lines.append(f"DiLoCo: a replica fails after waiting {plan.diloco.timeout_s:g} s for "
                     "an exchange (diloco.timeout_s).")
    return lines


def idle_lines(plan: Plan) -> list[str]:
    """Idle devices grouped by reason (every device is listed under `idle`)."""
    if not plan.idle:
        return []
    idle, total = idle_share(plan)
    reasons = Counter(d.reason for d in plan.idle)
    parts = [f"{n} x {reason}" for reason, n in reasons.most_common(4)]
    if len(reasons) > 4:
        parts.append(f"{len(reasons) - 4} more reasons")
    return [f"Idle: {idle} of {total} devices: {'; '.join(parts)}."]


def transport_lines(plan: Plan, detail: str) -> list[str]:
    """Which network the NCCL groups run on, and how it is chosen."""
    if plan.nccl_net_selection is None:
        return []
    counts = Counter(g.transport for g in plan.groups if g.transport is not None)
    spread = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    how = ("each NCCL group is created with its own ncclConfig_t net_name"
           if plan.nccl_net_selection == "per-communicator" else
           "NCCL_NET holds for every group of a process, so a process in any socket group "
           "runs all its groups on sockets")
    return [f"NCCL network {plan.nccl_net_selection} ({detail}): {how}; groups: {spread}."]


def _depth_lines(decision: Decision) -> list[str]:
    """Why this geo depth: each depth tried and its estimate, when more than one was."""
    tried = [e for e in decision.by_depth() if e.layout.regime == "geo"]
    if decision.regime != "geo" or len(tried) < 2:
        return []
    figures = ", ".join(f"{e.layout.stages}: {e.step_s:.4g} s" for e in tried)
    costs = decision.context.assumptions.name
    return [f"Depth: {decision.chosen.layout.stages} stages (geo depths tried, full-pipeline "
            f"s/iteration under {costs} costs: {figures})."]


def _skip_lines(decision: Decision) -> list[str]:
    choice, full = decision.skip, decision.full_pipeline
    if choice is None or full is None:
        return []
    chosen = decision.chosen
    stages = chosen.layout.stages
    visits = round((1 - choice.ratio) * (stages - 1))
    gain = 1 - chosen.step_s / full.step_s if full.step_s > 0 else 0.0
    return [f"Skipping (SkipPipe): k={choice.ratio:g}, each microbatch visits its origin and "
            f"{visits} of the other {stages - 1} stages, at most {choice.max_swaps} swaps; "
            f"{chosen.step_s:.4g} s/iteration vs {full.step_s:.4g} s for the full pipeline "
            f"on the same placement ({gain:.0%} less)."]


def _sync_lines(decision: Decision) -> list[str]:
    chosen = decision.chosen
    used = {fabric_of_host(decision.fabrics, host_of(d)).name for d in chosen.layout.devices()}
    if len(chosen.layout.replicas) == 1:
        if len(used) == 1:
            return [f"One replica inside fabric {used.pop()}: all its traffic stays there."]
        spanning = sum(len({fabric_of_host(decision.fabrics, host_of(d)).name
                            for d in stage}) > 1 for stage in chosen.layout.replicas[0])
        if spanning:
            return [f"One replica over {len(used)} fabrics; {_count(spanning, 'stage')} "
                    "span fabrics, so their data-parallel all-reduce crosses fabrics too."]
        return [f"One replica over {len(used)} fabrics: data-parallel groups stay inside "
                "their fabric; only pipeline traffic crosses fabrics."]
    alternatives = {e.sync: e for e in decision.candidates
                    if e.layout.replicas == chosen.layout.replicas}
    if decision.full_pipeline is not None:  # skip routes: the chosen sync's own figure
        alternatives[chosen.sync] = chosen
    parts = [f"{sync} {e.step_s:.4g} s/step" for sync, e in sorted(alternatives.items())]
    return [f"Sync between replicas: {chosen.sync} ({'; '.join(parts)})."]
