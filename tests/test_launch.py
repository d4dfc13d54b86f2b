"""`hetsched launch` end to end: dry-run commands, no shell, real local runs, failures.

The local runs are real: two torchruns on this machine train tests/launch_script.py over
gloo on loopback. Plans come from `hetsched plan` on small hand-made topologies.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from lab_support import root, running, two_site_spec, unique_name

SCRIPT = Path(__file__).parent / "launch_script.py"
ROOT = Path(__file__).resolve().parents[1]
HOSTILE_HOST = "h2;$(touch PWNED_HOST)"
HOSTILE_ARGS = ["$(touch PWNED)", ";touch PWNED2", "`touch PWNED3`", "a b", "'"]


def hetsched(*args: str, cwd: Path | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def host(name: str, site: str, address: str, devices: list[dict[str, Any]],
         nics: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "site": site, "address": address, "cpu_cores": 8, "memory_gb": 64,
            "devices": devices, "nics": nics}


def three_site_topology() -> dict[str, Any]:
    """Sites a, b, c with 2 hosts of 2 GPUs each; site a also has InfiniBand."""
    eth = {"name": "eth0", "kind": "ethernet", "speed_gbps": 25, "state": "up", "netdev": "eth0"}
    ib = {"name": "mlx5_0:1", "kind": "infiniband", "speed_gbps": 200, "state": "up",
          "netdev": "ib0", "rdma_device": "mlx5_0", "rdma_port": 1}
    gpus = [{"name": f"cuda{k}", "kind": "gpu", "memory_gb": 80, "tflops": 100} for k in (0, 1)]
    hosts = [host(f"{site}{j}", site, f"10.0.{s}.{j}", gpus, [eth, ib] if site == "a" else [eth])
             for s, site in enumerate("abc", start=1) for j in (1, 2)]
    links = [{"a": x["name"], "b": y["name"], "latency_ms": 0.01 if x["site"] == y["site"] else 10,
              "bandwidth_gbps": 100 if x["site"] == y["site"] else 1}
             for i, x in enumerate(hosts) for y in hosts[i + 1:]]
    return {"version": 1, "name": "three-sites", "sites": [{"name": s} for s in "abc"],
            "hosts": hosts, "links": links}


def two_local_topology() -> dict[str, Any]:
    """Two one-CPU hosts on this machine, as a probe elsewhere would see them (eth0)."""
    cpu = [{"name": "cpu0", "kind": "cpu", "memory_gb": 8, "tflops": 0.05}]
    eth = [{"name": "eth0", "kind": "ethernet", "state": "up", "netdev": "eth0"}]
    return {"version": 1, "name": "two-local", "sites": [{"name": "here"}],
            "hosts": [host(h, "here", "127.0.0.1", cpu, eth) for h in ("h1", "h2")],
            "links": [{"a": "h1", "b": "h2", "latency_ms": 0.01, "bandwidth_gbps": 10}]}


def make_plan(folder: Path, topology: dict[str, Any], *args: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "topology.yaml").write_text(yaml.safe_dump(topology, sort_keys=False))
    plan = folder / "plan.yaml"
    done = hetsched("plan", str(folder / "topology.yaml"), "-o", str(plan), *args)
    assert done.returncode == 0, done.stderr
    return plan


def edit_plan(source: Path, target: Path, change: Any) -> Path:
    """A copy of `source` (with its topology) whose plan data went through `change`."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "topology.yaml").write_text((source.parent / "topology.yaml").read_text())
    data = yaml.safe_load(source.read_text())
    change(data)
    (target / "plan.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return target / "plan.yaml"


@pytest.fixture(scope="module")
def three_site_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_plan(tmp_path_factory.mktemp("three"), three_site_topology(),
                     "-m", "gpt-1.3b", "--regime", "datacentre", "--nccl-net", "per-communicator",
                     "--noise", "0")  # the fastest layout: one with data groups on each site


@pytest.fixture(scope="module")
def local_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_plan(tmp_path_factory.mktemp("local"), two_local_topology(), "-m", "tiny-gpt")


def remote_command(argv: list[str]) -> list[str]:
    """The words of the command the remote shell runs after `cd -- WORKDIR &&`: ssh's last
    argument, split as a shell would (tests/test_launch_ssh.py runs it in real shells)."""
    assert argv[0] == "ssh" and argv.index("--") == len(argv) - 3
    words = shlex.split(argv[-1])
    assert words[:2] == ["cd", "--"] and words[3:5] == ["&&", "exec"]
    return words[5:]


def test_dry_run_of_a_three_site_plan(three_site_plan: Path) -> None:
    args = ["launch", str(three_site_plan), "--dry-run", "--via", "ssh", "--rdzv-id", "job7"]
    script = ["--", "train.py", "--steps", "3"]
    done = hetsched(*args, "--json", *script)
    assert done.returncode == 0, done.stderr
    hosts = json.loads(done.stdout)["hosts"]
    assert [h["host"] for h in hosts] == ["a1", "a2", "b1", "b2", "c1", "c2"]
    for i, h in enumerate(hosts):
        words = remote_command(h["argv"])
        assert h["argv"][-2] == f"10.0.{1 + i // 2}.{1 + i % 2}"
        env = dict(w.split("=", 1) for w in words[1:words.index("torchrun")])
        torchrun = words[words.index("torchrun"):]
        assert words[0] == "env" and env == h["env"]
        flags = dict(zip(torchrun[1:-3:2], torchrun[2:-3:2], strict=True))
        assert flags == {"--nnodes": "6", "--node-rank": str(i), "--nproc-per-node": "2",
                         "--rdzv-backend": "c10d", "--rdzv-endpoint": "10.0.1.1:29400",
                         "--rdzv-id": "job7", "--rdzv-conf": f"is_host={int(i == 0)}",
                         "--max-restarts": "0",
                         "--local-addr": h["address"]}
        assert torchrun[-3:] == ["train.py", "--steps", "3"]
        assert h["ranks"] == [2 * i, 2 * i + 1]
        assert env["HETSCHED_PLAN"] == str(three_site_plan.resolve())
        assert env["HETSCHED_HOST"] == h["host"]
        assert env["NCCL_SOCKET_IFNAME"] == "=eth0"
        assert "NCCL_NET" not in env and "NCCL_IB_DISABLE" not in env  # per communicator
        transports = {g["name"]: (g["transport"], g["nccl_config"]) for g in h["groups"]}
        if h["host"].startswith("a"):  # the InfiniBand site's data group gets its HCA
            assert env["NCCL_IB_HCA"] == "=mlx5_0:1"
            assert env_sources(h)["NCCL_IB_HCA"] == "pipeline-r0"  # first group in plan order
            assert transports["data-r0-s0"] == ("infiniband", {"net_name": "IB"})
        else:
            assert "NCCL_IB_HCA" not in env
            assert {t for t, _ in transports.values()} == {"socket"}
            assert {c["net_name"] for _, c in transports.values()} == {"Socket"}
    text = hetsched(*args, *script).stdout
    assert "# host a1 (node rank 0, ranks 0-1, 2 processes)" in text
    assert "# host c2 (node rank 5, ranks 10-11, 2 processes)" in text
    assert "NCCL_IB_HCA==mlx5_0:1  # pipeline-r0" in text
    assert "# group data-r0-s0 (data, ranks 0-3): infiniband (ncclConfig_t net_name=IB)" in text


def env_sources(entry: dict[str, Any]) -> dict[str, str]:
    return entry["env_sources"]


def test_groups_that_disagree_on_a_host_variable_are_refused(three_site_plan: Path,
                                                              tmp_path: Path) -> None:
    def per_host(data: dict[str, Any]) -> None:
        diloco = next(g for g in data["groups"] if g["kind"] == "diloco")
        diloco["env_per_host"] = {"a1": {"NCCL_SOCKET_IFNAME": "=ib0"}}

    plan = edit_plan(three_site_plan, tmp_path, per_host)
    done = hetsched("launch", str(plan), "--dry-run", "--json", "--", "train.py")
    assert done.returncode == 2 and done.stdout == ""
    assert "NCCL_SOCKET_IFNAME" in done.stderr and "diloco-" in done.stderr
    assert "on host a1" in done.stderr and "Traceback" not in done.stderr


def test_nccl_plan_is_refused_here_naming_the_group(three_site_plan: Path,
                                                    tmp_path: Path) -> None:
    """--via local runs every host on this machine: a group it cannot run is named."""
    done = hetsched("launch", str(three_site_plan), "--via", "local", "--", "train.py",
                    cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "nothing was started" in done.stderr
    if "HCA" in done.stderr:  # no mlx5_0 here
        assert "group pipeline-r0 runs on infiniband over HCA mlx5_0" in done.stderr
    else:
        assert "runs on NCCL, but torch" in done.stderr


def test_hostile_names_are_refused_and_hostile_args_quoted_for_ssh(
        three_site_plan: Path, tmp_path: Path) -> None:
    def rename(data: dict[str, Any]) -> None:
        data["launch"][1]["host"] = HOSTILE_HOST

    plan = edit_plan(three_site_plan, tmp_path / "name", rename)
    done = hetsched("launch", str(plan), "--dry-run", "--", "t.py", cwd=tmp_path)
    assert done.returncode == 2 and "launch[1].host: String should match" in done.stderr
    done = hetsched("launch", str(three_site_plan), "--dry-run", "--json", "--", "t.py",
                    *HOSTILE_ARGS, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    words = remote_command(json.loads(done.stdout)["hosts"][1]["argv"])
    assert words[-len(HOSTILE_ARGS) - 1:] == ["t.py", *HOSTILE_ARGS]

    def readdress(data: dict[str, Any]) -> None:
        data["launch"][1]["address"] = "-oProxyCommand=touch PWNED"

    plan = edit_plan(three_site_plan, tmp_path / "address", readdress)
    done = hetsched("launch", str(plan), "--dry-run", "--", "t.py", cwd=tmp_path)
    assert done.returncode == 2 and "launch[1].address" in done.stderr
    assert not list(tmp_path.glob("PWNED*"))


@pytest.fixture(scope="module")
def local_run(local_plan: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A real 2-host local launch whose script arguments are hostile."""
    work = tmp_path_factory.mktemp("run")
    done = hetsched("launch", str(local_plan), "--via", "local", "--", str(SCRIPT), "--steps", "3",
                    "--out", str(work), *HOSTILE_ARGS, cwd=work, timeout=150)
    return done, work


def test_local_launch_trains_with_prefixed_output(
        local_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, work = local_run
    assert done.returncode == 0, done.stdout + done.stderr
    # c10d numbers hosts in the order they join: each host has one of the two ranks
    ranks = {host: re.search(rf"\[{host}\] rank (\d) world 2", done.stdout)
             for host in ("h1", "h2")}
    assert all(ranks.values()), done.stdout
    assert sorted(int(m.group(1)) for m in ranks.values() if m) == [0, 1]
    for host, match in ranks.items():
        assert match and f"[{host}] rank {match.group(1)} step 2 loss" in done.stdout
    assert "all 2 hosts finished" in done.stderr
    records = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["env"]["GLOO_SOCKET_IFNAME"] for r in records] == ["lo", "lo"]


def test_hostile_args_reach_the_script_verbatim(
        local_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, work = local_run
    records = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert record["argv"][-len(HOSTILE_ARGS):] == HOSTILE_ARGS
    assert sorted(r["env"]["HETSCHED_HOST"] for r in records) == ["h1", "h2"]
    assert not list(work.rglob("PWNED*"))


def read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


def wait_for(lines: queue.Queue[str], seen: list[str], predicate: Any,
             timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if predicate(line):
            return line
    raise AssertionError("not seen in time; output so far:\n" + "\n".join(seen))


def test_killing_one_host_stops_the_launch_naming_it(local_plan: Path, tmp_path: Path) -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-m", "cli", "launch", str(local_plan), "--via", "local", "--",
         str(SCRIPT), "--steps", "1000", "--sleep", "0.5", "--out", str(tmp_path)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=read_lines, args=(launcher.stdout, lines), daemon=True).start()
    try:
        started = wait_for(lines, seen, lambda s: s.startswith("[launch] h2: started"), 60)
        pid = int(started.split("pid ")[1].rstrip(")"))
        # c10d numbers hosts in the order they join: h2's rank may be 0 or 1.
        wait_for(lines, seen, lambda s: s.startswith("[h2] rank ") and " step 1 " in s, 90)
        os.killpg(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        launcher.wait(timeout=30)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.terminate()
            launcher.wait(timeout=30)
    time.sleep(0.5)
    while not lines.empty():
        seen.append(lines.get())
    output = "\n".join(seen)
    assert launcher.returncode == 1, output
    assert elapsed < 30
    assert "host h2 failed: killed by signal SIGKILL" in output
    assert "h1: stopped by the launcher" in output
    workers = [json.loads((tmp_path / f"rank{r}.json").read_text())["pid"] for r in (0, 1)]
    assert not [pid for pid in workers if alive(pid)], "a worker outlived the launch"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_changed_topology_is_refused_unless_forced(local_plan: Path, tmp_path: Path) -> None:
    plan = edit_plan(local_plan, tmp_path, lambda data: None)
    topology = yaml.safe_load((tmp_path / "topology.yaml").read_text())
    topology["hosts"][0]["cpu_cores"] += 1
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(topology))
    args = ["launch", str(plan), "--via", "local", "--dry-run"]
    (tmp_path / "x.py").write_text("")  # --via local checks that the script is here
    refused = hetsched(*args, "--", "x.py", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "topology_sha256: was made for topology" in refused.stderr
    assert "--force" in refused.stderr
    forced = hetsched(*args, "--force", "--", "x.py", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "warning:" in forced.stderr and "# host h1" in forced.stdout


def test_missing_topology_file_is_refused(local_plan: Path, tmp_path: Path) -> None:
    plan = edit_plan(local_plan, tmp_path, lambda data: None)
    (tmp_path / "topology.yaml").unlink()
    done = hetsched("launch", str(plan), "--via", "local", "--dry-run", "--", "x.py")
    assert done.returncode == 2 and "file not found" in done.stderr


def lab_topology() -> dict[str, Any]:
    """The hosts of `two_site_spec` as a probe inside that lab would see them."""
    cpu = [{"name": "cpu0", "kind": "cpu", "memory_gb": 8, "tflops": 0.05}]
    eth = [{"name": "eth0", "kind": "ethernet", "state": "up", "netdev": "eth0"}]
    hosts = [host(name, site, address, cpu, eth) for name, site, address in
             (("a1", "a", "10.77.1.1"), ("a2", "a", "10.77.1.2"), ("b1", "b", "10.77.2.1"))]
    links = [{"a": x["name"], "b": y["name"], "latency_ms": 0.1,
              "bandwidth_gbps": 1 if x["site"] == y["site"] else 0.05}
             for i, x in enumerate(hosts) for y in hosts[i + 1:]]
    return {"version": 1, "sites": [{"name": "a"}, {"name": "b"}], "hosts": hosts,
            "links": links}


@pytest.mark.root
@root
def test_launch_in_the_lab_runs_each_host_in_its_namespace(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, lab_topology(), "-m", "tiny-gpt", "--stages", "3")
    spec = two_site_spec(unique_name("launch"), 1000, 100)
    with running(spec):
        done = hetsched("launch", str(plan), "--via", "lab", "--lab", spec.name, "--",
                        str(SCRIPT), "--steps", "2", timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    for rank, name in enumerate(("a1", "a2", "b1")):
        assert f"[{name}] rank {rank} step 1 loss" in done.stdout
    assert "all 3 hosts finished" in done.stderr


def test_launch_in_a_lab_that_is_not_running_is_refused(local_plan: Path) -> None:
    done = hetsched("launch", str(local_plan), "--via", "lab", "--lab", "no-such-lab-7",
                    "--", str(SCRIPT))
    assert done.returncode == 2
    assert "lab 'no-such-lab-7' is not running" in done.stderr
    assert "started" not in done.stderr
