"""The Topology schema: sites, hosts (devices, NICs) and measured links.

This is the file format of `topology.yaml` (version 1). It is written by `hetsched
probe`, may be edited by hand, and is validated on load: `load_topology` either returns
a fully checked `Topology` or raises one `InputError` naming the file and the field.

Units: memory in GB (10^9 bytes), NIC speed and link bandwidth in Gbit/s, latency in
milliseconds (one way). A NIC speed or device TFLOPS that is not known is left out.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import Field, model_validator

from topology.files import load_yaml_mapping, write_text_atomic
from topology.validation import Strict, validate_as

TOPOLOGY_VERSION = 1

Name = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
NicName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][\w.:@-]*$")]
Positive = Annotated[float, Field(gt=0)]


class NicKind(StrEnum):
    INFINIBAND = "infiniband"
    ROCE = "roce"
    ETHERNET = "ethernet"


class Nic(Strict):
    """One network port: an RDMA port (infiniband/roce) or a plain Ethernet netdev."""

    name: NicName
    kind: NicKind
    speed_gbps: Positive | None = None
    state: Literal["up", "down", "unknown"] = "unknown"
    virtual: bool = False
    netdev: str | None = None
    rdma_device: str | None = None
    rdma_port: Annotated[int, Field(ge=1)] | None = None
    gid_index: Annotated[int, Field(ge=0)] | None = None
    addresses: list[str] = Field(default_factory=list)
    mtu: Annotated[int, Field(gt=0)] | None = None


class Device(Strict):
    """A compute device: a GPU, or the host CPU when there is no GPU."""

    name: Name
    kind: Literal["gpu", "cpu"]
    model: str | None = None
    memory_gb: Positive
    tflops: Positive | None = None


class Site(Strict):
    name: Name
    description: str | None = None


class Host(Strict):
    """A machine. A host the probe could not reach keeps its name with the reason."""

    name: Name
    address: str | None = None
    site: Name | None = None
    status: Literal["ok", "unreachable"] = "ok"
    reason: str | None = None
    cpu_cores: Annotated[int, Field(gt=0)] | None = None
    memory_gb: Positive | None = None
    devices: list[Device] = Field(default_factory=list)
    nics: list[Nic] = Field(default_factory=list)

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
    latency_samples: Annotated[int, Field(ge=0)] | None = None
    bytes: Annotated[int, Field(ge=0)] | None = None
    streams: Annotated[int, Field(ge=1)] | None = None
    a_to_b_gbps: Positive | None = None
    b_to_a_gbps: Positive | None = None


class Link(Strict):
    """A host pair: measured one-way latency and bandwidth, or unreachable with the reason.

    `bandwidth_gbps` is the slower of the two directions (what a planner may rely on).
    """

    a: Name
    b: Name
    status: Literal["ok", "unreachable"] = "ok"
    latency_ms: Annotated[float, Field(ge=0)] | None = None
    bandwidth_gbps: Positive | None = None
    reason: str | None = None
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
    version: int
    name: str | None = None
    sites: list[Site] = Field(default_factory=list)
    hosts: list[Host]
    links: list[Link] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.version != TOPOLOGY_VERSION:
            raise ValueError(
                f"version: unsupported version {self.version}, expected {TOPOLOGY_VERSION}"
            )
        _require_unique([s.name for s in self.sites], "sites", "site")
        _require_unique([h.name for h in self.hosts], "hosts", "host")
        site_names = {s.name for s in self.sites}
        for i, host in enumerate(self.hosts):
            if host.site is not None and host.site not in site_names:
                raise ValueError(f"hosts[{i}].site: unknown site '{host.site}'")
        self._check_links()
        return self

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
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def link(self, a: str, b: str) -> Link | None:
        wanted = frozenset((a, b))
        return next((link for link in self.links if link.key() == wanted), None)

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
