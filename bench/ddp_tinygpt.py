"""The baseline of bench/e2e_lab.py: examples/train_tinygpt.py's model and data under plain DDP.

    torchrun ... bench/ddp_tinygpt.py --steps 200 --global-batch 16 --microbatch 4 \
        --metrics ddp.json

Same model (`TinyGPT` from examples/train_tinygpt.py), same text, same learning-rate
schedule and the same samples per step as a hetsched run with the same global batch and
microbatch: the step's microbatches 0..M-1 are drawn exactly as there, and rank r of
the W ranks trains on microbatches r, r + W, ... concatenated; gradients are averaged by
`DistributedDataParallel` (gloo) every step. Rank 0 writes the loss curve, the loop's
seconds and the eval loss as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from train_tinygpt import TinyGPT, batch, eval_loss, stdlib_text  # noqa: E402

from holmes.runtime import exit_job  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--microbatch", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--metrics", help="rank 0 writes its figures here (JSON)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    model = TinyGPT(args.layers, args.width, args.heads, args.seq_len)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train, held_out = stdlib_text(args.corpus_bytes)
    mine = list(range(rank, args.global_batch // args.microbatch, world))
    curve, window, start = [], [], time.perf_counter()
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / args.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * (0.1 + 0.9 * decay)
        parts = [batch(train, step, mb, args.microbatch, args.seq_len, args.seed) for mb in mine]
        idx, targets = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
        loss = ddp(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            total = torch.tensor([sum(window) / len(window)])
            dist.all_reduce(total)
            curve.append({"step": step + 1, "loss": float(total) / world})
            window = []
            if rank == 0:
                print(f"step {step + 1:5d}  loss {curve[-1]['loss']:.4f}", flush=True)
    train_s = time.perf_counter() - start
    if rank == 0:
        loss = eval_loss(model, held_out, args.seq_len)
        print(f"eval loss {loss:.4f} after {args.steps} steps, {train_s:.1f} s", flush=True)
        if args.metrics:
            Path(args.metrics).write_text(json.dumps(
                {"eval_loss": loss, "train_s": train_s, "steps": args.steps, "curve": curve},
                indent=2))
    exit_job()  # without the interpreter's exit, where gloo's threads may abort it


if __name__ == "__main__":
    main()
