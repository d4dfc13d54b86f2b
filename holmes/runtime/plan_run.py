"""Where this process sits in a plan: torchrun's environment + plan.yaml -> groups and stage.

`PlanRun.from_env()`:

1. reads `HETSCHED_PLAN` and `HETSCHED_HOST` (set by `hetsched launch`) and torchrun's
   `RANK`, `WORLD_SIZE`, `LOCAL_RANK`; this process is device `LOCAL_RANK` of its host in
   the plan's `launch` section;
2. makes its GPU the current CUDA device, then joins the default process group (gloo
   for CPU devices; for GPUs NCCL, with gloo beside it for CPU tensors);
3. maps the plan's ranks (launch order) to torchrun's ranks with one all-gather, because
   torchrun's c10d rendezvous numbers hosts in arrival order, not by `--node-rank`;
4. checks that its host can run each of its groups as planned (`missing_here`: CUDA for
   NCCL, the per-communicator settings, the HCAs for RDMA) and stops naming the group
   when it cannot;
5. creates every group of the plan (`pipeline`, `data`, `replica`, `diloco`) in plan
   order on every rank, as `torch.distributed.new_group` requires; an NCCL group is
   created with its own `ncclConfig_t` (`nccl_options`: the network it runs on);
6. under `sync: diloco` with several lanes per stage (and `diloco.exchange` not
   `per_lane`), creates one more group per replica and stage: the stage's lanes that
   share one WAN exchange (`relay_stages`; `relay` is this process's, with its lanes'
   ranks in lane order), a twin of the stage's `data` group, because the exchange runs
   on DiLoCo's background thread and a gloo group must not be driven by two threads;
7. builds this replica's `skippipe.runtime.PipelineSchedule` from the plan's stages,
   layer ranges and `paths` (with the skip plan's memory caps when there are any).
   Point-to-point traffic between two devices goes over the smallest `pipeline` group
   holding both (`p2p_group`): the fabric's own group for a hop inside an RDMA fabric,
   the replica's group otherwise, so each hop runs on the network the plan estimated.

A script ends with `run.exit()` (`exit_job()` without a plan): every rank waits for the
others, the process groups are destroyed and the process exits without finalizing the
interpreter. A gloo worker thread drops a finished collective's work only after `wait()`
has returned; when that is the last reference to a tensor made in Python, the thread
takes the GIL to free it. If the interpreter is finalizing by then, Python ends the
thread inside a noexcept destructor: `terminate called without an active exception`,
SIGABRT, and torchrun fails the host after training succeeded. `destroy_process_group()`
does not stop those threads (torch itself keeps the default group referenced), so the
exit must not finalize.

What all groups of a process agree on (socket interface, HCAs) is in the environment,
which the launcher sets per host; this module does not change the environment.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from holmes.plan import Group, Plan, load_plan, tensor_parallel_refusal
from holmes.transports import missing_here, nccl_options, world_config
from skippipe.runtime import PipelineSchedule
from skippipe.simulate import Route


@dataclass(frozen=True)
class Placement:
    """This process in the plan: its device, ranks, replica, stage and lane."""

    host: str
    device: str
    plan_rank: int
    torch_rank: int
    replica: int
    stage: int  # index within the replica's stages
    lane: int  # position of the device within its stage


@dataclass(frozen=True)
class Relay:
    """A stage's lanes that share one DiLoCo exchange: their group and torch ranks in lane
    order (lane 0 first)."""

    group: dist.ProcessGroup
    ranks: tuple[int, ...]


@dataclass
class PlanRun:
    """The plan, this process's placement, the plan's process groups and its schedule."""

    plan: Plan
    plan_path: Path
    placement: Placement
    torch_rank_of: dict[str, int]  # plan device -> torchrun rank
    groups: dict[str, dist.ProcessGroup | None]  # plan group name -> group (None: not a member)
    schedule: PipelineSchedule
    restart: int
    relay: Relay | None = None  # the lanes that share this stage's DiLoCo exchange

    @classmethod
    def from_env(cls, plan_path: str | os.PathLike[str] | None = None) -> PlanRun:
        """Join the job described by the plan (see the module docstring)."""
        path = Path(plan_path or _require_env("HETSCHED_PLAN"))
        plan = load_plan(path)
        if (refusal := tensor_parallel_refusal(plan)) is not None:
            raise RuntimeError(refusal)
        host = _require_env("HETSCHED_HOST")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = _device_of(plan, host, local_rank)
        _check_groups_here(plan, host, device)
        _use_device(device)
        if not dist.is_initialized():
            _init_default_group(_backend(plan), nccl_options(
                "default", world_config(plan.groups, plan.nccl_net_selection)))
        plan_ranks = plan.rank_of()
        gathered: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, plan_ranks[device])
        if sorted(gathered) != list(range(len(plan_ranks))):
            raise RuntimeError(f"torchrun started {len(gathered)} processes holding plan ranks "
                               f"{sorted(gathered)}; the plan has {len(plan_ranks)} devices")
        devices = {rank: d for d, rank in plan_ranks.items()}
        torch_rank_of = {devices[int(p)]: r for r, p in enumerate(gathered)}  # type: ignore[arg-type]
        groups = {g.name: _new_group(g, devices, torch_rank_of) for g in plan.groups}
        placement = _placement(plan, host, device, plan_ranks[device], dist.get_rank())
        return cls(plan, path, placement, torch_rank_of, groups,
                   _schedule(plan, placement.replica, torch_rank_of),
                   int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                   _new_relay(plan, device, torch_rank_of))

    def group_of_kind(self, kind: str) -> dist.ProcessGroup | None:
        """The group of `kind` that holds this process (None if none does)."""
        for group in self.plan.groups:
            if group.kind == kind and self.placement.plan_rank in group.ranks:
                return self.groups[group.name]
        return None

    def p2p_group(self, src: str, dst: str) -> dist.ProcessGroup | None:
        """The group that carries point-to-point traffic between devices `src` and `dst`:
        the smallest `pipeline` group holding both (None: the default group)."""
        ranks = self.plan.rank_of()
        pair = {ranks[src], ranks[dst]}
        holding = [g for g in self.plan.groups if g.kind == "pipeline" and pair <= set(g.ranks)]
        if not holding:
            return None
        return self.groups[min(holding, key=lambda g: len(g.ranks)).name]

    def exit(self, code: int = 0) -> NoReturn:
        """The last call of a training script, on every rank: see `exit_job`."""
        exit_job(code)

    def torch_device(self) -> torch.device:
        index = _cuda_index(self.placement.device)
        return torch.device("cpu") if index is None else torch.device("cuda", index)


def exit_job(code: int = 0) -> NoReturn:
    """Leave the job together and end this process with `code`, without finalizing the
    interpreter (see the module docstring: gloo's worker threads may still be freeing
    the last collective's tensors). Every rank must call it; files must be closed."""
    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: start this script with `hetsched launch`")
    return value


def _device_of(plan: Plan, host: str, local_rank: int) -> str:
    for entry in plan.launch:
        if entry.host == host:
            if not 0 <= local_rank < len(entry.devices):
                raise RuntimeError(f"LOCAL_RANK {local_rank} but the plan gives host {host} "
                                   f"{len(entry.devices)} device(s)")
            return entry.devices[local_rank]
    raise RuntimeError(f"HETSCHED_HOST={host} is not a host of the plan's launch section")


def _cuda_index(device: str) -> int | None:
    """N of a plan GPU `host:cudaN` (the examples' names) or `host:gpuN` (what `hetsched
    probe local` records) when CUDA is available here; None for a CPU device."""
    match = re.fullmatch(r"(?:cuda|gpu)(\d*)", device.split(":", 1)[1])
    if match is None or not torch.cuda.is_available():
        return None
    return int(match.group(1) or 0)


def _use_device(device: str) -> None:
    """Make a plan GPU this process's current CUDA device. NCCL's object collectives
    (the rank all-gather in `from_env`) and every NCCL group use the current device; left
    at its default, every process of a multi-GPU host would use GPU 0."""
    index = _cuda_index(device)
    if index is not None:
        torch.cuda.set_device(index)


def _check_groups_here(plan: Plan, host: str, device: str) -> None:
    rank = plan.rank_of()[device]
    for group in plan.groups:
        if rank in group.ranks and (reason := missing_here(group, host)) is not None:
            raise RuntimeError(reason)


def _init_default_group(backend: str, options: object | None = None) -> None:
    """Join the default group. Under torchrun's agent store the workers of one attempt
    must share a key prefix; torchrun derives it from each agent's restart count, which
    differs between hosts after one host's worker failed (only that agent counts a
    restart), so the restarted workers would never meet. Instead every worker counts
    itself in on the agent store: arrivals 1..W are attempt 0, W+1..2W attempt 1, ..."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        dist.init_process_group(backend=backend, pg_options=options)
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(minutes=5))
    attempt = (store.add("hetsched/arrivals", 1) - 1) // world
    dist.init_process_group(backend=backend, store=dist.PrefixStore(
        f"hetsched/attempt_{attempt}", store), rank=rank, world_size=world, pg_options=options)


def _backend(plan: Plan) -> str:
    return _torch_backend("nccl" if any(g.backend == "nccl" for g in plan.groups) else "gloo")


def _torch_backend(backend: str) -> str:
    """torch.distributed's backend for a plan backend. An NCCL group also gets gloo for
    its CPU tensors (the step logs, the checkpoint agreement, object collectives): NCCL
    alone refuses them ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def _new_group(group: Group, devices: dict[int, str], torch_rank_of: dict[str, int],
               members: list[str] | None = None) -> dist.ProcessGroup | None:
    """The plan's `group` (or, with `members`, a group of those devices on its backend
    and network)."""
    chosen = members if members is not None else [devices[r] for r in group.ranks]
    ranks = sorted(torch_rank_of[d] for d in chosen)
    options = nccl_options(group.name, group.nccl_config) if group.backend == "nccl" else None
    made = dist.new_group(ranks, backend=_torch_backend(group.backend), pg_options=options)
    return made if dist.get_rank() in ranks else None


def relay_stages(plan: Plan) -> list[list[str]]:
    """Per stage and replica (in plan order), the devices that share one DiLoCo exchange
    across the WAN: the stage's lanes that have a `diloco` group (the narrowest replica's
    width), when there are two or more and `diloco.exchange` is not `per_lane`."""
    if plan.sync != "diloco" or plan.diloco is None or plan.diloco.exchange == "per_lane":
        return []
    stages = [[plan.stage(s).devices for s in r.stages] for r in plan.replicas]
    found = []
    for s in range(len(stages[0])):
        width = min(len(replica[s]) for replica in stages)
        if width > 1:
            found.extend(list(replica[s][:width]) for replica in stages)
    return found


def _new_relay(plan: Plan, device: str, torch_rank_of: dict[str, int]) -> Relay | None:
    """Every rank creates every relay group (in the same order); returns its own."""
    mine = None
    for lanes in relay_stages(plan):
        data = next(g for g in plan.groups if g.kind == "data"
                    and plan.rank_of()[lanes[0]] in g.ranks)
        ranks = tuple(torch_rank_of[d] for d in lanes)
        twin = data.model_copy(update={"name": f"{data.name}-relay"})
        group = _new_group(twin, {}, torch_rank_of, members=lanes)
        if device in lanes:
            mine = Relay(group, ranks)  # type: ignore[arg-type]
    return mine


def _placement(plan: Plan, host: str, device: str, plan_rank: int,
               torch_rank: int) -> Placement:
    for replica in plan.replicas:
        for index, stage_id in enumerate(replica.stages):
            stage = plan.stage(stage_id)
            if device in stage.devices:
                return Placement(host, device, plan_rank, torch_rank, replica.id, index,
                                 stage.devices.index(device))
    raise RuntimeError(f"device {device} is in no stage of the plan")


def _schedule(plan: Plan, replica_id: int, torch_rank_of: dict[str, int]) -> PipelineSchedule:
    replica = next(r for r in plan.replicas if r.id == replica_id)
    stages = [plan.stage(s) for s in replica.stages]
    members = {d for stage in stages for d in stage.devices}
    routes = [Route(p.microbatch, tuple(p.route)) for p in plan.paths if p.origin in members]
    caps = plan.skipping.in_flight if plan.skipping is not None else None
    return PipelineSchedule(
        stages=[list(stage.devices) for stage in stages],
        layers=[tuple(stage.layers) for stage in stages],
        routes=routes,
        ranks={d: torch_rank_of[d] for d in members},
        memory_limit={d: n for d, n in (caps or {}).items() if d in members} or None,
    )
