"""`hetsched plan`, `show` and `simulate`: make a plan, review it, predict its speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cli.errors import reports_input_errors
from holmes.estimate import DilocoChoice, Estimate
from holmes.hf_config import builtin_names
from holmes.model import list_presets, load_model
from holmes.plan import Plan, load_plan, save_plan
from holmes.plan_build import build_plan, summary
from holmes.planner import PlanOptions, decide, naive_estimate
from holmes.review import estimate_plan, plan_model, plan_topology
from holmes.skipping import DEFAULT_MAX_SWAPS, SkipChoice
from topology.errors import InputError
from topology.schema import load_topology

TOPOLOGY = click.Path(dir_okay=False, path_type=Path)


@click.command()
@click.argument("topology_file", type=TOPOLOGY)
@click.option("-m", "--model", "model_name", required=True,
              help=f"A model.yaml, a preset ({', '.join(list_presets())}), or hf:SOURCE: a "
              "Hugging Face config (a built-in: "
              f"{', '.join(builtin_names())}; a config.json; or a model directory).")
@click.option("-o", "--output", type=TOPOLOGY, required=True, help="Where to write plan.yaml.")
@click.option("--sync", type=click.Choice(["auto", "allreduce", "diloco"]), default="auto",
              show_default=True, help="How replicas stay in step (auto: all-reduce unless "
              "DiLoCo is more than 10% faster).")
@click.option("--regime", type=click.Choice(["auto", "datacentre", "geo"]), default="auto",
              show_default=True, help="Holmes fabric islands, or DT-FM for scattered nodes.")
@click.option("--stages", type=click.IntRange(min=1), help="Force the number of pipeline stages.")
@click.option("--sync-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="DiLoCo: inner steps H between syncs of a fragment.")
@click.option("--fragments", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--quantization", type=click.Choice(["fp4", "int8", "bf16", "none"]),
              default="fp4", show_default=True)
@click.option("--skip-ratio", type=float, default=None,
              help="SkipPipe: each microbatch skips this fraction k in [0, 1) of the "
              "non-first stages; routes are chosen to avoid collisions (default: no skipping).")
@click.option("--max-swaps", type=click.IntRange(min=0), default=DEFAULT_MAX_SWAPS,
              show_default=True, help="SkipPipe: swaps of consecutive stages per route.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@reports_input_errors
def plan(topology_file: Path, model_name: str, output: Path, sync: str, regime: str,
         stages: int | None, sync_every: int, fragments: int, quantization: str,
         skip_ratio: float | None, max_swaps: int, as_json: bool) -> None:
    """Plan MODEL on TOPOLOGY_FILE: stages, layers, groups, NICs, sync; write plan.yaml."""
    topology = load_topology(topology_file)
    config = load_model(model_name)
    skip = None
    if skip_ratio is not None:
        if not 0.0 <= skip_ratio < 1.0:
            raise InputError(f"must be in [0, 1), got {skip_ratio:g}", field="--skip-ratio")
        skip = SkipChoice(ratio=skip_ratio, max_swaps=max_swaps)
    options = PlanOptions(regime=regime, sync=sync, stages=stages, skip=skip,
                          diloco=DilocoChoice(sync_every=sync_every, fragments=fragments,
                                              quantization=quantization))
    decision = decide(topology, config, options)
    relative = os.path.relpath(topology_file.resolve(), output.resolve().parent)
    result = build_plan(decision, topology_file=relative, model_source=model_name)
    lines = summary(decision, result, topology.name or topology_file.name)
    save_plan(result, output, lines)
    console = Console(stderr=True)
    for line in lines:
        console.print(line, highlight=False)
    console.print(_candidates_table(decision.candidates, decision.chosen))
    console.print(f"wrote {output}")
    if as_json:
        click.echo(result.to_json())


def _candidates_table(candidates: list[Estimate], chosen: Estimate) -> Table:
    table = Table(title="candidates (fastest first)")
    for column in ("", "layout", "stages", "sync", "s/iter", "tokens/s", "bubble"):
        table.add_column(column, justify="left" if column in ("layout", "sync") else "right")
    for e in sorted(candidates, key=lambda e: e.step_s)[:8]:
        table.add_row("*" if e is chosen else "", e.layout.description, str(e.layout.stages),
                      e.sync, f"{e.step_s:.4g}", f"{e.tokens_per_s:,.0f}",
                      f"{e.bubble_fraction:.0%}")
    return table


@click.command()
@click.argument("plan_file", type=TOPOLOGY)
@click.option("--topology", "topology_file", type=TOPOLOGY,
              help="Topology file (default: the one the plan names).")
@click.option("--gantt", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw one simulated iteration to FILE.png or FILE.svg.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead.")
@reports_input_errors
def show(plan_file: Path, topology_file: Path | None, gantt: Path | None, as_json: bool) -> None:
    """Review PLAN_FILE: stages, groups and NICs, link load, memory headroom, a Gantt chart."""
    the_plan = load_plan(plan_file)
    if as_json:
        click.echo(the_plan.to_json())
        return
    topology = plan_topology(the_plan, plan_file, topology_file)
    console = Console()
    console.print(_stages_table(the_plan))
    console.print(_groups_table(the_plan))
    console.print(_load_table(the_plan))
    console.print(_memory_table(the_plan, topology))
    if gantt is not None:
        _draw(the_plan, topology, gantt)
        console.print(f"wrote {gantt}")


def _draw(the_plan: Plan, topology, gantt: Path) -> None:  # noqa: ANN001
    from cli.gantt import draw_gantt

    if gantt.suffix not in (".png", ".svg"):
        raise InputError("the Gantt chart must be a .png or .svg file", field="--gantt")
    result = estimate_plan(the_plan, topology, plan_model(the_plan, None))
    active = {event.node for event in result.simulation.timeline}
    rows = [d for s in the_plan.replicas[0].stages for d in the_plan.stage(s).devices
            if d in active]
    draw_gantt(result.simulation, rows, gantt,
               f"{the_plan.model.name}: one iteration of replica 0, lane 0 "
               f"({result.iteration_s:.3g} s simulated)")


def _stages_table(the_plan: Plan) -> Table:
    table = Table(title=f"{the_plan.model.name}: {len(the_plan.replicas)} replica(s), "
                  f"sync {the_plan.sync}")
    for column in ("stage", "replica", "layers", "devices", "holds"):
        table.add_column(column)
    for stage in the_plan.stages:
        devices = ", ".join(stage.devices) if len(stage.devices) <= 4 else \
            f"{stage.devices[0]} … {stage.devices[-1]} ({len(stage.devices)})"
        table.add_row(str(stage.id), str(stage.replica), f"[{stage.layers[0]}, {stage.layers[1]})",
                      devices, ", ".join(stage.holds))
    return table


def _groups_table(the_plan: Plan) -> Table:
    table = Table(title="process groups and the NICs they use")
    for column in ("group", "kind", "ranks", "backend", "environment"):
        table.add_column(column)
    for group in the_plan.groups[:40]:
        env = " ".join(f"{k}={v}" for k, v in group.env.items())
        if group.env_per_host:
            env += f" (+ per-host values on {len(group.env_per_host)} hosts)"
        table.add_row(group.name, group.kind, str(len(group.ranks)), group.backend, env)
    if len(the_plan.groups) > 40:
        table.add_row("…", f"{len(the_plan.groups) - 40} more", "", "", "")
    return table


def _load_table(the_plan: Plan) -> Table:
    e = the_plan.estimates
    table = Table(title=f"estimated: {e.iteration_s:.4g} s/iteration, {e.tokens_per_s:,.0f} "
                  f"tokens/s, bubble {e.bubble_fraction:.0%}")
    table.add_column("link class")
    table.add_column("GB per step", justify="right")
    for name, value in e.bytes_per_step.items():
        table.add_row(name, f"{value / 1e9:.4g}")
    return table


def _memory_table(the_plan: Plan, topology) -> Table:  # noqa: ANN001
    table = Table(title="memory per device (estimated peak)")
    for column in ("device", "needs GB", "has GB", "headroom"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for device, needed in list(the_plan.estimates.memory_gb.items())[:32]:
        host, name = device.split(":", 1)
        has = next(d.memory_gb for d in topology.host(host).devices if d.name == name)
        table.add_row(device, f"{needed:.1f}", f"{has:g}", f"{1 - needed / has:.0%}")
    return table


@click.command()
@click.argument("plan_file", type=TOPOLOGY)
@click.option("--topology", "topology_file", type=TOPOLOGY,
              help="Topology file (default: the one the plan names).")
@click.option("--model", "model_name", help="Model file or preset (default: the plan's).")
@click.option("--baseline", type=click.Choice(["none", "naive", "full"]), default="none",
              show_default=True, help="naive: Megatron-style placement on the same devices; "
              "full: the plan's placement with full-pipeline routes (no skipping).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@reports_input_errors
def simulate(plan_file: Path, topology_file: Path | None, model_name: str | None,
             baseline: str, as_json: bool) -> None:
    """Simulate one iteration of PLAN_FILE (and a baseline) with the pipeline simulator."""
    the_plan = load_plan(plan_file)
    topology = plan_topology(the_plan, plan_file, topology_file)
    config = plan_model(the_plan, model_name)
    rows = {"plan": estimate_plan(the_plan, topology, config)}
    if baseline == "naive":
        rows["naive"] = naive_estimate(topology, config, rows["plan"])
    if baseline == "full":
        rows["full pipeline"] = estimate_plan(the_plan, topology, config, full_routes=True)
    figures = {name: {"iteration_s": e.step_s, "tokens_per_s": e.tokens_per_s,
                      "bubble_fraction": e.bubble_fraction,
                      "bytes_per_step": e.bytes_per_step} for name, e in rows.items()}
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    table = Table(title=f"simulated iteration of {plan_file}")
    for column in ("", "s/iteration", "tokens/s", "bubble", "speed-up of the plan"):
        table.add_column(column, justify="right")
    for name, e in rows.items():
        table.add_row(name, f"{e.step_s:.4g}", f"{e.tokens_per_s:,.0f}",
                      f"{e.bubble_fraction:.0%}", f"{e.step_s / rows['plan'].step_s:.2f}x")
    Console().print(table)
