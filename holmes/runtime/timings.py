"""Timings of a run: what each rank did in each step, and when, as JSON lines.

A `Timings` recorder is handed to the pipeline runtime and the trainer; they call
`task`, `recv`, `send` and `sync` around the work they do, and the trainer calls
`end_step` once per optimizer step, which appends one JSON line to
`FOLDER/rank{R}.jsonl`:

    {"rank": 0, "node": "h1:cpu0", "host": "h1", "stage": 0, "step": 3,
     "start": t0, "end": t1,                       # the whole optimizer step
     "tasks": [["forward", mb, start, end], ...],  # forward / loss / backward
     "recv": [[peer, mb, "activation", bytes, start, end], ...],  # a blocking receive
     "send": [[peer, mb, "activation", bytes, issued], ...],      # an isend, when issued
     "syncs": [["data", bytes, start, end], ...],  # data / replica / diloco / zero
     "bytes": {"intra_site": n, ...}}              # bytes sent this step per link class

Times are `time.time()` seconds (one clock on one machine, NTP-close across hosts), so a
receive's transfer time is its end less the later of its start and the matching send's
`issued` (see `hetsched calibrate`). Recording is a few list appends per task; with
`Timings(None)` (recording off) every call returns at once. Lines are buffered and
written every `flush_every` steps and at `close`. Nothing here prints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TIMINGS_FOLDER = "timings"
TIMINGS_ENV = "HETSCHED_TIMINGS"  # a folder, or "off"


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.jsonl"


class Timings:
    """One rank's recorder (see the module docstring); `folder=None` records nothing."""

    def __init__(self, folder: str | Path | None, *, rank: int = 0,
                 identity: dict[str, Any] | None = None, flush_every: int = 20) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.enabled = folder is not None
        self._path = rank_file(Path(folder), rank) if folder is not None else None
        self._identity = {"rank": rank, **(identity or {})}
        self._flush_every = flush_every
        self._lines: list[str] = []
        self._new_step()
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._path.write_text("")  # a restarted rank starts its file again

    def _new_step(self) -> None:
        self.tasks: list[list[Any]] = []
        self.recvs: list[list[Any]] = []
        self.sends: list[list[Any]] = []
        self.syncs: list[list[Any]] = []
        self._start = time.time()

    # ---- recording hooks (cheap: one clock read and an append)

    def start_step(self) -> None:
        if self.enabled:
            self._new_step()

    def task(self, kind: str, microbatch: int, start: float) -> None:
        if self.enabled:
            self.tasks.append([kind, microbatch, start, time.time()])

    def recv(self, peer: int, microbatch: int, kind: str, nbytes: int, start: float) -> None:
        if self.enabled:
            self.recvs.append([peer, microbatch, kind, nbytes, start, time.time()])

    def send(self, peer: int, microbatch: int, kind: str, nbytes: int) -> None:
        if self.enabled:
            self.sends.append([peer, microbatch, kind, nbytes, time.time()])

    @contextmanager
    def sync(self, what: str, nbytes: int = 0) -> Iterator[None]:
        """Times the collective run inside the `with` (data, replica, diloco or zero)."""
        start = time.time()
        yield
        if self.enabled:
            self.syncs.append([what, nbytes, start, time.time()])

    def end_step(self, step: int, bytes_per_class: dict[str, int]) -> None:
        if not self.enabled:
            return
        line = {**self._identity, "step": step, "start": self._start, "end": time.time(),
                "tasks": self.tasks, "recv": self.recvs, "send": self.sends,
                "syncs": self.syncs, "bytes": bytes_per_class}
        self._lines.append(json.dumps(line, separators=(",", ":")))
        if len(self._lines) >= self._flush_every:
            self.flush()
        self._new_step()

    def flush(self) -> None:
        if self._path is not None and self._lines:
            with self._path.open("a") as handle:
                handle.write("\n".join(self._lines) + "\n")
            self._lines = []

    def close(self) -> None:
        self.flush()


def now() -> float:
    """The recorder's clock (for a hook's `start`)."""
    return time.time()


def read_timings(folder: str | Path) -> list[dict[str, Any]]:
    """Every recorded step line of every rank in `folder` (rank, then step order)."""
    lines: list[dict[str, Any]] = []
    for path in sorted(Path(folder).glob("rank*.jsonl")):
        for text in path.read_text().splitlines():
            if text.strip():
                lines.append(json.loads(text))
    return sorted(lines, key=lambda line: (line["rank"], line["step"]))
