"""ZeRO-1 memory, measured against the planner: the tiny GPT on 4 gloo ranks of one stage.

Plans the `tiny-gpt` preset (8 layers x 128, fp32, tied head, AdamW) with `--stages 1` on
4 loopback CPU hosts twice, with `--optimizer-sharding zero1` and `none`, and runs each
plan's 4 ranks as gloo processes (`holmes.runtime.Trainer`, 2 steps on random bytes).
After the steps every rank counts the bytes of every tensor in its optimizer's state.
The table shows, per rank, those bytes without and with sharding and their ratio, and
the planner's figure for the same rank (`holmes.costs.stage_memory(...).optimizer` for
the plan's stage and sharding) with measured / planned; then each plan's
`estimates.memory_gb` for the whole device (weights, gradients, optimizer state and
activations). Nothing is asserted here; tests/test_zero.py holds the claims.

    python bench/memory_zero.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tinygpt import TinyGPT, TinyGPTConfig  # noqa: E402
from bench.workers import free_port, spawn_ranks  # noqa: E402
from holmes import costs  # noqa: E402
from holmes.model import load_model  # noqa: E402
from holmes.plan import Plan, load_plan, save_plan  # noqa: E402
from holmes.plan_build import build_plan, summary  # noqa: E402
from holmes.planner import PlanOptions, decide  # noqa: E402
from holmes.runtime import PlanRun, Trainer  # noqa: E402
from holmes.runtime.zero import optimizer_state_bytes  # noqa: E402
from topology.schema import load_topology  # noqa: E402

MODEL = "tiny-gpt"
RANKS = 4
STEPS = 2


def topology(hosts: int) -> dict[str, Any]:
    """One site of `hosts` loopback CPU hosts."""
    host = [{"name": f"h{i + 1}", "site": "a", "address": "127.0.0.1", "cpu_cores": 2,
             "memory_gb": 8, "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 8,
                                          "tflops": 0.05}],
             "nics": [{"name": "lo", "kind": "ethernet", "virtual": True, "state": "up",
                       "netdev": "lo"}]} for i in range(hosts)]
    links = [{"a": a["name"], "b": b["name"], "latency_ms": 0.2, "bandwidth_gbps": 1.0}
             for i, a in enumerate(host) for b in host[i + 1:]]
    return {"version": 1, "sites": [{"name": "a"}], "hosts": host, "links": links}


def make_plan(folder: Path, sharding: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "topology.yaml").write_text(yaml.safe_dump(topology(RANKS), sort_keys=False))
    topo = load_topology(folder / "topology.yaml")
    decision = decide(topo, load_model(MODEL),
                      PlanOptions(stages=1, optimizer_sharding=sharding))  # type: ignore[arg-type]
    plan = build_plan(decision, topology_file="topology.yaml", model_source=MODEL)
    path = folder / "plan.yaml"
    save_plan(plan, path, summary(decision, plan, "bench"))
    return path


def planned_optimizer_bytes(plan: Plan) -> float:
    """The planner's optimizer state per device of the plan's one stage."""
    stage = plan.stages[0]
    shards = len(stage.devices) if plan.optimizer.sharding == "zero1" else 1
    return costs.stage_memory(
        load_model(MODEL).model, layers=stage.layers[1] - stage.layers[0],
        microbatch=plan.model.microbatch, in_flight=0,
        holds_embedding="embedding" in stage.holds, holds_head="head" in stage.holds,
        optimizer_shards=shards).optimizer


def measure(plan: Path, out: Path) -> list[dict[str, Any]]:
    """Run the plan's ranks; each writes its optimizer state bytes to OUT/rankR.json."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"plan": str(plan), "port": free_port(), "out": str(out)}))
    spawn_ranks(__file__, spec, RANKS, f"memory_zero {plan.parent.name}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)]


def worker_main(spec_path: str, rank: int) -> None:
    """One rank: join the plan as its launch host `rank`, train, count the state."""
    spec = json.loads(Path(spec_path).read_text())
    plan = load_plan(spec["plan"])
    hosts = [h.host for h in sorted(plan.launch, key=lambda h: h.node_rank)]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK=str(rank),
                      WORLD_SIZE=str(len(hosts)), LOCAL_RANK="0", HETSCHED_HOST=hosts[rank])
    torch.set_num_threads(1)
    run = PlanRun.from_env(spec["plan"])
    m = load_model(MODEL).model
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=m.vocab, block_size=m.seq_len, n_layer=m.layers,
                                  n_head=m.heads, n_embd=m.hidden))
    b = run.plan.model.microbatch
    trainer = Trainer(run, model, lambda params: torch.optim.AdamW(params, lr=1e-3),
                      activation_shape=(b, m.seq_len, m.hidden), total_steps=STEPS,
                      log=lambda line: None)
    for step in trainer.steps():
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(m.vocab, (b, m.seq_len + 1), generator=g)
        trainer.step(step, {mb: (tokens[:, :-1], tokens[:, 1:])
                            for mb in trainer.microbatches()})
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps({
        "state_bytes": optimizer_state_bytes(trainer.optimizer),
        "params": sum(p.numel() for p in trainer.params),
        "owned_params": sum(p.numel() for p in trainer.params if id(p) in held)}))
    run.exit()


def table(plans: dict[str, Plan], measured: dict[str, list[dict[str, Any]]]) -> str:
    planned = {name: planned_optimizer_bytes(plan) for name, plan in plans.items()}
    lines = ["| rank | params held | owned | measured none | measured zero1 | zero1 / none "
             "| planner none | planner zero1 | measured / planner (none, zero1) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in range(RANKS):
        none, zero = measured["none"][r], measured["zero1"][r]
        lines.append(
            f"| {r} | {zero['params']:,} | {zero['owned_params']:,} | {none['state_bytes']:,} "
            f"| {zero['state_bytes']:,} | {zero['state_bytes'] / none['state_bytes']:.4f} "
            f"| {planned['none']:,.0f} | {planned['zero1']:,.0f} "
            f"| {none['state_bytes'] / planned['none']:.4f}, "
            f"{zero['state_bytes'] / planned['zero1']:.4f} |")
    total = {name: sum(r["state_bytes"] for r in ranks) for name, ranks in measured.items()}
    lines.append(f"| all | | | {total['none']:,} | {total['zero1']:,} "
                 f"| {total['zero1'] / total['none']:.4f} | {RANKS * planned['none']:,.0f} "
                 f"| {RANKS * planned['zero1']:,.0f} | |")
    device = {name: max(plan.estimates.memory_gb.values()) for name, plan in plans.items()}
    lines.append("")
    lines.append(f"plan estimates.memory_gb per device (weights + gradients + optimizer + "
                 f"activations): none {device['none']:.4f} GB, zero1 {device['zero1']:.4f} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    p.add_argument("--worker-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_spec is not None:
        worker_main(args.worker_spec, args.worker_rank)
        return 0
    with tempfile.TemporaryDirectory(prefix="memory_zero-") as work:
        paths = {name: make_plan(Path(work) / name, name) for name in ("none", "zero1")}
        plans = {name: load_plan(path) for name, path in paths.items()}
        widths = {name: [len(s.devices) for s in plan.stages] for name, plan in plans.items()}
        if any(w != [RANKS] for w in widths.values()):
            raise SystemExit(f"memory_zero: expected one stage of {RANKS} devices, got {widths}")
        measured = {name: measure(path, Path(work) / f"out-{name}")
                    for name, path in paths.items()}
    print(f"{MODEL}: optimizer state bytes per rank, {RANKS} gloo ranks in one stage, "
          f"AdamW after {STEPS} steps")
    print(table(plans, measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
