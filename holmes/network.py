"""The network as the planner sees it: latency and bandwidth between any two devices.

Figures come from the topology's measured links where there is one. Between hosts of
one fabric without a measured link, the fabric's NIC speed is used; otherwise the
slower of the two hosts' fastest Ethernet NICs (both must have a known speed). GPUs
of one host talk over the host's `intra_host` figure (NVLink or PCIe per GPU, both
directions, so half of it each way), or where the topology has none, the figure of its
GPU model (`topology.intra_host`, assumed); devices of a CPU host, or GPUs without a
model name, over INTRA_HOST_GBPS (an NVLink/PCIe-class assumption). A link asked for
with `socket=True` is the one NCCL's socket transport uses: the Ethernet figure even
between hosts of one RDMA fabric (`holmes.transports` says which traffic runs on sockets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from holmes.fabric import Fabric, best_nic_kind, nic_speed_gbps, usable_nics
from topology.errors import InputError
from topology.intra_host import figure_for_models
from topology.schema import NicKind, Topology

INTRA_HOST_GBPS = 1200.0
INTRA_HOST_LATENCY_MS = 0.005
UNMEASURED_LATENCY_MS = 0.01


def host_of(device: str) -> str:
    return device.split(":", 1)[0]


@dataclass
class Network:
    """Host-to-host latency (ms) and bandwidth (Gbit/s), looked up once per pair."""

    topology: Topology
    fabrics: list[Fabric]
    assumed: set[tuple[str, str]] = field(default_factory=set)
    _cache: dict[tuple[str, str, bool], tuple[float, float]] = field(default_factory=dict)
    _intra: dict[str, tuple[float, str]] = field(default_factory=dict)

    def host_link(self, a: str, b: str, socket: bool = False) -> tuple[float, float]:
        """(latency_ms, bandwidth_gbps) between hosts `a` and `b` (over sockets when
        `socket`, RDMA where they share an RDMA fabric otherwise)."""
        if a == b:
            return INTRA_HOST_LATENCY_MS, self.intra_host(a)[0]
        key = (a, b, socket) if a < b else (b, a, socket)
        if key not in self._cache:
            self._cache[key] = self._lookup(*key)
        return self._cache[key]

    def intra_host(self, name: str) -> tuple[float, str]:
        """(Gbit/s each way between two GPUs of host `name`, where the figure came from)."""
        if name not in self._intra:
            host = self.topology.host(name)
            gpus = [d.model for d in host.devices if d.kind == "gpu"]
            if host.intra_host is not None:
                found = (host.intra_host.bandwidth_gbps / 2, host.intra_host.source)
            elif any(gpus):
                found = (figure_for_models(gpus).bandwidth_gbps / 2, "assumed")
            else:
                found = (INTRA_HOST_GBPS, "assumed")
            self._intra[name] = found
        return self._intra[name]

    def device_link(self, a: str, b: str, socket: bool = False) -> tuple[float, float]:
        return self.host_link(host_of(a), host_of(b), socket)

    def _lookup(self, a: str, b: str, socket: bool) -> tuple[float, float]:
        link = self.topology.link(a, b)
        if link is not None and link.status == "unreachable":
            raise InputError(f"hosts {a} and {b} cannot reach each other: {link.reason}",
                             field="links")
        fabric = self._shared_fabric(a, b)
        fabric_speed = fabric.speed_gbps if fabric is not None and fabric.rdma else None
        if link is not None:
            bandwidth = link.bandwidth_gbps
            if socket and fabric_speed is not None:
                bandwidth = min(bandwidth, self._ethernet_gbps(a, b))
            return link.latency_ms, bandwidth
        self.assumed.add((a, b))
        if fabric_speed is not None and not socket:
            return UNMEASURED_LATENCY_MS, fabric_speed
        return UNMEASURED_LATENCY_MS, self._ethernet_gbps(a, b)

    def _shared_fabric(self, a: str, b: str) -> Fabric | None:
        return next((f for f in self.fabrics if a in f.hosts and b in f.hosts), None)

    def _ethernet_gbps(self, a: str, b: str) -> float:
        speeds = [self._host_ethernet_gbps(h) for h in (a, b)]
        return min(speeds)

    def _host_ethernet_gbps(self, name: str) -> float:
        host = self.topology.host(name)
        ethernet = [n.speed_gbps for n in usable_nics(host)
                    if n.kind == NicKind.ETHERNET and n.speed_gbps is not None]
        if ethernet:
            return max(ethernet)
        kind = best_nic_kind(host)
        speed = nic_speed_gbps(host, kind)
        if speed is None:
            raise InputError(f"no measured link from host {name} and no NIC with a known speed "
                             "to assume one from; probe the hosts (hetsched probe run)",
                             field=f"hosts.{name}.nics")
        return speed
