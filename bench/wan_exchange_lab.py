"""One DiLoCo exchange per stage across the WAN, on the emulated 2 x 2 lab (issue #16).

    sudo flock /tmp/hetsched-lab.lock .venv/bin/python bench/wan_exchange_lab.py [--steps 200]

Brings up lab-2x2 (1 Gbit/s inside a site, 50 Mbit/s between the sites; each site's
router has one `wan0`) as lab `wanx`, probes it and plans the tiny GPT as the demo does
(`hetsched plan`'s defaults: DiLoCo every 100 steps in 4 fp4 fragments) but with one
stage per replica (`--stages 1 --sync diloco`), so each site's replica has 2 lanes.
Then, with the plan's `diloco.exchange` set to each of `per_lane` (the old behaviour:
each lane exchanges the whole fragment), `lead` and `sharded`:

1. timing: `bench/wan_exchange_worker.py` under the plan times one fragment's exchange
   (the plan's fragment size, fp4) each way, `--repeats` times, in the same launch;
2. training: `examples/train_tinygpt.py --steps N` under the plan, as the demo runs it;
   the WAN bytes are the kernel's (both routers' `wan0` transmit counters before and
   after), with tokens/s and the eval loss.

Prints both tables (markdown, for docs/diloco.md). The lab is taken down at the end, also
on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from holmes.plan import load_plan, save_plan  # noqa: E402
from topology.lab import find_lab, lab_down, lab_up, wan_bytes_sent  # noqa: E402
from topology.lab_probe import probe_lab  # noqa: E402
from topology.lab_spec import load_lab_spec  # noqa: E402
from topology.probe import ProbeOptions  # noqa: E402

LAB = "wanx"
WAYS = ("per_lane", "lead", "sharded")
TINY_GPT_PARAMS = 1_635_584  # examples/train_tinygpt.py's model under the tiny-gpt preset


def hetsched(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cli", *args], check=True, cwd=ROOT)


def with_exchange(plan: Path, way: str, out: Path) -> Path:
    loaded = load_plan(plan)
    assert loaded.diloco is not None
    edited = loaded.model_copy(update={"diloco": loaded.diloco.model_copy(
        update={"exchange": way})})
    save_plan(edited, out, [f"{plan.name} with diloco.exchange: {way}"])
    return out


def launch(plan: Path, script: list[str]) -> int:
    state = find_lab(LAB)
    before = sum(wan_bytes_sent(state).values())
    hetsched("launch", str(plan), "--via", "lab", "--lab", LAB, "--", *script)
    return sum(wan_bytes_sent(state).values()) - before


def timing(work: Path, plan: Path, repeats: int) -> dict:
    fragments = load_plan(plan).diloco.fragments  # type: ignore[union-attr]
    out = work / "timing.json"
    launch(with_exchange(plan, "lead", work / "plan-timing.yaml"),
           [str(ROOT / "bench" / "wan_exchange_worker.py"), "--numel",
            str(TINY_GPT_PARAMS // fragments), "--repeats", str(repeats), "--out", str(out)])
    return json.loads(out.read_text())


def training(work: Path, plan: Path, steps: int) -> dict[str, dict]:
    found = {}
    for way in WAYS:
        metrics = work / f"train-{way}.json"
        print(f"\n== training, diloco.exchange: {way}", flush=True)
        wan = launch(with_exchange(plan, way, work / f"plan-{way}.yaml"),
                     [str(ROOT / "examples" / "train_tinygpt.py"), "--steps", str(steps),
                      "--log-every", str(max(1, steps // 4)), "--metrics", str(metrics)])
        figures = json.loads(metrics.read_text())
        found[way] = {"wan_bytes": wan, "train_s": figures["train_s"],
                      "eval_loss": figures["eval_loss"],
                      "accounted": figures["curve"][-1]["bytes_per_class"]}
    return found


def report(times: dict, trained: dict[str, dict], steps: int, plan: Path) -> None:
    loaded = load_plan(plan)
    lanes = [len(loaded.stage(r.stages[0]).devices) for r in loaded.replicas]
    print(f"\nplan: {len(loaded.replicas)} replicas x {len(loaded.replicas[0].stages)} stage, "
          f"lanes per replica {lanes}, diloco {loaded.diloco}")
    print("\n| exchange | median s per fragment | min s | max s | WAN bytes per exchange "
          "(ledger, all ranks) | max abs diff vs per_lane |")
    print("|---|---|---|---|---|---|")
    for way in WAYS:
        t = times[way]
        diff = t.get("max_abs_diff_vs_per_lane", 0.0)
        print(f"| {way} | {statistics.median(t['seconds']):.4f} | {min(t['seconds']):.4f} | "
              f"{max(t['seconds']):.4f} | {t['wan_sent_per_exchange']:,.0f} | {diff:.2e} |")
    tokens = steps * loaded.model.global_batch * loaded.model.seq_len
    print("\n| exchange | WAN MB (kernel) | train s | tokens/s | eval loss | "
          "hetsched's accounting |")
    print("|---|---|---|---|---|---|")
    for way in WAYS:
        r = trained[way]
        sent = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(r["accounted"].items()))
        print(f"| {way} | {r['wan_bytes'] / 1e6:.2f} | {r['train_s']:.1f} | "
              f"{tokens / r['train_s']:,.0f} | {r['eval_loss']:.4f} | {sent} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    spec = load_lab_spec("lab-2x2").model_copy(update={"name": LAB})
    lab_down(LAB)
    lab_up(spec)
    try:
        with tempfile.TemporaryDirectory(prefix="hetsched-wanx-") as tmp:
            work = Path(tmp)
            topology, plan = work / "topology.yaml", work / "plan.yaml"
            if probe_lab(find_lab(LAB), topology, ProbeOptions(), flops=True) != 0:
                raise SystemExit("the probe could not measure every pair")
            hetsched("plan", str(topology), "-m", "tiny-gpt", "--stages", "1", "--sync",
                     "diloco", "-o", str(plan))
            times = timing(work, plan, args.repeats)
            trained = {} if args.skip_training else training(work, plan, args.steps)
            if trained:
                report(times, trained, args.steps, plan)
            else:
                print(json.dumps(times, indent=1))
        return 0
    finally:
        lab_down(LAB)


if __name__ == "__main__":
    sys.exit(main())
