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


def gpu_host(name: str, site: str = "dc", gpus: int = 2, **extra: Any) -> dict[str, Any]:
    return {"name": name, "site": site, "cpu_cores": 16, "memory_gb": 128,
            "devices": [{"name": f"gpu{i}", "kind": "gpu", "memory_gb": 80, "tflops": 150}
                        for i in range(gpus)],
            "nics": [{"name": "eth0", "kind": "ethernet", "speed_gbps": 25, "state": "up",
                      "netdev": "eth0"}], **extra}


def with_login_node(**login: Any) -> Topology:
    """Two GPU hosts and a login node that `probe local` recorded with only cpu0."""
    cpu = {"name": "login", "site": "dc", "cpu_cores": 4, "memory_gb": 16,
           "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 16, "tflops": 0.5}],
           "nics": [{"name": "eth0", "kind": "ethernet", "speed_gbps": 25, "state": "up",
                     "netdev": "eth0"}], **login}
    return Topology.model_validate({"version": 1, "sites": [{"name": "dc"}],
                                    "hosts": [gpu_host("g1"), gpu_host("g2"), cpu]})


def test_a_cpu_only_host_is_left_out_of_a_gpu_job() -> None:
    config = load_model("gpt-1.3b")
    options = PlanOptions(nccl_net="per-communicator")
    plan = build_plan(decide(with_login_node(), config, options))
    assert all(not d.startswith("login:") for s in plan.stages for d in s.devices)
    assert {g.backend for g in plan.groups} == {"nccl"}
    assert [h.host for h in plan.left_out] == ["login"]
    assert "no GPU (cpu0 only)" in plan.left_out[0].reason
    assert "--include-cpu-hosts" in plan.left_out[0].reason
    assert [d.device for d in plan.idle] == ["login:cpu0"]
    kept = build_plan(decide(with_login_node(), config, PlanOptions(
        nccl_net="per-communicator", include_cpu_hosts=True, stages=5)))  # 5 devices, 5 stages
    assert kept.left_out == [] and any("login:cpu0" in s.devices for s in kept.stages)
    assert {g.backend for g in kept.groups} == {"gloo"} and kept.nccl_net_selection is None


def test_an_unreachable_host_is_left_out_with_its_reason() -> None:
    gone = {"status": "unreachable", "reason": "ssh timed out"}
    topology = Topology.model_validate({"version": 1, "sites": [{"name": "dc"}], "hosts": [
        gpu_host("g1"), gpu_host("g2"), {"name": "g3", "site": "dc", **gone}]})
    decision = decide(topology, load_model("gpt-1.3b"), PlanOptions(nccl_net="per-process"))
    plan = build_plan(decision)
    assert [(h.host, h.reason) for h in plan.left_out] == [("g3", "unreachable (ssh timed out)")]
    assert plan.topology_sha256 == topology.sha256()  # the file given, not the one planned on
    assert any(line.startswith("Left out: 1 host (g3: unreachable") for line in
               summary(decision, plan, "t"))


def test_the_plan_on_one_fabric_is_megatron_order() -> None:
    topology = load_topology(EXAMPLES / "one-ib-fabric" / "topology.yaml")
    config = load_model("gpt-1.3b")
    decision = decide(topology, config, PlanOptions(nccl_net="per-communicator"))
    naive = naive_estimate(topology, config, decision.chosen)
    assert naive.layout.replicas == decision.chosen.layout.replicas
    assert f"{decision.chosen.tokens_per_s / naive.tokens_per_s:.2f}" == "1.00"
    words = summary(decision, build_plan(decision), "one-ib-fabric")
    assert "1 fabric (dc-infiniband: 16 hosts)" in words[1]
    assert "one pipeline over fabric dc-infiniband" in words[2]
    assert not any("1 fabrics" in w or "all fabrics" in w for w in words)


def test_a_gpu_keeps_memory_for_the_cuda_context_and_nccl() -> None:
    decision = decide(with_login_node(), load_model("gpt-1.3b"),
                      PlanOptions(nccl_net="per-communicator"))
    reserve = 0.8 + 4 * 0.6
    assert decision.context.memory_bytes("g1:gpu0") == pytest.approx((80 - reserve) * 1e9)


def three_single_host_sites() -> Topology:
    hosts = [{"name": f"{s}1", "site": s, "address": f"10.0.{i}.1", "cpu_cores": 2,
              "memory_gb": 4, "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 4,
                                           "tflops": 0.05}],
              "nics": [{"name": "eth0", "kind": "ethernet", "state": "up", "netdev": "eth0",
                        "speed_gbps": 1.0}]} for i, s in enumerate("abc")]
    links = [{"a": a["name"], "b": b["name"], "latency_ms": 10, "bandwidth_gbps": 0.05}
             for i, a in enumerate(hosts) for b in hosts[i + 1:]]
    return Topology.model_validate({"version": 1, "sites": [{"name": s} for s in "abc"],
                                    "hosts": hosts, "links": links})


def test_a_one_stage_geo_plan_has_nothing_to_swap_and_still_plans() -> None:
    decision = decide(three_single_host_sites(), load_model("tiny-gpt"),
                      PlanOptions(stages=1, regime="geo"))
    assert decision.regime == "geo" and decision.chosen.layout.stages == 1


def test_forced_diloco_without_replicas_is_refused_naming_the_way_out() -> None:
    with pytest.raises(InputError, match="--regime datacentre") as caught:
        decide(three_single_host_sites(), load_model("tiny-gpt"),
               PlanOptions(stages=1, sync="diloco", regime="geo"))
    assert caught.value.field == "--sync"
    auto = decide(three_single_host_sites(), load_model("tiny-gpt"),
                  PlanOptions(stages=1, sync="diloco"))  # auto weighs the replicas too
    assert auto.regime == "datacentre" and auto.chosen.sync == "diloco"
    forced = decide(three_single_host_sites(), load_model("tiny-gpt"),
                    PlanOptions(stages=1, sync="diloco", regime="datacentre"))
    assert forced.chosen.sync == "diloco" and len(forced.chosen.layout.replicas) == 3
