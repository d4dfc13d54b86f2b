"""The planner's tie-break: estimates closer than the probe's noise are ranked by traffic.

Claims: within `noise` of the speed rules' pick, the candidate with the fewest bytes
across sites per step wins, then the one with the fewest bytes in all; outside it, the
faster one; a forced or preferred all-reduce is never traded for DiLoCo, nor devices for
less traffic; on the lab's 2 x 2 topology the choice no longer flips with compute
timings a few percent apart (it does with noise 0); and the plan's header states the
rule and what it decided.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cli.demo import loopback_topology
from holmes.estimate import Estimate
from holmes.model import load_model
from holmes.plan_build import build_plan, candidate_words, summary
from holmes.planner import ESTIMATE_NOISE, PlanOptions, decide, tie_break
from topology.lab_spec import load_lab_spec


def lab_decision(tflops: float, noise: float = ESTIMATE_NOISE):
    topology = loopback_topology(load_lab_spec("lab-2x2"), tflops)
    return decide(topology, load_model("tiny-gpt"), PlanOptions(noise=noise))


@pytest.fixture(scope="module")
def candidates() -> list[Estimate]:
    return lab_decision(0.1).candidates


def shaped(e: Estimate, step_s: float, inter_site: float, other: float) -> Estimate:
    return replace(e, iteration_s=step_s, sync_s_per_step=0.0,
                   bytes_per_step={"inter_site": inter_site, "intra_fabric": other})


def diloco_pair(candidates: list[Estimate]) -> tuple[Estimate, Estimate]:
    found = [e for e in candidates if e.sync == "diloco"]
    assert len(found) >= 2
    return found[0], found[1]


def test_within_the_noise_the_candidate_with_less_wan_traffic_wins(candidates) -> None:
    a, b = diloco_pair(candidates)
    fast = shaped(a, 1.00, inter_site=10e6, other=0)
    frugal = shaped(b, 1.08, inter_site=1e6, other=50e6)
    chosen, ties = tie_break([fast, frugal], fast, "auto", 0.10)
    assert chosen is frugal and ties == [frugal, fast]
    chosen, ties = tie_break([fast, frugal], fast, "auto", 0.05)  # 8% apart: not a tie
    assert chosen is fast and ties == [fast]


def test_equal_wan_traffic_is_broken_by_all_traffic_then_speed(candidates) -> None:
    a, b = diloco_pair(candidates)
    fast = shaped(a, 1.00, inter_site=1e6, other=30e6)
    lean = shaped(b, 1.05, inter_site=1e6, other=2e6)
    assert tie_break([fast, lean], fast, "auto", 0.10)[0] is lean
    same = shaped(b, 1.05, inter_site=1e6, other=30e6)
    assert tie_break([fast, same], fast, "auto", 0.10)[0] is fast


def test_a_preferred_allreduce_is_not_traded_for_diloco(candidates) -> None:
    plain = next(e for e in candidates if e.sync == "allreduce")
    a, _ = diloco_pair(candidates)
    reduce_all = shaped(plain, 1.00, inter_site=50e6, other=0)
    outer = shaped(a, 1.02, inter_site=1e3, other=0)
    assert tie_break([reduce_all, outer], reduce_all, "auto", 0.10)[0] is reduce_all
    assert tie_break([reduce_all, outer], reduce_all, "allreduce", 0.10)[0] is reduce_all
    assert tie_break([reduce_all, outer], outer, "diloco", 0.10)[0] is outer


def test_the_lab_choice_does_not_flip_with_compute_timing_noise() -> None:
    # compute timings 5% either side of 0.115 TFLOPS, where the estimates of the
    # 1-stage x 2-lane and the 2-stage x 1-lane DiLoCo plans cross
    timings = (0.1092, 0.115, 0.1208)
    with_noise = {candidate_words(lab_decision(t).chosen) for t in timings}
    assert len(with_noise) == 1, with_noise
    # the one with the least traffic: both send one DiLoCo exchange per stage across the
    # WAN; two stages x one lane has no data-parallel all-reduce inside the sites
    assert "2 stage(s) x 1 lane(s), diloco" in with_noise.pop()
    without = {candidate_words(lab_decision(t, noise=0.0).chosen) for t in timings}
    assert len(without) == 2, without


def test_the_plan_header_states_the_rule_and_what_it_decided() -> None:
    decision = lab_decision(0.1)
    lines = summary(decision, build_plan(decision, topology_file="t.yaml"), "lab-2x2")
    ties = [line for line in lines if line.startswith("Ties:")]
    assert len(ties) == 1
    assert "within 10% of the fastest estimate" in ties[0]
    assert f"chosen {candidate_words(decision.chosen)}" in ties[0]
    quiet = lab_decision(0.1, noise=0.0)
    assert not any(line.startswith("Ties:") for line in summary(
        quiet, build_plan(quiet, topology_file="t.yaml"), "lab-2x2"))


def test_leaving_devices_idle_is_not_a_way_to_save_traffic() -> None:
    # a band as wide as a loaded lab's probe (72%) takes in the one-site candidate (2 of
    # 4 devices, nothing across sites): it is not a tie, the 4-device plans are
    decision = lab_decision(0.1, noise=0.72)
    assert len(decision.chosen.layout.devices()) == 4
    assert all(len(e.layout.devices()) == 4 for e in decision.ties)
    assert candidate_words(decision.chosen).endswith("2 stage(s) x 1 lane(s), diloco")
