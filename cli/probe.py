"""`hetsched probe`: discover this host, serve as a probe agent, coordinate a probe."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click
import zmq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.errors import EXIT_INCOMPLETE, reports_input_errors
from cli.options import FILE, finite_range
from topology.errors import InputError
from topology.files import check_output
from topology.hosts import load_hosts
from topology.probe import Coordinator, ProbeOptions, ProbeReport
from topology.protocol import (
    DEFAULT_PORT,
    OPEN_TOKEN_FLAG,
    load_token,
    parse_endpoint,
    write_token,
    zmq_url,
)
from topology.schema import TOPOLOGY_VERSION, Topology, load_topology, save_topology

MAX_TIMEOUT_S = 3600.0


@click.group()
def probe() -> None:
    """Discover hosts and measure the links between them."""


@probe.command("local")
@click.option("-o", "--output", type=FILE,
              help="Write a one-host topology.yaml here (default: print it).")
@click.option("--sysfs", type=click.Path(file_okay=False, path_type=Path), default=Path("/sys"),
              show_default=True, help="Root of the sysfs tree to read NICs from.")
@click.option("--name", help="Host name to record (default: this machine's hostname).")
@click.option("--site", help="Site to record for this host.")
@click.option("--flops/--no-flops", default=True, show_default=True,
              help="Time a short matmul to record each device's effective TFLOPS.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
@reports_input_errors
def probe_local(output: Path | None, sysfs: Path, name: str | None, site: str | None,
                flops: bool, as_json: bool) -> None:
    """Discover this host: cores, memory, GPUs, and NICs (InfiniBand, RoCE, Ethernet)."""
    from topology.discover import discover_host

    if output is not None:
        check_output(output, field="-o")

    host = discover_host(sysfs, name=name, site=site, measure_flops=flops)
    sites = [{"name": site}] if site else []
    topology = Topology.model_validate(
        {"version": TOPOLOGY_VERSION, "sites": sites, "hosts": [host.model_dump()]}
    )
    if as_json:
        click.echo(json.dumps(topology.to_plain(), indent=2))
    elif output is None:
        click.echo(topology.to_yaml(), nl=False)
    if output is not None:
        save_topology(topology, output, header=f"hetsched probe local on {host.name}")
        click.echo(f"wrote {output}", err=True)


@probe.command("token")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the new token (mode 0600).")
@click.option("--force", is_flag=True,
              help="Replace an existing token file (agents need the new token to be restarted).")
@reports_input_errors
def probe_token(output: Path, force: bool) -> None:
    """Create a random shared token for agents and the coordinator."""
    write_token(output, force=force)
    click.echo(f"wrote {output}; copy it to every agent host", err=True)


allow_open_token_option = click.option(
    OPEN_TOKEN_FLAG, "allow_open_token", is_flag=True,
    help="Accept a token file that group or others may read or write.")


@probe.command("agent")
@click.option("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", show_default=True,
              help="ADDR:PORT to listen on.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File holding the shared token (see `hetsched probe token`).")
@click.option("--name", help="Host name to report (default: hostname).")
@click.option("--sysfs", type=click.Path(file_okay=False, path_type=Path), default=Path("/sys"),
              show_default=True, hidden=True)
@click.option("--flops/--no-flops", default=True, show_default=True,
              help="Time a short matmul at start-up to report effective TFLOPS.")
@click.option("--idle-timeout", type=finite_range(1, MAX_TIMEOUT_S), default=30.0,
              show_default=True,
              help="Seconds after which an idle bulk-transfer session is dropped.")
@allow_open_token_option
@reports_input_errors
def probe_agent(listen: str, token_file: Path, name: str | None, sysfs: Path, flops: bool,
                idle_timeout: float, allow_open_token: bool) -> None:
    """Serve measurement requests (ping, bulk transfer, local discovery) until stopped.

    The agent answers only signed measurement requests; it never runs commands.
    """
    from topology.agent import Agent, AgentConfig
    from topology.discover import discover_host

    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    try:
        url = zmq_url(*parse_endpoint(listen))
    except ValueError as exc:
        raise InputError(str(exc), field="--listen") from None
    key = load_token(token_file, allow_open=allow_open_token)
    local = discover_host(sysfs, name=name, measure_flops=flops).model_dump(mode="json")
    try:
        agent = Agent(AgentConfig(url=url, key=key, local=local, idle_timeout_s=idle_timeout))
    except zmq.ZMQError as exc:
        raise InputError(f"cannot listen on {listen}: {exc}", field="--listen") from None
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    try:
        agent.serve()
    except KeyboardInterrupt:
        agent.stop.set()


@probe.command("run")
@click.argument("hosts_file", type=FILE)
@click.option("-o", "--output", type=FILE, required=True,
              help="Where to write topology.yaml.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File holding the shared token.")
@click.option("--pings", type=click.IntRange(1, 1000), default=30, show_default=True,
              help="Round trips per pair for the latency median.")
@click.option("--seconds", type=finite_range(0.1, 30), default=1.0, show_default=True,
              help="Duration of each bulk transfer (per direction).")
@click.option("--streams", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Parallel connections per bulk transfer.")
@click.option("--timeout", type=finite_range(0.5, MAX_TIMEOUT_S), default=10.0,
              show_default=True,
              help="Seconds to wait for an agent before calling it unreachable.")
@click.option("--schedule", type=click.Choice(["tournament", "sequential"]),
              default="tournament", show_default=True,
              help="tournament: disjoint pairs in parallel rounds; sequential: one pair at a time.")
@click.option("--name", help="Name to record in the topology.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@allow_open_token_option
@reports_input_errors
def probe_run(hosts_file: Path, output: Path, token_file: Path, pings: int, seconds: float,
              streams: int, timeout: float, schedule: str, name: str | None,
              as_json: bool, allow_open_token: bool) -> None:
    """Measure every pair of the agents listed in HOSTS_FILE and write topology.yaml.

    Exit status: 0 when everything was measured, 1 when a host or link could not be
    (they are recorded as unreachable, with the reason), 2 for bad input.
    """
    check_output(output, hosts_file, token_file, field="-o")
    hosts = load_hosts(hosts_file)
    key = load_token(token_file, allow_open=allow_open_token)
    options = ProbeOptions(pings=pings, seconds=seconds, streams=streams, timeout_s=timeout,
                           schedule=schedule)
    report = run_with_progress(Coordinator(hosts, key, options), name)
    header = (f"hetsched probe run of {hosts_file}: {len(report.topology.hosts)} hosts, "
              f"{report.rounds} rounds, {len(report.missing)} missing")
    save_topology(report.topology, output, header=header)
    print_summary(report, output, as_json)
    if report.missing:
        sys.exit(EXIT_INCOMPLETE)


def run_with_progress(coordinator: Coordinator, name: str | None) -> ProbeReport:
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(f"probe {what}", total=total)
            bar.update(tasks[what], completed=done, total=total)

        return coordinator.run(update, name=name)


def print_summary(report: ProbeReport, output: Path, as_json: bool) -> None:
    topology = report.topology
    if as_json:
        summary = {"output": str(output), "rounds": report.rounds, "waves": report.waves,
                   "missing": report.missing, "topology": topology.to_plain()}
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"links measured ({report.rounds} rounds, {report.waves} waves)")
    for column in ("a", "b", "latency ms", "Gbit/s", "a→b", "b→a"):
        table.add_column(column, justify="left" if column in "ab" else "right")
    for link in topology.links:
        if link.status != "ok":
            table.add_row(link.a, link.b, "-", "unreachable", "", "")
            continue
        m = link.measured
        table.add_row(link.a, link.b, f"{link.latency_ms:.3f}", f"{link.bandwidth_gbps:.4f}",
                      f"{m.a_to_b_gbps:.4f}" if m else "", f"{m.b_to_a_gbps:.4f}" if m else "")
    console = Console(stderr=True)
    console.print(table)
    for line in report.missing:
        console.print(f"[yellow]missing:[/yellow] {line}")
    console.print(f"wrote {output}")



@probe.command("check")
@click.argument("topology_file", type=FILE)
@click.option("--json", "as_json", is_flag=True, help="Print the validated topology as JSON.")
@reports_input_errors
def probe_check(topology_file: Path, as_json: bool) -> None:
    """Validate TOPOLOGY_FILE and summarise its hosts, NICs and links."""
    topology = load_topology(topology_file)
    if as_json:
        click.echo(json.dumps({"sha256": topology.sha256(), **topology.to_plain()}, indent=2))
        return
    console = Console()
    hosts = Table(title=f"{topology_file}: {len(topology.hosts)} hosts, sha256 "
                  f"{topology.sha256()[:12]}")
    for column in ("host", "site", "address", "devices", "NICs"):
        hosts.add_column(column)
    for host in topology.hosts:
        devices = ", ".join(f"{d.name} {d.memory_gb:g} GB" for d in host.devices)
        nics = ", ".join(f"{n.name} {n.kind.value} {_speed(n.speed_gbps)}"
                         for n in host.nics if not n.virtual)
        status = (host.address or "") if host.status == "ok" else f"unreachable: {host.reason}"
        hosts.add_row(host.name, host.site or "", status, devices, nics)
    console.print(hosts)
    ok = [link for link in topology.links if link.status == "ok"]
    console.print(f"{len(ok)} measured links, {len(topology.links) - len(ok)} unreachable")


def _speed(gbps: float | None) -> str:
    return "speed unknown" if gbps is None else f"{gbps:g} Gbit/s"


@probe.command("lab")
@click.option("--lab", "lab_name", help="Which running lab (default: the only one).")
@click.option("-o", "--output", type=FILE,
              default=Path("topology.yaml"), show_default=True, help="Where to write the result.")
@click.option("--pings", type=click.IntRange(1, 1000), default=30, show_default=True)
@click.option("--seconds", type=finite_range(0.1, 30), default=1.0, show_default=True)
@click.option("--streams", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--timeout", type=finite_range(0.5, MAX_TIMEOUT_S), default=10.0,
              show_default=True)
@click.option("--schedule", type=click.Choice(["tournament", "sequential"]),
              default="tournament", show_default=True)
@click.option("--flops/--no-flops", default=False, show_default=True,
              help="Have each lab agent time a matmul (the hosts share this machine's CPUs).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@reports_input_errors
def probe_lab_command(lab_name: str | None, output: Path, pings: int, seconds: float,
                      streams: int, timeout: float, schedule: str, flops: bool,
                      as_json: bool) -> None:
    """Probe a running emulated lab: an agent in each host, the coordinator in the first.

    Same measurement and exit status as `probe run`; the lab stays up.
    """
    from topology.lab import find_lab
    from topology.lab_probe import probe_lab

    check_output(output, field="-o")
    state = find_lab(lab_name)
    options = ProbeOptions(pings=pings, seconds=seconds, streams=streams, timeout_s=timeout,
                           schedule=schedule)
    sys.exit(probe_lab(state, output, options, flops=flops, json_summary=as_json))
