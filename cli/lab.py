"""`hetsched lab`: bring an emulated multi-site cluster up and down, inspect it, run in it.

The commands are thin: `topology.lab_spec` reads specs, `topology.lab` builds and removes
labs. Bad input and refusals (no root, unknown host, lab already running) are one line on
stderr with exit status 2; a system command that fails is one line with exit status 1.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click
from rich.console import Console
from rich.table import Table

from cli.errors import EXIT_INCOMPLETE, reports_input_errors
from topology.errors import InputError
from topology.lab import (
    ADDRESS_RANGE,
    LabError,
    LabState,
    find_lab,
    host_command,
    lab_down,
    lab_up,
    link_counters,
    missing_namespaces,
    plan_lab,
    running_labs,
)
from topology.lab_spec import (
    DEFAULT_BUILTIN,
    LabSpec,
    builtin_lab_names,
    builtin_lab_path,
    load_lab_spec,
    parse_lab_spec,
)

P = ParamSpec("P")
R = TypeVar("R")


def _reports_lab_errors(command: Callable[P, R]) -> Callable[P, R]:
    """A failed system command becomes `error: ...` and exit status 1 (bad input: 2)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except LabError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_INCOMPLETE)

    return reports_input_errors(wrapper)


def _builtins_help() -> str:
    try:
        return ", ".join(builtin_lab_names())
    except OSError:
        return "(none found)"


@click.group()
def lab() -> None:
    """Emulate a multi-site cluster on this machine with network namespaces (needs root).

    \b
    Each host is a network namespace with one interface (eth0) in 10.77.0.0/16;
    hosts of a site share a bridge, sites are joined through a WAN bridge, and every
    link is rate-limited with tc (intra-site rate per site, WAN rate per site pair).
    Nothing is created in the root namespace.

    \b
      hetsched lab up                     start the built-in lab-2x2
      hetsched lab status                 hosts, addresses, rates
      hetsched lab exec a1 -- ip addr     run a command inside host a1
      hetsched lab down                   remove it again
    """


@lab.command("list")
def list_builtins() -> None:
    """List the built-in lab specs (usable as `hetsched lab up NAME`)."""
    table = Table(title="built-in labs", show_lines=False)
    for column in ("name", "hosts", "sites (intra-site Mbit/s)", "WAN Mbit/s"):
        table.add_column(column)
    for name in builtin_lab_names():
        spec = load_lab_spec(builtin_lab_path(name))
        table.add_row(name, str(len(spec.host_names())), _sites_summary(spec), _wan_summary(spec))
    Console().print(table)


_UP_HELP = f"""Build a lab from SPEC (a YAML file or a built-in name; default {DEFAULT_BUILTIN}).

\b
Built-ins: {_builtins_help()} (see `hetsched lab list`).
Refused without root, or when a lab of that name is already running. A failure
midway removes everything created so far; `lab down` removes a finished lab.
"""


@lab.command("up", help=_UP_HELP)
@click.argument("spec", required=False)
@click.option("--builtin", "builtin", metavar="NAME",
              help=f"Use a built-in spec: {_builtins_help()}.")
@click.option("--name", "name", metavar="NAME",
              help="Run under another lab name (to run two copies of one spec).")
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them.")
@_reports_lab_errors
def up(spec: str | None, builtin: str | None, name: str | None, dry_run: bool) -> None:
    if spec and builtin:
        raise InputError("give either a SPEC file or --builtin, not both")
    lab_spec = load_lab_spec(builtin_lab_path(builtin) if builtin else spec)
    if name:
        lab_spec = parse_lab_spec({**lab_spec.to_plain(), "name": name}, "--name")
    if dry_run:
        plan = plan_lab(lab_spec)
        for ns in plan.namespaces:
            click.echo(f"ip netns add {ns}")
        for step in plan.steps:
            click.echo(f"{step.render():<100}  # {step.what}")
        return
    state = lab_up(lab_spec)
    click.echo(f"lab '{state.name}' is up: {len(state.hosts)} hosts in {len(lab_spec.sites)} "
               f"sites, {len(state.namespaces)} namespaces, addresses in {ADDRESS_RANGE}")
    _print_hosts(state)
    first = next(iter(state.hosts))
    click.echo(f"try: hetsched lab exec {first} -- ip addr    |    hetsched lab down {state.name}")


@lab.command("down")
@click.argument("name", required=False)
@click.option("--all", "down_all", is_flag=True, help="Take down every running lab.")
@_reports_lab_errors
def down(name: str | None, down_all: bool) -> None:
    """Remove lab NAME (or the only running lab): its namespaces, then its state.

    Idempotent: a lab that is not running is reported and left alone (exit 0). Only the
    namespaces the lab recorded when it was built are removed.
    """
    if down_all:
        names = [state.name for state in running_labs()]
    elif name is None:
        labs = running_labs()
        if not labs:
            click.echo("no lab is running")
            return
        names = [find_lab(None).name]
    else:
        names = [name]
    for lab_name in names:
        if lab_down(lab_name):
            click.echo(f"lab '{lab_name}' is down")
        else:
            click.echo(f"lab '{lab_name}' is not running (nothing to do)")


@lab.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (state and counters).")
@click.option("--counters", is_flag=True,
              help="Also show bytes/packets/drops per shaped link (tc -s counters).")
@_reports_lab_errors
def status(name: str | None, as_json: bool, counters: bool) -> None:
    """Show running labs: hosts, addresses, rates (and, with --counters, link bytes)."""
    labs = [find_lab(name)] if name else running_labs()
    if as_json:
        out = []
        for state in labs:
            entry = state.to_plain()
            entry["state_file"] = str(state.state_path)
            entry["missing_namespaces"] = missing_namespaces(state)
            entry["counters"] = [
                {"link": c.name, "kind": c.link.kind, "src": c.link.src, "dst": c.link.dst,
                 "namespace": c.link.namespace, "device": c.link.device,
                 "rate_mbit": c.link.rate_mbit, "bytes": c.bytes, "packets": c.packets,
                 "drops": c.drops}
                for c in link_counters(state)
            ] if counters else None
            if entry["counters"] is None:
                del entry["counters"]
            out.append(entry)
        click.echo(json.dumps(out, indent=2))
        return
    if not labs:
        click.echo("no lab is running (start one with `hetsched lab up`)")
        return
    for state in labs:
        missing = missing_namespaces(state)
        health = state.status if not missing else f"broken: {len(missing)} namespaces missing"
        click.echo(f"lab '{state.name}' ({health}; since {state.created_at}; "
                   f"state {state.state_path})")
        _print_hosts(state)
        if len(state.spec.sites) > 1:
            click.echo(f"WAN: {_wan_summary(state.spec)}")
        if counters:
            _print_counters(state)


@lab.command("exec", context_settings={"ignore_unknown_options": True,
                                       "allow_interspersed_args": False})
@click.option("--lab", "lab_name", metavar="NAME",
              help="Which lab (may be left out when only one is running).")
@click.argument("host")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_reports_lab_errors
def exec_(lab_name: str | None, host: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside lab host HOST; its output streams, its exit status is returned.

    \b
      hetsched lab exec a1 -- ip addr
      hetsched lab exec --lab lab-3site c1 -- python3 -m http.server
    No shell is involved: wrap in `sh -c '...'` yourself for pipes or redirections.
    """
    if command and command[0] == "--":  # click keeps the `--` that follows HOST
        command = command[1:]
    state = find_lab(lab_name)
    argv = host_command(state, host, list(command))
    try:
        done = subprocess.run(argv, check=False)
    except FileNotFoundError:
        raise LabError("command not found: ip (iproute2 is needed)") from None
    sys.exit(done.returncode)




def _sites_summary(spec: LabSpec) -> str:
    return "; ".join(f"{s.name}: {', '.join(s.hosts)} ({s.rate_mbit:g})" for s in spec.sites)


def _wan_summary(spec: LabSpec) -> str:
    names = [s.name for s in spec.sites]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    return ", ".join(f"{a}-{b} {spec.wan_rate_mbit(a, b):g}" for a, b in pairs) or "-"


def _print_hosts(state: LabState) -> None:
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("host", "site", "address", "namespace", "intra-site Mbit/s"):
        table.add_column(column)
    for host in state.hosts.values():
        rate = state.spec.site_of(host.name).rate_mbit
        table.add_row(host.name, host.site, host.address, host.namespace, f"{rate:g}")
    Console().print(table)


def _print_counters(state: LabState) -> None:
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("link", "kind", "where", "Mbit/s", "bytes", "packets", "drops"):
        table.add_column(column, justify="right" if column in ("bytes", "packets") else "left")
    for c in link_counters(state):
        rate = "-" if c.link.rate_mbit is None else f"{c.link.rate_mbit:g}"
        table.add_row(c.name, c.link.kind, f"{c.link.namespace}/{c.link.device}", rate,
                      f"{c.bytes:,}", f"{c.packets:,}", str(c.drops))
    Console().print(table)
