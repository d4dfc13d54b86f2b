"""One rank of a Trainer under a plan, started without torchrun (run by tests/test_zero.py).

    python tests/trainer_worker.py SPEC.json RANK

SPEC names the plan, the loopback port, the output directory and the run: the tiny GPT's
config and seed, the optimizer (`adamw` or `sgd`) and lr, the steps, optional checkpoint
and resume folders, `log_every` and `stop_after` (leave after that many steps without
`finish`, as a crash would). Rank R plays the plan's launch host R (`HETSCHED_HOST`),
joins with torch.distributed's env:// rendezvous, trains with `holmes.runtime.Trainer`,
appends the trainer's log lines to OUT/rank{R}.log and saves to OUT/rank{R}.pt its
parameters, its optimizer's state bytes and parameter names, its placement, the losses
it logged and the bytes its DiLoCo sent per kind of call (or a traceback to
OUT/rank{R}.err). Real gloo over 127.0.0.1, no mocks. The helpers here are shared with
the tests' single-process references.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tinygpt import TinyGPT, TinyGPTConfig  # noqa: E402
from holmes.plan import load_plan  # noqa: E402
from holmes.runtime import PlanRun, Trainer, exit_job  # noqa: E402
from holmes.runtime.zero import optimizer_state_bytes  # noqa: E402


def make_model(run: dict[str, Any]) -> TinyGPT:
    """The tiny GPT, its weights perturbed so that no gradient is close to zero."""
    torch.manual_seed(run["seed"])
    model = TinyGPT(TinyGPTConfig(**run["model"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def make_optimizer(run: dict[str, Any], params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if run["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=run["lr"])
    return torch.optim.AdamW(params, lr=run["lr"], weight_decay=0.1)


def make_batch(run: dict[str, Any], step: int, mb: int,
               microbatch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(run["seed"] * 1009 + step * 101 + mb)
    tokens = torch.randint(256, (microbatch, run["model"]["block_size"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def lr_at(run: dict[str, Any], step: int) -> float:
    """A schedule the script sets through `trainer.optimizer.param_groups`."""
    return run["lr"] * (1.0 - 0.1 * step / max(1, run["steps"]))


def train_rank(run: dict[str, Any], plan_path: str, log_path: Path) -> dict[str, Any]:
    plan_run = PlanRun.from_env(plan_path)
    microbatch = plan_run.plan.model.microbatch

    def log(line: str) -> None:
        with log_path.open("a") as handle:
            handle.write(line + "\n")

    trainer = Trainer(
        plan_run, make_model(run), lambda params: make_optimizer(run, params),
        activation_shape=(microbatch, run["model"]["block_size"], run["model"]["n_embd"]),
        total_steps=run["steps"], checkpoint_dir=run.get("checkpoint_dir"),
        checkpoint_every=run.get("checkpoint_every", 50), resume_from=run.get("resume_from"),
        log_every=run.get("log_every", 10), log=log)
    losses = {}
    for done, step in enumerate(trainer.steps(), start=1):
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr_at(run, step) if run.get("schedule") else run["lr"]
        logged = trainer.step(step, {mb: make_batch(run, step, mb, microbatch)
                                     for mb in trainer.microbatches()})
        if logged is not None:
            losses[logged.step] = logged.loss
        if done == run.get("stop_after"):
            break
    else:
        trainer.finish()
    placement = plan_run.placement
    return {"params": {n: p.detach().clone() for n, p in trainer.pipeline.named_parameters()},
            "state_bytes": optimizer_state_bytes(trainer.optimizer),
            "numel": {n: p.numel() for n, p in trainer.pipeline.named_parameters()},
            "owned_names": [n for n, p in trainer.pipeline.named_parameters()
                            if any(p is q for g in trainer.optimizer.param_groups
                                   for q in g["params"])],
            "replica": placement.replica, "lane": placement.lane,
            "start_step": trainer.start_step, "bytes": dict(trainer.bytes), "losses": losses,
            "diloco_sent": _diloco_sent(trainer)}


def _diloco_sent(trainer: Trainer) -> dict[str, int]:
    """Bytes this rank's DiLoCo handed to torch.distributed, per record kind."""
    if trainer.diloco is None:
        return {}
    ledger = trainer.diloco.ledger
    return {kind: ledger.summary(kind).sent for kind in ("sync", "broadcast", "site")}


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, out = int(sys.argv[2]), Path(spec["out"])
    try:
        result = train_rank(spec["run"], spec["plan"], out / f"rank{rank}.log")
        torch.save(result, out / f"rank{rank}.pt")
    except Exception:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    exit_job()  # without the interpreter's exit, where gloo's threads may abort it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan: Path, run: dict[str, Any], out: Path, timeout_s: float = 180.0) -> list[dict]:
    """Run one rank per plan device; return each rank's results (raise if one failed)."""
    out.mkdir(parents=True, exist_ok=True)
    hosts = [h.host for h in sorted(load_plan(plan).launch, key=lambda h: h.node_rank)
             for _ in h.devices]
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps({"plan": str(plan), "out": str(out), "run": run}))
    port = free_port()
    procs = []
    for rank, host in enumerate(hosts):
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(len(hosts)), LOCAL_RANK="0", HETSCHED_HOST=host,
                   HETSCHED_PLAN=str(plan))
        procs.append(subprocess.Popen([sys.executable, __file__, str(spec_path), str(rank)],
                                      env=env))
    deadline = time.monotonic() + timeout_s
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = [out / f"rank{r}.err" for r in range(len(hosts)) if (out / f"rank{r}.err").exists()]
    if any(codes) or errors:
        raise RuntimeError(f"ranks exited with {codes}\n"
                           + "\n".join(path.read_text() for path in errors))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(len(hosts))]


if __name__ == "__main__":
    main()
