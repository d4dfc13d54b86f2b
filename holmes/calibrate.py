"""Fitting a calibration from a run's timings (`hetsched calibrate`), and the measured
figures of a run (`hetsched report`).

Input: the JSON lines of `holmes.runtime.timings` (every rank, every step), the run's
plan and topology. The first `warmup` steps are left out. Figures:

- **device** seconds per layer per sample: the compute of its forward and backward
  tasks (a task's time less the blocking receives inside it), over the layers its stage
  holds x the samples those tasks carried. Measured under the run's real contention;
  `workers_on_machine` says how many plan workers shared its machine, and `core_share`
  the share of a core its tasks had: over its compute, min(1, cores / compute tasks of
  that machine's workers running at the same time), time-weighted. Also the ratio of
  backward to forward compute. Fewer than `MIN_SAMPLES` tasks: no figure (a note).
- **link** latency and bandwidth, per host pair that carried pipeline messages: each
  message's transfer time is the receive's end less the later of the receive's start and
  the send's issue (one clock: the lab's hosts share a kernel; across machines NTP's
  error adds to it), preferring messages whose receiver was already waiting. With two
  or more message sizes, least squares of time = latency + bytes / bandwidth; with one
  (a pipeline's activations are all one size), the prior latency is kept and the
  bandwidth is the median message's bytes over its time less that latency. Fewer than
  `MIN_SAMPLES` messages, or a fit that is not positive: the prior is kept (a note).
- **data-parallel links**, per host pair of a stage's data group whose pair carried no
  pipeline message: the group's reduce-scatter and all-gather (`data` and `zero` syncs)
  of each step, each timed by the member that waited least (the last to arrive, so its
  time is the transfer's): bandwidth = the wire bytes a member sends / (that time less
  the prior latency per ring hop), median over steps; the prior latency is kept.
- **step overhead**: the measured step (median period between the ends of consecutive
  steps, slowest rank) less the calibrated simulation of the plan's iteration, at least 0.

Nothing here prints; the commands do.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from holmes.calibration import workers_per_machine
from holmes.plan import Plan
from topology.calibration import Calibration, DeviceFit, LinkFit
from topology.schema import Topology

MIN_SAMPLES = 3
COMPUTE_KINDS = ("forward", "backward")


@dataclass
class Measured:
    """What a run's timings say, per step and per device (medians over steps)."""

    steps: list[int]
    step_s: float  # median period of a step (ends of consecutive steps, slowest rank)
    busy_s: dict[str, float]  # device -> compute seconds per step (tasks less receives)
    task_s: dict[str, dict[str, float]]  # device -> kind -> compute seconds per step
    tasks: dict[str, int]  # device -> forward tasks counted (all steps)
    bytes_per_step: dict[str, float]  # link class -> bytes per step (all ranks)
    sync_s: dict[str, float]  # kind of sync -> seconds per step (slowest rank)
    transfers: dict[frozenset[str], list[tuple[int, float, bool]]] = field(default_factory=dict)
    device_of: dict[int, str] = field(default_factory=dict)


def usable_steps(lines: Sequence[dict[str, Any]], warmup: int | None = None) -> list[int]:
    """The steps every rank recorded, less the first `warmup` (default: 10%, at least 1
    when there are 3 or more)."""
    ranks = {line["rank"] for line in lines}
    per_step: dict[int, set[int]] = defaultdict(set)
    for line in lines:
        per_step[line["step"]].add(line["rank"])
    steps = sorted(s for s, seen in per_step.items() if seen == ranks)
    skip = warmup if warmup is not None else (max(1, len(steps) // 10) if len(steps) >= 3
                                               else 0)
    return steps[skip:]


def compute_seconds(line: dict[str, Any]) -> list[tuple[str, int, float]]:
    """(kind, microbatch, seconds) of each task: its time less the receives inside it."""
    receives = [(start, end) for *_, start, end in line["recv"]]
    out = []
    for kind, mb, start, end in line["tasks"]:
        waited = sum(min(end, r_end) - max(start, r_start) for r_start, r_end in receives
                     if r_start < end and r_end > start)
        out.append((kind, mb, max(0.0, end - start - waited)))
    return out


def measure(lines: Sequence[dict[str, Any]], warmup: int | None = None) -> Measured:
    steps = usable_steps(lines, warmup)
    wanted = set(steps)
    by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        by_step[line["step"]].append(line)
    ends = {s: max(line["end"] for line in by_step[s]) for s in by_step}
    periods = [ends[s] - ends[s - 1] for s in steps if s - 1 in ends]
    if not periods:  # one step: its own span
        periods = [ends[s] - min(line["start"] for line in by_step[s]) for s in steps]
    task_total: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    tasks: dict[str, int] = defaultdict(int)
    bytes_total: dict[str, float] = defaultdict(float)
    sync_per_step: dict[str, list[float]] = defaultdict(list)
    device_of: dict[int, str] = {}
    for line in lines:
        device_of[line["rank"]] = line["node"]
        if line["step"] not in wanted:
            continue
        for kind, _, seconds in compute_seconds(line):
            task_total[line["node"]][kind] += seconds
            tasks[line["node"]] += kind == "forward"
        for name, nbytes in line["bytes"].items():
            bytes_total[name] += nbytes
        spent: dict[str, float] = defaultdict(float)
        for kind, _, start, end in line["syncs"]:
            spent[kind] += end - start
        for kind, seconds in spent.items():
            sync_per_step[kind].append(seconds)
    n = max(1, len(steps))
    task_s = {d: {k: v / n for k, v in kinds.items()} for d, kinds in task_total.items()}
    return Measured(
        steps=steps, step_s=statistics.median(periods) if periods else 0.0,
        busy_s={d: sum(kinds.values()) for d, kinds in task_s.items()}, task_s=task_s,
        tasks=dict(tasks), bytes_per_step={k: v / n for k, v in bytes_total.items()},
        sync_s={k: max(v) for k, v in sync_per_step.items()},
        transfers=_transfers(lines, wanted), device_of=device_of)


def _transfers(lines: Sequence[dict[str, Any]],
               wanted: set[int]) -> dict[frozenset[str], list[tuple[int, float, bool]]]:
    """Host pair -> (bytes, transfer seconds, receiver was waiting) of each message."""
    host_of = {line["rank"]: line["host"] for line in lines}
    issued = {}
    for line in lines:
        if line["step"] in wanted:
            for peer, mb, kind, _, at in line["send"]:
                issued[(line["step"], line["rank"], peer, mb, kind)] = at
    out: dict[frozenset[str], list[tuple[int, float, bool]]] = defaultdict(list)
    for line in lines:
        if line["step"] not in wanted:
            continue
        for peer, mb, kind, nbytes, start, end in line["recv"]:
            at = issued.get((line["step"], peer, line["rank"], mb, kind))
            a, b = host_of[peer], host_of[line["rank"]]
            if at is None or a == b:
                continue
            out[frozenset((a, b))].append((nbytes, end - max(start, at), start <= at))
    return dict(out)


def fit_link(samples: Sequence[tuple[int, float, bool]], prior_latency_s: float
             ) -> tuple[float, float, str] | str:
    """(latency s, bytes/s, "fit" or "prior") from (bytes, seconds, waiting) samples, or
    why there is no figure."""
    waiting = [s for s in samples if s[2]]
    use = waiting if len(waiting) >= MIN_SAMPLES else list(samples)
    if len(use) < MIN_SAMPLES:
        return f"{len(use)} message(s), fewer than {MIN_SAMPLES}"
    sizes = {nbytes for nbytes, _, _ in use}
    if len(sizes) >= 2:
        xs = [float(nbytes) for nbytes, _, _ in use]
        ys = [seconds for _, seconds, _ in use]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        intercept = my - slope * mx
        if slope > 0 and intercept >= 0:
            return intercept, 1.0 / slope, "fit"
        if slope <= 0:
            return "time does not grow with size (slope <= 0)"
    nbytes = statistics.median(n for n, _, _ in use)
    seconds = statistics.median(s for _, s, _ in use) - prior_latency_s
    if seconds <= 0:
        return "messages took less than the prior latency"
    return prior_latency_s, nbytes / seconds, "prior"


def compute_intervals(line: dict[str, Any]) -> list[tuple[float, float]]:
    """(start, end) of each task's compute: from the end of the receive inside it."""
    waits = [(start, end) for *_, start, end in line["recv"]]
    return [(max([start, *(e for s, e in waits if start <= s < end)]), end)
            for _, _, start, end in line["tasks"]]


def core_shares(lines: Sequence[dict[str, Any]], wanted: set[int],
                topology: Topology) -> dict[str, float]:
    """device -> the share of a core its compute had (see the module docstring)."""
    hosts = {h.name: h for h in topology.hosts}
    machine_of = {name: h.machine or name for name, h in hosts.items()}
    events: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for line in lines:
        if line["step"] in wanted and line["host"] in hosts:
            machine = machine_of[line["host"]]
            for start, end in compute_intervals(line):
                events[machine] += [(start, 1, line["node"]), (end, -1, line["node"])]
    shares: dict[str, float] = {}
    for machine, marks in events.items():
        cores = next((h.cpu_cores for h in hosts.values() if machine_of[h.name] == machine),
                     None) or 1
        weighted: dict[str, float] = defaultdict(float)
        spent: dict[str, float] = defaultdict(float)
        active: dict[str, int] = defaultdict(int)
        last = None
        for at, step, node in sorted(marks):
            running = [n for n, k in active.items() if k > 0]
            if last is not None and running:
                share = min(1.0, cores / len(running))
                for n in running:
                    weighted[n] += (at - last) * share
                    spent[n] += at - last
            active[node] += step
            last = at
        shares |= {n: weighted[n] / spent[n] for n in spent if spent[n] > 0}
    return shares


def fit_devices(measured: Measured, plan: Plan, topology: Topology,
                notes: list[str], shares: dict[str, float] | None = None) -> list[DeviceFit]:
    layers = {d: stage.layers[1] - stage.layers[0] for stage in plan.stages for d in stage.devices}
    sharing = workers_per_machine(_plan_hosts(topology, plan))
    fits = []
    for device in sorted(measured.task_s):
        count, kinds = measured.tasks.get(device, 0), measured.task_s[device]
        if layers.get(device, 0) == 0:
            notes.append(f"device {device}: its stage holds no layers: no figure")
            continue
        if count < MIN_SAMPLES:
            notes.append(f"device {device}: {count} forward task(s), fewer than "
                         f"{MIN_SAMPLES}: prior kept")
            continue
        per_step_tasks = count / max(1, len(measured.steps))
        compute = sum(kinds.get(k, 0.0) for k in COMPUTE_KINDS)
        samples = per_step_tasks * plan.model.microbatch * layers[device]
        forward = kinds.get("forward", 0.0)
        fits.append(DeviceFit(
            device=device, seconds_per_layer_per_sample=float(f"{compute / samples:.6g}"),
            workers_on_machine=sharing[device.split(":", 1)[0]], samples=count,
            core_share=round(max(1e-3, (shares or {}).get(device, 1.0)), 4),
            backward_forward_ratio=round(kinds.get("backward", 0.0) / forward, 4)
            if forward > 0 else None))
    return fits


def _plan_hosts(topology: Topology, plan: Plan) -> Topology:
    """The topology with only the plan's hosts (the workers that shared a machine)."""
    used = {d.split(":", 1)[0] for stage in plan.stages for d in stage.devices}
    return topology.model_copy(update={"hosts": [h for h in topology.hosts if h.name in used]})


def fit_links(measured: Measured, topology: Topology, notes: list[str]) -> list[LinkFit]:
    fits = []
    for pair, samples in sorted(measured.transfers.items(), key=lambda kv: sorted(kv[0])):
        a, b = sorted(pair)
        link = topology.link(a, b)
        prior = (link.latency_ms or 0.0) / 1000 if link is not None else 0.0
        result = fit_link(samples, prior)
        if isinstance(result, str):
            notes.append(f"link {a}-{b}: {result}: prior kept")
            continue
        latency, rate, how = result
        if how == "prior":
            notes.append(f"link {a}-{b}: one message size only: latency kept at the prior "
                         f"{prior * 1000:.3g} ms, bandwidth fitted")
        fits.append(LinkFit(a=a, b=b, latency_ms=round(latency * 1000, 6),
                            bandwidth_gbps=round(rate * 8 / 1e9, 9), samples=len(samples),
                            sizes=len({n for n, _, _ in samples}), latency_from=how))
    return fits


RING_SYNCS = ("data", "zero")


def ring_samples(lines: Sequence[dict[str, Any]], wanted: set[int]
                 ) -> dict[tuple[int, int], list[tuple[list[str], list[tuple[int, float]]]]]:
    """(replica, stage) -> per step: (the group's hosts, [(wire bytes, least seconds)] of
    each of its ring collectives in order)."""
    groups: dict[tuple[int, int], dict[int, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))
    for line in lines:
        if line["step"] in wanted:
            groups[(line.get("replica", 0), line["stage"])][line["step"]].append(line)
    out: dict[tuple[int, int], list[tuple[list[str], list[tuple[int, float]]]]] = {}
    for key, steps in groups.items():
        for members in steps.values():
            if len(members) < 2:
                continue
            syncs = [[(n, end - start) for kind, n, start, end in m["syncs"]
                      if kind in RING_SYNCS and n > 0] for m in members]
            if not syncs[0] or len({len(x) for x in syncs}) != 1:
                continue
            least = [(parts[0][0], min(t for _, t in parts)) for parts in zip(*syncs, strict=True)]
            out.setdefault(key, []).append((sorted({m["host"] for m in members}), least))
    return out


def fit_ring_links(measured_lines: Sequence[dict[str, Any]], wanted: set[int],
                   topology: Topology, fitted: set[frozenset[str]],
                   notes: list[str]) -> list[LinkFit]:
    fits: dict[frozenset[str], LinkFit] = {}
    for (replica, stage), samples in sorted(ring_samples(measured_lines, wanted).items()):
        hosts = samples[0][0]
        pairs = [frozenset((a, b)) for i, a in enumerate(hosts) for b in hosts[i + 1:]]
        pairs = [p for p in pairs if p not in fitted and p not in fits]
        if not pairs:
            continue
        if len(samples) < MIN_SAMPLES:
            notes.append(f"replica {replica} stage {stage}: {len(samples)} step(s) of "
                         f"data-parallel syncs, fewer than {MIN_SAMPLES}: prior kept")
            continue
        hops = len(hosts) - 1
        prior = max((_prior_latency_s(topology, p) for p in pairs), default=0.0)
        rates = []
        for _, least in samples:
            seconds = sum(t for _, t in least) - len(least) * hops * prior
            if seconds > 0:
                rates.append(sum(n for n, _ in least) / seconds)
        if len(rates) < MIN_SAMPLES:
            notes.append(f"replica {replica} stage {stage}: data-parallel syncs took less "
                         "than the prior latency: prior kept")
            continue
        rate = statistics.median(rates)
        for pair in pairs:
            a, b = sorted(pair)
            fits[pair] = LinkFit(a=a, b=b, latency_ms=round(prior * 1000, 6),
                                 bandwidth_gbps=round(rate * 8 / 1e9, 9), samples=len(rates),
                                 sizes=1, latency_from="prior")
        names = ", ".join("-".join(sorted(p)) for p in pairs)
        notes.append(f"replica {replica} stage {stage}: links {names} fitted from its "
                     "data-parallel syncs (ring), latency kept at the prior")
    return list(fits.values())


def _prior_latency_s(topology: Topology, pair: frozenset[str]) -> float:
    link = topology.link(*sorted(pair))
    return (link.latency_ms or 0.0) / 1000 if link is not None else 0.0


def fit_calibration(lines: Sequence[dict[str, Any]], plan: Plan, topology: Topology,
                    predict_s: Callable[[Calibration], float], *, run: str,
                    plan_path: str, warmup: int | None = None) -> Calibration:
    """The calibration of a run; `predict_s(calibration)` is the calibrated simulation's
    step seconds (no overhead), from which the step overhead is fitted."""
    measured = measure(lines, warmup)
    notes: list[str] = []
    links = fit_links(measured, topology, notes)
    links += fit_ring_links(lines, set(measured.steps), topology,
                            {frozenset((f.a, f.b)) for f in links}, notes)
    calibration = Calibration(
        run=run, plan=plan_path, at=datetime.now(UTC).replace(microsecond=0),
        steps=len(measured.steps),
        devices=fit_devices(measured, plan, topology, notes,
                            core_shares(lines, set(measured.steps), topology)),
        links=links, notes=notes)
    if len(measured.steps) < MIN_SAMPLES:
        calibration.notes.append(f"{len(measured.steps)} usable step(s), fewer than "
                                 f"{MIN_SAMPLES}: no step overhead")
        return calibration
    predicted = predict_s(calibration)
    overhead = measured.step_s - predicted
    if overhead < 0:
        calibration.notes.append(f"the calibrated simulation ({predicted:.4g} s) is slower "
                                 f"than the measured step ({measured.step_s:.4g} s): "
                                 "step overhead 0")
    calibration.step_overhead_s = round(max(0.0, overhead), 6)
    return calibration
