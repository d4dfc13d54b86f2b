"""Hostile input files for probe run, probe check, plan and lab up: each refused cleanly.

The cases come from `hostile_cases` (the fuzzer's table); each runs in-process and must
exit 2 with one line naming the file, no traceback, no output, inputs unchanged. The
probe-run cases point their hosts at a loopback listener of this test and must leave it
untouched (refused before any network action). A few cases also run through the real
`hetsched` entry point, and the lab-rate cases through a real `lab up` (a root test:
run it under the lab lock) that must refuse them before creating any namespace.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostile_cases import (
    APPLIES,
    CLASSES,
    COMMANDS,
    Case,
    all_cases,
    cases_of,
    check,
    connections_made,
    counts,
    judge,
    listening_socket,
    prepare,
    snapshot,
    table,
    untouched,
)
from lab_support import root

FILE_COMMANDS = ("probe run", "probe check", "plan topology", "plan model", "lab up")


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    sock = listening_socket()
    yield sock
    sock.close()


@pytest.mark.parametrize("case", [c for c in all_cases() if c.command in FILE_COMMANDS],
                         ids=lambda c: c.id)
def test_hostile_file_is_refused(case: Case, tmp_path: Path, listener: socket.socket) -> None:
    problems = check(case, tmp_path, listener.getsockname()[1])
    assert not problems, "\n".join(problems)
    if case.command == "probe run":
        assert connections_made(listener) == 0, "probe run reached the network"


def test_the_table_covers_every_command_and_class() -> None:
    counted = counts()
    missing = [(command, klass) for command in COMMANDS for klass in APPLIES[command]
               if counted[(command, klass)] == 0]
    assert not missing
    assert {klass for _, klass in counted} == set(CLASSES)
    assert all(sum(counted[(command, k)] for k in CLASSES) >= 100 for command in COMMANDS)
    report = os.environ.get("HETSCHED_HOSTILE_COUNTS")
    if report:
        Path(report).write_text(json.dumps(
            {command: {k: counted[(command, k)] for k in CLASSES if counted[(command, k)]}
             for command in COMMANDS}, indent=2))
    print(table(counted))


def entry_point() -> list[str]:
    installed = Path(sys.executable).parent / "hetsched"
    return [str(installed)] if installed.exists() else [sys.executable, "-m", "cli"]


def first_of(command: str, klass: str) -> Case:
    return next(c for c in cases_of(command) if c.klass == klass)


REAL_CASES = [first_of(c, k) for c, k in (
    ("probe run", "address"), ("probe run", "output"), ("probe check", "dup-key"),
    ("plan topology", "nonfinite"), ("plan model", "size"), ("plan topology", "output"),
    ("show", "plan-xcheck"), ("simulate", "plan-xcheck"), ("launch --dry-run", "script"),
    ("lab up", "lab-rate"), ("show", "output"), ("simulate", "model-source"))]


@pytest.mark.parametrize("case", REAL_CASES, ids=lambda c: c.id)
def test_the_real_entry_point_refuses(case: Case, tmp_path: Path,
                                      listener: socket.socket) -> None:
    argv = prepare(case, tmp_path, listener.getsockname()[1])
    before = snapshot(tmp_path)
    done = subprocess.run([*entry_point(), *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    problems = judge(case, done.returncode, done.stdout, done.stderr)
    problems += untouched(tmp_path, before, tmp_path)
    assert not problems, "\n".join(problems)
    assert connections_made(listener) == 0


def lab_namespaces(lab: str) -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in done.stdout.splitlines()
            if line.startswith(f"hs-{lab}-")}


@root
@pytest.mark.parametrize("case", [c for c in cases_of("lab up") if c.klass == "lab-rate"][::3],
                         ids=lambda c: c.id)
def test_real_lab_up_refuses_bad_rates_before_any_namespace(case: Case, tmp_path: Path) -> None:
    """A real `lab up` (root: run under the lab lock like every root test). Were a case
    not refused, it would build lab 'hfz'; it is taken down again and the test fails."""
    argv = [a for a in prepare(case, tmp_path, 0) if a != "--dry-run"]
    done = subprocess.run([*entry_point(), *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    built = lab_namespaces("hfz")
    if done.returncode == 0 or built:
        subprocess.run([*entry_point(), "lab", "down", "hfz"], check=False)
    assert not judge(case, done.returncode, done.stdout, done.stderr)
    assert not built
