"""Helpers shared by the planner benchmarks (holmes_placement, planning_time, geo12_placement).

Paths to the committed example topologies, a plain-text table printer, PASS/FAIL
words, and short names for layouts and devices. No planning logic lives here: each
benchmark calls the planner itself so that what it measures is visible in its own file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from holmes.estimate import Estimate
from holmes.placement import Layout
from topology.schema import Topology, load_topology

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
T = TypeVar("T")


def example_path(name: str) -> Path:
    return EXAMPLES / name / "topology.yaml"


def load_example(name: str) -> Topology:
    return load_topology(example_path(name))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_checks(checks: list[tuple[str, bool]]) -> int:
    """Print each check with its verdict; the exit status: 0 when all pass, else 1."""
    print()
    for text, ok in checks:
        print(f"{verdict(ok)}  {text}")
    return 0 if all(ok for _, ok in checks) else 1


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), wall seconds it took)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def shape(layout: Layout) -> str:
    """`stages x data-parallel width` and the replica count when there are several."""
    text = f"{layout.stages}x{len(layout.replicas[0][0])}"
    return text if len(layout.replicas) == 1 else f"{text} x{len(layout.replicas)}rep"


def plan_shape(est: Estimate) -> str:
    sync = "" if est.sync == "none" else f" {est.sync}"
    return shape(est.layout) + sync


def short_device(device: str) -> str:
    """`host:cuda0` -> `host` when the device is the host's only GPU worth naming."""
    host, name = device.split(":", 1)
    return host if name == "cuda0" else device


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None
) -> None:
    """Columns padded to their widest cell; numbers are expected pre-formatted."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = right or [i > 0 for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if a else c.ljust(w) for c, w, a in zip(row, widths, align, strict=True)
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
