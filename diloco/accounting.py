"""Byte accounting: what this rank handed to `torch.distributed`, per sync event.

`CountingComm` is the only door to the collectives: it calls `torch.distributed` and
records, per call, the bytes of the input tensor it handed over (`sent`) and of the output
tensor the collective filled (`received`). Nothing is derived from formulas; an
all-reduce of an N-byte tensor counts N sent and N received, an all-gather of an n-byte
shard into a W*n-byte buffer counts n sent and W*n received (own slot included), an
all-to-all of an n-byte buffer counts n and n.

A `SyncRecord` gathers the calls of one exchange (one fragment, one start step);
`ByteLedger` keeps the records and answers totals, per-fragment sums, the peak per sync
event, and bytes per inner step. Records are written by the exchange thread and should be
read once the exchanges they describe have been merged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class SyncRecord:
    """The collectives of one exchange: `kind` is "sync" (a fragment) or another label."""

    kind: str
    fragment: int
    step: int
    sent: int = 0
    received: int = 0
    calls: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.sent + self.received

    def add(self, op: str, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received
        self.calls.append((op, sent, received))


@dataclass(frozen=True)
class LedgerSummary:
    syncs: int
    sent: int
    received: int
    peak_sync_sent: int
    peak_sync_total: int
    per_fragment: dict[int, tuple[int, int]]

    @property
    def total(self) -> int:
        return self.sent + self.received

    def per_inner_step(self, inner_steps: int) -> float:
        """Bytes sent plus received per inner step."""
        return self.total / max(inner_steps, 1)


class ByteLedger:
    """Every `SyncRecord` this rank opened, in order."""

    def __init__(self) -> None:
        self._records: list[SyncRecord] = []
        self._lock = threading.Lock()

    def open(self, kind: str, fragment: int, step: int) -> SyncRecord:
        record = SyncRecord(kind=kind, fragment=fragment, step=step)
        with self._lock:
            self._records.append(record)
        return record

    def records(self, kind: str | None = "sync") -> list[SyncRecord]:
        with self._lock:
            return [r for r in self._records if kind is None or r.kind == kind]

    def summary(self, kind: str | None = "sync") -> LedgerSummary:
        records = self.records(kind)
        per_fragment: dict[int, tuple[int, int]] = {}
        for r in records:
            sent, received = per_fragment.get(r.fragment, (0, 0))
            per_fragment[r.fragment] = (sent + r.sent, received + r.received)
        return LedgerSummary(
            syncs=len(records),
            sent=sum(r.sent for r in records),
            received=sum(r.received for r in records),
            peak_sync_sent=max((r.sent for r in records), default=0),
            peak_sync_total=max((r.total for r in records), default=0),
            per_fragment=dict(sorted(per_fragment.items())),
        )


class CountingComm:
    """Blocking collectives on `group` that record their tensors' bytes in a record."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call init_process_group first"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_to_all(self, output: torch.Tensor, data: torch.Tensor, record: SyncRecord) -> None:
        record.add("all_to_all_single", _nbytes(data), _nbytes(output))
        dist.all_to_all_single(output, data, group=self.group)

    def all_gather(self, output: torch.Tensor, data: torch.Tensor, record: SyncRecord) -> None:
        record.add("all_gather", _nbytes(data), _nbytes(output))
        _all_gather_single(output, data, group=self.group)

    def all_reduce(self, tensor: torch.Tensor, record: SyncRecord) -> None:
        record.add("all_reduce", _nbytes(tensor), _nbytes(tensor))
        dist.all_reduce(tensor, group=self.group)

    def broadcast(self, tensor: torch.Tensor, record: SyncRecord, src: int | None = None) -> None:
        """Broadcast from global rank `src` (default: group rank 0)."""
        if src is None:
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        is_source = dist.get_rank() == src
        record.add(
            "broadcast", _nbytes(tensor) if is_source else 0, 0 if is_source else _nbytes(tensor)
        )
        dist.broadcast(tensor, src=src, group=self.group)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
