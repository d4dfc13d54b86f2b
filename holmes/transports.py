"""Which network each process group really uses, and how the runtime asks NCCL for it.

NCCL picks one network per communicator: "IB" (its verbs transport, for InfiniBand and
RoCE alike) or "Socket" (TCP). A group whose hosts all sit on one RDMA fabric should
run RDMA; a group that spans fabrics (or has no RDMA) must run sockets, since an
InfiniBand HCA cannot reach a RoCE or Ethernet-only host. Devices of one host talk over
NVLink/PCIe whatever the network; the network only carries traffic between hosts.

There are two ways to choose, and the plan records which one it was made for
(`Selection`):

- `per-communicator`: each NCCL group is created with its own `ncclConfig_t.netName`,
  which torch exposes as `ProcessGroupNCCL.Options().config.net_name` (NCCL >= 2.17
  builds; torch's `NCCLConfig` binding sets it with strdup, NCCL frees it). Each group
  gets the network of its own hosts, and the process environment carries only what all
  of a process's groups agree on (HCA list, GID index, socket interface).
- `per-process`: where torch cannot pass `net_name` (a build without NCCL, or an NCCL
  older than the config API), `NCCL_NET` is the only switch and it holds for every
  communicator of a process. A process in any socket group must then run all its groups
  on sockets, and so must every process it shares a group with: the socket set is the
  closure over shared groups (`socket_devices`). The planner estimates with that.

`net_support()` says which one the installed torch offers; it is checked at run time
with `hasattr` because CPU-only builds have no `ProcessGroupNCCL` at all.
`nccl_options()` builds the torch options for a group's config on a GPU machine; it
refuses (naming the group) where the installed torch cannot honour it.
`missing_here()` says why this machine cannot run a plan group as planned: NCCL without
a CUDA device, a per-communicator config this torch cannot pass, or an HCA named in
`NCCL_IB_HCA` that is not under /sys/class/infiniband. `hetsched launch --via local|lab`
checks every group with it before starting anything (every host is this machine); each
rank checks its own groups on its own host when it starts (`PlanRun.from_env`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from holmes.fabric import Fabric, fabric_of_host
from holmes.placement import Layout
from holmes.plan import Group

Selection = Literal["per-communicator", "per-process"]
Transport = Literal["infiniband", "roce", "socket"]
SELECTIONS: tuple[Selection, ...] = ("per-communicator", "per-process")
NET_NAME: dict[Transport, str] = {"infiniband": "IB", "roce": "IB", "socket": "Socket"}
SYSFS_INFINIBAND = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class NetSupport:
    """Whether the installed torch can give each NCCL communicator its own network."""

    per_communicator: bool
    detail: str  # what was found (the attribute used, or what is missing)

    @property
    def selection(self) -> Selection:
        return "per-communicator" if self.per_communicator else "per-process"


def net_support() -> NetSupport:
    """Look at the installed torch: `ProcessGroupNCCL.Options().config.net_name`."""
    import torch
    import torch.distributed as dist

    version = f"torch {torch.__version__}"
    nccl = getattr(dist, "ProcessGroupNCCL", None) if dist.is_available() else None
    if nccl is None:
        return NetSupport(False, f"{version} has no ProcessGroupNCCL (built without NCCL)")
    config = getattr(nccl.Options(), "config", None)
    if config is None:
        return NetSupport(False, f"{version}: ProcessGroupNCCL.Options has no config "
                          "(built with NCCL older than 2.17)")
    if not hasattr(config, "net_name"):
        return NetSupport(False, f"{version}: ProcessGroupNCCL.NCCLConfig has no net_name")
    return NetSupport(True, f"{version}: ProcessGroupNCCL.Options().config.net_name")


def choose_selection(wanted: str) -> tuple[Selection, str]:
    """`auto`: what the installed torch offers (`net_support`); else as asked. Returns the
    selection and where it came from, for the plan's header."""
    if wanted == "auto":
        support = net_support()
        return support.selection, support.detail
    if wanted not in SELECTIONS:
        raise ValueError(f"NCCL network selection must be auto or one of {SELECTIONS}")
    return wanted, "as asked with --nccl-net"  # type: ignore[return-value]


def fabric_transport(fabrics: Sequence[Fabric], hosts: Sequence[str]) -> Transport:
    """RDMA of the fabric when every host of the group sits on that one RDMA fabric."""
    shared = {fabric_of_host(fabrics, h).name: fabric_of_host(fabrics, h) for h in hosts}
    if len(shared) == 1:
        fabric = next(iter(shared.values()))
        if fabric.rdma:
            return "infiniband" if fabric.kind.value == "infiniband" else "roce"
    return "socket"


def socket_devices(groups: Mapping[str, Sequence[str]], wanted: Mapping[str, Transport]
                   ) -> set[str]:
    """Per-process selection: the devices whose processes must run every NCCL group on
    sockets (members of a socket group, closed over the groups they share)."""
    forced: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, devices in groups.items():
            members = set(devices)
            if (wanted[name] == "socket" or members & forced) and not members <= forced:
                forced |= members
                changed = True
    return forced


def effective_transports(groups: Mapping[str, Sequence[str]], fabrics: Sequence[Fabric],
                         selection: Selection) -> dict[str, Transport]:
    """The transport each group (name -> devices `host:dev`) really runs on."""
    wanted = {name: fabric_transport(fabrics, _hosts(devices)) for name, devices in
              groups.items()}
    if selection == "per-communicator":
        return wanted
    forced = socket_devices(groups, wanted)
    return {name: "socket" if set(devices) & forced else wanted[name]
            for name, devices in groups.items()}


def nccl_config(transport: Transport, selection: Selection) -> dict[str, str]:
    """The `ncclConfig_t` fields a group is created with (empty: NCCL's defaults plus
    the process environment, the only way under per-process selection)."""
    return {"net_name": NET_NAME[transport]} if selection == "per-communicator" else {}


def nccl_options(group: str, config: Mapping[str, str]) -> Any | None:
    """`ProcessGroupNCCL.Options` carrying `config` for group `group` (None when the
    config is empty). Raises RuntimeError naming the group when this torch cannot."""
    if not config:
        return None
    support = net_support()
    if not support.per_communicator:
        raise RuntimeError(f"group {group} needs per-communicator NCCL settings "
                           f"({_fields(config)}) but {support.detail}; re-plan with "
                           "--nccl-net per-process")
    import torch.distributed as dist

    options = dist.ProcessGroupNCCL.Options()
    for name, value in config.items():
        if not hasattr(options.config, name):
            raise RuntimeError(f"group {group}: this torch's NCCLConfig has no field {name}")
        setattr(options.config, name, value)
    return options


def world_config(groups: Sequence[Group], selection: Selection | None) -> dict[str, str]:
    """The `ncclConfig_t` of the default (world) group, empty without NCCL groups: RDMA only
    when every group runs RDMA of one kind (the groups join all devices, so they then
    share one fabric). The runtime sends no CUDA tensor over the world group (objects and
    barriers go over gloo), so this only keeps a stray one off a network it lacks."""
    kinds = {g.transport for g in groups if g.backend == "nccl"}
    if selection != "per-communicator" or not kinds:
        return {}
    transport: Transport = kinds.pop() if len(kinds) == 1 and kinds <= {"infiniband", "roce"} \
        else "socket"  # type: ignore[assignment]
    return nccl_config(transport, selection)


def missing_here(group: Group, host: str, sysfs: Path = SYSFS_INFINIBAND) -> str | None:
    """Why this machine (as plan host `host`) cannot run `group` as planned; None if it can."""
    if group.transport in ("infiniband", "roce"):
        hca = {**group.env, **group.env_per_host.get(host, {})}.get("NCCL_IB_HCA", "")
        absent = [name for name in _hca_names(hca) if not (sysfs / name).exists()]
        if absent:
            return (f"group {group.name} runs on {group.transport} over HCA {absent[0]}, which "
                    f"host {host} does not have here (no {sysfs / absent[0]})")
    if group.backend != "nccl":
        return None
    import torch

    if not torch.cuda.is_available():
        return (f"group {group.name} runs on NCCL, but torch {torch.__version__} sees no "
                "CUDA device here")
    if group.nccl_config and not (support := net_support()).per_communicator:
        return (f"group {group.name} needs ncclConfig_t {_fields(group.nccl_config)} per "
                f"communicator, but {support.detail}; re-plan with --nccl-net per-process")
    return None


def _hca_names(value: str) -> list[str]:
    """Device names of an `NCCL_IB_HCA` list (`=mlx5_0:1,mlx5_1`; an exclusion `^...`
    names none that must exist)."""
    value = value.strip().removeprefix("=")
    if not value or value.startswith("^"):
        return []
    return list(dict.fromkeys(item.split(":", 1)[0] for item in value.split(",") if item))


def layout_groups(layout: Layout, sync: str, fabrics: Sequence[Fabric],
                  fabric_pipelines: bool) -> dict[str, tuple[str, list[str]]]:
    """Every process group of `layout`: name -> (kind, devices), in creation order.

    One `pipeline` group per replica (its point-to-point traffic); with `fabric_pipelines`
    (NCCL under per-communicator selection) a replica that spans fabrics also gets a
    `pipeline-r<r>-<fabric>` group per RDMA fabric it uses with two or more hosts, for the
    hops that stay inside that fabric (they run RDMA, the others sockets). One `data` group per
    stage with several devices; with several replicas, one `replica` (per-step
    all-reduce) or `diloco` group per stage lane.

    With tensor parallelism (TP degree t > 1 in a stage): one `tp` group per TP group
    (`tp-r<r>-s<s>-g<j>`, inside one host), and the data and lane groups are per TP rank
    i (`data-r<r>-s<s>-t<i>`, `<kind>-s<s>-l<j>-t<i>`): rank i of each group syncs the
    1/t of the weights it holds with rank i of the others (Megatron's groups).
    """
    groups: dict[str, tuple[str, list[str]]] = {}
    for r, replica in enumerate(layout.replicas):
        devices = [m for stage in replica for d in stage for m in layout.members(d)]
        groups[f"pipeline-r{r}"] = ("pipeline", devices)
        if fabric_pipelines:
            groups.update(_fabric_pipelines(r, devices, fabrics))
        for s, stage in enumerate(replica):
            groups.update(_stage_groups(layout, r, s, stage))
    if len(layout.replicas) > 1:
        kind = "diloco" if sync == "diloco" else "replica"
        for s in range(layout.stages):
            lanes = min(len(replica[s]) for replica in layout.replicas)
            t = layout.tp(s)
            for j in range(lanes):
                for i in range(t):
                    name = f"{kind}-s{s}-l{j}" + (f"-t{i}" if t > 1 else "")
                    groups[name] = (kind, [layout.members(replica[s][j])[i]
                                           for replica in layout.replicas])
    return groups


def _stage_groups(layout: Layout, r: int, s: int, stage: tuple[str, ...]
                  ) -> dict[str, tuple[str, list[str]]]:
    """A stage's TP groups and its data groups (one per TP rank)."""
    t = layout.tp(s)
    if t == 1:
        return {f"data-r{r}-s{s}": ("data", list(stage))} if len(stage) > 1 else {}
    groups = {f"tp-r{r}-s{s}-g{j}": ("tp", list(layout.members(d)))
              for j, d in enumerate(stage)}
    if len(stage) > 1:
        groups |= {f"data-r{r}-s{s}-t{i}": ("data", [layout.members(d)[i] for d in stage])
                   for i in range(t)}
    return groups


def _fabric_pipelines(r: int, devices: list[str], fabrics: Sequence[Fabric]
                      ) -> dict[str, tuple[str, list[str]]]:
    by_fabric: dict[str, list[str]] = {}
    for device in devices:
        by_fabric.setdefault(fabric_of_host(fabrics, _host(device)).name, []).append(device)
    if len(by_fabric) < 2:
        return {}
    rdma = {f.name for f in fabrics if f.rdma}
    return {f"pipeline-r{r}-{name}": ("pipeline", members) for name, members in
            by_fabric.items() if name in rdma and len({_host(d) for d in members}) > 1}


def _host(device: str) -> str:
    return device.split(":", 1)[0]


def _hosts(devices: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(_host(d) for d in devices))


def _fields(config: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())
