"""Tensor parallelism in the planner: where it is chosen, what it gains over TP = 1.

For each data-centre example (`examples/holmes-ib-roce`, `holmes-a100-v100`,
`holmes-three-fabrics`, `one-ib-fabric`) and each model below, the planner
(`holmes.planner.decide`, `--nccl-net per-communicator`) plans twice in this one run:

1. **TP auto**: tensor-parallel degrees 1, 2, 4, 8 that keep TP groups inside hosts are
   candidates beside every layout, and the estimate picks (`holmes/tensor_parallel.py`:
   compute and memory / t, four all-reduces of b*s*h activations per layer and
   microbatch over the host's NVLink, at the vendor's figure for the GPU);
2. **TP 1**: the best plan without tensor parallelism (the baseline: what the planner
   chose before TP existed), or "does not fit" when no TP = 1 layout fits memory.

Printed per row: the chosen shape (stages x TP x data-parallel width, replicas, sync),
tokens/s of each, their ratio, the bubble, the peak memory per device and the pipeline
depth. Models: gpt-1.3b, llama-7b, llama-13b at global batch 128 (Llama 2 13B's shape:
40 x 5120, 40 heads, ffn 13824; the issue's 13B-on-128-A100s case) and llama-70b.

    .venv/bin/python bench/tp_planner.py [--markdown]

Exit status 0 when every row planned and llama-70b (8-GPU hosts everywhere) picks TP > 1
on every example, never with more stages than its best TP = 1 plan, and with fewer on
`one-ib-fabric` (tests/test_tensor_parallel.py checks that case).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from planner_common import load_example, print_table, timed, verdict

from holmes.estimate import Estimate
from holmes.model import ModelConfig, load_model, parse_model
from holmes.planner import PlanOptions, decide
from topology.errors import InputError

EXAMPLES = ["holmes-ib-roce", "holmes-a100-v100", "holmes-three-fabrics", "one-ib-fabric"]
AUTO = PlanOptions(nccl_net="per-communicator")
TP1 = PlanOptions(nccl_net="per-communicator", tensor_parallel=1)


def llama_13b() -> ModelConfig:
    config = load_model("llama-7b").to_plain()
    config["model"].update(name="llama-13b-gb128", layers=40, hidden=5120, heads=40,
                           ffn=13824)
    config["training"]["global_batch"] = 128
    return parse_model(config, "<llama-13b, global batch 128>")


def models() -> list[ModelConfig]:
    return [load_model("gpt-1.3b"), load_model("llama-7b"), llama_13b(),
            load_model("llama-70b")]


@dataclass
class Row:
    example: str
    model: str
    auto: Estimate
    tp1: Estimate | None
    tp1_reason: str | None
    seconds: float

    @property
    def tp(self) -> int:
        return self.auto.layout.tensor_parallel

    @property
    def ratio(self) -> float | None:
        return self.auto.tokens_per_s / self.tp1.tokens_per_s if self.tp1 else None


def shape(est: Estimate) -> str:
    layout = est.layout
    dp = "/".join(str(len(r[0])) for r in layout.replicas)
    text = f"{layout.stages} x TP{layout.tensor_parallel} x DP{dp}"
    if len(layout.replicas) > 1:
        text += f" x{len(layout.replicas)}rep"
    return text + ("" if est.sync == "none" else f" {est.sync}")


def run(example: str, config: ModelConfig) -> Row:
    topology = load_example(example)
    auto, seconds = timed(lambda: decide(topology, config, AUTO))
    try:
        tp1, reason = decide(topology, config, TP1).chosen, None
    except InputError as exc:
        tp1, reason = None, exc.message
    return Row(example, config.model.name, auto.chosen, tp1, reason, seconds)


def cells(row: Row) -> list[str]:
    auto, tp1 = row.auto, row.tp1
    base = (f"{tp1.tokens_per_s:,.0f} ({shape(tp1)}, bubble {tp1.bubble_fraction:.0%}, "
            f"{max(tp1.memory_gb.values()):.1f} GB)") if tp1 else "does not fit"
    ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
    return [row.example, row.model, shape(auto), f"{auto.tokens_per_s:,.0f}",
            f"{auto.bubble_fraction:.0%}", f"{max(auto.memory_gb.values()):.1f}", base, ratio]


HEADERS = ["example", "model", "plan (stages x TP x DP)", "tokens/s", "bubble", "peak GB",
           "best TP=1 plan: tokens/s", "TP auto / TP 1"]


def seventy_b_ok(rows: list[Row]) -> bool:
    """llama-70b picks TP > 1 everywhere, never deeper than TP 1, shallower on one-ib-fabric."""
    checks = [r for r in rows if r.model == "llama-70b"]

    def stages(r: Row) -> tuple[int, float]:
        return r.auto.layout.stages, r.tp1.layout.stages if r.tp1 else float("inf")

    return bool(checks) and all(r.tp > 1 and stages(r)[0] <= stages(r)[1] for r in checks) \
        and all(stages(r)[0] < stages(r)[1] for r in checks if r.example == "one-ib-fabric")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = []
    for example in EXAMPLES:
        for config in models():
            rows.append(run(example, config))
            print(f"  planned {example} / {config.model.name} in {rows[-1].seconds:.1f} s",
                  file=sys.stderr)
    print_table(HEADERS, [cells(r) for r in rows],
                right=[False, False, False, True, True, True, False, True])
    for r in rows:
        if r.tp1 is None:
            print(f"  {r.example} / {r.model}: TP 1 does not fit: {r.tp1_reason}")
    ok = seventy_b_ok(rows)
    print(f"\nllama-70b picks TP > 1, never deeper than TP 1, shallower on one-ib-fabric: "
          f"{verdict(ok)}")
    if args.markdown:
        print("\n| " + " | ".join(HEADERS) + " |")
        print("|" + "---|" * len(HEADERS))
        for r in rows:
            print("| " + " | ".join(cells(r)) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
