"""The calibration file: what a run measured, in the units the planner reads.

`hetsched calibrate RUN_DIR -o calibration.yaml` writes it (`holmes.calibrate` fits it
from the run's timings); `hetsched plan/simulate/show/report --calibration FILE` read
it. It may also be a `calibration:` section of topology.yaml. Version 1:

    version: 1
    calibration:
      run: runs/demo                # the run it was fitted from, and when
      plan: runs/demo/plan.yaml
      at: 2026-12-02T07:30:00Z
      steps: 18                     # steps used (warm-up left out)
      step_overhead_s: 0.004        # measured step less the calibrated simulation
      devices:                      # compute under the run's contention
        - {device: h1:cpu0, seconds_per_layer_per_sample: 0.0012, workers_on_machine: 4,
           core_share: 0.8, samples: 144, backward_forward_ratio: 2.1}
      links:                        # least squares of transfer time over size
        - {a: h1, b: h3, latency_ms: 10.2, bandwidth_gbps: 0.048, samples: 72, sizes: 1,
           latency_from: prior}
      notes: [...]                  # figures left at their prior, and why

`seconds_per_layer_per_sample` is forward + backward of one layer for one sample, as
measured while `workers_on_machine` workers shared the device's machine (hosts of one
machine: the same `machine` in topology.yaml); `core_share` is the share of a core its
tasks had on average (min(1, cores / tasks running at once on the machine)).
`holmes.calibration.with_calibration` puts the links' figures into a topology and
attaches the rest; the estimate reads the devices' figures from there. A bad file is
one `InputError` naming the field.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from topology.errors import InputError
from topology.files import load_yaml_mapping, write_text_atomic
from topology.validation import Strict, Version, bounded_float, bounded_int, validate_as

CALIBRATION_VERSION = 1
MAX_ENTRIES = 100_000

HostName = Annotated[str, Field(min_length=1, max_length=63,
                                pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
DeviceName = Annotated[str, Field(min_length=3, max_length=127,
                                  pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*:[A-Za-z0-9][\w.-]*$")]
Text = Annotated[str, Field(max_length=4096)]
Count = bounded_int(0, 10**12)


class DeviceFit(Strict):
    device: DeviceName
    seconds_per_layer_per_sample: bounded_float(0, 1e6, "s", low_open=True)
    workers_on_machine: bounded_int(1, 1_000_000) = 1
    core_share: bounded_float(0, 1, low_open=True) = 1.0
    samples: Count = 0
    backward_forward_ratio: bounded_float(0, 1000) | None = None


class LinkFit(Strict):
    a: HostName
    b: HostName
    latency_ms: bounded_float(0, 60_000, "ms")
    bandwidth_gbps: bounded_float(1e-6, 100_000, "Gbit/s")
    samples: Count = 0
    sizes: Count = 0
    latency_from: Literal["fit", "prior"] = "fit"


class Calibration(Strict):
    run: Text | None = None
    plan: Text | None = None
    at: datetime | None = None
    steps: Count = 0
    step_overhead_s: bounded_float(0, 3600, "s") = 0.0
    devices: list[DeviceFit] = Field(default_factory=list, max_length=MAX_ENTRIES)
    links: list[LinkFit] = Field(default_factory=list, max_length=MAX_ENTRIES)
    notes: list[Text] = Field(default_factory=list, max_length=MAX_ENTRIES)

    def device(self, name: str) -> DeviceFit | None:
        return next((d for d in self.devices if d.device == name), None)


class CalibrationFile(Strict):
    version: Version
    calibration: Calibration


def load_calibration(path: str | Path) -> Calibration:
    """Read and validate a calibration file (or raise one InputError naming the field)."""
    data = validate_as(CalibrationFile, load_yaml_mapping(path), path)
    if data.version != CALIBRATION_VERSION:
        raise InputError(f"unsupported version {data.version}, expected "
                         f"{CALIBRATION_VERSION}", path, "version")
    _check_unique(data.calibration, path)
    return data.calibration


def _check_unique(calibration: Calibration, path: str | Path) -> None:
    seen: set[Any] = set()
    for i, device in enumerate(calibration.devices):
        if device.device in seen:
            raise InputError(f"device {device.device} given twice", path,
                             f"calibration.devices[{i}].device")
        seen.add(device.device)
    for i, link in enumerate(calibration.links):
        key = frozenset((link.a, link.b))
        if link.a == link.b or key in seen:
            raise InputError(f"link {link.a}-{link.b} given twice or joins a host to itself",
                             path, f"calibration.links[{i}]")
        seen.add(key)


def calibration_yaml(calibration: Calibration, header: str = "") -> str:
    data = {"version": CALIBRATION_VERSION,
            "calibration": calibration.model_dump(mode="json", exclude_none=True)}
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def save_calibration(calibration: Calibration, path: str | Path, header: str = "") -> None:
    write_text_atomic(path, calibration_yaml(calibration, header))


def check_against(calibration: Calibration, hosts: dict[str, list[str]],
                  path: str | Path) -> None:
    """Refuse a calibration naming a host or device the topology (`hosts`: host -> its
    device names) does not have: it was fitted on another cluster."""
    for i, device in enumerate(calibration.devices):
        host, name = device.device.split(":", 1)
        if name not in hosts.get(host, []):
            raise InputError(f"device {device.device} is not in the topology (a calibration "
                             "of another cluster?)", path, f"calibration.devices[{i}].device")
    for i, link in enumerate(calibration.links):
        for end in ("a", "b"):
            if getattr(link, end) not in hosts:
                raise InputError(f"host {getattr(link, end)} is not in the topology",
                                 path, f"calibration.links[{i}].{end}")
