"""A tiny training script for tests/test_launch.py, run by torchrun under `hetsched launch`.

    launch_script.py [--steps N] [--sleep S] [--out DIR] [--fail-host H --fail-step I]
                     [ANY OTHER ARGS...]

Joins the gloo world torchrun set up, then for each step all-reduces a tensor, takes a
step of SGD on a one-parameter model and prints `step I loss L`; it ends as plan scripts
do (`holmes.runtime.exit_job`). With --out it writes OUT/rank{RANK}.json: its argv
(verbatim), rank, world size, pid and HETSCHED_* environment, so the test can check what
arrived. --sleep S waits S seconds per step, so the test can kill a host mid-run;
--fail-host H makes the rank on host H (HETSCHED_HOST) exit with status 3 right after it
printed step --fail-step; every other rank then idles without collectives (up to
IDLE_S), so the failure is H's alone and only the launcher can stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from holmes.runtime import exit_job

IDLE_S = 600.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fail-host")
    parser.add_argument("--fail-step", type=int, default=0)
    options, _ = parser.parse_known_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    env = {k: v for k, v in os.environ.items() if k.startswith(("HETSCHED_", "GLOO_", "NCCL_"))}
    print(f"rank {rank} world {world} host {env.get('HETSCHED_HOST')}", flush=True)
    if options.out is not None:
        record = {"argv": sys.argv[1:], "rank": rank, "world": world, "pid": os.getpid(),
                  "env": env}
        (options.out / f"rank{rank}.json").write_text(json.dumps(record))
    failing = options.fail_host is not None and options.fail_host == env.get("HETSCHED_HOST")
    idle_at = options.fail_step if options.fail_host is not None else None
    train(options.steps, options.sleep, rank, idle_at, fail=failing)
    exit_job()  # together, and without gloo's abort at interpreter exit (holmes.runtime)


def train(steps: int, sleep_s: float, rank: int, stop_at: int | None = None, *,
          fail: bool = False) -> None:
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for step in range(steps):
        loss = ((weight - 1.0) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        dist.all_reduce(weight.grad)
        weight.grad /= dist.get_world_size()
        optimizer.step()
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)
        if step == stop_at and fail:
            print(f"rank {rank} fails on purpose at step {step}", flush=True)
            os._exit(3)
        if step == stop_at:
            print(f"rank {rank} idles until stopped", flush=True)
            time.sleep(IDLE_S)
        time.sleep(sleep_s)


if __name__ == "__main__":
    main()
