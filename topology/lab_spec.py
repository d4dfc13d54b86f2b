"""The emulated lab's spec file: sites of hosts, intra-site rates and WAN rates per site pair.

A lab spec (version 1) describes a small multi-site cluster that `hetsched lab up` builds
out of network namespaces on one machine:

```yaml
version: 1
name: lab-2x2                # short: it goes into namespace names (hs-<name>-<host>)
sites:
  - {name: a, hosts: [a1, a2], rate_mbit: 1000}   # every host link of site a: 1000 Mbit/s
  - {name: b, hosts: [b1, b2], rate_mbit: 1000}
wan:
  - {sites: [a, b], rate_mbit: 50}                # each direction between a and b: 50 Mbit/s
default_wan_mbit: 100        # optional: the rate of every site pair not listed under wan
```

This module owns the schema, its validation (one `InputError` naming file and field) and
the built-in specs shipped in `topology/labs/*.yaml`. Building the lab is `topology.lab`.
"""

from __future__ import annotations

import itertools
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from topology.errors import InputError
from topology.files import load_yaml_mapping
from topology.validation import Version, bounded_float, validate_as

LAB_SPEC_VERSION = 1
DEFAULT_BUILTIN = "lab-2x2"

# Names end up in namespace names (hs-<lab>-<host>) and interface names (at most 15 bytes
# in Linux: the router-side veth of a host is "h-<host>", the WAN-side veth of a site is
# "r-<site>"), hence the short lengths and the small alphabet. The lab name is only in
# namespace names (no tight limit there); 12 leaves room for "lab-3site".
LabName = Annotated[str, Field(min_length=1, max_length=12, pattern=r"^[a-z0-9][a-z0-9-]*$")]
SiteName = Annotated[str, Field(min_length=1, max_length=8, pattern=r"^[a-z0-9][a-z0-9-]*$")]
HostName = Annotated[str, Field(min_length=1, max_length=12, pattern=r"^[a-z0-9][a-z0-9-]*$")]
# tc takes rates in whole kbit/s (`topology.lab.tc_rate`): 1 kbit/s is the least it can apply.
RateMbit = bounded_float(0.001, 100_000, "Mbit/s")

# Addresses are 10.77.<site index>.<host index>; .254 is the site router, 0 the WAN.
MAX_SITES = 250
MAX_HOSTS_PER_SITE = 250


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabSite(_Strict):
    """One site: its hosts (each a namespace) and the rate of every host link inside it."""

    name: SiteName
    hosts: Annotated[list[HostName], Field(min_length=1, max_length=MAX_HOSTS_PER_SITE)]
    rate_mbit: RateMbit = 1000


class LabWanLink(_Strict):
    """The rate between two sites, in each direction."""

    sites: Annotated[list[SiteName], Field(min_length=2, max_length=2)]
    rate_mbit: RateMbit

    @model_validator(mode="after")
    def _two_sites(self) -> Self:
        if self.sites[0] == self.sites[1]:
            raise ValueError(
                f"sites: a WAN link joins two different sites, got '{self.sites[0]}' twice"
            )
        return self


class LabSpec(_Strict):
    """A whole lab: sites, WAN rates per site pair, and a short name."""

    version: Version
    name: LabName
    description: Annotated[str, Field(max_length=4096)] | None = None
    sites: Annotated[list[LabSite], Field(min_length=1, max_length=MAX_SITES)]
    wan: list[LabWanLink] = Field(default_factory=list)
    default_wan_mbit: RateMbit | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.version != LAB_SPEC_VERSION:
            raise ValueError(
                f"version: unsupported version {self.version}, expected {LAB_SPEC_VERSION}"
            )
        site_index: dict[str, int] = {}
        for i, site in enumerate(self.sites):
            if site.name in site_index:
                raise ValueError(f"sites[{i}].name: duplicate site '{site.name}'")
            site_index[site.name] = i
        host_where: dict[str, str] = {}
        for i, site in enumerate(self.sites):
            for j, host in enumerate(site.hosts):
                if host == "wan" or host.startswith("r-"):
                    raise ValueError(
                        f"sites[{i}].hosts[{j}]: host name '{host}' is reserved "
                        "('wan' and names starting with 'r-' name the lab's routers)"
                    )
                if host in site_index:
                    raise ValueError(
                        f"sites[{i}].hosts[{j}]: host '{host}' has the name of a site "
                        "(link names like a1->a need them distinct)"
                    )
                if host in host_where:
                    raise ValueError(
                        f"sites[{i}].hosts[{j}]: duplicate host '{host}' (also in site "
                        f"'{host_where[host]}')"
                    )
                host_where[host] = site.name
        pairs: dict[frozenset[str], int] = {}
        for i, link in enumerate(self.wan):
            for k, site in enumerate(link.sites):
                if site not in site_index:
                    raise ValueError(f"wan[{i}].sites[{k}]: unknown site '{site}'")
            key = frozenset(link.sites)
            if key in pairs:
                raise ValueError(
                    f"wan[{i}].sites: duplicate WAN link {link.sites[0]}-{link.sites[1]} "
                    f"(also wan[{pairs[key]}])"
                )
            pairs[key] = i
        if self.default_wan_mbit is None:
            for a, b in itertools.combinations([s.name for s in self.sites], 2):
                if frozenset((a, b)) not in pairs:
                    raise ValueError(
                        f"wan: no rate for site pair {a}-{b} "
                        "(list it under wan, or set default_wan_mbit)"
                    )
        return self

    def site_of(self, host: str) -> LabSite:
        for site in self.sites:
            if host in site.hosts:
                return site
        raise KeyError(host)

    def wan_rate_mbit(self, a: str, b: str) -> float:
        """The configured rate between sites `a` and `b` (the same in both directions)."""
        wanted = frozenset((a, b))
        for link in self.wan:
            if frozenset(link.sites) == wanted:
                return link.rate_mbit
        if self.default_wan_mbit is None:
            raise KeyError(f"{a}-{b}")
        return self.default_wan_mbit

    def host_names(self) -> list[str]:
        return [host for site in self.sites for host in site.hosts]

    def to_plain(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def parse_lab_spec(data: dict[str, Any], path: str | Path = "<lab spec>") -> LabSpec:
    """Validate a plain mapping as a LabSpec, or raise one InputError naming the field."""
    return validate_as(LabSpec, data, path)


def builtin_lab_dir() -> Path:
    """The folder of the built-in specs shipped with the package."""
    return Path(str(resources.files("topology") / "labs"))


def builtin_lab_names() -> list[str]:
    return sorted(p.stem for p in builtin_lab_dir().glob("*.yaml"))


def builtin_lab_path(name: str) -> Path:
    path = builtin_lab_dir() / f"{name}.yaml"
    if not path.is_file():
        raise InputError(
            f"no built-in lab '{name}' (built-ins: {', '.join(builtin_lab_names())})"
        )
    return path


def load_lab_spec(path_or_builtin: str | Path | None = None) -> LabSpec:
    """Load a spec from a file path, or a built-in by name (`lab-2x2`); None is the default.

    A string that names an existing file is read as a file; otherwise, if it looks like a
    name (no slash, no .yaml suffix), it is looked up among the built-ins.
    """
    if path_or_builtin is None:
        path_or_builtin = DEFAULT_BUILTIN
    path = Path(path_or_builtin)
    if not path.exists() and isinstance(path_or_builtin, str) and "/" not in path_or_builtin \
            and path.suffix not in (".yaml", ".yml"):
        path = builtin_lab_path(path_or_builtin)
    return parse_lab_spec(load_yaml_mapping(path), path)
