"""Heartbeats from a training process to the launcher that started it.

This module owns the heartbeat line, both ends of it. A worker started by
`hetsched launch` finds `HETSCHED_HEARTBEAT_S` in its environment; `Heartbeat.from_env()`
then starts a daemon thread that writes one line to the process's stderr (fd 2) every
that many seconds:

    @hetsched-beat rank=3 step=17 pid=4242

`step` counts the steps the training loop reported with `progress()`; `state=done` (sent
by `close()`) says the process ended its training on purpose and is watched no more.
stderr reaches the launcher on every route (a pipe locally and in the lab, ssh's stream
over ssh), so heartbeats need no port, no shared folder and no clock agreement: the
launcher times them by arrival. The launcher drops these lines from the output it shows.

Two signals come out of it: the thread beats while the process is scheduled (a stopped or
frozen process goes silent, whatever its main thread does), and `step` moves while the
training loop makes progress (a process stuck in a collective still beats, at a step that
does not move). `cli.hangs` judges them. Without the variable (a plain torchrun) the
heartbeat does nothing. This module has no torch import: the launcher parses with it.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import suppress
from dataclasses import dataclass, field

HEARTBEAT_ENV = "HETSCHED_HEARTBEAT_S"
MARKER = "@hetsched-beat "
DEFAULT_EVERY_S = 1.0
_BEAT = re.compile(r"@hetsched-beat rank=(\d+) step=(\d+) pid=(\d+)( state=done)?")


@dataclass(frozen=True)
class Beat:
    """One heartbeat line as the launcher reads it."""

    rank: int
    step: int
    pid: int
    done: bool = False

    def line(self) -> str:
        done = " state=done" if self.done else ""
        return f"{MARKER}rank={self.rank} step={self.step} pid={self.pid}{done}"


def split_beat(text: str) -> tuple[str, Beat | None]:
    """A line of output -> (the text that is not a heartbeat, the heartbeat if any).

    A heartbeat written after a partial line of the worker's own (no newline yet) ends up
    behind that text: the text is kept, the heartbeat taken off its end."""
    at = text.find(MARKER)
    if at < 0:
        return text, None
    match = _BEAT.match(text, at)
    if match is None:
        return text, None
    rank, step, pid, done = match.groups()
    return text[:at] + text[match.end():], Beat(int(rank), int(step), int(pid), done is not None)


@dataclass
class Heartbeat:
    """A worker's heartbeat thread; `progress(step)` after each training step."""

    rank: int
    every_s: float
    step: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, rank: int | None = None) -> Heartbeat | None:
        """Started when the launcher asked for heartbeats (`HETSCHED_HEARTBEAT_S`), else None.
        `rank` defaults to torchrun's RANK."""
        every = os.environ.get(HEARTBEAT_ENV)
        if not every:
            return None
        try:
            every_s = float(every)
        except ValueError:
            every_s = DEFAULT_EVERY_S
        if not 0 < every_s < 3600:
            every_s = DEFAULT_EVERY_S
        beat = cls(rank if rank is not None else int(os.environ.get("RANK", "0")), every_s)
        beat.start()
        return beat

    def start(self) -> None:
        self._send(done=False)
        self._thread = threading.Thread(target=self._run, name="hetsched-heartbeat", daemon=True)
        self._thread.start()

    def progress(self, step: int) -> None:
        """The training loop finished `step` steps (any number that grows)."""
        self.step = step

    def close(self) -> None:
        """Training ended on purpose: one last `state=done` line, then silence."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.every_s)
        self._send(done=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._send(done=False)

    def _send(self, *, done: bool) -> None:
        line = Beat(self.rank, self.step, os.getpid(), done).line() + "\n"
        with self._lock, suppress(OSError):
            os.write(2, line.encode())  # one write: whole lines on a pipe
