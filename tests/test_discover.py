"""Local discovery (`hetsched probe local`) on fixture sysfs trees and on this machine."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from topology.discover import (
    LiveNetFacts,
    cpu_model,
    discover_devices,
    discover_host,
    discover_nics,
    measure_matmul_tflops,
    parse_rate_gbps,
    primary_address,
)
from topology.errors import InputError
from topology.schema import TOPOLOGY_VERSION, Nic, NicKind, Topology, parse_topology

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"


def nics_by_name(tree: str) -> dict[str, Nic]:
    nics = discover_nics(FIXTURES / tree, live_system=False)
    return {nic.name: nic for nic in nics}


def test_ib_hdr_host() -> None:
    nics = nics_by_name("ib_hdr")
    assert list(nics) == ["mlx5_0:1", "mlx5_1:1", "docker0", "eno1", "eno2"]
    for hca, netdev in [("mlx5_0", "ib0"), ("mlx5_1", "ib1")]:
        port = nics[f"{hca}:1"]
        assert port.kind is NicKind.INFINIBAND
        assert (port.netdev, port.rdma_device, port.rdma_port) == (netdev, hca, 1)
        assert port.speed_gbps == 200.0
        assert (port.state, port.virtual, port.mtu, port.gid_index) == ("up", False, 4092, None)
    management = nics["eno1"]
    assert management.kind is NicKind.ETHERNET
    assert (management.speed_gbps, management.state, management.virtual) == (25.0, "up", False)
    assert management.rdma_device is None and management.rdma_port is None
    down = nics["eno2"]
    assert (down.state, down.virtual, down.speed_gbps) == ("down", False, None)
    bridge = nics["docker0"]
    assert (bridge.state, bridge.virtual, bridge.speed_gbps) == ("down", True, None)


def test_rdma_netdevs_appear_once_and_lo_is_skipped() -> None:
    for tree in ("ib_hdr", "roce_v2", "ethernet_only"):
        netdevs = [nic.netdev for nic in discover_nics(FIXTURES / tree, live_system=False)]
        assert len(netdevs) == len(set(netdevs))
        assert "lo" not in netdevs
    kinds = {nic.netdev: nic.kind for nic in discover_nics(FIXTURES / "ib_hdr", False)}
    assert kinds["ib0"] is NicKind.INFINIBAND and kinds["ib1"] is NicKind.INFINIBAND


def test_roce_v2_host() -> None:
    nics = nics_by_name("roce_v2")
    assert list(nics) == ["mlx5_0:1", "mlx5_1:1", "eno1"]
    port = nics["mlx5_0:1"]
    assert port.kind is NicKind.ROCE
    assert (port.netdev, port.rdma_device, port.rdma_port) == ("ens1f0", "mlx5_0", 1)
    assert (port.speed_gbps, port.state, port.virtual, port.mtu) == (100.0, "up", False, 9000)
    # GIDs 0..3: link-local v1, link-local v2, IPv4-mapped v1, IPv4-mapped v2.
    assert port.gid_index == 3
    down_port = nics["mlx5_1:1"]
    assert (down_port.kind, down_port.netdev, down_port.state) == (NicKind.ROCE, "ens1f1", "down")
    assert down_port.speed_gbps is None, "a down port's rate is a placeholder, not its speed"
    assert down_port.gid_index == 1, "no IPv4-mapped GID: the first non-zero RoCE v2 one"
    assert nics["eno1"].kind is NicKind.ETHERNET and nics["eno1"].speed_gbps == 1.0


def test_ethernet_only_host() -> None:
    nics = nics_by_name("ethernet_only")
    assert list(nics) == ["eth0", "eth1", "veth3f9a2c1"]
    assert all(nic.kind is NicKind.ETHERNET for nic in nics.values())
    eth0 = nics["eth0"]
    assert (eth0.speed_gbps, eth0.state, eth0.virtual) == (10.0, "up", False)
    assert nics["eth1"].speed_gbps is None, "speed -1 means unknown"
    assert (nics["eth1"].state, nics["eth1"].virtual) == ("up", False)
    assert nics["veth3f9a2c1"].virtual is True
    assert all(nic.rdma_device is None and nic.gid_index is None for nic in nics.values())


@pytest.mark.parametrize(
    ("rate", "gbps"),
    [
        ("200 Gb/sec (4X HDR)", 200.0),
        ("100 Gb/sec (4X EDR)", 100.0),
        ("2.5 Gb/sec (1X SDR)", 2.5),
        ("400 Gb/sec (4X NDR)\n", 400.0),
        ("0 Gb/sec", None),
        ("garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rate(rate: str | None, gbps: float | None) -> None:
    assert parse_rate_gbps(rate) == gbps


def _touch(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def test_real_sysfs_layout_with_symlinks(tmp_path: Path) -> None:
    """class/* entries are symlinks into devices/; virtual netdevs live in devices/virtual."""
    pci = tmp_path / "devices" / "pci0000:00" / "0000:00:03.0"
    eth0 = pci / "net" / "eth0"
    hca = pci / "infiniband" / "mlx5_0"
    bridge = tmp_path / "devices" / "virtual" / "net" / "br0"
    for netdev, mtu in [(eth0, "9000"), (bridge, "1500")]:
        _touch(netdev / "operstate", "up")
        _touch(netdev / "mtu", mtu)
        _link(tmp_path / "class" / "net" / netdev.name, netdev)
    _link(eth0 / "device", pci)
    _link(hca / "device", pci)
    _link(tmp_path / "class" / "infiniband" / "mlx5_0", hca)
    port = hca / "ports" / "1"
    for rel, text in [
        ("state", "4: ACTIVE"),
        ("rate", "25 Gb/sec (1X EDR)"),
        ("link_layer", "Ethernet"),
        ("gids/0", "fe80:0000:0000:0000:0e42:a1ff:fe5b:7c10"),
        ("gid_attrs/types/0", "RoCE v2"),
    ]:
        _touch(port / rel, text)
    nics = {nic.name: nic for nic in discover_nics(tmp_path, live_system=False)}
    assert list(nics) == ["mlx5_0:1", "br0"]
    roce = nics["mlx5_0:1"]
    assert (roce.kind, roce.netdev, roce.speed_gbps, roce.mtu) == (NicKind.ROCE, "eth0", 25.0, 9000)
    assert (roce.virtual, roce.gid_index) == (False, 0)
    assert nics["br0"].virtual is True


def test_rdma_port_without_netdev_is_still_reported(tmp_path: Path) -> None:
    port = tmp_path / "class" / "infiniband" / "mlx5_3" / "ports" / "1"
    _touch(port / "link_layer", "InfiniBand")
    _touch(port / "state", "2: INIT")
    _touch(port / "rate", "400 Gb/sec (4X NDR)")
    _touch(tmp_path / "class" / "infiniband" / "mlx5_3" / "device" / "vendor", "0x15b3")
    [nic] = discover_nics(tmp_path, live_system=False)
    assert (nic.name, nic.kind, nic.netdev) == ("mlx5_3:1", NicKind.INFINIBAND, None)
    assert (nic.state, nic.speed_gbps) == ("down", None)


def test_empty_sysfs_root_has_no_nics(tmp_path: Path) -> None:
    assert discover_nics(tmp_path, live_system=False) == []


def test_missing_sysfs_root_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-sys"
    with pytest.raises(InputError, match="not a directory") as caught:
        discover_nics(missing, live_system=False)
    assert str(missing) in str(caught.value)
    with pytest.raises(InputError):
        discover_host(missing, measure_flops=False)


def test_host_from_fixture_is_deterministic_and_round_trips() -> None:
    host = discover_host(FIXTURES / "roce_v2", name="gpu-node-07", site="a", measure_flops=False)
    assert (host.name, host.site, host.address) == ("gpu-node-07", "a", None)
    assert all(nic.addresses == [] for nic in host.nics)
    assert host == discover_host(
        FIXTURES / "roce_v2", name="gpu-node-07", site="a", measure_flops=False
    )
    topology = Topology(version=TOPOLOGY_VERSION, sites=[{"name": "a"}], hosts=[host])
    assert parse_topology(topology.to_plain()) == topology


def test_bad_host_name_is_an_input_error() -> None:
    with pytest.raises(InputError, match="name"):
        discover_host(FIXTURES / "ethernet_only", name="no spaces allowed", measure_flops=False)


def test_live_host_is_valid() -> None:
    host = discover_host(measure_flops=False)
    assert host.cpu_cores >= 1 and host.memory_gb > 0
    assert host.devices and all(device.tflops is None for device in host.devices)
    assert all(nic.netdev != "lo" for nic in host.nics)
    Topology(version=TOPOLOGY_VERSION, hosts=[host])  # valid as a whole file too
    if host.address is not None:
        assert not host.address.startswith(("127.", "169.254."))


def test_primary_address_prefers_default_route_and_skips_loopback_and_link_local() -> None:
    nics = discover_nics(FIXTURES / "ib_hdr", live_system=False)
    facts = LiveNetFacts(
        up={"lo": True, "ib0": True, "eno1": True, "docker0": True, "eno2": False},
        addresses={
            "lo": ["127.0.0.1"],
            "ib0": ["169.254.3.4", "10.20.0.7"],
            "eno1": ["fd00::7", "192.168.1.7"],
            "docker0": ["172.17.0.1"],
            "eno2": ["10.9.9.9"],
        },
        default_route_netdev="eno1",
    )
    assert primary_address(nics, facts) == "192.168.1.7"
    no_route = LiveNetFacts(up=facts.up, addresses=facts.addresses)
    assert primary_address(nics, no_route) == "10.20.0.7"  # physical first, link-local skipped
    loopback_only = LiveNetFacts(up={"lo": True}, addresses={"lo": ["127.0.0.1"]})
    assert primary_address(nics, loopback_only) is None


def test_cpu_device_when_no_gpu(tmp_path: Path) -> None:
    [device] = discover_devices(12.5, measure_flops=False)
    if device.kind == "gpu":
        pytest.skip("this machine has a GPU")
    assert (device.name, device.kind, device.memory_gb) == ("cpu0", "cpu", 12.5)
    assert device.tflops is None
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13"
    assert cpu_model(tmp_path / "absent") is None


def test_nvml_gpus_when_torch_sees_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU-only torch on a GPU host still reports its GPUs, through NVML.

    No NVIDIA driver can run here, so pynvml is a stand-in with its real call names.
    """
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here; the NVML path is not taken")

    class NVMLError(Exception):
        pass

    memory = types.SimpleNamespace(total=80 * 10**9)
    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda handle: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMemoryInfo=lambda handle: memory,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    devices = discover_devices(64.0, measure_flops=True)
    assert [(d.name, d.kind, d.model, d.memory_gb, d.tflops) for d in devices] == [
        ("gpu0", "gpu", "NVIDIA H100 80GB HBM3", 80.0, None),
        ("gpu1", "gpu", "NVIDIA H100 80GB HBM3", 80.0, None),
    ]


def test_short_cpu_flops_measurement() -> None:
    tflops = measure_matmul_tflops("cpu", seconds=0.02, size=128)
    assert tflops is not None and tflops > 0
