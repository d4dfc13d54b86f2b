"""The exchange: averaging a pseudo-gradient over replicas, quantized, in the background.

`average_across_replicas` is a reduce-scatter followed by an all-gather, both on quantized
payloads, with every sum done in fp32:

1. pad the fp32 vector to W shards (W = replicas) aligned to the codec's block;
2. encode each shard and `all_to_all` them, so rank j receives every replica's shard j;
3. decode those W payloads and sum them in rank order in fp32, divide by W;
4. encode that averaged shard and `all_gather` it; decode all W shards.

Every replica decodes the same gathered bytes, so every replica gets the same average,
bit for bit. Per replica this moves about 2 * (W - 1) / W payloads each way, like a ring
all-reduce, but of 4-bit payloads instead of 32-bit ones. Without quantization (fp32) the
backend's own all-reduce is used (its result is the same on every rank). For error
feedback, `residual` receives this replica's own quantization error of step 2.

`ExchangeWorker` runs exchanges one at a time, in submission order, on one daemon thread,
so collectives are issued in the same order on every rank while the training thread keeps
going. `wait_for` turns a missing result into `ReplicaFailure` after a timeout, so a dead
or hung replica gives a clear error instead of a silent hang.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from typing import TypeVar

import torch

from diloco.accounting import CountingComm, SyncRecord
from diloco.quantize import Codec

T = TypeVar("T")

RESTART_ADVICE = (
    "Restart every replica from the last DiLoCo checkpoint (possibly with fewer replicas); "
    "continuing with the surviving replicas inside this process is not supported."
)


class ReplicaFailure(RuntimeError):
    """A replica of the DiLoCo group died or hung during an exchange."""


def average_across_replicas(
    values: torch.Tensor,
    codec: Codec,
    comm: CountingComm,
    record: SyncRecord,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean over replicas of the 1-D fp32 `values`, exchanged through `codec`.

    If `residual` is given it receives `values` minus what this replica's payloads
    encode (its own quantization error, for error feedback; zero without quantization).
    """
    with torch.cuda.device(values.device) if values.is_cuda else nullcontext():
        return _average(values, codec, comm, record, residual)


def _average(
    values: torch.Tensor,
    codec: Codec,
    comm: CountingComm,
    record: SyncRecord,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    if residual is not None:
        residual.zero_()
    if codec.name == "fp32":  # nothing to quantize: the backend's fp32 all-reduce
        total = values.detach().clone()
        comm.all_reduce(total, record)
        return total / comm.world_size
    world, n = comm.world_size, values.numel()
    unit = world * codec.block
    padded = torch.zeros(-(-n // unit) * unit, dtype=torch.float32, device=values.device)
    padded[:n] = values
    shard_len = padded.numel() // world
    shard_bytes = codec.payload_bytes(shard_len)

    send = torch.cat([codec.encode(shard) for shard in padded.view(world, shard_len)])
    if residual is not None:
        sent_values = torch.cat([codec.decode(p, shard_len) for p in send.view(world, -1)])
        residual.copy_(values - sent_values[:n])
    received = torch.empty_like(send)
    comm.all_to_all(received, send, record)
    my_shard = _sum_decoded(received, codec, world, shard_len) / world

    gathered = torch.empty(world * shard_bytes, dtype=torch.uint8, device=values.device)
    comm.all_gather(gathered, codec.encode(my_shard), record)
    shards = gathered.view(world, shard_bytes)
    return torch.cat([codec.decode(shard, shard_len) for shard in shards])[:n]


def _sum_decoded(payloads: torch.Tensor, codec: Codec, world: int, numel: int) -> torch.Tensor:
    total = torch.zeros(numel, dtype=torch.float32, device=payloads.device)
    for payload in payloads.view(world, -1):
        total += codec.decode(payload, numel)
    return total


class ExchangeWorker:
    """One daemon thread that runs submitted callables in order, each into a Future."""

    def __init__(self, name: str = "diloco-exchange") -> None:
        self._queue: queue.SimpleQueue[tuple[Future, Callable[[], object]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((future, work))
        return future

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop after the queued work; waits at most `timeout_s` (a hung collective never
        returns, and the daemon thread does not keep the process alive). True if stopped."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, work = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = work()
                _device_sync(result)
                future.set_result(result)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(exc)


def wait_for(future: Future[T], timeout_s: float, what: str, world_size: int) -> T:
    """The result of `future`, or `ReplicaFailure` after `timeout_s` seconds or on error."""
    try:
        return future.result(timeout=timeout_s)
    except TimeoutError:
        raise ReplicaFailure(
            f"{what} did not finish within timeout_s={timeout_s:g}: a replica of the "
            f"{world_size}-replica DiLoCo group has died or hung. {RESTART_ADVICE}"
        ) from None
    except Exception as exc:
        raise ReplicaFailure(
            f"{what} failed ({type(exc).__name__}: {exc}); a replica of the "
            f"{world_size}-replica DiLoCo group has probably died. {RESTART_ADVICE}"
        ) from exc


def _device_sync(result: object) -> None:
    """Make a GPU result safe to use from another thread (no-op on CPU)."""
    if isinstance(result, torch.Tensor) and result.is_cuda:
        torch.cuda.current_stream(result.device).synchronize()
