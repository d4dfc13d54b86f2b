"""`hetsched launch --via ssh` over OpenSSH's real sshd, in the emulated lab (root only).

The steps are docs/launch.md's real-cluster walkthrough, one for one:

1. The demo's lab (lab-2x2: sites a and b of 2 hosts each) is brought up; the topology
   is the demo's, with the lab's nominal link speeds; the plan is `hetsched plan -m
   tiny-gpt`, as `hetsched demo` makes it.
2. A key pair for the job and a host key are made with ssh-keygen in a temporary folder;
   the client trusts only that host key (`known_hosts`, `StrictHostKeyChecking yes`).
3. On every lab host, `/usr/sbin/sshd` runs in the host's namespace, bound only to the
   host's lab address (checked from the kernel's socket table of that namespace).
   Missing sshd is installed with `apt-get install -y openssh-server` when this machine
   stops apt from starting services (policy-rc.d), so that no sshd ever listens outside
   the lab; otherwise the tests skip and say why.
4. From host a1 (the "login node"), in a working directory whose name is hostile
   (spaces, quotes, `$(...)`, `;`), `hetsched launch plan.yaml --via ssh --python ...
   --ssh-config ... --identity ... --ssh-user root -- SCRIPT ...` trains the tiny GPT:
   every host trains (each writes its checkpoint shard), output comes with host
   prefixes, exit status 0, the metrics land in the working directory.
5. The same launch with tests/launch_script.py where host b2 fails on purpose: b2 is
   named, the others are stopped (their remote torchruns and workers end), exit 1; and
   with b1's ssh session killed mid-run (a lost host or link): b1 is named with ssh's
   exit status 255 explained, the others stopped, nothing left running.
Also: the pre-flight refuses a missing `--workdir` and a key sshd does not accept.

Every sshd (with its sessions) is stopped and the temporary keys removed afterwards.
Run under `flock /tmp/hetsched-lab.lock` (one lab at a time on this machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from topology.lab import LabHost, LabState, lab_hosts
from topology.lab_spec import LabSpec, load_lab_spec

from lab_support import root, running, unique_name

ROOT = Path(__file__).resolve().parents[1]
SSHD = Path("/usr/sbin/sshd")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
PRIVSEP_DIR = Path("/run/sshd")
TRAIN = ROOT / "examples" / "train_tinygpt.py"
SCRIPT = Path(__file__).parent / "launch_script.py"
JOB_DIR = "job dir $(touch PWNED) 'q' ;x"
SSHD_CONFIG = """\
Port 22
HostKey {keys}/host_ed25519
AuthorizedKeysFile {keys}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
"""
SSH_CONFIG = """\
UserKnownHostsFile {keys}/known_hosts
StrictHostKeyChecking yes
"""
TCP_LISTEN = "0A"
SSH_PORT_HEX = "0016"
WAIT_S = 60
HETSCHED = [sys.executable, "-m", "cli"]  # the `hetsched` of the docs, from this checkout


def sshd_missing_reason() -> str | None:
    """None when sshd is here or was just installed; else why the tests must skip."""
    if SSHD.is_file():
        return None
    if shutil.which("apt-get") is None:
        return f"{SSHD} is missing and there is no apt-get to install openssh-server"
    if not POLICY_RC.is_file() or _policy_allows_start():
        return (f"{SSHD} is missing, and installing openssh-server here would start an "
                "sshd outside the lab (no policy-rc.d forbidding it)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "openssh-server"]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"{SSHD} is missing and `{' '.join(argv)}` failed: {last}"
    return None if SSHD.is_file() else f"openssh-server installed but {SSHD} is missing"


def _policy_allows_start() -> bool:
    done = subprocess.run([str(POLICY_RC), "ssh", "start"], capture_output=True, timeout=30)
    return done.returncode != 101


@dataclass
class Sshd:
    """One sshd, running in a lab host's namespace."""

    host: LabHost
    process: subprocess.Popen[bytes]
    log: Path


@dataclass(frozen=True)
class SshLab:
    """A running lab with an sshd on every host, and what the client needs."""

    state: LabState
    keys: Path
    daemons: tuple[Sshd, ...]

    def login_namespace(self) -> str:
        return self.state.host("a1").namespace


# The commands of docs/launch.md's walkthrough, with its placeholders as arguments
# (tests/test_launch_ssh.py checks that the page shows exactly these words).
def keygen_argv(path: str) -> list[str]:
    return ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hetsched-job", "-f", path]


def sshd_argv(namespace: str, keys: str, address: str, host: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, str(SSHD), "-D", "-e",
            "-f", f"{keys}/sshd_config", "-o", f"ListenAddress={address}",
            "-o", f"PidFile={keys}/sshd-{host}.pid"]


def launch_argv(hetsched: list[str], python: str, keys: str, train: str) -> list[str]:
    return [*hetsched, "launch", "plan.yaml", "--via", "ssh", "--python", python,
            "--ssh-config", f"{keys}/ssh_config", "--identity", f"{keys}/id_ed25519",
            "--ssh-user", "root", "--", train, "--steps", "4", "--log-every", "1",
            "--corpus-bytes", "200000", "--checkpoint-dir", "checkpoints",
            "--checkpoint-every", "4", "--metrics", "metrics.json"]


def make_keys(keys: Path, hosts: list[LabHost]) -> None:
    """A job key (authorized on every host), a host key, and the client's known_hosts."""
    for name in ("id_ed25519", "host_ed25519"):
        subprocess.run(keygen_argv(str(keys / name)), check=True, timeout=60)
    shutil.copy(keys / "id_ed25519.pub", keys / "authorized_keys")
    host_key = (keys / "host_ed25519.pub").read_text().split()[:2]
    addresses = ",".join(h.address for h in hosts)
    (keys / "known_hosts").write_text(f"{addresses} {' '.join(host_key)}\n")
    (keys / "sshd_config").write_text(SSHD_CONFIG.format(keys=keys))
    (keys / "ssh_config").write_text(SSH_CONFIG.format(keys=keys))


def start_sshd(host: LabHost, keys: Path) -> Sshd:
    log = keys / f"sshd-{host.name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            sshd_argv(host.namespace, str(keys), host.address, host.name),
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    return Sshd(host, process, log)


def listening(pid: int) -> list[str]:
    """The addresses the namespace of `pid` listens on at port 22 (kernel's table)."""
    found = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port = local.split(":")
        if port == SSH_PORT_HEX and state == TCP_LISTEN:
            found.append(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def wait_listening(daemon: Sshd) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise AssertionError(f"sshd on {daemon.host.name} exited: "
                                 f"{daemon.log.read_text()}")
        if listening(daemon.process.pid):
            return
        time.sleep(0.2)
    raise AssertionError(f"sshd on {daemon.host.name} is not listening: "
                         f"{daemon.log.read_text()}")


def stop_sshd(daemon: Sshd) -> None:
    """The daemon and every session it forked (the launcher's remote shells)."""
    with suppress(psutil.Error):
        sessions = psutil.Process(daemon.process.pid).children(recursive=True)
        for process in sessions:
            with suppress(psutil.Error):
                process.kill()
    with suppress(ProcessLookupError):
        os.kill(daemon.process.pid, signal.SIGTERM)
    try:
        daemon.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        daemon.process.wait()


def demo_lab_spec() -> LabSpec:
    return load_lab_spec("lab-2x2").model_copy(update={"name": unique_name("ssh")})


def demo_topology(spec: LabSpec) -> dict[str, Any]:
    """The demo lab's hosts at their lab addresses, with the lab's nominal link speeds."""
    hosts = lab_hosts(spec)
    rate = {s.name: s.rate_mbit for s in spec.sites}
    entries = [{"name": h.name, "site": h.site, "address": h.address, "cpu_cores": 2,
                "memory_gb": 4, "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 4,
                                             "tflops": 0.05}],
                "nics": [{"name": "eth0", "kind": "ethernet", "state": "up",
                          "netdev": "eth0"}]} for h in hosts.values()]
    links = []
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            same = a["site"] == b["site"]
            mbit = rate[a["site"]] if same else spec.wan_rate_mbit(a["site"], b["site"])
            links.append({"a": a["name"], "b": b["name"], "latency_ms": 0.1,
                          "bandwidth_gbps": mbit / 1000})
    return {"version": 1, "sites": [{"name": s.name} for s in spec.sites], "hosts": entries,
            "links": links}


def plan_argv(hetsched: list[str]) -> list[str]:
    return [*hetsched, "plan", "topology.yaml", "-m", "tiny-gpt", "-o", "plan.yaml"]


def make_demo_plan(spec: LabSpec, folder: Path) -> Path:
    (folder / "topology.yaml").write_text(yaml.safe_dump(demo_topology(spec), sort_keys=False))
    done = subprocess.run(plan_argv(HETSCHED), cwd=folder, capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    return folder / "plan.yaml"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


pytestmark = [pytest.mark.root, root]


@pytest.fixture(scope="module")
def ssh_lab() -> Iterator[SshLab]:
    why_not = sshd_missing_reason()
    if why_not is not None:
        pytest.skip(why_not)
    spec = demo_lab_spec()
    keys = Path(tempfile.mkdtemp(prefix="hetsched-ssh-keys-"))
    made_privsep = not PRIVSEP_DIR.exists()
    daemons: list[Sshd] = []
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd refuses to start without it
        with running(spec) as state:
            hosts = [state.host(name) for name in lab_hosts(spec)]
            make_keys(keys, hosts)
            try:
                daemons.extend(start_sshd(host, keys) for host in hosts)
                for daemon in daemons:
                    wait_listening(daemon)
                yield SshLab(state, keys, tuple(daemons))
            finally:
                for daemon in daemons:
                    stop_sshd(daemon)
    finally:
        shutil.rmtree(keys, ignore_errors=True)
        if made_privsep:
            with suppress(OSError):
                PRIVSEP_DIR.rmdir()


def test_every_sshd_listens_only_on_its_lab_address(ssh_lab: SshLab) -> None:
    here = os.readlink("/proc/self/ns/net")
    for daemon in ssh_lab.daemons:
        assert os.readlink(f"/proc/{daemon.process.pid}/ns/net") != here
        assert listening(daemon.process.pid) == [daemon.host.address]
    assert not any(addr for addr in listening(os.getpid())
                   if addr.startswith("10.77.")), "an sshd of the lab in this namespace"


def launch_from_a1(lab: SshLab, workdir: Path, argv: list[str],
                   rdzv_id: str) -> subprocess.CompletedProcess[str]:
    """docs/launch.md step 5: on the login node (a1), in the job's folder; `--rdzv-id` only
    so that the test can find the remote processes afterwards."""
    argv = [*argv[:argv.index("--")], "--rdzv-id", rdzv_id, *argv[argv.index("--"):]]
    done = subprocess.run(["ip", "netns", "exec", lab.login_namespace(), *argv], cwd=workdir,
                          capture_output=True, text=True, env=_env(), timeout=600)
    (workdir / f"launch-{rdzv_id}.log").write_text(f"{done.stdout}\n--- stderr\n{done.stderr}")
    return done


@pytest.fixture()
def job(ssh_lab: SshLab, tmp_path: Path) -> tuple[Path, Path]:
    """A hostile-named job folder holding the demo plan and its topology."""
    workdir = tmp_path / JOB_DIR
    workdir.mkdir()
    return workdir, make_demo_plan(ssh_lab.state.spec, workdir)


def test_the_demo_plan_trains_on_every_host_over_ssh(ssh_lab: SshLab,
                                                     job: tuple[Path, Path]) -> None:
    workdir, plan = job
    argv = launch_argv(HETSCHED, sys.executable, str(ssh_lab.keys), str(TRAIN))
    assert (workdir / "plan.yaml") == plan
    done = launch_from_a1(ssh_lab, workdir, argv, unique_name("rdzv-ok"))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "[launch] 4 hosts via ssh" in done.stderr
    for name in ("a1", "a2", "b1", "b2"):
        assert f"[launch] {name}: finished" in done.stderr, output
    assert "[a1] eval loss" in done.stdout, output
    metrics = json.loads((workdir / "metrics.json").read_text())  # written in --workdir
    assert metrics["steps"] == 4 and len(metrics["curve"]) == 4
    ranks = {p.name for p in (workdir / "checkpoints" / "step-00000004").glob("rank-*.pt")}
    assert ranks == {f"rank-{r}.pt" for r in range(4)}  # one per host: each trained
    assert not list(workdir.parent.rglob("PWNED*"))


def test_one_failing_host_is_named_and_the_others_stopped(ssh_lab: SshLab,
                                                          job: tuple[Path, Path]) -> None:
    workdir, plan = job
    (workdir / "out").mkdir()
    rdzv = unique_name("rdzv-fail")
    argv = launch_argv(HETSCHED, sys.executable, str(ssh_lab.keys), str(SCRIPT))
    argv = [*argv[:argv.index("--") + 2], "--steps", "1000", "--sleep", "0.5", "--out", "out",
            "--fail-host", "b2", "--fail-step", "1"]
    done = launch_from_a1(ssh_lab, workdir, argv, rdzv)
    output = done.stdout + done.stderr
    assert done.returncode == 3, output  # the failing worker's own exit status
    # c10d numbers hosts as they join, so a host's rank is not known in advance
    assert re.search(r"\[b2\] rank \d fails on purpose at step 1", done.stdout), output
    assert "host b2 failed: exit status 1 (its worker exited with status 3)" in done.stderr, \
        output
    for name in ("a1", "a2", "b1"):  # they idle: only a stop ends them
        assert re.search(rf"\[{name}\] rank \d idles until stopped", done.stdout), output
        assert f"[launch] {name}: stopped by the launcher" in done.stderr, output
    workers = [json.loads((workdir / "out" / f"rank{r}.json").read_text())["pid"]
               for r in range(4)]
    started = time.monotonic()
    left = still_running(workers, rdzv)
    for description in left:  # never leave them behind, even when the test fails
        _kill(int(description.split()[-1]))
    assert not left, "a remote process outlived the launch"
    print(f"remote processes gone {time.monotonic() - started:.1f} s after the launcher")


def still_running(pids: list[int], rdzv_id: str) -> list[str]:
    """Workers and remote torchruns of the launch still alive after WAIT_S seconds."""
    deadline = time.monotonic() + WAIT_S
    while True:
        left = [f"worker {pid}" for pid in pids if _alive(pid)]
        left += [f"torchrun {p.pid}" for p in psutil.process_iter(["cmdline"])
                 if rdzv_id in (p.info["cmdline"] or []) and _alive(p.pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _kill(pid: int) -> None:
    with suppress(psutil.Error):
        psutil.Process(pid).kill()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("case", ["workdir", "key"])
def test_the_preflight_refuses_what_ssh_cannot_reach(ssh_lab: SshLab, job: tuple[Path, Path],
                                                     case: str) -> None:
    """Nothing starts when a host lacks the working directory or refuses the key."""
    workdir, _ = job
    argv = launch_argv(HETSCHED, sys.executable, str(ssh_lab.keys), str(TRAIN))
    if case == "workdir":
        argv[argv.index("--"):argv.index("--")] = ["--workdir", "/no/such job dir"]
        expected = "no directory /no/such job dir there (--workdir)"
    else:
        stranger = workdir / "stranger_key"
        subprocess.run(keygen_argv(str(stranger)), check=True, timeout=60)
        argv[argv.index("--identity") + 1] = str(stranger)
        expected = "Permission denied (publickey)"
    done = launch_from_a1(ssh_lab, workdir, argv, unique_name("rdzv-pre"))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert "unreachable: a1 (" in done.stderr and "nothing was started" in done.stderr
    assert done.stderr.count(expected) == 4, done.stderr  # every host, each named
    assert "started (pid" not in done.stderr


def test_a_lost_connection_is_named_and_the_others_stopped(ssh_lab: SshLab,
                                                           job: tuple[Path, Path]) -> None:
    """b1's sshd session dies mid-run (as when a host or its link goes): ssh exits 255,
    the launcher names b1 and says what 255 means, stops the others; nothing is left."""
    workdir, _ = job
    (workdir / "out").mkdir()
    rdzv = unique_name("rdzv-lost")
    argv = launch_argv(HETSCHED, sys.executable, str(ssh_lab.keys), str(SCRIPT))
    argv = [*argv[:argv.index("--")], "--rdzv-id", rdzv, "--", str(SCRIPT), "--steps", "1000",
            "--out", "out", "--fail-host", "nobody", "--fail-step", "1"]  # all idle at 1
    launcher = subprocess.Popen(["ip", "netns", "exec", ssh_lab.login_namespace(), *argv],
                                cwd=workdir, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        assert launcher.stdout is not None
        for line in launcher.stdout:
            seen.append(line.rstrip("\n"))
            if re.match(r"\[b1\] rank \d idles until stopped", line):
                break
        b1 = next(d for d in ssh_lab.daemons if d.host.name == "b1")
        sessions = [p for p in psutil.Process(b1.process.pid).children(recursive=True)
                    if p.name().startswith("sshd")]
        assert sessions, "no ssh session on b1"
        for session in sessions:
            _kill(session.pid)
        rest, _ = launcher.communicate(timeout=120)
        seen.extend(rest.splitlines())
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    output = "\n".join(seen)
    assert launcher.returncode == 1, output
    assert "host b1 failed: exit status 255 (ssh could not run the command, lost the " \
           "connection" in output, output
    for name in ("a1", "a2", "b2"):
        assert f"[launch] {name}: stopped by the launcher" in output, output
    workers = [json.loads((workdir / "out" / f"rank{r}.json").read_text())["pid"]
               for r in range(4)]
    left = still_running(workers, rdzv)
    for description in left:
        _kill(int(description.split()[-1]))
    assert not left, "a remote process outlived the launch"
