"""Train a tiny byte-level GPT under a hetsched plan, on the Python standard library's source.

    hetsched launch plan.yaml -- examples/train_tinygpt.py --steps 300

The model follows skippipe's contract (`embed`, `blocks`, `head_loss`), so any plan runs
it: pipeline stages, skip routes, data parallelism, per-step all-reduce or DiLoCo between
replicas. Sizes come from the plan's `model` section (tiny-gpt: 8 layers, width 128,
sequences of 128 bytes). The text is every `.py` file of the stdlib, so nothing is
downloaded. Rank 0 prints the loss, tokens/s and bytes per link class; with `--metrics`
it writes them as JSON at the end, with the eval loss of the trained model, and every
rank records its timings beside it (`timings/rank{R}.jsonl`, for `hetsched calibrate` and
`hetsched report`; `--no-timings` turns that off, `--timings DIR` puts them elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from holmes.runtime import PlanRun, Trainer
from holmes.runtime.checkpoints import checkpoint_folder
from topology.errors import InputError


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(x), then x + MLP(x)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, width), nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)
        self.head.weight = self.wte.weight  # tied
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def embed(self, idx: Tensor) -> Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))

    def head_loss(self, h: Tensor, targets: Tensor) -> Tensor:
        logits = self.head(self.ln_f(h))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h)
        return self.head_loss(h, targets)


def stdlib_text(max_bytes: int) -> tuple[Tensor, Tensor]:
    """Train and eval bytes: the stdlib's .py files in path order; the last 5% is eval."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = bytearray()
    for path in sorted(root.rglob("*.py")):
        if "site-packages" not in path.parts and len(text) < max_bytes:
            text += path.read_bytes()
    data = torch.frombuffer(text[:max_bytes], dtype=torch.uint8).long()
    cut = int(len(data) * 0.95)
    return data[:cut], data[cut:]


def batch(data: Tensor, step: int, microbatch: int, size: int, seq: int,
          seed: int) -> tuple[Tensor, Tensor]:
    """The same windows for (step, microbatch) on every run, so a restart replays them."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + microbatch)
    starts = torch.randint(len(data) - seq - 1, (size,), generator=g)
    windows = torch.stack([data[s: s + seq + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def eval_loss(model: TinyGPT, data: Tensor, seq: int, windows: int = 64) -> float:
    starts = torch.arange(min(windows, (len(data) - 1) // seq)) * seq
    chunk = torch.stack([data[s: s + seq + 1] for s in starts.tolist()])
    return float(model(chunk[:, :-1], chunk[:, 1:]))


def timings_folder(args: argparse.Namespace) -> Path | None:
    if args.no_timings:
        return None
    if args.timings:
        return Path(args.timings)
    return Path(args.metrics).resolve().parent / "timings" if args.metrics else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--checkpoint-dir", help="where to checkpoint and resume from")
    p.add_argument("--resume-from", help="a checkpoint folder of an earlier run (maybe of "
                   "another plan) to start from when --checkpoint-dir holds none")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--metrics", help="rank 0 writes the loss curve and eval loss here (JSON)")
    p.add_argument("--timings", help="folder for every rank's per-step timings (JSON lines; "
                   "default: timings/ beside --metrics)")
    p.add_argument("--no-timings", action="store_true", help="record no timings")
    args = p.parse_args()
    try:  # before any process group: bad input is one line and exit status 2
        checkpoint_folder(args.checkpoint_dir)
        checkpoint_folder(args.resume_from, must_exist=True)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    torch.set_num_threads(1)
    run = PlanRun.from_env()
    m = run.plan.model
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = TinyGPT(m.layers, m.hidden, args.heads, m.seq_len)
    try:
        trainer = Trainer(
            run, model, lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
            activation_shape=(m.microbatch, m.seq_len, m.hidden), total_steps=args.steps,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
            resume_from=args.resume_from, log_every=args.log_every,
            timings=timings_folder(args))
    except InputError as exc:  # no intact checkpoint: every rank raises it together
        if run.placement.torch_rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        run.exit(2)
    train, held_out = stdlib_text(args.corpus_bytes)
    curve, start = [], time.perf_counter()
    for step in trainer.steps():
        warm = min(1.0, (step + 1) / args.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in trainer.optimizer.param_groups:
            group["lr"] = args.lr * warm * (0.1 + 0.9 * decay)
        batches = {mb: batch(train, step, mb, m.microbatch, m.seq_len, args.seed)
                   for mb in trainer.microbatches()}
        log = trainer.step(step, batches)
        if log is not None:
            curve.append(vars(log))
    trainer.finish()
    train_s = time.perf_counter() - start
    if trainer.gather_model(model):
        loss = eval_loss(model.cpu(), held_out, m.seq_len)
        print(f"eval loss {loss:.4f} after {args.steps} steps", flush=True)
        if args.metrics:
            Path(args.metrics).write_text(json.dumps(
                {"eval_loss": loss, "steps": args.steps, "train_s": train_s, "curve": curve,
                 "resumed_from": trainer.start_step}, indent=2))
    run.exit()  # every rank leaves together, without a gloo abort at interpreter exit


if __name__ == "__main__":
    main()
