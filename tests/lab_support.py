"""Shared by the tests that need a real lab: the skip marker and unique lab names."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from topology.lab import LabState, lab_down, lab_up
from topology.lab_spec import LabSpec, parse_lab_spec


def _namespaces_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veths, tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    return None if done.returncode == 0 else "ip netns does not work here"


_why_not = _namespaces_usable()
root = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")


def unique_name(tag: str) -> str:
    return f"t{tag}{os.getpid() % 100000}"


def two_site_spec(name: str, site_mbit: float, wan_mbit: float) -> LabSpec:
    """Sites a (hosts a1, a2) and b (host b1), joined by one WAN link."""
    return parse_lab_spec({
        "version": 1,
        "name": name,
        "sites": [
            {"name": "a", "hosts": ["a1", "a2"], "rate_mbit": site_mbit},
            {"name": "b", "hosts": ["b1"], "rate_mbit": site_mbit},
        ],
        "wan": [{"sites": ["a", "b"], "rate_mbit": wan_mbit}],
    })


@contextmanager
def running(spec: LabSpec) -> Iterator[LabState]:
    """The lab of `spec`, up for the block and always taken down after it."""
    state = lab_up(spec)
    try:
        yield state
    finally:
        lab_down(spec.name)
