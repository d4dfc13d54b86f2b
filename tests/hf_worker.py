"""One rank of a multi-process test of Hugging Face models in the pipeline runtime.

    python tests/hf_worker.py SPEC.json RANK

SPEC holds the world size, a loopback port, the output directory and a list of
scenarios, run one after another by every rank: an `hf:` model and seed, the schedule
(stages, layers, routes, ranks), the microbatch shape and the number of iterations. For
each, the rank builds the model with `holmes.runtime.hf.load_hf_model`, runs
`PipelineRuntime.step` (fresh gradients each iteration, the stage's gradients summed),
and records its parameters' names (the adapter's and transformers'), gradients and
losses in OUT/rank{RANK}.pt (or a traceback in OUT/rank{RANK}.err). Real gloo over
127.0.0.1 (used by tests/test_hf.py, which also computes the single-process reference).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skippipe_worker import free_port  # noqa: E402

from holmes.runtime import exit_job  # noqa: E402
from holmes.runtime.hf import HFCausalLM, load_hf_model  # noqa: E402
from skippipe.runtime import PipelineRuntime, PipelineSchedule  # noqa: E402
from skippipe.simulate import Route  # noqa: E402


def make_model(scenario: dict) -> HFCausalLM:
    """The `hf:` model, its weights perturbed so that no gradient is close to zero
    (transformers' init, std 0.02, leaves attention almost uniform)."""
    model = load_hf_model(scenario["model"], seed=scenario["seed"])
    g = torch.Generator().manual_seed(scenario["seed"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_schedule(scenario: dict) -> PipelineSchedule:
    return PipelineSchedule(
        stages=scenario["stages"],
        layers=[tuple(r) for r in scenario["layers"]],
        routes=[Route(mb, tuple(nodes)) for mb, nodes in scenario["routes"]],
        ranks=scenario["ranks"],
    )


def make_batch(scenario: dict, iteration: int, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(scenario["seed"] * 1009 + iteration * 101 + mb)
    tokens = torch.randint(256, (scenario["batch"], scenario["seq"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:].contiguous()


def run_scenario(scenario: dict, rank: int) -> dict:
    model = make_model(scenario)
    hidden = model.config.hidden_size
    runtime = PipelineRuntime(model, make_schedule(scenario), rank,
                              activation_shape=(scenario["batch"], scenario["seq"], hidden))
    hf_names = model.hf_names()
    iterations = []
    for it in range(scenario["iterations"]):
        for p in runtime.parameters():
            p.grad = None
        batches = {mb: make_batch(scenario, it, mb) for mb in runtime.origin_microbatches()}
        losses = runtime.step(batches)
        grads = {hf_names[n]: p.grad.clone() for n, p in runtime.named_parameters()}
        iterations.append({"losses": losses, "grads": grads})
    return {"node": runtime.node, "names": [n for n, _ in runtime.named_parameters()],
            "hf_names": [hf_names[n] for n, _ in runtime.named_parameters()],
            "iterations": iterations}


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, out = int(sys.argv[2]), Path(spec["out"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank,
                            world_size=spec["world"], timeout=datetime.timedelta(seconds=90))
    try:
        results = [run_scenario(s, rank) for s in spec["scenarios"]]
        torch.save(results, out / f"rank{rank}.pt")
    except Exception:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    exit_job()


def launch(scenarios: list[dict], world: int, out: Path, timeout_s: float = 240.0) -> list[list]:
    """Run `world` ranks through `scenarios`; per rank, one result per scenario."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"world": world, "port": free_port(), "out": str(out), "scenarios": scenarios}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    procs = [subprocess.Popen([sys.executable, __file__, str(spec_path), str(r)], env=env)
             for r in range(world)]
    deadline = time.monotonic() + timeout_s
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = [out / f"rank{r}.err" for r in range(world) if (out / f"rank{r}.err").exists()]
    if any(codes) or errors:
        raise RuntimeError(f"ranks exited with {codes}\n"
                           + "\n".join(path.read_text() for path in errors))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


if __name__ == "__main__":
    main()
