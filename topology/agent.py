"""The probe agent: a pyzmq server that answers measurement requests and nothing else.

Requests (each signed with the shared token, see `topology.protocol`):
  ping                 answer at once (latency)
  local                this host's discovery result, gathered at start-up
  push_begin/_end/_stats  a timed bulk transfer towards this agent (bandwidth)
  measure              measure the link from this host to another agent (the
                       coordinator's way to get host-to-host figures)
The agent never runs commands. Bad or missing signatures are refused and logged, frames
are size-capped by zmq (oversized peers are disconnected), bulk sessions of idle peers
expire, and zmq heartbeats drop dead connections.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from topology.peer import measure_peer
from topology.protocol import (
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    PeerError,
    ProtocolError,
    Verifier,
    sign,
)

log = logging.getLogger("hetsched.agent")

MAX_STREAMS = 16
MAX_PUSH_SECONDS = 30.0
MAX_PINGS = 1000


@dataclass
class AgentConfig:
    url: str
    key: bytes
    local: dict[str, Any]
    idle_timeout_s: float = 30.0
    max_chunk_bytes: int = MAX_CHUNK_BYTES


@dataclass
class PushSession:
    """Arrival log of one bulk push: (time, cumulative bytes) per chunk."""

    streams: int
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    total: int = 0
    last_seen: float = field(default_factory=time.monotonic)

    def add(self, size: int) -> None:
        self.last_seen = time.monotonic()
        self.total += size
        self.arrivals.append((self.last_seen, self.total))

    def steady_gbps(self) -> float:
        """Rate between 10% and 90% of the bytes: leaves out start-up and drain."""
        if len(self.arrivals) < 3:
            return 0.0
        low = next(a for a in self.arrivals if a[1] >= 0.1 * self.total)
        high = next(a for a in self.arrivals if a[1] >= 0.9 * self.total)
        if high[0] <= low[0]:
            low, high = self.arrivals[0], self.arrivals[-1]
        elapsed = high[0] - low[0]
        return (high[1] - low[1]) * 8 / elapsed / 1e9 if elapsed > 0 else 0.0


class Agent:
    """Serves measurement requests on one ROUTER socket until `stop` is set."""

    def __init__(self, config: AgentConfig, context: zmq.Context | None = None):
        self.config = config
        self._context = context or zmq.Context.instance()
        self._verifier = Verifier(config.key)
        self._sessions: dict[bytes, PushSession] = {}
        self._results: queue.Queue[tuple[bytes, dict[str, Any]]] = queue.Queue()
        self._measuring = threading.Event()
        self.stop = threading.Event()
        self.refused = 0
        self._socket = self._bind()

    def _bind(self) -> zmq.Socket:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, self.config.max_chunk_bytes + MAX_HEADER_BYTES)
        socket.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        socket.bind(self.config.url)
        return socket

    @property
    def endpoint(self) -> str:
        return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve(self) -> None:
        log.info("agent listening on %s", self.endpoint)
        try:
            while not self.stop.is_set():
                if self._socket.poll(200, zmq.POLLIN):
                    self._handle(self._socket.recv_multipart(copy=False))
                self._send_results()
                self._expire_sessions()
        finally:
            self._socket.close(linger=0)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        identity, body = frames[0].bytes, frames[1:]
        if len(body) == 3 and body[0].bytes == b"chunk":
            self._chunk(body[1].bytes, len(body[2]))
            return
        try:
            header = self._verifier.verify([f.bytes for f in body])
        except ProtocolError as exc:
            self._refuse(identity, frames[-1], str(exc))
            return
        try:
            reply = self._dispatch(identity, header)
        except (KeyError, TypeError, ValueError) as exc:
            reply = {"ok": False, "error": f"bad {header['op']} request: {exc}"}
        if reply is not None:
            self._reply(identity, reply)

    def _dispatch(self, identity: bytes, header: dict[str, Any]) -> dict[str, Any] | None:
        op = header["op"]
        if op == "ping":
            return {"ok": True}
        if op == "local":
            return {"ok": True, "host": self.config.local}
        if op == "push_begin":
            return self._push_begin(int(header["streams"]))
        if op == "push_end":
            return {"ok": True}
        if op == "push_stats":
            return self._push_stats(header["session"].encode())
        if op == "measure":
            return self._start_measure(identity, header)
        return {"ok": False, "error": f"unknown request '{op}'"}

    def _refuse(self, identity: bytes, frame: zmq.Frame, why: str) -> None:
        self.refused += 1
        peer = _peer_address(frame)
        log.warning("refused a request from %s: %s", peer, why)
        error = json.dumps({"op": "reply", "ok": False, "error": f"refused: {why}"}).encode()
        self._socket.send_multipart([identity, error, b""])

    def _reply(self, identity: bytes, reply: dict[str, Any]) -> None:
        self._socket.send_multipart([identity, *sign(self.config.key, {"op": "reply", **reply})])

    def _push_begin(self, streams: int) -> dict[str, Any]:
        if not 1 <= streams <= MAX_STREAMS:
            return {"ok": False, "error": f"streams must be 1..{MAX_STREAMS}"}
        session = secrets.token_hex(16)
        self._sessions[session.encode()] = PushSession(streams)
        return {"ok": True, "session": session}

    def _chunk(self, session: bytes, size: int) -> None:
        push = self._sessions.get(session)
        if push is not None:
            push.add(size)

    def _push_stats(self, session: bytes) -> dict[str, Any]:
        push = self._sessions.pop(session, None)
        if push is None:
            return {"ok": False, "error": "unknown or expired bulk session"}
        return {"ok": True, "bytes": push.total, "gbps": push.steady_gbps()}

    def _start_measure(self, identity: bytes, header: dict[str, Any]) -> dict[str, Any] | None:
        if self._measuring.is_set():
            return {"ok": False, "error": "busy: a measurement is already running"}
        args = {
            "url": str(header["peer"]),
            "pings": min(int(header.get("pings", 20)), MAX_PINGS),
            "seconds": min(float(header.get("seconds", 1.0)), MAX_PUSH_SECONDS),
            "streams": min(int(header.get("streams", 4)), MAX_STREAMS),
            "timeout_s": float(header.get("timeout_s", 10.0)),
        }
        self._measuring.set()
        threading.Thread(target=self._measure, args=(identity, args), daemon=True).start()
        return None

    def _measure(self, identity: bytes, args: dict[str, Any]) -> None:
        try:
            result = measure_peer(self._context, key=self.config.key, **args)
            self._results.put((identity, {"ok": True, "result": result.to_plain()}))
        except PeerError as exc:
            self._results.put((identity, {"ok": False, "error": str(exc)}))
        except Exception as exc:  # noqa: BLE001 - any failure must reach the coordinator
            log.exception("measurement failed")
            self._results.put((identity, {"ok": False, "error": f"measurement failed: {exc}"}))
        finally:
            self._measuring.clear()

    def _send_results(self) -> None:
        while not self._results.empty():
            identity, reply = self._results.get_nowait()
            self._reply(identity, reply)

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for session, push in list(self._sessions.items()):
            if now - push.last_seen > self.config.idle_timeout_s:
                log.info("dropping an idle bulk session")
                del self._sessions[session]


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "unknown peer"


def start_agent_thread(config: AgentConfig, context: zmq.Context | None = None) -> Agent:
    """Start an agent in a daemon thread (tests and in-process use); set `agent.stop` to end."""
    agent = Agent(config, context)
    threading.Thread(target=agent.serve, daemon=True, name="hetsched-agent").start()
    return agent
