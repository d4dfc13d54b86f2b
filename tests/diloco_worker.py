"""One replica of a multi-process DiLoCo test (run by tests/test_diloco_*.py, not collected).

    python tests/diloco_worker.py SPEC.json RANK

SPEC holds the world size, a loopback port, the output directory and a list of tasks:
"average" (check `average_across_replicas` against an exact mean, per codec), "weighted"
(one plain exchange of replicas that moved by rank + 1, each with its `weights` entry;
reports how far the new global parameters are from the weighted mean) and "train"
(a toy model under `DiLoCo`, recording hashes of the global and local parameters after
each merge, optionally saving or resuming a checkpoint, optionally killing or hanging one
replica). Results go to OUT/rank{RANK}.json. Real gloo over 127.0.0.1, no mocks.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diloco import (  # noqa: E402
    DiLoCo,
    DiLoCoConfig,
    ReplicaFailure,
    average_across_replicas,
    load_checkpoint,
    make_codec,
    replica_checkpoint_path,
    save_checkpoint,
)
from diloco.accounting import CountingComm, SyncRecord  # noqa: E402
from holmes.runtime import exit_job  # noqa: E402


class ToyNet(nn.Module):
    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.out(h)


def toy_batch(step: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 7919 + rank * 104729 + step)
    x = torch.randn(16, 8, generator=g)
    return x, torch.sin(x.sum(dim=1, keepdim=True) + rank)


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(bytes(t.detach().contiguous().view(-1).view(torch.uint8).tolist()))
    return h.hexdigest()[:16]


def run_average(spec: dict, rank: int, world: int) -> dict:
    comm = CountingComm()
    g = torch.Generator().manual_seed(99 + rank)
    n = spec.get("numel", 1000)  # deliberately not a multiple of world * block
    values = torch.randn(n, generator=g) * torch.logspace(-6, 0, n)
    everyone = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(everyone, values)
    exact = torch.stack(everyone).mean(dim=0)
    out = {}
    for name in ("fp4", "int8", "bf16", None):
        record = SyncRecord(kind="test", fragment=0, step=0)
        mean = average_across_replicas(values, make_codec(name), comm, record)
        out[str(name)] = {
            "max_abs_error": float((mean - exact).abs().max()),
            "max_abs_value": float(torch.stack(everyone).abs().max()),
            "digest": digest([mean]),
            "sent": record.sent,
            "received": record.received,
        }
    return out


def run_weighted(spec: dict, rank: int) -> dict:
    model = ToyNet()
    diloco = DiLoCo(model, None, sync_every=1, alpha=0.0, outer_lr=1.0, outer_momentum=0.0,
                    quantization=spec.get("quantization"), weight=spec["weights"][rank])
    start = diloco.global_parameters()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(rank + 1.0)
    diloco.step()
    moved = sum(w * (r + 1.0) for r, w in enumerate(spec["weights"]))
    error = max(float((value - start[name] - moved).abs().max())
                for name, value in diloco.global_parameters().items())
    diloco.close()
    return {"max_abs_error": error, "moved": moved}


def run_train(spec: dict, rank: int, world: int, out_dir: Path) -> dict:
    torch.manual_seed(1234 + rank)  # replicas start different; DiLoCo broadcasts rank 0's
    model = ToyNet()
    inner = torch.optim.AdamW(model.parameters(), lr=spec.get("inner_lr", 1e-2))
    config = DiLoCoConfig(**spec["config"])
    diloco = DiLoCo(model, inner, config=config)
    result: dict = {"merges": [], "start_global": digest(list(diloco.global_parameters().values()))}
    result["start_local"] = digest(list(model.parameters()))
    ckpt_dir = Path(spec.get("checkpoint_dir", out_dir))
    if spec.get("resume"):
        state = load_checkpoint(replica_checkpoint_path(ckpt_dir, spec.get("resume_rank", rank)))
        diloco.load_state_dict(state)
        result["resumed_at"] = diloco.inner_steps
    fail = spec.get("fail")
    seed = spec.get("seed", 0)
    while diloco.inner_steps < spec["steps"]:
        step = diloco.inner_steps
        if fail and rank == fail["victim"] and step == fail["at_step"]:
            if fail["mode"] == "die":
                os._exit(17)
            time.sleep(3600)  # hang
        x, y = toy_batch(step, rank, seed)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        inner.step()
        inner.zero_grad()
        started = time.monotonic()
        try:
            merged = diloco.step()
        except ReplicaFailure as failure:
            result["failure"] = {
                "message": str(failure),
                "seconds_in_step": time.monotonic() - started,
                "step": diloco.inner_steps,
            }
            return result
        if merged:
            result["merges"].append(_merge_entry(diloco, merged, rank))
        elif diloco.quiescent:
            result.setdefault("unsynced_local", digest(list(model.parameters())))
        if spec.get("checkpoint_at") == diloco.inner_steps:
            save_checkpoint(diloco.state_dict(), replica_checkpoint_path(ckpt_dir, rank))
    diloco.finish()
    result["final"] = _final_entry(diloco, model, inner)
    summary = diloco.ledger.summary()
    result["ledger"] = {"syncs": summary.syncs, "sent": summary.sent, "received": summary.received}
    result["records"] = [[r.fragment, r.step, r.sent, r.received] for r in diloco.ledger.records()]
    diloco.close()
    return result


def _merge_entry(diloco: DiLoCo, merged: list[int], rank: int) -> dict:
    global_params = diloco.global_parameters()
    fragment_global = {}
    fragment_local = {}
    for index in merged:
        fragment = diloco.fragments[index]
        fragment_global[index] = digest([global_params[n] for n in fragment.names])
        fragment_local[index] = digest([p.float() for p in fragment.params])
    return {
        "step": diloco.inner_steps,
        "fragments": merged,
        "global": digest(list(global_params.values())),
        "fragment_global": fragment_global,
        "fragment_local": fragment_local,
    }


def _final_entry(diloco: DiLoCo, model: nn.Module, inner: torch.optim.Optimizer) -> dict:
    inner_tensors = [
        v
        for state in inner.state_dict()["state"].values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ]
    return {
        "step": diloco.inner_steps,
        "global": digest(list(diloco.global_parameters().values())),
        "local": digest(list(model.state_dict().values())),
        "inner_optimizer": digest(inner_tensors),
        "outer_momentum": digest([b for b in diloco.outer.buffers if b is not None]),
    }


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(sys.argv[2]), spec["world"]
    out_dir = Path(spec["out"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{spec['port']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=spec.get("pg_timeout_s", 60)),
    )
    results: dict = {"rank": rank}
    try:
        for task in spec["tasks"]:
            if task["kind"] == "average":
                results["average"] = run_average(task, rank, world)
            elif task["kind"] == "weighted":
                results[task["name"]] = run_weighted(task, rank)
            else:
                results[task.get("name", "train")] = run_train(task, rank, world, out_dir)
    except Exception:
        results["error"] = traceback.format_exc()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    failed = "error" in results or any(
        "failure" in v for v in results.values() if isinstance(v, dict)
    )
    if not failed:
        exit_job()  # without the interpreter's exit, where gloo's threads may abort it
    # A peer is dead or hung: no barrier to leave together, but still no interpreter exit,
    # whose gloo threads can abort a process that reported its failure (SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def single_process_group(timeout_s: float = 30.0) -> Iterator[None]:
    """A real one-rank gloo default group in this process, for in-process tests."""
    if dist.is_initialized():
        raise RuntimeError("a default process group already exists in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    tasks: list[dict],
    world: int,
    out_dir: Path,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 60.0,
    hung: tuple[int, ...] = (),
) -> tuple[list[dict | None], list[int | None]]:
    """Run `world` worker processes; returns each rank's results (None if it wrote none)
    and exit code (None for the `hung` ranks, killed once the others are done)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "world": world,
        "port": free_port(),
        "out": str(out_dir),
        "tasks": tasks,
        "pg_timeout_s": pg_timeout_s,
    }
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, str(spec_path), str(rank)], env=env)
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = []
    try:
        for rank, proc in enumerate(procs):
            if rank in hung:
                codes.append(None)
                continue
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for rank in range(world):
        path = out_dir / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return results, codes


if __name__ == "__main__":
    main()
