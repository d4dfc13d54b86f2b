"""`hetsched calibrate`: the fit recovers known speeds from synthetic timings, the file
round-trips and is validated like the other files, and a calibration moves the estimate.

The synthetic timings are what `holmes.runtime.timings` writes for a real two-stage plan
(made by `hetsched plan`): every forward and backward of known compute time, with the
receives inside them taking latency + bytes / bandwidth for messages of several sizes,
and a little deterministic noise. The end-to-end test calibrates a real gloo run.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_trainer import make_plan, topology, train

from holmes.calibrate import (
    core_shares,
    fit_devices,
    fit_link,
    fit_links,
    fit_ring_links,
    measure,
)
from holmes.calibration import device_tflops, tflops_of, with_calibration
from holmes.model import load_model
from holmes.plan import Plan, load_plan
from topology.calibration import (
    Calibration,
    DeviceFit,
    LinkFit,
    calibration_yaml,
    load_calibration,
    save_calibration,
)
from topology.errors import InputError
from topology.schema import parse_topology

SPEED = {"h1:cpu0": 0.002, "h2:cpu0": 0.005}  # seconds per layer per sample, fwd + bwd
LATENCY_S, RATE_BPS = 0.003, 1.0e7
NOISE = 0.005


def synthetic_lines(plan: Plan, steps: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """Timings of `plan` (two stages, one device each) as the runtime would write them."""
    rng = random.Random(seed)
    stage_of = {d: s for s in plan.stages for d in s.devices}
    nodes = [d for s in plan.stages for d in s.devices]
    rank = {d: i for i, d in enumerate(nodes)}
    mbs = [p.microbatch for p in plan.paths]
    lines = []
    clock = 1000.0
    for step in range(steps):
        per_node: dict[str, dict[str, list[Any]]] = {
            d: {"tasks": [], "recv": [], "send": []} for d in nodes}
        for mb in mbs:
            for kind, share in (("forward", 1 / 3), ("backward", 2 / 3)):
                for node in nodes if kind == "forward" else reversed(nodes):
                    stage = stage_of[node]
                    layers = stage.layers[1] - stage.layers[0]
                    compute = SPEED[node] * layers * plan.model.microbatch * share
                    compute *= 1 + rng.uniform(-NOISE, NOISE)
                    start = clock
                    peer = nodes[1 - rank[node]]
                    if (kind == "forward") == (rank[node] == 1):  # receives first
                        nbytes = rng.choice([100_000, 200_000, 400_000, 800_000])
                        issued = clock - 0.0001
                        per_node[peer]["send"].append([rank[node], mb, kind, nbytes, issued])
                        took = (LATENCY_S + nbytes / RATE_BPS) * (1 + rng.uniform(-NOISE, NOISE))
                        per_node[node]["recv"].append([rank[peer], mb, kind, nbytes, clock,
                                                       clock + took])
                        clock += took
                    clock += compute
                    per_node[node]["tasks"].append([kind, mb, start, clock])
        for node in nodes:
            lines.append({"rank": rank[node], "node": node, "host": node.split(":")[0],
                          "stage": stage_of[node].id, "replica": 0, "lane": 0, "step": step,
                          "start": clock - 1, "end": clock, **per_node[node], "syncs": [],
                          "bytes": {"intra_site": 1}})
        clock += 0.01
    return lines


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Plan]:
    folder = tmp_path_factory.mktemp("plan")
    path = make_plan(folder, topology({"a": ["h1", "h2"]}, 1.0), "--stages", "2")
    return path, load_plan(path)


def test_fit_recovers_device_speeds_and_link_rates(two_stage: tuple[Path, Plan]) -> None:
    path, plan = two_stage
    topo = parse_topology(yaml.safe_load((path.parent / "topology.yaml").read_text()))
    measured = measure(synthetic_lines(plan), warmup=1)
    notes: list[str] = []
    devices = {d.device: d for d in fit_devices(measured, plan, topo, notes)}
    assert set(devices) == set(SPEED), notes
    for device, seconds in SPEED.items():
        assert devices[device].seconds_per_layer_per_sample == pytest.approx(seconds, rel=0.02)
        assert devices[device].backward_forward_ratio == pytest.approx(2.0, rel=0.02)
    (link,) = fit_links(measured, topo, notes)
    assert link.latency_from == "fit" and link.sizes == 4
    assert link.latency_ms == pytest.approx(LATENCY_S * 1000, rel=0.02)
    assert link.bandwidth_gbps == pytest.approx(RATE_BPS * 8 / 1e9, rel=0.02)


def test_data_parallel_syncs_give_the_ring_links_rate(two_stage: tuple[Path, Plan]) -> None:
    # a data group of two hosts: each step a reduce-scatter and a parameter all-gather;
    # the member that arrives first waits for the other, the last one's time is the
    # transfer's (prior latency 0.2 ms per hop, the topology's)
    path, _ = two_stage
    topo = parse_topology(yaml.safe_load((path.parent / "topology.yaml").read_text()))
    rng = random.Random(1)
    wire = 3_000_000
    lines = []
    for step in range(10):
        for rank, host in enumerate(("h1", "h2")):
            syncs, clock = [], 100.0 * step
            for kind in ("data", "zero"):
                wait = rng.uniform(0.0, 0.05)
                took = 0.0002 + wire / RATE_BPS
                syncs.append([kind, wire, clock, clock + took + (wait if rank else 0.0)])
                clock += 1.0
            lines.append({"rank": rank, "node": f"{host}:cpu0", "host": host, "stage": 0,
                          "replica": 0, "step": step, "syncs": syncs})
    notes: list[str] = []
    (link,) = fit_ring_links(lines, set(range(1, 10)), topo, set(), notes)
    assert {link.a, link.b} == {"h1", "h2"} and link.latency_from == "prior"
    assert link.bandwidth_gbps == pytest.approx(RATE_BPS * 8 / 1e9, rel=0.02)
    assert fit_ring_links(lines, set(range(1, 10)), topo, {frozenset(("h1", "h2"))},
                          notes) == []  # a pair the pipeline's messages fitted keeps those


def test_core_share_counts_the_tasks_that_ran_at_once(two_stage: tuple[Path, Plan]) -> None:
    # two hosts of one single-core machine: h1 computes [0, 2), h2 [1, 2): h1 had the
    # core alone for 1 s and half of it for 1 s, h2 half of it throughout
    path, _ = two_stage
    raw = yaml.safe_load((path.parent / "topology.yaml").read_text())
    for host in raw["hosts"]:
        host.update(machine="m", cpu_cores=1)
    lines = [{"rank": r, "node": f"{h}:cpu0", "host": h, "stage": r, "step": 0, "recv": [],
              "tasks": [["forward", 0, start, 2.0]]}
             for r, (h, start) in enumerate((("h1", 0.0), ("h2", 1.0)))]
    shares = core_shares(lines, {0}, parse_topology(raw))
    assert shares == pytest.approx({"h1:cpu0": 0.75, "h2:cpu0": 0.5})


def test_too_few_samples_keep_the_prior(two_stage: tuple[Path, Plan]) -> None:
    assert isinstance(fit_link([(1000, 0.01, True)], 0.001), str)
    # one size: the prior latency is kept and the bandwidth fitted from it
    latency, rate, how = fit_link([(1_000_000, 0.101, True)] * 5, 0.001)
    assert how == "prior" and latency == 0.001 and rate == pytest.approx(1e7)
    path, plan = two_stage
    topo = parse_topology(yaml.safe_load((path.parent / "topology.yaml").read_text()))
    notes: list[str] = []
    lines = synthetic_lines(plan, steps=1)
    for line in lines:  # two microbatches of one step: two forwards per device
        line["tasks"] = [t for t in line["tasks"] if t[1] in (0, 1)]
    one_step = measure(lines, warmup=0)
    fit_devices(one_step, plan, topo, notes)
    assert any("fewer than" in note for note in notes)


def sample_calibration() -> Calibration:
    return Calibration(run="runs/x", plan="runs/x/plan.yaml", steps=10, step_overhead_s=0.002,
                       devices=[DeviceFit(device="h1:cpu0", seconds_per_layer_per_sample=0.01,
                                          workers_on_machine=2, core_share=0.5, samples=40,
                                          backward_forward_ratio=1.8)],
                       links=[LinkFit(a="h1", b="h2", latency_ms=2.5, bandwidth_gbps=0.05,
                                      samples=30, sizes=1, latency_from="prior")],
                       notes=["link h2-h3: 1 message(s): prior kept"])


def test_calibration_file_round_trips(tmp_path: Path) -> None:
    calibration = sample_calibration()
    save_calibration(calibration, tmp_path / "c.yaml", "a header")
    assert load_calibration(tmp_path / "c.yaml") == calibration
    assert calibration_yaml(load_calibration(tmp_path / "c.yaml")) == calibration_yaml(
        calibration)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["calibration"]["devices"][0].update(seconds_per_layer_per_sample=-1.0),
     "calibration.devices[0].seconds_per_layer_per_sample"),
    (lambda d: d["calibration"]["links"][0].update(bandwidth_gbps="fast"),
     "calibration.links[0].bandwidth_gbps"),
    (lambda d: d["calibration"].update(typo=1), "calibration.typo"),
    (lambda d: d["calibration"]["devices"].append(dict(d["calibration"]["devices"][0])),
     "calibration.devices[1].device"),
])
def test_a_bad_calibration_is_one_line_naming_the_field(tmp_path: Path, edit: Any,
                                                        field: str) -> None:
    data = yaml.safe_load(calibration_yaml(sample_calibration()))
    edit(data)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as caught:
        load_calibration(tmp_path / "bad.yaml")
    assert caught.value.field == field


def test_plan_refuses_a_bad_calibration_in_one_line(two_stage: tuple[Path, Plan],
                                                    tmp_path: Path) -> None:
    path, _ = two_stage
    data = yaml.safe_load(calibration_yaml(sample_calibration()))
    data["calibration"]["devices"][0]["device"] = "elsewhere:cpu0"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    for argv in (["plan", str(path.parent / "topology.yaml"), "-m",
                  str(path.parent / "model.yaml"), "-o", str(tmp_path / "p.yaml")],
                 ["simulate", str(path)]):
        done = subprocess.run([sys.executable, "-m", "cli", *argv, "--calibration",
                               str(tmp_path / "bad.yaml")], capture_output=True, text=True)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "calibration.devices[0].device" in done.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_calibration_and_shared_machines_set_the_speeds(two_stage: tuple[Path, Plan]) -> None:
    path, _ = two_stage
    raw = yaml.safe_load((path.parent / "topology.yaml").read_text())
    model = load_model(str(path.parent / "model.yaml")).model
    plain = device_tflops(parse_topology(raw), model)
    for host in raw["hosts"]:
        host["machine"] = "one-kernel"
    assert device_tflops(parse_topology(raw), model) == plain  # 2 workers on 2 cores
    for host in raw["hosts"]:
        host["cpu_cores"] = 1
    shared = device_tflops(parse_topology(raw), model)  # 2 workers on 1 core
    assert shared["h1:cpu0"] == pytest.approx(plain["h1:cpu0"] / 2)
    calibrated = device_tflops(with_calibration(parse_topology(raw), sample_calibration()),
                               model)
    # measured at half a core, and 2 workers share the one core here: as measured
    assert calibrated["h1:cpu0"] == pytest.approx(tflops_of(0.01, model))
    assert calibrated["h2:cpu0"] == shared["h2:cpu0"]
    link = with_calibration(parse_topology(raw), sample_calibration()).link("h1", "h2")
    assert (link.latency_ms, link.bandwidth_gbps) == (2.5, 0.05)


def test_calibrate_and_report_a_real_run(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["h1", "h2"]}, 1.0), "--stages", "2")
    train(plan, tmp_path / "metrics.json", "--steps", "6")
    cli = [sys.executable, "-m", "cli"]
    done = subprocess.run([*cli, "calibrate", str(tmp_path), "-o", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calibration = load_calibration(tmp_path / "c.yaml")
    assert {d.device for d in calibration.devices} == {"h1:cpu0", "h2:cpu0"}
    report = subprocess.run([*cli, "report", str(tmp_path), "--calibration",
                             str(tmp_path / "c.yaml"), "--json", "--gantt",
                             str(tmp_path / "g.png")], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    rows = yaml.safe_load(report.stdout)
    assert rows["tokens_per_s"]["measured"] > 0 and rows["tokens_per_s"]["predicted"] > 0
    assert set(rows["busy_s_per_stage"]) == {"0", "1"}
    assert (tmp_path / "g.png").stat().st_size > 0
    simulated = subprocess.run([*cli, "simulate", str(plan), "--calibration",
                                str(tmp_path / "c.yaml"), "--json"], capture_output=True,
                               text=True)
    assert simulated.returncode == 0, simulated.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = subprocess.run([*cli, "calibrate", str(empty), "--plan", str(plan), "-o",
                              str(tmp_path / "d.yaml")], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
