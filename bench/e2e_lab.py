"""End to end on the emulated 2 x 2 lab: hetsched's plan vs plain DDP over all four hosts.

    sudo flock /tmp/hetsched-lab.lock .venv/bin/python bench/e2e_lab.py [--steps 200]
        [--repeat N]

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

Beside each result it prints the plan it ran (layout, replicas x stages x lanes, sync)
with its estimate, and every candidate the planner weighed with its estimate (the same
`decide` call `hetsched plan` makes). `--repeat N` runs the whole comparison N times,
each on a fresh lab with a fresh probe, reports each, and then the spread of the probe's
compute timing (each host's matmul TFLOPS) over the repeats. The four lab hosts share
one machine's cores, so the spread of their TFLOPS within one probe is the probe's
noise; the plan is made with it as `hetsched plan --noise` (never below the default),
so candidates closer than that are broken by traffic.

tokens/s is the samples' tokens over each run's training-loop seconds (start-up left
out). The bytes that crossed the WAN are read from the kernel: the `wan0` transmit
counters of both site routers before and after each run. Targets (issue #6): tokens/s
>= 5x DDP, final eval loss within 5% of DDP. Exit status 1 if one is missed. The lab is
taken down at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.plan import DEFAULT_OVERLAP_STEPS  # noqa: E402
from holmes.estimate import DilocoChoice  # noqa: E402
from holmes.model import load_model  # noqa: E402
from holmes.plan_build import candidate_words  # noqa: E402
from holmes.planner import ESTIMATE_NOISE, Decision, PlanOptions, decide  # noqa: E402
from topology.lab import find_lab, lab_down, lab_up, wan_bytes_sent  # noqa: E402
from topology.lab_probe import probe_lab  # noqa: E402
from topology.lab_spec import load_lab_spec  # noqa: E402
from topology.probe import ProbeOptions  # noqa: E402
from topology.schema import load_topology  # noqa: E402

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


@dataclass
class Repeat:
    """One fresh-lab comparison: the probe's TFLOPS per host, the planner's decision and
    both runs."""

    tflops: dict[str, float]
    decision: Decision
    results: list[RunResult]


def lab_noise(tflops: dict[str, float]) -> float:
    """The lab's hosts share one machine's cores, so any difference between their probed
    TFLOPS is the probe's noise: (max - min) / mean, at least the planner's default."""
    values = list(tflops.values())
    mean = statistics.fmean(values) if values else 0.0
    spread = (max(values) - min(values)) / mean if mean else 0.0
    return round(min(0.9, max(ESTIMATE_NOISE, spread)), 3)


def plan_lab(work: Path) -> tuple[Path, dict[str, float], Decision]:
    """Probe the lab, write plan.yaml with `hetsched plan --noise` (the probe's own spread
    over the identical lab hosts), and make the same decision in-process to see every
    candidate's estimate."""
    topology, plan = work / "topology.yaml", work / "plan.yaml"
    if probe_lab(find_lab(LAB), topology, ProbeOptions(), flops=True) != 0:
        raise SystemExit("the probe could not measure every pair")
    loaded = load_topology(topology)
    tflops = {h.name: d.tflops or 0.0 for h in loaded.hosts for d in h.devices}
    noise = lab_noise(tflops)
    print(f"probe: matmul TFLOPS {tflops}; spread over the identical hosts -> --noise {noise}")
    hetsched("plan", str(topology), "-m", MODEL, "--sync-every", SYNC_EVERY,
             "--noise", str(noise), "-o", str(plan))
    every = int(SYNC_EVERY)
    decision = decide(loaded, load_model(MODEL), PlanOptions(noise=noise, diloco=DilocoChoice(
        sync_every=every, overlap_steps=min(DEFAULT_OVERLAP_STEPS, every - 1))))
    return plan, tflops, decision


def run_both(work: Path, steps: int) -> Repeat:
    plan, tflops, decision = plan_lab(work)
    print_plan(decision)
    tokens = steps * 16 * 128
    common = ["--steps", str(steps), "--log-every", "25"]
    return Repeat(tflops, decision, [
        launch(plan, [str(ROOT / "examples" / "train_tinygpt.py"), *common], "hetsched",
               work / "hetsched.json", tokens),
        launch(plan, [str(ROOT / "bench" / "ddp_tinygpt.py"), *common, "--global-batch", "16",
                      "--microbatch", "4"], "DDP", work / "ddp.json", tokens),
    ])


def plan_words(decision: Decision) -> str:
    e = decision.chosen
    lanes = sorted({len(stage) for replica in e.layout.replicas for stage in replica})
    return (f"{e.layout.description}: {len(e.layout.replicas)} replica(s) x "
            f"{e.layout.stages} stage(s) x {'/'.join(map(str, lanes))} lane(s), sync {e.sync}; "
            f"estimated {e.step_s:.3f} s/step, {e.tokens_per_s:,.0f} tokens/s")


def print_plan(decision: Decision) -> None:
    print(f"\nplan: {plan_words(decision)}")
    print("candidates (estimate; * chosen, ~ within the tie band):")
    ties = {id(e) for e in decision.ties}
    for e in sorted(decision.candidates, key=lambda e: e.step_s):
        mark = "*" if e is decision.chosen else "~" if id(e) in ties else " "
        wan = e.bytes_per_step.get("inter_site", 0.0) / 1e6
        print(f"  {mark} {candidate_words(e):48s} {e.step_s:7.3f} s/step "
              f"{e.tokens_per_s:8,.0f} tokens/s  {wan:8.3f} MB/step across sites")


def report(repeat: Repeat) -> bool:
    results = repeat.results
    ours, ddp = results
    print(f"\nplan: {plan_words(repeat.decision)}")
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


def probe_spread(repeats: list[Repeat]) -> None:
    """Each host's probed TFLOPS over the repeats, and its spread (max - min) / mean."""
    print("\nprobe compute timing (matmul TFLOPS) per repeat:")
    for host in sorted(repeats[0].tflops):
        values = [r.tflops[host] for r in repeats]
        mean = statistics.fmean(values)
        spread = (max(values) - min(values)) / mean if mean else 0.0
        print(f"  {host}: {', '.join(f'{v:.4g}' for v in values)}  spread {spread:.1%}")
    print("chosen plans: " + "; ".join(
        f"#{i + 1} {candidate_words(r.decision.chosen)}" for i, r in enumerate(repeats)))


def one_repeat(steps: int) -> Repeat:
    spec = load_lab_spec("lab-2x2").model_copy(update={"name": LAB})
    lab_down(LAB)
    lab_up(spec)
    try:
        with tempfile.TemporaryDirectory(prefix="hetsched-e2e-") as tmp:
            return run_both(Path(tmp), steps)
    finally:
        lab_down(LAB)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole comparison this many times, a fresh lab each")
    args = parser.parse_args()
    repeats, passed = [], []
    for i in range(args.repeat):
        print(f"\n######## repeat {i + 1} of {args.repeat}", flush=True)
        repeats.append(one_repeat(args.steps))
        passed.append(report(repeats[-1]))
    if args.repeat > 1:
        for i, (repeat, ok) in enumerate(zip(repeats, passed, strict=True)):
            print(f"\n== repeat {i + 1}: {'PASS' if ok else 'FAIL'}")
            report(repeat)
    probe_spread(repeats)
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
