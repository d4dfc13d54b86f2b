"""Drawing one simulated iteration as a Gantt chart (PNG or SVG, by the file's suffix).

A row per device (a tensor-parallel group is one row: its GPUs run in lock step, the
label names the group); a box per forward (light), loss and backward (dark), coloured by
microbatch; each transfer is a grey line from the sender's row at its start to the
receiver's row at its arrival; a data-parallel all-reduce tail is hatched.
"""

from __future__ import annotations

import io

from skippipe.simulate import SimResult

ALPHA = {"forward": 0.55, "loss": 1.0, "backward": 1.0}


def draw_gantt(result: SimResult, rows: list[str], image_format: str, title: str,
               labels: dict[str, str] | None = None) -> bytes:
    """The chart as the bytes of a `png` or `svg` file (the caller writes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_of = {name: i for i, name in enumerate(rows)}
    figure, axes = plt.subplots(figsize=(12, 1.0 + 0.45 * len(rows)))
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
    axes.set_yticks(range(len(rows)), [(labels or {}).get(r, r) for r in rows])
    axes.invert_yaxis()
    axes.set_xlabel("seconds")
    axes.set_title(title)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format=image_format)
    plt.close(figure)
    return image.getvalue()
