"""`DiLoCo`: (Streaming) DiLoCo around a model, an inner optimizer and a process group.

Each replica trains alone; after every inner optimizer step the caller calls `step()`.
On the schedule of `diloco.schedule` a fragment p starts an exchange: its pseudo-gradient
Delta_p = theta_global_p - theta_local_p is averaged over replicas in the background
(quantized, see `diloco.exchange`). `overlap_steps` inner steps later it is merged: the
outer optimizer updates theta_global_p with the average, and the local parameters become
alpha * theta_local + (1 - alpha) * theta_global. With fragments=1, overlap_steps=0,
alpha=0 and quantization=None this is plain DiLoCo.

    diloco = DiLoCo(model, inner_opt, sync_every=100, fragments=4, overlap_steps=2,
                    alpha=0.5, quantization="fp4")
    for step, batch in enumerate(data):
        loss(model, batch).backward(); inner_opt.step(); inner_opt.zero_grad()
        diloco.step()
    diloco.finish()

Replicas that train on unequal shares of the data (say 412 and 100 microbatches per inner
step) pass `weight`, their share: the exchange then averages w_r * Delta_r instead of the
plain mean, as federated averaging weights each client by the samples it trained on.
Every replica of the group must pass one, and the weights must sum to 1.

A replica that runs on several processes holding the same parameters (data parallel
inside the replica, k "lanes", each in its own cross-replica group) passes `relay`, a
`diloco.relay.SiteRelay` naming its lanes: the slow links then carry each exchange once
per replica instead of k times (lane 0 exchanges and broadcasts, or each lane exchanges
1/k and the lanes all-gather), and every lane still ends with the same result.

The global parameters, the outer momentum, the step and (for an exact restart) the local
model and inner optimizer live in `state_dict()`; it can be taken whenever no exchange is
in flight (`quiescent`). `parameter_states()` holds the same outer state cut by parameter
name, which `load_parameter_states()` restores under other fragments (another split of the
model between processes). A replica that dies or hangs makes the others raise
`ReplicaFailure` within `timeout_s` of waiting; continuing with the survivors in-process is
not supported, restarting all (or fewer) replicas from the last checkpoint is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from diloco.accounting import ByteLedger, CountingComm, SyncRecord
from diloco.config import DiLoCoConfig
from diloco.exchange import ExchangeWorker, ReplicaFailure, average_across_replicas, wait_for
from diloco.fragments import Fragment, fragments_from_modules, split_fragments
from diloco.outer import OuterSGD, pseudo_gradient
from diloco.quantize import make_codec
from diloco.relay import SiteRelay, relayed_average
from diloco.schedule import SyncSchedule

STATE_FORMAT = "hetsched.diloco/1"


@dataclass
class _Exchange:
    """An exchange in flight: its result, and where it came from."""

    fragment: int
    start_step: int
    result: Any  # Future[torch.Tensor]
    record: SyncRecord
    residual: torch.Tensor | None = None


class DiLoCo:
    """Streaming DiLoCo for one replica. See the module docstring."""

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        inner_optimizer: torch.optim.Optimizer | None = None,
        group: dist.ProcessGroup | None = None,
        config: DiLoCoConfig | None = None,
        *,
        layers: Sequence[nn.Module] | None = None,
        weight: float | None = None,
        relay: SiteRelay | None = None,
        **options: Any,
    ) -> None:
        """`model` is a module (split by layer) or a list of modules (explicit fragments).

        Give either `config` or its fields as keyword `options`; `layers` names the layers
        to split by (default: the model's largest `nn.ModuleList`). `weight`: this
        replica's weight in the average of pseudo-gradients, in (0, 1] (None: the plain
        mean over replicas). `relay`: this replica's lanes that share one exchange.
        """
        if config is not None and options:
            raise TypeError("give either config=DiLoCoConfig(...) or keyword options, not both")
        if weight is not None and not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.config = config if config is not None else DiLoCoConfig(**options)
        self.modules, self.fragments = _make_fragments(model, self.config, layers)
        self.inner_optimizer = inner_optimizer
        self.comm = CountingComm(group)
        self.relay = relay
        self.site_comm = CountingComm(relay.group) if relay is not None else None
        # what the exchange's mean (sum / replicas) is given: Delta * weight * replicas
        self._scale = None if weight is None else weight * self.comm.world_size
        self.schedule = SyncSchedule(
            self.config.sync_every, self.config.fragments, self.config.overlap_steps
        )
        self.codec = make_codec(self.config.quantization, self.config.quant_block)
        self.outer = OuterSGD(
            self.config.outer_lr,
            self.config.outer_momentum,
            self.config.nesterov,
            len(self.fragments),
        )
        self.ledger = ByteLedger()
        self._worker = ExchangeWorker()
        self._in_flight: dict[int, _Exchange] = {}
        self._failure: ReplicaFailure | None = None
        self._closed = False
        self._step = 0
        if self.config.broadcast_initial and self.comm.world_size > 1:
            self._broadcast_parameters()
        self._global = [_flatten(f.params) for f in self.fragments]
        self._residual: list[torch.Tensor | None] = [None] * len(self.fragments)

    # ---- the training loop --------------------------------------------------------------

    @property
    def inner_steps(self) -> int:
        """Inner steps completed (the number of `step()` calls, plus a loaded checkpoint's)."""
        return self._step

    @property
    def quiescent(self) -> bool:
        """No exchange in flight: `state_dict()` may be taken now."""
        return not self._in_flight

    def step(self) -> list[int]:
        """Call after each inner optimizer step; returns the fragments merged in this call."""
        self._raise_if_failed()
        self._step += 1
        for fragment in self.schedule.starting(self._step):
            self._start(fragment)
        merged = [p for p in self.schedule.merging(self._step) if p in self._in_flight]
        for fragment in merged:
            self._merge(fragment)
        return merged

    def finish(self) -> list[int]:
        """Wait for and merge every exchange in flight (e.g. at the end of training)."""
        self._raise_if_failed()
        pending = sorted(self._in_flight.values(), key=lambda e: e.start_step)
        for exchange in pending:
            self._merge(exchange.fragment)
        return [e.fragment for e in pending]

    def __enter__(self) -> DiLoCo:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the exchange thread once the work already queued is done (waits up to 10 s)."""
        self._closed = True
        self._worker.close()

    # ---- views ------------------------------------------------------------------------

    def global_parameters(self) -> dict[str, torch.Tensor]:
        """Name -> fp32 copy of the global parameters (identical on every replica)."""
        out: dict[str, torch.Tensor] = {}
        for fragment, flat in zip(self.fragments, self._global, strict=True):
            views = _views(flat, fragment.params)
            out.update({n: v.clone() for n, v in zip(fragment.names, views, strict=True)})
        return out

    # ---- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a replica needs to continue exactly: outer state, model, inner optimizer."""
        if not self.quiescent:
            raise RuntimeError(
                f"state_dict() at inner step {self._step} with exchanges of fragments "
                f"{sorted(self._in_flight)} in flight; take it when `quiescent` is True"
            )
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "step": self._step,
            "world_size": self.comm.world_size,
            "fragment_names": [list(f.names) for f in self.fragments],
            "global": [flat.clone() for flat in self._global],
            "outer": self.outer.state_dict(),
            "residual": [None if r is None else r.clone() for r in self._residual],
            "modules": [m.state_dict() for m in self.modules],
            "inner_optimizer": (
                self.inner_optimizer.state_dict() if self.inner_optimizer is not None else None
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output; the world size may differ, the fragments may not."""
        _check_compatible(state, self)
        if not self.quiescent:
            raise RuntimeError("load_state_dict() with exchanges in flight")
        with torch.no_grad():
            for flat, saved in zip(self._global, state["global"], strict=True):
                flat.copy_(saved)
        self.outer.load_state_dict(state["outer"])
        self.outer.buffers = [
            None if b is None else b.to(flat.device)
            for b, flat in zip(self.outer.buffers, self._global, strict=True)
        ]
        self._residual = [
            None if r is None else r.to(flat.device).clone()
            for r, flat in zip(state.get("residual") or self._residual, self._global, strict=True)
        ]
        for module, saved in zip(self.modules, state["modules"], strict=True):
            module.load_state_dict(saved)
        if self.inner_optimizer is not None and state["inner_optimizer"] is not None:
            self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        self._step = int(state["step"])

    def parameter_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The outer state cut by parameter (fragment names): `global` (fp32), and once
        they exist `momentum` (the fragment's outer momentum) and `residual` (its error
        feedback). Unlike `state_dict()` it can be restored under other fragments."""
        if not self.quiescent:
            raise RuntimeError("parameter_states() with exchanges in flight")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for index, fragment in enumerate(self.fragments):
            parts = {"global": self._global[index], "momentum": self.outer.buffers[index],
                     "residual": self._residual[index]}
            for kind, flat in parts.items():
                if flat is None:
                    continue
                for name, view in zip(fragment.names, _views(flat, fragment.params), strict=True):
                    out.setdefault(name, {})[kind] = view.clone()
        return out

    @torch.no_grad()
    def load_parameter_states(self, states: dict[str, dict[str, torch.Tensor]],
                              inner_steps: int) -> None:
        """Restore `parameter_states()` output, perhaps taken under other fragments, and
        the inner step count (which places the next syncs). Every parameter needs its
        `global`; a `momentum` or `residual` missing for some of a fragment's parameters
        counts as zero, which is exactly what the outer step and the error feedback do
        with none (a fragment with none of them keeps none)."""
        if not self.quiescent:
            raise RuntimeError("load_parameter_states() with exchanges in flight")
        missing = [n for f in self.fragments for n in f.names if "global" not in states.get(n, {})]
        if missing:
            raise ValueError(f"no global value for {len(missing)} parameter(s), first "
                             f"{missing[0]!r}")
        for index, fragment in enumerate(self.fragments):
            flat = self._global[index]
            flat.copy_(_joined(states, fragment, "global", flat))
            self.outer.buffers[index] = _joined(states, fragment, "momentum", flat)
            self._residual[index] = _joined(states, fragment, "residual", flat)
        self._step = int(inner_steps)

    # ---- internals ----------------------------------------------------------------------

    @torch.no_grad()
    def _start(self, index: int) -> None:
        fragment = self.fragments[index]
        delta = pseudo_gradient(self._global[index], _flatten(fragment.params))
        residual = None
        if self.config.error_feedback:
            if self._residual[index] is not None:
                delta += self._residual[index]
            residual = torch.empty_like(delta)
        if self._scale is not None:
            delta *= self._scale
        if delta.is_cuda:  # the exchange thread reads delta: finish writing it first
            torch.cuda.current_stream(delta.device).synchronize()
        record = self.ledger.open("sync", index, self._step)
        if self.relay is not None and self.site_comm is not None:
            work = partial(relayed_average, delta, self.codec, self.comm, self.relay,
                           self.site_comm, record, self.ledger.open("site", index, self._step),
                           residual)
        else:
            work = partial(average_across_replicas, delta, self.codec, self.comm, record,
                           residual)
        result = self._worker.submit(work)
        self._in_flight[index] = _Exchange(index, self._step, result, record, residual)

    @torch.no_grad()
    def _merge(self, index: int) -> None:
        exchange = self._in_flight.pop(index)
        what = f"exchange of fragment {index} started after inner step {exchange.start_step}"
        average = self._wait(exchange.result, what)
        if exchange.residual is not None:  # in the units of the unweighted Delta
            scale = self._scale
            self._residual[index] = exchange.residual if scale is None else \
                exchange.residual / scale
        self.outer.step(index, self._global[index], average)
        alpha = self.config.alpha
        fragment = self.fragments[index]
        for param, global_view in zip(
            fragment.params, _views(self._global[index], fragment.params), strict=True
        ):
            merged = global_view if alpha == 0 else torch.lerp(global_view, param.float(), alpha)
            param.copy_(merged)

    @torch.no_grad()
    def _broadcast_parameters(self) -> None:
        """Replica 0's parameters to every replica (with a relay: to its lead, which passes
        them on to its lanes)."""
        for fragment in self.fragments:
            record = self.ledger.open("broadcast", fragment.index, 0)
            flat = _flatten(fragment.params)
            if self.relay is None or self.site_comm is None:
                work = partial(_broadcast, self.comm, flat, record)
            else:
                work = partial(_relay_broadcast, self.comm, self.relay, self.site_comm, flat,
                               record, self.ledger.open("site", fragment.index, 0))
            flat = self._wait(self._worker.submit(work), "initial broadcast of the parameters",
                              self.config.start_timeout_s)
            for param, view in zip(fragment.params, _views(flat, fragment.params), strict=True):
                param.copy_(view)

    def _wait(self, result: Any, what: str, timeout_s: float | None = None) -> torch.Tensor:
        try:
            return wait_for(result, timeout_s or self.config.timeout_s, what,
                            self.comm.world_size)
        except ReplicaFailure as failure:
            self._failure = failure
            raise

    def _raise_if_failed(self) -> None:
        if self._closed:
            raise RuntimeError("this DiLoCo was closed")
        if self._failure is not None:
            raise ReplicaFailure(f"an earlier exchange failed: {self._failure}")


def _make_fragments(
    model: nn.Module | Sequence[nn.Module],
    config: DiLoCoConfig,
    layers: Sequence[nn.Module] | None,
) -> tuple[list[nn.Module], list[Fragment]]:
    if isinstance(model, nn.Module):
        return [model], split_fragments(model, config.fragments, config.pattern, layers)
    modules = list(model)
    if len(modules) != config.fragments:
        raise ValueError(
            f"{len(modules)} explicit fragments given but config.fragments={config.fragments}"
        )
    return modules, fragments_from_modules(modules)


def _check_compatible(state: dict[str, Any], diloco: DiLoCo) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a DiLoCo state (format {state.get('format')!r})")
    names = [list(f.names) for f in diloco.fragments]
    if state["fragment_names"] != names:
        raise ValueError("the checkpoint's fragments (parameter names per fragment) differ")
    saved = state["config"]
    for key in ("sync_every", "fragments", "pattern", "overlap_steps"):
        if saved[key] != getattr(diloco.config, key):
            raise ValueError(
                f"checkpoint has {key}={saved[key]!r}, this DiLoCo {getattr(diloco.config, key)!r}"
            )


def _broadcast(comm: CountingComm, flat: torch.Tensor, record: SyncRecord) -> torch.Tensor:
    comm.broadcast(flat, record)
    return flat


def _relay_broadcast(comm: CountingComm, relay: SiteRelay, site: CountingComm,
                     flat: torch.Tensor, record: SyncRecord,
                     site_record: SyncRecord) -> torch.Tensor:
    if relay.leads:
        comm.broadcast(flat, record)
    site.broadcast(flat, site_record, src=relay.lanes[0])
    return flat


def _flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One new fp32 vector holding `params` in order."""
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def _views(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` shaped like `params`, in order."""
    sizes = [p.numel() for p in params]
    return [v.view(p.shape) for v, p in zip(flat.split(sizes), params, strict=True)]


def _joined(states: dict[str, dict[str, torch.Tensor]], fragment: Fragment, kind: str,
            like: torch.Tensor) -> torch.Tensor | None:
    """Fragment `fragment`'s `kind` as one flat fp32 vector like `like` (zeros where a
    parameter has none), or None when none of its parameters has one."""
    parts = [states.get(name, {}).get(kind) for name in fragment.names]
    if all(part is None for part in parts):
        return None
    return torch.cat([
        torch.zeros(p.numel(), dtype=like.dtype, device=like.device) if part is None
        else part.reshape(-1).to(like.device, like.dtype)
        for part, p in zip(parts, fragment.params, strict=True)])
