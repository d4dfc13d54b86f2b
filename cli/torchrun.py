"""What `hetsched launch` runs on each host of a plan: one `torchrun` command per host.

This module owns turning a `Plan` and the launch options into one `HostCommand` per
host of the plan's `launch` section: the torchrun argv (nodes, node rank, processes,
c10d rendezvous), the environment of that host's processes (the plan's path, the host's
name and the NCCL/gloo variables of the process groups its ranks belong to), the groups
its ranks belong to with the network each runs on, and the wrapping that gets it there
(`ip netns exec` for the lab, `ssh` for real hosts: `cli.remote`). Each torchrun is told its own
address (`--local-addr`) and, outside local runs, whether it serves the rendezvous store
(`--rdzv-conf is_host=`), since torchrun's guesses from the hostname fail inside lab
namespaces. It does no I/O: building a command never starts, resolves or checks anything.

A process holds one value per variable, but a host's ranks may sit in several groups.
Each group's network is its own (`ncclConfig_t.net_name`, which the runtime passes when
it creates the group); the environment carries only what every group of the host agrees
on (socket interface, HCA list, GID index; `NCCL_NET` only under per-process selection,
where the planner already put all of a process's groups on it). Two groups that want
different values of one variable on a host are refused, naming both: one of them would
run on something it did not ask for. A variable only some groups set is kept; one that
picks the network (`NETWORK_VARIABLES`) is noted when it reaches a group with an
environment of its own that does not set it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cli.remote import SshOptions, remote_command, ssh_argv
from holmes.heartbeat import DEFAULT_EVERY_S as HEARTBEAT_EVERY_S
from holmes.heartbeat import HEARTBEAT_ENV
from holmes.plan import Group, LaunchHost, Plan
from topology.errors import InputError

Via = Literal["local", "ssh", "lab"]

LOOPBACK = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"
SOCKET_IFNAME_SUFFIX = "_SOCKET_IFNAME"
NETWORK_VARIABLES = frozenset({"NCCL_NET", "NCCL_IB_DISABLE"})
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SSH_TARGET = re.compile(r"^[A-Za-z0-9_.:@%\[\]-]+$")


@dataclass(frozen=True)
class LaunchSpec:
    """How to launch: where the hosts are reached and what each torchrun runs.

    `rdzv_endpoint` overrides the plan's rendezvous (local runs use a loopback port);
    `torchrun` is the remote torchrun command (ssh); `python` runs
    `-m torch.distributed.run` on this machine (local, lab); `namespaces` maps each plan
    host to its lab namespace (lab); `ssh` says how hosts are reached and where the job
    runs on them (ssh).
    """

    via: Via
    plan_path: Path
    script: tuple[str, ...]
    rdzv_id: str
    max_restarts: int = 0
    rdzv_endpoint: str | None = None
    torchrun: tuple[str, ...] = ("torchrun",)
    python: str = "python3"
    remote_plan: str | None = None
    namespaces: dict[str, str] = field(default_factory=dict)
    ssh: SshOptions = field(default_factory=SshOptions)


@dataclass(frozen=True)
class HostEnv:
    """The environment of one host's processes, where each value came from, and notes."""

    values: dict[str, str]
    sources: dict[str, str]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class GroupTransport:
    """A process group one of a host's ranks belongs to, and the network it runs on."""

    name: str
    kind: str
    ranks: tuple[int, ...]
    transport: str
    nccl_config: dict[str, str]

    def describe(self) -> str:
        config = ", ".join(f"{k}={v}" for k, v in self.nccl_config.items())
        how = f"ncclConfig_t {config}" if config else "process environment"
        return (f"group {self.name} ({self.kind}, ranks {format_ranks(self.ranks)}): "
                f"{self.transport} ({how})")


@dataclass(frozen=True)
class HostCommand:
    """One host's torchrun: the argv started on this machine and the environment it gets.

    `env` is what the host's training processes see (for review); `popen_env` is what is
    added to this machine's environment when `argv` is started (empty for ssh, whose
    remote command carries `env` itself).
    """

    host: str
    address: str
    node_rank: int
    ranks: tuple[int, ...]
    nproc: int
    rdzv_endpoint: str
    argv: tuple[str, ...]
    env: dict[str, str]
    popen_env: dict[str, str]
    sources: dict[str, str]
    notes: tuple[str, ...]
    groups: tuple[GroupTransport, ...] = ()

    def header(self) -> str:
        ranks = "rank" if len(self.ranks) == 1 else "ranks"
        processes = "process" if self.nproc == 1 else "processes"
        return (f"host {self.host} (node rank {self.node_rank}, {ranks} "
                f"{format_ranks(self.ranks)}, {self.nproc} {processes})")

    def render(self) -> str:
        return shlex.join(self.argv)


def format_ranks(ranks: tuple[int, ...]) -> str:
    """`0-3` for a contiguous run, else a comma list."""
    if not ranks:
        return "-"
    if list(ranks) == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 1:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)


def host_ranks(plan: Plan) -> dict[str, tuple[int, ...]]:
    """Global ranks of each host: hosts in node-rank order, processes in order."""
    ranks: dict[str, tuple[int, ...]] = {}
    start = 0
    for host in sorted(plan.launch, key=lambda h: h.node_rank):
        ranks[host.host] = tuple(range(start, start + host.nproc_per_node))
        start += host.nproc_per_node
    return ranks


def check_plan_hosts(plan: Plan, via: Via) -> None:
    """Refuse host names and addresses that could be read as options or shell syntax."""
    seen: set[str] = set()
    for i, host in enumerate(plan.launch):
        where = f"launch[{i}]"
        if not host.host or host.host.startswith("-") or not host.host.isprintable():
            raise InputError(f"host name {host.host!r} may not be empty, start with '-' or "
                             "hold control characters", field=f"{where}.host")
        if host.host in seen:
            raise InputError(f"host {host.host!r} is listed twice", field=f"{where}.host")
        seen.add(host.host)
        if via == "ssh" and (host.address.startswith("-") or not SSH_TARGET.match(host.address)):
            raise InputError(f"address {host.address!r} is not a host name or IP address ssh "
                             "may be given", field=f"{where}.address")


def merge_host_env(plan: Plan, host: str, ranks: tuple[int, ...]) -> HostEnv:
    """The NCCL/gloo variables of every group that holds one of `ranks`; they must agree."""
    mine = set(ranks)
    envs = [(group, _group_env(group, host)) for group in plan.groups if mine & set(group.ranks)]
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    notes: list[str] = []
    for group, env in envs:
        for name, value in env.items():
            if name not in values:
                values[name], sources[name] = value, group.name
                notes.extend(_widened(name, group, envs))
            elif values[name] != value:
                raise InputError(
                    f"groups {sources[name]} and {group.name} want {name}={values[name]!r} and "
                    f"{value!r} on host {host}, whose processes hold one value: give each "
                    "group its network in nccl_config, or re-plan", field="groups")
    return HostEnv(values, sources, tuple(notes))


def _widened(name: str, source: Group, envs: list[tuple[Group, dict[str, str]]]) -> list[str]:
    """A note when `source`'s network variable also reaches a group with an environment of
    its own that does not set it (one environment per process)."""
    over = [g.name for g, env in envs if g is not source and env and name not in env]
    if name not in NETWORK_VARIABLES or not over:
        return []
    return [f"{name}: set for {source.name}, so it also applies to {', '.join(over)} "
            "(one environment per process)"]


def host_groups(plan: Plan, ranks: tuple[int, ...]) -> tuple[GroupTransport, ...]:
    """The groups that hold one of `ranks`, with the network each runs on."""
    mine = set(ranks)
    return tuple(GroupTransport(g.name, g.kind, tuple(g.ranks), g.transport or "unrecorded",
                                dict(g.nccl_config))
                 for g in plan.groups if mine & set(g.ranks))


def _group_env(group: Group, host: str) -> dict[str, str]:
    env = {**group.env, **group.env_per_host.get(host, {})}
    for name in env:
        if not ENV_NAME.match(name):
            raise InputError(f"{name!r} is not an environment variable name",
                             field=f"groups.{group.name}.env")
    return env


def build_commands(plan: Plan, spec: LaunchSpec) -> list[HostCommand]:
    """One `HostCommand` per host of the plan's `launch` section, in node-rank order."""
    check_plan_hosts(plan, spec.via)
    ranks = host_ranks(plan)
    hosts = sorted(plan.launch, key=lambda h: h.node_rank)
    store = store_host(hosts, spec)
    return [_host_command(plan, spec, host, ranks[host.host], store) for host in hosts]


def store_host(hosts: list[LaunchHost], spec: LaunchSpec) -> str | None:
    """The host whose torchrun serves the c10d rendezvous store: the first one whose
    address is the endpoint's. torchrun guesses that from the machine's hostname, which
    is wrong in a lab namespace and on hosts with several addresses, so it is told.
    Local runs keep torchrun's guess (every host is this machine: the first one up wins)."""
    if spec.via == "local":
        return None
    for host in hosts:
        endpoint = spec.rdzv_endpoint or host.rdzv_endpoint
        if host.address == endpoint.rsplit(":", 1)[0].strip("[]"):
            return host.host
    return None


def _host_command(plan: Plan, spec: LaunchSpec, host: LaunchHost, ranks: tuple[int, ...],
                  store: str | None) -> HostCommand:
    env, sources, notes = _host_environment(plan, spec, host, ranks)
    endpoint = spec.rdzv_endpoint or host.rdzv_endpoint
    torchrun = _torchrun_argv(plan, spec, host, endpoint, store)
    if spec.via == "ssh":
        remote = remote_command(spec.ssh.workdir, env, torchrun)
        argv: tuple[str, ...] = ssh_argv(spec.ssh, host.address, remote, tty=True)
        popen_env: dict[str, str] = {}
    elif spec.via == "lab":
        if host.host not in spec.namespaces:
            raise InputError(f"host {host.host} has no lab namespace", field="launch")
        argv = ("ip", "netns", "exec", spec.namespaces[host.host], *torchrun)
        popen_env = env
    else:
        argv, popen_env = torchrun, env
    return HostCommand(host.host, host.address, host.node_rank, ranks, host.nproc_per_node,
                       endpoint, argv, env, popen_env, sources, notes,
                       host_groups(plan, ranks))


def _host_environment(plan: Plan, spec: LaunchSpec, host: LaunchHost, ranks: tuple[int, ...]
                      ) -> tuple[dict[str, str], dict[str, str], tuple[str, ...]]:
    plan_path = spec.remote_plan if spec.via == "ssh" and spec.remote_plan else str(spec.plan_path)
    env = {"HETSCHED_PLAN": plan_path, "HETSCHED_HOST": host.host, "PYTHONUNBUFFERED": "1",
           HEARTBEAT_ENV: f"{HEARTBEAT_EVERY_S:g}"}
    sources = dict.fromkeys(env, "launcher")
    notes: list[str] = []
    merged = merge_host_env(plan, host.host, ranks)
    notes.extend(merged.notes)
    for name, value in merged.values.items():
        if name in env:
            notes.append(f"{name}: {merged.sources[name]} wants {value!r}; the launcher sets it")
            continue
        if spec.via == "local" and name.endswith(SOCKET_IFNAME_SUFFIX):
            notes.append(f"{name}: {value!r} -> {LOOPBACK_INTERFACE!r} (--via local: every "
                         "host is this machine)")
            value = LOOPBACK_INTERFACE
        env[name], sources[name] = value, merged.sources[name]
    return env, sources, tuple(notes)


def _torchrun_argv(plan: Plan, spec: LaunchSpec, host: LaunchHost, endpoint: str,
                   store: str | None) -> tuple[str, ...]:
    local_torchrun = (spec.python, "-m", "torch.distributed.run")
    prefix = spec.torchrun if spec.via == "ssh" else local_torchrun
    local_addr = LOOPBACK if spec.via == "local" else host.address
    is_host = () if store is None else ("--rdzv-conf", f"is_host={int(host.host == store)}")
    return (
        *prefix,
        "--nnodes", str(len(plan.launch)),
        "--node-rank", str(host.node_rank),
        "--nproc-per-node", str(host.nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", endpoint,
        "--rdzv-id", spec.rdzv_id,
        *is_host,
        "--max-restarts", str(spec.max_restarts),
        "--local-addr", local_addr,
        *spec.script,
    )
