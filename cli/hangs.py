"""Finding a hung host from its workers' heartbeats (`holmes.heartbeat`).

This module owns the judgement; `cli.supervise` feeds it every heartbeat line as it
arrives and asks for a verdict on each poll. A rank is watched from its first heartbeat
until it says `state=done` or its host exits. Two ways to hang, both against the plan's
`launch_policy.hang_timeout_s`:

- silent: a rank sent no heartbeat at all for the timeout (stopped, frozen, or holding
  the interpreter): its host is hung.
- stalled: a rank's step did not move for the timeout. The clock starts only once the
  rank has reported its first finished step, so start-up (rendezvous, loading, the first
  step's warm-up) never counts however short the timeout. When one rank stalls the others
  usually stall with it, waiting for it in a collective, so the host named is the one
  that went silent first if any rank is silent for longer than `SILENT_HINT_S`, else the
  host(s) at the lowest step among the ranks idle for nearly as long (`STEP_SLACK_S`
  less: heartbeats come once a second, so the rank that stopped first may be heard
  stopping a moment after the ones that wait for it).

A script that never starts a heartbeat is never judged (there is nothing to go by).
Times are this machine's monotonic clock at arrival, so remote clocks do not matter.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from holmes.heartbeat import Beat

SILENT_HINT_S = 5.0
STEP_SLACK_S = 3.0


@dataclass
class RankBeats:
    """What the launcher knows of one rank: when it last beat, its step and since when."""

    rank: int
    host: str
    pid: int
    seen_at: float
    step: int
    first_step: int
    moved_at: float
    done: bool = False

    @property
    def armed(self) -> bool:
        return self.step != self.first_step


@dataclass(frozen=True)
class Hang:
    """The hosts judged hung and why, in one line."""

    hosts: tuple[str, ...]
    reason: str


@dataclass
class HangWatch:
    """Heartbeats of every rank of a launch, fed from reader threads (thread-safe)."""

    timeout_s: float
    ranks: dict[int, RankBeats] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, host: str, beat: Beat, now: float) -> None:
        with self.lock:
            known = self.ranks.get(beat.rank)
            if known is None or known.pid != beat.pid:  # first beat, or a restarted worker
                self.ranks[beat.rank] = RankBeats(beat.rank, host, beat.pid, now, beat.step,
                                                  beat.step, now, beat.done)
                return
            known.seen_at, known.done = now, beat.done
            if beat.step != known.step:
                known.step, known.moved_at = beat.step, now

    def verdict(self, now: float, running: set[str]) -> Hang | None:
        """A hang among the ranks of the hosts in `running`, or None."""
        with self.lock:
            watched = [r for _, r in sorted(self.ranks.items())
                       if r.host in running and not r.done]
        silent = [r for r in watched if now - r.seen_at > self.timeout_s]
        if silent:
            return self._silent_hang(silent, now)
        stalled = [r for r in watched if r.armed and now - r.moved_at > self.timeout_s]
        if not stalled:
            return None
        quiet = [r for r in watched if now - r.seen_at > SILENT_HINT_S]
        if quiet:
            return self._silent_hang(quiet, now)
        idle = [r for r in watched
                if r.armed and now - r.moved_at > self.timeout_s - STEP_SLACK_S]
        lowest = min(r.step for r in idle)
        behind = [r for r in idle if r.step == lowest]
        hosts = tuple(dict.fromkeys(r.host for r in behind))
        oldest, first = min(stalled, key=lambda r: r.moved_at), behind[0]
        return Hang(hosts, f"no progress for {now - oldest.moved_at:.0f} s (hang timeout "
                    f"{self.timeout_s:g} s): rank {first.rank} (pid {first.pid}) is "
                    f"stuck after step {first.step} while still beating: waiting in a "
                    "collective or on its device")

    def _silent_hang(self, silent: list[RankBeats], now: float) -> Hang:
        first = min(silent, key=lambda r: r.seen_at)
        hosts = tuple(dict.fromkeys(r.host for r in sorted(silent, key=lambda r: r.seen_at)))
        return Hang(hosts, f"rank {first.rank} (pid {first.pid}) sent no heartbeat for "
                    f"{now - first.seen_at:.0f} s (hang timeout {self.timeout_s:g} s): "
                    f"stopped or frozen after step {first.step}")
