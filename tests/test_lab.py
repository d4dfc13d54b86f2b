"""The emulated lab: spec validation (anywhere) and a real lab in namespaces (root only)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from topology.errors import InputError
from topology.lab import (
    LabError,
    LabPlan,
    Step,
    existing_namespaces,
    find_lab,
    host_command,
    lab_down,
    lab_up,
    link_counters,
    plan_lab,
    running_labs,
    state_path,
    wan_bytes,
)
from topology.lab_spec import LabSpec, builtin_lab_names, load_lab_spec, parse_lab_spec

from lab_support import root, running, two_site_spec, unique_name

# --------------------------------------------------------------------------------------
# Spec validation (no root needed)


def two_sites(**changes: object) -> dict:
    spec: dict = {
        "version": 1,
        "name": "t",
        "sites": [
            {"name": "a", "hosts": ["a1", "a2"], "rate_mbit": 1000},
            {"name": "b", "hosts": ["b1"]},
        ],
        "wan": [{"sites": ["a", "b"], "rate_mbit": 50}],
    }
    spec.update(changes)
    return spec


def rejection(data: dict) -> InputError:
    with pytest.raises(InputError) as caught:
        parse_lab_spec(data, "lab.yaml")
    return caught.value


def test_builtins_load_with_their_documented_shapes() -> None:
    assert builtin_lab_names() == ["lab-2x2", "lab-3site", "lab-8"]
    two = load_lab_spec(None)
    assert two.name == "lab-2x2" and two.host_names() == ["a1", "a2", "b1", "b2"]
    assert two.wan_rate_mbit("b", "a") == 50
    three = load_lab_spec("lab-3site")
    assert [len(s.hosts) for s in three.sites] == [2, 2, 1]
    assert {three.wan_rate_mbit(*p) for p in [("a", "b"), ("a", "c"), ("b", "c")]} == {100, 50, 20}
    eight = load_lab_spec("lab-8")
    assert [len(s.hosts) for s in eight.sites] == [3, 3, 2]
    assert all(s.rate_mbit == 1000 for s in eight.sites)


def test_a_spec_file_loads_and_the_default_rate_applies(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps(two_sites()))  # JSON is YAML
    spec = load_lab_spec(str(path))
    assert spec.site_of("b1").rate_mbit == 1000


def test_unknown_site_in_wan_names_the_field() -> None:
    error = rejection(two_sites(wan=[{"sites": ["a", "z"], "rate_mbit": 5}]))
    assert error.field == "wan[0].sites[1]" and "unknown site 'z'" in error.message
    assert error.render().startswith("lab.yaml: wan[0].sites[1]: ")


def test_duplicate_host_across_sites() -> None:
    data = two_sites()
    data["sites"][1]["hosts"] = ["a2"]
    error = rejection(data)
    assert error.field == "sites[1].hosts[0]" and "duplicate host 'a2'" in error.message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Big_Lab"}, "name"),
        ({"name": "much-too-long-name"}, "name"),
        ({"sites": [{"name": "a", "hosts": ["a 1"]}]}, "sites[0].hosts[0]"),
        ({"sites": [{"name": "a", "hosts": ["host-name-too-long"]}]}, "sites[0].hosts[0]"),
        ({"sites": [{"name": "a", "hosts": ["wan"]}]}, "sites[0].hosts[0]"),
        ({"sites": [{"name": "a", "hosts": ["r-x"]}]}, "sites[0].hosts[0]"),
        ({"sites": [{"name": "a", "hosts": ["a"]}]}, "sites[0].hosts[0]"),
        ({"sites": [{"name": "a", "hosts": []}]}, "sites[0].hosts"),
        ({"version": 2}, "version"),
        ({"colour": "red"}, "colour"),
        ({"wan": [{"sites": ["a", "a"], "rate_mbit": 5}]}, "wan[0].sites"),
        ({"wan": [{"sites": ["a", "b"], "rate_mbit": 0}]}, "wan[0].rate_mbit"),
    ],
)
def test_bad_values_are_one_error_naming_the_field(change: dict, field: str) -> None:
    assert rejection(two_sites(**change)).field == field


def test_missing_site_pair_needs_a_wan_entry_or_a_default() -> None:
    data = two_sites()
    data["sites"].append({"name": "c", "hosts": ["c1"]})
    error = rejection(data)
    assert error.field == "wan" and "no rate for site pair a-c" in error.message
    spec = parse_lab_spec({**data, "default_wan_mbit": 10})
    assert spec.wan_rate_mbit("c", "b") == 10 and spec.wan_rate_mbit("a", "b") == 50


def test_duplicate_wan_pair() -> None:
    data = two_sites(wan=[{"sites": ["a", "b"], "rate_mbit": 5}, {"sites": ["b", "a"],
                                                                   "rate_mbit": 6}])
    assert "duplicate WAN link" in rejection(data).message


def test_missing_file_and_unknown_builtin(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_lab_spec(str(tmp_path / "nope.yaml"))
    with pytest.raises(InputError, match="no built-in lab 'lab-9'"):
        load_lab_spec("lab-9")


def test_plan_touches_only_the_labs_own_namespaces() -> None:
    spec = load_lab_spec("lab-3site")
    plan = plan_lab(spec, disable_ipv6=True)
    assert plan.namespaces[0] == "hs-lab-3site-wan"
    assert set(plan.namespaces) == {
        "hs-lab-3site-wan", "hs-lab-3site-r-a", "hs-lab-3site-r-b", "hs-lab-3site-r-c",
        *(f"hs-lab-3site-{h}" for h in spec.host_names()),
    }
    for step in plan.steps:
        argv = list(step.argv)
        if argv[:2] == ["ip", "netns"]:  # ip netns exec NS ...
            assert argv[3] in plan.namespaces, step
        elif argv[:3] == ["ip", "link", "add"]:  # veth made directly across namespaces
            netns = [argv[i + 1] for i, word in enumerate(argv) if word == "netns"]
            assert len(netns) == 2 and set(netns) <= set(plan.namespaces), step
        else:
            assert argv[1] == "-n" and argv[2] in plan.namespaces, step
    rendered = "\n".join(step.render() for step in plan.steps)
    assert "10.77.3.1/24 dev eth0" in rendered  # c1: host 1 of site 3
    assert "route add default via 10.77.2.254" in rendered
    assert "route add 10.77.3.0/24 via 10.77.0.3" in rendered
    assert "rate 20000kbit ceil 20000kbit" in rendered  # b <-> c
    assert "match ip dst 10.77.2.0/24 flowid 1:2" in rendered


def test_cli_lists_builtins() -> None:
    result = CliRunner().invoke(cli, ["lab", "up", "--help"])
    assert result.exit_code == 0 and "lab-3site" in result.output
    result = CliRunner().invoke(cli, ["lab", "up", "--dry-run", "--builtin", "lab-2x2"])
    assert result.exit_code == 0 and "ip netns add hs-lab-2x2-a1" in result.output
    result = CliRunner().invoke(cli, ["lab", "up", "--builtin", "nope"])
    assert result.exit_code == 2 and "no built-in lab 'nope'" in result.output


# --------------------------------------------------------------------------------------
# A real lab (root only)


WAN_MBIT = 20
INTRA_MBIT = 200

# `server PORT`: accept one connection, print bytes received and Mbit/s after EOF.
# `client ADDR PORT SECONDS`: send as fast as possible for SECONDS.
BULK = r"""
import json, socket, sys, time
if sys.argv[1] == "server":
    srv = socket.create_server(("0.0.0.0", int(sys.argv[2])))
    print("ready", flush=True)
    srv.settimeout(10)
    conn, _ = srv.accept()
    conn.settimeout(10)
    total, first = 0, None
    while data := conn.recv(1 << 20):
        first = first or time.monotonic()
        total += len(data)
    seconds = time.monotonic() - first
    print(json.dumps({"bytes": total, "mbit": total * 8 / seconds / 1e6}), flush=True)
else:
    sock = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    chunk, end = b"x" * 65536, time.monotonic() + float(sys.argv[4])
    sock.sendall(chunk)
    while time.monotonic() < end:
        sock.sendall(chunk)
    sock.close()
"""


def transfer(state, src: str, dst: str, seconds: float, port: int = 5301) -> dict:
    server = subprocess.Popen(
        host_command(state, dst, [sys.executable, "-c", BULK, "server", str(port)]),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        subprocess.run(
            host_command(state, src, [sys.executable, "-c", BULK, "client",
                                      state.hosts[dst].address, str(port), str(seconds)]),
            check=True, timeout=30,
        )
        result = json.loads(server.stdout.readline())
        server.wait(timeout=10)
        return result
    finally:
        if server.poll() is None:
            server.kill()


def small_spec(name: str) -> LabSpec:
    return two_site_spec(name, INTRA_MBIT, WAN_MBIT)


@pytest.fixture(scope="module")
def running_lab():
    with running(small_spec(unique_name("u"))) as state:
        yield state


@pytest.mark.root
@root
def test_every_namespace_exists_and_state_is_recorded(running_lab) -> None:
    assert len(running_lab.namespaces) == 1 + 2 + 3
    assert set(running_lab.namespaces) <= existing_namespaces()
    assert running_lab.name in [lab.name for lab in running_labs()]
    assert find_lab(running_lab.name).hosts["b1"].address == "10.77.2.1"
    recorded = json.loads(state_path(running_lab.name).read_text())
    assert recorded["status"] == "up" and recorded["hosts"]["a2"]["address"] == "10.77.1.2"


@pytest.mark.root
@root
@pytest.mark.parametrize(("src", "dst"), [("a1", "a2"), ("a2", "b1"), ("b1", "a1")])
def test_hosts_reach_each_other_within_and_across_sites(running_lab, src, dst) -> None:
    result = transfer(running_lab, src, dst, seconds=0.0)
    assert result["bytes"] > 0


@pytest.mark.root
@root
def test_tc_shows_the_configured_rates(running_lab) -> None:
    host = running_lab.hosts["a1"]
    out = subprocess.run(["tc", "-n", host.namespace, "qdisc", "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    assert "tbf" in out and f"rate {INTRA_MBIT}Mbit" in out
    router = running_lab.routers["a"]
    out = subprocess.run(["tc", "-n", router, "qdisc", "show", "dev", "h-a2"],
                         capture_output=True, text=True, check=True).stdout
    assert f"rate {INTRA_MBIT}Mbit" in out
    out = subprocess.run(["tc", "-n", router, "class", "show", "dev", "wan0"],
                         capture_output=True, text=True, check=True).stdout
    assert "class htb 1:2 root leaf" in out and f"rate {WAN_MBIT}Mbit ceil {WAN_MBIT}Mbit" in out


@pytest.mark.root
@root
def test_a_wan_transfer_is_held_to_the_wan_rate(running_lab) -> None:
    before = wan_bytes(link_counters(running_lab))
    result = transfer(running_lab, "a2", "b1", seconds=1.0, port=5302)
    after = wan_bytes(link_counters(running_lab))
    # Loose bounds: goodput is ~95% of the link rate (headers); no tight timing here.
    assert 0.5 * WAN_MBIT < result["mbit"] < 1.2 * WAN_MBIT, result
    assert after[("a", "b")] - before[("a", "b")] >= result["bytes"]


@pytest.mark.root
@root
def test_cli_exec_status_and_refusals(running_lab) -> None:
    runner = CliRunner()
    name = running_lab.name
    done = subprocess.run([sys.executable, "-m", "cli", "lab", "exec", "--lab", name, "a1", "--",
                           "sh", "-c", "exit 3"], check=False)
    assert done.returncode == 3
    result = runner.invoke(cli, ["lab", "exec", "--lab", name, "zz", "--", "true"])
    assert result.exit_code == 2 and "unknown host 'zz'" in result.output
    result = runner.invoke(cli, ["lab", "status", name, "--json", "--counters"])
    assert result.exit_code == 0
    [entry] = json.loads(result.output)
    assert entry["hosts"]["b1"]["namespace"] == f"hs-{name}-b1"
    assert {c["link"] for c in entry["counters"]} >= {"a->b", "b->a", "a1->a", "a->a1"}
    with pytest.raises(InputError, match="already running"):
        lab_up(running_lab.spec)


@pytest.mark.root
@root
def test_down_removes_everything_and_is_idempotent() -> None:
    spec = small_spec(unique_name("d"))
    state = lab_up(spec)
    assert lab_down(spec.name) is True
    assert not set(state.namespaces) & existing_namespaces()
    assert not state_path(spec.name).exists()
    assert lab_down(spec.name) is False
    result = CliRunner().invoke(cli, ["lab", "down", spec.name])
    assert result.exit_code == 0 and "not running" in result.output


@pytest.mark.root
@root
def test_a_failed_up_rolls_back_and_leaves_nothing() -> None:
    spec = small_spec(unique_name("f"))
    plan = plan_lab(spec)
    failing = Step(("ip", "-n", plan.namespaces[-1], "link", "set", "no-such-dev", "up"),
                   "a step that fails")
    broken = LabPlan(spec, plan.namespaces, (*plan.steps, failing))
    with pytest.raises(LabError, match="rolled back.*no-such-dev"):
        lab_up(spec, plan=broken)
    assert not set(plan.namespaces) & existing_namespaces()
    assert not state_path(spec.name).exists()


@pytest.mark.root
@root
def test_up_refuses_to_adopt_a_namespace_it_did_not_create() -> None:
    spec = small_spec(unique_name("c"))
    squatter = f"hs-{spec.name}-a1"
    subprocess.run(["ip", "netns", "add", squatter], check=True)
    try:
        with pytest.raises(InputError, match=f"{squatter} already exists"):
            lab_up(spec)
        assert squatter in existing_namespaces()
        assert not state_path(spec.name).exists()
        assert not (set(plan_lab(spec).namespaces) - {squatter}) & existing_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", squatter], check=True)


@pytest.mark.root
@root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_up_without_root_is_refused() -> None:
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "cli", "lab", "up", "--name", unique_name("n")],
        capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1],
    )
    if "Permission denied" in done.stderr and "Traceback" in done.stderr:
        pytest.skip("the unprivileged user cannot read the checkout")
    assert done.returncode == 2, done.stderr
    assert "needs root" in done.stderr and "Traceback" not in done.stderr
