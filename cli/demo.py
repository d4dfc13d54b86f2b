"""`hetsched demo`: the README's main job on a built-in example, from probe to training.

With root and iproute2: bring up the built-in lab of 2 sites x 2 hosts (1 Gbit/s inside a
site, 50 Mbit/s between the sites), probe every host pair (each host also times a
matmul), plan the tiny GPT, show the plan, launch it in the lab
(`examples/train_tinygpt.py`, one torchrun per lab host) and print the loss curve,
tokens/s and the bytes that crossed the WAN as the kernel counted them; the lab is
taken down at the end, also on failure or Ctrl-C. Without root (or with `--local`): the
same four hosts on loopback, with a built-in topology whose link speeds are nominal, not
shaped and not measured (the demo says so), and this machine's matmul speed measured.
Every file goes to the output folder: topology.yaml, plan.yaml, metrics.json, every
rank's timings (timings/, for `hetsched report` and `hetsched calibrate`) and the
checkpoints. The last line is the plan's predicted tokens/s against the measured ones.
The lab hosts are namespaces of this machine: they share its CPUs, and the topology says
so (every host has this machine's boot id), so the estimate divides the CPU among them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from cli.errors import EXIT_INCOMPLETE, reports_input_errors
from topology.errors import InputError
from topology.lab import STATE_DIR, LabError, find_lab, lab_down, lab_up, wan_bytes_sent
from topology.lab_probe import probe_lab
from topology.lab_spec import LabSpec, load_lab_spec
from topology.probe import ProbeOptions
from topology.schema import TOPOLOGY_VERSION, Topology, save_topology

DEMO_LAB = "lab-2x2"
DEMO_NAME = "demo"
DEMO_MODEL = "tiny-gpt"
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_tinygpt.py"
BAR_WIDTH = 40
# Quieter workers: no c10d hostname warnings, no Python warnings.
QUIET_ENV = {"TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore"}


def lab_available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("ip", "tc"))


@click.command()
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("hetsched-demo"), show_default=True,
              help="Folder for the files the demo writes (topology, plan, metrics).")
@click.option("--local", "force_local", is_flag=True,
              help="Skip the lab even with root: four hosts on loopback, links not shaped.")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="Training steps.")
@reports_input_errors
def demo(output_dir: Path, force_local: bool, steps: int) -> None:
    """Probe, plan, review and train the tiny GPT on a built-in example (a 2x2 lab)."""
    if not TRAIN_SCRIPT.is_file():
        raise InputError(f"{TRAIN_SCRIPT} is missing: run the demo from a clone of the "
                         "repository")
    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    if force_local or not lab_available():
        status = _local_demo(output_dir, steps, forced=force_local)
    else:
        try:
            with _demo_lab_lock():
                status = _lab_demo(output_dir, steps)
        except LabError as exc:
            click.echo(f"error: {exc}", err=True)
            status = EXIT_INCOMPLETE
    if status != 0:
        sys.exit(EXIT_INCOMPLETE)


@contextlib.contextmanager
def _demo_lab_lock() -> Iterator[None]:
    """Hold the demo lab for this process: a second demo is refused, not let take it down.

    The lab's name is fixed, so without this a demo started while another runs would
    remove the running one's namespaces (its first step takes down a stale demo lab).
    """
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = STATE_DIR / f"{DEMO_NAME}.lock"
    with open(path, "a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another `hetsched demo` is running its lab on this machine "
                             f"(it holds {path}); wait for it, or pass --local") from None
        yield


def _lab_demo(out: Path, steps: int) -> int:
    spec = load_lab_spec(DEMO_LAB).model_copy(update={"name": DEMO_NAME})
    _stage(1, 5, f"lab up: {spec.description or DEMO_LAB}")
    lab_down(DEMO_NAME)
    lab_up(spec)
    try:
        _stage(2, 5, "probe: an agent in every lab host (each times a matmul on the CPUs "
                     "the lab hosts share), all pairs measured")
        status = probe_lab(find_lab(DEMO_NAME), out / "topology.yaml", ProbeOptions(),
                           flops=True)
        if status != 0:
            return status
        _stage(3, 5, f"plan {DEMO_MODEL} on the measured topology, and show it")
        _plan(out)
        _stage(4, 5, f"train {steps} steps in the lab: one torchrun per lab host")
        state = find_lab(DEMO_NAME)
        before = sum(wan_bytes_sent(state).values())
        status = _train(out, steps, ["--via", "lab", "--lab", DEMO_NAME])
        wan = sum(wan_bytes_sent(state).values()) - before
        _stage(5, 5, "results")
        if status == 0:
            _report(out, steps, f"{wan / 1e6:.2f} MB crossed the WAN (the kernel's "
                                f"counters of both routers' wan0, headers included)")
        return status
    finally:
        click.echo("lab down", err=True)
        lab_down(DEMO_NAME)


def _local_demo(out: Path, steps: int, forced: bool) -> int:
    from topology.discover import measure_matmul_tflops

    why = "as asked" if forced else "not root or no iproute2, so no lab"
    _stage(1, 4, f"built-in topology on loopback ({why}): links are NOT shaped or "
                 "measured, their speeds are the lab's nominal ones")
    spec = load_lab_spec(DEMO_LAB)
    topology = loopback_topology(spec, measure_matmul_tflops("cpu", threads=1))
    save_topology(topology, out / "topology.yaml",
                  header=f"hetsched demo (local): {spec.description}, all on 127.0.0.1")
    _stage(2, 4, f"plan {DEMO_MODEL} and show it")
    _plan(out)
    _stage(3, 4, f"train {steps} steps: one torchrun per plan host, all on this machine")
    status = _train(out, steps, ["--via", "local"])
    _stage(4, 4, "results")
    if status == 0:
        _report(out, steps, "no WAN here (loopback); see the bytes per link class above")
    return status


def loopback_topology(spec: LabSpec, tflops: float) -> Topology:
    """The lab's hosts, all at 127.0.0.1, with the lab's nominal link speeds."""
    from topology.discover import machine_id

    hosts, links = [], []
    machine = machine_id()
    for site in spec.sites:
        for name in site.hosts:
            hosts.append({"name": name, "site": site.name, "address": "127.0.0.1",
                          **({"machine": machine} if machine else {}),
                          "cpu_cores": os.cpu_count() or 1, "memory_gb": 4,
                          "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 4,
                                       "tflops": round(tflops, 4)}],
                          "nics": [{"name": "lo", "kind": "ethernet", "virtual": True,
                                    "state": "up", "netdev": "lo"}]})
    site_of = {h["name"]: h["site"] for h in hosts}
    rate = {s.name: s.rate_mbit for s in spec.sites}
    for i, a in enumerate(hosts):
        for b in hosts[i + 1:]:
            sa, sb = site_of[a["name"]], site_of[b["name"]]
            mbit = rate[sa] if sa == sb else spec.wan_rate_mbit(sa, sb)
            links.append({"a": a["name"], "b": b["name"], "latency_ms": 0.1,
                          "bandwidth_gbps": mbit / 1000})
    return Topology.model_validate({"version": TOPOLOGY_VERSION,
                                    "sites": [{"name": s.name} for s in spec.sites],
                                    "hosts": hosts, "links": links})


def _stage(n: int, total: int, text: str) -> None:
    click.echo(f"\n[{n}/{total}] {text}", err=True)


def _plan(out: Path) -> None:
    from cli.plan import plan, show

    plan.main([str(out / "topology.yaml"), "-m", DEMO_MODEL, "-o", str(out / "plan.yaml")],
              standalone_mode=False)
    show.main([str(out / "plan.yaml")], standalone_mode=False)


def _train(out: Path, steps: int, via: list[str]) -> int:
    argv = [sys.executable, "-m", "cli", "launch", str(out / "plan.yaml"), *via, "--",
            str(TRAIN_SCRIPT), "--steps", str(steps), "--log-every", str(max(1, steps // 10)),
            "--checkpoint-dir", str(out / "checkpoints"), "--checkpoint-every", str(steps),
            "--metrics", str(out / "metrics.json")]
    return subprocess.run(argv, env={**os.environ, **QUIET_ENV}).returncode


def _report(out: Path, steps: int, wan_line: str) -> None:
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    curve = metrics["curve"]
    top = max(entry["loss"] for entry in curve)
    click.echo("loss curve (mean over the steps since the previous line):")
    for entry in curve:
        bar = "#" * max(1, round(BAR_WIDTH * entry["loss"] / top))
        click.echo(f"  step {entry['step']:5d}  {entry['loss']:7.4f}  {bar}")
    plan = _plan_model(out)
    tokens = steps * plan["global_batch"] * plan["seq_len"]
    click.echo(f"eval loss {metrics['eval_loss']:.4f} after {steps} steps; "
               f"{tokens / metrics['train_s']:,.0f} tokens/s over {metrics['train_s']:.1f} s "
               f"of training")
    sent = curve[-1].get("bytes_per_class", {})
    click.echo("bytes sent, hetsched's accounting: " + ", ".join(
        f"{k} {v / 1e6:.2f} MB" for k, v in sorted(sent.items())))
    click.echo(wan_line)
    click.echo(f"files: {out}/topology.yaml, plan.yaml, metrics.json, timings/, checkpoints/ "
               f"(hetsched report {out}: predicted vs measured in detail)")
    measured = tokens / metrics["train_s"]
    predicted = plan["predicted"]
    click.echo(f"predicted {predicted:,.0f} tokens/s, measured {measured:,.0f} tokens/s: "
               f"error {(predicted - measured) / measured:+.1%}")


def _plan_model(out: Path) -> dict[str, Any]:
    from holmes.plan import load_plan

    plan = load_plan(out / "plan.yaml")
    return {"global_batch": plan.model.global_batch, "seq_len": plan.model.seq_len,
            "predicted": plan.estimates.tokens_per_s}
