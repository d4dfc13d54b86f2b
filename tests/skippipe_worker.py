"""One rank of a multi-process skippipe runtime test (run by tests/test_skippipe_runtime.py).

    python tests/skippipe_worker.py SPEC.json RANK

SPEC holds the world size, a loopback port, the output directory and a scenario: the
schedule (stages, layers, routes, ranks, memory limits), the tiny GPT's config and seed,
the microbatch shape and the number of iterations. The rank builds the model, runs
`PipelineRuntime.step` with ``sync="none"`` for each iteration (fresh gradients each
time), records its gradients before and after `sync_gradients`, its losses and its bytes
sent, and saves them to OUT/rank{RANK}.pt (or a traceback to OUT/rank{RANK}.err). Real
gloo over 127.0.0.1, no mocks. The helpers here are shared with the test's reference.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tinygpt import TinyGPT, TinyGPTConfig  # noqa: E402
from holmes.runtime import exit_job  # noqa: E402
from skippipe.runtime import PipelineRuntime, PipelineSchedule  # noqa: E402
from skippipe.simulate import Route  # noqa: E402


def make_model(scenario: dict) -> TinyGPT:
    """The tiny GPT, its weights perturbed so that no gradient is close to zero."""
    torch.manual_seed(scenario["seed"])
    model = TinyGPT(TinyGPTConfig(**scenario["model"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def make_schedule(scenario: dict) -> PipelineSchedule:
    return PipelineSchedule(
        stages=scenario["stages"],
        layers=[tuple(r) for r in scenario["layers"]],
        routes=[Route(mb, tuple(nodes)) for mb, nodes in scenario["routes"]],
        ranks=scenario["ranks"],
        memory_limit=scenario.get("memory_limit"),
    )


def make_batch(scenario: dict, iteration: int, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq = scenario["batch"], scenario["model"]["block_size"]
    g = torch.Generator().manual_seed(scenario["seed"] * 1009 + iteration * 101 + mb)
    tokens = torch.randint(256, (batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def activation_shape(scenario: dict) -> tuple[int, int, int]:
    return scenario["batch"], scenario["model"]["block_size"], scenario["model"]["n_embd"]


def run_rank(scenario: dict, rank: int) -> dict:
    model = make_model(scenario)
    schedule = make_schedule(scenario)
    runtime = PipelineRuntime(
        model, schedule, rank, activation_shape=activation_shape(scenario), sync="none"
    )
    iterations = []
    for it in range(scenario["iterations"]):
        for p in runtime.parameters():
            p.grad = None
        batches = {mb: make_batch(scenario, it, mb) for mb in runtime.origin_microbatches()}
        losses = runtime.step(batches)
        unsynced = {n: p.grad.clone() for n, p in runtime.named_parameters() if p.grad is not None}
        runtime.sync_gradients()
        synced = {n: p.grad.clone() for n, p in runtime.named_parameters()}
        iterations.append({"losses": losses, "unsynced": unsynced, "synced": synced})
    return {
        "node": runtime.node,
        "stage": runtime.stage,
        "names": [n for n, _ in runtime.named_parameters()],
        "iterations": iterations,
        "bytes_sent": runtime.bytes_sent,
    }


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, out = int(sys.argv[2]), Path(spec["out"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{spec['port']}",
        rank=rank,
        world_size=spec["world"],
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(run_rank(spec["scenario"], rank), out / f"rank{rank}.pt")
    except Exception:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    exit_job()  # without the interpreter's exit, where gloo's threads may abort it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: dict, world: int, out: Path, timeout_s: float = 90.0) -> list[dict]:
    """Run `world` ranks of `scenario`; return each rank's results (raise if one failed)."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"world": world, "port": free_port(), "out": str(out), "scenario": scenario}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, str(spec_path), str(r)], env=env)
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout_s
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = [(out / f"rank{r}.err") for r in range(world) if (out / f"rank{r}.err").exists()]
    if any(codes) or errors:
        details = "\n".join(path.read_text() for path in errors)
        raise RuntimeError(f"ranks exited with {codes}\n{details}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


if __name__ == "__main__":
    main()
