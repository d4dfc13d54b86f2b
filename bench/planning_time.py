"""Planning time and peak memory of the planner, against the issue's limits.

Cases (the baseline is the limit itself):

- `scale-1024`: `examples/scale-1024` (128 hosts x 8 GPUs, four fabrics) with the
  80-layer llama-70b preset, tensor-parallel candidates included; limits <= 10 s and
  < 2 GiB.
- `scale-16k`: 2,048 hosts x 8 A100 = 16,384 GPUs, eight sites of an InfiniBand and a
  RoCE fabric each (`examples/generate.py:scale_16k`, written to a temporary folder,
  not committed), llama-70b with TP candidates; limits <= 60 s and < 4 GiB.
- `geo12`: `examples/geo12` (20 geo nodes) with skippipe-llama-24l and 6 stages; limit
  <= 2 s (no memory limit in the issue; printed anyway).

Each case is measured two ways, each in a fresh process so that peak RSS
(`ru_maxrss` of that child, read with `os.wait4`) belongs to it alone:

1. *planning*: a child of this script loads the topology and model, runs
   `holmes.planner.decide` and `holmes.plan_build.build_plan`; the seconds of those
   steps (not interpreter start-up or imports) are its planning time.
2. *CLI*: the whole `hetsched plan TOPOLOGY --model M [--stages N] -o PLAN` command,
   wall time from spawn to exit (interpreter start, imports, planning, writing the plan,
   printing the summary) -- what a user waits for.

Each is repeated (`--repeats`, default 3; scale-16k once) and judged on the median wall
time and the largest peak RSS. Also printed: candidates simulated, layouts rejected and
skipped by the lower bound, the wall seconds of each planning phase, the CPU seconds of
the planning child, and `uptime`'s load average before and after: the machine is shared,
so times vary between runs; the min-max range is shown.

    .venv/bin/python bench/planning_time.py [--repeats N]

Exit status 0 only when every limit holds.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from planner_common import REPO, example_path, print_table, verdict

from holmes.placement import geo_layout

GIB = 1024**3


@dataclass(frozen=True)
class Case:
    name: str
    example: str
    model: str
    stages: int | None
    max_seconds: float
    max_rss_bytes: float | None
    repeats: int | None = None  # None: --repeats


CASES = [
    Case("scale-1024", "scale-1024", "llama-70b", None, 10.0, 2 * GIB),
    Case("scale-16k", "scale-16k", "llama-70b", None, 60.0, 4 * GIB, repeats=1),
    Case("geo12", "geo12", "skippipe-llama-24l", 6, 2.0, None),
]
BUILT = {"scale-16k": "scale_16k"}  # examples built by examples/generate.py, not committed


def topology_path(case: Case, folder: Path) -> Path:
    return folder / case.example / "topology.yaml" if case.example in BUILT \
        else example_path(case.example)


def build_examples(folder: Path) -> None:
    """Write the BUILT examples under `folder` (libyaml's dumper: seconds, not minutes)."""
    import yaml

    sys.path.insert(0, str(REPO / "examples"))
    import generate

    for name, function in BUILT.items():
        topology, header = getattr(generate, function)()
        path = folder / name / "topology.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.dump(topology.to_plain(), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                         sort_keys=False, default_flow_style=None, width=100)
        path.write_text("".join(f"# {line}\n" for line in header.splitlines()) + text)


@dataclass
class Run:
    seconds: float
    rss_bytes: int
    report: dict


# --- the child: plan once in-process and report ------------------------------------------


def child(case_name: str, folder: Path) -> None:
    from holmes.model import load_model
    from holmes.plan_build import build_plan
    from holmes.planner import PlanOptions, decide
    from topology.schema import load_topology

    case = next(c for c in CASES if c.name == case_name)
    path = topology_path(case, folder)
    cpu_start = time.process_time()
    start = time.perf_counter()
    topology = load_topology(path)
    config = load_model(case.model)
    loaded = time.perf_counter()
    options = PlanOptions(stages=case.stages, nccl_net="per-communicator")
    decision = decide(topology, config, options)
    decided = time.perf_counter()
    build_plan(decision, topology_file=str(path), model_source=case.model)
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "load_s": loaded - start,
                "decide_s": decided - loaded,
                "build_s": done - decided,
                "plan_s": done - start,
                "regime": decision.regime,
                "candidates": len(decision.candidates),
                "rejected": len(decision.rejected),
                "skipped": decision.skipped,
                "phases": decision.phases,
                "cpu_s": time.process_time() - cpu_start,
                "chosen": decision.chosen.layout.description,
                "step_s": decision.chosen.step_s,
            }
        )
    )


# --- the parent: spawn, time, read the child's peak RSS ----------------------------------


def spawn(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one child process; raises on failure.

    Output goes to files (no pipe can fill up), and `os.wait4` reaps the child so its
    own `ru_maxrss` (KiB on Linux) is read, not the maximum over all children.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, stdout


def planning_run(case: Case, folder: Path) -> Run:
    _, rss, stdout = spawn([sys.executable, __file__, "--child", case.name, "--folder",
                            str(folder)])
    report = json.loads(stdout.strip().splitlines()[-1])
    return Run(report["plan_s"], rss, report)


def hetsched_argv(case: Case, output: Path, folder: Path) -> list[str]:
    script = Path(sys.executable).with_name("hetsched")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "cli"]
    argv = [
        *head,
        "plan",
        str(topology_path(case, folder)),
        "--model",
        case.model,
        "-o",
        str(output),
    ]
    return argv + (["--stages", str(case.stages)] if case.stages else [])


def cli_run(case: Case, folder: Path) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        seconds, rss, _ = spawn(hetsched_argv(case, Path(tmp) / "plan.yaml", folder))
    return Run(seconds, rss, {})


# --- judging and printing ----------------------------------------------------------------


@dataclass
class Measured:
    case: Case
    how: str
    runs: list[Run]

    @property
    def median_s(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return max(r.rss_bytes for r in self.runs)

    @property
    def time_ok(self) -> bool:
        return self.median_s <= self.case.max_seconds

    @property
    def memory_ok(self) -> bool:
        return self.case.max_rss_bytes is None or self.peak_rss < self.case.max_rss_bytes


def row(m: Measured, candidates: str) -> list[str]:
    times = [r.seconds for r in m.runs]
    limit_mem = "-" if m.case.max_rss_bytes is None else f"< {m.case.max_rss_bytes / GIB:g} GiB"
    mem_verdict = "" if m.case.max_rss_bytes is None else verdict(m.memory_ok)
    return [
        m.case.name,
        m.how,
        f"{m.median_s:.2f}",
        f"{min(times):.2f}-{max(times):.2f}",
        f"<= {m.case.max_seconds:g}",
        verdict(m.time_ok),
        f"{m.peak_rss / 2**20:.0f}",
        limit_mem,
        mem_verdict,
        candidates,
    ]


def search_note(case: Case, report: dict) -> str:
    text = (f"{report['candidates']} simulated, {report['rejected']} rejected, "
            f"{report['skipped']} skipped")
    if report["regime"] == "geo":
        rounds = inspect.signature(geo_layout).parameters["rounds"].default
        text += f" (DT-FM local search: {rounds} swaps)"
    return text


def measure(case: Case, repeats: int, folder: Path) -> tuple[list[Measured], dict]:
    repeats = case.repeats or repeats
    planning = [planning_run(case, folder) for _ in range(repeats)]
    cli = [cli_run(case, folder) for _ in range(repeats)]
    return [Measured(case, "planning", planning), Measured(case, "hetsched plan", cli)], planning[
        0
    ].report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", action="append", help="only these cases (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder)
        return 0
    with tempfile.TemporaryDirectory(prefix="planning-time-") as tmp:
        return run_cases([c for c in CASES if not args.case or c.name in args.case],
                         args.repeats, Path(tmp))


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_cases(cases: list[Case], repeats: int, folder: Path) -> int:
    print(f"== planning time and peak RSS (median of {repeats}; each run a fresh process) ==")
    print(f"load average before: {load_average()} (this machine: {os.cpu_count()} CPUs)")
    if any(c.example in BUILT for c in cases):
        build_examples(folder)
    rows, details, ok = [], [], True
    for case in cases:
        measured, report = measure(case, repeats, folder)
        note = search_note(case, report)
        rows += [row(m, note) for m in measured]
        ok = ok and all(m.time_ok and m.memory_ok for m in measured)
        details.append(
            f"  {case.name}: {case.model}, {report['regime']} regime; load "
            f"{report['load_s']:.2f} s + decide {report['decide_s']:.2f} s ("
            + ", ".join(f"{k} {v:.2f} s" for k, v in report["phases"].items())
            + f") + build {report['build_s']:.2f} s; CPU {report['cpu_s']:.2f} s; chosen: "
            f"{report['chosen']} ({report['step_s']:.3g} s/step)"
        )
    print_table(
        ["case", "measured", "wall s", "range", "limit", "", "peak MiB", "limit", "", "candidates"],
        rows,
        right=[False, False, True, True, True, False, True, True, False, False],
    )
    print("\n".join(details))
    print(f"load average after: {load_average()}")
    print(f"\noverall: {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
