"""`hetsched launch` under faults: hung hosts found, no orphans, timeouts from the plan.

The launches are real: two torchruns on this machine run tests/launch_script.py over gloo
on loopback, and the faults are real signals (SIGSTOP to a worker, SIGKILL to the
launcher). `HangWatch` is also driven directly with heartbeats to pin down its judgement.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from test_launch import (
    SCRIPT,
    _env,
    alive,
    edit_plan,
    hetsched,
    make_plan,
    read_lines,
    three_site_topology,
    two_local_topology,
    wait_for,
)
from test_trainer import SCRIPT as TRAIN_SCRIPT
from test_trainer import make_plan as trainer_plan
from test_trainer import topology as trainer_topology

from cli.hangs import HangWatch
from holmes.heartbeat import Beat, split_beat
from holmes.plan import load_plan
from holmes.plan_build import diloco_timeout_s, hang_timeout_s

HANG_S = 5.0


@pytest.fixture(scope="module")
def local_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_plan(tmp_path_factory.mktemp("local"), two_local_topology(), "-m", "tiny-gpt")


class Launch:
    """A launch running in the background, its output read line by line."""

    def __init__(self, plan: Path, work: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", "launch", str(plan), "--via", "local", *args],
            cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=read_lines, args=(self.process.stdout, self.lines),
                         daemon=True).start()

    def wait_for(self, predicate: Any, timeout: float = 90) -> str:
        return wait_for(self.lines, self.seen, predicate, timeout)

    def finish(self, timeout: float) -> str:
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=30)
        time.sleep(0.5)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "\n".join(self.seen)


def worker_pids(work: Path) -> list[int]:
    return [json.loads((work / f"rank{r}.json").read_text())["pid"] for r in (0, 1)]


def rank_of(work: Path, host: str) -> tuple[int, int]:
    """(rank, pid) of `host`'s worker: torchrun's c10d rendezvous numbers the hosts in
    the order they join, so h2 may hold rank 0."""
    for r in (0, 1):
        record = json.loads((work / f"rank{r}.json").read_text())
        if record["env"]["HETSCHED_HOST"] == host:
            return r, record["pid"]
    raise AssertionError(f"no worker of {host}")


def test_a_stopped_worker_is_named_hung_and_the_launch_ends(local_plan: Path,
                                                            tmp_path: Path) -> None:
    launch = Launch(local_plan, tmp_path, "--hang-timeout", str(HANG_S), "--", str(SCRIPT),
                    "--steps", "100000", "--sleep", "0.2", "--out", str(tmp_path))
    launch.wait_for(lambda s: s.startswith("[h2] rank ") and " step 3 " in s)
    rank, victim = rank_of(tmp_path, "h2")
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    output = launch.finish(timeout=HANG_S + 60)
    elapsed = time.monotonic() - stopped_at
    assert launch.process.returncode == 1, output
    assert f"host h2 hung: rank {rank} (pid {victim}) sent no heartbeat for" in output
    assert "h1: stopped by the launcher" in output
    assert "@hetsched-beat" not in output  # heartbeats are not shown
    assert elapsed < HANG_S + 10, f"{elapsed:.1f} s after SIGSTOP\n{output}"
    assert not [pid for pid in worker_pids(tmp_path) if alive(pid)], "a worker outlived it"


@pytest.mark.slow
def test_a_worker_stuck_while_beating_is_named_by_its_step(local_plan: Path,
                                                           tmp_path: Path) -> None:
    """Rank 1 stops reporting steps (its heartbeat goes on); rank 0 waits for it one
    step further on: the host behind is the one named."""
    launch = Launch(local_plan, tmp_path, "--hang-timeout", str(HANG_S), "--", str(SCRIPT),
                    "--steps", "100000", "--sleep", "0.1", "--stall-rank", "1",
                    "--stall-at", "3", "--out", str(tmp_path))
    output = launch.finish(timeout=HANG_S + 120)
    assert launch.process.returncode == 1, output
    host = "h1" if rank_of(tmp_path, "h1")[0] == 1 else "h2"
    assert f"host {host} hung: no progress for" in output
    assert "rank 1 (pid" in output and "stuck after step 3 while still beating" in output
    assert not [pid for pid in worker_pids(tmp_path) if alive(pid)]


def test_a_slow_first_step_is_not_a_hang(local_plan: Path, tmp_path: Path) -> None:
    """Start-up and the first step may take longer than the hang timeout."""
    done = hetsched("launch", str(local_plan), "--via", "local", "--hang-timeout", "2", "--",
                    str(SCRIPT), "--steps", "3", "--first-sleep", "6", cwd=tmp_path,
                    timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 2 hosts finished" in done.stderr and "hung" not in done.stderr
    assert "hang timeout 2 s" in done.stderr


def test_old_plans_get_the_default_hang_timeout_and_show_it(local_plan: Path,
                                                            tmp_path: Path) -> None:
    assert yaml.safe_load(local_plan.read_text())["launch_policy"] == {"hang_timeout_s": 60.0}

    def old(data: dict[str, Any]) -> None:
        del data["launch_policy"]

    plan = edit_plan(local_plan, tmp_path / "old", old)
    assert load_plan(plan).launch_policy.hang_timeout_s == 60.0
    shown = hetsched("show", str(plan))
    assert shown.returncode == 0, shown.stderr
    assert "hung after 60 s without a heartbeat" in shown.stdout

    def bad(data: dict[str, Any]) -> None:
        data["launch_policy"] = {"hang_timeout_s": 0}

    refused = hetsched("show", str(edit_plan(local_plan, tmp_path / "bad", bad)))
    assert refused.returncode == 2 and "launch_policy.hang_timeout_s" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("value", ["nan", "0", "inf", "-5", "abc"])
def test_a_bad_hang_timeout_is_refused(local_plan: Path, value: str) -> None:
    done = hetsched("launch", str(local_plan), "--via", "local", "--hang-timeout", value,
                    "--", str(SCRIPT))
    assert done.returncode == 2 and "--hang-timeout" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "started" not in done.stderr


def test_heartbeat_lines_are_split_from_the_output() -> None:
    beat = Beat(3, 17, 4242)
    assert split_beat(beat.line()) == ("", beat)
    assert split_beat("loss 1.2" + beat.line()) == ("loss 1.2", beat)
    assert split_beat(Beat(0, 1, 2, done=True).line())[1] == Beat(0, 1, 2, True)
    assert split_beat("@hetsched-beat rank=x") == ("@hetsched-beat rank=x", None)
    assert split_beat("plain") == ("plain", None)


def test_hang_watch_judgement() -> None:
    watch = HangWatch(timeout_s=10)
    hosts = {"h1", "h2"}
    for rank, host in ((0, "h1"), (1, "h2")):
        watch.feed(host, Beat(rank, 0, 100 + rank), now=0)
    assert watch.verdict(100, hosts) is not None  # silent since 0
    for t in range(0, 100, 1):  # a first step of 100 s while beating: not a hang
        for rank, host in ((0, "h1"), (1, "h2")):
            watch.feed(host, Beat(rank, 0, 100 + rank), now=t)
        assert watch.verdict(t, hosts) is None
    watch.feed("h1", Beat(0, 1, 100), now=100)
    watch.feed("h2", Beat(1, 1, 101), now=100)
    watch.feed("h1", Beat(0, 2, 100), now=101)  # h1 one step further, then both stuck
    for t in range(101, 112):
        watch.feed("h1", Beat(0, 2, 100), now=t)
        watch.feed("h2", Beat(1, 1, 101), now=t)
    hang = watch.verdict(111, hosts)
    assert hang is not None and hang.hosts == ("h2",)
    assert hang.reason.startswith("no progress for 11 s")
    assert watch.verdict(112, {"h1"}) is not None  # h1 itself stalls a second later
    watch.feed("h1", Beat(0, 2, 100, done=True), now=112)
    assert watch.verdict(112, {"h1"}) is None  # done ranks are not watched


def test_the_rank_behind_is_named_even_when_heard_stopping_last() -> None:
    """h2 stops at step 3; h1 finishes step 4 and waits. Heartbeats come once a second,
    so h1's step 4 may arrive before h2's step 3: h2 is still the one behind."""
    watch = HangWatch(timeout_s=10)
    for rank, host in ((0, "h1"), (1, "h2")):
        watch.feed(host, Beat(rank, 0, 100 + rank), now=0)
    watch.feed("h1", Beat(0, 4, 100), now=1.0)
    watch.feed("h2", Beat(1, 3, 101), now=1.8)
    for t in range(2, 12):
        watch.feed("h1", Beat(0, 4, 100), now=t)
        watch.feed("h2", Beat(1, 3, 101), now=t + 0.8)
    hang = watch.verdict(11.5, {"h1", "h2"})
    assert hang is not None and hang.hosts == ("h2",)
    assert "rank 1 (pid 101) is stuck after step 3" in hang.reason


def test_a_workers_exit_status_is_the_launchs(local_plan: Path, tmp_path: Path) -> None:
    """The worker of rank 1 exits 2 after its first step: the launch exits 2, naming its
    host, and nothing is called hung."""
    done = hetsched("launch", str(local_plan), "--via", "local", "--", str(SCRIPT),
                    "--steps", "100", "--sleep", "0.2", "--exit-rank", "1", "--exit-code", "2",
                    "--out", str(tmp_path), cwd=tmp_path, timeout=150)
    host = "h1" if rank_of(tmp_path, "h1")[0] == 1 else "h2"
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"host {host} failed: exit status 1 (its worker exited with status 2)" in done.stderr
    assert "hung" not in done.stderr


def test_killing_the_launcher_leaves_no_process_behind(local_plan: Path,
                                                       tmp_path: Path) -> None:
    """SIGKILL to the launcher: its keepers stop the torchruns and workers (one of them
    stopped with SIGSTOP, so it cannot act on SIGTERM) within 10 s."""
    launch = Launch(local_plan, tmp_path, "--", str(SCRIPT), "--steps", "100000",
                    "--sleep", "0.2", "--out", str(tmp_path))
    launch.wait_for(lambda s: all(any(line.startswith(f"[{host}] rank ") and " step 2 " in line
                                      for line in launch.seen) for host in ("h1", "h2")))
    processes = psutil.Process(launch.process.pid).children(recursive=True)
    names = {p.pid: " ".join(p.cmdline())[-70:] for p in processes}
    workers = worker_pids(tmp_path)
    assert set(workers) <= {p.pid for p in processes}
    assert len(processes) >= 4, processes  # a torchrun and a worker per host, at least
    os.kill(workers[1], signal.SIGSTOP)
    launch.process.kill()
    launch.process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [p for p in processes if alive(p.pid)]:
        time.sleep(0.2)
    left = [f"{p.pid} {names[p.pid]}" for p in processes if alive(p.pid)]
    for p in processes:  # never leave them to the next test
        with suppress(psutil.Error):
            p.kill()
    assert not left, f"left 10 s after SIGKILL of the launcher: {left}"


def wan_plan(folder: Path, wan_gbps: float) -> dict[str, Any]:
    """A gpt-1.3b DiLoCo plan between three GPU sites joined by `wan_gbps`."""
    topology = three_site_topology()
    for link in topology["links"]:
        if link["bandwidth_gbps"] == 1:
            link["bandwidth_gbps"] = wan_gbps
    plan = make_plan(folder, topology, "-m", "gpt-1.3b", "--regime", "datacentre",
                     "--sync", "diloco")
    return yaml.safe_load(plan.read_text())


@pytest.mark.slow
def test_the_planner_sets_diloco_timeout_from_the_link(tmp_path: Path) -> None:
    fast, slow = wan_plan(tmp_path / "fast", 0.05), wan_plan(tmp_path / "slow", 0.005)
    for plan in (fast, slow):
        timeout, hang = plan["diloco"]["timeout_s"], plan["launch_policy"]["hang_timeout_s"]
        assert timeout >= 60 and timeout >= hang + 30
    # a tenth of the bandwidth: each exchange takes ~10x longer, so does the wait
    assert slow["diloco"]["timeout_s"] > 3 * fast["diloco"]["timeout_s"]
    assert diloco_timeout_s(exchange_s=0.5, hang_s=60) == 90  # floor: after the launcher
    assert diloco_timeout_s(exchange_s=100.01, hang_s=60) == 1001  # ten exchanges
    assert hang_timeout_s(step_s=1.0) == 60 and hang_timeout_s(9.01, 40.0) == 91


def test_old_diloco_plans_get_the_old_timeout_and_show_it(local_diloco_plan: Path,
                                                          tmp_path: Path) -> None:
    def old(data: dict[str, Any]) -> None:
        del data["diloco"]["timeout_s"]

    plan = copy_plan(local_diloco_plan, tmp_path, old)
    assert load_plan(plan).diloco.timeout_s == 300
    shown = hetsched("show", str(plan))
    assert shown.returncode == 0, shown.stderr
    assert "DiLoCo: a replica fails after waiting 300 s for an exchange" in shown.stdout


@pytest.fixture(scope="module")
def local_diloco_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two one-CPU sites on this machine, one replica each, DiLoCo between them."""
    return trainer_plan(tmp_path_factory.mktemp("diloco"),
                        trainer_topology({"a": ["a1"], "b": ["b1"]}, 0.01), "--stages", "1",
                        "--sync", "diloco", "--sync-every", "4", "--fragments", "2")


@pytest.mark.slow
def test_the_runtime_waits_for_an_exchange_as_long_as_the_plan_says(
        local_diloco_plan: Path, tmp_path: Path) -> None:
    """The two hosts' torchruns, as the launcher would start them but without it: replica
    b1's worker is stopped (SIGSTOP) after a few steps, and replica a1's DiLoCo gives up
    waiting for the exchange after the plan's timeout_s."""
    plan = copy_plan(local_diloco_plan, tmp_path / "plan",
                     lambda data: data["diloco"].update(timeout_s=4))
    dry = hetsched("launch", str(plan), "--via", "local", "--dry-run", "--json", "--",
                   TRAIN_SCRIPT, "--steps", "100000", "--log-every", "100000")
    assert dry.returncode == 0, dry.stderr
    hosts = {h["host"]: h for h in json.loads(dry.stdout)["hosts"]}
    lines: queue.Queue[str] = queue.Queue()
    runs = {name: subprocess.Popen(h["argv"], env={**_env(), **h["env"]}, cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True) for name, h in hosts.items()}
    for run in runs.values():
        threading.Thread(target=read_lines, args=(run.stdout, lines), daemon=True).start()
    seen: list[str] = []
    victim = None
    try:
        wait_for(lines, seen, lambda s: _beat_at(s, rank=0, step=3) is not None, 240)
        if not any(_beat_at(line, rank=1, step=0) for line in seen):
            wait_for(lines, seen, lambda s: _beat_at(s, rank=1, step=0) is not None, 60)
        victim = next(b.pid for b in (_beat_at(s, rank=1, step=0) for s in seen) if b)
        os.kill(victim, signal.SIGSTOP)
        runs["a1"].wait(timeout=120)
    finally:
        for run in runs.values():
            with suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
        if victim is not None:
            with suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        for run in runs.values():
            run.wait(timeout=30)
    while not lines.empty():
        seen.append(lines.get())
    output = "\n".join(seen)
    assert runs["a1"].returncode not in (0, None), output[-3000:]
    assert "did not finish within timeout_s=4" in output, output[-3000:]


def _beat_at(line: str, *, rank: int, step: int) -> Beat | None:
    beat = split_beat(line)[1]
    return beat if beat is not None and beat.rank == rank and beat.step >= step else None


def copy_plan(source: Path, target: Path, change: Any) -> Path:
    """`edit_plan`, with the model file the plan names copied too."""
    plan = edit_plan(source, target, change)
    model = source.parent / "model.yaml"
    if model.exists():
        (target / "model.yaml").write_text(model.read_text())
    return plan
