"""The client side of the probe protocol: requests to an agent and link measurements.

`AgentClient` sends one signed request at a time and waits, with a timeout, for the
signed reply. Every connection authenticates first with one-time signed PLAIN
credentials (`open_dealer`); an agent that refuses them is reported at once, not after
the timeout. `measure_peer` is what an agent runs when the coordinator asks it to
measure the link to another agent: many pings for latency, then a timed bulk push over
parallel streams for bandwidth, timed on the receiving side.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import zmq

from topology.protocol import (
    CLOCK_WINDOW_S,
    MAX_CHUNK_BYTES,
    PeerError,
    ProtocolError,
    Verifier,
    credentials,
    payload,
    sign,
)

DEFAULT_CHUNK_BYTES = MAX_CHUNK_BYTES  # the agent drops a peer that sends bigger frames
SEND_HWM = 4
# The kernel send buffer of each bulk stream is sized from the idle round trip: enough
# for the streams together to keep WINDOW_RATE in flight (bandwidth-delay product), no
# more. Left to autotuning, TCP queues megabytes that a slow link then needs seconds to
# drain after the timed window, which would make probing a slow WAN take much longer.
WINDOW_RATE_BYTES_S = 10e9 / 8
MIN_SNDBUF = 64 * 1024
MAX_SNDBUF = 4 * 1024 * 1024
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def open_dealer(
    context: zmq.Context, url: str, key: bytes, timeout_s: float, sndbuf: int = -1
) -> zmq.Socket:
    """A DEALER that authenticates to the agent at `url`, queues only to a live
    connection and gives up sending after timeout_s."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.SNDBUF, sndbuf)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    socket.setsockopt(zmq.SNDHWM, SEND_HWM)
    socket.setsockopt(zmq.IMMEDIATE, 1)
    username, password = credentials(key)
    socket.setsockopt(zmq.PLAIN_USERNAME, username)
    socket.setsockopt(zmq.PLAIN_PASSWORD, password)
    socket.connect(url)
    return socket


class AgentClient:
    """One control connection to an agent."""

    def __init__(self, context: zmq.Context, url: str, key: bytes, timeout_s: float = 10.0):
        self.url = url
        self.timeout_s = timeout_s
        self._key = key
        self._verifier = Verifier(key)
        self._socket = open_dealer(context, url, key, timeout_s)
        self._monitor = self._socket.get_monitor_socket(HANDSHAKE_FAILED)
        self._connected = False

    def request(self, op: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        if not self._connected:
            self._wait_connected()
            self._connected = True
        send_signed(self._socket, self._key, self.url, {"op": op, **fields})
        return receive_reply(self._socket, self._verifier, self.url, timeout_s or self.timeout_s)

    def _wait_connected(self) -> None:
        """Return once a request can be queued; PeerError if refused or not in time."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLOUT)
        poller.register(self._monitor, zmq.POLLIN)
        ready = dict(poller.poll(int(self.timeout_s * 1000)))
        if self._monitor in ready:
            raise PeerError(
                f"{self.url} refused the connection: wrong token, clocks more than "
                f"{CLOCK_WINDOW_S:g} s apart, a replayed handshake, or not a hetsched agent "
                "(the agent's log says which)"
            )
        if self._socket not in ready:
            raise PeerError(f"cannot connect to {self.url} within {self.timeout_s:g} s")

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_signed(socket: zmq.Socket, key: bytes, url: str, header: dict[str, Any]) -> None:
    try:
        socket.send_multipart(sign(key, header))
    except zmq.Again:
        timeout_s = socket.getsockopt(zmq.SNDTIMEO) / 1000
        raise PeerError(f"cannot connect to {url} within {timeout_s:g} s") from None


def receive_reply(
    socket: zmq.Socket, verifier: Verifier, url: str, timeout_s: float
) -> dict[str, Any]:
    """Wait for one reply on `socket`; raise PeerError on timeout, refusal or error reply."""
    if not socket.poll(int(timeout_s * 1000), zmq.POLLIN):
        raise PeerError(f"no answer from {url} within {timeout_s:g} s")
    frames = socket.recv_multipart()
    try:
        reply = verifier.verify(frames)
    except ProtocolError as exc:
        raise PeerError(f"{url} sent an unusable reply: {_refusal(frames) or exc}") from None
    if not reply.get("ok", False):
        raise PeerError(f"{url} answered: {reply.get('error', 'unknown error')}")
    return reply


def _refusal(frames: list[bytes]) -> str | None:
    """The error text of an unsigned refusal (an agent cannot sign for a wrong token)."""
    try:
        return str(json.loads(frames[0]).get("error"))
    except (ValueError, AttributeError, IndexError):
        return None


@dataclass
class PushResult:
    """A bulk push as the receiver saw it."""

    bytes: int
    streams: int
    receiver_gbps: float
    sender_seconds: float


@dataclass
class LinkResult:
    """What an agent measured towards a peer."""

    rtt_ms: float
    latency_ms: float
    pings: int
    push: PushResult

    def to_plain(self) -> dict[str, Any]:
        return asdict(self)


def ping(client: AgentClient, count: int) -> list[float]:
    """Round-trip times in milliseconds of `count` pings (one warm-up ping not counted)."""
    client.request("ping")
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        client.request("ping")
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def push(
    context: zmq.Context,
    client: AgentClient,
    key: bytes,
    *,
    streams: int,
    seconds: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    rtt_ms: float = 1.0,
) -> PushResult:
    """Send filler over `streams` parallel connections for `seconds`; the agent times it."""
    session = client.request("push_begin", streams=streams)["session"]
    sndbuf = stream_sndbuf(rtt_ms, streams)
    sockets = [open_dealer(context, client.url, key, client.timeout_s, sndbuf)
               for _ in range(streams)]
    try:
        started = time.perf_counter()
        _send_until(sockets, session.encode(), payload(chunk_bytes), started + seconds)
        for socket in sockets:
            send_signed(socket, key, client.url, {"op": "push_end", "session": session})
        for socket in sockets:
            receive_reply(socket, Verifier(key), client.url, client.timeout_s + seconds * 4)
        sender_seconds = time.perf_counter() - started
        stats = client.request("push_stats", session=session)
    finally:
        for socket in sockets:
            socket.close(linger=0)
    return PushResult(
        bytes=int(stats["bytes"]),
        streams=streams,
        receiver_gbps=float(stats["gbps"]),
        sender_seconds=sender_seconds,
    )


def stream_sndbuf(rtt_ms: float, streams: int) -> int:
    """SO_SNDBUF per stream for a bandwidth-delay product of WINDOW_RATE at `rtt_ms`."""
    window = WINDOW_RATE_BYTES_S * rtt_ms / 1000 / streams / 2  # the kernel doubles it
    return int(min(MAX_SNDBUF, max(MIN_SNDBUF, window)))


def _send_until(sockets: list[zmq.Socket], session: bytes, chunk: bytes, deadline: float) -> None:
    poller = zmq.Poller()
    for socket in sockets:
        poller.register(socket, zmq.POLLOUT)
    while time.perf_counter() < deadline:
        for socket, _ in poller.poll(100):
            socket.send_multipart([b"chunk", session, chunk], copy=False, flags=zmq.NOBLOCK)


def measure_peer(
    context: zmq.Context,
    url: str,
    key: bytes,
    *,
    pings: int,
    seconds: float,
    streams: int,
    timeout_s: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> LinkResult:
    """Latency (median round trip / 2) and bandwidth from this host to the agent at `url`."""
    with AgentClient(context, url, key, timeout_s) as client:
        rtts = ping(client, max(pings, 3))
        rtt = statistics.median(rtts)
        result = push(
            context, client, key,
            streams=streams, seconds=seconds, chunk_bytes=chunk_bytes, rtt_ms=rtt,
        )
    return LinkResult(rtt_ms=rtt, latency_ms=rtt / 2, pings=len(rtts), push=result)
