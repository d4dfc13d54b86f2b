"""NIC selection per process group (Holmes' automatic NIC selection), as process variables.

Which network a group runs on is `holmes.transports`' decision; this module writes the
environment that goes with it. Every value is per host (the host's own netdev and HCA
ports) and is collapsed into `common` where all hosts of the group agree, so the groups
of one process agree on it too and the launcher can set it once per process:

- NCCL, every group: `NCCL_SOCKET_IFNAME==<netdev>` on the host's best Ethernet netdev
  (NCCL's bootstrap, and its socket transport);
- NCCL, RDMA transport: `NCCL_IB_HCA` with exactly the host's ports of the fabric's kind
  (and `NCCL_IB_GID_INDEX` for RoCE v2);
- NCCL, socket transport under per-process selection: `NCCL_NET=Socket` (per-communicator
  selection puts the network in the group's `ncclConfig_t` instead, and nothing in the
  environment disables RDMA);
- gloo: `GLOO_SOCKET_IFNAME` on the same netdev.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from holmes.fabric import usable_nics
from holmes.transports import Selection, Transport
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


def group_env(topology: Topology, hosts: list[str], backend: str, transport: Transport,
              selection: Selection) -> GroupEnv:
    """The NCCL or gloo environment of a group over `hosts` (host names, any order) that
    runs on `transport`."""
    members = [topology.host(h) for h in dict.fromkeys(hosts)]
    if backend == "gloo":
        return _collapse({h.name: {"GLOO_SOCKET_IFNAME": socket_netdev(h)} for h in members})
    per_host = {h.name: {"NCCL_SOCKET_IFNAME": "=" + socket_netdev(h)} for h in members}
    if transport != "socket":
        kind = NicKind.INFINIBAND if transport == "infiniband" else NicKind.ROCE
        for h in members:
            per_host[h.name].update(_rdma_env(h, kind))
    common = {"NCCL_NET": "Socket"} if transport == "socket" and selection == "per-process" \
        else {}
    collapsed = _collapse(per_host)
    return GroupEnv(common={**common, **collapsed.common}, per_host=collapsed.per_host)


def _rdma_env(host: Host, kind: NicKind) -> dict[str, str]:
    ports = rdma_ports(host, kind)
    env = {"NCCL_IB_HCA": "=" + ",".join(sorted(f"{n.rdma_device}:{n.rdma_port or 1}"
                                                for n in ports))}
    gids = {n.gid_index for n in ports} - {None}
    if kind == NicKind.ROCE and len(gids) == 1:
        env["NCCL_IB_GID_INDEX"] = str(gids.pop())
    return env


def _collapse(per_host: dict[str, dict[str, str]]) -> GroupEnv:
    """Values every host shares go to `common`; the others stay per host."""
    names = {name for env in per_host.values() for name in env}
    common = {}
    for name in sorted(names):
        values = {env.get(name) for env in per_host.values()}
        if len(values) == 1 and None not in values:
            common[name] = values.pop()
    rest = {host: {k: v for k, v in env.items() if k not in common}
            for host, env in per_host.items()}
    return GroupEnv(common=common, per_host={h: env for h, env in rest.items() if env})
