"""Turning the planner's decision into a Plan (plan.yaml) and its summary in words.

Ranks follow the `launch` section: hosts in topology order, devices in host order.
Groups: one `pipeline` group per replica (its P2P traffic), one `data` group per stage
with several devices, and one `diloco` (or `replica`, for per-step all-reduce) group per
stage lane when there are several replicas. Each group carries the NCCL/gloo environment chosen for
the NICs its hosts share (`holmes.nics`).
"""

from __future__ import annotations

from holmes.estimate import Estimate
from holmes.network import host_of
from holmes.nics import group_env
from holmes.plan import (
    PLAN_VERSION,
    DilocoSettings,
    Estimates,
    Group,
    LaunchHost,
    MicrobatchPath,
    Plan,
    PlanModel,
    Replica,
    Skipping,
    Stage,
)
from holmes.planner import Decision
from topology.schema import Topology

RDZV_PORT = 29400


def build_plan(decision: Decision, topology_file: str | None = None,
               model_source: str | None = None) -> Plan:
    chosen, ctx = decision.chosen, decision.context
    topology, config = ctx.topology, ctx.config
    launch = _launch(topology, chosen)
    ranks = {d: i for i, d in enumerate(d for h in launch for d in h.devices)}
    backend = "gloo" if any(_device_kind(topology, d) == "cpu" for d in ranks) else "nccl"
    return Plan(
        version=PLAN_VERSION,
        topology_sha256=topology.sha256(),
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
        diloco=_diloco(decision) if chosen.sync == "diloco" else None,
        launch=launch,
        estimates=Estimates(
            iteration_s=round(chosen.step_s, 6), tokens_per_s=round(chosen.tokens_per_s, 1),
            bytes_per_step={k: round(v) for k, v in sorted(chosen.bytes_per_step.items())},
            memory_gb=chosen.memory_gb, bubble_fraction=round(chosen.bubble_fraction, 4),
            sync_s_per_step=round(chosen.sync_s_per_step, 6)),
    )


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

    return [Stage(id=r * layout.stages + s, replica=r, layers=ranges[s], devices=list(stage),
                  holds=holds(s))
            for r, replica in enumerate(layout.replicas) for s, stage in enumerate(replica)]


def _groups(decision: Decision, ranks: dict[str, int], backend: str) -> list[Group]:
    layout = decision.chosen.layout
    groups = []
    for r, replica in enumerate(layout.replicas):
        groups.append(_group(decision, f"pipeline-r{r}", "pipeline",
                             [d for stage in replica for d in stage], ranks, backend))
        for s, stage in enumerate(replica):
            if len(stage) > 1:
                groups.append(_group(decision, f"data-r{r}-s{s}", "data", list(stage), ranks,
                                     backend))
    if len(layout.replicas) > 1:
        kind = "diloco" if decision.chosen.sync == "diloco" else "replica"
        for s in range(layout.stages):
            lanes = min(len(replica[s]) for replica in layout.replicas)
            for j in range(lanes):
                members = [replica[s][j] for replica in layout.replicas]
                groups.append(_group(decision, f"{kind}-s{s}-l{j}", kind, members, ranks,
                                     backend))
    return groups


def _group(decision: Decision, name: str, kind: str, devices: list[str], ranks: dict[str, int],
           backend: str) -> Group:
    ctx = decision.context
    env = group_env(ctx.topology, decision.fabrics, [host_of(d) for d in devices], backend)
    return Group(name=name, kind=kind, ranks=sorted(ranks[d] for d in devices), backend=backend,
                 env=env.common, env_per_host=env.per_host)


def _skipping(decision: Decision) -> Skipping | None:
    choice, full = decision.skip, decision.full_pipeline
    if choice is None or full is None:
        return None
    return Skipping(ratio=choice.ratio, max_swaps=choice.max_swaps, seed=choice.seed,
                    in_flight=decision.chosen.in_flight or {},
                    full_pipeline_s=round(full.step_s, 6))


def _diloco(decision: Decision) -> DilocoSettings:
    d = decision.context.diloco
    return DilocoSettings(sync_every=d.sync_every, fragments=d.fragments, pattern=d.pattern,
                          overlap_steps=d.overlap_steps, alpha=d.alpha,
                          quantization=d.quantization)


def summary(decision: Decision, plan: Plan, topology_name: str) -> list[str]:
    """The plan in words: the header comment of plan.yaml and what `plan` prints."""
    chosen, model = decision.chosen, plan.model
    layout = chosen.layout
    lines = [
        f"hetsched plan for {model.name} on {topology_name} "
        f"(topology {plan.topology_sha256[:12]}).",
        f"Regime: {decision.regime}; {len(decision.fabrics)} fabrics "
        f"({', '.join(f'{f.name}: {len(f.hosts)} hosts' for f in decision.fabrics)}).",
        f"Layout: {layout.description}; {len(layout.replicas)} replica(s) x "
        f"{layout.stages} stages, layers per stage {list(chosen.partition.layers)} "
        f"({chosen.partition.method}).",
    ]
    lines += _sync_lines(decision)
    lines += _skip_lines(decision)
    per_class = ", ".join(f"{k} {v / 1e9:.3g} GB"
                          for k, v in sorted(chosen.bytes_per_step.items())) or "none"
    lines.append(f"Estimated: {chosen.step_s:.4g} s/iteration, {chosen.tokens_per_s:,.0f} "
                 f"tokens/s, bubble {chosen.bubble_fraction:.0%}; bytes/step: {per_class}.")
    if decision.context.network.assumed:
        lines.append(f"{len(decision.context.network.assumed)} host pairs had no measured link; "
                     "their fabric or Ethernet NIC speed was assumed.")
    if decision.rejected:
        lines.append(f"{len(decision.rejected)} layouts did not fit in memory.")
    return lines


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
    if len(chosen.layout.replicas) == 1:
        return ["One replica: data-parallel groups stay inside their fabric; only pipeline "
                "traffic crosses fabrics."]
    alternatives = {e.sync: e for e in decision.candidates if e.layout == chosen.layout}
    parts = [f"{sync} {e.step_s:.4g} s/step" for sync, e in sorted(alternatives.items())]
    return [f"Sync between replicas: {chosen.sync} ({'; '.join(parts)})."]
