"""What the estimate takes from a calibration, and from hosts that share a machine.

- `with_calibration(topology, calibration)`: the topology with each calibrated link's
  latency and bandwidth replaced by the fitted ones and the calibration attached
  (`topology.calibration`), after checking it names only hosts and devices it has.
- `device_tflops(topology, model, recompute)`: every device's effective TFLOPS as the
  estimate uses them. A calibrated device's speed comes from its measured seconds per
  layer per sample (forward + backward; `costs.train_time_factor` x a layer's forward
  FLOPs over those seconds). CPU devices of hosts on one machine (the same
  `machine`) share its cores: a probe times one thread (one worker, as the scripts run
  them), and k workers on c cores, each computing a fraction `busy` of the step, get
  min(1, c / (k busy)) of a core each (`holmes.estimate` runs the simulation again with
  the busy fraction the first run predicts); a calibrated figure was measured at the
  share of a core its tasks really had (`core_share`: the other workers' tasks that ran
  at the same time), so it is divided by that and multiplied by the predicted one.
- `step_overhead_s(topology)`: the calibration's fixed seconds per step (0 without one).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from holmes import costs
from holmes.model import ModelSpec, Recompute
from topology.calibration import Calibration, check_against
from topology.schema import Topology


def with_calibration(topology: Topology, calibration: Calibration | None,
                     path: str | Path = "<calibration>") -> Topology:
    if calibration is None:
        return topology
    check_against(calibration, {h.name: [d.name for d in h.devices] for h in topology.hosts},
                  path)
    fitted = {frozenset((link.a, link.b)): link for link in calibration.links}
    links = []
    for link in topology.links:
        fit = fitted.get(link.key())
        if fit is not None and link.status == "ok":
            link = link.model_copy(update={"latency_ms": fit.latency_ms,
                                           "bandwidth_gbps": fit.bandwidth_gbps})
        links.append(link)
    return topology.model_copy(update={"links": links, "calibration": calibration})


def core_share(workers: float, cores: int | None) -> float:
    """The share of a core each of `workers` busy single-thread workers gets on `cores`."""
    return min(1.0, (cores or 1) / max(1.0, workers))


def shares_cores(topology: Topology, devices: list[str]) -> bool:
    """Whether some CPU device of `devices` shares its machine's cores with others."""
    sharing = workers_per_machine(topology)
    hosts = {d.split(":", 1)[0] for d in devices}
    return any(sharing[h.name] > (h.cpu_cores or 1) for h in topology.hosts if h.name in hosts
               and any(d.kind == "cpu" for d in h.devices))


def busy_fraction(bubble: float, iteration_s: float, step_s: float) -> float:
    """Of a step, the share a worker computes: 1 - bubble of the iteration, over the step."""
    if step_s <= 0:
        return 1.0
    return min(1.0, max(0.05, (1.0 - bubble) * iteration_s / step_s))


def workers_per_machine(topology: Topology) -> dict[str, int]:
    """host -> the CPU devices of every host on its machine (1 for a host of its own)."""
    count: Counter[str] = Counter()
    for host in topology.hosts:
        if host.machine:
            count[host.machine] += sum(1 for d in host.devices if d.kind == "cpu")
    return {h.name: max(1, count[h.machine]) if h.machine else 1 for h in topology.hosts}


def device_tflops(topology: Topology, model: ModelSpec, recompute: Recompute = "selective",
                  busy: float = 1.0) -> dict[str, float | None]:
    """`host:device` -> effective TFLOPS (None where unknown); see the module docstring.
    `busy`: the share of the time a worker computes (k workers count as k x busy)."""
    sharing = workers_per_machine(topology)
    calibration = topology.calibration
    rates: dict[str, float | None] = {}
    for host in topology.hosts:
        for device in host.devices:
            name = f"{host.name}:{device.name}"
            cpu = device.kind == "cpu"
            share = core_share(sharing[host.name] * busy, host.cpu_cores) if cpu else 1.0
            fit = calibration.device(name) if calibration is not None else None
            if fit is not None:
                then = fit.core_share if cpu else 1.0
                rates[name] = (tflops_of(fit.seconds_per_layer_per_sample, model, recompute)
                               * share / then)
            elif device.tflops is not None:
                rates[name] = device.tflops * share
            else:
                rates[name] = None
    return rates


def tflops_of(seconds_per_layer_per_sample: float, model: ModelSpec,
              recompute: Recompute = "selective") -> float:
    """The TFLOPS at which the cost model takes these seconds for a layer's training."""
    flops = costs.train_time_factor(recompute) * costs.layer_forward_flops(model)
    return flops / seconds_per_layer_per_sample / 1e12


def step_overhead_s(topology: Topology) -> float:
    return topology.calibration.step_overhead_s if topology.calibration is not None else 0.0
