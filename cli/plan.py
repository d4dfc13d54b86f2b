"""`hetsched plan`, `show` and `simulate`: make a plan, review it, predict its speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cli.errors import reports_input_errors
from cli.options import FILE
from holmes.assumptions import CostAssumptions, list_profiles, load_costs
from holmes.calibration import with_calibration
from holmes.estimate import GPU_RESERVED_GB, DilocoChoice, Estimate, usable_memory_gb
from holmes.hf_config import builtin_names
from holmes.hosts import CPU_HOST_FLAG
from holmes.model import list_presets, load_model
from holmes.plan import Plan, load_plan, save_plan
from holmes.plan_build import (
    build_plan,
    fault_lines,
    idle_lines,
    left_out_lines,
    summary,
    tensor_parallel_line,
)
from holmes.planner import (
    ESTIMATE_NOISE,
    PlanOptions,
    decide,
    naive_estimate,
    naive_like_estimate,
)
from holmes.review import (
    check_plan_source,
    estimate_plan,
    plan_costs,
    plan_diloco,
    plan_model,
    plan_topology,
    planned_topology,
)
from holmes.skipping import DEFAULT_MAX_SWAPS, SkipChoice
from topology.calibration import load_calibration
from topology.errors import InputError
from topology.files import check_output, write_bytes_atomic
from topology.schema import Topology, load_topology

MAX_SYNC_EVERY = 1_000_000
MAX_FRAGMENTS = 1024
DEFAULT_OVERLAP_STEPS = 2
TABLE_ROWS = 32
CANDIDATE_ROWS = 8
NAIVE_LIKE = "naive, the plan's replicas and sync"
COSTS_HELP = ("The cost model's assumptions: a file with a costs: section, or a profile "
              f"({', '.join(list_profiles())}).")


def _costs(option: str | None) -> CostAssumptions | None:
    return load_costs(option) if option is not None else None


@click.command()
@click.argument("topology_file", type=FILE)
@click.option("-m", "--model", "model_name", required=True,
              help=f"A model.yaml, a preset ({', '.join(list_presets())}), or hf:SOURCE: a "
              "Hugging Face config (a built-in: "
              f"{', '.join(builtin_names())}; a config.json; or a model directory).")
@click.option("-o", "--output", type=FILE, required=True, help="Where to write plan.yaml.")
@click.option("--sync", type=click.Choice(["auto", "allreduce", "diloco"]), default="auto",
              show_default=True, help="How replicas stay in step (auto: all-reduce unless "
              "DiLoCo is more than 10% faster).")
@click.option("--regime", type=click.Choice(["auto", "datacentre", "geo"]), default="auto",
              show_default=True, help="Holmes fabric islands, or DT-FM for scattered nodes.")
@click.option("--stages", type=click.IntRange(1, 4096),
              help="Force the number of pipeline stages.")
@click.option("--sync-every", type=click.IntRange(1, MAX_SYNC_EVERY), default=100,
              show_default=True, help="DiLoCo: inner steps H between syncs of a fragment.")
@click.option("--fragments", type=click.IntRange(1, MAX_FRAGMENTS), default=4, show_default=True,
              help="DiLoCo: fragments synced in turn (at most --sync-every).")
@click.option("--quantization", type=click.Choice(["fp4", "int8", "bf16", "none"]),
              default="fp4", show_default=True)
@click.option("--skip-ratio", type=float, default=None,
              help="SkipPipe: each microbatch skips this fraction k in [0, 1) of the "
              "non-first stages; routes are chosen to avoid collisions (default: no skipping).")
@click.option("--max-swaps", type=click.IntRange(0, 1024), default=None,
              help="SkipPipe: swaps of consecutive stages per route (default: "
              f"{DEFAULT_MAX_SWAPS}, or the non-first stages when there are fewer).")
@click.option("--optimizer-sharding", type=click.Choice(["zero1", "none"]), default="zero1",
              show_default=True, help="zero1: each device keeps 1/n of its stage's optimizer "
              "state (n: the stage's data-parallel width); none: all of it. Memory follows.")
@click.option("--nccl-net", type=click.Choice(["auto", "per-communicator", "per-process"]),
              default="auto", show_default=True,
              help="How NCCL groups get their network: per communicator (ncclConfig_t "
              "net_name; needs a torch with ProcessGroupNCCL.Options().config.net_name) or "
              "per process (NCCL_NET). auto: what this machine's torch offers.")
@click.option("--tensor-parallel", type=click.Choice(["auto", "1", "2", "4", "8"]),
              default="auto", show_default=True,
              help="Tensor-parallel degree inside hosts (Megatron); auto: the planner picks "
              "among those dividing every host's devices in a stage. Plans with TP > 1 are "
              "not launched yet (the runtime runs TP 1).")
@click.option("--noise", type=click.FloatRange(0.0, 1.0), default=None,
              help="Estimates within this fraction of the fastest are ties (the probe's "
              "timing noise), broken by the fewest bytes across sites, then between hosts "
              f"[default: {ESTIMATE_NOISE:g} when a device is a CPU, whose timed speed is "
              "noisy; 0 for GPUs: speed alone].")
@click.option("--calibration", "calibration_file", type=FILE,
              help="A calibration (`hetsched calibrate`): measured device speeds, link "
              "figures and step overhead replace the topology's.")
@click.option(CPU_HOST_FLAG, "include_cpu_hosts", is_flag=True,
              help="Use hosts without a GPU in a GPU job (the whole job then runs on gloo).")
@click.option("--costs", "costs_option", metavar="FILE|NAME",
              help=COSTS_HELP + " Default: the model's costs: section, else default.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@reports_input_errors
def plan(topology_file: Path, model_name: str, output: Path, sync: str, regime: str,
         stages: int | None, sync_every: int, fragments: int, quantization: str,
         skip_ratio: float | None, max_swaps: int | None, optimizer_sharding: str, nccl_net: str,
         noise: float | None, calibration_file: Path | None, tensor_parallel: str,
         include_cpu_hosts: bool,
         costs_option: str | None,
         as_json: bool) -> None:
    """Plan MODEL on TOPOLOGY_FILE: stages, layers, groups, NICs, sync; write plan.yaml."""
    check_output(output, topology_file, Path(model_name), calibration_file,
                 *([Path(costs_option)] if costs_option else []), field="-o")
    skip = None
    if skip_ratio is not None:
        if not 0.0 <= skip_ratio < 1.0:
            raise InputError(f"must be in [0, 1), got {skip_ratio:g}", field="--skip-ratio")
        skip = SkipChoice(ratio=skip_ratio, max_swaps=max_swaps)
    if fragments > sync_every:
        raise InputError(f"{fragments} fragments need --sync-every >= {fragments}, got "
                         f"{sync_every}", field="--fragments")
    options = PlanOptions(regime=regime, sync=sync, stages=stages, skip=skip,
                          diloco=DilocoChoice(sync_every=sync_every, fragments=fragments,
                                              overlap_steps=min(DEFAULT_OVERLAP_STEPS,
                                                                sync_every - 1),
                                              quantization=quantization),
                          optimizer_sharding=optimizer_sharding, nccl_net=nccl_net,
                          include_cpu_hosts=include_cpu_hosts, costs=_costs(costs_option),
                           tensor_parallel=None if tensor_parallel == "auto"
                           else int(tensor_parallel), noise=noise)
    as_written = load_topology(topology_file)
    topology = _calibrated(as_written, calibration_file)
    decision = decide(topology, load_model(model_name), options)
    decision.source = as_written  # the plan names the topology file as written
    relative = _relative_to(topology_file, output)
    source = _relative_to(Path(model_name), output) if Path(model_name).is_file() else model_name
    result = build_plan(decision, topology_file=relative, model_source=source)
    lines = summary(decision, result, topology.name or topology_file.name)
    save_plan(result, output, lines)
    console = Console(stderr=True)
    for line in lines:
        console.print(line, highlight=False)
    console.print(_candidates_table(decision.candidates, decision.chosen))
    console.print(f"wrote {output}")
    if as_json:
        click.echo(result.to_json())


def _calibrated(topology: Topology, calibration_file: Path | None) -> Topology:
    if calibration_file is None:
        return topology
    return with_calibration(topology, load_calibration(calibration_file), calibration_file)


def _relative_to(path: Path, plan_file: Path) -> str:
    """`path` as the plan file will name it: relative to the plan's folder."""
    return os.path.relpath(path.resolve(), plan_file.resolve().parent)


def _candidates_table(candidates: list[Estimate], chosen: Estimate) -> Table:
    table = Table(title="candidates (fastest first)")
    for column in ("", "layout", "stages", "TP", "sync", "s/iter", "tokens/s", "bubble"):
        table.add_column(column, justify="left" if column in ("layout", "sync") else "right")
    for e in sorted(candidates, key=lambda e: e.step_s)[:CANDIDATE_ROWS]:
        table.add_row("*" if e is chosen else "", e.layout.description, str(e.layout.stages),
                      str(e.layout.tensor_parallel), e.sync, f"{e.step_s:.4g}",
                      f"{e.tokens_per_s:,.0f}", f"{e.bubble_fraction:.0%}")
    if len(candidates) > CANDIDATE_ROWS:
        table.add_row("", f"… {len(candidates) - CANDIDATE_ROWS} more", "", "", "", "", "", "")
    return table


@click.command()
@click.argument("plan_file", type=FILE)
@click.option("--topology", "topology_file", type=FILE,
              help="Topology file (default: the one the plan names).")
@click.option("--gantt", type=FILE,
              help="Draw one simulated iteration to FILE.png or FILE.svg.")
@click.option("--costs", "costs_option", metavar="FILE|NAME",
              help=COSTS_HELP + " Given: the plan is re-estimated with them (default: the "
              "plan's own).")
@click.option("--calibration", "calibration_file", type=FILE,
              help="A calibration (`hetsched calibrate`): measured device speeds, link "
              "figures and step overhead replace the topology's (in the Gantt chart and "
              "a re-estimate).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead.")
@reports_input_errors
def show(plan_file: Path, topology_file: Path | None, gantt: Path | None,
         costs_option: str | None, calibration_file: Path | None, as_json: bool) -> None:
    """Review PLAN_FILE: stages, groups and NICs, link load, memory headroom, a Gantt chart."""
    override = _costs(costs_option)
    if gantt is not None:
        if gantt.suffix not in (".png", ".svg"):
            raise InputError("the Gantt chart must be a .png or .svg file", field="--gantt")
        check_output(gantt, plan_file, topology_file, calibration_file, field="--gantt")
    the_plan = load_plan(plan_file)
    check_plan_source(the_plan, plan_file)
    if as_json:
        click.echo(the_plan.to_json())
        return
    topology = _calibrated(plan_topology(the_plan, plan_file, topology_file), calibration_file)
    console = Console()
    console.print(tensor_parallel_line(the_plan), highlight=False)
    console.print(_stages_table(the_plan))
    console.print(_groups_table(the_plan))
    console.print(_load_table(the_plan))
    console.print(_memory_table(the_plan, topology))
    if the_plan.idle:
        console.print(_idle_table(the_plan))
    for line in left_out_lines(the_plan) + idle_lines(the_plan) + fault_lines(the_plan):
        console.print(line, highlight=False)
    console.print(f"cost assumptions: {plan_costs(the_plan, None).summary()}", highlight=False)
    if override is not None or calibration_file is not None:
        again = estimate_plan(the_plan, topology, plan_model(the_plan, None, plan_file),
                              assumptions=override)
        what = " and ".join(([override.summary()] if override is not None else [])
                            + ([f"calibration {calibration_file}"] if calibration_file else []))
        console.print(f"with {what}: {again.step_s:.4g} s/iteration, "
                      f"{again.tokens_per_s:,.0f} tokens/s, bubble "
                      f"{again.bubble_fraction:.0%}", highlight=False)
    if gantt is not None:
        _draw(the_plan, plan_file, topology, gantt, override)
        console.print(f"wrote {gantt}")


def _draw(the_plan: Plan, plan_file: Path, topology, gantt: Path,  # noqa: ANN001
          override: CostAssumptions | None = None) -> None:
    from cli.gantt import draw_gantt

    result = estimate_plan(the_plan, topology, plan_model(the_plan, None, plan_file),
                           assumptions=override)
    active = {event.node for event in result.simulation.timeline}
    rows = [d for s in the_plan.replicas[0].stages for d in the_plan.stage(s).leaders()
            if d in active]
    labels = {g[0]: f"{g[0]}..{g[-1].split(':', 1)[1]} (TP {len(g)})"
              for stage in the_plan.stages for g in stage.tp_groups() if len(g) > 1}
    image = draw_gantt(result.simulation, rows, gantt.suffix[1:],
                       f"{the_plan.model.name}: one iteration of replica 0, lane 0 "
                       f"({result.iteration_s:.3g} s simulated)", labels)
    write_bytes_atomic(gantt, image)


def _stages_table(the_plan: Plan) -> Table:
    degrees = sorted({s.tensor_parallel for s in the_plan.stages})
    table = Table(title=f"{the_plan.model.name}: {len(the_plan.replicas)} replica(s), "
                  f"sync {the_plan.sync}, tensor parallel {'/'.join(map(str, degrees))}")
    for column in ("stage", "replica", "layers", "devices", "TP x DP", "holds"):
        table.add_column(column)
    for stage in the_plan.stages:
        devices = ", ".join(stage.devices) if len(stage.devices) <= 4 else \
            f"{stage.devices[0]} … {stage.devices[-1]} ({len(stage.devices)})"
        shape = f"{stage.tensor_parallel} x {len(stage.devices) // stage.tensor_parallel}"
        table.add_row(str(stage.id), str(stage.replica), f"[{stage.layers[0]}, {stage.layers[1]})",
                      devices, shape, ", ".join(stage.holds))
    return table


def _groups_table(the_plan: Plan) -> Table:
    how = the_plan.nccl_net_selection or "gloo"
    table = Table(title=f"process groups, the network they run on ({how}) and their NICs")
    for column in ("group", "kind", "ranks", "backend", "transport", "environment"):
        table.add_column(column)
    for group in the_plan.groups[:TABLE_ROWS]:
        env = " ".join(f"{k}={v}" for k, v in group.env.items())
        if group.env_per_host:
            env += f" (+ per-host values on {len(group.env_per_host)} hosts)"
        config = " ".join(f"{k}={v}" for k, v in group.nccl_config.items())
        transport = (group.transport or "?") + (f" ({config})" if config else "")
        table.add_row(group.name, group.kind, str(len(group.ranks)), group.backend, transport,
                      env)
    _more(table, len(the_plan.groups), 6)
    return table


def _more(table: Table, rows: int, columns: int) -> None:
    """A last row `… N more` when a table shows only its first TABLE_ROWS rows."""
    if rows > TABLE_ROWS:
        table.add_row("…", f"{rows - TABLE_ROWS} more", *[""] * (columns - 2))


def _idle_table(the_plan: Plan) -> Table:
    table = Table(title=f"idle devices ({len(the_plan.idle)})")
    table.add_column("device")
    table.add_column("why")
    for idle in the_plan.idle[:TABLE_ROWS]:
        table.add_row(idle.device, idle.reason)
    _more(table, len(the_plan.idle), 2)
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
    table = Table(title=f"memory per device (estimated peak; a GPU keeps {GPU_RESERVED_GB:g} GB "
                  "for the CUDA context and NCCL buffers)")
    for column in ("device", "needs GB", "usable GB", "has GB", "headroom"):
        table.add_column(column, justify="left" if column == "device" else "right")
    memory = list(the_plan.estimates.memory_gb.items())
    for device, needed in memory[:TABLE_ROWS]:
        host, name = device.split(":", 1)
        spec = next(d for d in topology.host(host).devices if d.name == name)
        usable = usable_memory_gb(spec)
        table.add_row(device, f"{needed:.1f}", f"{usable:.1f}", f"{spec.memory_gb:g}",
                      f"{1 - needed / usable:.0%}")
    _more(table, len(memory), 5)
    return table


@click.command()
@click.argument("plan_file", type=FILE)
@click.option("--topology", "topology_file", type=FILE,
              help="Topology file (default: the one the plan names).")
@click.option("--model", "model_name", help="Model file or preset (default: the plan's).")
@click.option("--baseline", type=click.Choice(["none", "naive", "full"]), default="none",
              show_default=True, help="naive: Megatron's rank order on as many devices, the "
              "plan's depth, per-step all-reduce, NCCL's own transport (and, for a plan with "
              "replicas, the same rank order with its replicas and sync); full: the plan's "
              "placement with full-pipeline routes (no skipping).")
@click.option("--costs", "costs_option", metavar="FILE|NAME",
              help=COSTS_HELP + " Default: those the plan was made with.")
@click.option("--calibration", "calibration_file", type=FILE,
              help="A calibration (`hetsched calibrate`): measured device speeds, link "
              "figures and step overhead replace the topology's.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@reports_input_errors
def simulate(plan_file: Path, topology_file: Path | None, model_name: str | None,
             baseline: str, costs_option: str | None, calibration_file: Path | None,
             as_json: bool) -> None:
    """Simulate one iteration of PLAN_FILE (and a baseline) with the pipeline simulator."""
    override = _costs(costs_option)
    the_plan = load_plan(plan_file)
    topology = _calibrated(plan_topology(the_plan, plan_file, topology_file), calibration_file)
    config = plan_model(the_plan, model_name, plan_file)
    assumptions = plan_costs(the_plan, override)
    rows = {"plan": estimate_plan(the_plan, topology, config, assumptions=override)}
    missing: dict[str, str] = {}
    if baseline == "naive":
        planned = planned_topology(the_plan, topology)
        naives = {"naive": lambda: naive_estimate(planned, config, rows["plan"], assumptions)}
        if len(the_plan.replicas) > 1:
            naives[NAIVE_LIKE] = lambda: naive_like_estimate(planned, config, rows["plan"],
                                                             plan_diloco(the_plan), assumptions)
        for name, make in naives.items():
            try:
                rows[name] = make()
            except InputError as exc:
                missing[name] = exc.message
    if baseline == "full":
        rows["full pipeline"] = estimate_plan(the_plan, topology, config, full_routes=True,
                                              assumptions=override)
    figures: dict[str, dict[str, object]] = {
        name: {"iteration_s": e.step_s, "tokens_per_s": e.tokens_per_s,
               "bubble_fraction": e.bubble_fraction, "bytes_per_step": e.bytes_per_step}
        for name, e in rows.items()}
    figures |= {name: {"none": reason} for name, reason in missing.items()}
    figures["costs"] = assumptions.model_dump(mode="json")
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    table = Table(title=f"simulated iteration of {plan_file}")
    for column in ("", "s/iteration", "tokens/s", "bubble", "speed-up of the plan"):
        table.add_column(column, justify="right")
    for name, e in rows.items():
        table.add_row(name, f"{e.step_s:.4g}", f"{e.tokens_per_s:,.0f}",
                      f"{e.bubble_fraction:.0%}", f"{e.step_s / rows['plan'].step_s:.2f}x")
    console = Console()
    console.print(table)
    for name, reason in missing.items():
        console.print(f"{name}: none: {reason}", highlight=False)
    console.print(f"cost assumptions: {assumptions.summary()}", highlight=False)
