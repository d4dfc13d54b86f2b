"""Regenerate the example topologies the planner's benchmarks run on.

    python examples/generate.py [--out DIR]

Every example is built from the project's own schema (`topology.schema`) and written with
`save_topology`, one `<example>/topology.yaml` per folder under DIR (default: this
folder). The output depends on nothing but this script and, for `geo12`, the published
measurements in `examples/geo12/geo12-links.yaml` (a copy of the project's
shared/reference/geo12-links.yaml), so running it twice gives identical bytes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import yaml

from topology.schema import (
    TOPOLOGY_VERSION,
    Device,
    Host,
    Link,
    Measurement,
    Nic,
    NicKind,
    Site,
    Topology,
    save_topology,
)

EXAMPLES_DIR = Path(__file__).resolve().parent
GEO12_REFERENCE = Path(__file__).resolve().parent / "geo12" / "geo12-links.yaml"

GIB_PER_S_TO_GBIT_PER_S = 1024**3 * 8 / 1e9
ETHERNET_GBPS = 25.0
ROCE_GID_INDEX = 3


@dataclass(frozen=True)
class GpuSpec:
    """One GPU class: its model string, memory and the effective TFLOPS we assume."""

    model: str
    memory_gb: float
    tflops: float | None


@dataclass(frozen=True)
class HostSpec:
    """One kind of GPU server: its GPUs, its RDMA ports and its size."""

    gpu: GpuSpec
    gpus: int
    rdma_kind: NicKind
    rdma_ports: int
    rdma_gbps: float
    cpu_cores: int
    memory_gb: float


# Effective (sustained, ~45-50% of dense peak) throughput for transformer training:
# A100 bf16 peak 312 TFLOPS -> 150; V100 fp16 tensor-core peak 125 TFLOPS -> 60.
# Memory in GB (10^9 bytes) as discovery reports it: an "80GB" card has 80 GiB = 85.9 GB.
A100 = GpuSpec("NVIDIA A100-SXM4-80GB", 85.9, 150)
V100 = GpuSpec("Tesla V100-SXM2-32GB", 34.4, 60)

A100_IB_HDR = HostSpec(A100, 8, NicKind.INFINIBAND, 4, 200, 128, 1024)
A100_ROCE = HostSpec(A100, 8, NicKind.ROCE, 4, 100, 128, 1024)
V100_IB_HDR100 = HostSpec(V100, 8, NicKind.INFINIBAND, 4, 100, 80, 512)

DATACENTRE_ASSUMPTIONS = """\
Assumptions (all examples made by examples/generate.py):
  A100-class GPU: 80 GiB (85.9 GB), 150 TFLOPS effective bf16 (peak 312, ~48% sustained).
  V100-class GPU: 32 GiB (34.4 GB), 60 TFLOPS effective fp16 (peak 125, ~48% sustained).
  InfiniBand hosts: 4 HCA ports mlx5_0..3 (netdev ib0..3); HDR 200 Gbit/s each
  (HDR100 100 Gbit/s on V100 hosts). RoCE hosts: 4 RoCE v2 ports at 100 Gbit/s
  (gid_index 3). Every host: eth0, 25 Gbit/s Ethernet.
No links are listed: the planner derives them. Hosts with the same RDMA NIC kind in
the same site form one fabric and talk at their RDMA NIC speed; between fabrics the
only common network is Ethernet, so traffic there runs at 25 Gbit/s."""


# ---------------------------------------------------------------- building blocks


def gpu_devices(gpu: GpuSpec, count: int) -> list[Device]:
    return [
        Device(
            name=f"cuda{i}", kind="gpu", model=gpu.model, memory_gb=gpu.memory_gb, tflops=gpu.tflops
        )
        for i in range(count)
    ]


def rdma_nics(kind: NicKind, ports: int, gbps: float) -> list[Nic]:
    """`ports` single-port mlx5 HCAs of one kind, named `mlx5_<i>:1` like the probe does."""
    return [
        Nic(
            name=f"mlx5_{i}:1",
            kind=kind,
            speed_gbps=gbps,
            state="up",
            netdev=f"ib{i}" if kind == NicKind.INFINIBAND else f"ens{i + 1}f0np0",
            rdma_device=f"mlx5_{i}",
            rdma_port=1,
            gid_index=ROCE_GID_INDEX if kind == NicKind.ROCE else None,
        )
        for i in range(ports)
    ]


def ethernet_nic(gbps: float, name: str = "eth0") -> Nic:
    return Nic(name=name, kind=NicKind.ETHERNET, speed_gbps=gbps, state="up", netdev=name)


def gpu_host(name: str, address: str, site: str, spec: HostSpec) -> Host:
    return Host(
        name=name,
        address=address,
        site=site,
        cpu_cores=spec.cpu_cores,
        memory_gb=spec.memory_gb,
        devices=gpu_devices(spec.gpu, spec.gpus),
        nics=[
            *rdma_nics(spec.rdma_kind, spec.rdma_ports, spec.rdma_gbps),
            ethernet_nic(ETHERNET_GBPS),
        ],
    )


def fabric_hosts(prefix: str, count: int, site: str, spec: HostSpec, subnet: int) -> list[Host]:
    """`count` identical hosts `<prefix>00..` on one fabric, addressed 10.<subnet>.0.<i+1>."""
    return [
        gpu_host(f"{prefix}{i:02d}", f"10.{subnet}.0.{i + 1}", site, spec) for i in range(count)
    ]


def topology(
    name: str, sites: list[Site], hosts: list[Host], links: Iterable[Link] = ()
) -> Topology:
    return Topology(
        version=TOPOLOGY_VERSION, name=name, sites=sites, hosts=hosts, links=list(links)
    )


# ---------------------------------------------------------------- datacentre examples


def holmes_ib_roce() -> tuple[Topology, str]:
    hosts = fabric_hosts("ib", 4, "dc", A100_IB_HDR, 1) + fabric_hosts(
        "roce", 4, "dc", A100_ROCE, 2
    )
    sites = [Site(name="dc", description="one data centre, an InfiniBand and a RoCE fabric")]
    header = f"""\
holmes-ib-roce: a Holmes-like (arXiv 2312.03549) mixed-NIC data centre.
4 InfiniBand hosts (ib00..ib03) + 4 RoCE hosts (roce00..roce03), 8 A100 each, 64 GPUs,
all in site 'dc': the two fabrics differ only by NIC kind.
{DATACENTRE_ASSUMPTIONS}"""
    return topology("holmes-ib-roce", sites, hosts), header


def holmes_a100_v100() -> tuple[Topology, str]:
    hosts = fabric_hosts("a100-", 4, "a100", A100_IB_HDR, 1) + fabric_hosts(
        "v100-", 4, "v100", V100_IB_HDR100, 2
    )
    sites = [
        Site(name="a100", description="A100 cluster, HDR InfiniBand 200 Gbit/s"),
        Site(name="v100", description="V100 cluster, HDR100 InfiniBand 100 Gbit/s"),
    ]
    header = f"""\
holmes-a100-v100: two clusters whose GPUs differ in speed and memory.
4 hosts x 8 A100 on one InfiniBand fabric (site a100) + 4 hosts x 8 V100 on another
(site v100), 64 GPUs; the clusters are joined only by 25 Gbit/s Ethernet.
{DATACENTRE_ASSUMPTIONS}"""
    return topology("holmes-a100-v100", sites, hosts), header


def holmes_three_fabrics() -> tuple[Topology, str]:
    hosts = (
        fabric_hosts("ib1-", 16, "dc1", A100_IB_HDR, 1)
        + fabric_hosts("roce-", 16, "dc1", A100_ROCE, 2)
        + fabric_hosts("ib2-", 8, "dc2", A100_IB_HDR, 3)
    )
    sites = [
        Site(name="dc1", description="InfiniBand fabric ib1-* and RoCE fabric roce-*"),
        Site(name="dc2", description="a second InfiniBand fabric ib2-*"),
    ]
    header = f"""\
holmes-three-fabrics: three fabrics of 16 + 16 + 8 hosts x 8 A100 (320 GPUs).
ib1-00..ib1-15 (InfiniBand) and roce-00..roce-15 (RoCE) share site dc1 and are told
apart by NIC kind; ib2-00..ib2-07 is a second InfiniBand fabric, kept apart by site dc2.
{DATACENTRE_ASSUMPTIONS}"""
    return topology("holmes-three-fabrics", sites, hosts), header


def one_ib_fabric() -> tuple[Topology, str]:
    hosts = fabric_hosts("ib", 16, "dc", A100_IB_HDR, 1)
    sites = [Site(name="dc", description="one InfiniBand fabric")]
    header = f"""\
one-ib-fabric: 16 hosts x 8 A100 (128 GPUs) on one InfiniBand fabric in site 'dc'.
Homogeneous: there is nothing for NIC-aware placement to gain, so a plan here should
equal Megatron's rank order with NCCL's own transport (the fair naive baseline).
{DATACENTRE_ASSUMPTIONS}"""
    return topology("one-ib-fabric", sites, hosts), header


def scale_1024() -> tuple[Topology, str]:
    islands = [
        ("ib-a", NicKind.INFINIBAND, A100_IB_HDR),
        ("ib-b", NicKind.INFINIBAND, A100_IB_HDR),
        ("roce-a", NicKind.ROCE, A100_ROCE),
        ("roce-b", NicKind.ROCE, A100_ROCE),
    ]
    hosts: list[Host] = []
    for subnet, (site, _, spec) in enumerate(islands, start=1):
        hosts += fabric_hosts(f"{site}-", 32, site, spec, subnet)
    sites = [
        Site(name=site, description=f"{kind.value} island of 32 hosts") for site, kind, _ in islands
    ]
    header = f"""\
scale-1024: 128 hosts x 8 A100 = 1024 GPUs in four fabrics of 32 hosts, one per site
(ib-a, ib-b: InfiniBand; roce-a, roce-b: RoCE), for the planning-time benchmark.
{DATACENTRE_ASSUMPTIONS}"""
    return topology("scale-1024", sites, hosts), header


# ---------------------------------------------------------------- geo12 (SkipPipe)

GEO12_NODES = 20
GEO12_NIC_GBPS = 10.0
GEO12_GPU = GpuSpec("GPU (SkipPipe model)", 85.9, None)


def gib_s_to_gbps(gib_per_s: float) -> float:
    """GiB/s (1024^3 bytes) to Gbit/s (10^9 bits), kept to 6 significant digits."""
    return float(f"{gib_per_s * GIB_PER_S_TO_GBIT_PER_S:.6g}")


def load_geo12_reference(path: Path = GEO12_REFERENCE) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(
            f"error: {path} not found; geo12 is built from SkipPipe's published region "
            "latencies and bandwidths (examples/geo12/geo12-links.yaml)"
        )
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def region_pair_figures(reference: dict[str, Any]) -> dict[frozenset[str], tuple[float, float]]:
    """(latency ms, bandwidth GiB/s) per unordered region pair, as published."""
    figures = {}
    for entry in reference["links"]:
        figures[frozenset((entry["a"], entry["b"]))] = (
            float(entry["latency_ms"]),
            float(entry["bandwidth_gib_s"]),
        )
    return figures


def geo12_host(index: int, region: str) -> Host:
    return Host(
        name=f"n{index:02d}-{region.lower()}",
        address=f"10.20.0.{index + 1}",
        site=region.lower(),
        cpu_cores=16,
        memory_gb=128,
        devices=gpu_devices(GEO12_GPU, 1),
        nics=[ethernet_nic(GEO12_NIC_GBPS)],
    )


def same_region_figures(reference: dict[str, Any]) -> tuple[float, float]:
    same = reference["same_region"]
    return float(same["latency_ms"]), float(same["bandwidth_gib_s"])


def geo12_links(
    hosts: list[Host], regions: dict[str, str], reference: dict[str, Any]
) -> list[Link]:
    same_region = same_region_figures(reference)
    figures = region_pair_figures(reference)
    links = []
    for a, b in combinations(hosts, 2):
        ra, rb = regions[a.name], regions[b.name]
        latency, gib_s = same_region if ra == rb else figures[frozenset((ra, rb))]
        links.append(
            Link(
                a=a.name,
                b=b.name,
                latency_ms=latency,
                bandwidth_gbps=gib_s_to_gbps(gib_s),
                measured=Measurement(method="reference"),
            )
        )
    return links


def geo12() -> tuple[Topology, str]:
    reference = load_geo12_reference()
    region_names = reference["regions"]
    regions = {}
    hosts = []
    for i in range(GEO12_NODES):
        region = region_names[i % len(region_names)]
        hosts.append(geo12_host(i, region))
        regions[hosts[-1].name] = region
    sites = [Site(name=r.lower(), description=r) for r in region_names]
    links = geo12_links(hosts, regions, reference)
    same_ms, same_gib_s = same_region_figures(reference)
    header = f"""\
geo12: {GEO12_NODES} single-GPU nodes spread round-robin over 12 cloud regions (node i in
region i mod 12), the geo-distributed setting of SkipPipe (arXiv 2502.19913).
Source: shared/reference/geo12-links.yaml, the region-to-region one-way latency (ms)
and bandwidth SkipPipe published; the NL-London figure is kept as published.
Bandwidth conversion: GiB/s x 1024^3 x 8 / 1e9 = Gbit/s (6 significant digits).
Same-region pairs: {same_ms:g} ms and {same_gib_s:g} GiB/s ({gib_s_to_gbps(same_gib_s)} Gbit/s).
Each node: one GPU with 80 GiB (85.9 GB) and no TFLOPS figure (SkipPipe's model gives measured
seconds per layer per sample instead) and a {GEO12_NIC_GBPS:g} Gbit/s eth0.
Every pair of nodes has a link ({len(links)} in all), measured: {{method: reference}}."""
    return topology("geo12", sites, hosts, links), header


# ------------------------------------------- regional clusters (SkipPipe's region figures)

CLUSTER_NODES_PER_REGION = 4
# name: (regions in SkipPipe's spelling, subnet, what it is)
CLUSTERS: dict[str, tuple[list[str], int, str]] = {
    "geo5x4": (["LA", "NL", "Germany", "Singapore", "Oregon"], 21,
               "the regions of SkipPipe's 5-clusters setting"),
    "geo6x4": (["Australia", "Japan", "Taiwan", "Iowa", "Canada", "Belgium"], 22,
               "six regions of SkipPipe's geo-distributed setting, Asia-Pacific heavy"),
}


def cluster_host(index: int, region: str, subnet: int) -> Host:
    return geo12_host(index, region).model_copy(update={"address": f"10.{subnet}.0.{index + 1}"})


def regional_clusters(name: str) -> tuple[Topology, str]:
    """CLUSTER_NODES_PER_REGION single-GPU nodes in each region of CLUSTERS[name] (a site
    of 4 nodes per region), linked by SkipPipe's published region figures."""
    region_names, subnet, what = CLUSTERS[name]
    reference = load_geo12_reference()
    regions, hosts = {}, []
    for r, region in enumerate(region_names):
        for j in range(CLUSTER_NODES_PER_REGION):
            hosts.append(cluster_host(r * CLUSTER_NODES_PER_REGION + j, region, subnet))
            regions[hosts[-1].name] = region
    sites = [Site(name=r.lower(), description=r) for r in region_names]
    links = geo12_links(hosts, regions, reference)
    same_ms, same_gib_s = same_region_figures(reference)
    header = f"""\
{name}: {len(region_names)} regions x {CLUSTER_NODES_PER_REGION} single-GPU nodes \
({len(hosts)} in all), {what}:
{", ".join(region_names)}. Nodes of one region form one site.
Source: SkipPipe's published region-to-region one-way latency (ms) and bandwidth
(examples/geo12/geo12-links.yaml), converted as for geo12 (GiB/s x 1024^3 x 8 / 1e9).
Same-region pairs: {same_ms:g} ms and {same_gib_s:g} GiB/s ({gib_s_to_gbps(same_gib_s)} Gbit/s).
Each node: one GPU with 85.9 GB and no TFLOPS figure (the skippipe-llama-24l model gives
measured seconds per layer per sample) and a {GEO12_NIC_GBPS:g} Gbit/s eth0.
Every pair of nodes has a link ({len(links)} in all), measured: {{method: reference}}."""
    return topology(name, sites, hosts, links), header


# ---------------------------------------------------------------- entry point

EXAMPLES: dict[str, Callable[[], tuple[Topology, str]]] = {
    "holmes-ib-roce": holmes_ib_roce,
    "holmes-a100-v100": holmes_a100_v100,
    "holmes-three-fabrics": holmes_three_fabrics,
    "one-ib-fabric": one_ib_fabric,
    "scale-1024": scale_1024,
    "geo12": geo12,
    "geo5x4": lambda: regional_clusters("geo5x4"),
    "geo6x4": lambda: regional_clusters("geo6x4"),
}


def generate(out: Path) -> list[Path]:
    """Write every example under `out`; return the paths written."""
    written = []
    for name, build in EXAMPLES.items():
        topo, header = build()
        path = out / name / "topology.yaml"
        save_topology(topo, path, header=header)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate hetsched's example topologies.")
    parser.add_argument(
        "--out", type=Path, default=EXAMPLES_DIR, help="folder to write into (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
