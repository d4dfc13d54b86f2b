"""Skipping on geo topologies the planner has not been tuned on (issue #15, "any geo").

For geo5x4 (SkipPipe's 5-clusters regions, 4 nodes each) and geo6x4 (six Asia-Pacific
heavy regions, 4 nodes each), both built by examples/generate.py from SkipPipe's
published region figures, this plans the way `hetsched plan TOPOLOGY -m
skippipe-llama-24l --costs skippipe --skip-ratio 1/3 --regime geo` does (`decide` with a
skip choice; the depth is the planner's own, from the five it tries) and compares the
plan's skip routes with the full pipeline on the same placement, layers and memory caps
(`Decision.full_pipeline`, what `simulate --baseline full` shows), both in the skippipe
profile's estimate; once at the depth the planner chooses (by the full-pipeline
estimate) and once at `--stages 6`, SkipPipe's own depth. The regime is forced to geo:
left to auto, these 4-node sites become data-centre replicas (5 or 6 replicas synced by
DiLoCo), where skipping also applies but the full-pipeline baseline is another shape.
Targets: skip routes >= 40% below the full pipeline, skipping (placement refinement for
skip routes + route search) in <= 10 s of CPU. Exit status 1 if a target is missed.

    .venv/bin/python bench/skippipe_geo_examples.py
"""

from __future__ import annotations

import sys
import time

from planner_common import load_example, print_table, report_checks, timed

from holmes.assumptions import load_costs
from holmes.model import load_model
from holmes.planner import PlanOptions, _with_skipping, decide
from holmes.skipping import SkipChoice

EXAMPLES = ("geo5x4", "geo6x4")
MODEL = "skippipe-llama-24l"
K = 1 / 3
STAGES = 6  # geo12's depth in SkipPipe's setting; also the planner's own choice
TARGET_REDUCTION = 0.40
SCHEDULING_LIMIT_S = 10.0


def row(example: str, stages: int | None) -> tuple[list[str], list[tuple[str, bool]]]:
    topology, config = load_example(example), load_model(MODEL)
    options = PlanOptions(regime="geo", stages=stages, costs=load_costs("skippipe"))
    decision, place_s = timed(lambda: decide(topology, config, options))
    cpu = time.process_time()
    skipped, skip_s = timed(lambda: _with_skipping(decision, SkipChoice(ratio=K)))
    skip_cpu = time.process_time() - cpu
    full, skip = skipped.full_pipeline, skipped.chosen
    reduction = 1 - skip.step_s / full.step_s
    depths = ", ".join(f"{e.layout.stages}: {e.step_s:.0f}" for e in decision.by_depth()
                       if e.layout.regime == "geo")
    cells = [example, f"{len(topology.hosts)}", f"{skip.layout.stages} ({depths})",
             f"{full.step_s:.1f}", f"{skip.step_s:.1f}", f"{reduction:.1%}",
             f"{place_s:.1f}", f"{skip_s:.1f} / {skip_cpu:.1f}"]
    label = f"{example}, {f'--stages {stages}' if stages else 'depth chosen'}"
    cells[0] = label
    checks = [(f"{label}: k=1/3 {reduction:.1%} below the full pipeline (>= "
               f"{TARGET_REDUCTION:.0%})", reduction >= TARGET_REDUCTION),
              (f"{label}: skipping scheduled in {skip_cpu:.1f} s CPU ({skip_s:.1f} s wall) "
               f"<= {SCHEDULING_LIMIT_S:g} s", skip_cpu <= SCHEDULING_LIMIT_S)]
    return cells, checks


def main() -> int:
    rows, checks = [], []
    for example in EXAMPLES:
        for stages in (None, STAGES):
            cells, found = row(example, stages)
            rows.append(cells)
            checks += found
    print_table(["topology", "nodes", "stages (s/iter by depth)", "full s", "skip s",
                 "below full", "placing s", "skipping s (wall / CPU)"], rows,
                right=[False, True, False, True, True, True, True, True])
    return report_checks(checks)


if __name__ == "__main__":
    sys.exit(main())
