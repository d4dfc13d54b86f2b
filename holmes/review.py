"""Reading a plan back with the topology and model it was made for, and re-estimating it.

`show`, `simulate` and `launch` use this: the plan names its topology file and model
source (a preset, or a file relative to the plan file, so it can be reviewed from any
directory). The topology's sha256 must match the one in the plan and hold every device
of the plan; the model source must still describe the plan's `model` section (layers,
widths, batch sizes, dtype). Either mismatch is one clear refusal naming the field. The
plan's own stages, layers and routes are simulated as written, on the hosts it planned
with (without its `left_out` hosts) and with the NCCL network selection it was made for.
"""

from __future__ import annotations

from pathlib import Path

from holmes.assumptions import CostAssumptions, default_costs
from holmes.estimate import Context, DilocoChoice, Estimate, estimate
from holmes.fabric import find_fabrics
from holmes.hosts import without_hosts
from holmes.model import ModelConfig, list_presets, load_model
from holmes.network import Network
from holmes.partition import Partition
from holmes.placement import Layout
from holmes.plan import Plan
from skippipe.simulate import Route
from topology.errors import InputError
from topology.schema import Topology, load_topology


def plan_topology(plan: Plan, plan_path: Path, topology_path: Path | None) -> Topology:
    """The topology the plan was made for: `--topology`, else the file the plan names."""
    if topology_path is None:
        if plan.topology_file is None:
            raise InputError("the plan names no topology file; pass --topology", plan_path)
        topology_path = Path(plan.topology_file)
        if not topology_path.is_absolute():
            topology_path = plan_path.parent / topology_path
    topology = load_topology(topology_path)
    if topology.sha256() != plan.topology_sha256:
        raise InputError(f"was made for topology {plan.topology_sha256[:12]}, but "
                         f"{topology_path} is {topology.sha256()[:12]} (changed since?)",
                         plan_path, "topology_sha256")
    _check_devices(plan, plan_path, topology, topology_path)
    return topology


def _check_devices(plan: Plan, plan_path: Path, topology: Topology, topology_path: Path) -> None:
    known = {f"{h.name}:{d.name}" for h in topology.hosts if h.status == "ok" for d in h.devices}
    for i, host in enumerate(plan.launch):
        for j, device in enumerate(host.devices):
            if device not in known:
                raise InputError(f"{device} is not a device of a reachable host in "
                                 f"{topology_path}", plan_path, f"launch[{i}].devices[{j}]")


def plan_model(plan: Plan, model: str | None, plan_path: Path) -> ModelConfig:
    """`model` (a preset or a path as typed), else the plan's model source; either must
    match the plan's `model` section."""
    if model is not None:
        config = load_model(model)
        check_model_matches(plan, plan_path, config, model, "--model")
        return config
    source = model_source(plan, plan_path)
    config = load_model(source)
    check_model_matches(plan, plan_path, config, str(source), "model.source")
    return config


def model_source(plan: Plan, plan_path: Path) -> str | Path:
    """The plan's model: a preset name, or its file resolved from the plan's folder."""
    source = plan.model.source or plan.model.name
    if source in list_presets():
        return source
    path = Path(source)
    return path if path.is_absolute() else plan_path.parent / path


def check_plan_source(plan: Plan, plan_path: Path) -> None:
    """`show` and `launch`, which need no model: if the plan's model source can still be
    read, it must still match the plan (a model.yaml edited since the plan was made)."""
    source = model_source(plan, plan_path)
    if isinstance(source, Path) and not source.is_file():
        return
    check_model_matches(plan, plan_path, load_model(source), str(source), "model.source")


def check_model_matches(plan: Plan, plan_path: Path, config: ModelConfig, source: str,
                        field: str) -> None:
    """InputError naming `field` when `config` is not the model the plan was made for."""
    model, training = config.model, config.training
    found = {"name": model.name, "layers": model.layers, "hidden": model.hidden,
             "seq_len": model.seq_len, "microbatch": training.microbatch,
             "global_batch": training.global_batch, "dtype": model.dtype}
    for key, value in found.items():
        planned = getattr(plan.model, key)
        if planned != value:
            raise InputError(f"{source} has {key} {value}, but the plan was made for "
                             f"model.{key} {planned} (plan again, or pass the model it "
                             "was made for)", plan_path, field)


def planned_topology(plan: Plan, topology: Topology) -> Topology:
    """The topology the plan was planned on: the given one without its left-out hosts."""
    return without_hosts(topology, [h.host for h in plan.left_out])


def plan_diloco(plan: Plan) -> DilocoChoice:
    d = plan.diloco
    if d is None:
        return DilocoChoice()
    return DilocoChoice(d.sync_every, d.fragments, d.pattern, d.overlap_steps, d.alpha,
                        d.quantization, d.exchange)


def layout_of(plan: Plan) -> Layout:
    replicas = tuple(tuple(tuple(plan.stage(s).leaders()) for s in replica.stages)
                     for replica in plan.replicas)
    first = plan.stage(plan.replicas[0].stages[0])
    loss_at = "origin" if "head" in first.holds and len(replicas[0]) > 1 else "last"
    groups = tuple(tuple(g) for stage in plan.stages if stage.tensor_parallel > 1
                   for g in stage.tp_groups())
    return Layout("plan", replicas, "as written in the plan", loss_at=loss_at,
                  tp_groups=groups)


def partition_of(plan: Plan) -> Partition:
    stages = plan.stage
    first = plan.replicas[0].stages
    counts = tuple(stages(s).layers[1] - stages(s).layers[0] for s in first)
    return Partition(counts, tuple(0.0 for _ in counts), 0.0, "plan")


def routes_of_plan(plan: Plan) -> list[list[Route]]:
    replica_of = {d: stage.replica for stage in plan.stages for d in stage.devices}
    routes: list[list[Route]] = [[] for _ in plan.replicas]
    for path in plan.paths:
        routes[replica_of[path.origin]].append(Route(path.microbatch, tuple(path.route)))
    return routes


def plan_costs(plan: Plan, option: CostAssumptions | None) -> CostAssumptions:
    """The assumptions to re-estimate a plan with: `--costs`, else those it was made with
    (a plan from before profiles existed: `default`)."""
    return option or plan.costs or default_costs()


def estimate_plan(plan: Plan, topology: Topology, config: ModelConfig,
                  full_routes: bool = False,
                  assumptions: CostAssumptions | None = None) -> Estimate:
    """Simulate the plan as written; with `full_routes`, the same placement, layers and
    memory caps with every microbatch through every stage (the skipping baseline).
    `assumptions` (default: the plan's own) set the cost model's assumptions."""
    topology = planned_topology(plan, topology)
    fabrics = find_fabrics(topology)
    ctx = Context(topology, fabrics, Network(topology, fabrics), config, plan_diloco(plan),
                  plan.nccl_net_selection or "per-communicator", plan.optimizer.sharding,
                  plan_costs(plan, assumptions))
    sync = "diloco" if plan.sync == "diloco" else ("allreduce" if len(plan.replicas) > 1
                                                   else "none")
    in_flight = plan.skipping.in_flight if plan.skipping is not None else None
    if assumptions is not None and isinstance(assumptions.in_flight, int):
        in_flight = None  # the new assumptions' own number, not the recorded caps
    routes = None if full_routes else routes_of_plan(plan)
    return estimate(layout_of(plan), partition_of(plan), ctx, sync, routes, in_flight=in_flight)
