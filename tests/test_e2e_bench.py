"""bench/e2e_lab.py's report, without a lab: the plan it ran and every candidate's
estimate beside the result, and the probe's compute timing spread over repeats."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e_lab import (  # noqa: E402
    Repeat,
    RunResult,
    lab_noise,
    print_plan,
    probe_spread,
    report,
)
from cli.demo import loopback_topology  # noqa: E402
from holmes.model import load_model  # noqa: E402
from holmes.planner import PlanOptions, decide  # noqa: E402
from topology.lab_spec import load_lab_spec  # noqa: E402


@pytest.fixture(scope="module")
def decision():
    topology = loopback_topology(load_lab_spec("lab-2x2"), 0.1)
    return decide(topology, load_model("tiny-gpt"), PlanOptions())


def test_the_plan_and_every_candidate_are_printed(decision, capsys) -> None:
    print_plan(decision)
    out = capsys.readouterr().out
    assert "plan: one replica per site" in out and "sync diloco" in out
    rows = [line for line in out.splitlines() if "s/step" in line and "MB/step" in line]
    assert len(rows) == len(decision.candidates)
    assert sum(row.lstrip().startswith("*") for row in rows) == 1
    assert any(row.lstrip().startswith("~") for row in rows)  # the tie it broke


def test_each_repeat_reports_its_plan_and_the_probe_spread(decision, capsys) -> None:
    runs = [RunResult("hetsched", 50.0, 2.9, 12e6, 409600),
            RunResult("DDP", 400.0, 2.8, 4e9, 409600)]
    repeats = [Repeat({"a1": 0.05, "b1": 0.04}, decision, runs),
               Repeat({"a1": 0.06, "b1": 0.04}, decision, runs)]
    assert report(repeats[0]) is True
    probe_spread(repeats)
    out = capsys.readouterr().out
    assert "plan: one replica per site" in out and "PASS  tokens/s 8.00x DDP" in out
    assert "a1: 0.05, 0.06  spread 18.2%" in out and "b1: 0.04, 0.04  spread 0.0%" in out


def test_the_lab_noise_is_the_spread_of_its_identical_hosts() -> None:
    # the figures of a probe at load average 10-16: 48% apart on one machine's cores
    probed = {"a1": 0.004996, "a2": 0.004316, "b1": 0.003086, "b2": 0.003413}
    assert lab_noise(probed) == pytest.approx(0.483, abs=1e-3)
    assert lab_noise({"a1": 0.05, "b1": 0.0501}) == 0.10  # never below the default
