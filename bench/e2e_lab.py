"""End to end on the emulated 2 x 2 lab: hetsched's plan vs plain DDP over all four hosts.

    sudo .venv/bin/python bench/e2e_lab.py [--steps 200]

Brings up lab-2x2 (1 Gbit/s inside a site, 50 Mbit/s between the sites) as lab `e2e`,
probes it (each host times a matmul), plans the tiny GPT (the tiny-gpt preset: a global
batch of 16 sequences of 128 bytes in microbatches of 4; `--sync-every 25`), then trains
the same model on the same samples for the same number of steps twice, each started by
`hetsched launch --via lab` (one torchrun per lab host):

- **hetsched**: `examples/train_tinygpt.py` under the plan (the planner's choice; for
  this lab one replica per site with data parallelism inside it and streaming DiLoCo
  between the sites);
- **DDP**: `bench/ddp_tinygpt.py`, PyTorch DistributedDataParallel over all four hosts
  (gloo), every gradient all-reduced every step across the WAN.

tokens/s is the samples' tokens over each run's training-loop seconds (start-up left
out). The bytes that crossed the WAN are read from the kernel: the `wan0` transmit
counters of both site routers before and after each run. Targets (issue #6): tokens/s
>= 5x DDP, final eval loss within 5% of DDP. Exit status 1 if one is missed. The lab is
taken down at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topology.lab import find_lab, lab_down, lab_up, wan_bytes_sent  # noqa: E402
from topology.lab_probe import probe_lab  # noqa: E402
from topology.lab_spec import load_lab_spec  # noqa: E402
from topology.probe import ProbeOptions  # noqa: E402

LAB = "e2e"
SPEEDUP_TARGET = 5.0
LOSS_TOLERANCE = 0.05
MODEL = "tiny-gpt"  # 8 layers, width 128, 16 sequences of 128 bytes per step
SYNC_EVERY = "25"


@dataclass
class RunResult:
    name: str
    train_s: float
    eval_loss: float
    wan_bytes: int
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s


def hetsched(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cli", *args], check=True, cwd=ROOT)


def launch(plan: Path, script: list[str], name: str, metrics: Path, tokens: int) -> RunResult:
    state = find_lab(LAB)
    before = sum(wan_bytes_sent(state).values())
    print(f"\n== {name}: {' '.join(script)}", flush=True)
    hetsched("launch", str(plan), "--via", "lab", "--lab", LAB, "--", *script,
             "--metrics", str(metrics))
    sent = sum(wan_bytes_sent(state).values()) - before
    figures = json.loads(metrics.read_text())
    return RunResult(name, figures["train_s"], figures["eval_loss"], sent, tokens)


def run_both(work: Path, steps: int) -> list[RunResult]:
    topology, plan = work / "topology.yaml", work / "plan.yaml"
    if probe_lab(find_lab(LAB), topology, ProbeOptions(), flops=True) != 0:
        raise SystemExit("the probe could not measure every pair")
    hetsched("plan", str(topology), "-m", MODEL, "--sync-every", SYNC_EVERY, "-o", str(plan))
    tokens = steps * 16 * 128
    common = ["--steps", str(steps), "--log-every", "25"]
    return [
        launch(plan, [str(ROOT / "examples" / "train_tinygpt.py"), *common], "hetsched",
               work / "hetsched.json", tokens),
        launch(plan, [str(ROOT / "bench" / "ddp_tinygpt.py"), *common, "--global-batch", "16",
                      "--microbatch", "4"], "DDP", work / "ddp.json", tokens),
    ]


def report(results: list[RunResult]) -> bool:
    ours, ddp = results
    print("\nrun        train s   tokens/s   eval loss   WAN MB (kernel)")
    for r in results:
        print(f"{r.name:9s} {r.train_s:8.1f} {r.tokens_per_s:10,.0f} {r.eval_loss:11.4f} "
              f"{r.wan_bytes / 1e6:16.2f}")
    speedup = ours.tokens_per_s / ddp.tokens_per_s
    loss_gap = ours.eval_loss / ddp.eval_loss - 1
    wan_ratio = ddp.wan_bytes / max(1, ours.wan_bytes)
    checks = [(f"tokens/s {speedup:.2f}x DDP (target >= {SPEEDUP_TARGET:g}x)",
               speedup >= SPEEDUP_TARGET),
              (f"eval loss {loss_gap:+.2%} vs DDP (target within {LOSS_TOLERANCE:.0%})",
               abs(loss_gap) <= LOSS_TOLERANCE)]
    print(f"\nWAN bytes: DDP sent {wan_ratio:,.0f}x what hetsched sent")
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return all(ok for _, ok in checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    spec = load_lab_spec("lab-2x2").model_copy(update={"name": LAB})
    lab_down(LAB)
    lab_up(spec)
    try:
        with tempfile.TemporaryDirectory(prefix="hetsched-e2e-") as tmp:
            return 0 if report(run_both(Path(tmp), args.steps)) else 1
    finally:
        lab_down(LAB)


if __name__ == "__main__":
    sys.exit(main())
