"""The Plan schema: plan.yaml, the file a person reviews before any GPU hour is spent.

Stable keys (tools and people diff these files): `version`, `topology_sha256`, `model`,
`sync`, `replicas`, `stages`, `paths`, `groups`, `diloco`, `optimizer`, `launch`,
`estimates`, and `nccl_net_selection`, `left_out`, `idle` (see `Group`, `LeftOutHost`,
`IdleDevice`). The file
starts with a comment that says the plan in words. Devices are named `host:device`
(`a1:gpu0`); ranks follow `launch` (node by node, device by device). Layer ranges are
half-open: `layers: [0, 4]` holds layers 0, 1, 2 and 3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import Field, model_validator

from topology.files import load_yaml_mapping, write_text_atomic
from topology.validation import Strict, validate_as

PLAN_VERSION = 1

NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(gt=0)]


class PlanModel(Strict):
    """What the plan trains, as far as the runtime and a reviewer need to know."""

    name: str
    source: str | None = None
    layers: Positive
    hidden: Positive
    seq_len: Positive
    microbatch: Positive
    global_batch: Positive
    dtype: str


class Replica(Strict):
    """A pipeline that trains on its own share of the batch (a DiLoCo worker if `sync: diloco`)."""

    id: NonNegative
    fabrics: list[str]
    stages: list[NonNegative]


class Stage(Strict):
    id: NonNegative
    replica: NonNegative
    layers: tuple[NonNegative, NonNegative]
    devices: list[str] = Field(min_length=1)
    holds: list[Literal["embedding", "head"]] = Field(default_factory=list)


class MicrobatchPath(Strict):
    microbatch: NonNegative
    origin: str
    route: list[str] = Field(min_length=1)


class Group(Strict):
    """A process group with its backend and the NCCL/gloo environment chosen for its NICs.

    Kinds: `pipeline` (a replica's P2P traffic; a replica that spans fabrics may also have
    one per RDMA fabric, for the hops inside it), `data` (a stage's data-parallel devices,
    always inside one fabric), `replica` (per-step all-reduce of one stage lane across
    replicas, which does cross clusters) and `diloco` (the same lane's outer sync).
    `transport` is the network the group really runs on (`holmes.transports`);
    `nccl_config` the `ncclConfig_t` fields it is created with (`net_name`).
    """

    name: str
    kind: Literal["pipeline", "data", "replica", "diloco"]
    ranks: list[NonNegative] = Field(min_length=1)
    backend: Literal["nccl", "gloo"]
    transport: Literal["infiniband", "roce", "socket"] | None = None
    nccl_config: dict[str, str] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    env_per_host: dict[str, dict[str, str]] = Field(default_factory=dict)


class LeftOutHost(Strict):
    """A host of the topology the plan does not consider, and why."""

    host: str
    reason: str


class IdleDevice(Strict):
    """A device of the topology no stage uses, and why."""

    device: str
    reason: str


class DilocoSettings(Strict):
    sync_every: Positive
    fragments: Positive
    pattern: Literal["strided", "sequential"]
    overlap_steps: NonNegative
    alpha: Annotated[float, Field(ge=0, le=1)]
    quantization: Literal["fp4", "int8", "bf16", "none"]
    outer_lr: Annotated[float, Field(gt=0)] = 0.7
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9


class OptimizerSettings(Strict):
    """How each device holds its stage's optimizer state: `sharding: zero1` splits it over
    the stage's `data` group (ZeRO-1: 1/n of it per device, what `estimates.memory_gb`
    counts), `none` keeps all of it on every device. A plan written before this key
    existed loads as `none`: that is what its runs built (its memory figures assumed
    ZeRO-1; plan again for figures that match)."""

    sharding: Literal["zero1", "none"]


class LaunchHost(Strict):
    host: str
    address: str
    node_rank: NonNegative
    nproc_per_node: Positive
    devices: list[str]
    rdzv_endpoint: str


class Skipping(Strict):
    """SkipPipe paths: the skip ratio and swap limit the routes in `paths` obey, and how
    many microbatches each device may hold at once (its memory cap while routes skip)."""

    ratio: Annotated[float, Field(ge=0, lt=1)]
    max_swaps: Annotated[int, Field(ge=0)]
    seed: int = 0
    in_flight: dict[str, Annotated[int, Field(ge=1)]]
    full_pipeline_s: Annotated[float, Field(ge=0)]


class Estimates(Strict):
    iteration_s: Annotated[float, Field(ge=0)]
    tokens_per_s: Annotated[float, Field(ge=0)]
    bytes_per_step: dict[str, float]
    memory_gb: dict[str, float]
    bubble_fraction: Annotated[float, Field(ge=0, le=1)]
    sync_s_per_step: Annotated[float, Field(ge=0)] = 0.0


class Plan(Strict):
    version: int
    topology_sha256: str
    topology_file: str | None = None
    model: PlanModel
    sync: Literal["allreduce", "diloco"]
    replicas: list[Replica] = Field(min_length=1)
    stages: list[Stage] = Field(min_length=1)
    paths: list[MicrobatchPath]
    skipping: Skipping | None = None
    groups: list[Group]
    nccl_net_selection: Literal["per-communicator", "per-process"] | None = None
    diloco: DilocoSettings | None = None
    optimizer: OptimizerSettings = Field(
        default_factory=lambda: OptimizerSettings(sharding="none"))
    launch: list[LaunchHost] = Field(min_length=1)
    estimates: Estimates
    left_out: list[LeftOutHost] = Field(default_factory=list)
    idle: list[IdleDevice] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.version != PLAN_VERSION:
            raise ValueError(
                f"version: unsupported version {self.version}, expected {PLAN_VERSION}"
            )
        if (self.sync == "diloco") != (self.diloco is not None):
            raise ValueError("diloco: needed exactly when sync is diloco")
        self._check_stages()
        self._check_paths()
        self._check_ranks()
        return self

    def _check_stages(self) -> None:
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            start, end = stage.layers
            if not 0 <= start < end <= self.model.layers:
                raise ValueError(f"stages[{i}].layers: [{start}, {end}) is not inside "
                                 f"[0, {self.model.layers})")
            for device in stage.devices:
                if device in seen:
                    raise ValueError(f"stages[{i}].devices: {device} is in two stages")
                seen.add(device)
        for replica in self.replicas:
            ranges = sorted(self.stage(s).layers for s in replica.stages)
            covered = [0] + [end for _, end in ranges]
            if [start for start, _ in ranges] != covered[:-1] or covered[-1] != self.model.layers:
                raise ValueError(f"replicas[{replica.id}].stages: layers do not cover "
                                 f"0..{self.model.layers} exactly once")

    def _check_paths(self) -> None:
        known = {d for s in self.stages for d in s.devices}
        for i, path in enumerate(self.paths):
            if path.route[0] != path.origin:
                raise ValueError(f"paths[{i}].route: must start at its origin {path.origin}")
            unknown = [d for d in path.route if d not in known]
            if unknown:
                raise ValueError(f"paths[{i}].route: unknown device {unknown[0]}")

    def _check_ranks(self) -> None:
        world = sum(h.nproc_per_node for h in self.launch)
        if sorted(h.node_rank for h in self.launch) != list(range(len(self.launch))):
            raise ValueError("launch: node_rank must number the hosts 0..n-1")
        for i, group in enumerate(self.groups):
            if max(group.ranks) >= world:
                raise ValueError(f"groups[{i}].ranks: rank {max(group.ranks)} >= world {world}")

    def stage(self, stage_id: int) -> Stage:
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        raise ValueError(f"stages: no stage with id {stage_id}")

    def rank_of(self) -> dict[str, int]:
        """Global rank of every device, in launch order."""
        ranks: dict[str, int] = {}
        for host in sorted(self.launch, key=lambda h: h.node_rank):
            for device in host.devices:
                ranks[device] = len(ranks)
        return ranks

    def to_plain(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        return json.dumps(self.to_plain(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_plain(), sort_keys=False, default_flow_style=None,
                              width=110)


def load_plan(path: str | Path) -> Plan:
    return validate_as(Plan, load_yaml_mapping(path), path)


def save_plan(plan: Plan, path: str | Path, summary: list[str]) -> None:
    """Write `plan` atomically, with `summary` (plain sentences) as the header comment."""
    header = "".join(f"# {line}\n" for line in summary)
    write_text_atomic(path, header + plan.to_yaml())
