"""Skipping asked of the planner (#15's bugs): an unset --max-swaps is never refused, the
layout chosen is one where skipping applies (or one line says why none is and what to
pass), and the auto regime weighs data-centre replicas against one geo pipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_planner import three_single_host_sites

from holmes.assumptions import load_costs
from holmes.model import load_model
from holmes.plan_build import build_plan, summary
from holmes.planner import PlanOptions, decide
from holmes.skipping import DEFAULT_MAX_SWAPS, SkipChoice, skips_a_stage
from topology.errors import InputError
from topology.schema import load_topology

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GEO5X4 = EXAMPLES / "geo5x4" / "topology.yaml"  # SkipPipe's 5-clusters: 5 sites x 4 nodes
MODEL = "skippipe-llama-24l"


def hetsched(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize(("stages", "ratio", "skips"), [
    (2, 0.33, False), (2, 0.5, True), (3, 0.33, True), (6, 0.33, True), (6, 0.05, False)])
def test_skips_a_stage(stages: int, ratio: float, skips: bool) -> None:
    assert skips_a_stage(stages, ratio) is skips


def test_an_unset_max_swaps_is_fitted_to_the_stages_and_said() -> None:
    assert SkipChoice(0.5).fitted(6) == (SkipChoice(0.5, DEFAULT_MAX_SWAPS), None)
    fitted, note = SkipChoice(0.5).fitted(2)
    assert fitted.max_swaps == 1 and "--max-swaps left unset: 1" in note
    assert SkipChoice(0.5, max_swaps=9).fitted(2)[0].max_swaps == 9  # asked for: kept


def test_five_sites_of_four_plan_with_skipping_from_the_cli(tmp_path: Path) -> None:
    """The new user's command: exit 0 (no --max-swaps refusal) and routes that skip."""
    done = hetsched("plan", str(GEO5X4), "-m", MODEL, "--skip-ratio", "0.33", "-o",
                    "plan.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--max-swaps" not in done.stderr
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    stages = len(plan["replicas"][0]["stages"])
    assert skips_a_stage(stages, 0.33)
    assert any(len(p["route"]) < stages for p in plan["paths"])  # routes really skip


def test_a_two_stage_pipeline_gets_the_swaps_it_allows() -> None:
    decision = decide(load_topology(GEO5X4), load_model(MODEL),
                      PlanOptions(stages=2, regime="datacentre", skip=SkipChoice(0.5),
                                  refine_rounds=10))
    assert decision.skip is not None and decision.skip.max_swaps == 1
    assert any("--max-swaps left unset: 1" in note for note in decision.notes)


def test_skipping_that_skips_nothing_is_one_line_naming_the_way_out() -> None:
    with pytest.raises(InputError) as caught:
        decide(load_topology(GEO5X4), load_model(MODEL),
               PlanOptions(stages=2, regime="datacentre", skip=SkipChoice(0.33)))
    assert caught.value.field == "--skip-ratio"
    assert "skips no stage" in caught.value.message
    assert "pass --regime geo" in caught.value.message
    with pytest.raises(InputError) as caught:
        decide(load_topology(GEO5X4), load_model(MODEL),
               PlanOptions(stages=2, regime="geo", skip=SkipChoice(0.33)))
    assert "pass --stages 3 or more" in caught.value.message


def test_skipping_turns_auto_to_geo_for_a_depth_no_data_centre_layout_has() -> None:
    with pytest.raises(InputError, match="pass --regime geo"):  # no skipping: refused
        decide(load_topology(GEO5X4), load_model(MODEL), PlanOptions(stages=6))
    decision = decide(load_topology(GEO5X4), load_model(MODEL),
                      PlanOptions(stages=6, refine_rounds=10, skip=SkipChoice(0.33)))
    assert decision.regime == "geo" and decision.chosen.layout.stages == 6
    assert "no data-centre layout has 6 stages" in decision.regime_note


def test_auto_weighs_both_regimes_on_scattered_sites_and_takes_the_faster() -> None:
    topology, model = three_single_host_sites(), load_model("tiny-gpt")
    auto = decide(topology, model, PlanOptions())
    geo = decide(topology, model, PlanOptions(regime="geo"))
    datacentre = decide(topology, model, PlanOptions(regime="datacentre"))
    faster = min(geo, datacentre, key=lambda d: d.chosen.step_s)
    assert auto.regime == faster.regime and auto.chosen.step_s == faster.chosen.step_s
    assert auto.regime == "datacentre"  # DiLoCo replicas: ~3x the geo pipeline here
    assert "auto weighed datacentre" in auto.regime_note and "vs geo" in auto.regime_note


def test_without_stages_geo_takes_its_fastest_depth_and_shows_every_depth() -> None:
    decision = decide(load_topology(EXAMPLES / "geo12" / "topology.yaml"), load_model(MODEL),
                      PlanOptions(regime="geo", refine_rounds=10, costs=load_costs("skippipe")))
    tried = decision.by_depth()
    assert [e.layout.stages for e in tried] == [4, 5, 6, 7, 8]
    assert decision.chosen is min(tried, key=lambda e: e.step_s)
    plan = build_plan(decision)
    assert [(d.stages, d.iteration_s) for d in plan.depths] == \
        [(e.layout.stages, round(e.step_s, 6)) for e in tried]
    assert any(line.startswith("Depth: ") for line in summary(decision, plan, "geo12"))
