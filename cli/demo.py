"""`hetsched demo`: the README's main job on a built-in example.

With root: bring up the built-in lab of 2 sites x 2 hosts (1 Gbit/s inside a site,
50 Mbit/s between sites), probe every host pair, write topology.yaml, and take the lab
down again (also on Ctrl-C or failure). Without root: discover this host only and say
that no links were shaped or measured. Either way, plan the tiny GPT on the topology
(plan.yaml) and show the plan. Launching joins in a later release.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from cli.errors import EXIT_INCOMPLETE, reports_input_errors
from topology.lab import find_lab, lab_down, lab_up
from topology.lab_probe import probe_lab
from topology.lab_spec import load_lab_spec
from topology.probe import ProbeOptions
from topology.schema import TOPOLOGY_VERSION, Topology, load_topology, save_topology

DEMO_LAB = "lab-2x2"
DEMO_NAME = "demo"
DEMO_MODEL = "tiny-gpt"


def lab_available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("ip", "tc"))


@click.command()
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("hetsched-demo"), show_default=True,
              help="Folder for the files the demo writes (topology.yaml, plan.yaml).")
@click.option("--local", "force_local", is_flag=True,
              help="Skip the lab even with root: discover this host only.")
@reports_input_errors
def demo(output_dir: Path, force_local: bool) -> None:
    """Run hetsched end to end on a built-in example (an emulated 2x2 lab with root)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    topology_path = output_dir / "topology.yaml"
    if force_local or not lab_available():
        _local_demo(topology_path, force_local)
        status = 0
    else:
        status = _lab_demo(topology_path)
        topology = load_topology(topology_path)
        click.echo(f"\n{len(topology.hosts)} hosts, {len(topology.links)} links measured; "
                   f"see {topology_path} (sha256 {topology.sha256()[:12]})")
    _plan_demo(topology_path, output_dir / "plan.yaml")
    if status != 0:
        sys.exit(EXIT_INCOMPLETE)


def _plan_demo(topology_path: Path, plan_path: Path) -> None:
    from cli.plan import plan, show

    click.echo(f"\n[plan] {DEMO_MODEL} on {topology_path}", err=True)
    plan.main([str(topology_path), "-m", DEMO_MODEL, "-o", str(plan_path)],
              standalone_mode=False)
    show.main([str(plan_path)], standalone_mode=False)


def _lab_demo(topology_path: Path) -> int:
    spec = load_lab_spec(DEMO_LAB).model_copy(update={"name": DEMO_NAME})
    click.echo(f"[1/3] lab up: {spec.description or DEMO_LAB}", err=True)
    lab_down(DEMO_NAME)
    lab_up(spec)
    try:
        click.echo("[2/3] probe: an agent in every lab host (each times a matmul on the CPUs "
                   "the lab hosts share), all pairs measured", err=True)
        return probe_lab(find_lab(DEMO_NAME), topology_path, ProbeOptions(), flops=True)
    finally:
        click.echo("[3/3] lab down", err=True)
        lab_down(DEMO_NAME)


def _local_demo(topology_path: Path, forced: bool) -> None:
    from topology.discover import discover_host

    why = "as asked" if forced else "not root or no iproute2, so no lab"
    click.echo(f"[1/1] probe local ({why}): links are NOT shaped or measured; this host only",
               err=True)
    host = discover_host()
    topology = Topology(version=TOPOLOGY_VERSION, hosts=[host])
    save_topology(topology, topology_path, header=f"hetsched demo (local) on {host.name}")
    click.echo(f"wrote {topology_path}", err=True)
