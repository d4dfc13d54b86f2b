"""holmes.runtime (PlanRun + Trainer) end to end: examples/train_tinygpt.py under real plans.

Each test plans a small topology, then runs `hetsched launch --via local` (one torchrun
per plan host, gloo over loopback): a skip-route pipeline, DiLoCo between two sites, and
a torchrun restart (`--max-restarts 1`) after one worker is killed, which must resume from
the last checkpoint and continue the uninterrupted run's loss curve. One more test checks
`holmes.runtime.exit_job`, which ends every worker without the interpreter's exit.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from diloco import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train_tinygpt.py")
SMALL_MODEL = """\
version: 1
model: {name: test-gpt, arch: gpt, layers: 4, hidden: 64, heads: 4, ffn: 256, vocab: 256,
        seq_len: 64, dtype: fp32, tie_embeddings: true}
training: {global_batch: 8, microbatch: 2, steps: 10, recompute: none}
"""


def topology(sites: dict[str, list[str]], wan_gbps: float) -> dict[str, Any]:
    hosts = [{"name": h, "site": s, "address": "127.0.0.1", "cpu_cores": 2, "memory_gb": 8,
              "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 8, "tflops": 0.05}],
              "nics": [{"name": "lo", "kind": "ethernet", "virtual": True, "state": "up",
                        "netdev": "lo"}]}
             for s, names in sites.items() for h in names]
    links = [{"a": a["name"], "b": b["name"], "latency_ms": 0.2,
              "bandwidth_gbps": 1.0 if a["site"] == b["site"] else wan_gbps}
             for i, a in enumerate(hosts) for b in hosts[i + 1:]]
    return {"version": 1, "sites": [{"name": s} for s in sites], "hosts": hosts, "links": links}


def make_plan(folder: Path, topo: dict[str, Any], *options: str) -> Path:
    (folder / "topology.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
    (folder / "model.yaml").write_text(SMALL_MODEL)
    plan = folder / "plan.yaml"
    done = subprocess.run([sys.executable, "-m", "cli", "plan", str(folder / "topology.yaml"),
                           "-m", str(folder / "model.yaml"), "-o", str(plan), *options],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return plan


def launch_argv(plan: Path, *script_args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "cli", "launch", str(plan), "--via", "local",
            "--max-restarts", str(restarts), "--", SCRIPT, "--log-every", "1", *script_args]


def train(plan: Path, metrics: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(launch_argv(plan, "--metrics", str(metrics), *args),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure_report(done.stdout + done.stderr)
    return json.loads(metrics.read_text())


FAILURE_SIGNS = ("[launch]", "terminate called", "exitcode", "Error:", "Fatal Python error")


def failure_report(output: str, keep: int = 40) -> str:
    """A failed launch's lines that say who failed first and how, then the output's tail
    (the tail alone is usually the other hosts' tracebacks after the first one died)."""
    signs = [line for line in output.splitlines()
             if any(s in line for s in FAILURE_SIGNS) and "frame #" not in line]
    return "\n".join(signs[:keep]) + "\n...\n" + output[-3000:]


def losses(curve: list[dict[str, Any]]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in curve}


def test_skip_route_pipeline_trains(tmp_path: Path) -> None:
    # One site of four hosts, forced into 4 stages with skipping: every microbatch
    # visits its origin and 2 of the 3 other stages.
    plan = make_plan(tmp_path, topology({"a": ["h1", "h2", "h3", "h4"]}, 1.0),
                     "--stages", "4", "--skip-ratio", "0.34")
    data = yaml.safe_load(plan.read_text())
    assert all(len(p["route"]) == 3 for p in data["paths"])
    figures = train(plan, tmp_path / "m.json", "--steps", "8")
    curve = losses(figures["curve"])
    assert sorted(curve) == list(range(1, 9))
    assert curve[8] < curve[1]
    assert math.isfinite(figures["eval_loss"])


def test_diloco_between_two_sites_trains_and_counts_wan_bytes(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["a1"], "b": ["b1"]}, 0.01),
                     "--stages", "1", "--sync", "diloco", "--sync-every", "4",
                     "--fragments", "2")
    assert yaml.safe_load(plan.read_text())["sync"] == "diloco"
    figures = train(plan, tmp_path / "m.json", "--steps", "8")
    last = figures["curve"][-1]
    assert last["bytes_per_class"].get("inter_site", 0) > 0  # DiLoCo exchanged fragments
    assert losses(figures["curve"])[8] < losses(figures["curve"])[1]


def test_allreduce_between_sites_sends_one_shard_per_lane(tmp_path: Path) -> None:
    # Two sites of two hosts: two replicas, one stage, two lanes. Each lane all-reduces
    # half of the gradient over the WAN and broadcasts it in its site, so the WAN carries
    # the gradient once, not once per lane. (tests/test_zero.py checks every rank's
    # parameters against one process's.)
    # (with a WAN this fast the planner uses both sites as replicas)
    plan = make_plan(tmp_path, topology({"a": ["a1", "a2"], "b": ["b1", "b2"]}, 5.0),
                     "--stages", "1", "--sync", "allreduce")
    data = yaml.safe_load(plan.read_text())
    assert len(data["replicas"]) == 2
    assert sorted(g["name"] for g in data["groups"] if g["kind"] == "replica") == [
        "replica-s0-l0", "replica-s0-l1"]
    steps = 4
    figures = train(plan, tmp_path / "m.json", "--steps", str(steps),
                    "--checkpoint-dir", str(tmp_path / "ckpt"))
    final = tmp_path / "ckpt" / f"step-{steps:08d}"
    files = json.loads((final / "manifest.json").read_text())["manifest"]["files"]
    # the replicas hold the same state: replica 0 writes it once, weights from lane 0
    # and each lane its ZeRO-1 shard of the optimizer state
    assert len(files) == 2
    writers = [name for name, f in files.items()
               if any(e.startswith("model/") for e in f["entries"])]
    assert len(writers) == 1
    weights = [t for e, t in load_checkpoint(final / writers[0]).items()
               if e.startswith("model/")]
    gradient_bytes = 4 * sum(t.numel() for t in weights)
    # ring all-reduce of half the gradient between 2 ranks: each rank sends that half
    assert figures["curve"][-1]["bytes_per_class"]["inter_site"] == steps * 2 * gradient_bytes


def test_exit_job_flushes_and_ends_the_process_with_its_code() -> None:
    # os._exit skips the interpreter's exit (see holmes.runtime): buffered output must
    # still arrive (a pipe makes stdout block-buffered).
    code = ("import sys; from holmes.runtime import exit_job; print('bye', end=''); "
            "sys.stderr.write('err'); exit_job(3); print('not reached')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (3, "bye", "err")


def read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def wait_for(lines: queue.Queue[str], text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in lines.get(timeout=0.5):
                return
        except queue.Empty:
            continue
    raise AssertionError(f"no line with {text!r} within {timeout} s")


def kill_one_worker(host: str) -> None:
    """SIGKILL the training process (not torchrun) of plan host `host`."""
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline, env = proc.info["cmdline"] or [], proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if SCRIPT in cmdline and "torch.distributed.run" not in " ".join(cmdline) \
                and env.get("HETSCHED_HOST") == host:
            os.kill(proc.pid, signal.SIGKILL)
            return
    raise AssertionError(f"no worker of host {host} found")


def test_restart_resumes_from_the_checkpoint_and_continues_the_curve(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["a1"], "b": ["b1"]}, 0.01),
                     "--stages", "1", "--sync", "diloco", "--sync-every", "4",
                     "--fragments", "2")
    steps = ["--steps", "40", "--checkpoint-every", "5"]
    whole = train(plan, tmp_path / "whole.json", *steps,
                  "--checkpoint-dir", str(tmp_path / "ckpt-whole"))
    argv = launch_argv(plan, *steps, "--checkpoint-dir", str(tmp_path / "ckpt"),
                       "--metrics", str(tmp_path / "restarted.json"), restarts=1)
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(launcher.stdout, lines), daemon=True).start()
    wait_for(lines, "checkpoint", timeout=120)
    kill_one_worker("b1")
    assert launcher.wait(timeout=240) == 0
    restarted = json.loads((tmp_path / "restarted.json").read_text())
    resumed = restarted["resumed_from"]
    assert 5 <= resumed < 40 and resumed % 5 == 0
    before, after = losses(whole["curve"]), losses(restarted["curve"])
    assert sorted(after) == list(range(resumed + 1, 41))
    for step, loss in after.items():
        assert loss == pytest.approx(before[step], rel=1e-4), step
    assert restarted["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)
