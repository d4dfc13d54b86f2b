"""Which hosts of a topology take part in a plan, and why the others do not.

A host the probe could not reach (`status: unreachable`) is left out. A host without
devices has nothing to run. When the topology has GPUs, a host with none (a login node
or a storage box that `probe local` recorded with only `cpu0`) is left out as well: one
CPU rank would put the whole job on gloo, CPU tensors over TCP, several times slower,
and the job would still exit 0. `include_cpu_hosts` keeps such hosts (the job then runs
on gloo, and the planner estimates it so). Every host left out is named with its reason
in the plan (`left_out`); `without_hosts` gives the topology the planner then plans on.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from topology.schema import Host, Topology

CPU_HOST_FLAG = "--include-cpu-hosts"


@dataclass(frozen=True)
class LeftOut:
    host: str
    reason: str


def left_out_hosts(topology: Topology, include_cpu_hosts: bool = False) -> list[LeftOut]:
    """The hosts a plan on `topology` leaves out, in topology order, with the reason."""
    has_gpus = any(_has_gpu(h) for h in topology.hosts if h.status == "ok")
    left = []
    for host in topology.hosts:
        reason = _reason(host, has_gpus and not include_cpu_hosts)
        if reason is not None:
            left.append(LeftOut(host.name, reason))
    return left


def _reason(host: Host, gpus_only: bool) -> str | None:
    if host.status != "ok":
        return f"unreachable ({host.reason})"
    if not host.devices:
        return "no devices"
    if gpus_only and not _has_gpu(host):
        return (f"no GPU ({', '.join(d.name for d in host.devices)} only) in a GPU job; "
                f"{CPU_HOST_FLAG} would run the whole job on gloo")
    return None


def _has_gpu(host: Host) -> bool:
    return any(d.kind == "gpu" for d in host.devices)


def without_hosts(topology: Topology, names: Collection[str]) -> Topology:
    """`topology` without the hosts `names` and their links (same name and sites)."""
    if not names:
        return topology
    drop = set(names)
    return topology.model_copy(update={
        "hosts": [h for h in topology.hosts if h.name not in drop],
        "links": [link for link in topology.links if not link.key() & drop],
    })
