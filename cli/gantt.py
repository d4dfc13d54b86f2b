"""Drawing one simulated iteration as a Gantt chart (PNG or SVG, by the file's suffix).

A row per device; a box per forward (light), loss and backward (dark), coloured by
microbatch; each transfer is a grey line from the sender's row at its start to the
receiver's row at its arrival; a data-parallel all-reduce tail is hatched.
`draw_measured_beside` draws one measured step of a run (its timings) above the
simulated iteration, on one time scale; a measured sync is hatched like a tail.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from skippipe.simulate import Event, SimResult

ALPHA = {"forward": 0.55, "loss": 1.0, "backward": 1.0}


def draw_gantt(result: SimResult, rows: list[str], image_format: str, title: str) -> bytes:
    """The chart as the bytes of a `png` or `svg` file (the caller writes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(12, 1.0 + 0.45 * len(rows)))
    _draw_on(axes, result, rows, title)
    return _save(figure, image_format)


def draw_measured_beside(simulated: SimResult, lines: Sequence[dict[str, Any]],
                         measured: Any, image_format: str, name: str) -> bytes:
    """A measured step (the usable one closest to the median period) above the simulated
    iteration; `measured` is `holmes.calibrate.Measured`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = _typical_step(lines, measured)
    mine = sorted((x for x in lines if x["step"] == step), key=lambda x: (x["stage"], x["rank"]))
    result = measured_result(mine)
    rows = [x["node"] for x in mine]
    sim_rows = [r for r in dict.fromkeys(e.node for e in simulated.timeline) if r]
    height = 2.0 + 0.45 * (len(rows) + len(sim_rows))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, height), sharex=True,
                                         height_ratios=[len(rows) + 1, len(sim_rows) + 1])
    _draw_on(top, result, rows, f"{name}: measured step {step} "
             f"({result.iteration_s:.3g} s, all ranks)")
    _draw_on(bottom, simulated, sim_rows, f"simulated iteration ({simulated.iteration_s:.3g} s, "
             "replica 0)")
    return _save(figure, image_format)


def _typical_step(lines: Sequence[dict[str, Any]], measured: Any) -> int:
    ends: dict[int, float] = {}
    for x in lines:
        ends[x["step"]] = max(ends.get(x["step"], 0.0), x["end"])
    periods = {s: ends[s] - ends[s - 1] for s in measured.steps if s - 1 in ends}
    if not periods:
        return measured.steps[0] if measured.steps else min(ends)
    return min(periods, key=lambda s: abs(periods[s] - measured.step_s))


def measured_result(lines: Sequence[dict[str, Any]]) -> SimResult:
    """One step of every rank as a timeline (seconds from the step's first start)."""
    t0 = min(x["start"] for x in lines)
    node_of = {x["rank"]: x["node"] for x in lines}
    arrived = {(x["rank"], peer, mb, kind): end for x in lines
               for peer, mb, kind, _, _, end in x["recv"]}
    events = []
    for x in lines:
        waits = [(r_start, r_end) for *_, r_start, r_end in x["recv"]]
        for kind, mb, start, end in x["tasks"]:  # the compute: after its receive
            start = max([start, *(e for s, e in waits if start <= s < end)])
            events.append(Event(kind, mb, start - t0, end - t0, x["node"]))
        for peer, mb, kind, _, issued in x["send"]:
            end = arrived.get((peer, x["rank"], mb, kind))
            if end is not None and peer in node_of:
                events.append(Event("send", mb, issued - t0, end - t0, x["node"], x["node"],
                                    node_of[peer]))
        for _, _, start, end in x["syncs"]:
            events.append(Event("tail", None, start - t0, end - t0, x["node"]))
    end = max(x["end"] for x in lines) - t0
    return SimResult(end, {}, {}, {}, events)


def _save(figure: Any, image_format: str) -> bytes:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format=image_format)
    plt.close(figure)
    return image.getvalue()


def _draw_on(axes: Any, result: SimResult, rows: list[str], title: str) -> None:
    import matplotlib.pyplot as plt

    row_of = {name: i for i, name in enumerate(rows)}
    colours = plt.get_cmap("tab20")
    for event in result.timeline:
        if event.kind == "send":
            if event.src in row_of and event.dst in row_of:
                axes.plot([event.start, event.end], [row_of[event.src], row_of[event.dst]],
                          color="0.55", linewidth=0.6)
            continue
        if event.node not in row_of:
            continue
        width = event.end - event.start
        if event.kind == "tail":
            axes.barh(row_of[event.node], width, left=event.start, height=0.6, color="0.85",
                      hatch="//", edgecolor="0.4")
            continue
        axes.barh(row_of[event.node], width, left=event.start, height=0.6,
                  color=colours(event.microbatch % 20), alpha=ALPHA[event.kind],
                  edgecolor="black", linewidth=0.3)
    axes.set_yticks(range(len(rows)), rows)
    axes.invert_yaxis()
    axes.set_xlabel("seconds")
    axes.set_title(title)
