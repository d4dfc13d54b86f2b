"""Probe accuracy and speed on the emulated lab (needs root).

1. lab-3site (sites of 2+2+1 hosts; 1000 Mbit/s inside a site; WAN a-b 100, a-c 50,
   b-c 20 Mbit/s): every measured link bandwidth against its configured rate (target:
   within ±10%).
2. lab-8 (3+3+2 hosts): the whole all-pairs probe, tournament schedule (target: under
   60 s on this machine), against the sequential baseline (one pair at a time) run on the
   same lab in the same script; prints the ratio.

Rates are tc rates on the wire; TCP over Ethernet carries at most 1448/1514 = 95.6% of
them as payload, so a perfect probe reads about 4% low.

    sudo .venv/bin/python bench/probe_accuracy.py [--skip-baseline]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from topology.lab import LabState, lab_down, lab_up
from topology.lab_probe import probe_lab
from topology.lab_spec import LabSpec, load_lab_spec
from topology.probe import ProbeOptions
from topology.schema import Topology, load_topology

TOLERANCE = 0.10
TIME_LIMIT_S = 60.0


@dataclass
class Run:
    topology: Topology
    seconds: float
    status: int


def configured_mbit(spec: LabSpec, a: str, b: str) -> float:
    site_a, site_b = spec.site_of(a), spec.site_of(b)
    rate = min(site_a.rate_mbit, site_b.rate_mbit)
    if site_a.name != site_b.name:
        rate = min(rate, spec.wan_rate_mbit(site_a.name, site_b.name))
    return rate


def probe(state: LabState, options: ProbeOptions) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "topology.yaml"
        started = time.perf_counter()
        status = probe_lab(state, out, options)
        seconds = time.perf_counter() - started
        return Run(load_topology(out), seconds, status)


@contextmanager
def with_lab(builtin: str, name: str) -> Iterator[LabState]:
    """A built-in lab under a bench-only name, always taken down afterwards."""
    spec = load_lab_spec(builtin).model_copy(update={"name": name})
    lab_down(name)
    state = lab_up(spec)
    try:
        yield state
    finally:
        lab_down(name)


def accuracy() -> bool:
    print("== lab-3site: measured vs configured bandwidth ==")
    with with_lab("lab-3site", "bacc") as state:
        run = probe(state, ProbeOptions())
    print(f"probe took {run.seconds:.1f} s (exit {run.status})")
    print(
        f"{'a':>3} {'b':>3} {'configured':>11} {'measured':>9} {'a->b':>8} {'b->a':>8} {'error':>7}"
    )
    worst = 0.0
    for link in sorted(run.topology.links, key=lambda lk: (lk.a, lk.b)):
        want = configured_mbit(state.spec, link.a, link.b)
        if link.status != "ok":
            print(f"{link.a:>3} {link.b:>3} {want:>11.0f} unreachable: {link.reason}")
            worst = float("inf")
            continue
        got = link.bandwidth_gbps * 1000
        error = got / want - 1
        worst = max(worst, abs(error))
        m = link.measured
        print(
            f"{link.a:>3} {link.b:>3} {want:>11.0f} {got:>9.1f} {m.a_to_b_gbps * 1000:>8.1f} "
            f"{m.b_to_a_gbps * 1000:>8.1f} {error:>+7.1%}"
        )
    ok = worst <= TOLERANCE
    print(f"worst error {worst:.1%} (target ±{TOLERANCE:.0%}): {'PASS' if ok else 'FAIL'}\n")
    return ok


def speed(skip_baseline: bool) -> bool:
    print("== lab-8: whole all-pairs probe time ==")
    with with_lab("lab-8", "bspd") as state:
        fast = probe(state, ProbeOptions())
        slow = None if skip_baseline else probe(state, ProbeOptions(schedule="sequential"))
    pairs = len(fast.topology.links)
    print(f"{'schedule':<12} {'pairs':>5} {'seconds':>8} {'exit':>4}")
    print(f"{'tournament':<12} {pairs:>5} {fast.seconds:>8.1f} {fast.status:>4}")
    if slow is not None:
        print(f"{'sequential':<12} {pairs:>5} {slow.seconds:>8.1f} {slow.status:>4}")
        print(
            f"speed-up of the tournament over one pair at a time: "
            f"{slow.seconds / fast.seconds:.2f}x"
        )
    ok = fast.seconds < TIME_LIMIT_S and fast.status == 0
    print(
        f"tournament probe {fast.seconds:.1f} s (target < {TIME_LIMIT_S:.0f} s, agent start-up "
        f"included): {'PASS' if ok else 'FAIL'}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="leave out the sequential baseline (saves about a minute)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/probe_accuracy.py needs root (network namespaces)", file=sys.stderr)
        return 2
    results = [accuracy(), speed(args.skip_baseline)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
