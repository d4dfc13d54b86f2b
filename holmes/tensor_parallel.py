"""Tensor parallelism (Megatron-LM) inside a host: which degrees fit, and what they cost.

A stage with tensor-parallel degree t splits every layer over t GPUs of one host
(Shoeybi et al. 2019; Narayanan et al. 2021, arXiv 2104.04473, section 2.3): the MLP's
first linear by columns and its second by rows, attention by heads, the embedding and
the head by vocabulary (vocab-parallel). Hence, per device,

- compute: a layer's FLOPs / t (and the head's);
- memory: parameters, gradients, optimizer state and (with sequence parallelism)
  activations / t (`holmes.costs.stage_memory(tensor_parallel=t)`);
- communication, on the critical path, over the host's GPU link (NVLink or PCIe,
  `holmes.network.Network.intra_host`): per transformer layer and microbatch two
  all-reduces of the b·s·h activations in the forward pass (after attention, after the
  MLP) and two in the backward pass, plus two more for the recomputed forward under full
  recomputation; each a ring all-reduce over t ranks (`costs.allreduce_seconds`). The
  head's backward all-reduces its input gradient once (b·s·h); the vocab-parallel
  cross-entropy's all-reduces of b·s numbers and the embedding's forward all-reduce (one
  b·s·h per microbatch on the first stage) are not counted.

TP groups never leave a host: degrees are TP_DEGREES that divide the devices each host
holds in every stage (`degrees`), and `with_tensor_parallel` groups a stage's devices,
consecutive on their host, into groups of t (Megatron's rank order: TP innermost). The
layout then lists each group by its first device, so placement, routes, the simulator
and data-parallel sync work on groups; a group's data-parallel all-reduce is t parallel
rings over 1/t of the gradients each, sharing the stage's links.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from holmes import costs
from holmes.model import ModelSpec, Recompute
from holmes.network import host_of
from holmes.placement import Layout

TP_DEGREES = (1, 2, 4, 8)


def degrees(layout: Layout, allowed: tuple[int, ...] = TP_DEGREES) -> list[int]:
    """The degrees t > 1 of `allowed` that divide the devices of every host in every stage
    of a layout without tensor parallelism (so every TP group stays inside one host)."""
    per_host = [Counter(host_of(d) for d in stage) for replica in layout.replicas
                for stage in replica]
    return [t for t in allowed if t > 1
            and all(n % t == 0 for counts in per_host for n in counts.values())]


def with_tensor_parallel(layout: Layout, t: int) -> Layout:
    """`layout` with every stage's devices grouped t by t, consecutively on their host;
    each stage then lists its groups' first devices."""
    groups: list[tuple[str, ...]] = []

    def grouped(stage: tuple[str, ...]) -> tuple[str, ...]:
        by_host: dict[str, list[str]] = {}
        for device in stage:
            by_host.setdefault(host_of(device), []).append(device)
        leaders = []
        for devices in by_host.values():
            for i in range(0, len(devices), t):
                groups.append(tuple(devices[i:i + t]))
                leaders.append(devices[i])
        return tuple(leaders)

    replicas = tuple(tuple(grouped(stage) for stage in replica) for replica in layout.replicas)
    widths = "/".join(str(len(replica[0])) for replica in replicas)
    return replace(layout, replicas=replicas, tp_groups=tuple(groups),
                   description=f"{layout.description}, as tensor parallel {t} inside each "
                   f"host x {widths}-way data parallel")


def activation_allreduce_seconds(model: ModelSpec, microbatch: int, t: int, latency_s: float,
                                 bandwidth_bytes_per_s: float) -> float:
    """One all-reduce of a microbatch's b·s·h activations over the t GPUs of a TP group."""
    nbytes = costs.boundary_activation_bytes(model, microbatch)
    return costs.allreduce_seconds(nbytes, t, latency_s, bandwidth_bytes_per_s)


def allreduces_per_layer(recompute: Recompute) -> int:
    """All-reduces per layer per microbatch: 2 forward + 2 backward (+ 2 recomputed)."""
    return 4 + (2 if recompute == "full" else 0)


def split_seconds(seconds: float, t: int, allreduces: int, allreduce_s: float) -> float:
    """Seconds of work that takes `seconds` on one GPU when split over a TP group of t:
    seconds / t plus `allreduces` activation all-reduces of `allreduce_s` each (a layer:
    `allreduces_per_layer`; the head: 1, its input gradient); unchanged at t = 1."""
    return seconds if t == 1 else seconds / t + allreduces * allreduce_s


def allreduce_bytes_per_layer(model: ModelSpec, microbatch: int, recompute: Recompute,
                              t: int) -> float:
    """Bytes all TP ranks of a group send per layer per microbatch (ring: 2 (t-1)/t of
    the activations per rank and all-reduce)."""
    if t == 1:
        return 0.0
    nbytes = costs.boundary_activation_bytes(model, microbatch)
    return allreduces_per_layer(recompute) * 2 * (t - 1) * nbytes
