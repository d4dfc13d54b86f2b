"""holmes.fabric and holmes.network on small hand-built topologies (fixtures shared with
test_nics.py)."""

from __future__ import annotations

from typing import Any

import pytest

from holmes.fabric import find_fabrics
from holmes.network import INTRA_HOST_GBPS, Network
from topology.errors import InputError
from topology.schema import Topology

IB = {"name": "mlx5_0:1", "kind": "infiniband", "speed_gbps": 200, "state": "up",
      "rdma_device": "mlx5_0", "rdma_port": 1, "netdev": "ib0"}
ROCE = {"name": "mlx5_2:1", "kind": "roce", "speed_gbps": 100, "state": "up",
        "rdma_device": "mlx5_2", "rdma_port": 1, "netdev": "ens1f0", "gid_index": 3}
ETH = {"name": "eth0", "kind": "ethernet", "speed_gbps": 25, "state": "up", "netdev": "eth0"}


def host(name: str, site: str, *nics: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "site": site, "cpu_cores": 32, "memory_gb": 256,
            "devices": [{"name": "gpu0", "kind": "gpu", "memory_gb": 80, "tflops": 150},
                        {"name": "gpu1", "kind": "gpu", "memory_gb": 80, "tflops": 150}],
            "nics": list(nics)}


def topology(hosts: list[dict[str, Any]], links: list[dict[str, Any]] = ()) -> Topology:
    sites = sorted({h["site"] for h in hosts})
    return Topology.model_validate({"version": 1, "sites": [{"name": s} for s in sites],
                                    "hosts": hosts, "links": list(links)})


@pytest.fixture
def mixed() -> Topology:
    return topology([host("ib1", "dc", IB, ETH), host("ib2", "dc", IB, ETH),
                     host("ro1", "dc", ROCE, ETH), host("ro2", "dc", ROCE, ETH),
                     host("eth1", "dc", ETH)])


def test_fabrics_split_by_nic_kind(mixed: Topology) -> None:
    fabrics = find_fabrics(mixed)
    assert [(f.name, f.kind.value, f.hosts) for f in fabrics] == [
        ("dc-infiniband", "infiniband", ("ib1", "ib2")),
        ("dc-roce", "roce", ("ro1", "ro2")),
        ("dc-ethernet", "ethernet", ("eth1",)),
    ]
    assert fabrics[0].speed_gbps == 200


def test_sites_and_slow_links_split_fabrics() -> None:
    slow = {"a": "e1", "b": "e2", "latency_ms": 5, "bandwidth_gbps": 0.05}
    fast = {"a": "e1", "b": "e3", "latency_ms": 0.1, "bandwidth_gbps": 20}
    slow_too = dict(slow, a="e3")
    t = topology([host("e1", "s1", ETH), host("e2", "s1", ETH), host("e3", "s1", ETH),
                  host("x1", "s2", ETH)], [slow, fast, slow_too])
    groups = sorted(f.hosts for f in find_fabrics(t))
    assert groups == [("e1", "e3"), ("e2",), ("x1",)]


def test_network_uses_links_then_fabric_then_ethernet(mixed: Topology) -> None:
    network = Network(mixed, find_fabrics(mixed))
    assert network.host_link("ib1", "ib2")[1] == 200
    assert network.host_link("ib1", "ro1")[1] == 25
    assert network.device_link("ib1:gpu0", "ib1:gpu1")[1] == INTRA_HOST_GBPS
    assert network.host_link("ib1", "ib2", socket=True)[1] == 25
    assert network.host_link("ib1", "ib2")[1] == 200


def test_unreachable_pair_is_an_input_error() -> None:
    cut = {"a": "a1", "b": "b1", "status": "unreachable", "reason": "firewall"}
    t = topology([host("a1", "s1", ETH), host("b1", "s2", ETH)], [cut])
    with pytest.raises(InputError, match="a1 and b1 cannot reach each other: firewall"):
        Network(t, find_fabrics(t)).host_link("a1", "b1")
