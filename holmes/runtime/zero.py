"""ZeRO-1: each device of a stage keeps the optimizer state of its own share of the stage.

The planner's memory model (`holmes.costs.stage_memory(..., optimizer_shards=n)`) divides a
stage's optimizer state by its data-parallel width n; this module makes that true.
`StageShards` splits a stage's parameters into n shards, shard j owned by the stage's
lane j (its j-th device in the plan). One training step on the n devices of a stage:

1. `reduce_scatter_gradients()`: the gradients are summed over the data group and each
   device receives only the sum for the parameters it owns (one reduce-scatter of a flat
   buffer laid out shard by shard, each shard padded to the largest); lane j of every
   replica owns the same parameters, so replicas may average one shard per lane;
2. with ZeRO-1 (`restrict`), the optimizer steps over the owned parameters only, then
   `all_gather_parameters()` gives every device every owner's updated parameters;
   without sharding, `all_gather_gradients()` gives every device the whole summed
   gradient and the optimizer steps over everything.

Either way the stage moves 2(n-1)/n of its parameters per device and step, what the ring
all-reduce in the planner's estimate moves, and both ways sum every gradient in the same
order, so ZeRO-1 trains bit for bit the parameters the unsharded optimizer trains (an
all-reduce would sum in another order, and Adam turns the last-bit differences of a
gradient that is zero in exact arithmetic, like an attention key bias's, into full steps).

Shards are whole parameters, largest first to the least-loaded shard (LPT), so optimizers
that treat each tensor as a whole (Adam, LAMB's trust ratio, Adafactor's factored moments,
a factory's per-group settings such as no weight decay on biases) behave as unsharded,
and each shard is within one parameter of 1/n of the stage.

The trainer's factory is called once with every parameter of the rank (torch's optimizers
allocate their state at the first step, so this costs nothing); `restrict` then cuts its
`param_groups` to the owned parameters. Every group stays, with its hyperparameters, so
an lr schedule that loops over `param_groups` works unchanged, and that optimizer's
`state_dict()` / `load_state_dict()` are exactly this device's shard: each rank
checkpoints its own.

Why not `torch.distributed.optim.ZeroRedundancyOptimizer`: it expects every rank to hold
the all-reduced gradient and then broadcasts each parameter from its owner, 3(n-1)/n of the
stage per device and step instead of the 2(n-1)/n the plan promises; its `state_dict()`
first gathers every shard onto one rank (`consolidate_state_dict`), so the full state sits
in one process at every checkpoint; it is built from an optimizer class and keyword
arguments, not the trainer's factory; and `diloco.DiLoCo`, which saves its inner
optimizer's `state_dict()`, cannot call it without that consolidation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class ShardLayout:
    """Which shard owns each parameter (by position) and how many elements each has."""

    owner: tuple[int, ...]
    numel: tuple[int, ...]
    shards: int

    def owned(self, shard: int) -> list[int]:
        """Positions of the parameters `shard` owns, in parameter order."""
        return [i for i, s in enumerate(self.owner) if s == shard]

    def shard_numel(self, shard: int) -> int:
        return sum(self.numel[i] for i in self.owned(shard))

    @property
    def chunk(self) -> int:
        """Elements of the largest shard (every shard is padded to it on the wire)."""
        return max(1, max(self.shard_numel(s) for s in range(self.shards)))


def partition(numels: Sequence[int], shards: int) -> ShardLayout:
    """Whole parameters to `shards` shards: largest first, each to the least-loaded shard
    (ties: the lower shard, then the earlier parameter), so the result is the same on
    every rank and no shard is more than one parameter away from the mean."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    loads, owner = [0] * shards, [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        shard = min(range(shards), key=lambda s: (loads[s], s))
        owner[i], loads[shard] = shard, loads[shard] + numels[i]
    return ShardLayout(tuple(owner), tuple(numels), shards)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (what ZeRO-1 divides)."""
    return sum(value.numel() * value.element_size()
               for state in optimizer.state.values() for value in state.values()
               if isinstance(value, Tensor))


def restrict(optimizer: torch.optim.Optimizer,
             keep: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """Cut `optimizer` down to the parameters in `keep`: every group stays (perhaps empty),
    with its settings; state held for other parameters is dropped. Returns `optimizer`."""
    kept = {id(p) for p in keep}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in kept]
    for param in [p for p in optimizer.state if id(p) not in kept]:
        del optimizer.state[param]
    return optimizer


class StageShards:
    """The parameters of one stage in shards over its data group (see the module docstring).

    `lanes` lists the global rank of each shard's device, shard 0 first (default: the
    group's ranks in group order); every rank of `group` must be in it.
    """

    def __init__(self, params: Sequence[nn.Parameter], group: dist.ProcessGroup,
                 lanes: Sequence[int] | None = None) -> None:
        members = dist.get_process_group_ranks(group)
        self.lanes = list(lanes) if lanes is not None else members
        if sorted(self.lanes) != sorted(members):
            raise ValueError(f"lanes {self.lanes} are not the ranks {members} of the group")
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"a stage's parameters must share one dtype to be sharded, got "
                             f"{sorted(str(d) for d in dtypes)}")
        self.group, self.params = group, list(params)
        self.shard = self.lanes.index(dist.get_rank())
        self._shard_at = [self.lanes.index(rank) for rank in members]  # by group rank
        self.layout = partition([p.numel() for p in self.params], len(self.lanes))
        self._members = [[self.params[i] for i in self.layout.owned(s)]
                         for s in range(len(self.lanes))]
        self.owned = self._members[self.shard]

    @property
    def owned_numel(self) -> int:
        return self.layout.shard_numel(self.shard)

    @property
    def wire_bytes(self) -> int:
        """Bytes this device sends in one reduce-scatter or one all-gather (ring)."""
        sample = self.params[0]
        return (len(self.lanes) - 1) * self.layout.chunk * sample.element_size()

    def reduce_scatter_gradients(self) -> Tensor:
        """Sum the gradients over the group; keep only the owned ones, as views of the
        returned shard (its first `owned_numel` elements; the rest is padding), which a
        caller may still average across replicas in place."""
        send = torch.cat([self._padded(self._members[s], gradients=True)
                          for s in self._shard_at])
        mine = torch.empty(self.layout.chunk, dtype=send.dtype, device=send.device)
        dist.reduce_scatter_single(mine, send, group=self.group)
        self.keep_owned_gradients()
        for param, view in _views(mine, self.owned):
            param.grad = view
        return mine

    def keep_owned_gradients(self) -> None:
        """Drop the gradients of parameters another device owns."""
        owned = {id(p) for p in self.owned}
        for param in self.params:
            if id(param) not in owned:
                param.grad = None

    def all_gather_gradients(self, mine: Tensor) -> None:
        """Every device gets every owner's summed gradients; `mine`: what
        `reduce_scatter_gradients` returned (reduce-scatter + all-gather = all-reduce)."""
        gathered = self._all_gather(mine)
        for shard, part in zip(self._shard_at, gathered.split(self.layout.chunk), strict=True):
            for param, view in _views(part, self._members[shard]):
                param.grad = view

    @torch.no_grad()
    def all_gather_parameters(self) -> None:
        """Give every device the owners' updated parameters."""
        gathered = self._all_gather(self._padded(self.owned, gradients=False))
        for shard, part in zip(self._shard_at, gathered.split(self.layout.chunk), strict=True):
            for param, view in _views(part, self._members[shard]):
                param.copy_(view)

    def _all_gather(self, mine: Tensor) -> Tensor:
        gathered = torch.empty(len(self.lanes) * self.layout.chunk, dtype=mine.dtype,
                               device=mine.device)
        dist.all_gather_single(gathered, mine, group=self.group)
        return gathered

    @torch.no_grad()
    def _padded(self, params: list[nn.Parameter], gradients: bool) -> Tensor:
        """One shard's values (or gradients; none counts as zero) in a chunk-long vector."""
        sample = self.params[0]
        flat = torch.zeros(self.layout.chunk, dtype=sample.dtype, device=sample.device)
        for param, view in _views(flat, params):
            source = param.grad if gradients else param
            if source is not None:
                view.copy_(source)
        return flat


def _views(flat: Tensor, params: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(param, view of `flat` shaped like it), packing `params` from the start of `flat`."""
    pairs, offset = [], 0
    for param in params:
        pairs.append((param, flat[offset: offset + param.numel()].view_as(param)))
        offset += param.numel()
    return pairs
