"""The cost model's assumptions, as data: one place for every number the estimate assumes.

A `CostAssumptions` holds what the estimate and the pipeline simulator would otherwise
hard-code:

- `in_flight`: how many microbatches a device may hold at once. `auto` (hetsched's
  own): 1F1B's cap (`holmes.estimate.in_flight_cap`) for full pipelines and what memory
  allows for skip routes; `memory`: what memory allows, for every route; a number N: N
  on every device (SkipPipe's simulator: 3), whatever the memory says (the memory
  estimate and the layer split then reserve N).
- `backward_ratio`: backward seconds / forward seconds of a layer (2.0: the
  2 x FLOPs of Narayanan et al. 2021; SkipPipe: 1.5). Full recomputation adds one forward.
- `head_loss`: `flops` (the output projection's FLOPs, forward + backward at
  `backward_ratio`), or a number f: one loss task of f x the forward seconds of the stage
  that runs it (SkipPipe: 0.25 of the origin's forward).
- `hop_seconds`: fixed seconds added to every pipeline hop (activations or gradients),
  beyond the link's latency (SkipPipe: 0.35 s of host-device copies).
- `compute_efficiency`: the share of a device's stated speed it really delivers (its
  TFLOPS, or the model's measured seconds, are divided by it): one number for every
  device, or a mapping from `host:device`, host name, device kind (`gpu`, `cpu`) or
  `default` to a number; the most specific key wins.
- `link_efficiency`: the share of each link's bandwidth transfers really get.
- `data_parallel`: `counted` (hetsched's): each stage's data-parallel all-reduce runs
  after its last backward and counts in the iteration; `ignored`: it does not (SkipPipe's
  simulator scores the pipeline alone, the last backward back at its origin).

Sources, most specific first: `--costs FILE|NAME` (a file holding a `costs:` section, or a
profile shipped in `holmes/cost_profiles/`), the model.yaml's `costs:` section, the
`default` profile. The plan records the assumptions it was made with.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from topology.errors import InputError
from topology.files import load_yaml_mapping
from topology.validation import Strict, Version, bounded_float, bounded_int, validate_as

PROFILE_DIR = Path(__file__).resolve().parent / "cost_profiles"
PROFILE_VERSION = 1
MAX_IN_FLIGHT = 4096
MAX_EFFICIENCY_KEYS = 8192
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

Efficiency = bounded_float(0, 10, low_open=True)
EfficiencyKey = Annotated[str, Field(min_length=1, max_length=127,
                                     pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
ProfileName = Annotated[str, Field(min_length=1, max_length=63,
                                   pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class CostAssumptions(Strict):
    """Every assumption of the estimate (module docstring); the defaults are hetsched's."""

    name: ProfileName = "custom"
    in_flight: Literal["auto", "memory"] | bounded_int(1, MAX_IN_FLIGHT, "microbatches") = "auto"
    backward_ratio: bounded_float(0, 100) = 2.0
    head_loss: Literal["flops"] | bounded_float(0, 100) = "flops"
    hop_seconds: bounded_float(0, 3600, "s") = 0.0
    compute_efficiency: Efficiency | Annotated[
        dict[EfficiencyKey, Efficiency], Field(max_length=MAX_EFFICIENCY_KEYS)] = 1.0
    link_efficiency: Efficiency = 1.0
    data_parallel: Literal["counted", "ignored"] = "counted"

    def efficiency(self, host: str, device: str, kind: str) -> float:
        """The compute efficiency of `host:device` (a `kind` device)."""
        table = self.compute_efficiency
        if not isinstance(table, dict):
            return table
        for key in (f"{host}:{device}", host, kind, "default"):
            if key in table:
                return table[key]
        return 1.0

    def summary(self) -> str:
        """One line: the profile's name and values."""
        values = self.model_dump(mode="json", exclude={"name"})
        return f"{self.name} (" + ", ".join(f"{k} {v}" for k, v in values.items()) + ")"


class CostsFile(Strict):
    """A cost-assumptions file: `version: 1` and a `costs:` section."""

    version: Version
    costs: CostAssumptions


def list_profiles() -> list[str]:
    """Names of the profiles shipped with the package."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_costs_file(path: Path) -> CostAssumptions:
    """A file with a `costs:` section (a costs file, or a model.yaml), validated."""
    data = load_yaml_mapping(path)
    if "costs" not in data:
        raise InputError("has no costs: section", path, "costs")
    if "model" in data:  # a model.yaml: only its costs section matters here
        data = {"version": data.get("version"), "costs": data["costs"]}
    found = validate_as(CostsFile, data, path)
    if found.version != PROFILE_VERSION:
        raise InputError(f"unsupported version {found.version}, expected {PROFILE_VERSION}",
                         path, "version")
    return found.costs


def load_costs(name_or_path: str) -> CostAssumptions:
    """`--costs FILE|NAME`: an existing file wins over a profile of the same name."""
    path = Path(name_or_path)
    if path.is_file():
        return _named(load_costs_file(path), path.stem)
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml", ".json")):
        raise InputError("file not found", path, "--costs")
    if name_or_path in list_profiles():
        return load_costs_file(PROFILE_DIR / f"{name_or_path}.yaml")
    raise InputError(f"no file or cost profile '{name_or_path}' (profiles: "
                     f"{', '.join(list_profiles())})", field="--costs")


def default_costs() -> CostAssumptions:
    return CostAssumptions(name="default")


def resolve_costs(option: str | None, model_costs: CostAssumptions | None) -> CostAssumptions:
    """The assumptions in effect: `--costs`, else the model's `costs:`, else `default`."""
    if option is not None:
        return load_costs(option)
    return model_costs if model_costs is not None else default_costs()


def _named(costs: CostAssumptions, stem: str) -> CostAssumptions:
    """A file's assumptions keep their own name; unnamed ones take the file's (when it
    makes a valid name)."""
    if "name" in costs.model_fields_set or not _NAME.match(stem):
        return costs
    return costs.model_copy(update={"name": stem})


def costs_plain(costs: CostAssumptions) -> dict[str, Any]:
    return costs.model_dump(mode="json")
