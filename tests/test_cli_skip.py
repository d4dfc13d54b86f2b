"""`hetsched plan --skip-ratio`, `simulate --baseline full` and `show --gantt` on a skip plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from holmes.plan import load_plan
from skippipe.paths import PathProblem, check_routes
from skippipe.simulate import Route

GEO12 = Path(__file__).parent.parent / "examples" / "geo12" / "topology.yaml"


def hetsched(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def skip_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("skip")
    (folder / "topology.yaml").write_text(GEO12.read_text())
    out = folder / "plan.yaml"
    done = hetsched("plan", str(folder / "topology.yaml"), "-m", "skippipe-llama-24l",
                    "--stages", "6", "--skip-ratio", "0.25", "--max-swaps", "1", "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_plan_writes_skip_routes_that_obey_every_rule(skip_plan: Path) -> None:
    plan = load_plan(skip_plan)
    assert plan.skipping is not None
    assert (plan.skipping.ratio, plan.skipping.max_swaps) == (0.25, 1)
    stages = [plan.stage(s).devices for s in plan.replicas[0].stages]
    origins: dict[str, list[int]] = {}
    for path in plan.paths:
        origins.setdefault(path.origin, []).append(path.microbatch)
        assert len(path.route) == 1 + 4  # round(0.75 * 5) stages after the origin
    problem = PathProblem(
        stages=stages, microbatches=origins, forward_s={d: 1.0 for s in stages for d in s},
        activation_bytes=1.0, latency_s=lambda a, b: 0.0, bandwidth_Bps=lambda a, b: 1.0,
        skip_ratio=0.25, max_swaps=1, memory_limit=plan.skipping.in_flight)
    check_routes(problem, [Route(p.microbatch, tuple(p.route)) for p in plan.paths])
    assert "Skipping (SkipPipe): k=0.25" in skip_plan.read_text()


def test_simulate_compares_with_the_full_pipeline(skip_plan: Path) -> None:
    done = hetsched("simulate", str(skip_plan), "--baseline", "full", "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    plan, full = figures["plan"]["iteration_s"], figures["full pipeline"]["iteration_s"]
    assert plan < full
    assert load_plan(skip_plan).skipping.full_pipeline_s == pytest.approx(full, rel=1e-6)


def test_show_draws_the_skipping(skip_plan: Path) -> None:
    picture = skip_plan.parent / "gantt.svg"
    done = hetsched("show", str(skip_plan), "--gantt", str(picture))
    assert done.returncode == 0, done.stderr
    assert picture.stat().st_size > 10_000


@pytest.mark.parametrize("args,message", [
    (["--skip-ratio", "1.0"], "--skip-ratio: must be in [0, 1), got 1"),
    (["--skip-ratio", "-0.5"], "--skip-ratio: must be in [0, 1), got -0.5"),
    (["--skip-ratio", "0.3", "--max-swaps", "9"], "max swaps must be an integer in [0, 5]"),
])
def test_bad_skip_requests_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "plan.yaml"
    done = hetsched("plan", str(GEO12), "-m", "skippipe-llama-24l", "--stages", "6", *args,
                    "-o", str(out))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
