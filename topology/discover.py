"""Local discovery for `hetsched probe local`: what this one host really has.

Owns reading the host's facts into a `topology.schema.Host`:

- NICs from a sysfs tree (`<root>/class/net`, `<root>/class/infiniband`): RDMA ports
  become infiniband or roce NICs (with their netdev, HCA, port and RoCE v2 GID index),
  the remaining netdevs become ethernet NICs; speed, state, MTU, virtual flag.
- Hostname, primary address, CPU cores and memory (socket, os, psutil).
- Compute devices: GPUs through torch.cuda (NVML when torch sees none), else the CPU;
  optionally their effective TFLOPS from a short matrix-product timing.

The sysfs root is a parameter so tests run on fixture trees. Facts that only the running
system can give (psutil link speeds, interface addresses) are used only when
`live_system` is true, so discovery on a fixture tree is deterministic.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import ValidationError

from topology.errors import InputError
from topology.schema import Device, Gbps, Host, Mtu, Nic, NicKind
from topology.validation import describe_validation_error, limit_of

State = Literal["up", "down", "unknown"]

_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")  # schema Name (hosts)
_NIC_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.:@-]")  # schema NicName
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([GMT])b/sec", re.IGNORECASE)
_RATE_UNIT_GBPS = {"M": 1e-3, "G": 1.0, "T": 1e3}
_NETDEV_STATES: dict[str, State] = {
    "up": "up",
    "down": "down",
    "lowerlayerdown": "down",
    "notpresent": "down",
    "dormant": "down",
}
_PORT_STATES: dict[str, State] = {
    "ACTIVE": "up",
    "ACTIVE_DEFER": "up",
    "DOWN": "down",
    "INIT": "down",
    "ARMED": "down",
}
# Values some drivers put in class/net/<if>/speed when they do not know it.
_UNKNOWN_MBPS = {65535, 0xFFFFFFFF}


# ---------------------------------------------------------------------------
# small sysfs readers: an unreadable file (absent, EINVAL, EACCES) reads as None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def _entries(directory: Path) -> list[str]:
    """Names in a directory, in natural order (eth2 before eth10); none if unreadable."""
    try:
        return sorted((p.name for p in directory.iterdir()), key=_natural_key)
    except OSError:
        return []


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------
# parsing of single facts


def parse_rate_gbps(rate: str | None) -> float | None:
    """Speed of an RDMA port from its sysfs `rate`, e.g. '200 Gb/sec (4X HDR)' -> 200.0."""
    match = _RATE.match(rate or "")
    if not match:
        return None
    gbps = float(match.group(1)) * _RATE_UNIT_GBPS[match.group(2).upper()]
    return gbps if gbps > 0 else None


def _mbps_to_gbps(mbps: int | None) -> float | None:
    if mbps is None or mbps <= 0 or mbps in _UNKNOWN_MBPS:
        return None
    return _known_speed(mbps / 1000)


def _known_speed(gbps: float | None) -> float | None:
    """A speed the schema accepts; a driver's out-of-range figure counts as unknown."""
    return gbps if gbps is not None and limit_of(Gbps).contains(gbps) else None


def _port_state(text: str | None) -> State | None:
    """'4: ACTIVE' -> 'up'; None when unreadable."""
    if text is None:
        return None
    return _PORT_STATES.get(text.partition(":")[2].strip().upper() or text.upper(), "unknown")


def _netdev_state(net_dir: Path) -> State:
    return _NETDEV_STATES.get((_read(net_dir / "operstate") or "").lower(), "unknown")


def _schema_name(raw: str, fallback: str, invalid: re.Pattern[str] = _NAME_CHARS) -> str:
    """`raw` made into a schema name: invalid characters become '-', at most 63 long."""
    name = invalid.sub("-", raw).lstrip("._-:@")[:63]
    return name or fallback


def _nic_name(raw: str) -> str:
    return _schema_name(raw, "nic", _NIC_NAME_CHARS)


# ---------------------------------------------------------------------------
# facts only a live system gives


@dataclass(frozen=True)
class LiveNetFacts:
    """psutil's view of the interfaces: speeds (Mbit/s, 0 = unknown), up flags, addresses."""

    speeds_mbps: dict[str, int] = field(default_factory=dict)
    up: dict[str, bool] = field(default_factory=dict)
    addresses: dict[str, list[str]] = field(default_factory=dict)
    default_route_netdev: str | None = None

    @classmethod
    def read(cls) -> LiveNetFacts:
        stats = psutil.net_if_stats()
        return cls(
            speeds_mbps={name: s.speed for name, s in stats.items()},
            up={name: s.isup for name, s in stats.items()},
            addresses={
                name: _usable_addresses(a.address for a in addrs)
                for name, addrs in psutil.net_if_addrs().items()
            },
            default_route_netdev=_default_route_netdev(Path("/proc/net/route")),
        )


def _usable_addresses(raw: Iterable[str]) -> list[str]:
    """IPv4 and IPv6 addresses, without IPv6 link-local ones (and no MAC addresses)."""
    found = []
    for text in raw:
        try:
            address = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if address.version == 6 and address.is_link_local:
            continue
        found.append(str(address))
    return found


def _default_route_netdev(route_table: Path) -> str | None:
    """The interface of the IPv4 default route, from /proc/net/route."""
    for line in (_read(route_table) or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) > 1 and fields[1] == "00000000":
            return fields[0]
    return None


# ---------------------------------------------------------------------------
# NICs


def discover_nics(sysfs_root: Path, live_system: bool) -> list[Nic]:
    """Every NIC under `sysfs_root`: RDMA ports first (by HCA, port), then Ethernet netdevs.

    A netdev that belongs to an RDMA port appears once, as that RDMA NIC. `lo` is left
    out. Raises InputError if `sysfs_root` is not a directory; a tree without
    `class/net` or `class/infiniband` simply has no NICs.
    """
    return nics_from_sysfs(sysfs_root, LiveNetFacts.read() if live_system else LiveNetFacts())


def nics_from_sysfs(sysfs_root: Path, live: LiveNetFacts) -> list[Nic]:
    """`discover_nics` with the live facts given (empty ones for a fixture tree)."""
    root = Path(sysfs_root)
    if not root.is_dir():
        raise InputError("not a directory (expected a sysfs tree such as /sys)", root)
    rdma = _rdma_nics(root, live)
    claimed = {nic.netdev for nic in rdma if nic.netdev}
    net_dir = root / "class" / "net"
    ethernet = [
        _ethernet_nic(root, name, live)
        for name in _entries(net_dir)
        if name != "lo" and name not in claimed
    ]
    return _with_unique_names([*rdma, *ethernet])


def _rdma_nics(root: Path, live: LiveNetFacts) -> list[Nic]:
    nics = []
    ib_dir = root / "class" / "infiniband"
    for hca in _entries(ib_dir):
        hca_dir = ib_dir / hca
        if "RNIC" in (_read(hca_dir / "node_type") or ""):
            continue  # iWARP: an RDMA NIC, but neither InfiniBand nor RoCE
        for port in _entries(hca_dir / "ports"):
            if port.isdigit() and int(port) >= 1:
                nic = _rdma_port_nic(root, hca, int(port), live)
                if nic is not None:
                    nics.append(nic)
    return nics


def _rdma_port_nic(root: Path, hca: str, port: int, live: LiveNetFacts) -> Nic | None:
    hca_dir = root / "class" / "infiniband" / hca
    port_dir = hca_dir / "ports" / str(port)
    link_layer = (_read(port_dir / "link_layer") or "").lower()
    if link_layer not in ("infiniband", "ethernet"):
        return None
    kind = NicKind.INFINIBAND if link_layer == "infiniband" else NicKind.ROCE
    netdev = _rdma_netdev(root, hca_dir, port)
    net_dir = root / "class" / "net" / netdev if netdev else None
    if net_dir is not None and not net_dir.is_dir():
        net_dir = None  # e.g. the netdev lives in another network namespace
    state = _port_state(_read(port_dir / "state"))
    if state is None:
        state = _netdev_state(net_dir) if net_dir else "unknown"
    speed = _known_speed(parse_rate_gbps(_read(port_dir / "rate")))
    if speed is None and netdev:
        speed = _netdev_speed_gbps(net_dir, netdev, live)
    virtual = _is_virtual(net_dir, root) if net_dir else not (hca_dir / "device").exists()
    return Nic(
        name=_nic_name(f"{hca}:{port}"),
        kind=kind,
        speed_gbps=None if state == "down" else speed,
        state=state,
        virtual=virtual,
        netdev=netdev,
        rdma_device=hca,
        rdma_port=port,
        gid_index=roce_v2_gid_index(port_dir) if kind is NicKind.ROCE else None,
        addresses=live.addresses.get(netdev, []) if netdev else [],
        mtu=_mtu(net_dir) if net_dir else None,
    )


def _rdma_netdev(root: Path, hca_dir: Path, port: int) -> str | None:
    """The netdev of an RDMA port: the GID table's ndev (RoCE), else the HCA's device/net."""
    ndevs_dir = hca_dir / "ports" / str(port) / "gid_attrs" / "ndevs"
    for index in _entries(ndevs_dir):
        ndev = _read(ndevs_dir / index)
        if ndev:
            return ndev
    candidates = _entries(hca_dir / "device" / "net")
    if not candidates:
        return None
    net_dir = root / "class" / "net"
    # dev_port is 0-based: IPoIB and mlx4 give each port of one HCA its own netdev.
    on_port = [c for c in candidates if _read_int(net_dir / c / "dev_port") == port - 1]
    return min(on_port or candidates, key=lambda name: (len(name), _natural_key(name)))


def roce_v2_gid_index(port_dir: Path) -> int | None:
    """Index of the RoCE v2 GID to use on an RDMA port, or None if there is none.

    Prefers an IPv4-mapped RoCE v2 GID (::ffff:a.b.c.d, routable; what NCCL picks by
    default and what NCCL_IB_GID_INDEX is usually set to), else the first non-zero one.
    """
    v2_gids: list[tuple[int, ipaddress.IPv6Address]] = []
    for index in _entries(port_dir / "gid_attrs" / "types"):
        gid = _gid(port_dir, index)
        if gid is not None and _is_roce_v2(port_dir, index):
            v2_gids.append((int(index), gid))
    mapped = [i for i, gid in v2_gids if gid.ipv4_mapped is not None]
    if mapped:
        return mapped[0]
    return v2_gids[0][0] if v2_gids else None


def _is_roce_v2(port_dir: Path, index: str) -> bool:
    return (_read(port_dir / "gid_attrs" / "types" / index) or "").lower() == "roce v2"


def _gid(port_dir: Path, index: str) -> ipaddress.IPv6Address | None:
    """A GID table entry as an address; None when unreadable, malformed or all zero."""
    if not index.isdigit():
        return None
    try:
        gid = ipaddress.IPv6Address(_read(port_dir / "gids" / index) or "")
    except ValueError:
        return None
    return gid if int(gid) else None


def _ethernet_nic(root: Path, netdev: str, live: LiveNetFacts) -> Nic:
    net_dir = root / "class" / "net" / netdev
    state = _netdev_state(net_dir)
    speed = _netdev_speed_gbps(net_dir, netdev, live)
    return Nic(
        name=_nic_name(netdev),
        kind=NicKind.ETHERNET,
        speed_gbps=None if state == "down" else speed,
        state=state,
        virtual=_is_virtual(net_dir, root),
        netdev=netdev,
        addresses=live.addresses.get(netdev, []),
        mtu=_mtu(net_dir),
    )


def _netdev_speed_gbps(net_dir: Path | None, netdev: str, live: LiveNetFacts) -> float | None:
    """class/net/<if>/speed (Mbit/s), else psutil's speed on a live system; None if unknown."""
    speed = _mbps_to_gbps(_read_int(net_dir / "speed")) if net_dir else None
    if speed is None:
        speed = _mbps_to_gbps(live.speeds_mbps.get(netdev))
    return speed


def _is_virtual(net_dir: Path, root: Path) -> bool:
    """A netdev with no backing device, or one that lives under /sys/devices/virtual."""
    if not (net_dir / "device").exists():
        return True
    resolved = net_dir.resolve()
    try:
        parts = resolved.relative_to(root.resolve()).parts
    except ValueError:
        parts = resolved.parts
    return any(parts[i : i + 2] == ("devices", "virtual") for i in range(len(parts) - 1))


def _mtu(net_dir: Path) -> int | None:
    mtu = _read_int(net_dir / "mtu")
    return mtu if mtu is not None and limit_of(Mtu).contains(mtu) else None


def _with_unique_names(nics: list[Nic]) -> list[Nic]:
    seen: set[str] = set()
    unique = []
    for nic in nics:
        name, suffix = nic.name, 2
        while name in seen:
            name, suffix = f"{nic.name[:60]}-{suffix}", suffix + 1
        seen.add(name)
        unique.append(nic if name == nic.name else nic.model_copy(update={"name": name}))
    return unique


# ---------------------------------------------------------------------------
# host facts


def primary_address(nics: list[Nic], live: LiveNetFacts) -> str | None:
    """First non-loopback, non-link-local IPv4 address of an up interface.

    Looks at the default-route interface first, then physical NICs, then virtual ones,
    then any other up interface psutil knows.
    """
    physical = [n.netdev for n in nics if n.netdev and not n.virtual]
    virtual = [n.netdev for n in nics if n.netdev and n.virtual]
    order = [live.default_route_netdev, *physical, *virtual, *sorted(live.addresses)]
    for netdev in order:
        if netdev and live.up.get(netdev, False):
            address = _first_global_ipv4(live.addresses.get(netdev, []))
            if address:
                return address
    return None


def _first_global_ipv4(addresses: list[str]) -> str | None:
    for text in addresses:
        address = ipaddress.ip_address(text)
        if address.version == 4 and not address.is_loopback and not address.is_link_local:
            return text
    return None


def _hostname() -> str:
    raw = socket.gethostname()
    if _schema_name(raw, "localhost") == raw:
        return raw
    return _schema_name(raw.split(".")[0], fallback="localhost")


def machine_id(boot_id: Path = Path("/proc/sys/kernel/random/boot_id")) -> str | None:
    """This kernel's boot id: the same in every network namespace of one machine, so
    hosts that report the same one share its CPUs (None where there is none)."""
    text = (_read(boot_id) or "").strip()
    return text[:128] or None


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask), else all the OS reports."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The 'model name' line of /proc/cpuinfo, or None (e.g. on most Arm machines)."""
    for line in (_read(cpuinfo) or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def _is_live_sysfs(sysfs_root: Path) -> bool:
    try:
        return Path(sysfs_root).resolve() == Path("/sys").resolve()
    except OSError:
        return False


# ---------------------------------------------------------------------------
# compute devices


def measure_matmul_tflops(
    device: str = "cpu", *, seconds: float = 0.3, size: int | None = None,
    threads: int | None = None,
) -> float | None:
    """Effective TFLOPS of repeated square matrix products on `device` for about `seconds`.

    fp32 on CPU; bf16 on a GPU that supports it, else fp16. None if nothing was timed.
    `threads` (CPU only) sets torch's intra-op threads for the measurement (restored
    after); `discover_devices` times a CPU with one, as a training worker runs (every
    script here sets one thread per worker), and the estimate shares the machine's cores
    among its workers.
    """
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _timed_matmuls(torch, device, seconds, size)
    finally:
        torch.set_num_threads(before)


def _timed_matmuls(torch: Any, device: str, seconds: float, size: int | None) -> float | None:
    target = torch.device(device)
    on_gpu = target.type == "cuda"
    dtype = torch.float32
    if on_gpu:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    n = size or (8192 if on_gpu else 1024)
    a = torch.randn(n, n, device=target, dtype=dtype)
    b = torch.randn(n, n, device=target, dtype=dtype)
    out = torch.empty(n, n, device=target, dtype=dtype)
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(target)) if on_gpu else _no_op
    for _ in range(3 if on_gpu else 1):  # warm-up: kernel choice, clocks, caches
        torch.matmul(a, b, out=out)
    sync()
    products, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        torch.matmul(a, b, out=out)
        sync()
        products += 1
    if products == 0 or elapsed <= 0:
        return None
    return float(f"{2 * n**3 * products / elapsed / 1e12:.4g}")


def _no_op() -> None:
    return None


def discover_devices(ram_gb: float, *, measure_flops: bool) -> list[Device]:
    """GPUs via torch.cuda, else via NVML (no TFLOPS then), else the CPU as `cpu0`."""
    gpus = _torch_gpus(measure_flops) or _nvml_gpus()
    if gpus:
        return gpus
    return [
        Device(
            name="cpu0",
            kind="cpu",
            model=cpu_model(),
            memory_gb=ram_gb,
            tflops=measure_matmul_tflops("cpu", threads=1) if measure_flops else None,
        )
    ]


def gpu_driver_present(dev: Path = Path("/dev")) -> bool:
    """Whether an NVIDIA or AMD GPU driver exposes devices (cheap; avoids importing torch)."""
    return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists()


def _torch_gpus(measure_flops: bool) -> list[Device]:
    if not gpu_driver_present():
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            Device(
                name=f"gpu{index}",
                kind="gpu",
                model=props.name,
                memory_gb=round(props.total_memory / 1e9, 2),
                tflops=measure_matmul_tflops(f"cuda:{index}") if measure_flops else None,
            )
        )
    return devices


def _nvml_gpus() -> list[Device]:
    """GPUs the driver sees when torch cannot use them (e.g. a CPU-only torch build)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        return [_nvml_device(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


def _nvml_device(pynvml: Any, index: int) -> Device:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    model = pynvml.nvmlDeviceGetName(handle)
    if isinstance(model, bytes):
        model = model.decode(errors="replace")
    total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    return Device(name=f"gpu{index}", kind="gpu", model=model, memory_gb=round(total / 1e9, 2))


# ---------------------------------------------------------------------------
# the whole host


def discover_host(
    sysfs_root: Path = Path("/sys"),
    *,
    name: str | None = None,
    site: str | None = None,
    measure_flops: bool = True,
    live_system: bool | None = None,
) -> Host:
    """This host as a schema `Host`: name, address, cores, memory, devices and NICs.

    `live_system` (default: whether `sysfs_root` is the real /sys) allows psutil's link
    speeds and interface addresses; without it the address is left out. A bad `name` or
    `site` raises one InputError naming the field.
    """
    live = _is_live_sysfs(sysfs_root) if live_system is None else live_system
    facts = LiveNetFacts.read() if live else LiveNetFacts()
    nics = nics_from_sysfs(sysfs_root, facts)
    ram_gb = round(psutil.virtual_memory().total / 1e9, 2)
    try:
        return Host(
            name=name if name is not None else _hostname(),
            address=primary_address(nics, facts) if live else None,
            site=site,
            machine=machine_id() if live else None,
            cpu_cores=cpu_cores(),
            memory_gb=ram_gb,
            devices=discover_devices(ram_gb, measure_flops=measure_flops),
            nics=nics,
        )
    except ValidationError as exc:
        field_path, message = describe_validation_error(exc)
        raise InputError(message, field=field_path) from None
