"""The Topology schema: sites, hosts (devices, NICs) and measured links.

This is the file format of `topology.yaml` (version 1). It is written by `hetsched
probe`, may be edited by hand, and is validated on load: `load_topology` either returns
a fully checked `Topology` or raises one `InputError` naming the file and the field.

Units: memory in GB (10^9 bytes), NIC speed and link bandwidth in Gbit/s, latency in
milliseconds (one way). A NIC speed or device TFLOPS that is not known is left out.
Every number has a sane range and every list a largest size (docs/limits.md); addresses
are IP addresses or host names (`topology.addresses`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import Field, PrivateAttr, model_validator

from topology.addresses import Host as HostAddress
from topology.calibration import Calibration
from topology.files import load_yaml_mapping, write_text_atomic
from topology.validation import Strict, Version, bounded_float, bounded_int, validate_as

TOPOLOGY_VERSION = 1

# Sizes: the planner's time grows with them; beyond these a file is refused, not planned.
# 16,384 GPUs (2,048 hosts x 8) plan in about a minute (bench/planning_time.py); the limits
# leave room for twice that.
MAX_HOSTS = 4096
MAX_DEVICES_PER_HOST = 64
MAX_DEVICES = 32768
MAX_NICS_PER_HOST = 1024
MAX_SITES = MAX_HOSTS
MAX_LINKS = MAX_HOSTS * (MAX_HOSTS - 1) // 2

Name = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
NicName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][\w.:@-]*$")]
Text = Annotated[str, Field(max_length=4096)]
MemoryGB = bounded_float(0.001, 100_000, "GB")
Tflops = bounded_float(1e-6, 100_000, "TFLOPS")
Gbps = bounded_float(1e-6, 100_000, "Gbit/s")
LatencyMs = bounded_float(0, 60_000, "ms")
Mtu = bounded_int(1, 1 << 20, "bytes")


class NicKind(StrEnum):
    INFINIBAND = "infiniband"
    ROCE = "roce"
    ETHERNET = "ethernet"


class Nic(Strict):
    """One network port: an RDMA port (infiniband/roce) or a plain Ethernet netdev."""

    name: NicName
    kind: NicKind
    speed_gbps: Gbps | None = None
    state: Literal["up", "down", "unknown"] = "unknown"
    virtual: bool = False
    netdev: NicName | None = None
    rdma_device: NicName | None = None
    rdma_port: bounded_int(1, 255) | None = None
    gid_index: bounded_int(0, 65_535) | None = None
    addresses: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list,
                                                                   max_length=256)
    mtu: Mtu | None = None


class Device(Strict):
    """A compute device: a GPU, or the host CPU when there is no GPU."""

    name: Name
    kind: Literal["gpu", "cpu"]
    model: Text | None = None
    memory_gb: MemoryGB
    tflops: Tflops | None = None


class Site(Strict):
    name: Name
    description: Text | None = None


class IntraHost(Strict):
    """Bandwidth between the GPUs of this host (NVLink or PCIe): per GPU, both directions
    together, as vendors publish it (`topology.intra_host`). `source`: `measured` (a
    benchmark figure), `reported` (the link kind nvidia-smi reports, at the vendor's rate)
    or `assumed` (from the GPU model name alone). A host without it is given the
    figure of its GPU model when planning (assumed)."""

    bandwidth_gbps: Gbps
    source: Literal["measured", "reported", "assumed"]
    detail: Text | None = None


class Host(Strict):
    """A machine. A host the probe could not reach keeps its name with the reason.

    `machine` identifies the kernel the host runs on (the probe writes its boot id):
    hosts with the same one (network namespaces of one machine, as in `hetsched lab`)
    share its CPUs, and the estimate divides a CPU's speed among them."""

    name: Name
    address: HostAddress | None = None
    site: Name | None = None
    machine: Annotated[str, Field(max_length=128)] | None = None
    status: Literal["ok", "unreachable"] = "ok"
    reason: Text | None = None
    cpu_cores: bounded_int(1, 100_000) | None = None
    memory_gb: MemoryGB | None = None
    devices: list[Device] = Field(default_factory=list, max_length=MAX_DEVICES_PER_HOST)
    nics: list[Nic] = Field(default_factory=list, max_length=MAX_NICS_PER_HOST)
    intra_host: IntraHost | None = None

    @model_validator(mode="after")
    def _unique_parts(self) -> Self:
        if self.status == "ok" and (self.cpu_cores is None or self.memory_gb is None):
            raise ValueError("a reachable host needs cpu_cores and memory_gb")
        if self.status == "unreachable" and not self.reason:
            raise ValueError("an unreachable host needs a reason")
        _require_unique([d.name for d in self.devices], "devices", "device")
        _require_unique([n.name for n in self.nics], "nics", "NIC")
        return self


class Measurement(Strict):
    """How and when a link figure was obtained."""

    method: Literal["probe", "manual", "reference", "lab-config"]
    at: datetime | None = None
    latency_samples: bounded_int(0, 1_000_000) | None = None
    bytes: bounded_int(0, 10**15, "bytes") | None = None
    streams: bounded_int(1, 1024) | None = None
    a_to_b_gbps: Gbps | None = None
    b_to_a_gbps: Gbps | None = None


class Link(Strict):
    """A host pair: measured one-way latency and bandwidth, or unreachable with the reason.

    `bandwidth_gbps` is the slower of the two directions (what a planner may rely on).
    """

    a: Name
    b: Name
    status: Literal["ok", "unreachable"] = "ok"
    latency_ms: LatencyMs | None = None
    bandwidth_gbps: Gbps | None = None
    reason: Text | None = None
    measured: Measurement | None = None

    @model_validator(mode="after")
    def _figures_match_status(self) -> Self:
        if self.a == self.b:
            raise ValueError(f"a link joins two different hosts, got '{self.a}' twice")
        if self.status == "ok" and (self.latency_ms is None or self.bandwidth_gbps is None):
            raise ValueError("a reachable link needs latency_ms and bandwidth_gbps")
        if self.status == "unreachable" and not self.reason:
            raise ValueError("an unreachable link needs a reason")
        return self

    def key(self) -> frozenset[str]:
        return frozenset((self.a, self.b))


class Topology(Strict):
    version: Version
    name: Name | None = None
    sites: list[Site] = Field(default_factory=list, max_length=MAX_SITES)
    hosts: list[Host] = Field(max_length=MAX_HOSTS)
    links: list[Link] = Field(default_factory=list, max_length=MAX_LINKS)
    calibration: Calibration | None = None  # topology.calibration: fitted from a run
    _by_name: dict[str, Host] = PrivateAttr(default_factory=dict)
    _by_pair: dict[frozenset[str], Link] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.version != TOPOLOGY_VERSION:
            raise ValueError(
                f"version: unsupported version {self.version}, expected {TOPOLOGY_VERSION}"
            )
        _require_unique([s.name for s in self.sites], "sites", "site")
        _require_unique([h.name for h in self.hosts], "hosts", "host")
        devices = sum(len(h.devices) for h in self.hosts)
        if devices > MAX_DEVICES:
            raise ValueError(f"hosts: {devices} devices in all, more than {MAX_DEVICES}")
        site_names = {s.name for s in self.sites}
        for i, host in enumerate(self.hosts):
            if host.site is not None and host.site not in site_names:
                raise ValueError(f"hosts[{i}].site: unknown site '{host.site}'")
        self._check_links()
        self._index()
        return self

    def _index(self) -> None:
        self._by_name = {host.name: host for host in self.hosts}
        self._by_pair = {link.key(): link for link in self.links}

    def model_copy(self, *, update: Mapping[str, Any] | None = None,
                   deep: bool = False) -> Self:
        """A copy whose lookups (`host`, `link`) see its own hosts and links: pydantic's
        copy runs no validator, so the indexes are rebuilt here."""
        copy = super().model_copy(update=update, deep=deep)
        copy._index()
        return copy

    def _check_links(self) -> None:
        host_names = {h.name for h in self.hosts}
        seen: dict[frozenset[str], int] = {}
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                if getattr(link, end) not in host_names:
                    raise ValueError(f"links[{i}].{end}: unknown host '{getattr(link, end)}'")
            if link.key() in seen:
                raise ValueError(
                    f"links[{i}]: duplicate link {link.a}-{link.b} (also links[{seen[link.key()]}])"
                )
            seen[link.key()] = i

    def host(self, name: str) -> Host:
        return self._by_name[name]

    def link(self, a: str, b: str) -> Link | None:
        return self._by_pair.get(frozenset((a, b)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_plain(), sort_keys=False, default_flow_style=None, width=100)

    def to_plain(self) -> dict[str, Any]:
        """Plain data without unset or default values (what the YAML file holds)."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)

    def sha256(self) -> str:
        """Digest of the canonical content (independent of YAML formatting and comments)."""
        canonical = json.dumps(self.to_plain(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _require_unique(names: list[str], field: str, what: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{field}[{i}].name: duplicate {what} '{name}'")
        seen.add(name)


def parse_topology(data: dict[str, Any], path: str | Path = "<topology>") -> Topology:
    """Validate a plain mapping as a Topology, or raise one InputError naming the field."""
    return validate_as(Topology, data, path)


def load_topology(path: str | Path) -> Topology:
    return parse_topology(load_yaml_mapping(path), path)


def save_topology(topology: Topology, path: str | Path, header: str | None = None) -> None:
    """Write `topology` to `path` atomically, with an optional comment header."""
    comment = "".join(f"# {line}\n" for line in (header or "").splitlines())
    write_text_atomic(path, comment + topology.to_yaml())
