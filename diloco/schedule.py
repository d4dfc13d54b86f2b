"""SyncSchedule: at which inner step each fragment's exchange starts and when it is merged.

Steps count completed inner optimizer steps, from 1. Fragment p *starts* an exchange after
inner step t when t % H == offset(p), offset(p) = p * H // P (so plain DiLoCo, P = 1,
syncs after steps H, 2H, ...; fragment 1 of 4 with H = 100 after steps 25, 125, ...).
The exchange runs in the background for tau = overlap_steps inner steps and is *merged*
after inner step t + tau. With tau = 0 the merge happens in the same step as the start.
Because tau < H a fragment is always merged before it starts again, and because H >= P
no two fragments start at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyncEvent:
    fragment: int
    start_step: int
    merge_step: int


@dataclass(frozen=True)
class SyncSchedule:
    sync_every: int
    fragments: int = 1
    overlap_steps: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.fragments <= self.sync_every:
            raise ValueError("need 1 <= fragments <= sync_every")
        if not 0 <= self.overlap_steps < self.sync_every:
            raise ValueError("need 0 <= overlap_steps < sync_every")

    def offset(self, fragment: int) -> int:
        return fragment * self.sync_every // self.fragments

    def starting(self, step: int) -> list[int]:
        """Fragments whose exchange starts after inner step `step`."""
        if step < 1:
            return []
        phase = step % self.sync_every
        return [p for p in range(self.fragments) if self.offset(p) == phase]

    def merging(self, step: int) -> list[int]:
        """Fragments whose exchange is merged after inner step `step`."""
        return self.starting(step - self.overlap_steps)

    def events(self, last_step: int) -> list[SyncEvent]:
        """Every exchange that starts at or before `last_step`, in start order."""
        return [
            SyncEvent(p, t, t + self.overlap_steps)
            for t in range(1, last_step + 1)
            for p in self.starting(t)
        ]

    def in_flight_after(self, step: int) -> list[int]:
        """Fragments started but not yet merged once inner step `step` is processed."""
        started = range(max(step - self.overlap_steps + 1, 1), step + 1)
        return [p for t in started for p in self.starting(t)]
