"""hetsched's pipeline runtime against torch.distributed.pipelining, in the same run.

    python bench/pipeline_vs_torch.py                        # tiny GPT, 4 stages, gloo/CPU
    python bench/pipeline_vs_torch.py --model hf:tiny-llama --markdown docs/pipeline.md

Four gloo processes on 127.0.0.1 each hold one stage of the same model (the tiny GPT of
bench/tinygpt.py, or an `hf:` model through holmes.runtime.hf), split into 4 equal block
ranges, and train the same microbatches (forward + backward, gradients zeroed each step,
no optimizer) with three pipelines:

- `hetsched`: `skippipe.runtime.PipelineRuntime` with every route the full pipeline (the
  embedding and the head at stage 0, so the last stage sends its output back there);
- `torch 1F1B` and `torch GPipe`: `torch.distributed.pipelining`'s `Schedule1F1B` and
  `ScheduleGPipe` over `PipelineStage`s of the same blocks (the embedding on stage 0, the
  head and the loss on stage 3; the head's weight is a copy there when the model ties it).

The three run interleaved in the same processes: `--warmup` untimed steps each, then
`--rounds` rounds of one timed step of each method, in alternating order (A B C, C B A,
...), so a machine whose load drifts hurts all of them alike. A step is timed on rank 0
between two barriers. The table gives each method's median tokens/s with its quartiles,
and the median (quartiles) over rounds of its speed relative to the faster torch schedule
(the one with the higher median) in the same round; the machine's load average is
printed with it. The first step's losses of the three must agree (same weights, same
data), so all three compute the same thing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tinygpt import TinyGPT, TinyGPTConfig  # noqa: E402
from bench.workers import free_port, init_gloo, spawn_ranks  # noqa: E402
from holmes.runtime import exit_job  # noqa: E402
from skippipe.runtime import PipelineRuntime, PipelineSchedule  # noqa: E402
from skippipe.simulate import Route  # noqa: E402

STAGES = 4
METHODS = ("hetsched", "torch 1F1B", "torch GPipe")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tinygpt", help="tinygpt, or hf:SOURCE (e.g. "
                   "hf:tiny-llama)")
    p.add_argument("--layers", type=int, default=8, help="tinygpt: blocks (a multiple of 4)")
    p.add_argument("--width", type=int, default=128, help="tinygpt: hidden width")
    p.add_argument("--heads", type=int, default=4, help="tinygpt: attention heads")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--microbatch", type=int, default=4, help="samples per microbatch")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    p.add_argument("--rounds", type=int, default=15,
                   help="timed rounds: one step of each method, order alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="also write the table to this markdown file")
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    p.add_argument("--worker-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the model and its stages ------------------------------------------------------------


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The whole model, the same on every rank and for every method."""
    if spec["model"].startswith("hf:"):
        from holmes.runtime.hf import load_hf_model

        return load_hf_model(spec["model"], seed=spec["seed"])
    torch.manual_seed(spec["seed"])
    return TinyGPT(TinyGPTConfig(vocab_size=256, block_size=spec["seq_len"],
                                 n_layer=spec["layers"], n_head=spec["heads"],
                                 n_embd=spec["width"]))


def final_norm(model: nn.Module) -> nn.Module:
    return model.ln_f if hasattr(model, "ln_f") else model.norm


class TorchStage(nn.Module):
    """Stage `index` of `model` for torch.distributed.pipelining: the embedding first, the
    blocks of its range, and the final norm and head last (returning logits)."""

    def __init__(self, model: nn.Module, index: int, blocks: tuple[int, int]) -> None:
        super().__init__()
        self.index = index
        self._embed = model.embed
        if index == 0:  # the embedding's modules: all but the blocks, final norm and head
            self.inputs = nn.ModuleList(
                child for child in model.children()
                if child is not model.blocks and child is not final_norm(model)
                and child is not model.lm_head)
        self.blocks = nn.ModuleList(model.blocks[blocks[0]:blocks[1]])
        if index == STAGES - 1:
            self.norm, self.head = final_norm(model), copy.deepcopy(model.lm_head)

    def forward(self, x: Tensor) -> Tensor:
        h = self._embed(x) if self.index == 0 else x
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).float() if self.index == STAGES - 1 else h


def block_ranges(layers: int) -> list[tuple[int, int]]:
    size = layers // STAGES
    return [(s * size, (s + 1) * size) for s in range(STAGES)]


def batches(spec: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    tokens = torch.randint(spec["vocab"], (spec["microbatches"], spec["microbatch"],
                                           spec["seq_len"] + 1), generator=g)
    return [(t[:, :-1], t[:, 1:].contiguous()) for t in tokens]


# ---- the three pipelines -----------------------------------------------------------------


def hetsched_step(spec: dict[str, Any], rank: int) -> Callable[[], float | None]:
    model = build_model(spec)
    nodes = [f"s{s}" for s in range(STAGES)]
    schedule = PipelineSchedule(
        stages=[[n] for n in nodes], layers=block_ranges(len(model.blocks)),
        routes=[Route(mb, tuple(nodes)) for mb in range(spec["microbatches"])],
        ranks={n: i for i, n in enumerate(nodes)})
    runtime = PipelineRuntime(model, schedule, rank, activation_shape=(
        spec["microbatch"], spec["seq_len"], spec["hidden"]))
    data = dict(enumerate(batches(spec))) if rank == 0 else {}

    def step() -> float | None:
        for p in runtime.parameters():
            p.grad = None
        losses = runtime.step(data)
        return statistics.fmean(losses.values()) if losses else None

    return step


def torch_step(spec: dict[str, Any], rank: int, kind: str) -> Callable[[], float | None]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    model = build_model(spec)
    module = TorchStage(model, rank, block_ranges(len(model.blocks))[rank])
    stage = PipelineStage(module, rank, STAGES, torch.device("cpu"))
    schedule_type = Schedule1F1B if kind == "torch 1F1B" else ScheduleGPipe
    schedule = schedule_type(stage, spec["microbatches"], loss_fn=lambda logits, y:
                             F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    parts = batches(spec)
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def step() -> float | None:
        for p in module.parameters():
            p.grad = None
        if rank == 0:
            schedule.step(x)
        elif rank == STAGES - 1:
            losses: list[Tensor] = []
            schedule.step(target=y, losses=losses)
            return statistics.fmean(float(v.detach()) for v in losses)
        else:
            schedule.step()
        return None

    return step


def timed(step: Callable[[], float | None]) -> tuple[float, float | None]:
    dist.barrier()
    start = time.perf_counter()
    loss = step()
    dist.barrier()
    return time.perf_counter() - start, loss


def worker_main(spec_path: str, rank: int) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    init_gloo(spec["port"], rank, STAGES)
    steps = {"hetsched": hetsched_step(spec, rank)}
    for kind in METHODS[1:]:
        steps[kind] = torch_step(spec, rank, kind)
    first_loss = {m: _gathered_loss(timed(steps[m])[1]) for m in METHODS}
    for method in METHODS:
        for _ in range(spec["warmup"]):
            timed(steps[method])
    rounds: list[dict[str, float]] = []
    for r in range(spec["rounds"]):
        order = METHODS if r % 2 == 0 else tuple(reversed(METHODS))
        rounds.append({method: timed(steps[method])[0] for method in order})
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"rounds": rounds, "first_loss": first_loss}))
    exit_job()  # without the interpreter's exit, where gloo's threads may abort it


def _gathered_loss(loss: float | None) -> float:
    """The step's mean loss, wherever it was computed (stage 0 or stage 3)."""
    value = torch.tensor([loss if loss is not None else 0.0])
    dist.all_reduce(value)
    return float(value)


# ---- the driver --------------------------------------------------------------------------


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def table(spec: dict[str, Any], result: dict[str, Any], load: tuple[float, float]) -> str:
    tokens = spec["microbatches"] * spec["microbatch"] * spec["seq_len"]
    rounds = result["rounds"]
    speed = {m: [tokens / r[m] for r in rounds] for m in METHODS}
    faster_torch = max(METHODS[1:], key=lambda m: statistics.median(speed[m]))
    lines = ["| method | tokens/s: median (quartiles) | per round vs faster torch: median "
             "(quartiles) |", "|---|---:|---:|"]
    for m in METHODS:
        q1, median, q3 = quartiles(speed[m])
        r1, ratio, r3 = quartiles([r[faster_torch] / r[m] for r in rounds])
        lines.append(f"| {m} | {median:,.0f} ({q1:,.0f} - {q3:,.0f}) | "
                     f"{ratio:.2f}x ({r1:.2f} - {r3:.2f}) |")
    losses = result["first_loss"]
    same = max(losses.values()) - min(losses.values()) < 1e-4
    lines += ["", f"Model {spec['model']} ({spec['layers']} blocks, width {spec['hidden']}), "
              f"{STAGES} stages x 1 process, {spec['microbatches']} microbatches of "
              f"{spec['microbatch']} x {spec['seq_len']} tokens per step; {spec['warmup']} "
              f"warm-up steps per method, then {len(rounds)} rounds of one timed step per "
              f"method (order alternating). The faster torch schedule here: {faster_torch}. "
              "First-step loss: " + ", ".join(f"{m} {v:.5f}" for m, v in losses.items())
              + (" (equal)." if same else " (NOT equal)."),
              f"Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} on "
              f"{os.cpu_count()} CPUs."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_spec:
        worker_main(args.worker_spec, args.worker_rank)
        return 0
    model = build_model({"model": args.model, "seed": args.seed, "seq_len": args.seq_len,
                         "layers": args.layers, "heads": args.heads, "width": args.width})
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", args.width)
    if len(model.blocks) % STAGES:
        raise SystemExit(f"the model has {len(model.blocks)} blocks, not a multiple of {STAGES}")
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        spec = {**vars(args), "port": free_port(), "out": str(Path(tmp) / "result.json"),
                "hidden": hidden, "layers": len(model.blocks),
                "vocab": getattr(config, "vocab_size", 256)}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        before = os.getloadavg()[0]
        spawn_ranks(__file__, spec_path, STAGES, "pipeline bench")
        load = (before, os.getloadavg()[0])
        result = json.loads(Path(spec["out"]).read_text())
    text = table(spec, result, load)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
