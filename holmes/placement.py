"""Placement: which devices form which pipeline stages, in which order, in which replica.

Three ways to lay devices out, all producing a `Layout` (layers come later):
- `datacentre_layouts` (Holmes): every stage's devices lie in one fabric, so its
  data-parallel all-reduce never leaves that fabric; stages of one fabric are consecutive
  and fabrics are ordered so the pipeline crosses the fewest and fastest links. Candidates
  differ in the data-parallel degree and in whether sites become separate replicas.
- `geo_layout` (DT-FM, Yuan et al. NeurIPS'22): for scattered nodes, stages are chosen
  to minimise data-parallel cost + 2 x pipeline cost, the pipeline cost being an
  open-loop path over stages whose edges are bottleneck matchings; local search.
- `naive_layout` (Megatron-style baseline): ranks in host order, pipeline outermost.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from holmes.fabric import Fabric
from holmes.network import Network, host_of
from topology.schema import Topology

Stages = tuple[tuple[str, ...], ...]
MAX_PERMUTED_FABRICS = 7
MAX_PERMUTED_STAGES = 5


@dataclass(frozen=True)
class Layout:
    """Replicas of pipelines: `replicas[r][s]` lists the devices of stage s of replica r.

    Within a stage the devices are data-parallel; lane j of a replica is the j-th device of
    each stage (a microbatch travels along one lane when the pipeline is full). `loss_at`
    says where the head and loss run: on the last stage (Megatron), or back at the origin
    in stage 0 (SkipPipe, whose partial routes always end where they began).

    With tensor parallelism a stage lists its TP groups by their first device (the
    leader, TP rank 0), and `tp_groups` holds every group, leader first, all on one host
    (`holmes.tensor_parallel`); a device of `replicas` without a group is alone (TP 1).
    `devices()` is every device the layout uses, group members included.
    """

    @property
    def head_stage(self) -> int:
        return 0 if self.loss_at == "origin" else self.stages - 1

    regime: str
    replicas: tuple[Stages, ...]
    description: str
    loss_at: str = "last"
    tp_groups: tuple[tuple[str, ...], ...] = ()

    @property
    def stages(self) -> int:
        return len(self.replicas[0])

    def devices(self) -> list[str]:
        return [m for replica in self.replicas for stage in replica for d in stage
                for m in self.members(d)]

    def members(self, device: str) -> tuple[str, ...]:
        """The TP group `device` leads (itself alone without tensor parallelism)."""
        return self._groups.get(device, (device,))

    def tp(self, stage: int) -> int:
        """The tensor-parallel degree of stage `stage` (the same in every replica)."""
        return len(self.members(self.replicas[0][stage][0]))

    @property
    def tensor_parallel(self) -> int:
        """The largest TP degree of any stage (1: no tensor parallelism)."""
        return max((len(g) for g in self.tp_groups), default=1)

    @functools.cached_property
    def _groups(self) -> dict[str, tuple[str, ...]]:
        return {group[0]: group for group in self.tp_groups}


def device_ids(topology: Topology) -> list[str]:
    """Every device of every reachable host, as `host:device`, in topology order."""
    return [f"{h.name}:{d.name}" for h in topology.hosts if h.status == "ok" for d in h.devices]


def fabric_devices(topology: Topology, fabric: Fabric) -> list[str]:
    hosts = set(fabric.hosts)
    return [d for d in device_ids(topology) if host_of(d) in hosts]


def datacentre_layouts(
    topology: Topology, fabrics: list[Fabric], network: Network, max_stages: int
) -> list[Layout]:
    """Holmes layouts: one replica over all fabrics, one per site, and one per fabric.

    For every pipeline depth, each replica takes the widest data-parallel degree that
    still gives it that many stages (replicas may differ in width; a fabric too small for
    the depth sits the layout out).
    """
    one = "one pipeline over all fabrics" if len(fabrics) > 1 else \
        f"one pipeline over fabric {fabrics[0].name}"
    groupings = [(one, [fabrics])]
    sites = sorted({f.site for f in fabrics if f.site is not None})
    if len(sites) > 1 and all(f.site is not None for f in fabrics):
        per_site = [[f for f in fabrics if f.site == s] for s in sites]
        groupings.append(("one replica per site", per_site))
    if len(fabrics) > 1 and len(fabrics) != len(sites):
        groupings.append(("one replica per fabric", [[f] for f in fabrics]))
    devices = _devices_by_fabric(topology, fabrics)
    layouts: dict[tuple, Layout] = {}
    for description, groups in groupings:
        ordered = [order_fabrics(group, network) for group in groups]
        for depth in _depths(devices, fabrics, max_stages):
            replicas = tuple(r for r in (_widest(devices, g, depth) for g in ordered) if r)
            if replicas and (len(replicas) > 1 or len(groups) == 1):
                widths = "/".join(str(len(r[0])) for r in replicas)
                layouts.setdefault(replicas, Layout(
                    "datacentre", replicas, f"{description}, {widths}-way data parallel in "
                    "each stage"))
    return list(layouts.values())


FabricDevices = dict[str, list[str]]


def _devices_by_fabric(topology: Topology, fabrics: list[Fabric]) -> FabricDevices:
    """Each fabric's devices in topology order (`fabric_devices`, computed once)."""
    every = [(host_of(d), d) for d in device_ids(topology)]
    return {f.name: [d for host, d in every if host in hosts]
            for f in fabrics for hosts in [set(f.hosts)]}


def _depths(devices: FabricDevices, fabrics: list[Fabric], max_stages: int) -> list[int]:
    """Pipeline depths worth trying: every stage count some data-parallel degree gives."""
    degrees = _dp_degrees(devices, fabrics)
    depths = {_stage_count(devices, [f], dp) for f in fabrics for dp in degrees}
    depths |= {_stage_count(devices, fabrics, dp) for dp in degrees}
    return sorted(d for d in depths if 0 < d <= max_stages)


def _stage_count(devices: FabricDevices, fabrics: list[Fabric], dp: int) -> int:
    return sum(len(devices[f.name]) // dp for f in fabrics)


def _widest(devices: FabricDevices, fabrics: list[Fabric], depth: int) -> Stages:
    """The first `depth` stages at the widest data-parallel degree that yields that many."""
    for dp in sorted(_dp_degrees(devices, fabrics), reverse=True):
        if _stage_count(devices, fabrics, dp) >= depth:
            return _stages_of(devices, fabrics, dp)[:depth]
    return ()


def _dp_degrees(devices: FabricDevices, fabrics: list[Fabric]) -> list[int]:
    sizes = [len(devices[f.name]) for f in fabrics]
    powers = [2**i for i in range(max(sizes).bit_length())]
    return sorted({d for d in [*powers, *sizes] if d <= max(sizes)})


def _stages_of(devices: FabricDevices, fabrics: list[Fabric], dp: int) -> Stages:
    """Stages of `dp` consecutive devices, each inside one fabric, fabric after fabric."""
    stages = []
    for fabric in fabrics:
        found = devices[fabric.name]
        stages += [tuple(found[i : i + dp]) for i in range(0, len(found) - dp + 1, dp)]
    return tuple(stages)


def order_fabrics(fabrics: list[Fabric], network: Network) -> list[Fabric]:
    """The fabric order whose consecutive fabrics are joined by the fastest links."""
    if len(fabrics) <= 1:
        return list(fabrics)

    def hop(a: Fabric, b: Fabric) -> float:
        latency_ms, gbps = network.host_link(a.hosts[-1], b.hosts[0])
        return latency_ms / 1000 + 1 / gbps

    if len(fabrics) <= MAX_PERMUTED_FABRICS:
        return list(min(itertools.permutations(fabrics), key=lambda o: _path_cost(o, hop)))
    return _greedy_path(fabrics, hop)


def _path_cost(order: tuple, hop: Callable) -> float:
    return sum(hop(a, b) for a, b in itertools.pairwise(order))


def _greedy_path(items: list, hop: Callable) -> list:
    best: list = []
    for start in items:
        path, left = [start], [i for i in items if i is not start]
        while left:
            path.append(min(left, key=lambda i, last=path[-1]: hop(last, i)))
            left.remove(path[-1])
        if not best or _path_cost(tuple(path), hop) < _path_cost(tuple(best), hop):
            best = path
    return best


def naive_layout(topology: Topology, stages: int, dp: int, replicas: int = 1) -> Layout:
    """Megatron order: rank r is the r-th device in host order; stage = r // dp."""
    devices = device_ids(topology)
    per_replica = stages * dp
    chosen = []
    for r in range(replicas):
        block = devices[r * per_replica : (r + 1) * per_replica]
        chosen.append(tuple(tuple(block[s * dp : (s + 1) * dp]) for s in range(stages)))
    return Layout("naive", tuple(chosen), f"ranks in host order, {stages} stages x {dp}-way "
                  "data parallel, pipeline outermost")


@dataclass(frozen=True)
class GeoCosts:
    """What the DT-FM cost model needs: bytes of one stage's gradients and of activations."""

    stage_gradient_bytes: float
    activation_bytes: float
    microbatches: int


def geo_layout(devices: list[str], stages: int, network: Network, costs: GeoCosts,
               seed: int = 0, rounds: int = 1500) -> Layout:
    """DT-FM placement: stage sizes like SkipPipe's ([5,3,3,3,3,3] for 20 over 6)."""
    sizes = stage_sizes(len(devices), stages)
    search = _GeoSearch(devices, sizes, network, costs)
    groups = search.run(random.Random(seed), rounds)
    order, _ = search.best_order(groups)
    ordered = [groups[i] for i in order]
    return Layout("geo", (tuple(tuple(g) for g in ordered),),
                  f"DT-FM placement of {len(devices)} nodes into stages of {sizes}",
                  loss_at="origin")


def stage_sizes(nodes: int, stages: int) -> list[int]:
    """Equal stages, the remainder on stage 0 (it holds the origins of all microbatches)."""
    if not 0 < stages <= nodes:
        raise ValueError(f"cannot make {stages} stages from {nodes} nodes")
    base = nodes // stages
    return [base + nodes - base * stages] + [base] * (stages - 1)


class _GeoSearch:
    """Local search over node-to-stage assignments for the DT-FM cost."""

    def __init__(self, devices: list[str], sizes: list[int], network: Network,
                 costs: GeoCosts):
        self.devices = devices
        self.sizes = sizes
        self.costs = costs
        self.time = {(a, b): self._transfer(network, a, b) for a in devices for b in devices}
        self.bandwidth = {(a, b): network.device_link(a, b)[1] for a in devices
                          for b in devices if a != b}

    def _transfer(self, network: Network, a: str, b: str) -> float:
        if a == b:
            return 0.0
        latency_ms, gbps = network.device_link(a, b)
        return latency_ms / 1000 + self.costs.activation_bytes * 8 / (gbps * 1e9)

    def run(self, rng: random.Random, rounds: int) -> list[list[str]]:
        groups = self._greedy_start()
        if len(groups) < 2:  # one stage holds every node: there is nothing to swap
            return groups
        cost = self.cost(groups)
        for _ in range(rounds):
            i, j = rng.sample(range(len(groups)), 2)
            a, b = rng.randrange(len(groups[i])), rng.randrange(len(groups[j]))
            groups[i][a], groups[j][b] = groups[j][b], groups[i][a]
            new = self.cost(groups)
            if new <= cost:
                cost = new
            else:
                groups[i][a], groups[j][b] = groups[j][b], groups[i][a]
        return groups

    def _greedy_start(self) -> list[list[str]]:
        """Fill stages one by one with the nodes closest to the stage's first node."""
        left = list(self.devices)
        groups = []
        for size in sorted(self.sizes, reverse=True):
            seed = left.pop(0)
            near = sorted(left, key=lambda d, s=seed: self.time[(s, d)])[: size - 1]
            groups.append([seed, *near])
            left = [d for d in left if d not in near]
        return groups

    def cost(self, groups: list[list[str]]) -> float:
        dp = sum(self._allreduce(g) for g in groups)
        return dp + 2 * self._pipeline(groups)

    def _allreduce(self, group: list[str]) -> float:
        if len(group) < 2:
            return 0.0
        slowest = min(self.bandwidth[(a, b)] for a in group for b in group if a != b)
        n = len(group)
        return 2 * (n - 1) / n * self.costs.stage_gradient_bytes * 8 / (slowest * 1e9)

    def _pipeline(self, groups: list[list[str]]) -> float:
        _, path_cost = self.best_order(groups)
        return path_cost * self.costs.microbatches / max(len(g) for g in groups)

    def _edge(self, a: list[str], b: list[str]) -> float:
        """The slowest hop between two stages as routes pair them: microbatch m goes from
        a[m mod |a|] to b[m mod |b|] (`holmes.estimate.routes_of`), so the matching the
        search optimises is exactly the one that will carry the activations."""
        span = math.lcm(len(a), len(b))
        return max(self.time[(a[m % len(a)], b[m % len(b)])] for m in range(span))

    def best_order(self, groups: list[list[str]]) -> tuple[list[int], float]:
        """Stage order from the largest group (the origins) with the cheapest open path."""
        n = len(groups)
        edge = [[self._edge(groups[a], groups[b]) if a != b else 0.0 for b in range(n)]
                for a in range(n)]
        origin = max(range(n), key=lambda i: (len(groups[i]), -i))
        rest = [i for i in range(n) if i != origin]

        def cost(order: list[int]) -> float:
            return sum(edge[a][b] for a, b in itertools.pairwise(order))

        if len(rest) <= MAX_PERMUTED_STAGES:
            best = min(([origin, *p] for p in itertools.permutations(rest)), key=cost)
        else:
            best = [origin, *_greedy_path(rest, lambda x, y: edge[x][y])]
        return best, cost(best)
