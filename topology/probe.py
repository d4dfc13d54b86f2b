"""The probe coordinator: gather every agent's discovery, then measure every host pair.

Pairs are measured in the rounds of a round-robin tournament (the circle method): each
round pairs every host with one other, so n hosts need n−1 rounds (n rounds when n is
odd) and the wall time grows with n, not n². Within a round, pairs between the same two
sites would share that WAN link and each measure a fraction of it, so such pairs are put
into successive waves; everything else in a round runs at once. For each pair, the first
host pings the second and pushes bulk data to it, then the second pushes back; the link
keeps the median latency and the slower direction's bandwidth. A host or pair that
cannot be measured is recorded as unreachable with the reason, and the rest is written.

Agents measure only towards hosts of a declared run: during discovery the coordinator
tells every agent the run's id and the tcp:// endpoints of all hosts in the hosts file
(`begin_run`), and each measure request names that run.
"""

from __future__ import annotations

import itertools
import random
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import zmq
from pydantic import ValidationError

from topology.errors import InputError
from topology.hosts import HostEntry, HostsFile
from topology.peer import AgentClient
from topology.protocol import PeerError
from topology.schema import (
    TOPOLOGY_VERSION,
    Gbps,
    Host,
    Link,
    Measurement,
    Topology,
)
from topology.validation import describe_validation_error, limit_of, validate_as

Pair = tuple[str, str]
ProgressFn = Callable[[str, int, int], None]


@dataclass
class ProbeOptions:
    pings: int = 30
    seconds: float = 1.0
    streams: int = 4
    timeout_s: float = 10.0
    schedule: Literal["tournament", "sequential"] = "tournament"

    def measure_wait_s(self) -> float:
        """How long the coordinator waits for one host-to-host measurement."""
        return 2 * self.timeout_s + 4 * self.seconds + 0.5 * self.pings


@dataclass
class ProbeReport:
    topology: Topology
    missing: list[str] = field(default_factory=list)
    rounds: int = 0
    waves: int = 0


def tournament_rounds(names: list[str]) -> list[list[Pair]]:
    """Round-robin schedule: every pair exactly once, each host in at most one pair a round."""
    players: list[str | None] = list(names)
    if len(players) % 2:
        players.append(None)
    rounds: list[list[Pair]] = []
    for _ in range(len(players) - 1):
        half = len(players) // 2
        pairs = [(players[i], players[-1 - i]) for i in range(half)]
        rounds.append([(a, b) for a, b in pairs if a is not None and b is not None])
        players = [players[0], players[-1], *players[1:-1]]
    return [r for r in rounds if r]


def split_waves(pairs: list[Pair], site_of: dict[str, str | None]) -> list[list[Pair]]:
    """Split a round so no two pairs in a wave cross between the same two sites."""
    waves: list[tuple[list[Pair], set[frozenset[str]]]] = []
    for a, b in pairs:
        sa, sb = site_of.get(a), site_of.get(b)
        shared = frozenset((sa, sb)) if sa and sb and sa != sb else None
        for wave, used in waves:
            if shared is None or shared not in used:
                wave.append((a, b))
                if shared is not None:
                    used.add(shared)
                break
        else:
            waves.append(([(a, b)], {shared} if shared is not None else set()))
    return [wave for wave, _ in waves]


def plan_waves(
    names: list[str], site_of: dict[str, str | None], tries: int = 200, seed: int = 0
) -> list[list[list[Pair]]]:
    """Rounds split into waves, for the seating of hosts in the tournament with fewest waves.

    Which pairs meet in a round depends on where each host sits in the circle; trying
    seeded random seatings and keeping the best packs site pairs into fewer waves.
    """
    rng = random.Random(seed)
    best: list[list[list[Pair]]] | None = None
    order = list(names)
    for _ in range(max(1, tries)):
        schedule = [split_waves(pairs, site_of) for pairs in tournament_rounds(order)]
        if best is None or _wave_count(schedule) < _wave_count(best):
            best = schedule
        rng.shuffle(order)
    return best or []


def _wave_count(schedule: list[list[list[Pair]]]) -> int:
    return sum(len(waves) for waves in schedule)


class Coordinator:
    """Runs one probe of the hosts in a hosts file."""

    def __init__(
        self,
        hosts: HostsFile,
        key: bytes,
        options: ProbeOptions | None = None,
        context: zmq.Context | None = None,
    ):
        self.hosts = hosts
        self.options = options or ProbeOptions()
        self._key = key
        self._context = context or zmq.Context.instance()
        self._entries = {h.name: h for h in hosts.hosts}
        self._run = secrets.token_hex(8)

    def run(self, progress: ProgressFn | None = None, name: str | None = None) -> ProbeReport:
        report_progress = progress or (lambda _what, _done, _total: None)
        found = self._gather_local(report_progress)
        missing = [f"host {n}: {h.reason}" for n, h in found.items() if h.status != "ok"]
        reachable = [n for n, h in found.items() if h.status == "ok"]
        links, rounds, waves = self._measure_all(reachable, report_progress)
        links += self._links_to_unreachable(found)
        missing += [f"link {lk.a}-{lk.b}: {lk.reason}" for lk in links if lk.status != "ok"]
        topology = Topology(
            version=TOPOLOGY_VERSION,
            name=name,
            sites=self.hosts.all_sites(),
            hosts=[found[h.name] for h in self.hosts.hosts],
            links=links,
        )
        return ProbeReport(topology, missing, rounds, waves)

    def _gather_local(self, progress: ProgressFn) -> dict[str, Host]:
        progress("discovery", 0, 1)
        with ThreadPoolExecutor(max_workers=min(32, len(self._entries))) as pool:
            hosts = list(pool.map(self._local_of, self._entries.values()))
        progress("discovery", 1, 1)
        return {h.name: h for h in hosts}

    def _local_of(self, entry: HostEntry) -> Host:
        try:
            with AgentClient(self._context, entry.url, self._key, self.options.timeout_s) as c:
                found = c.request("local")["host"]
                c.request("begin_run", run=self._run, hosts=[h.url for h in self.hosts.hosts])
        except PeerError as exc:
            return _unreachable_host(entry, str(exc))
        if not isinstance(found, dict):
            return _unreachable_host(entry, "agent sent no host description")
        fields = {**found, "name": entry.name, "address": entry.ip, "site": entry.site}
        try:
            return validate_as(Host, fields, f"agent {entry.name}")
        except InputError as exc:
            return _unreachable_host(entry, f"invalid host description: {exc.render()}")

    def _measure_all(self, names: list[str], progress: ProgressFn) -> tuple[list[Link], int, int]:
        if self.options.schedule == "sequential":
            schedule = [[[pair]] for pair in itertools.combinations(names, 2)]
        else:
            schedule = plan_waves(names, {n: self._entries[n].site for n in names})
        links: list[Link] = []
        progress("rounds", 0, len(schedule))
        for done, waves in enumerate(schedule, start=1):
            for wave in waves:
                with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                    links += list(pool.map(self._measure_pair, wave))
            progress("rounds", done, len(schedule))
        return links, len(schedule), _wave_count(schedule)

    def _measure_pair(self, pair: Pair) -> Link:
        a, b = pair
        at = datetime.now(UTC).replace(microsecond=0)
        try:
            forward = self._ask_measure(a, b, self.options.pings)
            backward = self._ask_measure(b, a, 0)
        except PeerError as exc:
            return Link(a=a, b=b, status="unreachable", reason=str(exc))
        try:
            return _link_from(a, b, forward, backward, at, self.options.streams)
        except ValidationError as exc:
            field, message = describe_validation_error(exc)
            return Link(a=a, b=b, status="unreachable",
                        reason=f"the agents reported an invalid {field}: {message}")

    def _ask_measure(self, source: str, target: str, pings: int) -> dict[str, Any]:
        options = self.options
        wait = options.measure_wait_s()
        with AgentClient(self._context, self._entries[source].url, self._key, wait) as client:
            reply = client.request(
                "measure",
                run=self._run,
                peer=self._entries[target].url,
                pings=pings,
                seconds=options.seconds,
                streams=options.streams,
                timeout_s=options.timeout_s,
            )
        result = reply["result"]
        gbps = result["push"]["receiver_gbps"]
        if not isinstance(gbps, int | float) or not limit_of(Gbps).contains(round(gbps, 6)):
            raise PeerError(f"{source}->{target}: bulk transfer rate {gbps!r} Gbit/s is outside "
                            f"{limit_of(Gbps).describe()} (too little data to time?)")
        return result

    def _links_to_unreachable(self, found: dict[str, Host]) -> list[Link]:
        names = list(found)
        links = []
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                down = [n for n in (a, b) if found[n].status != "ok"]
                if down:
                    reason = f"host {down[0]} unreachable: {found[down[0]].reason}"
                    links.append(Link(a=a, b=b, status="unreachable", reason=reason))
        return links


def _link_from(
    a: str, b: str, forward: dict[str, Any], backward: dict[str, Any], at: datetime, streams: int
) -> Link:
    ab = forward["push"]["receiver_gbps"]
    ba = backward["push"]["receiver_gbps"]
    return Link(
        a=a,
        b=b,
        latency_ms=round(forward["latency_ms"], 4),
        bandwidth_gbps=round(min(ab, ba), 6),
        measured=Measurement(
            method="probe",
            at=at,
            latency_samples=forward["pings"],
            bytes=forward["push"]["bytes"] + backward["push"]["bytes"],
            streams=streams,
            a_to_b_gbps=round(ab, 6),
            b_to_a_gbps=round(ba, 6),
        ),
    )


def _unreachable_host(entry: HostEntry, reason: str) -> Host:
    return Host(
        name=entry.name, address=entry.ip, site=entry.site, status="unreachable", reason=reason
    )
