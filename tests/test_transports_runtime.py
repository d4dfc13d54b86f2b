"""The runtime side of one network per communicator, on real gloo processes.

A replica that spans fabrics gets one `pipeline` group per RDMA fabric for the hops inside
it (`holmes.transports.layout_groups`); `PlanRun.p2p_group` sends each hop over the
smallest pipeline group holding both ends, and skippipe sends and receives on it. gloo
has no per-communicator network, but the routing is the same: here a 3-stage CPU plan
gets such a group by hand and trains exactly as it does without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from test_trainer import losses, make_plan, topology, train

from holmes.plan import load_plan
from holmes.runtime.plan_run import PlanRun


def with_fabric_pipeline(plan: Path, target: Path, ranks: list[int]) -> Path:
    """A copy of `plan` (beside its topology and model) with a pipeline group of `ranks`."""
    data: dict[str, Any] = yaml.safe_load(plan.read_text())
    pipeline = next(g for g in data["groups"] if g["name"] == "pipeline-r0")
    data["groups"].insert(1, {**pipeline, "name": "pipeline-r0-fabric", "ranks": ranks})
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def test_hops_use_the_smallest_pipeline_group_holding_both(tmp_path: Path) -> None:
    plan_file = make_plan(tmp_path, topology({"a": ["h1", "h2", "h3"]}, 1.0), "--stages", "3")
    edited = load_plan(with_fabric_pipeline(plan_file, tmp_path / "edited.yaml", [0, 1]))
    groups = {g.name: object() for g in edited.groups}
    run = PlanRun(edited, tmp_path / "edited.yaml", None, {}, groups, None, 0)  # type: ignore[arg-type]
    assert run.p2p_group("h1:cpu0", "h2:cpu0") is groups["pipeline-r0-fabric"]
    assert run.p2p_group("h2:cpu0", "h1:cpu0") is groups["pipeline-r0-fabric"]
    assert run.p2p_group("h2:cpu0", "h3:cpu0") is groups["pipeline-r0"]
    assert run.p2p_group("h3:cpu0", "h1:cpu0") is groups["pipeline-r0"]


def test_a_fabric_pipeline_group_carries_its_hops(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["h1", "h2", "h3"]}, 1.0), "--stages", "3")
    assert [len(s["devices"]) for s in yaml.safe_load(plan.read_text())["stages"]] == [1, 1, 1]
    split = with_fabric_pipeline(plan, tmp_path / "split.yaml", [0, 1])
    plain = losses(train(plan, tmp_path / "plain.json", "--steps", "3")["curve"])
    routed = losses(train(split, tmp_path / "split.json", "--steps", "3")["curve"])
    assert sorted(plain) == [1, 2, 3] and routed == plain
