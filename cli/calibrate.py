"""`hetsched calibrate` and `hetsched report`: a run's timings against the plan's estimate.

A run directory holds the plan (`plan.yaml`, or `--plan`) and the timings every rank
wrote (`timings/rank{R}.jsonl`; `examples/train_tinygpt.py --metrics RUN/metrics.json`
puts them there, and `hetsched demo` does so in its output folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cli.errors import reports_input_errors
from cli.options import FILE
from holmes.calibrate import Measured, fit_calibration, measure
from holmes.calibration import with_calibration
from holmes.estimate import Estimate
from holmes.plan import Plan, load_plan
from holmes.review import estimate_plan, plan_model, plan_topology
from holmes.runtime.timings import TIMINGS_FOLDER, read_timings
from topology.calibration import Calibration, load_calibration, save_calibration
from topology.errors import InputError
from topology.files import check_output, write_bytes_atomic
from topology.schema import Topology

RUN_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
# the runtime's link classes; the estimate's intra_fabric and inter_fabric are intra_site
RUNTIME_CLASS = {"intra_fabric": "intra_site", "inter_fabric": "intra_site"}


def load_run(run_dir: Path, plan_file: Path | None) -> tuple[Plan, Path, list[dict[str, Any]]]:
    plan_path = plan_file or run_dir / "plan.yaml"
    plan = load_plan(plan_path)
    folder = run_dir / TIMINGS_FOLDER
    if not folder.is_dir() or not any(folder.glob("rank*.jsonl")):
        raise InputError(f"holds no {TIMINGS_FOLDER}/rank*.jsonl (train with --metrics "
                         f"{run_dir}/metrics.json, or --timings {folder})", run_dir)
    try:
        lines = read_timings(folder)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"a timings line is not what the runtime writes ({exc})",
                         folder) from None
    if not lines:
        raise InputError("the timings files are empty (did the run take a step?)", folder)
    return plan, plan_path, lines


def calibrated_topology(plan: Plan, plan_path: Path, calibration: Path | None) -> Topology:
    topology = plan_topology(plan, plan_path, None)
    if calibration is None:
        return topology
    return with_calibration(topology, load_calibration(calibration), calibration)


@click.command()
@click.argument("run_dir", type=RUN_DIR)
@click.option("--plan", "plan_file", type=FILE, help="The run's plan (default: RUN_DIR/plan.yaml).")
@click.option("-o", "--output", type=FILE, required=True, help="Where to write the calibration.")
@click.option("--warmup", type=click.IntRange(0, 10**6),
              help="Steps left out at the start (default: 10% of them, at least 1).")
@reports_input_errors
def calibrate(run_dir: Path, plan_file: Path | None, output: Path, warmup: int | None) -> None:
    """Fit devices, links and step overhead from RUN_DIR's timings; write a calibration.

    \b
    Per device: seconds per layer per sample (forward + backward) under the run's
    contention. Per host pair that carried pipeline messages: latency and bandwidth
    (least squares of transfer time over size). Per step: the overhead the calibrated
    simulation does not explain. A figure with too few samples keeps its prior (the
    file's notes say which). Use it with `hetsched plan/simulate/show/report
    --calibration FILE`.
    """
    check_output(output, plan_file, field="-o")
    plan, plan_path, lines = load_run(run_dir, plan_file)
    topology = plan_topology(plan, plan_path, None)
    config = plan_model(plan, None, plan_path)

    def predict(calibration: Calibration) -> float:
        return estimate_plan(plan, with_calibration(topology, calibration), config).step_s

    calibration = fit_calibration(lines, plan, topology, predict, run=str(run_dir),
                                  plan_path=str(plan_path), warmup=warmup)
    save_calibration(calibration, output, f"hetsched calibrate {run_dir}")
    console = Console(stderr=True)
    console.print(_fits_table(calibration))
    console.print(f"step overhead {calibration.step_overhead_s * 1000:.1f} ms over "
                  f"{calibration.steps} steps", highlight=False)
    for note in calibration.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"wrote {output}")


def _fits_table(calibration: Calibration) -> Table:
    table = Table(title="calibration")
    for column in ("what", "figure", "samples"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for d in calibration.devices:
        table.add_row(d.device, f"{d.seconds_per_layer_per_sample * 1e3:.4g} ms/layer/sample "
                      f"(bwd/fwd {d.backward_forward_ratio}, {d.workers_on_machine} on its "
                      "machine)", str(d.samples))
    for link in calibration.links:
        table.add_row(f"{link.a}-{link.b}", f"{link.bandwidth_gbps * 1000:.4g} Mbit/s, "
                      f"{link.latency_ms:.3g} ms ({link.latency_from})", str(link.samples))
    return table


@click.command()
@click.argument("run_dir", type=RUN_DIR)
@click.option("--plan", "plan_file", type=FILE, help="The run's plan (default: RUN_DIR/plan.yaml).")
@click.option("--calibration", type=FILE, help="Predict with this calibration.")
@click.option("--gantt", type=FILE, help="Draw one measured step beside the simulated one "
              "(FILE.png or FILE.svg).")
@click.option("--warmup", type=click.IntRange(0, 10**6),
              help="Steps left out at the start (default: 10% of them, at least 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@reports_input_errors
def report(run_dir: Path, plan_file: Path | None, calibration: Path | None, gantt: Path | None,
           warmup: int | None, as_json: bool) -> None:
    """Predicted vs measured per step for RUN_DIR: iteration time, tokens/s, busy time per
    stage, bytes per link class; and (--gantt) a measured step beside the simulated one."""
    if gantt is not None:
        if gantt.suffix not in (".png", ".svg"):
            raise InputError("the Gantt chart must be a .png or .svg file", field="--gantt")
        check_output(gantt, plan_file, calibration, field="--gantt")
    plan, plan_path, lines = load_run(run_dir, plan_file)
    topology = calibrated_topology(plan, plan_path, calibration)
    predicted = estimate_plan(plan, topology, plan_model(plan, None, plan_path))
    measured = measure(lines, warmup)
    rows = comparison(plan, predicted, measured)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _print_report(rows, run_dir, calibration)
    if gantt is not None:
        from cli.gantt import draw_measured_beside

        image = draw_measured_beside(predicted.simulation, lines, measured, gantt.suffix[1:],
                                     plan.model.name)
        write_bytes_atomic(gantt, image)
        click.echo(f"wrote {gantt}", err=True)


def comparison(plan: Plan, predicted: Estimate, measured: Measured) -> dict[str, Any]:
    tokens = plan.model.global_batch * plan.model.seq_len
    stage_of = {d: i for replica in plan.replicas for i, s in enumerate(replica.stages)
                for d in plan.stage(s).devices}
    busy: dict[str, dict[str, float]] = {}
    for device, seconds in predicted.simulation.busy_s.items():
        entry = busy.setdefault(str(stage_of.get(device, "?")), {"predicted": 0.0,
                                                                  "measured": 0.0})
        entry["predicted"] = max(entry["predicted"], seconds)
    for device, seconds in measured.busy_s.items():
        entry = busy.setdefault(str(stage_of.get(device, "?")), {"predicted": 0.0,
                                                                  "measured": 0.0})
        entry["measured"] = max(entry["measured"], seconds)
    classes: dict[str, dict[str, float]] = {}
    for name, value in predicted.bytes_per_step.items():
        key = RUNTIME_CLASS.get(name, name)
        classes.setdefault(key, {"predicted": 0.0, "measured": 0.0})["predicted"] += value
    for name, value in measured.bytes_per_step.items():
        classes.setdefault(name, {"predicted": 0.0, "measured": 0.0})["measured"] += value
    step = measured.step_s
    return {
        "steps": len(measured.steps),
        "iteration_s": {"predicted": predicted.step_s, "measured": step},
        "tokens_per_s": {"predicted": predicted.tokens_per_s,
                         "measured": tokens / step if step > 0 else 0.0},
        "busy_s_per_stage": busy, "bytes_per_step": classes,
        "sync_s": measured.sync_s,
    }


def error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured: positive when the estimate is optimistic."""
    return (predicted - measured) / measured if measured else float("nan")


def _print_report(rows: dict[str, Any], run_dir: Path, calibration: Path | None) -> None:
    how = f"calibrated by {calibration}" if calibration else "uncalibrated"
    table = Table(title=f"{run_dir}: predicted ({how}) vs measured, per step "
                  f"(median of {rows['steps']} steps)")
    for column in ("", "predicted", "measured", "error"):
        table.add_column(column, justify="left" if not column else "right")

    def add(name: str, pair: dict[str, float], fmt: str) -> None:
        table.add_row(name, format(pair["predicted"], fmt), format(pair["measured"], fmt),
                      f"{error(pair['predicted'], pair['measured']):+.1%}"
                      if pair["measured"] else "")

    add("iteration s", rows["iteration_s"], ".4g")
    add("tokens/s", rows["tokens_per_s"], ",.0f")
    for stage, pair in sorted(rows["busy_s_per_stage"].items()):
        add(f"stage {stage} busy s (busiest device)", pair, ".4g")
    for name, pair in sorted(rows["bytes_per_step"].items()):
        add(f"{name} MB", {k: v / 1e6 for k, v in pair.items()}, ".4g")
    console = Console()
    console.print(table)
    if rows["sync_s"]:
        console.print("measured sync seconds per step (slowest rank): " + ", ".join(
            f"{k} {v:.4g}" for k, v in sorted(rows["sync_s"].items())), highlight=False)
