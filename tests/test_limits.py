"""The shared mechanisms behind hostile-input refusals, each pinned on its own.

Bounded numbers (every number of every schema has a documented range), duplicate YAML
keys, addresses, output paths, finite flags, and planning at the largest sizes the
schemas allow (it ends, within a liveness bound, instead of running for minutes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel, ValidationError

from cli.main import cli
from holmes.model import ModelConfig
from holmes.plan import Plan
from topology.addresses import check_host, split_endpoint
from topology.calibration import CalibrationFile
from topology.errors import InputError
from topology.files import check_output, load_yaml_mapping, write_text_atomic
from topology.hosts import HostsFile
from topology.lab_spec import LabSpec
from topology.schema import Topology
from topology.validation import Strict, bounded_float, bounded_int, limits_markdown, number_fields

from hostile_cases import device_node, make_device

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS: dict[str, type[BaseModel]] = {"topology.yaml": Topology, "hosts.yaml": HostsFile,
                                       "model.yaml": ModelConfig, "plan.yaml": Plan,
                                       "lab spec": LabSpec, "calibration.yaml": CalibrationFile}


def test_every_number_of_every_schema_is_bounded() -> None:
    unbounded = [f"{file}: {path}" for file, model in SCHEMAS.items()
                 for path, limit in number_fields(model) if limit is None and path != "version"]
    assert not unbounded


def test_docs_limits_lists_every_bound() -> None:
    text = (ROOT / "docs" / "limits.md").read_text()
    generated = text.split("<!-- limits: generated -->\n", 1)[1].split("<!-- limits: end -->")[0]
    assert generated == limits_markdown(SCHEMAS), "regenerate docs/limits.md's tables:\n" + \
        limits_markdown(SCHEMAS)


class Sample(Strict):
    gb: bounded_float(0.001, 100, "GB")
    ratio: bounded_float(0, 1, high_open=True) = 0.5
    count: bounded_int(1, 8) = 1


@pytest.mark.parametrize(("data", "field", "words"), [
    ({"gb": float("inf")}, "gb", "must be a number in [0.001, 100] GB, got inf"),
    ({"gb": float("nan")}, "gb", "got nan"),
    ({"gb": 1e308}, "gb", "got 1e+308"),
    ({"gb": 1, "count": 10**400}, "count", "got a number too large to hold"),
    ({"gb": 10**400}, "gb", "valid number"),
    ({"gb": "5"}, "gb", "valid number"),
    ({"gb": True}, "gb", "valid number"),
    ({"gb": 1, "ratio": 1.0}, "ratio", "[0, 1), got 1"),
    ({"gb": 1, "count": 8.0}, "count", "valid integer"),
    ({"gb": 1, "count": 9}, "count", "[1, 8], got 9"),
])
def test_bounded_numbers_name_their_bounds(data: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Sample.model_validate(data)
    error = caught.value.errors()[0]
    assert error["loc"] == (field,) and words in error["msg"]


def test_bounded_numbers_accept_their_range() -> None:
    assert Sample.model_validate({"gb": 100, "ratio": 0, "count": 8}).gb == 100


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yaml"
    path.write_text("version: 1\nhosts:\n  - {name: a, address: 10.0.0.1}\nhosts: []\n")
    with pytest.raises(InputError) as caught:
        load_yaml_mapping(path)
    assert caught.value.render() == (f"{path}: line 4, column 1: duplicate key 'hosts' "
                                     "(first on line 2)")
    path.write_text("version: 1\nbase: &b {name: a, kind: cpu}\nx:\n  <<: *b\n  name: c\n")
    assert load_yaml_mapping(path)["x"] == {"name": "c", "kind": "cpu"}  # a merge overrides
    path.write_text("a: {1: x, 01: y}\nb: {'1': x, 1: y}\n")
    with pytest.raises(InputError, match="duplicate key '01'"):
        load_yaml_mapping(path)


def test_duplicate_key_check_keeps_the_loader_fast() -> None:
    """Not a timing assertion: the loader must stay the C parser's subclass."""
    from topology import files

    assert issubclass(files._UniqueKeyLoader, files._SafeLoader)
    assert files._SafeLoader.__name__ == "CSafeLoader" or not yaml.__with_libyaml__


@pytest.mark.parametrize("text", ["10.0.0.1", "fe80::1%eth0", "node-3.example", "a_b", "h1"])
def test_hosts_that_parse(text: str) -> None:
    assert check_host(text) == text


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1:7070", ("10.0.0.1", 7070)), ("[::1]:80", ("::1", 80)), ("::1", ("::1", 9)),
    ("node.example", ("node.example", 9))])
def test_endpoints_that_parse(text: str, expected: tuple[str, int]) -> None:
    assert split_endpoint(text, 9) == expected


@pytest.mark.parametrize("text", ["[::1", "::1]:80", "a b", "$(id)", "h:0", "h:65536", "h:+5",
                                  "h:", ":80", "[10.0.0.1]:80", "a:b:c", "10.0.0.1\n", "-x",
                                  "tcp://h:1", "x" * 300])
def test_endpoints_that_do_not(text: str) -> None:
    with pytest.raises(ValueError):
        split_endpoint(text, 9)


def test_outputs_refused_before_writing(tmp_path: Path) -> None:
    source = tmp_path / "in.yaml"
    source.write_text("x: 1\n")
    (tmp_path / "link.yaml").symlink_to(source)
    refusals = {source: "is also an input", Path("/dev/null"): "character device",
                tmp_path: "is a folder", tmp_path / "link.yaml": "symbolic link",
                source / "out.yaml": "is not a folder"}
    for path, words in refusals.items():
        with pytest.raises(InputError, match=words):
            check_output(path, source)
    assert check_output(tmp_path / "new" / "out.yaml", source) == tmp_path / "new" / "out.yaml"


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "out.yaml").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        write_text_atomic(tmp_path / "out.yaml", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["out.yaml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_an_unwritable_folder_is_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(InputError, match="no permission to write"):
        write_text_atomic(locked / "out.yaml", "x")


def run(*argv: str) -> Any:
    return CliRunner().invoke(cli, list(argv), catch_exceptions=True)


@pytest.mark.parametrize("argv", [
    ["probe", "local", "--no-flops", "-o", "DEVICE"],
    ["probe", "local", "--no-flops", "-o", "{d}"],
    ["probe", "local", "--no-flops", "-o", "{d}/token/x.yaml"],
    ["probe", "lab", "-o", "DEVICE"],
])
def test_other_writers_refuse_bad_outputs(tmp_path: Path, argv: list[str]) -> None:
    (tmp_path / "token").write_text("0123456789abcdef0123\n")
    node, _ = device_node()
    make_device(tmp_path)
    before = sorted(tmp_path.iterdir())
    done = run(*(a.replace("DEVICE", node).replace("{d}", str(tmp_path)) for a in argv))
    assert done.exit_code == 2 and not isinstance(done.exception, AssertionError)
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: ")
    assert "-o: " in done.stderr and sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(("argv", "words"), [
    (["probe", "run", "h.yaml", "-o", "o.yaml", "--token-file", "t", "--seconds", "nan"],
     "not a finite number"),
    (["probe", "run", "h.yaml", "-o", "o.yaml", "--token-file", "t", "--timeout", "inf"],
     "--timeout"),
    (["probe", "lab", "--timeout", "nan"], "not a finite number"),
    (["plan", "t.yaml", "-m", "tiny-gpt", "-o", "p.yaml", "--skip-ratio", "nan"],
     "--skip-ratio: must be in [0, 1), got nan"),
    (["plan", "t.yaml", "-m", "tiny-gpt", "-o", "p.yaml", "--sync-every", str(10**30)],
     "--sync-every"),
])
def test_non_finite_and_huge_flags_are_refused(argv: list[str], words: str) -> None:
    done = run(*argv)
    assert done.exit_code == 2 and isinstance(done.exception, SystemExit)
    assert words in done.stderr and "Traceback" not in done.stderr


def test_fragments_above_sync_every_is_one_line(tmp_path: Path) -> None:
    done = run("plan", str(ROOT / "examples" / "holmes-ib-roce" / "topology.yaml"), "-m",
               "tiny-gpt", "-o", str(tmp_path / "p.yaml"), "--sync-every", "2",
               "--fragments", "4")
    assert done.exit_code == 2
    assert done.stderr == "error: --fragments: 4 fragments need --sync-every >= 4, got 2\n"


def small_topology(devices_on_a1: int, slow: int) -> dict[str, Any]:
    """Host a1 with `devices_on_a1` CPUs (device `slow` the slowest), host b1 with one."""
    def host(name: str, address: str, count: int) -> dict[str, Any]:
        return {"name": name, "address": address, "site": name[0], "cpu_cores": 8,
                "memory_gb": 64, "nics": [{"name": "eth0", "kind": "ethernet", "state": "up",
                                            "netdev": "eth0", "speed_gbps": 10}],
                "devices": [{"name": f"cpu{k}", "kind": "cpu", "memory_gb": 8,
                             "tflops": 1.0 if k == slow else 2.0} for k in range(count)]}
    return {"version": 1, "sites": [{"name": "a"}, {"name": "b"}],
            "hosts": [host("a1", "fd00::1", devices_on_a1), host("b1", "10.0.1.1", 1)],
            "links": [{"a": "a1", "b": "b1", "latency_ms": 5, "bandwidth_gbps": 1}]}


def hetsched(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_a_wide_stage_with_few_microbatches_and_an_ipv6_rendezvous(tmp_path: Path) -> None:
    """64 devices on a1, the slowest beyond the 4 microbatches of tiny-gpt: the slowest
    busy lane is simulated (this was 'no routes'); a1's IPv6 address is bracketed."""
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump(small_topology(64, slow=40)))
    done = hetsched("plan", str(topology), "-m", "tiny-gpt", "-o", "plan.yaml", "--stages", "1",
                    "--sync", "allreduce", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["launch"][0]["rdzv_endpoint"] == "[fd00::1]:29400"
    assert hetsched("simulate", "plan.yaml", cwd=tmp_path).returncode == 0
    done = hetsched("launch", "plan.yaml", "--dry-run", "--", "train.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    [], ["--stages", "3", "--skip-ratio", "0.5", "--max-swaps", "1"], ["--regime", "geo"]])
def test_planning_at_the_largest_sizes_ends(tmp_path: Path, options: list[str]) -> None:
    """1024 layers and 4096 microbatches per step: the route search and the geo
    refinement are cut to a budget, so this ends (600 s is only a liveness bound)."""
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump(small_topology(2, slow=0)))
    model = {"version": 1, "model": {"name": "big", "arch": "gpt", "layers": 1024,
                                     "hidden": 64, "heads": 4, "ffn": 256, "vocab": 256,
                                     "seq_len": 64, "dtype": "fp32"},
             "training": {"global_batch": 4096, "microbatch": 1, "steps": 1}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model))
    start = time.monotonic()
    done = hetsched("plan", str(topology), "-m", "model.yaml", "-o", "plan.yaml", *options,
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    print(f"planned {options or 'default'} in {time.monotonic() - start:.1f} s")
