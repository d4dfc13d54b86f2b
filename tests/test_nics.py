"""One network per communicator: holmes.nics, holmes.transports and the launcher's
per-process environment, for plans with InfiniBand, RoCE and socket groups.

Everything here runs without a GPU: the options each NCCL group would be created with are
plain data (`Group.nccl_config`), and `nccl_options` is checked against the installed
torch (a CPU build has no ProcessGroupNCCL: it must refuse by name, not degrade quietly).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from test_fabric import ETH, IB, ROCE, host, topology

from cli.torchrun import LaunchSpec, build_commands, merge_host_env
from holmes.fabric import find_fabrics
from holmes.model import load_model
from holmes.nics import group_env
from holmes.plan import Plan
from holmes.plan_build import build_plan
from holmes.planner import PlanOptions, decide
from holmes.transports import (
    effective_transports,
    missing_here,
    nccl_options,
    net_support,
    socket_devices,
)
from topology.errors import InputError
from topology.schema import Topology

NETWORK_SWITCHES = ("NCCL_NET", "NCCL_IB_DISABLE")
Plans = dict[str, Plan]


@pytest.fixture(scope="module")
def mixed() -> Topology:
    """Two InfiniBand hosts, two RoCE hosts and one Ethernet-only host, 2 GPUs each."""
    return topology([host("ib1", "dc", IB, ETH), host("ib2", "dc", IB, ETH),
                     host("ro1", "dc", ROCE, ETH), host("ro2", "dc", ROCE, ETH),
                     host("eth1", "dc", ETH)])


@pytest.fixture(scope="module")
def plans(mixed: Topology) -> dict[str, Plan]:
    """The mixed topology planned with each NCCL network selection."""
    made = {}
    for selection in ("per-communicator", "per-process"):
        options = PlanOptions(regime="datacentre", nccl_net=selection)  # type: ignore[arg-type]
        made[selection] = build_plan(decide(mixed, load_model("gpt-1.3b"), options))
    return made


def host_envs(plan: Plan) -> dict[str, dict[str, str]]:
    spec = LaunchSpec(via="ssh", plan_path=Path("plan.yaml"), script=("t.py",), rdzv_id="x")
    return {c.host: c.env for c in build_commands(plan, spec)}


def hosts_of(plan: Plan, ranks: list[int]) -> set[str]:
    devices = {rank: device for device, rank in plan.rank_of().items()}
    return {devices[r].split(":", 1)[0] for r in ranks}


def test_rdma_group_gets_its_hcas_and_no_network_switch(mixed: Topology) -> None:
    env = group_env(mixed, ["ib1", "ib2"], "nccl", "infiniband", "per-communicator")
    assert env.common == {"NCCL_IB_HCA": "=mlx5_0:1", "NCCL_SOCKET_IFNAME": "=eth0"}
    roce = group_env(mixed, ["ro1", "ro2"], "nccl", "roce", "per-process")
    assert roce.common == {"NCCL_IB_GID_INDEX": "3", "NCCL_IB_HCA": "=mlx5_2:1",
                           "NCCL_SOCKET_IFNAME": "=eth0"}


def test_socket_group_switches_the_network_only_per_process(mixed: Topology) -> None:
    own = group_env(mixed, ["ib1", "ro1"], "nccl", "socket", "per-communicator")
    assert own.common == {"NCCL_SOCKET_IFNAME": "=eth0"}
    shared = group_env(mixed, ["ib1", "ro1"], "nccl", "socket", "per-process")
    assert shared.common == {"NCCL_NET": "Socket", "NCCL_SOCKET_IFNAME": "=eth0"}


def test_values_that_differ_by_host_stay_per_host() -> None:
    other = dict(ETH, name="eno1", netdev="eno1")
    t = topology([host("a1", "s", ETH), host("a2", "s", other)])
    gloo = group_env(t, ["a1", "a2"], "gloo", "socket", "per-communicator")
    assert gloo.per_host == {"a1": {"GLOO_SOCKET_IFNAME": "eth0"},
                             "a2": {"GLOO_SOCKET_IFNAME": "eno1"}}
    nccl = group_env(t, ["a1", "a2"], "nccl", "socket", "per-communicator")
    assert nccl.common == {} and nccl.per_host == {"a1": {"NCCL_SOCKET_IFNAME": "=eth0"},
                                                   "a2": {"NCCL_SOCKET_IFNAME": "=eno1"}}


def test_each_group_is_created_with_its_own_network(plans: Plans, mixed: Topology) -> None:
    plan = plans["per-communicator"].model_copy(deep=True)
    fabric_of = {h: f for f in find_fabrics(mixed) for h in f.hosts}
    transports = {g.transport for g in plan.groups}
    assert {"infiniband", "roce", "socket"} <= transports
    for group in plan.groups:
        fabrics = {fabric_of[h] for h in hosts_of(plan, group.ranks)}
        one_rdma = len(fabrics) == 1 and next(iter(fabrics)).rdma
        assert (group.transport != "socket") == one_rdma, group.name
        assert group.nccl_config == {"net_name": "IB" if one_rdma else "Socket"}, group.name


def test_no_process_variable_disables_rdma_for_an_rdma_group(plans: Plans) -> None:
    plan = plans["per-communicator"].model_copy(deep=True)
    envs = host_envs(plan)
    rdma_hosts = set()
    for group in plan.groups:
        if group.transport in ("infiniband", "roce"):
            rdma_hosts |= hosts_of(plan, group.ranks)
    assert rdma_hosts == {"ib1", "ib2", "ro1", "ro2"}
    for name in rdma_hosts:
        assert not set(NETWORK_SWITCHES) & set(envs[name]), (name, envs[name])
    assert envs["ib1"]["NCCL_IB_HCA"] == "=mlx5_0:1"
    assert envs["ro1"]["NCCL_IB_HCA"] == "=mlx5_2:1" and envs["ro1"]["NCCL_IB_GID_INDEX"] == "3"
    assert all(env["NCCL_SOCKET_IFNAME"] == "=eth0" for env in envs.values())


def test_per_process_selection_puts_whole_processes_on_sockets(plans: Plans) -> None:
    plan = plans["per-process"]
    socket_ranks = {r for g in plan.groups if g.transport == "socket" for r in g.ranks}
    for group in plan.groups:
        assert group.nccl_config == {}
        if socket_ranks & set(group.ranks):
            assert group.transport == "socket", group.name
    envs = host_envs(plan)
    ranks = plan.rank_of()
    for launch in plan.launch:
        mine = {ranks[d] for d in launch.devices}
        on_sockets = envs[launch.host].get("NCCL_NET") == "Socket"
        assert on_sockets == bool(mine & socket_ranks), launch.host
    together = plans["per-communicator"].model_copy(deep=True)
    assert plan.estimates.tokens_per_s <= together.estimates.tokens_per_s


def test_socket_set_is_closed_over_shared_groups() -> None:
    groups = {"cross": ["a:0", "b:0"], "data-a": ["a:0", "a2:0"], "data-c": ["c:0", "c2:0"]}
    wanted = {"cross": "socket", "data-a": "infiniband", "data-c": "roce"}
    assert socket_devices(groups, wanted) == {"a:0", "b:0", "a2:0"}  # type: ignore[arg-type]


def test_effective_transports_follow_the_selection(mixed: Topology) -> None:
    fabrics = find_fabrics(mixed)
    groups = {"cross": ["ib1:gpu0", "ro1:gpu0"], "ib": ["ib1:gpu0", "ib2:gpu0"],
              "roce": ["ro1:gpu1", "ro2:gpu1"]}
    assert effective_transports(groups, fabrics, "per-communicator") == {
        "cross": "socket", "ib": "infiniband", "roce": "roce"}
    assert effective_transports(groups, fabrics, "per-process") == {
        "cross": "socket", "ib": "socket", "roce": "roce"}


def test_nccl_options_match_what_this_torch_offers() -> None:
    support = net_support()
    if getattr(dist, "ProcessGroupNCCL", None) is None:
        assert not support.per_communicator and "no ProcessGroupNCCL" in support.detail
        with pytest.raises(RuntimeError, match="group data-r0-s0 needs per-communicator"):
            nccl_options("data-r0-s0", {"net_name": "IB"})
    elif support.per_communicator:
        options = nccl_options("data-r0-s0", {"net_name": "IB"})
        assert options is not None and options.config.net_name == "IB"
    assert nccl_options("any", {}) is None


def test_hosts_that_disagree_on_a_variable_are_refused(plans: Plans) -> None:
    plan = plans["per-communicator"].model_copy(deep=True)
    data = next(g for g in plan.groups if g.kind == "data" and g.transport == "infiniband")
    pipeline = next(g for g in plan.groups if g.kind == "pipeline" and
                    set(data.ranks) <= set(g.ranks))
    pipeline.env_per_host = {"ib1": {"NCCL_SOCKET_IFNAME": "=ib0"}}
    ranks = tuple(plan.rank_of()[d] for d in next(h for h in plan.launch
                                                  if h.host == "ib1").devices)
    with pytest.raises(InputError, match=f"{pipeline.name}.*{data.name}|"
                                         f"{data.name}.*{pipeline.name}"):
        merge_host_env(plan, "ib1", ranks)


def test_a_missing_hca_is_named_with_its_group(plans: Plans, tmp_path: Path) -> None:
    plan = plans["per-communicator"].model_copy(deep=True)
    group = next(g for g in plan.groups if g.transport == "infiniband")
    reason = missing_here(group, "ib1", sysfs=tmp_path)
    assert reason is not None and group.name in reason and "mlx5_0" in reason
    (tmp_path / "mlx5_0").mkdir()
    after = missing_here(group, "ib1", sysfs=tmp_path)
    assert after is None or "HCA" not in after  # on a CPU machine: NCCL needs CUDA
    socket = next(g for g in plan.groups if g.transport == "socket")
    assert "HCA" not in (missing_here(socket, "eth1", sysfs=tmp_path) or "")
