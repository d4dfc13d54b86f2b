"""holmes.planner and plan.yaml: the rules a plan must keep, and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from holmes.fabric import find_fabrics
from holmes.model import load_model, parse_model
from holmes.network import host_of
from holmes.plan import load_plan, save_plan
from holmes.plan_build import build_plan, summary
from holmes.planner import PlanOptions, decide, naive_estimate
from holmes.review import estimate_plan
from topology.errors import InputError
from topology.schema import Topology, load_topology

EXAMPLES = Path(__file__).parent.parent / "examples"


def lab_topology(wan_gbps: float = 0.048, **host_overrides: Any) -> Topology:
    """The demo lab as the probe sees it: 2 sites x 2 CPU hosts, 1 Gbit/s inside, WAN slow."""
    hosts = []
    for name, site in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")):
        hosts.append({"name": name, "site": site, "address": f"10.77.{1 + (site == 'b')}.1",
                      "cpu_cores": 2, "memory_gb": 8,
                      "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 8,
                                   "tflops": 0.05}],
                      "nics": [{"name": "eth0", "kind": "ethernet", "virtual": True,
                                "state": "up", "netdev": "eth0"}], **host_overrides})
    links = []
    for i, a in enumerate(hosts):
        for b in hosts[i + 1:]:
            same = a["site"] == b["site"]
            links.append({"a": a["name"], "b": b["name"], "latency_ms": 0.2,
                          "bandwidth_gbps": 0.95 if same else wan_gbps})
    return Topology.model_validate({"version": 1, "sites": [{"name": "a"}, {"name": "b"}],
                                    "hosts": hosts, "links": links})


@pytest.fixture(scope="module")
def ib_roce() -> Topology:
    return load_topology(EXAMPLES / "holmes-ib-roce" / "topology.yaml")


def test_datacentre_plan_keeps_data_parallel_groups_in_one_fabric(ib_roce: Topology) -> None:
    decision = decide(ib_roce, load_model("gpt-1.3b"), PlanOptions())
    plan = build_plan(decision)
    fabric_of = {h: f.name for f in find_fabrics(ib_roce) for h in f.hosts}
    device_of_rank = {r: d for d, r in plan.rank_of().items()}
    for group in plan.groups:
        if group.kind == "data":
            fabrics = {fabric_of[host_of(device_of_rank[r])] for r in group.ranks}
            assert len(fabrics) == 1, group.name
            assert "NCCL_IB_HCA" in group.env and "NCCL_NET" not in group.env
    for stage in plan.stages:
        assert len({fabric_of[host_of(d)] for d in stage.devices}) == 1


def test_plan_respects_memory_and_covers_layers(ib_roce: Topology) -> None:
    decision = decide(ib_roce, load_model("llama-7b"), PlanOptions())
    plan = build_plan(decision)
    for replica in plan.replicas:
        assert sum(b - a for a, b in (plan.stage(s).layers for s in replica.stages)) == 32
    for device, needed in plan.estimates.memory_gb.items():
        host, name = device.split(":")
        has = next(d.memory_gb for d in ib_roce.host(host).devices if d.name == name)
        assert needed <= has
    assert {len(p.route) for p in plan.paths} == {len(plan.replicas[0].stages)}


def test_lab_uses_diloco_between_sites_over_a_slow_wan() -> None:
    config = load_model("tiny-gpt")
    decision = decide(lab_topology(), config, PlanOptions())
    plan = build_plan(decision)
    assert plan.sync == "diloco" and len(plan.replicas) == 2
    assert plan.diloco is not None and plan.diloco.quantization == "fp4"
    assert all(g.backend == "gloo" for g in plan.groups)
    forced = build_plan(decide(lab_topology(), config, PlanOptions(sync="allreduce")))
    assert forced.sync == "allreduce"
    assert forced.estimates.iteration_s > plan.estimates.iteration_s


def test_fast_wan_keeps_per_step_allreduce() -> None:
    decision = decide(lab_topology(wan_gbps=25), load_model("tiny-gpt"), PlanOptions())
    assert decision.chosen.sync in ("allreduce", "none")


def test_naive_baseline_is_not_faster_than_the_plan(ib_roce: Topology) -> None:
    config = load_model("gpt-1.3b")
    decision = decide(ib_roce, config, PlanOptions())
    naive = naive_estimate(ib_roce, config, decision.chosen)
    assert naive.step_s >= decision.chosen.step_s


def test_saved_plan_round_trips_and_re_estimates(tmp_path: Path, ib_roce: Topology) -> None:
    config = load_model("gpt-1.3b")
    decision = decide(ib_roce, config, PlanOptions())
    plan = build_plan(decision, model_source="gpt-1.3b")
    out = tmp_path / "plan.yaml"
    save_plan(plan, out, summary(decision, plan, "ib-roce"))
    assert out.read_text().startswith("# hetsched plan for gpt-1.3b on ib-roce")
    again = load_plan(out)
    assert again == plan
    replay = estimate_plan(again, ib_roce, config)
    assert replay.step_s == pytest.approx(decision.chosen.step_s, rel=1e-9)


def test_model_that_cannot_fit_names_device_and_gib() -> None:
    config = parse_model({"version": 1, "model": load_model("llama-7b").model.model_dump(),
                          "training": {"global_batch": 8, "microbatch": 1, "steps": 1}})
    with pytest.raises(InputError, match=r"does not fit: .*device [ab][12]:cpu0.*GiB"):
        decide(lab_topology(), config, PlanOptions())


def test_topology_without_devices_is_refused() -> None:
    with pytest.raises(InputError, match="no devices"):
        decide(lab_topology(devices=[]), load_model("tiny-gpt"), PlanOptions())


def test_disconnected_hosts_are_refused() -> None:
    topology = lab_topology()
    data = topology.model_dump()
    data["links"][1] = {"a": data["links"][1]["a"], "b": data["links"][1]["b"],
                        "status": "unreachable", "reason": "no route"}
    broken = Topology.model_validate(data)
    with pytest.raises(InputError, match="cannot reach each other: no route"):
        decide(broken, load_model("tiny-gpt"), PlanOptions())


def test_geo_regime_refines_the_dt_fm_placement() -> None:
    topology = load_topology(EXAMPLES / "geo12" / "topology.yaml")
    decision = decide(topology, load_model("skippipe-llama-24l"),
                      PlanOptions(stages=6, refine_rounds=40))
    assert decision.regime == "geo"
    dt_fm, refined = decision.candidates
    assert "refined by simulation" in refined.layout.description
    assert refined.step_s <= dt_fm.step_s
    assert decision.chosen is refined or decision.chosen.step_s <= refined.step_s
    sizes = sorted(len(stage) for stage in decision.chosen.layout.replicas[0])
    assert sizes == [3, 3, 3, 3, 3, 5]
