"""Worker processes for the training benchmarks: spawn, join, and the shared lr schedule.

The training benchmarks (`diloco_tinygpt`, `diloco_vs_torchft`, `skippipe_convergence`)
run one gloo process per rank on 127.0.0.1. Each writes its spec as JSON, starts its own
script once per rank with `--worker-spec PATH --worker-rank R`, and reads back what the
ranks wrote. This module owns that plumbing so each benchmark file keeps only what it
measures.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(
    script: str, spec_path: Path, world: int, what: str, extra_args: Sequence[str] = ()
) -> None:
    """Run `script` once per rank with the spec at `spec_path`; wait for all of them.

    Exits with a message naming `what` and the exit codes when any rank fails.
    """
    env = dict(
        os.environ,
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore:Failed to initialize NumPy",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, script, *extra_args, "--worker-spec", str(spec_path)]
            + ["--worker-rank", str(rank)],
            env=env,
        )
        for rank in range(world)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{what}: rank exit codes {codes}")


def init_gloo(port: int, rank: int, world: int, timeout_s: int = 300) -> None:
    """Join the gloo group the driver's `free_port()` names."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def cosine_lr(step: int, peak: float, warmup: int, steps: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))
