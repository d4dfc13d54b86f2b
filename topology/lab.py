"""The emulated lab: a multi-site cluster of network namespaces on one Linux machine.

This module owns building, describing and removing a lab from a `LabSpec`
(`topology.lab_spec`). Everything lives inside namespaces the lab creates; nothing is
added to the root namespace:

```
 hs-<lab>-a1  eth0 ──veth── h-a1 ┐                      ┌ h-b1 ──veth── eth0  hs-<lab>-b1
 hs-<lab>-a2  eth0 ──veth── h-a2 ┴ br0  hs-<lab>-r-a    br0 ┴ ...           hs-<lab>-r-b
                                   wan0 ──veth── r-a ┐     wan0
                                                     br0  hs-<lab>-wan ── r-b ┘
```

Addressing (one private range, 10.77.0.0/16, used only inside the namespaces): host j
(1-based) of site s (1-based) is 10.77.s.j/24 on `eth0`, default route via 10.77.s.254
(the site router's bridge); router s is 10.77.0.s/24 on `wan0`, forwards IPv4, and
routes 10.77.t.0/24 via 10.77.0.t for every other site t.

Shaping: the intra-site rate is a `tbf` on the host's `eth0` egress and on the router-side
veth egress (upload and download both limited); the WAN rate of each site pair is an
`htb` class per destination site on each router's `wan0` egress (u32 filter on the
destination /24), plus a fast default class for everything else (ARP).

State: `/run/hetsched/labs/<name>.json` records the spec, the hosts and every namespace
*before* it is created, so `lab_down` can clean a half-built lab; a failed `lab_up` rolls
back itself. Only namespaces listed in a state file are ever deleted.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from topology.errors import InputError
from topology.files import write_text_atomic
from topology.lab_spec import LabSpec, parse_lab_spec

STATE_DIR = Path("/run/hetsched/labs")
STATE_VERSION = 1
ADDRESS_RANGE = "10.77.0.0/16"
HOST_INTERFACE = "eth0"
ROUTER_WAN_INTERFACE = "wan0"
BRIDGE = "br0"
NAMESPACE_PREFIX = "hs-"

# Shaping parameters. A token bucket lets `burst` bytes through at line speed and then
# holds the rate; over a 1-second transfer the burst inflates the measured rate by
# burst / (rate x 1 s), so the burst is kept to a few milliseconds of the rate (0.4% of a
# 1-s transfer), but never below 16 full-size frames: tbf drops a packet larger than its
# bucket, and a bucket of several frames keeps per-packet timer wake-ups down on 2 cores.
# GSO super-packets (up to 64 KB on veth) are no problem: tbf splits a GSO packet that is
# larger than its bucket into segments, and htb lets the class go briefly into debt.
# The queue behind the bucket (tbf `limit`, the bfifo under each htb class) holds a few
# tens of milliseconds at the rate but at least 128 KiB, so one 64 KB GSO packet fits and
# TCP keeps the link busy without seconds of bufferbloat at 20 Mbit/s.
FRAME_BYTES = 1514
BURST_SECONDS = 0.004
MIN_BURST_BYTES = 16 * FRAME_BYTES
QUEUE_SECONDS = 0.02
MIN_QUEUE_BYTES = 128 * 1024
WAN_DEFAULT_CLASS_MBIT = 10_000
HTB_DEFAULT_MINOR = 0x100
HTB_QUANTUM_BYTES = 60_000


class LabError(Exception):
    """A lab operation failed while running a system command (named in the message)."""


def rate_bytes_per_s(rate_mbit: float) -> float:
    return rate_mbit * 1e6 / 8


def burst_bytes(rate_mbit: float) -> int:
    return max(int(rate_bytes_per_s(rate_mbit) * BURST_SECONDS), MIN_BURST_BYTES)


def queue_bytes(rate_mbit: float) -> int:
    return max(int(rate_bytes_per_s(rate_mbit) * QUEUE_SECONDS), MIN_QUEUE_BYTES)


def tc_rate(rate_mbit: float) -> str:
    """A rate as tc reads it, exact to 1 kbit/s (tc's kbit is 1000 bit/s)."""
    return f"{round(rate_mbit * 1000)}kbit"


# ---------------------------------------------------------------------------------------
# What a lab consists of


@dataclass(frozen=True)
class LabHost:
    """One emulated host: a namespace with one interface (`eth0`) at `address`."""

    name: str
    site: str
    namespace: str
    address: str
    interface: str = HOST_INTERFACE


@dataclass(frozen=True)
class LabLink:
    """One shaped link direction: where its qdisc sits and what it limits.

    kind: `host-up` (host → its site), `host-down` (site → host), `wan` (site → site),
    `wan-default` (everything else a router sends into the WAN, e.g. ARP; not limited).
    """

    kind: Literal["host-up", "host-down", "wan", "wan-default"]
    src: str
    dst: str
    namespace: str
    device: str
    rate_mbit: float | None
    htb_class: str | None = None

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"


@dataclass(frozen=True)
class Step:
    """One command of a lab build, with a few words on what it does."""

    argv: tuple[str, ...]
    what: str

    def render(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class LabPlan:
    """Everything `lab_up` will do for a spec: namespaces to create, then commands to run."""

    spec: LabSpec
    namespaces: tuple[str, ...]
    steps: tuple[Step, ...]


@dataclass
class LabState:
    """A lab recorded in its state file: the spec, its namespaces, hosts and links."""

    name: str
    spec: LabSpec
    status: Literal["building", "up"]
    created_at: str
    namespaces: list[str] = field(default_factory=list)
    state_path: Path | None = None

    @property
    def hosts(self) -> dict[str, LabHost]:
        return lab_hosts(self.spec)

    @property
    def routers(self) -> dict[str, str]:
        """Site name → router namespace."""
        return {site.name: router_namespace(self.spec, site.name) for site in self.spec.sites}

    @property
    def wan_namespace(self) -> str:
        return wan_namespace(self.spec)

    @property
    def links(self) -> list[LabLink]:
        return lab_links(self.spec)

    def host(self, name: str) -> LabHost:
        hosts = self.hosts
        if name not in hosts:
            raise InputError(
                f"unknown host '{name}' in lab '{self.name}' (hosts: {', '.join(hosts)})"
            )
        return hosts[name]

    def to_plain(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "name": self.name,
            "status": self.status,
            "created_at": self.created_at,
            "address_range": ADDRESS_RANGE,
            "spec": self.spec.to_plain(),
            "namespaces": list(self.namespaces),
            "hosts": {name: asdict(host) for name, host in self.hosts.items()},
            "routers": self.routers,
            "wan_namespace": self.wan_namespace,
        }


def host_namespace(spec: LabSpec, host: str) -> str:
    return f"{NAMESPACE_PREFIX}{spec.name}-{host}"


def router_namespace(spec: LabSpec, site: str) -> str:
    return f"{NAMESPACE_PREFIX}{spec.name}-r-{site}"


def wan_namespace(spec: LabSpec) -> str:
    return f"{NAMESPACE_PREFIX}{spec.name}-wan"


def host_address(site_index: int, host_index: int) -> str:
    """Address of host `host_index` (1-based) in site `site_index` (1-based)."""
    return f"10.77.{site_index}.{host_index}"


def router_bridge_address(site_index: int) -> str:
    return f"10.77.{site_index}.254"


def router_wan_address(site_index: int) -> str:
    return f"10.77.0.{site_index}"


def site_subnet(site_index: int) -> str:
    return f"10.77.{site_index}.0/24"


def router_host_interface(host: str) -> str:
    return f"h-{host}"


def wan_router_interface(site: str) -> str:
    return f"r-{site}"


def lab_hosts(spec: LabSpec) -> dict[str, LabHost]:
    hosts: dict[str, LabHost] = {}
    for s, site in enumerate(spec.sites, start=1):
        for j, host in enumerate(site.hosts, start=1):
            hosts[host] = LabHost(host, site.name, host_namespace(spec, host), host_address(s, j))
    return hosts


def lab_links(spec: LabSpec) -> list[LabLink]:
    """Every shaped link direction of the lab (what `link_counters` reports on)."""
    links: list[LabLink] = []
    for site in spec.sites:
        router = router_namespace(spec, site.name)
        for host in site.hosts:
            links.append(LabLink("host-up", host, site.name, host_namespace(spec, host),
                                 HOST_INTERFACE, site.rate_mbit))
            links.append(LabLink("host-down", site.name, host, router,
                                 router_host_interface(host), site.rate_mbit))
    for s, site in enumerate(spec.sites, start=1):
        router = router_namespace(spec, site.name)
        for t, other in enumerate(spec.sites, start=1):
            if t != s:
                links.append(LabLink("wan", site.name, other.name, router, ROUTER_WAN_INTERFACE,
                                     spec.wan_rate_mbit(site.name, other.name), f"1:{t:x}"))
        if len(spec.sites) > 1:
            links.append(LabLink("wan-default", site.name, "*", router, ROUTER_WAN_INTERFACE,
                                 None, f"1:{HTB_DEFAULT_MINOR:x}"))
    return links


# ---------------------------------------------------------------------------------------
# Planning: the exact commands that build a lab


def plan_lab(spec: LabSpec, *, disable_ipv6: bool | None = None) -> LabPlan:
    """The namespaces and commands that build `spec` (pure: runs nothing).

    IPv6 is switched off inside the lab namespaces (when the kernel has it) so that
    neighbour discovery and MLD chatter stay out of the byte counters.
    """
    if disable_ipv6 is None:
        disable_ipv6 = Path("/proc/sys/net/ipv6").is_dir()
    wan_ns = wan_namespace(spec)
    routers = [router_namespace(spec, site.name) for site in spec.sites]
    hosts = lab_hosts(spec)
    namespaces = (wan_ns, *routers, *(h.namespace for h in hosts.values()))

    steps: list[Step] = []

    def add(what: str, *argv: str) -> None:
        steps.append(Step(tuple(argv), what))

    for ns in namespaces:
        add(f"loopback up in {ns}", "ip", "-n", ns, "link", "set", "lo", "up")
        if disable_ipv6:
            add(f"IPv6 off in {ns}", "ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")

    add("WAN bridge", "ip", "-n", wan_ns, "link", "add", BRIDGE, "type", "bridge")
    add("WAN bridge up", "ip", "-n", wan_ns, "link", "set", BRIDGE, "up")

    for s, site in enumerate(spec.sites, start=1):
        router = router_namespace(spec, site.name)
        add(f"site {site.name}: forwarding", "ip", "netns", "exec", router, "sysctl", "-q", "-w",
            "net.ipv4.ip_forward=1")
        add(f"site {site.name}: bridge", "ip", "-n", router, "link", "add", BRIDGE,
            "type", "bridge")
        add(f"site {site.name}: bridge address", "ip", "-n", router, "addr", "add",
            f"{router_bridge_address(s)}/24", "dev", BRIDGE)
        add(f"site {site.name}: bridge up", "ip", "-n", router, "link", "set", BRIDGE, "up")

        for host_name in site.hosts:
            host = hosts[host_name]
            port = router_host_interface(host_name)
            add(f"host {host_name}: veth to site {site.name}", "ip", "link", "add",
                HOST_INTERFACE, "netns", host.namespace, "type", "veth",
                "peer", "name", port, "netns", router)
            add(f"host {host_name}: address", "ip", "-n", host.namespace, "addr", "add",
                f"{host.address}/24", "dev", HOST_INTERFACE)
            add(f"host {host_name}: eth0 up", "ip", "-n", host.namespace, "link", "set",
                HOST_INTERFACE, "up")
            add(f"host {host_name}: default route", "ip", "-n", host.namespace, "route", "add",
                "default", "via", router_bridge_address(s))
            add(f"host {host_name}: port on site bridge", "ip", "-n", router, "link", "set",
                port, "master", BRIDGE)
            add(f"host {host_name}: port up", "ip", "-n", router, "link", "set", port, "up")
            for ns, dev in ((host.namespace, HOST_INTERFACE), (router, port)):
                add(f"host {host_name}: {site.rate_mbit:g} Mbit/s on {dev}",
                    *_tbf_argv(ns, dev, site.rate_mbit))

        wan_port = wan_router_interface(site.name)
        add(f"site {site.name}: veth to WAN", "ip", "link", "add", ROUTER_WAN_INTERFACE,
            "netns", router, "type", "veth", "peer", "name", wan_port, "netns", wan_ns)
        add(f"site {site.name}: WAN address", "ip", "-n", router, "addr", "add",
            f"{router_wan_address(s)}/24", "dev", ROUTER_WAN_INTERFACE)
        add(f"site {site.name}: wan0 up", "ip", "-n", router, "link", "set",
            ROUTER_WAN_INTERFACE, "up")
        add(f"site {site.name}: port on WAN bridge", "ip", "-n", wan_ns, "link", "set",
            wan_port, "master", BRIDGE)
        add(f"site {site.name}: WAN port up", "ip", "-n", wan_ns, "link", "set", wan_port, "up")
        for t, other in enumerate(spec.sites, start=1):
            if t != s:
                add(f"site {site.name}: route to site {other.name}", "ip", "-n", router, "route",
                    "add", site_subnet(t), "via", router_wan_address(t))
        if len(spec.sites) > 1:
            steps.extend(_wan_shaping_steps(spec, s, router))

    return LabPlan(spec, namespaces, tuple(steps))


def _tbf_argv(ns: str, dev: str, rate_mbit: float) -> tuple[str, ...]:
    return ("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", tc_rate(rate_mbit), "burst", str(burst_bytes(rate_mbit)),
            "limit", str(queue_bytes(rate_mbit)))


def _wan_shaping_steps(spec: LabSpec, s: int, router: str) -> list[Step]:
    site = spec.sites[s - 1].name
    dev = ROUTER_WAN_INTERFACE
    tc = ("tc", "-n", router)
    default = f"1:{HTB_DEFAULT_MINOR:x}"
    steps = [
        Step((*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
              "default", f"{HTB_DEFAULT_MINOR:x}"), f"site {site}: WAN shaper"),
        Step((*tc, "class", "add", "dev", dev, "parent", "1:", "classid", default, "htb",
              "rate", tc_rate(WAN_DEFAULT_CLASS_MBIT), "quantum", str(HTB_QUANTUM_BYTES)),
             f"site {site}: WAN default class (ARP and the like)"),
        Step((*tc, "qdisc", "add", "dev", dev, "parent", default, "bfifo",
              "limit", str(MIN_QUEUE_BYTES)), f"site {site}: WAN default queue"),
    ]
    for t, other in enumerate(spec.sites, start=1):
        if t == s:
            continue
        rate = spec.wan_rate_mbit(site, other.name)
        classid = f"1:{t:x}"
        steps += [
            Step((*tc, "class", "add", "dev", dev, "parent", "1:", "classid", classid, "htb",
                  "rate", tc_rate(rate), "ceil", tc_rate(rate),
                  "burst", str(burst_bytes(rate)), "cburst", str(burst_bytes(rate)),
                  "quantum", str(HTB_QUANTUM_BYTES)),
                 f"site {site}: {rate:g} Mbit/s to site {other.name}"),
            Step((*tc, "qdisc", "add", "dev", dev, "parent", classid, "bfifo",
                  "limit", str(queue_bytes(rate))), f"site {site}: queue to site {other.name}"),
            Step((*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                  "u32", "match", "ip", "dst", site_subnet(t), "flowid", classid),
                 f"site {site}: traffic to {site_subnet(t)} into {classid}"),
        ]
    return steps


# ---------------------------------------------------------------------------------------
# Running commands


def run_command(argv: Sequence[str], *, what: str | None = None) -> str:
    """Run `argv` (no shell); return stdout, or raise LabError naming the command."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LabError(f"command not found: {argv[0]} (needed for: {' '.join(argv)})") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        label = f" ({what})" if what else ""
        raise LabError(f"`{' '.join(argv)}`{label} failed: {detail}")
    return done.stdout


def wan_bytes_sent(state: LabState) -> dict[str, int]:
    """Bytes each site's router has sent onto the WAN so far, read from the kernel's
    counters of its `wan0` interface (every byte between sites crosses one of them once,
    headers included)."""
    sent = {}
    for site, router in state.routers.items():
        out = run_command(["ip", "-n", router, "-j", "-s", "link", "show", ROUTER_WAN_INTERFACE],
                          what=f"read the WAN counters of site {site}")
        sent[site] = int(json.loads(out)[0]["stats64"]["tx"]["bytes"])
    return sent


def existing_namespaces() -> set[str]:
    """Names of the network namespaces `ip netns` knows (the ones with a name)."""
    out = run_command(["ip", "-j", "netns", "list"]).strip()
    return {entry["name"] for entry in json.loads(out)} if out else set()


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise InputError(
            f"lab {action} needs root (it creates network namespaces, veths and tc qdiscs); "
            "run it with sudo"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise InputError(f"lab {action} needs iproute2's '{tool}', which is not installed")


# ---------------------------------------------------------------------------------------
# State files


def state_path(name: str, state_dir: Path = STATE_DIR) -> Path:
    return Path(state_dir) / f"{name}.json"


def _write_state(state: LabState) -> None:
    assert state.state_path is not None
    write_text_atomic(state.state_path, json.dumps(state.to_plain(), indent=2) + "\n")


def load_state(path: Path) -> LabState:
    """Read one state file written by `lab_up`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable lab state: {exc}", path) from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise InputError(f"not a lab state file of version {STATE_VERSION}", path)
    spec = parse_lab_spec(data.get("spec") or {}, path)
    return LabState(
        name=spec.name,
        spec=spec,
        status="up" if data.get("status") == "up" else "building",
        created_at=str(data.get("created_at", "")),
        namespaces=[str(ns) for ns in data.get("namespaces", [])],
        state_path=path,
    )


def running_labs(state_dir: Path = STATE_DIR) -> list[LabState]:
    """Every lab with a state file (built or half-built), sorted by name."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return []
    return [load_state(p) for p in sorted(state_dir.glob("*.json"))]


def find_lab(name: str | None = None, state_dir: Path = STATE_DIR) -> LabState:
    """The running lab called `name`, or the only running lab when `name` is None."""
    if name is not None:
        path = state_path(name, state_dir)
        if not path.exists():
            known = [lab.name for lab in running_labs(state_dir)]
            running = f"running: {', '.join(known)}" if known else "no lab is running"
            raise InputError(f"lab '{name}' is not running ({running})")
        return load_state(path)
    labs = running_labs(state_dir)
    if not labs:
        raise InputError("no lab is running (start one with `hetsched lab up`)")
    if len(labs) > 1:
        raise InputError(
            f"several labs are running ({', '.join(lab.name for lab in labs)}): name one with --lab"
        )
    return labs[0]


# ---------------------------------------------------------------------------------------
# up / down


def lab_up(spec: LabSpec, *, state_dir: Path = STATE_DIR, plan: LabPlan | None = None) -> LabState:
    """Build the lab described by `spec` and return its state.

    Refused (InputError) without root, when a lab of that name is already recorded, or
    when one of its namespaces already exists. A failing command rolls back everything
    created so far and raises LabError naming the command. `plan` defaults to
    `plan_lab(spec)`; passing one lets a caller add steps (tests add one that fails).
    """
    _require_root("up")
    plan = plan or plan_lab(spec)
    path = state_path(spec.name, state_dir)
    if path.exists():
        raise InputError(
            f"lab '{spec.name}' is already running (state in {path}); "
            f"take it down first with `hetsched lab down {spec.name}`"
        )
    clashes = sorted(set(plan.namespaces) & existing_namespaces())
    if clashes:
        raise InputError(
            f"network namespace{'s' if len(clashes) > 1 else ''} {', '.join(clashes)} already "
            f"exist{'' if len(clashes) > 1 else 's'} but no lab '{spec.name}' is recorded; "
            "pick another lab name or remove them yourself (ip netns del)"
        )
    state = LabState(
        name=spec.name,
        spec=spec,
        status="building",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        state_path=path,
    )
    _claim_state_file(state)
    try:
        for ns in plan.namespaces:
            state.namespaces.append(ns)
            _write_state(state)  # recorded before it exists, so `down` finds a half-built lab
            try:
                run_command(["ip", "netns", "add", ns], what="create namespace")
            except LabError:
                state.namespaces.remove(ns)  # not ours: never delete what we did not create
                _write_state(state)
                raise
        for step in plan.steps:
            run_command(step.argv, what=step.what)
        state.status = "up"
        _write_state(state)
    except BaseException as exc:
        removed = _remove_namespaces(state.namespaces)
        path.unlink(missing_ok=True)
        if isinstance(exc, LabError):
            raise LabError(
                f"lab up '{spec.name}' failed and was rolled back "
                f"({len(removed)} namespaces removed): {exc}"
            ) from None
        raise
    return state


def _claim_state_file(state: LabState) -> None:
    """Create the state file exclusively: two `lab up` of one name cannot both proceed."""
    assert state.state_path is not None
    state.state_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(state.state_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise InputError(f"lab '{state.name}' is already running (state in {state.state_path})") \
            from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(state.to_plain(), indent=2) + "\n")


def _remove_namespaces(namespaces: Sequence[str]) -> list[str]:
    """Delete those of `namespaces` that exist (their veths go with them); return them."""
    present = existing_namespaces()
    removed = []
    for ns in reversed(namespaces):
        if ns in present:
            run_command(["ip", "netns", "del", ns], what="delete namespace")
            removed.append(ns)
    return removed


def lab_down(name: str, *, state_dir: Path = STATE_DIR) -> bool:
    """Remove lab `name`: its recorded namespaces, then its state file.

    Idempotent: returns False (and does nothing) when no such lab is recorded.
    """
    _require_root("down")
    path = state_path(name, state_dir)
    if not path.exists():
        return False
    state = load_state(path)
    _remove_namespaces(state.namespaces)
    path.unlink(missing_ok=True)
    return True


def missing_namespaces(state: LabState) -> list[str]:
    """Recorded namespaces that no longer exist (a lab someone took apart by hand)."""
    present = existing_namespaces()
    return [ns for ns in state.namespaces if ns not in present]


# ---------------------------------------------------------------------------------------
# Using a running lab


def host_command(state: LabState, host: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside `host`'s namespace (`ip netns exec NS ...`)."""
    if not argv:
        raise InputError("no command given to run in the lab host")
    return ["ip", "netns", "exec", state.host(host).namespace, *argv]


@dataclass(frozen=True)
class LinkCounter:
    """Bytes and packets the kernel sent through one shaped link direction since `up`."""

    link: LabLink
    bytes: int
    packets: int
    drops: int
    overlimits: int

    @property
    def name(self) -> str:
        return self.link.name


def link_counters(state: LabState) -> list[LinkCounter]:
    """Read `tc -s qdisc show` in every lab namespace: one counter per `LabLink`.

    Host links count at their tbf; WAN links at the leaf qdisc of their htb class (so a
    `wan` counter a->b is exactly the bytes site a sent to site b across the WAN).
    """
    qdiscs: dict[str, list[dict[str, Any]]] = {}
    for ns in {link.namespace for link in state.links}:
        out = run_command(["tc", "-s", "-j", "-n", ns, "qdisc", "show"]).strip()
        qdiscs[ns] = json.loads(out) if out else []
    counters = []
    for link in state.links:
        entry = _find_qdisc(qdiscs.get(link.namespace, []), link)
        counters.append(LinkCounter(
            link,
            bytes=int(entry.get("bytes", 0)),
            packets=int(entry.get("packets", 0)),
            drops=int(entry.get("drops", 0)),
            overlimits=int(entry.get("overlimits", 0)),
        ))
    return counters


def _find_qdisc(entries: list[dict[str, Any]], link: LabLink) -> dict[str, Any]:
    for entry in entries:
        if entry.get("dev") != link.device:
            continue
        if link.htb_class is None and entry.get("root"):
            return entry
        if link.htb_class is not None and entry.get("parent") == link.htb_class:
            return entry
    return {}


def wan_bytes(counters: Sequence[LinkCounter]) -> dict[tuple[str, str], int]:
    """Bytes sent across the WAN per (source site, destination site)."""
    return {(c.link.src, c.link.dst): c.bytes for c in counters if c.link.kind == "wan"}
