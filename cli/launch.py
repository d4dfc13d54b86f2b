"""`hetsched launch`: run a plan with one torchrun per host, locally, in the lab or over ssh.

This module owns the command and its pre-flight: the plan must match the topology it
was made for (its sha256) and every host must be reachable, else the launch is refused
with exit status 2 before anything starts (`--force` goes on with a warning). With
`--via local` or `--via lab` every host is this machine, so each group must also be
runnable here (`holmes.transports.missing_here`: CUDA for NCCL, per-communicator NCCL
settings the installed torch can pass, the HCAs named for RDMA); a group that is not is
refused by name, even with `--force`. Over ssh the hosts cannot be looked at from here:
each rank makes the same check on its own host when it starts; the pre-flight logs in to
every host with the launch's ssh options and checks the working directory and the
interpreter or torchrun there. The commands come from `cli.torchrun` (what crosses ssh:
`cli.remote`); running and stopping them is `cli.supervise`. `--dry-run` prints, per
host, the network each of its groups runs on, the environment and the exact command.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click

from cli.errors import reports_input_errors
from cli.options import FILE
from cli.remote import (
    CHECK_NO_PROGRAM,
    CHECK_NO_WORKDIR,
    SshOptions,
    remote_check,
    remote_program,
    ssh_argv,
)
from cli.supervise import Outcome, Printer, report, supervise
from cli.torchrun import (
    LOOPBACK,
    HostCommand,
    LaunchSpec,
    Via,
    build_commands,
    check_plan_hosts,
    host_ranks,
)
from holmes.plan import Plan, load_plan
from holmes.review import check_plan_source, plan_topology
from holmes.transports import missing_here
from topology.errors import InputError
from topology.lab import LabError, LabState, find_lab, missing_namespaces

SSH_CHECK_TIMEOUT_S = 5
SSH_CHECK_WAIT_S = 20
SSH_OWN_FAILURE = 255


@dataclass(frozen=True)
class Unreachable:
    host: str
    reason: str


_HELP = """Run PLAN_FILE: one torchrun per host of the plan's `launch` section.

\b
  hetsched launch plan.yaml --dry-run -- train.py --steps 100     review first
  hetsched launch plan.yaml --via ssh --python /opt/venv/bin/python \\
      --workdir /opt/job --identity ~/.ssh/job_key -- train.py     real hosts
  hetsched launch plan.yaml --via lab -- train.py                 the emulated lab
  hetsched launch plan.yaml --via local -- train.py               every host here

Put `--` before SCRIPT: everything after it goes to torchrun's script unchanged.
Each host's processes get HETSCHED_PLAN, HETSCHED_HOST and the NCCL/gloo variables of
their process groups. Over ssh each host runs `cd -- WORKDIR && exec env VARS...
torchrun ...`, every word quoted; ssh gets a pty, so stopping ssh stops the remote
torchrun (and the remote stderr arrives on stdout). Output is streamed with a `[host]`
prefix; when one host fails, the others are stopped and the exit status is its
worker's (1 when torchrun does not say). A host whose workers send no heartbeat or make
no progress for the plan's hang timeout (--hang-timeout) is named as hung, and the
launch stops the same way (exit 1). Killing the launcher, even with SIGKILL, stops every
process of the launch (docs/faults.md). Refused (exit 2) when the plan was made for
another topology or a host is unreachable, unless --force. The real-cluster walkthrough
is docs/launch.md.
"""


@click.command(help=_HELP)
@click.argument("plan_file", type=FILE)
@click.argument("script", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--via", type=click.Choice(["ssh", "lab", "local"]), default="ssh",
              show_default=True, help="Reach the hosts over ssh, in the lab's namespaces, "
              "or run every host on this machine (rendezvous and sockets on loopback).")
@click.option("--lab", "lab_name", metavar="NAME",
              help="--via lab: which lab (may be left out when only one is running).")
@click.option("--dry-run", is_flag=True, help="Print what would run on each host; start nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print it as JSON.")
@click.option("--force", is_flag=True,
              help="Launch even when the topology changed or a host is unreachable.")
@click.option("--topology", "topology_file", type=FILE,
              help="Topology file to check against (default: the one the plan names).")
@click.option("--rdzv-id", help="Rendezvous id (default: the plan's sha256 and the time).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="torchrun --max-restarts on every host.")
@click.option("--torchrun", "torchrun_command", metavar="COMMAND",
              help="--via ssh: the torchrun command on the remote hosts [default: torchrun].")
@click.option("--python", "python", metavar="PATH",
              help="--via ssh: run `PATH -m torch.distributed.run` on the remote hosts "
              "instead of torchrun (its workers run under the same interpreter).")
@click.option("--workdir", metavar="DIR",
              help="--via ssh: working directory on the remote hosts; relative paths in "
              "SCRIPT start there [default: this directory].")
@click.option("--ssh-config", type=FILE, help="--via ssh: ssh's configuration file (ssh -F).")
@click.option("--identity", type=FILE, help="--via ssh: the private key to log in with "
              "(ssh -i, only that key is offered).")
@click.option("--ssh-user", metavar="USER", help="--via ssh: the remote user (ssh -l).")
@click.option("--ssh-option", "ssh_options", metavar="KEY=VALUE", multiple=True,
              help="--via ssh: an ssh -o option, e.g. Port=2222 (repeatable).")
@click.option("--remote-plan", metavar="PATH",
              help="--via ssh: HETSCHED_PLAN on the remote hosts (default: this plan's path).")
@click.option("--hang-timeout", "hang_timeout", type=click.FloatRange(min=1, max=1e6),
              metavar="SECONDS", help="A host whose workers send no heartbeat or make no "
              "progress this long is hung (default: the plan's launch_policy.hang_timeout_s).")
@reports_input_errors
def launch(plan_file: Path, script: tuple[str, ...], via: Via, lab_name: str | None,
           dry_run: bool, as_json: bool, force: bool, topology_file: Path | None,
           rdzv_id: str | None, max_restarts: int, torchrun_command: str | None,
           python: str | None, workdir: str | None, ssh_config: Path | None,
           identity: Path | None, ssh_user: str | None, ssh_options: tuple[str, ...],
           remote_plan: str | None, hang_timeout: float | None) -> None:
    if as_json and not dry_run:
        raise InputError("--json is only for --dry-run", field="--json")
    if hang_timeout is not None and not math.isfinite(hang_timeout):
        raise InputError(f"must be a number of seconds, got {hang_timeout}",
                         field="--hang-timeout")
    ssh = _ssh_options(via, workdir, ssh_config, identity, ssh_user, ssh_options)
    torchrun = _remote_torchrun(via, torchrun_command, python)
    plan = load_plan(plan_file)
    check_plan_hosts(plan, via)
    check_plan_source(plan, plan_file)
    _check_topology(plan, plan_file, topology_file, force)
    if via != "ssh" and not dry_run:
        _check_runnable_here(plan)
    _check_script(script, via)
    lab = find_lab(lab_name) if via == "lab" else None
    spec = LaunchSpec(
        via=via, plan_path=plan_file.resolve(), script=script,
        rdzv_id=rdzv_id or _default_rdzv_id(plan_file), max_restarts=max_restarts,
        rdzv_endpoint=f"{LOOPBACK}:{_free_port()}" if via == "local" else None,
        torchrun=torchrun, python=sys.executable, remote_plan=remote_plan,
        namespaces=_namespaces(plan, lab), ssh=ssh)
    commands = build_commands(plan, spec)
    if dry_run:
        click.echo(_dry_run_json(spec, commands) if as_json else _dry_run_text(spec, commands))
        return
    _check_reachable(commands, spec, lab, force)
    printer = Printer(sys.stdout, sys.stderr)
    timeout_s = hang_timeout or plan.launch_policy.hang_timeout_s
    printer.note(f"{_count(len(commands), 'host', 'hosts')} via {via}, rendezvous "
                 f"{commands[0].rdzv_endpoint} (id {spec.rdzv_id}), hang timeout "
                 f"{timeout_s:g} s")
    outcome = _explained(supervise(commands, printer, hang_timeout_s=timeout_s), via)
    report(outcome, printer)
    sys.exit(outcome.exit_code)


def _ssh_options(via: Via, workdir: str | None, config: Path | None, identity: Path | None,
                 user: str | None, options: tuple[str, ...]) -> SshOptions:
    """The ssh flags, checked; refused with another --via, where they would do nothing."""
    given = {"--workdir": workdir, "--ssh-config": config, "--identity": identity,
             "--ssh-user": user, "--ssh-option": options or None}
    if via != "ssh":
        for flag, value in given.items():
            if value is not None:
                raise InputError(f"is only for --via ssh (not --via {via})", field=flag)
        return SshOptions()
    ssh = SshOptions(workdir=workdir if workdir is not None else os.getcwd(), config=config,
                     identity=identity, user=user, options=options)
    ssh.check()
    return ssh


def _remote_torchrun(via: Via, torchrun_command: str | None,
                     python: str | None) -> tuple[str, ...]:
    """What starts torchrun on a remote host: --python's interpreter or --torchrun."""
    if via != "ssh":
        for flag, value in (("--torchrun", torchrun_command), ("--python", python)):
            if value is not None:
                raise InputError(f"is only for --via ssh (not --via {via})", field=flag)
        return ("torchrun",)
    if python is not None and torchrun_command is not None:
        raise InputError("give --python or --torchrun, not both", field="--python")
    if python is not None:
        return (*remote_program([python], "--python"), "-m", "torch.distributed.run")
    try:
        words = shlex.split("torchrun" if torchrun_command is None else torchrun_command)
    except ValueError as exc:
        raise InputError(f"cannot be split into words: {exc}", field="--torchrun") from None
    return remote_program(words, "--torchrun")


def _explained(outcome: Outcome, via: Via) -> Outcome:
    """ssh exits 255 on its own errors (and when the remote end dies by a signal): say so."""
    failed = next((r for r in outcome.results if r.host == outcome.failed_host), None)
    if via != "ssh" or failed is None or failed.returncode != SSH_OWN_FAILURE:
        return outcome
    return replace(outcome, reason=f"{outcome.reason} (ssh could not run the command, "
                   "lost the connection, or the remote torchrun was killed; its last words "
                   "are above)")


def _check_script(script: tuple[str, ...], via: Via) -> None:
    """--via local and lab run SCRIPT from this machine: it must be a file here. (A first
    word starting with '-' is a torchrun option such as --no-python; ssh's is remote.)"""
    if via == "ssh" or script[0].startswith("-"):
        return
    path = Path(script[0])
    if not path.is_file():
        why = "is not a file" if path.exists() else "not found"
        raise InputError(f"{script[0]} {why} (--via {via} runs it from this machine); "
                         "nothing was started", field="SCRIPT")


def _check_topology(plan: Plan, plan_file: Path, topology_file: Path | None, force: bool) -> None:
    try:
        plan_topology(plan, plan_file, topology_file)
    except InputError as exc:
        if not force:
            raise InputError(f"{exc.message}; refusing to launch (--force launches anyway)",
                             exc.path, exc.field) from None
        click.echo(f"warning: {exc.render()}; launching anyway (--force)", err=True)


def _check_runnable_here(plan: Plan) -> None:
    """Every host runs on this machine: refuse a group it cannot run, naming it."""
    for host, ranks in host_ranks(plan).items():
        for group in (g for g in plan.groups if set(ranks) & set(g.ranks)):
            reason = missing_here(group, host)
            if reason is not None:
                raise InputError(f"{reason}; nothing was started", field="groups")


def _default_rdzv_id(plan_file: Path) -> str:
    digest = hashlib.sha256(plan_file.read_bytes()).hexdigest()[:12]
    return f"hs-{digest}-{time.strftime('%Y%m%d%H%M%S')}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _namespaces(plan: Plan, lab: LabState | None) -> dict[str, str]:
    if lab is None:
        return {}
    return {host.host: lab.host(host.host).namespace for host in plan.launch}


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _dry_run_text(spec: LaunchSpec, commands: list[HostCommand]) -> str:
    processes = sum(c.nproc for c in commands)
    lines = [f"# hetsched launch {spec.plan_path} via {spec.via}: "
             f"{_count(len(commands), 'host', 'hosts')}, "
             f"{_count(processes, 'process', 'processes')}, rendezvous {commands[0].rdzv_endpoint} "
             f"(c10d, id {spec.rdzv_id})"]
    for command in commands:
        lines.append(f"# {command.header()}")
        lines.extend(f"# {group.describe()}" for group in command.groups)
        for name, value in command.env.items():
            source = command.sources.get(name, "launcher")
            comment = "" if source == "launcher" else f"  # {source}"
            lines.append(f"{name}={shlex.quote(value)}{comment}")
        lines.extend(f"# note: {note}" for note in command.notes)
        lines.append(command.render())
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _dry_run_json(spec: LaunchSpec, commands: list[HostCommand]) -> str:
    hosts = [{
        "host": c.host, "address": c.address, "node_rank": c.node_rank, "ranks": list(c.ranks),
        "nproc_per_node": c.nproc, "rdzv_endpoint": c.rdzv_endpoint, "env": c.env,
        "env_sources": c.sources, "notes": list(c.notes), "argv": list(c.argv),
        "groups": [{"name": g.name, "kind": g.kind, "ranks": list(g.ranks),
                    "transport": g.transport, "nccl_config": g.nccl_config} for g in c.groups],
        "command": c.render(),
        **({"remote_command": c.argv[-1]} if spec.via == "ssh" else {}),
    } for c in commands]
    return json.dumps({"plan": str(spec.plan_path), "via": spec.via, "rdzv_id": spec.rdzv_id,
                       "hosts": hosts}, indent=2)


def _check_reachable(commands: list[HostCommand], spec: LaunchSpec, lab: LabState | None,
                     force: bool) -> None:
    if spec.via == "lab" and lab is not None:
        unreachable = _lab_unreachable(commands, spec, lab)
    elif spec.via == "ssh":
        unreachable = _ssh_unreachable(commands, spec)
    else:
        unreachable = []
    if not unreachable:
        return
    listing = "; ".join(f"{u.host} ({u.reason})" for u in unreachable)
    if not force:
        raise InputError(f"unreachable: {listing}; nothing was started "
                         "(--force launches anyway)")
    click.echo(f"warning: unreachable: {listing}; launching anyway (--force)", err=True)


def _lab_unreachable(commands: list[HostCommand], spec: LaunchSpec,
                     lab: LabState) -> list[Unreachable]:
    if os.geteuid() != 0:
        return [Unreachable(c.host, "running in a lab namespace needs root") for c in commands]
    try:
        missing = set(missing_namespaces(lab))
    except LabError as exc:
        return [Unreachable(c.host, str(exc)) for c in commands]
    return [Unreachable(c.host, f"namespace {spec.namespaces[c.host]} of lab '{lab.name}' is "
                        "missing") for c in commands if spec.namespaces[c.host] in missing]


def _ssh_unreachable(commands: list[HostCommand], spec: LaunchSpec) -> list[Unreachable]:
    """ssh to every host at once with the launch's ssh options, checking that the working
    directory and the torchrun program are there; the hosts that fail, and why."""
    checks: list[tuple[HostCommand, subprocess.Popen[str]]] = []
    remote = remote_check(spec.ssh.workdir, spec.torchrun[0])
    timeout = (f"ConnectTimeout={SSH_CHECK_TIMEOUT_S}",)
    try:
        for c in commands:
            argv = ssh_argv(spec.ssh, c.address, remote, tty=False, extra=timeout)
            checks.append((c, subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE, text=True)))
    except FileNotFoundError:
        return [Unreachable(c.host, "ssh is not installed") for c in commands]
    deadline = time.monotonic() + SSH_CHECK_WAIT_S
    verdicts = [_ssh_verdict(c, p, deadline, spec) for c, p in checks]
    return [u for u in verdicts if u is not None]


def _ssh_verdict(command: HostCommand, process: subprocess.Popen[str], deadline: float,
                 spec: LaunchSpec) -> Unreachable | None:
    try:
        _, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return Unreachable(command.host, f"ssh {command.address}: no answer in "
                           f"{SSH_CHECK_WAIT_S} s")
    if process.returncode == 0:
        return None
    if process.returncode == CHECK_NO_WORKDIR:
        return Unreachable(command.host, f"no directory {spec.ssh.workdir} there (--workdir)")
    if process.returncode == CHECK_NO_PROGRAM:
        return Unreachable(command.host, f"{spec.torchrun[0]} not found there (--python, "
                           "--torchrun)")
    last = (err.strip().splitlines() or [f"exit status {process.returncode}"])[-1]
    return Unreachable(command.host, f"ssh {command.address}: {last}")
