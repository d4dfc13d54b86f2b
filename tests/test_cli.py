"""The CLI's contract on bad input: one line naming the cause, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.demo import lab_available
from topology.lab import existing_namespaces

FIXTURE = Path(__file__).parent / "fixtures" / "topology_small.yaml"


def hetsched(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_the_commands() -> None:
    done = hetsched("--help")
    assert done.returncode == 0
    for command in ("probe", "lab", "demo"):
        assert command in done.stdout


def test_probe_check_accepts_a_good_file() -> None:
    done = hetsched("probe", "check", str(FIXTURE), "--json")
    assert done.returncode == 0
    assert '"sha256"' in done.stdout


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        ({"version": 9}, "version: unsupported version 9, expected 1"),
        ({"links": [{"a": "ib1", "b": "ghost", "latency_ms": 1, "bandwidth_gbps": 1}]},
         "links[0].b: unknown host 'ghost'"),
    ],
)
def test_probe_check_rejects_bad_files(tmp_path: Path, mutation: dict, expected: str) -> None:
    data = yaml.safe_load(FIXTURE.read_text()) | mutation
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    done = hetsched("probe", "check", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {bad}: {expected}"


def test_probe_run_with_missing_inputs(tmp_path: Path) -> None:
    out = tmp_path / "topology.yaml"
    done = hetsched("probe", "run", str(tmp_path / "hosts.yaml"), "-o", str(out),
                    "--token-file", str(tmp_path / "token"))
    assert done.returncode == 2
    assert "hosts.yaml: file not found" in done.stderr and "Traceback" not in done.stderr
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("version: 1\nhosts:\n  - {name: a, address: '10.0.0.1:99999'}\n")
    done = hetsched("probe", "run", str(hosts), "-o", str(out), "--token-file", "/nonexistent")
    assert done.returncode == 2 and "hosts[0].address: port out of range" in done.stderr
    hosts.write_text("version: 1\nhosts:\n  - {name: a, address: 127.0.0.1}\n")
    done = hetsched("probe", "run", str(hosts), "-o", str(out), "--token-file", "/nonexistent")
    assert done.returncode == 2 and "/nonexistent: token file not found" in done.stderr
    assert not out.exists()


def test_probe_local_on_a_fixture_tree(tmp_path: Path) -> None:
    out = tmp_path / "me.yaml"
    sysfs = Path(__file__).parent / "fixtures" / "sysfs" / "ib_hdr"
    done = hetsched("probe", "local", "--sysfs", str(sysfs), "--no-flops", "--name", "ib-host",
                    "-o", str(out))
    assert done.returncode == 0, done.stderr
    host = yaml.safe_load(out.read_text())["hosts"][0]
    assert host["name"] == "ib-host"
    assert {n["kind"] for n in host["nics"]} >= {"infiniband", "ethernet"}


def test_probe_agent_refuses_bad_listen_address(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x" * 32)
    done = hetsched("probe", "agent", "--no-flops", "--listen", "1.2.3.4:notaport",
                    "--token-file", str(token))
    assert done.returncode == 2 and "--listen: bad port" in done.stderr


def test_demo_local_plans_and_trains_on_loopback(tmp_path: Path) -> None:
    done = hetsched("demo", "--local", "--steps", "6", "-o", str(tmp_path / "d"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "links are NOT shaped" in done.stderr
    assert "hosts:" in (tmp_path / "d" / "topology.yaml").read_text()
    assert "loss curve" in done.stdout and "tokens/s" in done.stdout
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert [entry["step"] for entry in metrics["curve"]][-1] == 6
    assert math.isfinite(metrics["eval_loss"])
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("predicted ") and "measured" in last and "error" in last
    assert "machine:" in (tmp_path / "d" / "topology.yaml").read_text()
    assert list((tmp_path / "d" / "timings").glob("rank*.jsonl"))


@pytest.mark.root
@pytest.mark.skipif(not lab_available(), reason="needs root, ip and tc for the lab")
def test_demo_in_the_lab_trains_and_reads_the_wan_counters(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cli", "demo", "--steps", "10", "-o",
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "crossed the WAN (the kernel's counters" in done.stdout
    assert "lab down" in done.stderr
    assert not [ns for ns in existing_namespaces() if ns.startswith("hs-demo-")]


@pytest.mark.root
@pytest.mark.skipif(not lab_available(), reason="needs root, ip and tc for the lab")
def test_a_second_demo_is_refused_and_leaves_the_running_lab_alone(tmp_path: Path) -> None:
    import fcntl

    from cli.demo import DEMO_NAME
    from topology.lab import STATE_DIR

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / f"{DEMO_NAME}.lock", "a", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = existing_namespaces()
        done = hetsched("demo", "--steps", "1", "-o", str(tmp_path / "d"))
        assert existing_namespaces() == before
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "another `hetsched demo`" in done.stderr
    assert "Traceback" not in done.stderr
