"""The Plan schema: plan.yaml, the file a person reviews before any GPU hour is spent.

Stable keys (tools and people diff these files): `version`, `topology_sha256`, `model`,
`sync`, `replicas`, `stages`, `paths`, `groups`, `diloco`, `optimizer`, `launch`,
`launch_policy`, `estimates`, and `nccl_net_selection`, `left_out`, `idle` (see `Group`,
`LeftOutHost`, `IdleDevice`). The file
starts with a comment that says the plan in words. Devices are named `host:device`
(`a1:gpu0`); ranks follow `launch` (node by node, device by device). Layer ranges are
half-open: `layers: [0, 4]` holds layers 0, 1, 2 and 3.

Tensor parallelism: a stage's `tensor_parallel` t (default 1, what a plan written before
the key existed loads as) splits its devices, in order, into TP groups of t consecutive
devices of one host (Megatron's rank order: TP innermost, then data parallel). A group
is named by its first device (TP rank 0) in `paths`; `groups` holds one `tp` group per
TP group, and the `data` (and `replica`/`diloco`) groups are per TP rank.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import Field, PrivateAttr, model_validator

from holmes.assumptions import CostAssumptions
from holmes.model import MAX_MICROBATCHES, Dtype, GlobalBatch, Layers, Microbatch, SeqLen
from holmes.model import Hidden as HiddenSize
from topology.addresses import Endpoint
from topology.addresses import Host as HostAddress
from topology.files import load_yaml_mapping, write_text_atomic
from topology.schema import MAX_DEVICES_PER_HOST, MAX_HOSTS, Name
from topology.validation import Strict, Version, bounded_float, bounded_int, validate_as

PLAN_VERSION = 1
MAX_WORLD = MAX_HOSTS * MAX_DEVICES_PER_HOST

DeviceId = Annotated[str, Field(max_length=127, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*:"
                                r"[A-Za-z0-9][A-Za-z0-9._-]*$")]
Label = Annotated[str, Field(min_length=1, max_length=127, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
EnvName = Annotated[str, Field(max_length=255, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
EnvValue = Annotated[str, Field(max_length=4096, pattern=r"^[^\x00]*$")]
Index = bounded_int(0, MAX_WORLD - 1)
Rank = bounded_int(0, MAX_WORLD - 1)
LayerBound = bounded_int(0, 1024)
Seconds = bounded_float(0, 1e20, "s")


class PlanModel(Strict):
    """What the plan trains, as far as the runtime and a reviewer need to know."""

    name: Name
    source: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    layers: Layers
    hidden: HiddenSize
    seq_len: SeqLen
    microbatch: Microbatch
    global_batch: GlobalBatch
    dtype: Dtype


class Replica(Strict):
    """A pipeline that trains on its own share of the batch (a DiLoCo worker if `sync: diloco`)."""

    id: Index
    fabrics: list[Label] = Field(max_length=MAX_WORLD)
    stages: list[Index] = Field(min_length=1, max_length=MAX_WORLD)


class Stage(Strict):
    id: Index
    replica: Index
    layers: tuple[LayerBound, LayerBound]
    devices: list[DeviceId] = Field(min_length=1, max_length=MAX_WORLD)
    holds: list[Literal["embedding", "head"]] = Field(default_factory=list, max_length=2)
    tensor_parallel: bounded_int(1, MAX_DEVICES_PER_HOST) = 1

    def tp_groups(self) -> list[list[str]]:
        """The stage's TP groups in order (one device each without tensor parallelism)."""
        t = self.tensor_parallel
        return [self.devices[i:i + t] for i in range(0, len(self.devices), t)]

    def leaders(self) -> list[str]:
        """The first device of each TP group: the stage's devices as routes name them."""
        return self.devices[::self.tensor_parallel]


class MicrobatchPath(Strict):
    microbatch: bounded_int(0, MAX_MICROBATCHES - 1)
    origin: DeviceId
    route: list[DeviceId] = Field(min_length=1, max_length=MAX_WORLD)


class Group(Strict):
    """A process group with its backend and the NCCL/gloo environment chosen for its NICs.

    Kinds: `pipeline` (a replica's P2P traffic; a replica that spans fabrics may also have
    one per RDMA fabric, for the hops inside it), `data` (a stage's data-parallel devices,
    always inside one fabric; per TP rank with tensor parallelism), `replica` (per-step
    all-reduce of one stage lane across replicas, which does cross clusters), `diloco`
    (the same lane's outer sync) and `tp` (a stage's tensor-parallel group, one host).
    `transport` is the network the group really runs on (`holmes.transports`);
    `nccl_config` the `ncclConfig_t` fields it is created with (`net_name`).
    """

    name: Name
    kind: Literal["pipeline", "data", "replica", "diloco", "tp"]
    ranks: list[Rank] = Field(min_length=1, max_length=MAX_WORLD)
    backend: Literal["nccl", "gloo"]
    transport: Literal["infiniband", "roce", "socket"] | None = None
    nccl_config: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=64)
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=256)
    env_per_host: dict[Name, dict[EnvName, EnvValue]] = Field(default_factory=dict,
                                                              max_length=MAX_HOSTS)


class LeftOutHost(Strict):
    """A host of the topology the plan does not consider, and why."""

    host: Name
    reason: Annotated[str, Field(max_length=4096)]


class IdleDevice(Strict):
    """A device of the topology no stage uses, and why."""

    device: DeviceId
    reason: Annotated[str, Field(max_length=4096)]


class DilocoSettings(Strict):
    """Streaming DiLoCo's settings (`diloco.DiLoCoConfig`). `timeout_s`: how long a replica
    waits for an exchange before it fails (a plan written before this key existed loads
    with 300 s, what its runs used)."""

    sync_every: bounded_int(1, 1_000_000, "steps")
    fragments: bounded_int(1, 1024)
    pattern: Literal["strided", "sequential"]
    overlap_steps: bounded_int(0, 1_000_000, "steps")
    alpha: bounded_float(0, 1)
    quantization: Literal["fp4", "int8", "bf16", "none"]
    outer_lr: bounded_float(0, 100, low_open=True) = 0.7
    outer_momentum: bounded_float(0, 1, high_open=True) = 0.9
    # how the lanes of a stage share the exchange across the WAN (`diloco.relay`):
    # `sharded` (lane j exchanges 1/k, then the lanes all-gather: on the lab 2x faster
    # than `lead`, docs/diloco.md), `lead` (lane 0 exchanges, then broadcasts in its
    # stage) or `per_lane` (every lane exchanges all of it: k times the WAN bytes; kept to
    # compare against)
    exchange: Literal["sharded", "lead", "per_lane"] = "sharded"
    timeout_s: bounded_float(1, 1e6, "s") = 300.0

    @model_validator(mode="after")
    def _steps_fit(self) -> Self:
        if self.fragments > self.sync_every:
            raise ValueError(f"fragments: {self.fragments} fragments need sync_every >= "
                             f"{self.fragments}, got {self.sync_every}")
        if self.overlap_steps >= self.sync_every:
            raise ValueError(f"overlap_steps: must be less than sync_every {self.sync_every}, "
                             f"got {self.overlap_steps}")
        return self


class OptimizerSettings(Strict):
    """How each device holds its stage's optimizer state: `sharding: zero1` splits it over
    the stage's `data` group (ZeRO-1: 1/n of it per device, what `estimates.memory_gb`
    counts), `none` keeps all of it on every device. A plan written before this key
    existed loads as `none`: that is what its runs built (its memory figures assumed
    ZeRO-1; plan again for figures that match)."""

    sharding: Literal["zero1", "none"]


class LaunchHost(Strict):
    host: Name
    address: HostAddress
    node_rank: bounded_int(0, MAX_HOSTS - 1)
    nproc_per_node: bounded_int(1, MAX_DEVICES_PER_HOST)
    devices: list[DeviceId] = Field(min_length=1, max_length=MAX_DEVICES_PER_HOST)
    rdzv_endpoint: Endpoint


class LaunchPolicy(Strict):
    """How `hetsched launch` watches the run: a host whose workers send no heartbeat, or
    make no progress, for `hang_timeout_s` is named as hung and the launch is stopped
    (`cli.hangs`). A plan written before this key existed loads with the default."""

    hang_timeout_s: bounded_float(1, 1e6, "s") = 60.0


class Skipping(Strict):
    """SkipPipe paths: the skip ratio and swap limit the routes in `paths` obey, and how
    many microbatches each device may hold at once (its memory cap while routes skip)."""

    ratio: bounded_float(0, 1, high_open=True)
    max_swaps: bounded_int(0, 1024)
    seed: bounded_int(0, 2**63 - 1) = 0
    in_flight: dict[DeviceId, bounded_int(1, MAX_MICROBATCHES)] = Field(max_length=MAX_WORLD)
    full_pipeline_s: Seconds


class Estimates(Strict):
    iteration_s: Seconds
    tokens_per_s: bounded_float(0, 1e24, "tokens/s")
    bytes_per_step: dict[Label, bounded_float(0, 1e24, "bytes")] = Field(max_length=64)
    memory_gb: dict[DeviceId, bounded_float(0, 100_000, "GB")] = Field(max_length=MAX_WORLD)
    bubble_fraction: bounded_float(0, 1)
    sync_s_per_step: Seconds = 0.0


class DepthEstimate(Strict):
    """What the planner predicted for one pipeline depth it tried (its fastest layout)."""

    regime: Literal["datacentre", "geo"]
    stages: bounded_int(1, MAX_WORLD)
    iteration_s: Seconds
    tokens_per_s: bounded_float(0, 1e24, "tokens/s")


class Plan(Strict):
    """A whole plan.yaml. Loading it cross-checks every section against the others
    (`_consistent`), so show, simulate, launch and the runtime all refuse the same
    hand edits, naming the field, before anything reads a stage, a route or a rank."""

    version: Version
    topology_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    topology_file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    model: PlanModel
    sync: Literal["allreduce", "diloco"]
    replicas: list[Replica] = Field(min_length=1, max_length=MAX_WORLD)
    stages: list[Stage] = Field(min_length=1, max_length=MAX_WORLD)
    paths: list[MicrobatchPath] = Field(min_length=1, max_length=MAX_MICROBATCHES)
    skipping: Skipping | None = None
    groups: list[Group] = Field(max_length=4 * MAX_WORLD)
    nccl_net_selection: Literal["per-communicator", "per-process"] | None = None
    diloco: DilocoSettings | None = None
    optimizer: OptimizerSettings = Field(
        default_factory=lambda: OptimizerSettings(sharding="none"))
    launch: list[LaunchHost] = Field(min_length=1, max_length=MAX_HOSTS)
    launch_policy: LaunchPolicy = Field(default_factory=LaunchPolicy)
    estimates: Estimates
    costs: CostAssumptions | None = None  # the cost assumptions the estimates were made with
    depths: list[DepthEstimate] = Field(default_factory=list, max_length=MAX_WORLD)
    left_out: list[LeftOutHost] = Field(default_factory=list, max_length=MAX_HOSTS)
    idle: list[IdleDevice] = Field(default_factory=list, max_length=MAX_WORLD)
    _stage_by_id: dict[int, Stage] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.version != PLAN_VERSION:
            raise ValueError(
                f"version: unsupported version {self.version}, expected {PLAN_VERSION}"
            )
        if (self.sync == "diloco") != (self.diloco is not None):
            raise ValueError("diloco: needed exactly when sync is diloco")
        self._check_replicas()
        self._check_stages()
        self._check_tensor_parallel()
        self._check_launch()
        self._check_paths()
        self._check_groups()
        self._check_device_maps()
        return self

    def _check_replicas(self) -> None:
        stage_ids = _unique([s.id for s in self.stages], "stages", "id")
        self._stage_by_id = {stage.id: stage for stage in self.stages}
        for i, replica in enumerate(self.replicas):
            if replica.id != i:
                raise ValueError(f"replicas[{i}].id: replicas are numbered 0..n-1 in order, "
                                 f"expected {i}, got {replica.id}")
            for j, stage_id in enumerate(replica.stages):
                if stage_id not in stage_ids:
                    raise ValueError(f"replicas[{i}].stages[{j}]: unknown stage {stage_id}")
                if self.stages[stage_ids[stage_id]].replica != i:
                    raise ValueError(f"replicas[{i}].stages[{j}]: stage {stage_id} says it is "
                                     f"in replica {self.stages[stage_ids[stage_id]].replica}")
        listed = Counter(s for replica in self.replicas for s in replica.stages)
        for i, stage in enumerate(self.stages):
            if stage.replica >= len(self.replicas):
                raise ValueError(f"stages[{i}].replica: unknown replica {stage.replica}")
            if listed[stage.id] != 1:
                raise ValueError(f"stages[{i}]: stage {stage.id} is listed by {listed[stage.id]} "
                                 f"replicas' stages, expected 1")

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
        first = self.replicas[0]
        for replica in self.replicas:
            stages = [self.stage(s) for s in replica.stages]
            ends = [0] + [stage.layers[1] for stage in stages]
            if [stage.layers[0] for stage in stages] != ends[:-1] or \
                    ends[-1] != self.model.layers:
                raise ValueError(f"replicas[{replica.id}].stages: layers do not cover "
                                 f"0..{self.model.layers} in order, exactly once")
            if [self.stage(s).layers for s in first.stages] != [s.layers for s in stages]:
                raise ValueError(f"replicas[{replica.id}].stages: every replica splits the "
                                 "layers the same way (replica 0's split)")
            self._check_holds(replica.id, stages)

    def _check_tensor_parallel(self) -> None:
        for i, stage in enumerate(self.stages):
            t = stage.tensor_parallel
            if len(stage.devices) % t:
                raise ValueError(f"stages[{i}].tensor_parallel: {t} does not divide the "
                                 f"stage's {len(stage.devices)} devices")
            for j, group in enumerate(stage.tp_groups()):
                if len({d.split(":", 1)[0] for d in group}) > 1:
                    raise ValueError(f"stages[{i}].devices: TP group {j} ({', '.join(group)}) "
                                     "spans hosts; a TP group is t consecutive devices of "
                                     "one host")
        for replica in self.replicas[1:]:
            for k, (mine, first) in enumerate(zip(replica.stages, self.replicas[0].stages,
                                                  strict=False)):
                if self.stage(mine).tensor_parallel != self.stage(first).tensor_parallel:
                    raise ValueError(f"replicas[{replica.id}].stages[{k}]: tensor_parallel "
                                     "differs from replica 0's stage at the same place")

    def _check_holds(self, replica: int, stages: list[Stage]) -> None:
        embedding = [s.id for s in stages if "embedding" in s.holds]
        head = [s.id for s in stages if "head" in s.holds]
        first = self.stage(self.replicas[0].stages[0])
        if embedding != [stages[0].id]:
            raise ValueError(f"replicas[{replica}].stages: the first stage, and only it, holds "
                             f"the embedding (holds: embedding), got stages {embedding}")
        if len(head) != 1 or head[0] not in (stages[0].id, stages[-1].id):
            raise ValueError(f"replicas[{replica}].stages: the first or the last stage, and "
                             f"only it, holds the head (holds: head), got stages {head}")
        if ("head" in stages[0].holds) != ("head" in first.holds):
            raise ValueError(f"replicas[{replica}].stages: the head is at the same end in "
                             "every replica")

    def _check_launch(self) -> None:
        _unique([h.host for h in self.launch], "launch", "host")
        if sorted(h.node_rank for h in self.launch) != list(range(len(self.launch))):
            raise ValueError("launch: node_rank must number the hosts 0..n-1")
        staged = {d for s in self.stages for d in s.devices}
        launched: set[str] = set()
        for i, host in enumerate(self.launch):
            if host.rdzv_endpoint != self.launch[0].rdzv_endpoint:
                raise ValueError(f"launch[{i}].rdzv_endpoint: every host meets at one "
                                 f"rendezvous, launch[0]'s {self.launch[0].rdzv_endpoint}")
            if host.nproc_per_node != len(host.devices):
                raise ValueError(f"launch[{i}].nproc_per_node: {host.nproc_per_node}, but the "
                                 f"host lists {len(host.devices)} devices")
            for j, device in enumerate(host.devices):
                if device.split(":", 1)[0] != host.host:
                    raise ValueError(f"launch[{i}].devices[{j}]: {device} is not a device of "
                                     f"host {host.host}")
                if device in launched:
                    raise ValueError(f"launch[{i}].devices[{j}]: {device} is launched twice")
                if device not in staged:
                    raise ValueError(f"launch[{i}].devices[{j}]: {device} is in no stage")
                launched.add(device)
        for i, stage in enumerate(self.stages):
            for j, device in enumerate(stage.devices):
                if device not in launched:
                    raise ValueError(f"stages[{i}].devices[{j}]: {device} is on no host of "
                                     "launch")

    def _check_paths(self) -> None:
        stage_of = {d: (stage.replica, index) for replica in self.replicas
                    for index, stage in enumerate(self.stage(s) for s in replica.stages)
                    for d in stage.leaders()}
        _unique([p.microbatch for p in self.paths], "paths", "microbatch")
        fed: set[int] = set()
        for i, path in enumerate(self.paths):
            if path.route[0] != path.origin:
                raise ValueError(f"paths[{i}].route: must start at its origin {path.origin}")
            if path.origin not in stage_of or stage_of[path.origin][1] != 0:
                raise ValueError(f"paths[{i}].origin: {path.origin} is not a device of a "
                                 "replica's first stage")
            replica = stage_of[path.origin][0]
            visited: set[int] = set()
            for j, device in enumerate(path.route):
                where = stage_of.get(device)
                if where is None or where[0] != replica:
                    raise ValueError(f"paths[{i}].route[{j}]: {device} is not a device of "
                                     f"replica {replica} (with tensor parallelism: the first "
                                     "device of a TP group)")
                if where[1] in visited:
                    raise ValueError(f"paths[{i}].route[{j}]: visits stage {where[1]} of "
                                     f"replica {replica} twice")
                visited.add(where[1])
            fed.add(replica)
        for replica in self.replicas:
            if replica.id not in fed:
                raise ValueError(f"paths: no microbatch starts in replica {replica.id}")

    def _check_groups(self) -> None:
        _unique([g.name for g in self.groups], "groups", "name")
        ranks = self.rank_of()
        device_of = {rank: device for device, rank in ranks.items()}
        hosts = {h.host for h in self.launch}
        shapes = self._group_shapes()
        for i, group in enumerate(self.groups):
            for j, rank in enumerate(group.ranks):
                if rank >= len(ranks):
                    raise ValueError(f"groups[{i}].ranks[{j}]: rank {rank} >= world {len(ranks)}")
            if len(set(group.ranks)) != len(group.ranks):
                raise ValueError(f"groups[{i}].ranks: a rank is listed twice")
            fits, shape = shapes[group.kind]
            if not fits(frozenset(device_of[r] for r in group.ranks)):
                raise ValueError(f"groups[{i}].ranks: {shape}")
            for host in group.env_per_host:
                if host not in hosts:
                    raise ValueError(f"groups[{i}].env_per_host: unknown host '{host}'")

    def _group_shapes(self) -> dict[str, tuple[Callable[[frozenset[str]], bool], str]]:
        """Per group kind: whether a device set may be such a group, and the rule in words.
        A pipeline group may be a part of its replica (the hops inside one fabric)."""
        replicas = [[self.stage(s).tp_groups() for s in r.stages] for r in self.replicas]
        whole = [frozenset(d for stage in r for g in stage for d in g) for r in replicas]
        stages = {frozenset(g[i] for g in stage) for r in replicas for stage in r
                  for i in range(len(stage[0]))}
        lanes = {frozenset(r[s][j][i] for r in replicas) for s in range(len(replicas[0]))
                 for j in range(min(len(r[s]) for r in replicas))
                 for i in range(len(replicas[0][s][0]))}
        tp = {frozenset(g) for r in replicas for stage in r for g in stage if len(g) > 1}
        lane_kind = "diloco" if self.sync == "diloco" else "replica"
        other_kind = "replica" if lane_kind == "diloco" else "diloco"
        return {
            "pipeline": (lambda m: any(m <= r for r in whole),
                         "a pipeline group holds devices of one replica only"),
            "data": (stages.__contains__, "a data group holds exactly the devices of one stage "
                     "(of one TP rank of it, with tensor parallelism)"),
            "tp": (tp.__contains__, "a tp group holds exactly the devices of one TP group of "
                   "a stage"),
            lane_kind: (lanes.__contains__, f"a {lane_kind} group holds one device per "
                        "replica, the same lane of the same stage in each"),
            other_kind: (lambda m: False, f"a {other_kind} group does not fit sync: {self.sync}"),
        }

    def _check_device_maps(self) -> None:
        devices = set(self.rank_of())
        maps = {"estimates.memory_gb": self.estimates.memory_gb,
                "skipping.in_flight": self.skipping.in_flight if self.skipping else {}}
        for field, mapping in maps.items():
            for device in mapping:
                if device not in devices:
                    raise ValueError(f"{field}: unknown device {device}")

    def stage(self, stage_id: int) -> Stage:
        if stage_id not in self._stage_by_id:
            raise ValueError(f"stages: no stage with id {stage_id}")
        return self._stage_by_id[stage_id]

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
        """libyaml's emitter where PyYAML has it (the same text, about 5x faster: a
        16,384-GPU plan is tens of MB), else PyYAML's own."""
        return yaml.dump(self.to_plain(), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                         sort_keys=False, default_flow_style=None, width=110)


def tensor_parallel_refusal(plan: Plan) -> str | None:
    """Why the runtime cannot run `plan` yet (None: it can): it does not run tensor
    parallelism, so a plan with a stage of tensor_parallel > 1 is planned, shown and
    simulated, never launched as if it were something else."""
    stages = [s.id for s in plan.stages if s.tensor_parallel > 1]
    if not stages:
        return None
    return (f"the runtime does not run tensor parallelism yet (stage {stages[0]} has "
            f"tensor_parallel {plan.stage(stages[0]).tensor_parallel}); plan again with "
            "--tensor-parallel 1 to launch")


def _unique(values: list[Any], field: str, key: str) -> dict[Any, int]:
    """Index of each value; ValueError naming the second of two equal ones."""
    index: dict[Any, int] = {}
    for i, value in enumerate(values):
        if value in index:
            raise ValueError(f"{field}[{i}].{key}: {value} is also {field}[{index[value]}].{key}")
        index[value] = i
    return index


def load_plan(path: str | Path) -> Plan:
    return validate_as(Plan, load_yaml_mapping(path), path)


def save_plan(plan: Plan, path: str | Path, summary: list[str]) -> None:
    """Write `plan` atomically, with `summary` (plain sentences) as the header comment."""
    header = "".join(f"# {line}\n" for line in summary)
    write_text_atomic(path, header + plan.to_yaml())
