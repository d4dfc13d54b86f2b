"""The committed example topologies: valid, the advertised shapes, and reproducible."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from topology.schema import NicKind, Topology, load_topology

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["holmes-ib-roce", "holmes-a100-v100", "holmes-three-fabrics", "scale-1024", "geo12"]

IB, ROCE, ETH = NicKind.INFINIBAND, NicKind.ROCE, NicKind.ETHERNET


def load_example(name: str) -> Topology:
    return load_topology(EXAMPLES / name / "topology.yaml")


def gpu_count(topology: Topology) -> int:
    return sum(1 for h in topology.hosts for d in h.devices if d.kind == "gpu")


def nic_kinds(topology: Topology) -> Counter[tuple[str | None, frozenset[NicKind]]]:
    """How many hosts have each (site, set of NIC kinds)."""
    return Counter((h.site, frozenset(n.kind for n in h.nics)) for h in topology.hosts)


@pytest.mark.parametrize(
    ("name", "hosts", "gpus", "kinds"),
    [
        ("holmes-ib-roce", 8, 64, {("dc", IB): 4, ("dc", ROCE): 4}),
        ("holmes-a100-v100", 8, 64, {("a100", IB): 4, ("v100", IB): 4}),
        ("holmes-three-fabrics", 40, 320, {("dc1", IB): 16, ("dc1", ROCE): 16, ("dc2", IB): 8}),
        (
            "scale-1024",
            128,
            1024,
            {("ib-a", IB): 32, ("ib-b", IB): 32, ("roce-a", ROCE): 32, ("roce-b", ROCE): 32},
        ),
    ],
)
def test_datacentre_example_shape(name: str, hosts: int, gpus: int, kinds: dict) -> None:
    topology = load_example(name)
    assert len(topology.hosts) == hosts
    assert gpu_count(topology) == gpus
    assert topology.links == []  # the planner derives fabric and Ethernet speeds
    expected = {(site, frozenset({rdma, ETH})): n for (site, rdma), n in kinds.items()}
    assert dict(nic_kinds(topology)) == expected
    for host in topology.hosts:
        eth = [n for n in host.nics if n.kind == ETH]
        assert [(n.netdev, n.speed_gbps) for n in eth] == [("eth0", 25.0)]
        for nic in host.nics:
            if nic.kind == ROCE:
                assert nic.gid_index == 3
            if nic.kind != ETH:
                assert nic.rdma_device and nic.rdma_port == 1 and nic.speed_gbps


def test_gpu_classes_in_a100_v100() -> None:
    topology = load_example("holmes-a100-v100")
    by_site = {
        site: {(d.memory_gb, d.tflops) for h in topology.hosts if h.site == site for d in h.devices}
        for site in ("a100", "v100")
    }
    assert by_site == {"a100": {(85.9, 150)}, "v100": {(34.4, 60)}}
    v100_ib = {n.speed_gbps for h in topology.hosts if h.site == "v100" for n in h.nics}
    assert v100_ib == {100, 25}


def test_geo12_nodes_and_links() -> None:
    topology = load_example("geo12")
    assert len(topology.hosts) == 20
    assert len(topology.links) == 190
    assert len(topology.sites) == 12
    assert topology.hosts[0].name == "n00-australia"
    assert topology.hosts[12].site == "australia"  # round-robin: node i in region i mod 12
    for host in topology.hosts:
        assert [(d.kind, d.memory_gb, d.tflops) for d in host.devices] == [("gpu", 85.9, None)]
        assert [(n.kind, n.speed_gbps) for n in host.nics] == [(ETH, 10)]
    assert all(link.measured and link.measured.method == "reference" for link in topology.links)


def test_geo12_figures_by_hand() -> None:
    topology = load_example("geo12")
    # Belgium-Germany, published as 4 ms and 0.2425 GiB/s:
    # 0.2425 * 1073741824 B/s * 8 bit/B = 2083059138.6 bit/s = 2.08306 Gbit/s.
    link = topology.link("n01-belgium", "n03-germany")
    assert link is not None
    assert link.latency_ms == 4
    assert link.bandwidth_gbps == pytest.approx(2.08306, rel=1e-6)
    # Same region (n00 and n12 are both in Australia): 1 ms, 2 GiB/s = 17.1799 Gbit/s.
    same = topology.link("n00-australia", "n12-australia")
    assert same is not None
    assert (same.latency_ms, same.bandwidth_gbps) == (1, pytest.approx(17.1799, rel=1e-6))
    # NL-London kept as published (0.00023681640625 GiB/s), not corrected.
    nl_london = topology.link("n07-nl", "n11-london")
    assert nl_london is not None
    assert nl_london.bandwidth_gbps == pytest.approx(0.00203424, rel=1e-6)


def test_generator_reproduces_committed_files(tmp_path: Path) -> None:
    script = EXAMPLES / "generate.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, timeout=60)
    for name in NAMES:
        fresh = (tmp_path / name / "topology.yaml").read_bytes()
        committed = (EXAMPLES / name / "topology.yaml").read_bytes()
        assert fresh == committed, f"examples/{name}/topology.yaml is stale: rerun generate.py"
