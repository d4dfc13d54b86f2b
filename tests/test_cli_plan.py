"""`hetsched plan`, `show` and `simulate` end to end, and their answers to bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLE = Path(__file__).parent.parent / "examples" / "holmes-ib-roce" / "topology.yaml"


def hetsched(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plan")
    topology = folder / "topology.yaml"
    topology.write_text(EXAMPLE.read_text())
    out = folder / "plan.yaml"
    done = hetsched("plan", str(topology), "-m", "gpt-1.3b", "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_plan_writes_a_reviewable_file(planned: Path) -> None:
    text = planned.read_text()
    assert text.startswith("# hetsched plan for gpt-1.3b")
    data = yaml.safe_load(text)
    for key in ("version", "topology_sha256", "model", "replicas", "stages", "paths", "groups",
                "launch", "estimates"):
        assert key in data
    assert data["topology_file"] == "topology.yaml"


def test_show_tables_json_and_gantt(planned: Path) -> None:
    done = hetsched("show", str(planned))
    assert done.returncode == 0, done.stderr
    assert "process groups" in done.stdout and "memory per device" in done.stdout
    assert json.loads(hetsched("show", str(planned), "--json").stdout)["version"] == 1
    png = planned.parent / "gantt.png"
    assert hetsched("show", str(planned), "--gantt", str(png)).returncode == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = hetsched("show", str(planned), "--gantt", str(planned.parent / "g.txt"))
    assert bad.returncode == 2 and "must be a .png or .svg" in bad.stderr


def test_simulate_with_naive_baseline(planned: Path) -> None:
    done = hetsched("simulate", str(planned), "--baseline", "naive", "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["naive"]["iteration_s"] >= figures["plan"]["iteration_s"] > 0


def test_plan_for_a_changed_topology_is_refused(planned: Path, tmp_path: Path) -> None:
    changed = tmp_path / "topology.yaml"
    data = yaml.safe_load(EXAMPLE.read_text())
    data["hosts"][0]["cpu_cores"] += 1
    changed.write_text(yaml.safe_dump(data))
    done = hetsched("simulate", str(planned), "--topology", str(changed))
    assert done.returncode == 2
    assert "topology_sha256: was made for topology" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "gpt-9t"], "unknown model preset 'gpt-9t'"),
        (["-m", "HUGE"], "huge does not fit"),
        (["-m", "gpt-1.3b", "--stages", "7"], "--stages: no data-centre layout with 7 stages"),
    ],
)
def test_plan_bad_requests(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "plan.yaml"
    huge = tmp_path / "huge.yaml"
    huge.write_text(yaml.safe_dump({
        "version": 1,
        "model": {"name": "huge", "arch": "llama", "layers": 4, "hidden": 65536, "heads": 64,
                  "ffn": 262144, "vocab": 32000, "seq_len": 4096},
        "training": {"global_batch": 64, "microbatch": 1, "steps": 1}}))
    args = [str(huge) if a == "HUGE" else a for a in args]
    done = hetsched("plan", str(EXAMPLE), "-o", str(out), *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_bad_plan_file(tmp_path: Path) -> None:
    bad = tmp_path / "plan.yaml"
    bad.write_text("version: 1\nsync: sometimes\n")
    done = hetsched("show", str(bad))
    assert done.returncode == 2 and done.stderr.startswith(f"error: {bad}: ")
