"""Probing a real lab: agents in namespaces, the coordinator in one of them (root only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from topology.lab_probe import lab_hosts_file, probe_lab
from topology.probe import ProbeOptions
from topology.schema import load_topology

from lab_support import root, running, two_site_spec, unique_name

WAN_MBIT = 40
SITE_MBIT = 400


@pytest.fixture(scope="module")
def lab():
    with running(two_site_spec(unique_name("p"), SITE_MBIT, WAN_MBIT)) as state:
        yield state


@pytest.mark.root
@root
def test_hosts_file_lists_every_lab_host(lab) -> None:
    hosts = lab_hosts_file(lab)
    assert [h["name"] for h in hosts["hosts"]] == ["a1", "a2", "b1"]
    assert hosts["hosts"][2] == {"name": "b1", "address": "10.77.2.1:7070", "site": "b"}


@pytest.mark.root
@root
@pytest.mark.slow
def test_probe_lab_measures_the_shaped_rates(lab, tmp_path: Path) -> None:
    out = tmp_path / "topology.yaml"
    options = ProbeOptions(pings=5, seconds=0.5, streams=2, timeout_s=5)
    assert probe_lab(lab, out, options) == 0
    topology = load_topology(out)
    assert {s.name for s in topology.sites} == {"a", "b"}
    assert topology.host("b1").address == "10.77.2.1" and topology.host("b1").site == "b"
    intra = topology.link("a1", "a2").bandwidth_gbps * 1000
    wan = topology.link("a1", "b1").bandwidth_gbps * 1000
    # Loose bounds: they tell a WAN link from a site link, not how fast this machine is.
    assert 0.5 * WAN_MBIT < wan < 1.1 * WAN_MBIT
    assert 0.5 * SITE_MBIT < intra < 1.1 * SITE_MBIT


@pytest.mark.root
@root
def test_cli_probe_lab_unknown_lab_is_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cli", "probe", "lab", "--lab", "nolab",
                           "-o", str(tmp_path / "t.yaml")], capture_output=True, text=True)
    assert done.returncode == 2
    assert "lab 'nolab' is not running" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "t.yaml").exists()
