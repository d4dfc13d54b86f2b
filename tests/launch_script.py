"""A tiny training script for tests/test_launch.py, run by torchrun under `hetsched launch`.

    launch_script.py [--steps N] [--sleep S] [--out DIR] [--fail-host H --fail-step I]
                     [--first-sleep S] [--stall-rank R --stall-at N]
                     [--exit-rank R --exit-code C]
                     [ANY OTHER ARGS...]

Joins the gloo world torchrun set up, then for each step all-reduces a tensor, takes a
step of SGD on a one-parameter model and prints `step I loss L`; it ends as plan scripts
do (`holmes.runtime.exit_job`). With --out it writes OUT/rank{RANK}.json: its argv
(verbatim), rank, world size, pid and HETSCHED_* environment, so the test can check what
arrived. --sleep S waits S seconds per step, so the test can kill a host mid-run;
--fail-host H makes the rank on host H (HETSCHED_HOST) exit with status 3 right after it
printed step --fail-step; every other rank then idles without collectives (up to
IDLE_S), so the failure is H's alone and only the launcher can stop the others.
Under `hetsched launch` it heartbeats (`holmes.heartbeat`) and reports each step.
--first-sleep S makes the first step S seconds longer (a slow start-up); --stall-rank R
--stall-at N makes rank R stop reporting steps after step N while its heartbeat goes on
(stuck, not frozen); --exit-rank R --exit-code C makes rank R exit with C after step 0.
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

from holmes.heartbeat import Heartbeat
from holmes.runtime import exit_job

IDLE_S = 600.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fail-host")
    parser.add_argument("--fail-step", type=int, default=0)
    parser.add_argument("--first-sleep", type=float, default=0.0)
    parser.add_argument("--stall-rank", type=int, default=-1)
    parser.add_argument("--stall-at", type=int, default=-1)
    parser.add_argument("--exit-rank", type=int, default=-1)
    parser.add_argument("--exit-code", type=int, default=0)
    options, _ = parser.parse_known_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    env = {k: v for k, v in os.environ.items() if k.startswith(("HETSCHED_", "GLOO_", "NCCL_"))}
    print(f"rank {rank} world {world} host {env.get('HETSCHED_HOST')}", flush=True)
    if options.out is not None:
        record = {"argv": sys.argv[1:], "rank": rank, "world": world, "pid": os.getpid(),
                  "env": env}
        (options.out / f"rank{rank}.json").write_text(json.dumps(record))
    heartbeat = Heartbeat.from_env(rank)
    train(options, rank, heartbeat)
    if heartbeat is not None:
        heartbeat.close()
    exit_job()  # together, and without gloo's abort at interpreter exit (holmes.runtime)


def train(options: argparse.Namespace, rank: int, heartbeat: Heartbeat | None) -> None:
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for step in range(options.steps):
        if step == 0:
            time.sleep(options.first_sleep)
        loss = ((weight - 1.0) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        dist.all_reduce(weight.grad)
        weight.grad /= dist.get_world_size()
        optimizer.step()
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)
        if rank == options.exit_rank:
            os._exit(options.exit_code)
        while rank == options.stall_rank and step == options.stall_at:
            time.sleep(1)  # stuck: the heartbeat thread goes on, the step does not move
        if heartbeat is not None:
            heartbeat.progress(step + 1)
        if options.fail_host is not None and step == options.fail_step:
            fail_or_idle(rank, step, options.fail_host == os.environ.get("HETSCHED_HOST"))
        time.sleep(options.sleep)


def fail_or_idle(rank: int, step: int, fail: bool) -> None:
    """The failing host's rank exits 3; every other rank idles without collectives."""
    if fail:
        print(f"rank {rank} fails on purpose at step {step}", flush=True)
        os._exit(3)
    print(f"rank {rank} idles until stopped", flush=True)
    time.sleep(IDLE_S)


if __name__ == "__main__":
    main()
