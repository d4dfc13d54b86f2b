"""One WAN exchange per replica when several processes of a replica hold the same parameters.

A replica whose stage runs data parallel on k processes (k "lanes") holds k identical
copies of the stage's parameters, so every lane computes the same pseudo-gradient. If each
lane averaged it over its own cross-replica group, the slow link between the replicas
would carry the same bytes k times. A `SiteRelay` names the lanes of one replica (a group
inside the replica, on its fast links) and how they share one exchange:

- `lead`: lane 0 averages the whole pseudo-gradient over its cross-replica group, then
  broadcasts the fp32 average to the other lanes. The result is bit for bit what every
  lane got before (the same collective on the same payload), quantized or not.
- `sharded`: lane j averages the j-th of k equal slices over its cross-replica group
  (lane j of every replica holds slice j), then the lanes all-gather the averaged slices.
  Each slice is a whole number of the codec's blocks, so the quantized blocks are the
  whole vector's and the result is again the per-lane one bit for bit (fp32 sums of
  more than two replicas may differ in the last bit, as the backend's all-reduce
  orders them by chunk); each lane's share of the error feedback is all-gathered too,
  so every lane holds the whole residual. It is the faster of the two wherever the
  lanes' hosts reach the other replicas on paths of their own: each carries 1/k.

Either way the cross-replica links carry each pseudo-gradient once per replica. The
calls inside the replica are recorded in their own `SyncRecord` (kind `site`), so a
ledger tells the slow link's bytes (kind `sync`) from the fast one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from diloco.accounting import CountingComm, SyncRecord
from diloco.exchange import average_across_replicas
from diloco.quantize import Codec

RelayMode = Literal["lead", "sharded"]
RELAY_MODES: tuple[str, ...] = ("lead", "sharded")


@dataclass(frozen=True)
class SiteRelay:
    """The lanes of one replica that share an exchange. `group` holds exactly `lanes`
    (global ranks, in lane order: `lanes[0]` leads, lane j exchanges slice j); every lane
    of every replica must use the same `mode` and the same number of lanes."""

    group: dist.ProcessGroup
    lanes: tuple[int, ...]
    mode: RelayMode = "lead"

    def __post_init__(self) -> None:
        if self.mode not in RELAY_MODES:
            raise ValueError(f"SiteRelay.mode must be one of {RELAY_MODES}, got {self.mode!r}")
        if len(set(self.lanes)) != len(self.lanes) or len(self.lanes) < 2:
            raise ValueError(f"SiteRelay.lanes must be >= 2 distinct ranks, got {self.lanes}")

    @property
    def lane(self) -> int:
        """This process's lane."""
        return self.lanes.index(dist.get_rank())

    @property
    def leads(self) -> bool:
        return dist.get_rank() == self.lanes[0]


def relayed_average(values: torch.Tensor, codec: Codec, comm: CountingComm,
                    relay: SiteRelay, site: CountingComm, record: SyncRecord,
                    site_record: SyncRecord,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over replicas of the 1-D fp32 `values` (identical on every lane), with one
    cross-replica exchange per replica (see the module docstring). `comm` is this lane's
    cross-replica group, `site` the relay's group; `residual` as in
    `average_across_replicas`, filled on every lane."""
    if relay.mode == "lead":
        return _lead(values, codec, comm, relay, site, record, site_record, residual)
    return _sharded(values, codec, comm, relay, site, record, site_record, residual)


def _lead(values: torch.Tensor, codec: Codec, comm: CountingComm, relay: SiteRelay,
          site: CountingComm, record: SyncRecord, site_record: SyncRecord,
          residual: torch.Tensor | None) -> torch.Tensor:
    if relay.leads:
        average = average_across_replicas(values, codec, comm, record, residual)
    else:
        average = torch.empty_like(values, dtype=torch.float32)
    site.broadcast(average, site_record, src=relay.lanes[0])
    if residual is not None:
        site.broadcast(residual, site_record, src=relay.lanes[0])
    return average


def _sharded(values: torch.Tensor, codec: Codec, comm: CountingComm, relay: SiteRelay,
             site: CountingComm, record: SyncRecord, site_record: SyncRecord,
             residual: torch.Tensor | None) -> torch.Tensor:
    k, n, block = len(relay.lanes), values.numel(), max(1, getattr(codec, "block", 1))
    size = -(-n // (k * block)) * block  # whole blocks per slice: the whole vector's blocks
    padded = torch.zeros(size * k, dtype=torch.float32, device=values.device)
    padded[:n] = values
    lane = relay.lane
    own_residual = None if residual is None else torch.empty(size, device=values.device)
    mine = average_across_replicas(padded[lane * size:(lane + 1) * size], codec, comm, record,
                                   own_residual)
    average = _gather_in_lane_order(mine, relay, site, site_record)[:n]
    if residual is not None and own_residual is not None:
        residual.copy_(_gather_in_lane_order(own_residual, relay, site, site_record)[:n])
    return average


def _gather_in_lane_order(part: torch.Tensor, relay: SiteRelay, site: CountingComm,
                          record: SyncRecord) -> torch.Tensor:
    """Every lane's `part` (equal sizes), concatenated in lane order."""
    gathered = torch.empty(len(relay.lanes) * part.numel(), dtype=part.dtype,
                           device=part.device)
    site.all_gather(gathered, part.contiguous(), record)
    by_group_rank = gathered.view(len(relay.lanes), -1)
    order = [dist.get_group_rank(relay.group, rank) for rank in relay.lanes]
    return torch.cat([by_group_rank[i] for i in order])
