"""Running every host's command at once and stopping them all when one fails.

This module owns the life of a launch: each host's command starts in its own process
group (argv lists, never a shell) under a keeper (`cli.keeper`: it stops everything the
command started when the launcher dies, even by SIGKILL, and otherwise ends as the
command does), its stdout and stderr lines stream through with a `[host] ` prefix, and
the processes are polled every `poll_s`. The first host that exits non-zero or by a
signal is the failure: the others get SIGTERM (torchrun passes it on to its workers),
and whatever still runs after `grace_s` gets SIGKILL, including workers that torchrun
started in sessions of their own. Ctrl-C or SIGTERM to the launcher stops everything the
same way. The outcome names the failed host and why; when torchrun's failure summary
says which exit status its worker ended with (the root cause), the launch ends with that
status (a worker's `sys.exit(2)` makes the launch exit 2), else with 1.

Heartbeat lines (`holmes.heartbeat`) are taken out of the stream and fed to a
`cli.hangs.HangWatch`; when it judges a host hung (no heartbeat, or no progress, for
`hang_timeout_s`), that host is the failure: its processes get SIGKILL at once (a stopped
process cannot act on SIGTERM), the others are stopped as above.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import IO, TextIO

import psutil

from cli.hangs import Hang, HangWatch
from cli.torchrun import HostCommand
from holmes.heartbeat import split_beat

POLL_S = 0.2
GRACE_S = 5.0
HANG_TIMEOUT_S = 60.0
SNAPSHOT_EVERY_S = 1.0
READER_JOIN_S = 2.0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
ROOT_CAUSE = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid")


class Interrupted(Exception):
    """The launcher itself was asked to stop (Ctrl-C, SIGTERM)."""


@dataclass
class Printer:
    """Prefixed, line-at-a-time output shared by the reader threads."""

    out: TextIO
    err: TextIO
    lock: threading.Lock = field(default_factory=threading.Lock)

    def line(self, text: str, *, error: bool = False) -> None:
        stream = self.err if error else self.out
        with self.lock:
            stream.write(text + "\n")
            stream.flush()

    def note(self, text: str) -> None:
        self.line(f"[launch] {text}", error=True)


@dataclass
class HostProcess:
    """One started host: its process, its reader threads, the descendants seen so far."""

    command: HostCommand
    process: subprocess.Popen[bytes]
    readers: list[threading.Thread]
    descendants: dict[int, psutil.Process] = field(default_factory=dict)
    stopped: bool = False

    @property
    def host(self) -> str:
        return self.command.host

    def snapshot(self) -> None:
        """Remember the process tree, so workers outlive nothing if torchrun itself dies."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            self.descendants.setdefault(child.pid, child)


@dataclass(frozen=True)
class HostResult:
    host: str
    returncode: int | None
    stopped: bool

    def describe(self) -> str:
        if self.returncode is None:
            return "did not start"
        if self.stopped and self.returncode != 0:
            return f"stopped by the launcher ({exit_reason(self.returncode)})"
        return "finished" if self.returncode == 0 else exit_reason(self.returncode)


@dataclass(frozen=True)
class Outcome:
    """How the launch ended: every host's result, the failed host and why, if any."""

    results: tuple[HostResult, ...]
    failed_host: str | None = None
    reason: str = ""
    interrupted: bool = False
    hung: tuple[str, ...] = ()
    worker_exit: int | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.failed_host is None:
            return 0
        return self.worker_exit or EXIT_FAILED


@dataclass
class RootCauses:
    """The exit status torchrun's failure summary gives as the root cause, per host.

    The summary lists `exitcode : N (pid: P)` for each failed worker, the root cause
    after a `Root Cause` line; a negative N (a signal) is not an exit status."""

    statuses: dict[str, int] = field(default_factory=dict)
    after_header: set[str] = field(default_factory=set)

    def feed(self, host: str, text: str) -> None:
        if "Root Cause" in text:
            self.after_header.add(host)
            return
        match = ROOT_CAUSE.search(text)
        if match and host in self.after_header and host not in self.statuses:
            self.statuses[host] = int(match.group(1))

    def status(self, host: str | None) -> int | None:
        code = self.statuses.get(host or "")
        return code if code is not None and 0 < code < 256 else None


Watchers = tuple[HangWatch, RootCauses]


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit status {returncode}"


def supervise(commands: Sequence[HostCommand], printer: Printer, *, poll_s: float = POLL_S,
              grace_s: float = GRACE_S, hang_timeout_s: float = HANG_TIMEOUT_S) -> Outcome:
    """Run every host's command until all succeed, one fails or hangs, or the launcher is
    stopped."""
    running: list[HostProcess] = []
    watch, causes = HangWatch(hang_timeout_s), RootCauses()
    failed_host, reason, interrupted, hang = None, "", False, None
    try:
        with _stop_on_signals():
            failed_host, reason = _start_all(commands, printer, running, (watch, causes))
            failed = _watch(running, poll_s, watch) if failed_host is None else None
            if isinstance(failed, Hang):
                hang, failed_host, reason = failed, ", ".join(failed.hosts), failed.reason
                _kill_hosts(running, set(failed.hosts))
            elif failed is not None:
                failed_host, reason = failed.host, exit_reason(failed.process.returncode)
    except Interrupted as exc:
        interrupted, reason = True, f"the launcher got {exc}"
    except KeyboardInterrupt:
        interrupted, reason = True, "the launcher was interrupted (Ctrl-C)"
    finally:
        _stop_all(running, grace_s, printer)
    results = {hp.host: HostResult(hp.host, hp.process.returncode, hp.stopped) for hp in running}
    worker_exit = None if hang or interrupted else causes.status(failed_host)
    if worker_exit is not None:
        reason += f" (its worker exited with status {worker_exit})"
    return Outcome(
        tuple(results.get(c.host, HostResult(c.host, None, False)) for c in commands),
        failed_host, reason, interrupted, hang.hosts if hang else (), worker_exit)


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Interrupted` while supervising (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _start_all(commands: Sequence[HostCommand], printer: Printer,
               running: list[HostProcess], watchers: Watchers) -> tuple[str | None, str]:
    """Start every host into `running`; on a command that cannot start: its host and why."""
    for command in commands:
        try:
            running.append(_start(command, printer, watchers))
        except OSError as exc:
            return command.host, f"cannot start {command.argv[0]}: {exc}"
    return None, ""


def _start(command: HostCommand, printer: Printer, watchers: Watchers) -> HostProcess:
    env = {**os.environ, **command.popen_env}
    if shutil.which(command.argv[0], path=env.get("PATH")) is None:
        raise FileNotFoundError(f"{command.argv[0]}: not found")
    keeper = [sys.executable, "-m", "cli.keeper", "--", *command.argv]
    process = subprocess.Popen(keeper, env=env, stdin=subprocess.PIPE,  # closed if we die
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    printer.note(f"{command.host}: started (pid {process.pid})")
    assert process.stdout is not None and process.stderr is not None
    readers = [_reader(process.stdout, command.host, printer, watchers, error=False),
               _reader(process.stderr, command.host, printer, watchers, error=True)]
    return HostProcess(command, process, readers)


def _reader(pipe: IO[bytes], host: str, printer: Printer, watchers: Watchers, *,
            error: bool) -> threading.Thread:
    watch, causes = watchers

    def pump() -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                text, beat = split_beat(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                if beat is not None:
                    watch.feed(host, beat, time.monotonic())
                if beat is None or text:
                    causes.feed(host, text)
                    printer.line(f"[{host}] {text}", error=error)

    thread = threading.Thread(target=pump, name=f"launch-{host}-{'err' if error else 'out'}",
                              daemon=True)
    thread.start()
    return thread


def _watch(running: list[HostProcess], poll_s: float,
           watch: HangWatch) -> HostProcess | Hang | None:
    """Poll until every host exited 0 (None), one failed (that host) or hung (the hang)."""
    last_snapshot = 0.0
    while True:
        now = time.monotonic()
        if now - last_snapshot >= SNAPSHOT_EVERY_S:
            for hp in running:
                hp.snapshot()
            last_snapshot = now
        codes = [hp.process.poll() for hp in running]
        for hp, code in zip(running, codes, strict=True):
            if code is not None and code != 0:
                return hp
        if all(code == 0 for code in codes):
            return None
        hang = watch.verdict(time.monotonic(),
                             {hp.host for hp, code in zip(running, codes, strict=True)
                              if code is None})
        if hang is not None:
            return hang
        time.sleep(poll_s)


def _kill_hosts(running: list[HostProcess], hosts: set[str]) -> None:
    """SIGKILL the hung hosts' process groups and every descendant seen."""
    for hp in running:
        if hp.host in hosts and hp.process.poll() is None:
            hp.stopped = True
            hp.snapshot()
            _signal_group(hp.process.pid, signal.SIGKILL)
            for child in hp.descendants.values():
                _kill(child)


def _stop_all(running: list[HostProcess], grace_s: float, printer: Printer) -> None:
    """SIGTERM every process group still alive, SIGKILL what remains after `grace_s`."""
    for hp in running:
        if hp.process.poll() is None:
            hp.stopped = True
            hp.snapshot()
            _signal_group(hp.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for hp in running:
        try:
            hp.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            printer.note(f"{hp.host}: still running after {grace_s:g} s, killing it")
    for hp in running:
        if hp.stopped or hp.process.poll() != 0:
            _signal_group(hp.process.pid, signal.SIGKILL)
        for child in hp.descendants.values():
            _kill(child)
        hp.process.wait()
    for hp in running:
        for reader in hp.readers:
            reader.join(timeout=READER_JOIN_S)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _kill(process: psutil.Process) -> None:
    with suppress(psutil.Error):
        process.kill()


def report(outcome: Outcome, printer: Printer) -> None:
    """One line per host, then the verdict."""
    for result in outcome.results:
        printer.note(f"{result.host}: {result.describe()}")
    if outcome.interrupted:
        printer.note(f"stopped every host: {outcome.reason}")
    elif outcome.hung:
        noun = "host" if len(outcome.hung) == 1 else "hosts"
        printer.note(f"{noun} {', '.join(outcome.hung)} hung: {outcome.reason}; "
                     "stopped the other hosts")
    elif outcome.failed_host is not None:
        printer.note(f"host {outcome.failed_host} failed: {outcome.reason}; "
                     "stopped the other hosts")
    else:
        count = len(outcome.results)
        printer.note(f"all {count} hosts finished" if count > 1 else "the host finished")


def stdio_printer() -> Printer:
    return Printer(sys.stdout, sys.stderr)
