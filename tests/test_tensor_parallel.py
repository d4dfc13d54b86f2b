"""Tensor parallelism in the planner: degrees that stay inside hosts, the Megatron cost
per layer, memory by hand against a plan, the plan's keys and cross-checks, and launch's
refusal (the runtime does not run TP yet)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli.main import cli
from holmes import tensor_parallel
from holmes.estimate import GPU_RESERVED_GB, _tp_layer_s, tp_link
from holmes.model import load_model
from holmes.placement import Layout
from holmes.plan import Plan, load_plan
from holmes.plan_build import build_plan
from holmes.planner import Decision, PlanOptions, decide
from topology.errors import InputError
from topology.schema import load_topology
from topology.validation import validate_as

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def layout(stages: list[tuple[str, ...]]) -> Layout:
    return Layout("datacentre", (tuple(stages),), "test")


def test_degrees_divide_every_host_of_every_stage() -> None:
    eight = tuple(f"h0:g{i}" for i in range(8))
    assert tensor_parallel.degrees(layout([eight[:4], eight[4:]])) == [2, 4]
    assert tensor_parallel.degrees(layout([eight])) == [2, 4, 8]
    spans = ("h0:g6", "h0:g7", "h1:g0", "h1:g1", "h1:g2", "h1:g3")
    assert tensor_parallel.degrees(layout([spans])) == [2]  # 2 on h0, 4 on h1
    assert tensor_parallel.degrees(layout([("h0:g0", "h1:g0")])) == []


def test_groups_never_leave_a_host_and_keep_megatron_order() -> None:
    stage = ("h0:g6", "h0:g7", "h1:g0", "h1:g1", "h1:g2", "h1:g3")
    grouped = tensor_parallel.with_tensor_parallel(layout([stage]), 2)
    assert grouped.replicas == ((("h0:g6", "h1:g0", "h1:g2"),),)
    assert grouped.tp_groups == (("h0:g6", "h0:g7"), ("h1:g0", "h1:g1"), ("h1:g2", "h1:g3"))
    assert grouped.devices() == list(stage) and grouped.tp(0) == 2
    assert "tensor parallel 2" in grouped.description


def test_layer_cost_by_hand() -> None:
    model = load_model("llama-7b").model
    s, h, f, k = model.seq_len, model.hidden, model.ffn, model.kv_hidden
    forward_flops = 2 * s * (2 * h * h + 2 * h * k + 3 * h * f) + 4 * s * s * h
    tflops, t, latency, each_way = 150.0, 4, 5e-6, 300e9  # A100 NVLink: 600 GB/s, 300 each way
    activations = s * h * 2  # b = 1, bf16
    allreduce = 2 * (t - 1) / t * activations / each_way + 2 * (t - 1) * latency
    got = tensor_parallel.activation_allreduce_seconds(model, 1, t, latency, each_way)
    assert got == pytest.approx(allreduce, rel=1e-12)
    train = 3 * forward_flops / (tflops * 1e12)
    selective = tensor_parallel.allreduces_per_layer("selective")
    full = tensor_parallel.allreduces_per_layer("full")
    assert (selective, full) == (4, 6)
    assert tensor_parallel.split_seconds(train, t, selective, allreduce) == pytest.approx(
        train / t + 4 * allreduce)
    assert tensor_parallel.split_seconds(train, 1, selective, allreduce) == train


def test_the_estimate_uses_the_host_link() -> None:
    ctx = seventy_b(None).context
    device = "ib00:cuda0"
    latency, each_way = tp_link(ctx, device)
    assert each_way == 600e9 / 2  # A100 SXM4: 600 GB/s per GPU, half each way
    model = ctx.config.model
    allreduce = tensor_parallel.activation_allreduce_seconds(model, 1, 2, latency, each_way)
    assert _tp_layer_s(ctx, 2, device) == pytest.approx(
        ctx.layer_train_s(device) / 2 + 6 * allreduce)  # llama-70b: full recomputation


@functools.cache
def seventy_b(tp: int | None) -> Decision:
    topology = load_topology(EXAMPLES / "one-ib-fabric" / "topology.yaml")
    return decide(topology, load_model("llama-70b"),
                  PlanOptions(nccl_net="per-communicator", tensor_parallel=tp))


def test_llama_70b_on_8_gpu_hosts_picks_tp_and_fits_with_fewer_stages() -> None:
    tp1, auto = seventy_b(1).chosen, seventy_b(None).chosen
    assert tp1.layout.tensor_parallel == 1 and auto.layout.tensor_parallel > 1
    assert auto.layout.stages < tp1.layout.stages
    assert auto.tokens_per_s > tp1.tokens_per_s
    usable = 85.9 - GPU_RESERVED_GB
    assert max(auto.memory_gb.values()) <= usable


def test_memory_of_one_stage_by_hand() -> None:
    """Stage 0 of the chosen llama-70b plan, from the plan's own fields and the formulas
    written out here (Korthikanti et al. 2022 activations, Adam bytes, ZeRO-1, TP)."""
    decision = seventy_b(None)
    plan = build_plan(decision)
    stage = plan.stage(0)
    t, dp = stage.tensor_parallel, len(stage.devices) // stage.tensor_parallel
    layers = stage.layers[1] - stage.layers[0]
    h, f, k, V, s, b = 8192, 28672, 1024, 32000, 4096, 1  # llama-70b, microbatch 1
    per_layer = (2 * h * h + 2 * h * k) + 3 * h * f + 2 * h
    params = layers * per_layer + V * h  # stage 0 holds the embedding
    weights_grads_optimizer = params * (2 + 2) / t + params * 12 / t / dp
    stages = len(plan.replicas[0].stages)
    per_lane = plan.model.global_batch // plan.model.microbatch // dp
    in_flight = min(stages, per_lane)
    stored = 2 * s * b * h  # full recomputation keeps each layer's input
    working_set = s * b * (14 * h + 4 * k + 8 * f)  # one layer recomputed at a time
    activations = (in_flight * layers * stored + working_set) / t
    by_hand_gb = (weights_grads_optimizer + activations) / 1e9
    for device in stage.devices:
        assert plan.estimates.memory_gb[device] == pytest.approx(by_hand_gb, abs=0.0006)


def test_plan_keys_groups_and_round_trip() -> None:
    plan = build_plan(seventy_b(None))
    stage = plan.stage(0)
    t = stage.tensor_parallel
    assert t > 1
    tp = [g for g in plan.groups if g.kind == "tp"]
    assert len(tp) == sum(len(s.devices) // s.tensor_parallel for s in plan.stages)
    ranks = plan.rank_of()
    first = tp[0]
    assert first.ranks == [ranks[d] for d in stage.devices[:t]]  # TP innermost
    assert first.ranks == list(range(first.ranks[0], first.ranks[0] + t))
    data = [g for g in plan.groups if g.kind == "data" and g.name.startswith("data-r0-s0-")]
    assert len(data) == t
    assert {d for p in plan.paths for d in p.route} <= {d for s in plan.stages
                                                          for d in s.leaders()}
    again = validate_as(Plan, yaml.safe_load(plan.to_yaml()), "plan.yaml")
    assert again == plan


def edited(plan: Plan, edit) -> dict:  # noqa: ANN001
    data = yaml.safe_load(plan.to_yaml())
    edit(data)
    return data


def _swap_across_hosts(data: dict) -> None:
    devices = data["stages"][0]["devices"]
    devices[1], devices[-1] = devices[-1], devices[1]


def _route_through_rank_1(data: dict) -> None:
    second = data["stages"][1]["devices"][1]
    data["paths"][0]["route"][1] = second


def _tp_group_wrong(data: dict) -> None:
    group = next(g for g in data["groups"] if g["kind"] == "tp")
    group["ranks"] = group["ranks"][:-1]


@pytest.mark.parametrize(("edit", "words"), [
    (lambda d: d["stages"][0].update(tensor_parallel=3), "stages[0].tensor_parallel: 3 does"),
    (_swap_across_hosts, "spans hosts"),
    (_route_through_rank_1, "first device of a TP group"),
    (_tp_group_wrong, "a tp group holds exactly"),
    (lambda d: d["stages"][0].update(tensor_parallel=0), "stages[0].tensor_parallel"),
])
def test_hand_edits_are_refused_naming_the_field(edit, words: str) -> None:  # noqa: ANN001
    plan = build_plan(seventy_b(None))
    with pytest.raises(InputError) as caught:
        validate_as(Plan, edited(plan, edit), "plan.yaml")
    assert words in str(caught.value)


def test_old_plans_load_as_tp_1(tmp_path: Path) -> None:
    plan = build_plan(seventy_b(1))
    data = yaml.safe_load(plan.to_yaml())
    for stage in data["stages"]:
        del stage["tensor_parallel"]
    again = validate_as(Plan, data, "old.yaml")
    assert {s.tensor_parallel for s in again.stages} == {1}
    assert not [g for g in again.groups if g.kind == "tp"]


def test_cli_states_tp_and_launch_refuses_it(tmp_path: Path) -> None:
    topology = tmp_path / "topology.yaml"
    topology.write_bytes((EXAMPLES / "holmes-a100-v100" / "topology.yaml").read_bytes())
    out = tmp_path / "plan.yaml"
    runner = CliRunner()
    done = runner.invoke(cli, ["plan", str(topology), "-m", "llama-7b", "--nccl-net",
                               "per-communicator", "--tensor-parallel", "2", "-o", str(out)])
    assert done.exit_code == 0, done.output
    header = out.read_text().split("version:", 1)[0]
    assert "# Tensor parallel: TP 2 inside hosts" in header
    assert {s.tensor_parallel for s in load_plan(out).stages} == {2}
    shown = runner.invoke(cli, ["show", str(out), "--gantt", str(tmp_path / "g.svg")])
    assert shown.exit_code == 0, shown.output
    assert "TP x DP" in shown.output and "(TP 2)" in (tmp_path / "g.svg").read_text()
    launched = runner.invoke(cli, ["launch", str(out), "--dry-run", "--", "train.py"])
    assert launched.exit_code == 2
    lines = [line for line in launched.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "the runtime does not run tensor parallelism yet" in lines[0]
    forced = runner.invoke(cli, ["plan", str(topology), "-m", "llama-7b", "--nccl-net",
                                 "per-communicator", "--tensor-parallel", "1", "-o",
                                 str(tmp_path / "tp1.yaml")])
    assert forced.exit_code == 0 and "Tensor parallel: none" in forced.output
