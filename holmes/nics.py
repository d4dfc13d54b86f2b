"""NIC selection per process group (Holmes' automatic NIC selection).

A group whose hosts all sit on one RDMA fabric gets `NCCL_IB_HCA` with exactly the HCA
ports of that fabric's kind (and `NCCL_IB_GID_INDEX` for RoCE v2), plus
`NCCL_SOCKET_IFNAME` on its best Ethernet netdev for NCCL's bootstrap. A group that
spans fabrics (or has no RDMA) gets `NCCL_NET=Socket` and `NCCL_IB_DISABLE=1` on the
best netdev its hosts have. gloo groups get `GLOO_SOCKET_IFNAME`; where hosts name that
netdev differently, the value is given per host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from holmes.fabric import Fabric, fabric_of_host, usable_nics
from topology.errors import InputError
from topology.schema import Host, Nic, NicKind, Topology


@dataclass
class GroupEnv:
    """Environment for one process group: common to all its hosts, plus per-host values."""

    common: dict[str, str] = field(default_factory=dict)
    per_host: dict[str, dict[str, str]] = field(default_factory=dict)


def socket_netdev(host: Host) -> str:
    """The netdev for socket traffic: the fastest usable Ethernet-addressable interface."""
    candidates = [n for n in usable_nics(host) if n.netdev and n.kind == NicKind.ETHERNET]
    candidates = candidates or [n for n in host.nics if n.netdev and n.state != "down"]
    if not candidates:
        raise InputError(f"host {host.name} has no usable network interface for sockets",
                         field=f"hosts.{host.name}.nics")
    return _fastest(candidates).netdev or ""


def _fastest(nics: list[Nic]) -> Nic:
    return max(nics, key=lambda n: (n.speed_gbps or 0.0, not n.virtual, n.name))


def rdma_ports(host: Host, kind: NicKind) -> list[Nic]:
    return [n for n in usable_nics(host) if n.kind == kind and n.rdma_device]


def group_env(
    topology: Topology, fabrics: list[Fabric], hosts: list[str], backend: str
) -> GroupEnv:
    """The NCCL or gloo environment for a group over `hosts` (host names, any order)."""
    members = [topology.host(h) for h in dict.fromkeys(hosts)]
    netdevs = {h.name: socket_netdev(h) for h in members}
    if backend == "gloo":
        return _per_host_or_common("GLOO_SOCKET_IFNAME", netdevs)
    socket_ifname = "=" + ",".join(sorted(set(netdevs.values())))
    shared = {fabric_of_host(fabrics, h.name).name: fabric_of_host(fabrics, h.name)
              for h in members}
    fabric = next(iter(shared.values()))
    if len(shared) == 1 and fabric.rdma:
        return GroupEnv(common=_rdma_env(members, fabric.kind, socket_ifname))
    return GroupEnv(common={"NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1",
                            "NCCL_SOCKET_IFNAME": socket_ifname})


def _rdma_env(members: list[Host], kind: NicKind, socket_ifname: str) -> dict[str, str]:
    ports = sorted({f"{n.rdma_device}:{n.rdma_port or 1}" for h in members
                    for n in rdma_ports(h, kind)})
    env = {"NCCL_IB_HCA": "=" + ",".join(ports), "NCCL_SOCKET_IFNAME": socket_ifname}
    if kind == NicKind.ROCE:
        gids = {n.gid_index for h in members for n in rdma_ports(h, kind)} - {None}
        if len(gids) == 1:
            env["NCCL_IB_GID_INDEX"] = str(gids.pop())
    return env


def _per_host_or_common(variable: str, values: dict[str, str]) -> GroupEnv:
    if len(set(values.values())) == 1:
        return GroupEnv(common={variable: next(iter(values.values()))})
    return GroupEnv(per_host={host: {variable: value} for host, value in values.items()})
