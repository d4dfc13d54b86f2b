"""Probing a running lab: an agent in every lab host, the coordinator in one of them.

The root namespace cannot reach the lab's addresses, so the coordinator runs inside the
first host's namespace; every process is `python -m cli` started through
`ip netns exec`. Agents are always stopped, also when the probe fails or is interrupted.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from topology.errors import InputError
from topology.lab import LabState, host_command
from topology.probe import ProbeOptions
from topology.protocol import DEFAULT_PORT, new_token

AGENT_START_TIMEOUT_S = 120.0
READY_LINE = "agent listening on"


def lab_hosts_file(state: LabState) -> dict[str, object]:
    """The hosts.yaml content for a lab: every host's agent on the default port."""
    return {
        "version": 1,
        "sites": [{"name": site.name} for site in state.spec.sites],
        "hosts": [
            {"name": h.name, "address": f"{h.address}:{DEFAULT_PORT}", "site": h.site}
            for h in state.hosts.values()
        ],
    }


@contextmanager
def lab_agents(state: LabState, folder: Path, flops: bool = False) -> Iterator[Path]:
    """Start one agent per lab host, wait until all listen, yield the token path, stop them.

    With `flops`, each agent is started once the previous one listens, so no two time
    their matmul at once: every lab host shares this machine's CPUs, and each figure is
    the whole machine's (the estimate divides it among the hosts, by their `machine`)."""
    token = folder / "token"
    token.write_text(new_token() + "\n")
    token.chmod(0o600)
    agents: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, host in state.hosts.items():
            argv = [sys.executable, "-m", "cli", "probe", "agent", "--name", name,
                    "--listen", f"{host.address}:{DEFAULT_PORT}", "--token-file", str(token),
                    "--flops" if flops else "--no-flops"]
            log = (folder / f"agent-{name}.log").open("w")
            agents[name] = subprocess.Popen(host_command(state, name, argv), stdout=log,
                                            stderr=subprocess.STDOUT, text=True)
            if flops:  # each times its matmul alone: the machine's speed, not a share
                _wait_until_listening({name: agents[name]}, folder)
        _wait_until_listening(agents, folder)
        yield token
    finally:
        for process in agents.values():
            process.terminate()
        for process in agents.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_until_listening(agents: dict[str, subprocess.Popen[str]], folder: Path) -> None:
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    waiting = set(agents)
    while waiting:
        for name in list(waiting):
            log = (folder / f"agent-{name}.log").read_text()
            if READY_LINE in log:
                waiting.discard(name)
            elif agents[name].poll() is not None:
                raise InputError(f"the agent in lab host {name} exited: {log.strip()[-300:]}")
        if time.monotonic() > deadline:
            raise InputError(f"agents did not start within {AGENT_START_TIMEOUT_S:g} s: "
                             f"{', '.join(sorted(waiting))}")
        time.sleep(0.1)


def probe_lab(
    state: LabState,
    output: Path,
    options: ProbeOptions,
    *,
    flops: bool = False,
    json_summary: bool = False,
) -> int:
    """Probe every pair of lab hosts into `output`; returns the coordinator's exit status."""
    with tempfile.TemporaryDirectory(prefix="hetsched-lab-probe-") as tmp:
        folder = Path(tmp)
        hosts = folder / "hosts.yaml"
        hosts.write_text(yaml.safe_dump(lab_hosts_file(state), sort_keys=False))
        with lab_agents(state, folder, flops) as token:
            coordinator_host = next(iter(state.hosts))
            argv = [sys.executable, "-m", "cli", "probe", "run", str(hosts),
                    "-o", str(output.resolve()), "--token-file", str(token),
                    "--name", state.name, "--pings", str(options.pings),
                    "--seconds", str(options.seconds), "--streams", str(options.streams),
                    "--timeout", str(options.timeout_s), "--schedule", options.schedule,
                    *(["--json"] if json_summary else [])]
            return subprocess.run(host_command(state, coordinator_host, argv)).returncode
