"""Fabric clustering: which hosts share a network fabric (Holmes' NIC-aware grouping).

A fabric is a set of hosts whose best NICs are of the same kind (InfiniBand, RoCE or
Ethernet) and that sit on the same site; where the probe measured the link between two
such hosts, it must also be fast (at least FAST_FRACTION of the slower host's NIC speed,
or FAST_ETHERNET_GBPS when NIC speeds are unknown). Fabrics are the connected components
of that relation (networkx). Data- and tensor-parallel groups stay inside one fabric;
only pipeline traffic crosses between fabrics.

Hosts of different NIC kinds or sites never share a fabric, so hosts are first bucketed
by (kind, site); inside a bucket only a measured link can keep two hosts apart, and a
bucket of k hosts with fewer than k - 1 such slow links is connected without looking at
its pairs (what keeps 2,048 hosts from being 2 million pair checks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import networkx as nx

from topology.errors import InputError
from topology.schema import Host, Nic, NicKind, Topology

FAST_FRACTION = 0.25
FAST_ETHERNET_GBPS = 0.5
KIND_RANK = {NicKind.INFINIBAND: 3, NicKind.ROCE: 2, NicKind.ETHERNET: 1}


@dataclass(frozen=True)
class Fabric:
    """Hosts joined by one fabric, and the NIC kind and speed they share."""

    name: str
    kind: NicKind
    site: str | None
    hosts: tuple[str, ...]
    speed_gbps: float | None

    @property
    def rdma(self) -> bool:
        return self.kind in (NicKind.INFINIBAND, NicKind.ROCE)

    @functools.cached_property
    def host_set(self) -> frozenset[str]:
        """`hosts` as a set: membership in O(1) (plans of thousands of hosts ask often)."""
        return frozenset(self.hosts)


def usable_nics(host: Host) -> list[Nic]:
    """Physical NICs that are not down."""
    return [n for n in host.nics if not n.virtual and n.state != "down"]


def best_nic_kind(host: Host) -> NicKind:
    kinds = [n.kind for n in usable_nics(host)]
    return max(kinds, key=KIND_RANK.__getitem__, default=NicKind.ETHERNET)


def nic_speed_gbps(host: Host, kind: NicKind) -> float | None:
    """Total speed of the host's usable NICs of `kind` (None when any is unknown)."""
    speeds = [n.speed_gbps for n in usable_nics(host) if n.kind == kind]
    if not speeds or any(s is None for s in speeds):
        return None
    return float(sum(speeds))


def find_fabrics(topology: Topology) -> list[Fabric]:
    """The fabrics of `topology`, largest first, then by name; deterministic."""
    hosts = [h for h in topology.hosts if h.status == "ok"]
    if not hosts:
        raise InputError("the topology has no reachable host", field="hosts")
    order = {h.name: i for i, h in enumerate(hosts)}
    buckets: dict[tuple[NicKind, str | None], list[Host]] = {}
    for host in hosts:
        # A host without a site shares a fabric with no other host.
        buckets.setdefault((best_nic_kind(host), host.site or f"\0{host.name}"), []).append(host)
    groups = []
    for members in buckets.values():
        groups += _components(topology, members)
    groups = [sorted(c, key=order.__getitem__) for c in groups]
    groups.sort(key=lambda members: (-len(members), order[members[0]]))
    fabrics = [_fabric_of(topology, members) for members in groups]
    return _unique_names(fabrics)


def _unique_names(fabrics: list[Fabric]) -> list[Fabric]:
    taken: dict[str, int] = {}
    named = []
    for fabric in fabrics:
        taken[fabric.name] = taken.get(fabric.name, 0) + 1
        if taken[fabric.name] > 1:
            fabric = replace(fabric, name=f"{fabric.name}-{taken[fabric.name]}")
        named.append(fabric)
    return named


def _components(topology: Topology, members: list[Host]) -> list[set[str]]:
    """The fabrics among hosts of one NIC kind and site (`_same_fabric` pairs)."""
    names = {h.name for h in members}
    apart = sum(1 for link in topology.links if link.a in names and link.b in names
                and not _same_fabric(topology, topology.host(link.a), topology.host(link.b)))
    if apart < len(members) - 1:  # a clique less fewer than k - 1 edges is connected
        return [names]
    graph = nx.Graph()
    graph.add_nodes_from(h.name for h in members)
    for i, a in enumerate(members):
        for b in members[i + 1 :]:
            if _same_fabric(topology, a, b):
                graph.add_edge(a.name, b.name)
    return [set(c) for c in nx.connected_components(graph)]


def _same_fabric(topology: Topology, a: Host, b: Host) -> bool:
    kind = best_nic_kind(a)
    if best_nic_kind(b) != kind:
        return False
    if a.site is None or b.site is None or a.site != b.site:
        return False
    link = topology.link(a.name, b.name)
    if link is None:
        return True
    if link.status != "ok":
        return False
    speeds = [nic_speed_gbps(h, kind) for h in (a, b)]
    if None in speeds:
        return link.bandwidth_gbps >= FAST_ETHERNET_GBPS
    return link.bandwidth_gbps >= FAST_FRACTION * min(speeds)


def _fabric_of(topology: Topology, members: list[str]) -> Fabric:
    hosts = [topology.host(name) for name in members]
    kind = best_nic_kind(hosts[0])
    speeds = [nic_speed_gbps(h, kind) for h in hosts]
    speed = None if any(s is None for s in speeds) else min(speeds)
    site = hosts[0].site
    name = f"{site or members[0]}-{kind.value}"
    return Fabric(name=name, kind=kind, site=site, hosts=tuple(members), speed_gbps=speed)


def fabric_of_host(fabrics: list[Fabric], host: str) -> Fabric:
    return next(f for f in fabrics if host in f.host_set)
