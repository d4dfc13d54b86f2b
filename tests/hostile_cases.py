"""The hostile-input fuzzer: a table of cases for every file-taking command, and its runner.

Each case starts from a folder of valid files (a topology, a model, three plans made for
that topology, a hosts file, a token, a lab spec, a training script), changes one of
them the way a hostile or careless user would, and runs one command in-process with
click's CliRunner. `check` says what is wrong with the outcome, if anything: the command
must exit with status 2, print exactly one line on stderr that names the file (and the
field or the cause), print no traceback and nothing on stdout, and leave every file in
the folder as it was (same bytes, same mtime, no new file, no file named PWNED*).

Commands: probe run, probe check, plan (topology and model), show, simulate,
launch --dry-run, lab up (--dry-run in-process; the real `lab up` runs in
test_hostile_files under the lab lock). Classes: the ones issue #18 closes (nonfinite,
absurd, size, plan-xcheck, model-source, output, dup-key, address, lab-rate, script)
and the ones that already held (bomb, deep, binary, wrong-type, hostile-name, empty).

    python tests/hostile_cases.py      prints the number of cases per command and class
"""

from __future__ import annotations

import copy
import functools
import os
import random
import re
import socket
import stat
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from cli.main import cli

COMMANDS = ("probe run", "probe check", "plan topology", "plan model", "show", "simulate",
            "launch --dry-run", "lab up")
CLASSES = ("nonfinite", "absurd", "size", "plan-xcheck", "model-source", "output", "dup-key",
           "address", "lab-rate", "script", "bomb", "deep", "binary", "wrong-type",
           "hostile-name", "empty")
# The file each command reads (the one its cases change unless a case says otherwise).
TARGET = {"probe run": "hosts.yaml", "probe check": "topology.yaml",
          "plan topology": "topology.yaml", "plan model": "model.yaml", "show": "plan.yaml",
          "simulate": "plan.yaml", "launch --dry-run": "plan.yaml", "lab up": "lab.yaml"}
# Which classes apply to which command (a lab spec has no plan to cross-check, ...).
APPLIES: dict[str, set[str]] = {
    "probe run": {"nonfinite", "absurd", "size", "output", "dup-key", "address"},
    "probe check": {"nonfinite", "absurd", "size", "dup-key", "address"},
    "plan topology": {"nonfinite", "absurd", "size", "output", "dup-key", "address"},
    "plan model": {"nonfinite", "absurd", "size", "dup-key", "output"},
    "show": {"nonfinite", "absurd", "size", "plan-xcheck", "model-source", "output",
             "dup-key", "address"},
    "simulate": {"nonfinite", "absurd", "size", "plan-xcheck", "model-source", "dup-key",
                 "address"},
    "launch --dry-run": {"nonfinite", "absurd", "size", "plan-xcheck", "model-source",
                         "dup-key", "address", "script"},
    "lab up": {"nonfinite", "absurd", "size", "dup-key", "lab-rate"},
}
for _classes in APPLIES.values():
    _classes |= {"bomb", "deep", "binary", "wrong-type", "hostile-name", "empty"}

PORT_MARK = "@PORT@"
NONFINITE = (float("inf"), float("-inf"), float("nan"))
ABSURD = (1e308, 10**30, -1)
HOSTILE_NAMES = ("a;$(touch PWNED)", "`touch PWNED2`", "../../etc/passwd", "a\nb",
                 "\x1b[31mred", "x" * 5000, "名前", "-rf", "a b", "*", "")


@dataclass(frozen=True)
class Case:
    """One hostile run: `content` replaces file `target`; `argv` (with {d} for the folder)
    replaces the command's usual arguments; the error line must contain `names` (a path,
    default the target's) and `expect`; `setup` prepares extra things in the folder."""

    command: str
    klass: str
    name: str
    target: str
    content: bytes | None = None
    argv: tuple[str, ...] | None = None
    expect: str = ""
    names: str | None = None
    setup: Callable[[Path], None] | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        return f"{self.command}/{self.klass}/{self.name}"


# ---------------------------------------------------------------- the valid files


def base_topology() -> dict[str, Any]:
    """Two sites of two hosts, two CPU devices each, every link measured."""
    hosts = []
    for s, site in enumerate("ab"):
        for j in (1, 2):
            hosts.append({
                "name": f"{site}{j}", "address": f"10.0.{s}.{j}", "site": site,
                "cpu_cores": 8, "memory_gb": 32,
                "devices": [{"name": f"cpu{k}", "kind": "cpu", "memory_gb": 8,
                             "tflops": 1.0 + 0.5 * k} for k in (0, 1)],
                "nics": [{"name": "eth0", "kind": "ethernet", "speed_gbps": 10, "state": "up",
                          "netdev": "eth0", "mtu": 1500, "rdma_port": 1, "gid_index": 0}]})
    links = []
    for i, x in enumerate(hosts):
        for y in hosts[i + 1:]:
            gbps = 10 if x["site"] == y["site"] else 0.1
            links.append({"a": x["name"], "b": y["name"],
                          "latency_ms": 0.1 if x["site"] == y["site"] else 20,
                          "bandwidth_gbps": gbps,
                          "measured": {"method": "probe", "latency_samples": 30,
                                       "bytes": 1_000_000, "streams": 4, "a_to_b_gbps": gbps,
                                       "b_to_a_gbps": gbps}})
    return {"version": 1, "name": "fuzz", "sites": [{"name": "a"}, {"name": "b"}],
            "hosts": hosts, "links": links}


def base_model() -> dict[str, Any]:
    return {"version": 1,
            "model": {"name": "tiny", "arch": "gpt", "layers": 8, "hidden": 128, "heads": 4,
                      "kv_heads": 4, "ffn": 512, "vocab": 256, "seq_len": 128, "dtype": "fp32",
                      "seconds_per_layer_per_sample": 0.001},
            "training": {"global_batch": 16, "microbatch": 4, "steps": 10}}


def base_hosts() -> dict[str, Any]:
    return {"version": 1, "sites": [{"name": "a"}],
            "hosts": [{"name": n, "address": f"127.0.0.1:{PORT_MARK}", "site": "a"}
                      for n in ("h1", "h2")]}


def base_lab() -> dict[str, Any]:
    return {"version": 1, "name": "hfz", "description": "fuzz",
            "sites": [{"name": "a", "hosts": ["a1", "a2"], "rate_mbit": 1000},
                      {"name": "b", "hosts": ["b1"], "rate_mbit": 500},
                      {"name": "c", "hosts": ["c1"], "rate_mbit": 500}],
            "wan": [{"sites": ["a", "b"], "rate_mbit": 50}], "default_wan_mbit": 100}


PLAN_OPTIONS = {"plan.yaml": ["--stages", "2"],
                "plan-skip.yaml": ["--stages", "4", "--skip-ratio", "0.5"],
                "plan-allreduce.yaml": ["--stages", "2", "--sync", "allreduce"]}


@functools.cache
def base_files() -> dict[str, bytes]:
    """Every valid input, by file name; plans made in-process for the base topology."""
    files = {"topology.yaml": dump(base_topology()), "model.yaml": dump(base_model()),
             "hosts.yaml": dump(base_hosts()), "lab.yaml": dump(base_lab()),
             "token": b"0123456789abcdef0123456789abcdef\n",
             "script.py": b"print('never run by these tests')\n"}
    with tempfile.TemporaryDirectory(prefix="hostile-base-") as tmp:
        folder = Path(tmp)
        (folder / "topology.yaml").write_bytes(files["topology.yaml"])
        for name, options in PLAN_OPTIONS.items():
            out = folder / name
            done = CliRunner().invoke(cli, ["plan", str(folder / "topology.yaml"), "-m",
                                            "tiny-gpt", "-o", str(out), *options])
            assert done.exit_code == 0, done.output
            files[name] = out.read_bytes()
    return files


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump(data: Any) -> bytes:
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False, allow_unicode=True).encode()


def parsed(name: str) -> dict[str, Any]:
    return copy.deepcopy(_parsed(name))


@functools.cache
def _parsed(name: str) -> dict[str, Any]:
    return yaml.load(base_files()[name], Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# ---------------------------------------------------------------- generic mutations


def numeric_leaves(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...],
                                                                              float]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from numeric_leaves(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from numeric_leaves(value, (*path, i))
    elif isinstance(data, int | float) and not isinstance(data, bool):
        yield path, data


def render(path: tuple[Any, ...]) -> str:
    """A path as the error line names it: hosts[0].devices[1].memory_gb."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def replaced(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(data)
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return changed


def edited(name: str, edit: Callable[[dict[str, Any]], None]) -> bytes:
    data = parsed(name)
    edit(data)
    return dump(data)


def number_cases(command: str, all_values: bool) -> list[Case]:
    """inf/-inf/nan and 1e308/1e30/-1 at every number of the command's file (all six at
    each, or, with all_values False, one of each class per number in turn)."""
    target = TARGET[command]
    data = parsed(target)
    cases = []
    for n, (path, _) in enumerate(numeric_leaves(data)):
        for klass, values in (("nonfinite", NONFINITE), ("absurd", ABSURD)):
            chosen = values if all_values else (values[n % len(values)],)
            cases += [Case(command, klass, f"{render(path)}={value!r}", target,
                           dump(replaced(data, path, value)), expect=f": {render(path)}: ")
                      for value in chosen]
    return cases


def text_cases(command: str) -> list[Case]:
    """The classes that do not depend on the schema: bombs, depth, bytes, emptiness."""
    target = TARGET[command]
    laughs = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bombs = {
        "billion-laughs": "\n".join([*laughs, "version: *a9", "hosts: *a9", "model: *a9"]),
        "laughs-in-a-list": "\n".join([*laughs, "version: 1", f"{_list_key(command)}: *a9"]),
        "anchor-cycle": "version: 1\nhosts: &h [*h]\n",
    }
    deep = {"deep-1000-lists": "version: 1\nhosts: " + "[" * 1000 + "]" * 1000,
            "deep-500-maps": "version: 1\nhosts: " + "{a: " * 500 + "1" + "}" * 500,
            "deep-100k": "[" * 100_000 + "]" * 100_000}
    rng = random.Random(18)
    binary = {"random-bytes": bytes(rng.randrange(256) for _ in range(4096)),
              "nul-bytes": b"\0" * 1024, "bad-utf8": b"version: 1\nname: \xff\xfe\n",
              "utf16": "version: 1\n".encode("utf-16"), "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
              "gzip": b"\x1f\x8b\x08\x00" + bytes(rng.randrange(256) for _ in range(64)),
              "control-chars": b"version: 1\nhosts: [\x07\x08]\n"}
    empty = {"empty": "", "blank": "  \n\n", "comment": "# nothing here\n", "doc-start": "---\n",
             "null": "null\n", "tilde": "~\n", "empty-map": "{}\n", "empty-list": "[]\n"}
    cases = [Case(command, "bomb", k, target, v.encode()) for k, v in bombs.items()]
    cases += [Case(command, "deep", k, target, v.encode()) for k, v in deep.items()]
    cases += [Case(command, "binary", k, target, v) for k, v in binary.items()]
    cases += [Case(command, "empty", k, target, v.encode()) for k, v in empty.items()]
    return cases


def _list_key(command: str) -> str:
    return {"hosts.yaml": "hosts", "topology.yaml": "hosts", "model.yaml": "model",
            "plan.yaml": "stages", "lab.yaml": "sites"}[TARGET[command]]


def wrong_type_cases(command: str) -> list[Case]:
    target = TARGET[command]
    data = parsed(target)
    cases = [Case(command, "wrong-type", "top-level-list", target, dump([data])),
             Case(command, "wrong-type", "top-level-string", target, b"just text\n"),
             Case(command, "wrong-type", "top-level-number", target, b"42\n"),
             Case(command, "wrong-type", "version-string", target,
                  dump({**data, "version": "1"}), expect="version"),
             Case(command, "wrong-type", "version-bool", target,
                  dump({**data, "version": True}), expect="version")]
    for path, value in list(numeric_leaves(data))[:12]:
        for bad in (str(value), True, [value], {"x": value}):
            cases.append(Case(command, "wrong-type", f"{render(path)}={bad!r}", target,
                              dump(replaced(data, path, bad)), expect=render(path)))
    for key, value in data.items():
        if isinstance(value, list | dict):
            for bad in ("text", 7, None) if isinstance(value, list) else ("text", [1, 2]):
                cases.append(Case(command, "wrong-type", f"{key}={bad!r}", target,
                                  dump({**data, key: bad}), expect=key))
    return cases


def dup_key_cases(command: str) -> list[Case]:
    target = TARGET[command]
    text = base_files()[target].decode()
    cases = [Case(command, "dup-key", "version-twice", target,
                  (text + "version: 1\n").encode(), expect="duplicate key 'version'")]
    key = _list_key(command)
    cases.append(Case(command, "dup-key", f"{key}-twice", target,
                      (text + f"{key}: []\n").encode(), expect=f"duplicate key '{key}'"))
    block = yaml.dump(parsed(target), Dumper=_DUMPER, sort_keys=False,
                      default_flow_style=False).splitlines()
    inner = next(i for i, line in enumerate(block) if re.match(r"^  [A-Za-z_]+: \S", line))
    key_of_line = block[inner].split(":", 1)[0].strip()
    doubled = [*block[:inner + 1], block[inner], *block[inner + 1:]]
    cases.append(Case(command, "dup-key", f"nested-{key_of_line}-twice", target,
                      ("\n".join(doubled) + "\n").encode(),
                      expect=f"duplicate key '{key_of_line}'"))
    cases.append(Case(command, "dup-key", "flow-mapping", target,
                      (text + "extra: {a: 1, a: 2}\n").encode(), expect="duplicate key 'a'"))
    return cases


def hostile_name_cases(command: str, fields: list[tuple[Any, ...]]) -> list[Case]:
    target = TARGET[command]
    data = parsed(target)
    return [Case(command, "hostile-name", f"{render(path)}={name[:20]!r}", target,
                 dump(replaced(data, path, name)))
            for path in fields for name in HOSTILE_NAMES]


# ---------------------------------------------------------------- per command


def output_cases(command: str, option: str, argv: Callable[[str], tuple[str, ...]],
                 inputs: list[str], suffix: str = ".yaml") -> list[Case]:
    """The output path is an input, a device, a folder, a link, under a file, unwritable."""
    cases = [Case(command, "output", f"over-{name}", name, argv=argv(f"{{d}}/{name}"),
                  expect=f"{option}: is also an input", names=name) for name in inputs]
    if suffix == ".yaml":
        node, names = device_node()
        cases.append(Case(command, "output", "device-node", "", argv=argv(node),
                          expect="character device", names=names, setup=make_device))
    cases += [
        Case(command, "output", "folder", "", argv=argv(f"{{d}}/folder{suffix}"),
             expect="is a folder", names=f"folder{suffix}", setup=_make_folder),
        Case(command, "output", "symlink", "", argv=argv(f"{{d}}/link{suffix}"),
             expect="symbolic link", names=f"link{suffix}", setup=_make_link),
        Case(command, "output", "fifo", "", argv=argv(f"{{d}}/fifo{suffix}"), expect="named pipe",
             names=f"fifo{suffix}", setup=_make_fifo),
        Case(command, "output", "under-a-file", "", argv=argv(f"{{d}}/token/out{suffix}"),
             expect="is not a folder", names=f"token/out{suffix}"),
    ]
    if os.geteuid() != 0:
        cases.append(Case(command, "output", "unwritable-folder", "",
                          argv=argv(f"{{d}}/locked/out{suffix}"), expect="no permission",
                          names=f"locked/out{suffix}", setup=_make_locked))
    return cases


def device_node() -> tuple[str, str]:
    """A character device to write to: as root a null device made in the case's folder
    (a regression run as root would replace the real /dev/null with a file), else
    /dev/null itself (nobody but root can replace it)."""
    return ("{d}/null.dev", "null.dev") if os.geteuid() == 0 else ("/dev/null", "/dev/null")


def make_device(folder: Path) -> None:
    if os.geteuid() == 0:
        os.mknod(folder / "null.dev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def _make_folder(folder: Path) -> None:
    for name in ("folder.yaml", "folder.png"):
        (folder / name).mkdir()


def _make_link(folder: Path) -> None:
    for name in ("link.yaml", "link.png"):
        (folder / name).symlink_to(folder / "script.py")


def _make_fifo(folder: Path) -> None:
    for name in ("fifo.yaml", "fifo.png"):
        os.mkfifo(folder / name)


def _make_locked(folder: Path) -> None:
    (folder / "locked").mkdir(mode=0o500)


def command_argv(command: str, output: str | None = None) -> tuple[str, ...]:
    """The command's usual arguments ({d}: the case's folder)."""
    out = output or "{d}/out.yaml"
    return {
        "probe run": ("probe", "run", "{d}/hosts.yaml", "-o", out, "--token-file", "{d}/token",
                      "--timeout", "0.5", "--pings", "1", "--seconds", "0.1"),
        "probe check": ("probe", "check", "{d}/topology.yaml"),
        "plan topology": ("plan", "{d}/topology.yaml", "-m", "{d}/model.yaml", "-o", out),
        "plan model": ("plan", "{d}/topology.yaml", "-m", "{d}/model.yaml", "-o", out),
        "show": ("show", "{d}/plan.yaml") + (("--gantt", output) if output else ()),
        "simulate": ("simulate", "{d}/plan.yaml"),
        "launch --dry-run": ("launch", "{d}/plan.yaml", "--dry-run", "--via", "local", "--",
                             "{d}/script.py"),
        "lab up": ("lab", "up", "{d}/lab.yaml", "--dry-run"),
    }[command]


def hosts_cases() -> list[Case]:
    command = "probe run"
    cases = number_cases(command, all_values=True)
    cases += text_cases(command) + wrong_type_cases(command) + dup_key_cases(command)
    cases += hostile_name_cases(command, [("hosts", 0, "name"), ("hosts", 1, "site"),
                                          ("sites", 0, "name")])
    for address in ("[::1", "::1]:80", "[::1]x", "a b", "$(touch PWNED)", "10.0.0.1:0",
                    "10.0.0.1:65536", "10.0.0.1:", ":7070", "tcp://1.2.3.4:7070",
                    "1.2.3.4;touch PWNED", "ipc:///tmp/x", "[10.0.0.1]:80", "a:b:c",
                    " 10.0.0.1", "10.0.0.1\n", "-oProxyCommand=x", "x" * 300):
        cases.append(Case(command, "address", repr(address)[:40], "hosts.yaml",
                          edited("hosts.yaml", _set_address(address)),
                          expect="hosts[0].address: "))
    many = base_hosts()
    many["hosts"] = [{"name": f"h{i}", "address": "127.0.0.1"} for i in range(2000)]
    cases.append(Case(command, "size", "2000-hosts", "hosts.yaml", dump(many),
                      expect="hosts: List should have at most 1024 items"))
    argv = functools.partial(command_argv, command)
    return cases + output_cases(command, "-o", argv, ["hosts.yaml", "token"])


def _set_address(address: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["hosts"][0]["address"] = address
    return edit


def topology_cases(command: str) -> list[Case]:
    cases = number_cases(command, all_values=command == "probe check")
    cases += text_cases(command) + wrong_type_cases(command) + dup_key_cases(command)
    cases += hostile_name_cases(command, [("hosts", 0, "name"), ("hosts", 1, "site"),
                                          ("hosts", 0, "devices", 0, "name"),
                                          ("hosts", 0, "nics", 0, "name"), ("links", 0, "a"),
                                          ("sites", 0, "name"), ("name",)])
    for address in ("[::1", "a b", "$(touch PWNED)", "10.0.0.1:80", "10.0.0.1;id", "",
                    "-oProxyCommand=x", "x" * 300, "a..b"):
        cases.append(Case(command, "address", repr(address)[:40], "topology.yaml",
                          edited("topology.yaml", _set_host_field("address", address)),
                          expect="hosts[0].address: "))
    cases += [
        Case(command, "size", "1000-devices-on-a-host", "topology.yaml",
             edited("topology.yaml", _devices(1000)), expect="hosts[0].devices: List should"),
        Case(command, "size", "4097-hosts", "topology.yaml", dump(_many_hosts(4097)),
             expect="hosts: List should have at most 4096 items"),
        Case(command, "size", "3000-nics", "topology.yaml",
             edited("topology.yaml", _nics(3000)), expect="hosts[0].nics: List should"),
    ]
    if command == "plan topology":
        argv = functools.partial(command_argv, command)
        cases += output_cases(command, "-o", argv, ["topology.yaml", "model.yaml"])
    return cases


def _set_host_field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["hosts"][0][key] = value
    return edit


def _devices(count: int) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["hosts"][0]["devices"] = [{"name": f"gpu{k}", "kind": "gpu", "memory_gb": 80,
                                        "tflops": 100 + k % 7} for k in range(count)]
    return edit


def _nics(count: int) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["hosts"][0]["nics"] = [{"name": f"veth{k}", "kind": "ethernet"}
                                    for k in range(count)]
    return edit


def _many_hosts(count: int) -> dict[str, Any]:
    data = base_topology()
    data["hosts"] = [{"name": f"h{i}", "cpu_cores": 1, "memory_gb": 1} for i in range(count)]
    data["links"], data["sites"] = [], []
    return data


def model_cases() -> list[Case]:
    command = "plan model"
    cases = number_cases(command, all_values=True)
    cases += text_cases(command) + wrong_type_cases(command) + dup_key_cases(command)
    cases += hostile_name_cases(command, [("model", "name"), ("model", "dtype"),
                                          ("model", "arch"), ("training", "recompute")])
    sizes = {"layers-1e9": ("model", "layers", 10**9, "model.layers: must be a number"),
             "layers-1025": ("model", "layers", 1025, "model.layers: must be a number"),
             "global-batch-1e9": ("training", "global_batch", 10**9,
                                  "training.global_batch: must be a number"),
             "100k-microbatches": ("training", "global_batch", 100_000 * 4,
                                   "training.global_batch: 400000 / microbatch 4"),
             "seq-len-1e9": ("model", "seq_len", 10**9, "model.seq_len: must be a number"),
             "hidden-2^40": ("model", "hidden", 2**40, "model.hidden: must be a number")}
    for name, (section, key, value, expect) in sizes.items():
        cases.append(Case(command, "size", name, "model.yaml",
                          dump(replaced(base_model(), (section, key), value)), expect=expect))
    argv = functools.partial(command_argv, command)
    return cases + output_cases(command, "-o", argv, ["model.yaml"])


def lab_cases() -> list[Case]:
    command = "lab up"
    cases = number_cases(command, all_values=True)
    cases += text_cases(command) + wrong_type_cases(command) + dup_key_cases(command)
    cases += hostile_name_cases(command, [("name",), ("sites", 0, "name"),
                                          ("sites", 0, "hosts", 0), ("wan", 0, "sites", 0)])
    for rate in (0.0009, 0.0001, 1e-300, 0, 100_001, 1e9):
        for path in (("sites", 0, "rate_mbit"), ("wan", 0, "rate_mbit"), ("default_wan_mbit",)):
            cases.append(Case(command, "lab-rate", f"{render(path)}={rate!r}", "lab.yaml",
                              dump(replaced(base_lab(), path, rate)),
                              expect=f"{render(path)}: must be a number in [0.001, 100000]"))
    many = base_lab()
    many["sites"][0]["hosts"] = [f"h{i}" for i in range(300)]
    cases.append(Case(command, "size", "300-hosts-in-a-site", "lab.yaml", dump(many),
                      expect="sites[0].hosts: List should have at most 250"))
    many = base_lab()
    many["sites"] = [{"name": f"s{i}", "hosts": [f"h{i}"]} for i in range(300)]
    cases.append(Case(command, "size", "300-sites", "lab.yaml", dump(many),
                      expect="sites: List should have at most 250"))
    return cases


def plan_cases(command: str) -> list[Case]:
    """show, simulate and launch --dry-run: the plan sweep, the cross-checks, and more."""
    cases = number_cases(command, all_values=command == "show")
    cases += _skip_number_cases(command)
    cases += text_cases(command) + wrong_type_cases(command) + dup_key_cases(command)
    cases += hostile_name_cases(command, [("launch", 0, "host"), ("stages", 0, "devices", 0),
                                          ("groups", 0, "name"), ("model", "name"),
                                          ("paths", 0, "origin"), ("replicas", 0, "fabrics", 0)])
    cases += [Case(command, "plan-xcheck", name, "plan.yaml", content, expect=expect,
                   names=names) for name, content, expect, names in cross_checks()]
    cases += [Case(command, "model-source", name, "plan.yaml", content, expect=expect)
              for name, content, expect in model_source_edits()]
    cases.append(Case(command, "model-source", "model-file-changed", "plan.yaml",
                      edited("plan.yaml", _source("model.yaml")),
                      expect="model.source: ", setup=_changed_model_file))
    for address in ("[::1", "a b", "$(touch PWNED)", "-oProxyCommand=x", "10.0.0.1:80"):
        cases.append(Case(command, "address", f"launch-address-{address!r}"[:40], "plan.yaml",
                          edited("plan.yaml", _launch_field("address", address)),
                          expect="launch[1].address: "))
    for endpoint in ("[::1", "a b:29400", "10.0.0.1:99999", "$(id):1"):
        cases.append(Case(command, "address", f"rdzv-{endpoint!r}", "plan.yaml",
                          edited("plan.yaml", _launch_field("rdzv_endpoint", endpoint)),
                          expect="launch[1].rdzv_endpoint: "))
    cases += [Case(command, "size", name, "plan.yaml", content, expect=expect)
              for name, content, expect in plan_sizes()]
    if command == "show":
        argv = functools.partial(command_argv, command)
        cases += output_cases(command, "--gantt", argv, [], suffix=".png")
        cases.append(Case(command, "output", "gantt-over-plan", "", argv=argv("{d}/plan.png"),
                          expect="--gantt: is also an input", names="plan.png",
                          setup=_plan_as_png))
    if command == "launch --dry-run":
        for name, script in (("missing", "{d}/nope.py"), ("folder", "{d}"),
                             ("relative-missing", "no-such-dir/train.py")):
            argv = ("launch", "{d}/plan.yaml", "--dry-run", "--via", "local", "--", script)
            cases.append(Case(command, "script", name, "", argv=argv,
                              expect="SCRIPT: ", names=script.replace("{d}/", "")
                              .replace("{d}", "")))
    return cases


def _skip_number_cases(command: str) -> list[Case]:
    data = parsed("plan-skip.yaml")
    cases = []
    for n, (path, _) in enumerate(numeric_leaves(data.get("skipping", {}), ("skipping",))):
        for klass, values in (("nonfinite", NONFINITE), ("absurd", ABSURD)):
            value = values[n % len(values)]
            cases.append(Case(command, klass, f"skip:{render(path)}={value!r}", "plan.yaml",
                              dump(replaced(data, path, value)), expect=f": {render(path)}: "))
    return cases


def _source(source: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["model"]["source"] = source
    return edit


def _changed_model_file(folder: Path) -> None:
    model = yaml.safe_load((folder / "model.yaml").read_text())
    model["model"].update({"name": "tiny-gpt", "layers": 8, "hidden": 128, "seq_len": 128})
    model["training"]["global_batch"] = 32  # the plan was made for 16
    (folder / "model.yaml").write_bytes(dump(model))


def _plan_as_png(folder: Path) -> None:
    os.link(folder / "plan.yaml", folder / "plan.png")  # the same file under a .png name


def _launch_field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["launch"][1][key] = value
    return edit


def model_source_edits() -> list[tuple[str, bytes, str]]:
    return [("source-other-preset", edited("plan.yaml", _source("llama-7b")),
             "model.source: "),
            ("source-gpt-1.3b", edited("plan.yaml", _source("gpt-1.3b")), "model.source: ")]


def plan_sizes() -> list[tuple[str, bytes, str]]:
    def many_paths(data: dict[str, Any]) -> None:
        data["paths"] = [dict(data["paths"][0], microbatch=m) for m in range(5000)]

    def big_layers(data: dict[str, Any]) -> None:
        data["model"]["layers"] = 10**9

    def big_batch(data: dict[str, Any]) -> None:
        data["model"]["global_batch"] = 10**9

    return [("5000-paths", edited("plan.yaml", many_paths), "paths"),
            ("layers-1e9", edited("plan.yaml", big_layers), "model.layers: must be a number"),
            ("global-batch-1e9", edited("plan.yaml", big_batch),
             "model.global_batch: must be a number")]


def cross_checks() -> list[tuple[str, bytes, str, str | None]]:
    """Hand edits of a valid plan that no longer describe one job, and the field named."""
    edits: list[tuple[str, str, Callable[[dict[str, Any]], Any], str]] = [
        ("stage-device-not-launched", "plan.yaml", _drop_launch_device,
         "stages[0].devices[1]: a1:cpu1 is on no host of launch"),
        ("unknown-replica", "plan.yaml", lambda d: d["stages"][0].update(replica=7),
         "replicas[0].stages[0]: stage 0 says it is in replica 7"),
        ("empty-paths", "plan.yaml", lambda d: d.update(paths=[]), "paths: List should have"),
        ("launch-device-in-no-stage", "plan.yaml", _extra_launch_device,
         "launch[0].devices[2]: a1:cpu9 is in no stage"),
        ("nproc-differs", "plan.yaml", lambda d: d["launch"][0].update(nproc_per_node=3),
         "launch[0].nproc_per_node: 3, but the host lists 2 devices"),
        ("group-rank-out-of-range", "plan.yaml", lambda d: d["groups"][0]["ranks"].append(99),
         "groups[0].ranks[4]: rank 99 >= world 8"),
        ("unknown-stage-in-replica", "plan.yaml", lambda d: d["replicas"][0]["stages"]
         .__setitem__(0, 42), "replicas[0].stages[0]: unknown stage 42"),
        ("duplicate-stage-id", "plan.yaml", lambda d: d["stages"][1].update(id=0),
         "stages[1].id: 0 is also stages[0].id"),
        ("replicas-out-of-order", "plan.yaml", lambda d: d["replicas"].reverse(),
         "replicas[0].id: replicas are numbered 0..n-1"),
        ("route-into-other-replica", "plan.yaml", lambda d: d["paths"][0]["route"]
         .__setitem__(1, "b1:cpu1"), "paths[0].route[1]: b1:cpu1 is not a device of replica 0"),
        ("origin-not-first-stage", "plan.yaml", _origin_in_second_stage,
         "paths[0].origin: a2:cpu0 is not a device of a replica's first stage"),
        ("route-visits-stage-twice", "plan.yaml", lambda d: d["paths"][0]["route"]
         .__setitem__(1, "a1:cpu1"), "paths[0].route[1]: visits stage 0 of replica 0 twice"),
        ("origin-not-route-start", "plan.yaml", lambda d: d["paths"][0].update(origin="a1:cpu1"),
         "paths[0].route: must start at its origin a1:cpu1"),
        ("duplicate-microbatch", "plan.yaml", lambda d: d["paths"][1].update(microbatch=0),
         "paths[1].microbatch: 0 is also paths[0].microbatch"),
        ("launch-device-of-other-host", "plan.yaml", _swap_launch_devices,
         "launch[0].devices[0]: b1:cpu0 is not a device of host a1"),
        ("rdzv-differs", "plan.yaml", lambda d: d["launch"][1].update(
            rdzv_endpoint="10.0.0.9:29400"), "launch[1].rdzv_endpoint: every host meets"),
        ("node-rank-twice", "plan.yaml", lambda d: d["launch"][1].update(node_rank=0),
         "launch: node_rank must number the hosts 0..n-1"),
        ("data-group-spans-stages", "plan.yaml", _data_group_spans,
         "ranks: a data group holds exactly the devices of one stage"),
        ("replica-group-under-diloco", "plan.yaml", _lane_group_kind("replica"),
         "ranks: a replica group does not fit sync: diloco"),
        ("diloco-group-under-allreduce", "plan-allreduce.yaml", _lane_group_kind("diloco"),
         "ranks: a diloco group does not fit sync: allreduce"),
        ("pipeline-group-across-replicas", "plan.yaml", lambda d: d["groups"][0]["ranks"]
         .__setitem__(0, 4), "groups[0].ranks: a pipeline group holds devices of one replica"),
        ("group-name-twice", "plan.yaml", lambda d: d["groups"][1].update(
            name=d["groups"][0]["name"]), "groups[1].name: pipeline-r0 is also groups[0].name"),
        ("rank-twice-in-group", "plan.yaml", lambda d: d["groups"][0]["ranks"]
         .__setitem__(1, d["groups"][0]["ranks"][0]), "groups[0].ranks: a rank is listed twice"),
        ("env-per-unknown-host", "plan.yaml", lambda d: d["groups"][0].update(
            env_per_host={"zz": {"A": "1"}}), "groups[0].env_per_host: unknown host 'zz'"),
        ("env-name-with-shell", "plan.yaml", lambda d: d["groups"][0].update(
            env={"A;touch PWNED": "1"}), "groups[0].env"),
        ("env-value-with-nul", "plan.yaml", lambda d: d["groups"][0].update(env={"A": "a\0b"}),
         "groups[0].env.A: String should match"),
        ("memory-of-unknown-device", "plan.yaml", lambda d: d["estimates"]["memory_gb"].update(
            {"zz:cpu0": 1.0}), "estimates.memory_gb: unknown device zz:cpu0"),
        ("in-flight-of-unknown-device", "plan-skip.yaml", lambda d: d["skipping"]["in_flight"]
         .update({"zz:cpu0": 1}), "skipping.in_flight: unknown device zz:cpu0"),
        ("head-in-middle", "plan-skip.yaml", _head_in_middle,
         "replicas[0].stages: the first or the last stage, and only it, holds the head"),
        ("no-embedding", "plan.yaml", lambda d: d["stages"][0].update(holds=[]),
         "replicas[0].stages: the first stage, and only it, holds the embedding"),
        ("layers-gap", "plan.yaml", lambda d: d["stages"][1].update(layers=[5, 8]),
         "replicas[0].stages: layers do not cover 0..8 in order"),
        ("layers-beyond-model", "plan.yaml", lambda d: d["stages"][1].update(layers=[4, 9]),
         "stages[1].layers: [4, 9) is not inside [0, 8)"),
        ("replicas-split-differently", "plan.yaml", _split_replica_1,
         "replicas[1].stages: every replica splits the layers the same way"),
        ("fragments-above-sync-every", "plan.yaml", lambda d: d["diloco"].update(
            sync_every=2, overlap_steps=1, fragments=4), "diloco.fragments: 4 fragments need"),
        ("overlap-not-below-sync-every", "plan.yaml", lambda d: d["diloco"].update(
            overlap_steps=100), "diloco.overlap_steps: must be less than sync_every 100"),
        ("diloco-without-settings", "plan.yaml", lambda d: d.pop("diloco"),
         "diloco: needed exactly when sync is diloco"),
        ("stage-without-devices", "plan.yaml", lambda d: d["stages"][0].update(devices=[]),
         "stages[0].devices: List should have at least 1 item"),
        ("bad-sha", "plan.yaml", lambda d: d.update(topology_sha256="zz"),
         "topology_sha256: String should match"),
        ("device-not-in-topology", "plan.yaml", None,
         "launch[0].devices[1]: a1:cpu7 is not a device of a reachable host"),
        ("topology-changed", "plan.yaml", lambda d: d.update(topology_sha256="0" * 64),
         "topology_sha256: was made for topology 000000000000"),
        ("topology-file-missing", "plan.yaml", lambda d: d.update(topology_file="gone.yaml"),
         "gone.yaml: file not found"),
    ]
    cases = []
    for name, source, edit, expect in edits:
        if edit is None:  # a device renamed everywhere: consistent, but not in the topology
            content = base_files()[source].replace(b"a1:cpu1", b"a1:cpu7")
        else:
            content = edited(source, edit)
        names = "gone.yaml" if name == "topology-file-missing" else None
        cases.append((name, content, expect, names))
    return cases


def _drop_launch_device(data: dict[str, Any]) -> None:
    data["launch"][0]["devices"].pop()
    data["launch"][0]["nproc_per_node"] -= 1


def _extra_launch_device(data: dict[str, Any]) -> None:
    data["launch"][0]["devices"].append("a1:cpu9")
    data["launch"][0]["nproc_per_node"] += 1


def _origin_in_second_stage(data: dict[str, Any]) -> None:
    data["paths"][0]["origin"] = "a2:cpu0"
    data["paths"][0]["route"] = ["a2:cpu0"]


def _swap_launch_devices(data: dict[str, Any]) -> None:
    a, b = data["launch"][0], data["launch"][2]
    a["devices"], b["devices"] = b["devices"], a["devices"]


def _data_group_spans(data: dict[str, Any]) -> None:
    group = next(g for g in data["groups"] if g["kind"] == "data")
    group["ranks"] = [0, 3]


def _lane_group_kind(kind: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        lanes = [g for g in data["groups"] if g["kind"] in ("replica", "diloco")]
        (lanes or [g for g in data["groups"] if g["kind"] == "data"])[0]["kind"] = kind
    return edit


def _head_in_middle(data: dict[str, Any]) -> None:
    data["stages"][0]["holds"] = ["embedding"]
    data["stages"][1]["holds"] = ["head"]


def _split_replica_1(data: dict[str, Any]) -> None:
    second = [s for s in data["stages"] if s["replica"] == 1]
    second[0]["layers"] = [0, second[0]["layers"][1] - 1]
    second[1]["layers"] = [second[1]["layers"][0] - 1, second[1]["layers"][1]]


# ---------------------------------------------------------------- the table and the runner


@functools.cache
def all_cases() -> tuple[Case, ...]:
    cases = hosts_cases() + topology_cases("probe check") + topology_cases("plan topology")
    cases += model_cases() + lab_cases()
    for command in ("show", "simulate", "launch --dry-run"):
        cases += plan_cases(command)
    return tuple(cases)


def cases_of(command: str) -> list[Case]:
    return [case for case in all_cases() if case.command == command]


def counts() -> Counter[tuple[str, str]]:
    return Counter((case.command, case.klass) for case in all_cases())


def prepare(case: Case, folder: Path, port: int) -> list[str]:
    """Write the valid files with the case's change; the command line, ready to run."""
    for name, content in base_files().items():
        if name.startswith("plan-"):
            continue  # the other base plans are only the source of some cases' plan.yaml
        content = case.content if name == case.target and case.content is not None else content
        (folder / name).write_bytes(content.replace(PORT_MARK.encode(), str(port).encode()))
    (folder / "token").chmod(0o600)
    if case.setup is not None:
        case.setup(folder)
    argv = case.argv or command_argv(case.command)
    return [arg.replace("{d}", str(folder)) for arg in argv]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes, int]]:
    """Every entry under `folder`: its mode, its bytes (files), its mtime."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        found[str(path.relative_to(folder))] = (info.st_mode, data, info.st_mtime_ns)
    return found


def check(case: Case, folder: Path, port: int) -> list[str]:
    """Run `case` in-process in `folder`; what is wrong with the outcome (empty: nothing)."""
    argv = prepare(case, folder, port)
    before = snapshot(folder)
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    finally:
        os.chdir(cwd)
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    return judge(case, result.exit_code, result.stdout, result.stderr, exception) + \
        untouched(folder, before, cwd)


def untouched(folder: Path, before: dict[str, tuple[int, bytes, int]], cwd: Path) -> list[str]:
    problems = []
    if snapshot(folder) != before:
        problems.append("the folder changed (an input was touched or an output written)")
    if list(folder.rglob("PWNED*")) or list(cwd.glob("PWNED*")):
        problems.append("a hostile name ran a command (PWNED* exists)")
    return problems


def judge(case: Case, exit_code: int, stdout: str, stderr: str,
          exception: BaseException | None = None) -> list[str]:
    """Exit 2, one line 'error: ...' naming the file and what is wrong, nothing else."""
    problems = []
    if exception is not None:
        problems.append(f"raised {type(exception).__name__}: {exception}")
    if exit_code != 2:
        problems.append(f"exit status {exit_code}, expected 2")
    lines = stderr.splitlines()
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, expected 1")
    line = lines[0] if lines else ""
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    if not line.startswith("error: "):
        problems.append("the line does not start with 'error: '")
    names = case.names if case.names is not None else case.target
    if names and names not in line:
        problems.append(f"the line does not name {names}")
    if case.expect not in line:
        problems.append(f"the line does not say {case.expect!r}")
    if stdout:
        problems.append(f"stdout is not empty: {stdout[:200]!r}")
    if problems:
        problems.append(f"stderr: {stderr[:500]!r}")
    return problems


def listening_socket() -> socket.socket:
    """A loopback TCP listener the probe-run cases point their hosts at: a case refused
    before any network action leaves nothing in its accept queue."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def connections_made(sock: socket.socket) -> int:
    made = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return made
        conn.close()
        made += 1


def table(counted: Counter[tuple[str, str]]) -> str:
    """Cases per command (rows) and class (columns), with totals."""
    used = [k for k in CLASSES if any(counted[(c, k)] for c in COMMANDS)]
    width = max(len(c) for c in COMMANDS)
    lines = [" ".join([" " * width, *(f"{k:>12}" for k in used), f"{'total':>7}"])]
    for command in COMMANDS:
        row = [f"{counted[(command, k)]:>12}" for k in used]
        total = sum(counted[(command, k)] for k in used)
        lines.append(" ".join([f"{command:<{width}}", *row, f"{total:>7}"]))
    lines.append(f"{'all':<{width}} " + " " * (13 * len(used)) + f"{sum(counted.values()):>7}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(table(counts()) + "\n")
