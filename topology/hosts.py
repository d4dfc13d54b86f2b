"""The hosts file (`hosts.yaml`): which agents `hetsched probe run` should measure.

    version: 1
    sites: [{name: a}, {name: b}]          # optional; taken from the hosts if left out
    hosts:
      - {name: a1, address: 10.0.0.1, site: a}         # agent on the default port 7070
      - {name: b1, address: "10.0.1.1:7071", site: b}
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from topology.addresses import Endpoint, split_endpoint
from topology.files import load_yaml_mapping
from topology.protocol import DEFAULT_PORT, zmq_url
from topology.schema import Name, Site
from topology.validation import Strict, Version, validate_as

HOSTS_VERSION = 1
# The probe measures every pair of hosts: it stays at 1024 hosts (a topology may hold
# more, from several probes or by hand).
MAX_PROBE_HOSTS = 1024


class HostEntry(Strict):
    name: Name
    address: Endpoint
    site: Name | None = None

    @property
    def ip(self) -> str:
        return split_endpoint(self.address, DEFAULT_PORT)[0]

    @property
    def url(self) -> str:
        return zmq_url(*split_endpoint(self.address, DEFAULT_PORT))


class HostsFile(Strict):
    version: Version
    sites: list[Site] = Field(default_factory=list, max_length=MAX_PROBE_HOSTS)
    hosts: list[HostEntry] = Field(min_length=1, max_length=MAX_PROBE_HOSTS)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.version != HOSTS_VERSION:
            raise ValueError(
                f"version: unsupported version {self.version}, expected {HOSTS_VERSION}"
            )
        seen: set[str] = set()
        for i, host in enumerate(self.hosts):
            if host.name in seen:
                raise ValueError(f"hosts[{i}].name: duplicate host '{host.name}'")
            seen.add(host.name)
        named = {s.name for s in self.sites}
        for i, host in enumerate(self.hosts):
            if self.sites and host.site is not None and host.site not in named:
                raise ValueError(f"hosts[{i}].site: unknown site '{host.site}'")
        return self

    def all_sites(self) -> list[Site]:
        if self.sites:
            return list(self.sites)
        names = dict.fromkeys(h.site for h in self.hosts if h.site is not None)
        return [Site(name=name) for name in names]


def load_hosts(path: str | Path) -> HostsFile:
    return validate_as(HostsFile, load_yaml_mapping(path), path)
