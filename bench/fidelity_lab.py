"""Predicted vs measured on the emulated lab, before and after calibration (issue #14).

    sudo flock /tmp/hetsched-lab.lock .venv/bin/python bench/fidelity_lab.py \
        [--lab lab-2x2] [--steps 40] [--calibrate-on pipeline-4] [--out DIR]

Brings up the lab as `fidelity`, probes it (each host times a matmul, one after the
other), and plans the tiny GPT in four shapes, each forced with `hetsched plan` flags:

- `diloco-1`: one stage per site, DiLoCo between the sites (`--stages 1 --sync diloco`);
- `pipeline-2`: a 2-stage pipeline per site, DiLoCo between them (`--stages 2 --sync diloco`;
  left to choose, the planner makes one pipeline over both sites here);
- `pipeline-4`: a 4-stage pipeline across the sites with per-step all-reduce
  (`--stages 4 --sync allreduce`);
- `skip-0.25`: the 4-stage pipeline with skip routes, k = 0.25 (`--skip-ratio 0.25`).

Each is trained for `--steps` steps in the lab (`examples/train_tinygpt.py`, timings
on). Measured tokens/s is `hetsched report`'s: the global batch's tokens over the median
step (ends of consecutive steps, slowest rank; the first 10% left out). Then ONE run
(`--calibrate-on`) is calibrated and the other three are predicted with that calibration
(`hetsched report --calibration`); no shape is fitted on itself. Prints both tables and
the ranking check: the shape the calibrated model ranks fastest against the fastest
measured. The machine's load (`uptime`) is printed with the figures: the lab's hosts
share this machine's CPUs with whatever else runs on it. `--local` runs the same shapes
without root on `hetsched demo --local`'s loopback topology (the lab's hosts and nominal
link speeds on 127.0.0.1: links not shaped, so only the compute and the sharing of the
cores are tested).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topology.lab import find_lab, lab_down, lab_up  # noqa: E402
from topology.lab_probe import probe_lab  # noqa: E402
from topology.lab_spec import load_lab_spec  # noqa: E402
from topology.probe import ProbeOptions  # noqa: E402

LAB = "fidelity"
MODEL = "tiny-gpt"
SHAPES = {
    "diloco-1": ["--stages", "1", "--sync", "diloco", "--sync-every", "25"],
    "pipeline-2": ["--stages", "2", "--sync", "diloco", "--sync-every", "25"],
    "pipeline-4": ["--stages", "4", "--sync", "allreduce"],
    "skip-0.25": ["--stages", "4", "--skip-ratio", "0.25"],
}
TARGET = 0.15
QUIET = {"TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore"}


def cli(*args: str, capture: bool = False) -> str:
    done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, check=True,
                          text=True, capture_output=capture, env={**os.environ, **QUIET})
    return done.stdout if capture else ""


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_shape(work: Path, name: str, steps: int, via: list[str]) -> Path:
    run = work / name
    run.mkdir()
    cli("plan", str(work / "topology.yaml"), "-m", MODEL, "-o", str(run / "plan.yaml"),
        *SHAPES[name], capture=True)
    print(f"== {name}: training {steps} steps ({load()})", flush=True)
    cli("launch", str(run / "plan.yaml"), *via, "--",
        str(ROOT / "examples" / "train_tinygpt.py"), "--steps", str(steps), "--log-every",
        str(steps), "--metrics", str(run / "metrics.json"), capture=True)
    return run


def lab_runs(work: Path, lab: str, shapes: list[str], steps: int) -> dict[str, Path]:
    spec = load_lab_spec(lab).model_copy(update={"name": LAB})
    lab_down(LAB)
    lab_up(spec)
    try:
        print(f"lab {lab}; probing ({load()})", flush=True)
        if probe_lab(find_lab(LAB), work / "topology.yaml", ProbeOptions(), flops=True) != 0:
            raise SystemExit("the probe could not measure every pair")
        return {name: run_shape(work, name, steps, ["--via", "lab", "--lab", LAB])
                for name in shapes}
    finally:
        lab_down(LAB)


def local_runs(work: Path, lab: str, shapes: list[str], steps: int) -> dict[str, Path]:
    from cli.demo import loopback_topology
    from topology.discover import measure_matmul_tflops
    from topology.schema import save_topology

    print(f"{lab}'s hosts on loopback ({load()})", flush=True)
    topology = loopback_topology(load_lab_spec(lab), measure_matmul_tflops("cpu", threads=1))
    save_topology(topology, work / "topology.yaml")
    return {name: run_shape(work, name, steps, ["--via", "local"]) for name in shapes}


def figures(run: Path, calibration: Path | None = None) -> dict[str, float]:
    extra = ["--calibration", str(calibration)] if calibration else []
    rows = json.loads(cli("report", str(run), "--json", *extra, capture=True))
    return {k: rows["tokens_per_s"][k] for k in ("predicted", "measured")}


def table(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}\n| shape | predicted tokens/s | measured tokens/s | error |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        error = (r["predicted"] - r["measured"]) / r["measured"]
        print(f"| {name} | {r['predicted']:,.0f} | {r['measured']:,.0f} | {error:+.1%} |",
              flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lab", default="lab-2x2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--calibrate-on", default="pipeline-4", choices=list(SHAPES))
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset")
    p.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--local", action="store_true", help="loopback, no lab (see above)")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="hetsched-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    shapes = args.shapes.split(",")
    if args.local:
        runs = local_runs(work, args.lab, shapes, args.steps)
    else:
        runs = lab_runs(work, args.lab, shapes, args.steps)
    before = {name: figures(run) for name, run in runs.items()}
    table(f"before calibration ({args.lab}, {args.steps} steps, tiny-gpt)", before)
    calibration = work / "calibration.yaml"
    cli("calibrate", str(runs[args.calibrate_on]), "-o", str(calibration), capture=True)
    after = {name: figures(run, calibration) for name, run in runs.items()
             if name != args.calibrate_on}
    table(f"calibrated on {args.calibrate_on}'s run, predicting the others", after)
    errors = [abs(r["predicted"] - r["measured"]) / r["measured"] for r in after.values()]
    fastest = max(before, key=lambda n: before[n]["measured"])
    ranked = {n: (after.get(n) or figures(runs[n], calibration))["predicted"] for n in runs}
    chosen = max(ranked, key=ranked.__getitem__)
    gap = 1 - before[chosen]["measured"] / before[fastest]["measured"]
    print(f"\nworst calibrated error {max(errors, default=0):.1%} (target <= {TARGET:.0%}); "
          f"calibrated model ranks {chosen} fastest, measured fastest is {fastest} "
          f"({gap:.1%} slower than it)\nload after: {load()}\nruns in {work}")
    return 0 if max(errors, default=0) <= TARGET and gap <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
