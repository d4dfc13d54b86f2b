"""The bandwidth between a host's GPUs: vendor figures by generation, nvidia-smi's link
matrix, discovery, the topology field (bounds, old files) and what the planner uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from holmes.fabric import find_fabrics
from holmes.network import INTRA_HOST_GBPS, Network
from topology.discover import discover_intra_host
from topology.errors import InputError
from topology.intra_host import figure_for_models, parse_nvidia_smi_topo
from topology.schema import Device, load_topology, parse_topology

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# `nvidia-smi topo -m` as printed on an 8 x A100 SXM4 (NVSwitch) and a 4 x A100 PCIe host.
A100_SXM = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tCPU Affinity\tNUMA Affinity
GPU0\t X \tNV12\tNV12\tNV12\tNV12\tNV12\tNV12\tNV12\tPXB\t48-63\t3
GPU1\tNV12\t X \tNV12\tNV12\tNV12\tNV12\tNV12\tNV12\tPXB\t48-63\t3
GPU2\tNV12\tNV12\t X \tNV12\tNV12\tNV12\tNV12\tNV12\tSYS\t16-31\t1
GPU3\tNV12\tNV12\tNV12\t X \tNV12\tNV12\tNV12\tNV12\tSYS\t16-31\t1
GPU4\tNV12\tNV12\tNV12\tNV12\t X \tNV12\tNV12\tNV12\tSYS\t112-127\t7
GPU5\tNV12\tNV12\tNV12\tNV12\tNV12\t X \tNV12\tNV12\tSYS\t112-127\t7
GPU6\tNV12\tNV12\tNV12\tNV12\tNV12\tNV12\t X \tNV12\tSYS\t80-95\t5
GPU7\tNV12\tNV12\tNV12\tNV12\tNV12\tNV12\tNV12\t X \tSYS\t80-95\t5

Legend:

  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks
"""
PCIE_ONLY = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity
GPU0\t X \tPIX\tSYS\tSYS\t0-15\t0
GPU1\tPIX\t X \tSYS\tSYS\t0-15\t0
GPU2\tSYS\tSYS\t X \tPIX\t16-31\t1
GPU3\tSYS\tSYS\tPIX\t X \t16-31\t1
"""


@pytest.mark.parametrize(("model", "gb_per_s", "link"), [
    ("Tesla V100-SXM2-32GB", 300, "nvlink"),
    ("NVIDIA A100-SXM4-80GB", 600, "nvlink"),
    ("NVIDIA H100 80GB HBM3", 900, "nvlink"),
    ("NVIDIA A100 80GB PCIe", 64, "pcie"),
    ("NVIDIA H100 PCIe", 128, "pcie"),
    ("Tesla V100-PCIE-16GB", 32, "pcie"),
    ("NVIDIA L4", 64, "pcie"),
    ("Some Future Accelerator", 32, "pcie"),
])
def test_vendor_figure_by_generation(model: str, gb_per_s: float, link: str) -> None:
    figure = figure_for_models([model])
    assert figure.bandwidth_gbps == gb_per_s * 8 and figure.link == link
    assert model in figure.detail


def test_mixed_host_takes_the_slowest_gpu() -> None:
    figure = figure_for_models(["NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-32GB"])
    assert figure.bandwidth_gbps == 300 * 8


def test_nvidia_smi_matrix() -> None:
    assert parse_nvidia_smi_topo(A100_SXM) is True
    assert parse_nvidia_smi_topo(PCIE_ONLY) is False
    assert parse_nvidia_smi_topo("No devices were found") is None
    assert parse_nvidia_smi_topo("\tGPU0\tCPU Affinity\nGPU0\t X \t0-15\n") is None


def gpus(model: str, n: int) -> list[Device]:
    return [Device(name=f"gpu{i}", kind="gpu", model=model, memory_gb=80) for i in range(n)]


def test_discovery_reads_nvidia_smi_else_assumes_from_the_model() -> None:
    reported = discover_intra_host(gpus("NVIDIA A100-SXM4-80GB", 8), topo=lambda: A100_SXM)
    assert reported is not None
    assert (reported.bandwidth_gbps, reported.source) == (4800, "reported")
    # An SXM name but nvidia-smi sees no NVLink: the PCIe figure, as reported.
    pcie = discover_intra_host(gpus("NVIDIA A100-SXM4-80GB", 4), topo=lambda: PCIE_ONLY)
    assert pcie is not None and (pcie.bandwidth_gbps, pcie.source) == (512, "reported")
    assumed = discover_intra_host(gpus("NVIDIA H100 80GB HBM3", 8), topo=lambda: None)
    assert assumed is not None and (assumed.bandwidth_gbps, assumed.source) == (7200, "assumed")
    assert discover_intra_host(gpus("NVIDIA H100 80GB HBM3", 1), topo=lambda: A100_SXM) is None
    cpu = [Device(name="cpu0", kind="cpu", memory_gb=16)]
    assert discover_intra_host(cpu, topo=lambda: None) is None


def test_old_topology_loads_and_the_planner_assumes_by_model() -> None:
    topology = load_topology(EXAMPLES / "holmes-a100-v100" / "topology.yaml")
    assert all(h.intra_host is None for h in topology.hosts)
    network = Network(topology, find_fabrics(topology))
    assert network.intra_host("a100-00") == (600 * 8 / 2, "assumed")  # each way
    assert network.device_link("v100-00:cuda0", "v100-00:cuda1")[1] == 300 * 8 / 2


def small_topology(intra_host: dict | None, model: str = "NVIDIA A100-SXM4-80GB",
                   kind: str = "gpu") -> dict:
    host = {"name": "h0", "cpu_cores": 8, "memory_gb": 64,
            "devices": [{"name": f"d{i}", "kind": kind, "model": model, "memory_gb": 80}
                        for i in range(2)]}
    if intra_host is not None:
        host["intra_host"] = intra_host
    return {"version": 1, "hosts": [host]}


def test_the_field_is_read_and_used() -> None:
    topology = parse_topology(small_topology({"bandwidth_gbps": 1000, "source": "measured"}))
    assert topology.sha256() != parse_topology(small_topology(None)).sha256()
    network = Network(topology, find_fabrics(topology))
    assert network.host_link("h0", "h0")[1] == 500
    assert network.intra_host("h0") == (500, "measured")
    cpu = parse_topology(small_topology(None, model="x86", kind="cpu"))
    assert Network(cpu, find_fabrics(cpu)).host_link("h0", "h0")[1] == INTRA_HOST_GBPS


@pytest.mark.parametrize(("value", "words"), [
    ({"bandwidth_gbps": float("inf"), "source": "assumed"}, "hosts[0].intra_host.bandwidth_gbps"),
    ({"bandwidth_gbps": 0, "source": "assumed"}, "must be a number in"),
    ({"bandwidth_gbps": 100, "source": "guessed"}, "hosts[0].intra_host.source"),
    ({"bandwidth_gbps": 100}, "hosts[0].intra_host.source"),
    ({"bandwidth_gbps": 100, "source": "measured", "speed": 1}, "hosts[0].intra_host.speed"),
])
def test_bad_values_are_refused_naming_the_field(value: dict, words: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_topology(small_topology(value), "t.yaml")
    assert words in str(caught.value)
