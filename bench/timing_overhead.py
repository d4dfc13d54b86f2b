"""What recording timings costs: the demo plan with recording on and off in one run.

    .venv/bin/python bench/timing_overhead.py [--steps 120] [--block 5]

Plans the tiny GPT on the demo's topology (`hetsched demo --local`: lab-2x2's four
hosts on loopback, this machine's matmul speed), then launches this file as the training
script (`hetsched launch --via local`, one torchrun per plan host, gloo). Every rank
trains with `holmes.runtime.Trainer` and turns recording off and on in alternating blocks
of `--block` steps (`Trainer.record_timings`), so both halves see the same load on this
shared machine; rank 0 times every step (from the end of one to the end of the next,
after a barrier, so every rank's recording is in it). The first block is left out as
warm-up. Prints the median and mean step with recording on and off and the overhead
(target <= 2% of step time). On a shared machine the two halves differ by more than
recording costs, so the bench also times the recorder itself: rank 0's busiest recorded
step replayed through a `Timings` (the same calls, JSON line and file writes) 2,000
times. Exit status 1 if the median overhead is above the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

TARGET = 0.02


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from train_tinygpt import TinyGPT, batch, stdlib_text

    from holmes.runtime import PlanRun, Trainer

    torch.set_num_threads(1)
    run = PlanRun.from_env()
    m = run.plan.model
    torch.manual_seed(0)
    model = TinyGPT(m.layers, m.hidden, 4, m.seq_len)
    trainer = Trainer(run, model, lambda p: torch.optim.AdamW(p, lr=1e-3),
                      activation_shape=(m.microbatch, m.seq_len, m.hidden),
                      total_steps=args.steps, log_every=10**9, log=lambda line: None,
                      timings=Path(args.out) / "timings")
    train, _ = stdlib_text(400_000)
    rows = []
    dist.barrier()
    last = time.perf_counter()
    for step in trainer.steps():
        on = (step // args.block) % 2 == (0 if args.swap else 1)
        trainer.record_timings(on)
        batches = {mb: batch(train, step, mb, m.microbatch, m.seq_len, 0)
                   for mb in trainer.microbatches()}
        trainer.step(step, batches)
        dist.barrier()
        now = time.perf_counter()
        rows.append({"step": step, "on": on, "s": now - last})
        last = now
    trainer.finish()
    if dist.get_rank() == 0:
        (Path(args.out) / "steps.json").write_text(json.dumps(rows))
    run.exit()


def replayed_cost(folder: Path, repeats: int = 2000) -> float:
    """Seconds per step that recording rank 0's busiest step costs (the same calls)."""
    from holmes.runtime.timings import Timings, read_timings

    line = max((x for x in read_timings(folder) if x["rank"] == 0),
               key=lambda x: len(x["tasks"]) + len(x["recv"]))
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Timings(tmp, rank=0, identity={k: line[k] for k in ("node", "host",
                                                                        "stage")})
        start = time.perf_counter()
        for step in range(repeats):
            recorder.start_step()
            for kind, mb, *_ in line["tasks"]:
                recorder.task(kind, mb, time.time())
            for peer, mb, kind, nbytes, *_ in line["recv"]:
                recorder.recv(peer, mb, kind, nbytes, time.time())
            for peer, mb, kind, nbytes, _ in line["send"]:
                recorder.send(peer, mb, kind, nbytes)
            for kind, nbytes, *_ in line["syncs"]:
                with recorder.sync(kind, nbytes):
                    pass
            recorder.end_step(step, line["bytes"])
        recorder.close()
        return (time.perf_counter() - start) / repeats


def driver(args: argparse.Namespace) -> int:
    from cli.demo import DEMO_LAB, loopback_topology
    from topology.discover import measure_matmul_tflops
    from topology.lab_spec import load_lab_spec
    from topology.schema import save_topology

    out = Path(args.out or tempfile.mkdtemp(prefix="hetsched-overhead-"))
    out.mkdir(parents=True, exist_ok=True)
    tflops = measure_matmul_tflops("cpu", threads=1)
    save_topology(loopback_topology(load_lab_spec(DEMO_LAB), tflops), out / "topology.yaml")
    subprocess.run([sys.executable, "-m", "cli", "plan", str(out / "topology.yaml"), "-m",
                    "tiny-gpt", "-o", str(out / "plan.yaml")], check=True,
                   capture_output=True, cwd=ROOT)
    done = subprocess.run([sys.executable, "-m", "cli", "launch", str(out / "plan.yaml"),
                           "--via", "local", "--", str(Path(__file__).resolve()), "--worker",
                           "--steps", str(args.steps), "--block", str(args.block),
                           *(["--swap"] if args.swap else []),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:] + done.stderr[-3000:], file=sys.stderr)
        return done.returncode
    rows = [r for r in json.loads((out / "steps.json").read_text()) if r["step"] >= args.block]
    on = [r["s"] for r in rows if r["on"]]
    off = [r["s"] for r in rows if not r["on"]]
    med = statistics.median(on) / statistics.median(off) - 1
    mean = statistics.fmean(on) / statistics.fmean(off) - 1
    print(f"demo plan (lab-2x2 on loopback), {len(on)} steps recorded and {len(off)} not, "
          f"alternating blocks of {args.block}")
    print(f"step seconds  median on {statistics.median(on):.4f}  off "
          f"{statistics.median(off):.4f}  overhead {med:+.2%}")
    print(f"step seconds  mean   on {statistics.fmean(on):.4f}  off "
          f"{statistics.fmean(off):.4f}  overhead {mean:+.2%}")
    direct = replayed_cost(out / "timings")
    print(f"the recorder alone: {direct * 1e6:.0f} us per step of this plan "
          f"({direct / statistics.median(off):.3%} of the median step)")
    print(f"target <= {TARGET:.0%}: {'met' if med <= TARGET else 'MISSED'} (median); "
          f"files in {out}")
    return 0 if med <= TARGET else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--out", help="folder for the plan, timings and step times")
    p.add_argument("--swap", action="store_true",
                   help="record in the even blocks instead (to see a block-order effect)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    sys.exit(driver(args))


if __name__ == "__main__":
    main()
