"""topology.probe: the round-robin schedule, site-aware waves, and real probes on loopback."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from topology.agent import Agent, AgentConfig, start_agent_thread
from topology.hosts import HostsFile
from topology.probe import Coordinator, ProbeOptions, split_waves, tournament_rounds
from topology.schema import load_topology

KEY = b"t" * 32
LOCAL = {"name": "x", "cpu_cores": 2, "memory_gb": 4.0,
         "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 4.0}]}
FAST = ProbeOptions(pings=5, seconds=0.2, streams=2, timeout_s=2)


@given(st.integers(min_value=0, max_value=24))
def test_tournament_covers_every_pair_once_in_disjoint_rounds(n: int) -> None:
    names = [f"h{i}" for i in range(n)]
    rounds = tournament_rounds(names)
    pairs = [frozenset(p) for r in rounds for p in r]
    assert sorted(map(sorted, pairs)) == sorted(map(sorted, itertools.combinations(names, 2)))
    for r in rounds:
        hosts = [h for pair in r for h in pair]
        assert len(hosts) == len(set(hosts))
    if n >= 2:
        assert len(rounds) == (n - 1 if n % 2 == 0 else n)


@given(st.lists(st.sampled_from("abc"), min_size=2, max_size=12))
def test_waves_never_share_a_site_pair(sites: list[str]) -> None:
    names = [f"h{i}" for i in range(len(sites))]
    site_of = dict(zip(names, sites, strict=True))
    for pairs in tournament_rounds(names):
        waves = split_waves(pairs, site_of)
        assert sorted(p for w in waves for p in w) == sorted(pairs)
        for wave in waves:
            crossing = [frozenset((site_of[a], site_of[b])) for a, b in wave
                        if site_of[a] != site_of[b]]
            assert len(crossing) == len(set(crossing))


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started = [start_agent_thread(AgentConfig(url="tcp://127.0.0.1:0", key=KEY, local=LOCAL))
               for _ in range(3)]
    yield started
    for agent in started:
        agent.stop.set()


def hosts_file(endpoints: list[str], sites: list[str]) -> HostsFile:
    hosts = [{"name": f"h{i}", "address": e.removeprefix("tcp://"), "site": s}
             for i, (e, s) in enumerate(zip(endpoints, sites, strict=True))]
    return HostsFile.model_validate({"version": 1, "hosts": hosts})


def test_coordinator_measures_all_pairs(agents: list[Agent]) -> None:
    hosts = hosts_file([a.endpoint for a in agents], ["a", "a", "b"])
    report = Coordinator(hosts, KEY, FAST).run()
    topology = report.topology
    assert report.missing == [] and report.rounds == 3
    assert [h.name for h in topology.hosts] == ["h0", "h1", "h2"]
    assert {s.name for s in topology.sites} == {"a", "b"}
    assert topology.host("h2").site == "b" and topology.host("h0").address == "127.0.0.1"
    assert len(topology.links) == 3
    for link in topology.links:
        assert link.status == "ok" and link.bandwidth_gbps > 0
        assert link.measured.latency_samples == 5
        assert link.bandwidth_gbps == min(link.measured.a_to_b_gbps, link.measured.b_to_a_gbps)


def test_unreachable_host_is_recorded_and_the_rest_measured(agents: list[Agent]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    hosts = hosts_file([agents[0].endpoint, dead, agents[1].endpoint], ["a", "a", "a"])
    report = Coordinator(hosts, KEY, FAST).run()
    topology = report.topology
    assert topology.host("h1").status == "unreachable"
    assert "cannot connect to" in topology.host("h1").reason
    assert topology.link("h0", "h2").status == "ok"
    assert topology.link("h0", "h1").status == "unreachable"
    assert len(report.missing) == 3


def test_wrong_token_makes_every_host_unreachable(agents: list[Agent]) -> None:
    hosts = hosts_file([a.endpoint for a in agents[:2]], ["a", "b"])
    report = Coordinator(hosts, b"z" * 32, FAST).run()
    assert all("refused" in h.reason for h in report.topology.hosts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hetsched(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.mark.slow
def test_cli_probe_between_two_agent_processes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    assert hetsched("probe", "token", "-o", str(token)).returncode == 0
    assert oct(token.stat().st_mode)[-3:] == "600"
    ports = [free_port(), free_port()]
    agents = [subprocess.Popen([sys.executable, "-m", "cli", "probe", "agent", "--no-flops",
                                "--listen", f"127.0.0.1:{p}", "--token-file", str(token)],
                               stderr=subprocess.PIPE, text=True) for p in ports]
    try:
        hosts = tmp_path / "hosts.yaml"
        hosts.write_text(yaml.safe_dump({"version": 1, "hosts": [
            {"name": "one", "address": f"127.0.0.1:{ports[0]}", "site": "s1"},
            {"name": "two", "address": f"127.0.0.1:{ports[1]}", "site": "s2"},
        ]}))
        out = tmp_path / "topology.yaml"
        deadline = time.time() + 60
        while True:
            done = hetsched("probe", "run", str(hosts), "-o", str(out), "--token-file", str(token),
                            "--seconds", "0.3", "--pings", "5", "--timeout", "3", "--json")
            if done.returncode == 0 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert done.returncode == 0, done.stderr
        topology = load_topology(out)
        assert topology.link("one", "two").status == "ok"
        assert topology.host("one").devices and topology.host("two").cpu_cores == os.cpu_count()
        assert '"rounds": 1' in done.stdout
    finally:
        for agent in agents:
            agent.terminate()
            agent.wait(timeout=10)
