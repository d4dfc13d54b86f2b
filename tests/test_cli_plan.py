"""`hetsched plan`, `show` and `simulate` end to end, and their answers to bad input."""

from __future__ import annotations

import json
import os
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


EXAMPLES = EXAMPLE.parent.parent


def two_unequal_gpus(small_gb: float) -> dict[str, object]:
    """An 80 GB GPU host and a small one: the layer ILP fits gpt-1.3b, an equal split not."""
    def host(name: str, memory: float, tflops: float) -> dict[str, object]:
        return {"name": name, "site": "s", "cpu_cores": 8, "memory_gb": 64,
                "devices": [{"name": "gpu0", "kind": "gpu", "memory_gb": memory,
                             "tflops": tflops}],
                "nics": [{"name": "eth0", "kind": "ethernet", "speed_gbps": 25, "state": "up",
                          "netdev": "eth0"}]}
    return {"version": 1, "sites": [{"name": "s"}],
            "hosts": [host("big", 80, 150), host("small", small_gb, 60)]}


def test_simulate_says_why_the_naive_has_no_row(tmp_path: Path) -> None:
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump(two_unequal_gpus(16)))
    plan = tmp_path / "plan.yaml"
    done = hetsched("plan", str(topology), "-m", "gpt-1.3b", "--stages", "2", "-o", str(plan))
    assert done.returncode == 0, done.stderr
    shown = hetsched("simulate", str(plan), "--baseline", "naive")
    assert shown.returncode == 0, shown.stderr
    assert "plan" in shown.stdout
    assert "naive: none: gpt-1.3b split equally does not fit: stage 1 (device small:gpu0)" \
        in " ".join(shown.stdout.split())
    figures = json.loads(hetsched("simulate", str(plan), "--baseline", "naive", "--json").stdout)
    assert figures["plan"]["tokens_per_s"] > 0 and "does not fit" in figures["naive"]["none"]


def test_show_and_simulate_work_from_any_directory(tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    (tmp_path / "plans").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "inputs" / "topology.yaml").write_text(EXAMPLE.read_text())
    model = {"version": 1,
             "model": {"name": "my-gpt", "arch": "gpt", "layers": 8, "hidden": 1024,
                       "heads": 16, "ffn": 4096, "vocab": 32000, "seq_len": 1024},
             "training": {"global_batch": 64, "microbatch": 2, "steps": 10}}
    (tmp_path / "inputs" / "model.yaml").write_text(yaml.safe_dump(model))
    done = subprocess.run([sys.executable, "-m", "cli", "plan", "inputs/topology.yaml", "-m",
                           "inputs/model.yaml", "-o", "plans/plan.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, env=_env())
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load((tmp_path / "plans" / "plan.yaml").read_text())
    assert data["topology_file"] == "../inputs/topology.yaml"
    assert data["model"]["source"] == "../inputs/model.yaml"
    for command in (["show", "../plans/plan.yaml"],
                    ["simulate", "../plans/plan.yaml", "--baseline", "naive"]):
        run = subprocess.run([sys.executable, "-m", "cli", *command], cwd=tmp_path / "elsewhere",
                             capture_output=True, text=True, timeout=180, env=_env())
        assert run.returncode == 0, run.stderr


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}


def test_idle_devices_are_listed_and_tables_say_what_they_leave_out(tmp_path: Path) -> None:
    # gpt-1.3b's 128 microbatches fill 128 of the 320 GPUs: the rest sit idle (at TP 1;
    # with tensor parallelism the planner uses them all, tests/test_tensor_parallel.py).
    plan = tmp_path / "plan.yaml"
    done = hetsched("plan", str(EXAMPLES / "holmes-three-fabrics" / "topology.yaml"), "-m",
                    "gpt-1.3b", "--nccl-net", "per-communicator", "--tensor-parallel", "1",
                    "-o", str(plan), "--json")
    assert done.returncode == 0, done.stderr
    first = plan.read_text().splitlines()[0]
    assert "WARNING: 192 of 320 devices (60%) sit idle" in first
    idle = json.loads(done.stdout)["idle"]
    assert len(idle) == 192 and all(entry["reason"] for entry in idle)
    assert any("holds no stage of the chosen layout" in entry["reason"] for entry in idle)
    assert "Idle: 192 of 320 devices" in done.stderr
    shown = hetsched("show", str(plan))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "idle devices (192)" in text and "160 more" in text  # 32 rows shown
    assert "96 more" in text  # the memory table: 128 devices, 32 shown


def test_one_fabric_plan_reads_right_and_matches_the_naive(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    done = hetsched("plan", str(EXAMPLES / "one-ib-fabric" / "topology.yaml"), "-m", "gpt-1.3b",
                    "-o", str(plan))
    assert done.returncode == 0, done.stderr
    header = [line for line in plan.read_text().splitlines() if line.startswith("#")]
    assert "WARNING" not in header[0] and yaml.safe_load(plan.read_text())["idle"] == []
    assert "1 fabric (dc-infiniband: 16 hosts)" in header[1]
    assert "one pipeline over fabric dc-infiniband" in header[2]
    assert not any("1 fabrics" in line or "all fabrics" in line for line in header)
    figures = json.loads(hetsched("simulate", str(plan), "--baseline", "naive", "--json").stdout)
    assert figures["naive"]["tokens_per_s"] == pytest.approx(figures["plan"]["tokens_per_s"])
