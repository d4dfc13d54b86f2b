"""The training loop of one rank under a plan: pipeline step, syncs, logs, checkpoints.

`Trainer(run, model, make_optimizer, ...)` (`run`: a `holmes.runtime.PlanRun`) runs one
optimizer step per `step(batches)`:

1. `skippipe.runtime.PipelineRuntime.step`: this rank's forwards, losses and backwards
   along the plan's routes; each stage's gradients are summed over the stage's devices
   (the plan's `data` group) so every device of a stage holds the replica's gradient of
   its mean loss (with ZeRO-1, only the part of it for the parameters it owns);
2. between replicas, by the plan's `sync`: `allreduce` averages the gradients every
   step, each lane one shard over its `replica` group (then broadcast in the stage when
   every device needs the whole gradient), weighted by each replica's microbatches so
   the step's gradient is the mean over the global batch; `diloco` hands the parameters
   to `diloco.DiLoCo` over the `diloco` group after the inner optimizer step, weighted
   the same way. A stage of k lanes holds k identical copies of its parameters, so the
   lanes share one exchange across the WAN (`PlanRun.relay`, by the plan's
   `diloco.exchange`: each lane exchanges 1/k and they all-gather, or lane 0 exchanges
   and broadcasts in the stage), not one each; devices beyond the narrowest
   replica's lanes copy the merged parameters from lane 0 of their stage;
3. the optimizer step, by the plan's `optimizer.sharding`: `none` steps the factory's
   optimizer over all of the rank's parameters; `zero1` (`holmes.runtime.zero`) steps
   it over the parameters this device owns in its stage's data group and then gathers
   every owner's parameters, so each device holds 1/n of its stage's optimizer state;
4. every `log_every` steps rank 0 prints the mean loss, tokens/s and the bytes this job
   sent per link class (pipeline P2P as counted, ring all-reduce as 2(n-1)/n of the
   payload, reduce-scatter and all-gather as (n-1)/n each, DiLoCo as its ledger says:
   its cross-replica calls in the `diloco` group's class, its relay's in the stage's;
   classes from the plan's topology: intra_host, intra_site, inter_site);
5. every `checkpoint_every` steps (at the first step after it where no DiLoCo exchange is
   in flight) the ranks write the step to `CHECKPOINT_DIR/step-NNNNNNNN/`, each entry
   once and by parameter name (`holmes.runtime.train_state`: weights by lane 0 of replica
   0, optimizer state by its ZeRO-1 owner; DiLoCo's replicas each their own), with a
   manifest of checksums written last (`holmes.runtime.checkpoints`), keeping the last
   two. On start the newest step that every rank can read intact is loaded, from
   CHECKPOINT_DIR or else from `resume_from` (a run of another plan: another stage
   count, layer split or data-parallel width; by default the environment's
   `HETSCHED_RESUME_FROM`, so a launcher can hand it to every rank of any script), so a
   torchrun restart continues the same run and a new plan continues an old one.
6. with `timings` (a folder), every rank appends one JSON line per step to
   `timings/rank{R}.jsonl` (`holmes.runtime.timings`): each task, receive, send and
   sync with its times, and the bytes it sent per link class;
7. under `hetsched launch`, a `holmes.heartbeat.Heartbeat` beats from construction on
   and reports each finished step; `finish()` says the rank is done, so the launcher
   can tell a hung host from a slow one (`cli.hangs`).

Parameters of the model a rank does not hold (other stages' blocks) are never trained
there; `gather_model()` copies every replica-0 parameter to rank 0 for evaluation.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diloco import DiLoCo, DiLoCoConfig, SiteRelay
from holmes.heartbeat import Heartbeat
from holmes.runtime import checkpoints, train_state
from holmes.runtime.links import link_classes, slowest_class
from holmes.runtime.plan_run import PlanRun
from holmes.runtime.timings import Timings
from holmes.runtime.zero import StageShards, restrict
from skippipe.runtime import PipelineRuntime
from topology.errors import InputError

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class StepLog:
    """What rank 0 prints every `log_every` steps (also returned by `step`)."""

    step: int
    loss: float
    tokens_per_s: float
    bytes_per_class: dict[str, int] = field(default_factory=dict)


class Trainer:
    """See the module docstring; `steps()` yields the step numbers still to run."""

    def __init__(self, run: PlanRun, model: nn.Module, make_optimizer: OptimizerFactory, *,
                 activation_shape: Sequence[int], total_steps: int,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 50,
                 resume_from: str | Path | None = None, log_every: int = 10,
                 log: Callable[[str], None] | None = None,
                 timings: str | Path | None = None) -> None:
        self.heartbeat = Heartbeat.from_env(run.placement.torch_rank)
        self.checkpoint_dir = checkpoints.checkpoint_folder(checkpoint_dir)
        self.resume_from = checkpoints.checkpoint_folder(
            resume_from or os.environ.get(checkpoints.RESUME_FROM_ENV), must_exist=True)
        self.run, self.total_steps = run, total_steps
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self._print = log or (lambda line: print(line, file=sys.stderr, flush=True))
        data = run.group_of_kind("data")
        where = run.placement
        self.timings = Timings(timings, rank=where.torch_rank, identity={
            "node": where.device, "host": where.host, "stage": where.stage,
            "replica": where.replica, "lane": where.lane})
        self.pipeline = PipelineRuntime(
            model, run.schedule, run.placement.torch_rank, activation_shape=activation_shape,
            device=run.torch_device(), stage_group=data, sync="none",
            p2p_group=run.p2p_group, recorder=self.timings if self.timings.enabled else None)
        self.params = list(self.pipeline.parameters())
        self.shards = None if data is None else StageShards(
            self.params, data, lanes=[run.torch_rank_of[d] for d in self._stage_devices()])
        self.zero1 = self.shards is not None and run.plan.optimizer.sharding == "zero1"
        self.optimizer = make_optimizer(self.params)
        if self.zero1:
            restrict(self.optimizer, self.shards.owned)
        self.share = replica_share(run)
        self.diloco = _make_diloco(run, self.params, self.share)
        named = list(self.pipeline.named_parameters())
        self.state = train_state.RankState(
            run, named, self.optimizer, self.zero1, self.diloco,
            {_holder_name(i): name for i, (name, _) in enumerate(named)})
        self.bytes = Counter[str]()
        self._classes = link_classes(run)
        self._owed = False  # a checkpoint waits for DiLoCo to be quiescent
        self._window: list[float] = []
        self._window_steps = 0
        self._saved: int | None = None  # the step last written to checkpoint_dir
        self.start_step = self._resume()
        self._window_start = time.perf_counter()

    def record_timings(self, on: bool) -> None:
        """Pause (False) or resume (True) recording when a timings folder was given (a
        bench turns it off and on within one run to measure what recording costs)."""
        self.timings.enabled = on and self.timings.folder is not None
        self.pipeline.recorder = self.timings if self.timings.enabled else None

    def microbatches(self) -> list[int]:
        """The microbatches whose batches this rank must give to `step` (its origins)."""
        return self.pipeline.origin_microbatches()

    def steps(self) -> Iterator[int]:
        yield from range(self.start_step, self.total_steps)

    def step(self, step: int, batches: Mapping[int, tuple[Tensor, Tensor]]) -> StepLog | None:
        """One optimizer step (numbered `step`, 0-based); returns the log line's figures
        on rank 0 when one is printed."""
        self.timings.start_step()
        sent_before = self._with_diloco_bytes() if self.timings.enabled else Counter()
        losses = self.pipeline.step(batches)
        self._count_pipeline_bytes()
        self._reduce_gradients()
        self.optimizer.step()
        for param in self.params:
            param.grad = None
        if self.zero1:
            with self.timings.sync("zero", self.shards.wire_bytes):
                self.shards.all_gather_parameters()
            self._add_shard_bytes()
        self._sync_replicas_after_update()
        if self.timings.enabled:
            self.timings.end_step(step, dict(self._with_diloco_bytes() - sent_before))
        self._window.extend(losses.values())
        self._window_steps += 1
        done = step + 1
        if self.heartbeat is not None:
            self.heartbeat.progress(done)
        log = self._log(done) if done % self.log_every == 0 or done == self.total_steps else None
        if self.checkpoint_dir and (done % self.checkpoint_every == 0 or self._owed):
            self._checkpoint(done)
        return log

    def finish(self) -> None:
        """Merge DiLoCo exchanges still in flight and write a last checkpoint (unless the
        last step's is already there and nothing changed since)."""
        merged = False
        if self.diloco is not None:
            merged = bool(self.diloco.finish())
            self._broadcast_in_stage()
            self.diloco.close()
        if self.checkpoint_dir and (self._saved != self.total_steps or _any_rank(merged)):
            self._checkpoint(self.total_steps, final=True)
        self.timings.close()
        if self.heartbeat is not None:
            self.heartbeat.close()
            self.heartbeat = None

    @torch.no_grad()
    def gather_model(self, model: nn.Module) -> bool:
        """Copy replica 0's parameters into `model` on rank 0; True there, False elsewhere.

        Lane 0 of each of replica 0's stages sends its parameters to rank 0 point to
        point; no other rank sends anything (`gather_object` would have every rank send
        a buffer as large as the largest: across the WAN from every other replica)."""
        run = self.run
        first = run.plan.replicas[0]
        sources = sorted({run.torch_rank_of[run.plan.stage(s).devices[0]]
                          for s in first.stages})
        rank = dist.get_rank()
        if rank in sources and rank != 0:
            mine = {name: p.detach().cpu() for name, p in self.pipeline.named_parameters()}
            dist.send_object_list([mine], dst=0)
        if rank != 0:
            return False
        merged: dict[str, Tensor] = {}
        for source in sources:
            if source == 0:
                part = {name: p.detach().cpu() for name, p in self.pipeline.named_parameters()}
            else:
                box: list[Any] = [None]
                dist.recv_object_list(box, src=source)
                part = box[0]
            merged.update(part)
        for name, param in model.named_parameters():
            if name in merged:
                param.copy_(merged[name])
        return True

    # ---- syncs

    def _reduce_gradients(self) -> None:
        """Sum the stage's gradients over its devices and average them over replicas.

        A stage of several devices reduce-scatters its gradients (`StageShards`): each
        device gets the sum for the parameters it owns. When every replica's stage has
        as many devices, lane j owns the same parameters in every replica and averages
        only that shard over its `replica` group. Then, without ZeRO-1, the owners'
        gradients are all-gathered so every device steps on all of them. Replicas of
        unequal width all-reduce in the stage and average shard by lane instead.
        """
        shards = self.shards
        if shards is None:
            self._average_over_replicas()
            return
        if self._averages_over_replicas() and _needs_stage_broadcast(self.run):
            with self.timings.sync("data"):
                self.pipeline.sync_gradients()
            self._add_ring_bytes(shards.group, torch.empty(_numel(self.params)))
            self._average_over_replicas()
            if self.zero1:
                shards.keep_owned_gradients()
            return
        with self.timings.sync("data", shards.wire_bytes):
            mine = shards.reduce_scatter_gradients()
        self._add_shard_bytes()
        group = self.run.group_of_kind("replica")
        if self._averages_over_replicas() and group is not None:
            owned = mine[:shards.owned_numel]
            owned *= self.share
            with self.timings.sync("replica", owned.numel() * owned.element_size()):
                dist.all_reduce(owned, group=group)
            self._add_ring_bytes(group, owned)
        if not self.zero1:
            with self.timings.sync("data", shards.wire_bytes):
                shards.all_gather_gradients(mine)
            self._add_shard_bytes()

    def _averages_over_replicas(self) -> bool:
        return self.run.plan.sync == "allreduce" and len(self.run.plan.replicas) > 1

    def _average_over_replicas(self) -> None:
        """Average the stage's gradient over replicas, one shard per lane, each replica
        weighted by its share of the step's microbatches.

        Every device of a stage holds the same gradient (the data group summed it), so
        lane j all-reduces only shard j over its `replica` group and then broadcasts it
        in the data group: the replicas exchange the gradient once, not once per lane.
        """
        if not self._averages_over_replicas():
            return
        flat = torch.cat([_grad(p).reshape(-1) for p in self.params])
        lanes = self._synced_lanes()
        shards = flat.tensor_split(len(lanes))
        group = self.run.group_of_kind("replica")
        if group is not None:
            mine = shards[self.run.placement.lane]
            mine *= self.share
            with self.timings.sync("replica", mine.numel() * mine.element_size()):
                dist.all_reduce(mine, group=group)
            self._add_ring_bytes(group, mine)
        data = self.run.group_of_kind("data")
        if data is not None:
            for device, shard in zip(lanes, shards, strict=True):
                source = self.run.torch_rank_of[device]
                with self.timings.sync("data", shard.numel() * shard.element_size()):
                    dist.broadcast(shard, src=source, group=data)
                if source == self.run.placement.torch_rank:
                    self._add_broadcast_bytes(data, shard)
        for param, part in zip(self.params, flat.split([p.numel() for p in self.params]),
                               strict=True):
            param.grad = part.view_as(param)

    def _synced_lanes(self) -> list[str]:
        """This stage's devices that have a `replica` group: the narrowest replica's lanes."""
        return self._stage_devices()[:min(_stage_widths(self.run))]

    def _sync_replicas_after_update(self) -> None:
        if self.run.plan.sync != "diloco":
            return
        with self.timings.sync("diloco"):
            merged = self.diloco.step() if self.diloco is not None else []
        if _needs_stage_broadcast(self.run) and _any_rank(bool(merged)):
            self._broadcast_in_stage()

    def _broadcast_in_stage(self) -> None:
        """Devices beyond the narrowest replica's lanes take lane 0's parameters."""
        group = self.run.group_of_kind("data")
        if group is None or not _needs_stage_broadcast(self.run):
            return
        lane0 = self.run.torch_rank_of[self._stage_devices()[0]]
        for param in self.params:
            dist.broadcast(param.data, src=lane0, group=group)

    def _stage_devices(self) -> list[str]:
        return self.run.schedule.stages[self.run.placement.stage]

    # ---- bytes

    def _count_pipeline_bytes(self) -> None:
        for peer, sent in self.pipeline.bytes_sent.items():
            self.bytes[self._classes(self.run.placement.torch_rank, peer)] += sent
        self.pipeline.bytes_sent.clear()

    def _add_shard_bytes(self) -> None:
        """One reduce-scatter or all-gather of the stage over the data group."""
        if self.shards is not None:
            self.bytes[self._group_class(self.shards.group)] += self.shards.wire_bytes

    def _add_ring_bytes(self, group: dist.ProcessGroup, flat: Tensor) -> None:
        n = dist.get_world_size(group)
        self.bytes[self._group_class(group)] += int(2 * (n - 1) / n * flat.numel()
                                                    * flat.element_size())

    def _add_broadcast_bytes(self, group: dist.ProcessGroup, tensor: Tensor) -> None:
        n = dist.get_world_size(group)
        self.bytes[self._group_class(group)] += (n - 1) * tensor.numel() * tensor.element_size()

    def _group_class(self, group: dist.ProcessGroup) -> str:
        """The slowest link class between two members of `group`."""
        return slowest_class(self._classes, dist.get_process_group_ranks(group))

    def _with_diloco_bytes(self) -> Counter[str]:
        """`self.bytes` plus what DiLoCo sent since the last (re)start."""
        counts = Counter(self.bytes)
        if self.diloco is not None:
            ledger = self.diloco.ledger
            wan = ledger.summary("sync").sent + ledger.summary("broadcast").sent
            counts[self._group_class(self.run.group_of_kind("diloco"))] += wan
            if self.diloco.relay is not None:
                counts[self._group_class(self.diloco.relay.group)] += \
                    ledger.summary("site").sent
        return counts

    # ---- logs and checkpoints

    def _log(self, done: int) -> StepLog | None:
        total = torch.tensor([sum(self._window), float(len(self._window))])
        dist.all_reduce(total)
        counts = self._bytes_now()
        elapsed = time.perf_counter() - self._window_start
        steps = self._window_steps
        self._window, self._window_steps = [], 0
        self._window_start = time.perf_counter()
        if dist.get_rank() != 0:
            return None
        model = self.run.plan.model
        tokens = steps * model.global_batch * model.seq_len
        log = StepLog(done, float(total[0] / max(1.0, float(total[1]))),
                      tokens / elapsed if elapsed > 0 else 0.0, counts)
        sent = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(counts.items())) or "nothing"
        self._print(f"step {done:5d}  loss {log.loss:.4f}  {log.tokens_per_s:,.0f} tokens/s  "
                    f"sent so far: {sent}")
        return log

    def _bytes_now(self) -> dict[str, int]:
        """Bytes sent by every rank so far, per link class (a collective)."""
        mine = self._with_diloco_bytes()
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, dict(mine))
        total: Counter[str] = Counter()
        for part in gathered:
            total.update(part)
        return dict(total)

    def _checkpoint(self, done: int, final: bool = False) -> None:
        quiet = self.diloco is None or self.diloco.quiescent
        if not _all_ranks(quiet):
            self._owed = True
            return
        self._owed = False
        assert self.checkpoint_dir is not None
        folder = train_state.save(self.state, self.checkpoint_dir, done,
                                  self._with_diloco_bytes())
        self._saved = done
        if dist.get_rank() == 0:
            self._print(f"checkpoint {folder}" + (" (final)" if final else ""))

    def _resume(self) -> int:
        """Load the newest intact step of the checkpoint folder, else of `resume_from`."""
        sources = list(dict.fromkeys(d for d in (self.checkpoint_dir, self.resume_from) if d))
        resumed = train_state.resume(self.state, sources, self._print) if sources else None
        if resumed is None:
            if self.resume_from is not None:
                raise InputError("holds no checkpoint to resume from", self.resume_from)
            return 0
        if resumed.folder.parent == self.checkpoint_dir:
            self._saved = resumed.step
        self.bytes = Counter(resumed.bytes if dist.get_rank() == 0 else {})
        if dist.get_rank() == 0:
            self._print(f"resumed from step {resumed.step} ({resumed.folder})")
        return resumed.step


# ---- helpers


def _grad(param: nn.Parameter) -> Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


def _numel(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def replica_microbatches(run: PlanRun) -> list[int]:
    """The microbatches of every replica's routes in one step, replica by replica."""
    replica_of = {d: stage.replica for stage in run.plan.stages for d in stage.devices}
    counts = Counter(replica_of[path.origin] for path in run.plan.paths)
    return [counts[replica.id] for replica in run.plan.replicas]


def replica_share(run: PlanRun) -> float:
    """This rank's replica's share of the step's microbatches: its weight when replicas
    average. Each replica's gradient is the mean over its own microbatches, so the
    microbatch-weighted average is the mean over the global batch."""
    counts = replica_microbatches(run)
    index = [r.id for r in run.plan.replicas].index(run.placement.replica)
    return counts[index] / max(1, sum(counts))


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _all_ranks(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _stage_widths(run: PlanRun) -> list[int]:
    """Devices of this rank's stage in every replica (lanes beyond the least have no
    cross-replica group)."""
    return [len(run.plan.stage(r.stages[run.placement.stage]).devices)
            for r in run.plan.replicas]


def _needs_stage_broadcast(run: PlanRun) -> bool:
    """Whether some device of this stage is in no DiLoCo group (a wider replica)."""
    return len(set(_stage_widths(run))) > 1


def _make_diloco(run: PlanRun, params: list[nn.Parameter], share: float) -> DiLoCo | None:
    """DiLoCo over the lane's `diloco` group. Its inner optimizer's state is checkpointed
    by the trainer (with ZeRO-1 as this rank's shard), so DiLoCo gets none to save; each
    replica's pseudo-gradient is weighted by its `share` of the microbatches when the
    shares differ (equal shares keep DiLoCo's plain mean)."""
    settings = run.plan.diloco
    group = run.group_of_kind("diloco")
    if run.plan.sync != "diloco" or settings is None or group is None:
        return None
    holder = nn.Module()
    holder.layers = nn.ModuleList(_one_param_module(p) for p in params)
    fragments = max(1, min(settings.fragments, len(params)))
    config = DiLoCoConfig(
        sync_every=settings.sync_every, fragments=fragments, pattern=settings.pattern,
        overlap_steps=max(0, min(settings.overlap_steps, settings.sync_every // fragments - 1)),
        alpha=settings.alpha, quantization=None if settings.quantization == "none"
        else settings.quantization, outer_lr=settings.outer_lr,
        outer_momentum=settings.outer_momentum, timeout_s=settings.timeout_s,
        start_timeout_s=max(DiLoCoConfig.start_timeout_s, settings.timeout_s))
    equal = len(set(replica_microbatches(run))) == 1
    relay = None if run.relay is None else SiteRelay(
        run.relay.group, run.relay.ranks, "lead" if settings.exchange == "lead" else "sharded")
    return DiLoCo(holder, None, group, config, layers=list(holder.layers),
                  weight=None if equal else share, relay=relay)


def _holder_name(index: int) -> str:
    """DiLoCo's name for the rank's parameter `index` (`_make_diloco`'s holder)."""
    return f"layers.{index}.weight"


def _one_param_module(param: nn.Parameter) -> nn.Module:
    module = nn.Module()
    module.register_parameter("weight", param)
    return module
