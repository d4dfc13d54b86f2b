"""ZeRO-1 in the trainer, and replicas weighted by their microbatches, on real gloo ranks.

Plans come from the planner (`hetsched plan`'s own functions) on loopback topologies; each
rank is a process running tests/trainer_worker.py, which trains the tiny GPT with
`holmes.runtime.Trainer`. Claims checked: with `optimizer: {sharding: zero1}` each of the
2 or 4 devices of a stage holds 1/n of the optimizer state (within one parameter's
worth) and trains the same parameters as the unsharded run, bit for bit; a resume from a sharded
checkpoint is bit-exact; replicas of 3 and 1 microbatches (all-reduce or DiLoCo, with and
without ZeRO-1) step with the gradient of one process on all 4.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from trainer_worker import launch, make_batch, make_model

from holmes import costs
from holmes.model import load_model
from holmes.plan import OptimizerSettings, Plan, load_plan, save_plan
from holmes.plan_build import build_plan, summary
from holmes.planner import PlanOptions, decide
from holmes.review import estimate_plan
from holmes.runtime.zero import optimizer_state_bytes, partition, restrict
from topology.schema import load_topology

MODEL_YAML = """\
version: 1
model: {name: zero-gpt, arch: gpt, layers: 2, hidden: 32, heads: 2, ffn: 128, vocab: 256,
        seq_len: 16, dtype: fp32, tie_embeddings: true}
training: {global_batch: 8, microbatch: 2, steps: 10, recompute: none}
"""
RUN = {"model": {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}, "seed": 5,
       "optimizer": "adamw", "lr": 1e-2, "steps": 3, "schedule": True}


def topology(sites: dict[str, tuple[int, float]]) -> dict[str, Any]:
    """Sites of `hosts` loopback CPU hosts each, every device `tflops` fast."""
    hosts = [{"name": f"{site}{i + 1}", "site": site, "address": "127.0.0.1", "cpu_cores": 2,
              "memory_gb": 8, "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 8,
                                           "tflops": tflops}],
              "nics": [{"name": "lo", "kind": "ethernet", "virtual": True, "state": "up",
                        "netdev": "lo"}]}
             for site, (count, tflops) in sites.items() for i in range(count)]
    links = [{"a": a["name"], "b": b["name"], "latency_ms": 0.2,
              "bandwidth_gbps": 1.0 if a["site"] == b["site"] else 5.0}
             for i, a in enumerate(hosts) for b in hosts[i + 1:]]
    return {"version": 1, "sites": [{"name": s} for s in sites], "hosts": hosts, "links": links}


def make_plan(folder: Path, sites: dict[str, tuple[int, float]], global_batch: int = 8,
              **options: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "topology.yaml").write_text(yaml.safe_dump(topology(sites), sort_keys=False))
    (folder / "model.yaml").write_text(MODEL_YAML.replace("global_batch: 8",
                                                           f"global_batch: {global_batch}"))
    topo = load_topology(folder / "topology.yaml")
    decision = decide(topo, load_model(str(folder / "model.yaml")),
                      PlanOptions(stages=1, **options))
    plan = build_plan(decision, topology_file="topology.yaml")
    path = folder / "plan.yaml"
    save_plan(plan, path, summary(decision, plan, "test"))
    return path


def origins_per_replica(plan: Plan) -> list[int]:
    replica_of = {d: stage.replica for stage in plan.stages for d in stage.devices}
    return [sum(replica_of[p.origin] == r.id for p in plan.paths) for r in plan.replicas]


def assert_params_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                        tolerance: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name, value in got.items():
        diff = (value - want[name]).abs().max().item()
        assert diff <= tolerance, f"{name}: max |diff| {diff:.2e}"


# ---------------------------------------------------------------- in one process


def test_partition_keeps_every_shard_within_one_parameter_of_the_mean() -> None:
    numels = [4096, 64, 64, 16384, 12288, 192, 4096, 64, 16384, 1024, 32, 32, 8192, 64]
    for shards in (1, 2, 3, 4, 8):
        layout = partition(numels, shards)
        assert layout == partition(numels, shards)  # the same on every rank
        loads = [layout.shard_numel(s) for s in range(shards)]
        assert sum(loads) == sum(numels)
        assert max(abs(load - sum(numels) / shards) for load in loads) <= max(numels)
    assert partition([5, 3], 4).owned(3) == []  # more shards than parameters: some idle


def test_restrict_keeps_every_group_and_its_settings() -> None:
    a, b, c = (torch.nn.Parameter(torch.ones(n)) for n in (3, 4, 5))
    optimizer = torch.optim.AdamW([{"params": [a, b]}, {"params": [c], "weight_decay": 0.0}],
                                  lr=0.1, weight_decay=0.5)
    restrict(optimizer, [b])
    assert [g["params"] for g in optimizer.param_groups] == [[b], []]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    b.grad = torch.ones(4)
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == 2 * 4 * 4 + 4  # exp_avg, exp_avg_sq, step


# ---------------------------------------------------------------- ZeRO-1 on gloo ranks


@pytest.mark.parametrize("dp", [2, 4])
def test_zero1_holds_1_over_dp_of_the_state_and_trains_like_unsharded(tmp_path: Path,
                                                                      dp: int) -> None:
    sites = {"a": (dp, 0.05)}
    sharded = make_plan(tmp_path / "zero1", sites, optimizer_sharding="zero1")
    plain = make_plan(tmp_path / "none", sites, optimizer_sharding="none")
    assert load_plan(sharded).optimizer.sharding == "zero1"
    assert load_plan(plain).optimizer.sharding == "none"
    assert [len(s.devices) for s in load_plan(sharded).stages] == [dp]
    with_zero = launch(sharded, RUN, tmp_path / "out-zero1")
    without = launch(plain, RUN, tmp_path / "out-none")

    total = without[0]["state_bytes"]
    assert total > 0 and all(r["state_bytes"] == total for r in without)
    one_param = 2 * 4 * max(with_zero[0]["numel"].values()) + 4  # Adam's m, v and step
    assert sum(r["state_bytes"] for r in with_zero) == total  # every state held once
    for rank in with_zero:
        assert abs(rank["state_bytes"] - total / dp) <= one_param
    owned = [name for rank in with_zero for name in rank["owned_names"]]
    assert sorted(owned) == sorted(with_zero[0]["params"])  # each parameter one owner
    for rank in with_zero:  # equal, not only within 1e-6: both sum in the same order
        assert rank["params"].keys() == without[0]["params"].keys()
        for name, value in rank["params"].items():
            assert torch.equal(value, without[0]["params"][name]), name


def test_zero1_resume_from_sharded_checkpoints_is_bit_exact(tmp_path: Path) -> None:
    # 6 steps straight, checkpointing every 3; then the step-6 checkpoint is removed and
    # a restart resumes from step 3 (as after a crash there) and runs steps 4 to 6
    plan = make_plan(tmp_path / "plan", {"a": (2, 0.05)}, optimizer_sharding="zero1")
    folder = tmp_path / "ckpt"
    run = dict(RUN, steps=6, checkpoint_every=3, checkpoint_dir=str(folder))
    straight = launch(plan, run, tmp_path / "straight")
    shards = [torch.load(folder / "step-00000003" / f"rank-{r}.pt",
                         weights_only=False)["optimizer_shard"] for r in range(2)]
    assert sorted(s["shard"] for s in shards) == [0, 1] and shards[0]["shards"] == 2
    shutil.rmtree(folder / "step-00000006")
    resumed = launch(plan, run, tmp_path / "resumed")
    assert [r["start_step"] for r in resumed] == [3, 3]
    for again, whole in zip(resumed, straight, strict=True):
        assert again["params"].keys() == whole["params"].keys()
        for name, value in again["params"].items():
            assert torch.equal(value, whole["params"][name]), name
    unsharded = make_plan(tmp_path / "none", {"a": (2, 0.05)}, optimizer_sharding="none")
    with pytest.raises(RuntimeError, match="holds optimizer state .*'zero1'.* this run needs"):
        launch(unsharded, run, tmp_path / "refused")  # another sharding: refused, not mixed


# ---------------------------------------------------------------- weighted replicas


def reference_step(run: dict[str, Any], microbatches: int, microbatch: int) -> dict:
    """One SGD step (lr 1) of one process on every microbatch: parameters minus the
    gradient of the mean loss over the global batch."""
    model = make_model(run)
    for mb in range(microbatches):
        _, loss = model(*make_batch(run, 0, mb, microbatch))
        (loss / microbatches).backward()
    return {n: (p - p.grad).detach() for n, p in model.named_parameters()}


# (sites: hosts and TFLOPS, plan options, global batch, microbatches the planner gives
# each replica); the devices are slow enough that the planner uses both sites
WEIGHTED = {
    "allreduce, one device per replica": (
        {"a": (1, 0.003), "b": (1, 0.001)}, {"sync": "allreduce"}, 8, [3, 1]),
    "allreduce, ZeRO-1 on 2 + 2 devices": (
        {"a": (2, 0.003), "b": (2, 0.001)}, {"sync": "allreduce"}, 16, [6, 2]),
    "allreduce, ZeRO-1 on 2 + 1 devices": (
        {"a": (2, 0.002), "b": (1, 0.001)}, {"sync": "allreduce"}, 24, [10, 2]),
    "diloco, one plain exchange per step": (
        {"a": (1, 0.003), "b": (1, 0.001)}, {"sync": "diloco"}, 8, [3, 1]),
}


@pytest.mark.parametrize("case", list(WEIGHTED))
def test_unequal_replicas_step_with_the_global_batch_gradient(tmp_path: Path,
                                                               case: str) -> None:
    sites, options, global_batch, shares = WEIGHTED[case]
    path = make_plan(tmp_path / "plan", sites, global_batch, **options)
    plan = load_plan(path)
    if plan.diloco is not None:  # one exchange per step, applied as is: plain averaging
        plan = plan.model_copy(update={"diloco": plan.diloco.model_copy(update={
            "sync_every": 1, "fragments": 1, "overlap_steps": 0, "alpha": 0.0,
            "quantization": "none", "outer_lr": 1.0, "outer_momentum": 0.0})})
        save_plan(plan, path, ["diloco: one plain exchange per step"])
    assert plan.optimizer.sharding == "zero1"
    assert origins_per_replica(plan) == shares
    run = dict(RUN, optimizer="sgd", lr=1.0, steps=1, schedule=False)
    ranks = launch(path, run, tmp_path / "out")
    want = reference_step(run, sum(shares), plan.model.microbatch)
    for rank in ranks:
        assert_params_close(rank["params"], want)


# ---------------------------------------------------------------- the plan says it


def test_plan_states_its_optimizer_sharding_and_old_plans_load_as_none(tmp_path: Path) -> None:
    sites = {"a": (4, 0.05)}
    sharded = make_plan(tmp_path / "zero1", sites)  # the default
    plain = make_plan(tmp_path / "none", sites, optimizer_sharding="none")
    assert yaml.safe_load(sharded.read_text())["optimizer"] == {"sharding": "zero1"}
    assert yaml.safe_load(plain.read_text())["optimizer"] == {"sharding": "none"}
    assert "# Optimizer state: ZeRO-1, split over each stage's data-parallel devices (4 per " \
        "stage)" in sharded.read_text()
    assert "# Optimizer state: not sharded, whole on every device" in plain.read_text()
    old = yaml.safe_load(sharded.read_text())
    del old["optimizer"]  # as written before the key existed
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert load_plan(tmp_path / "old.yaml").optimizer.sharding == "none"


def test_memory_without_sharding_adds_the_rest_of_the_optimizer_state() -> None:
    example = Path(__file__).parent.parent / "examples" / "holmes-ib-roce" / "topology.yaml"
    topo, config = load_topology(example), load_model("gpt-1.3b")
    sharded = build_plan(decide(topo, config, PlanOptions()))
    plain = sharded.model_copy(update={"optimizer": OptimizerSettings(sharding="none")})
    with_zero = estimate_plan(sharded, topo, config).memory_gb
    without = estimate_plan(plain, topo, config).memory_gb
    assert with_zero == sharded.estimates.memory_gb  # the plan's figures are ZeRO-1's
    model = config.model
    checked = 0
    for replica in sharded.replicas:
        for index, stage_id in enumerate(replica.stages):
            stage = sharded.stage(stage_id)
            width = min(len(sharded.stage(r.stages[index]).devices) for r in sharded.replicas)
            state = {shards: costs.stage_memory(
                model, layers=stage.layers[1] - stage.layers[0], microbatch=1, in_flight=0,
                holds_embedding="embedding" in stage.holds, holds_head="head" in stage.holds,
                optimizer_shards=shards).optimizer for shards in (1, width)}
            for device in stage.devices:
                extra = (state[1] - state[width]) / costs.GB
                assert without[device] - with_zero[device] == pytest.approx(extra, abs=2e-3)
                checked += width > 1
    assert checked > 0  # some stage is data parallel, so sharding changed something
