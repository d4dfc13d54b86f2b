"""The probe agent: a pyzmq server that answers measurement requests and nothing else.

Requests (each signed with the shared token, see `topology.protocol`; fields and bounds
in `topology.requests`):
  ping                 answer at once (latency)
  local                this host's discovery result, gathered at start-up
  push_begin/_end/_stats  a timed bulk transfer towards this agent (bandwidth)
  begin_run            the hosts of a probe run: the only endpoints `measure` may target
  measure              measure the link from this host to another agent of a declared run
The agent never runs commands.

What a peer without the token can do: open TCP connections and start a handshake.
Every connection must complete a zmq PLAIN handshake whose credentials are a signed,
one-time `connect` header (checked here, in the ZAP handler) before libzmq accepts a
single message from it, so no message of an unauthenticated peer is ever buffered.
Until then each connection can make libzmq hold at most one frame (MAX_FRAME_BYTES), for
at most `handshake_timeout_s`; at most `max_unauthenticated` connections may wait at
once (`topology.admission` shuts the oldest down). Refusals are logged and counted.

What a token holder can send by mistake: any request is validated field by field before
use and answered with a refusal naming the field; messages of more than MAX_FRAMES
frames or MAX_MESSAGE_BYTES bytes are skipped frame by frame without being kept; bulk
sessions are capped in number and duration and expire when idle; an exception while
handling a request is logged and answered, never fatal. The token is the trust boundary:
a token holder set on harm can still keep this agent busy (libzmq buffers a multipart
message until its last frame, and measurements cost bandwidth).

Replays: a nonce is accepted once within the 300 s clock window, and a request (or
handshake) signed before this agent started is refused, so what was captured before a
restart cannot be replayed after it. No slack is allowed for clock skew: a signer whose
clock runs behind this host's is refused during the agent's first seconds (a retry then
succeeds), while a slack of s seconds would let anything captured in the s seconds
before a restart be replayed after it. Keep the hosts' clocks in sync (NTP); a signer
whose clock runs ahead by d seconds leaves that d-second window open.

Measure targets: the coordinator first declares the run's hosts to each agent
(`begin_run`, a random run id and the hosts' tcp:// endpoints); a measure request names
the run and must target one of its hosts, given as `tcp://HOST:PORT` with HOST an IP
literal or host name (`topology.protocol.parse_tcp_target`). So the agent only ever
connects to tcp endpoints the run was declared with: never to ipc://, inproc:// or
other transports, wildcard or source-address forms, or a host outside the run. The
declaration is itself a signed request, so this guards against mistakes and other
transports, not against a token holder set on harm, who can declare any tcp host.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import zmq

from topology.admission import AdmissionGuard
from topology.peer import measure_peer
from topology.protocol import (
    MAX_FRAME_BYTES,
    PeerError,
    ProtocolError,
    Verifier,
    sign,
    zmq_url,
)
from topology.requests import (
    BadRequest,
    DeclareRun,
    Measure,
    PushBegin,
    PushStats,
    Request,
    parse_request,
    shown,
)

log = logging.getLogger("hetsched.agent")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
MAX_FRAMES = 3  # after the routing id: header, signature, payload
MAX_MESSAGE_BYTES = 2 * MAX_FRAME_BYTES + 1024
MAX_SESSIONS = 16
MAX_SESSION_S = 60.0
MAX_RUNS = 16
RECEIVE_HWM = 64
BATCH = 64
HANDSHAKE_TIMEOUT_S = 10.0
MAX_UNAUTHENTICATED = 64


@dataclass
class AgentConfig:
    url: str
    key: bytes
    local: dict[str, Any]
    idle_timeout_s: float = 30.0
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    max_unauthenticated: int = MAX_UNAUTHENTICATED


@dataclass
class PushSession:
    """Arrival log of one bulk push: time and cumulative bytes per chunk."""

    streams: int
    times: array = field(default_factory=lambda: array("d"))
    totals: array = field(default_factory=lambda: array("q"))
    total: int = 0
    began: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)

    def add(self, size: int) -> None:
        self.last_seen = time.monotonic()
        if self.last_seen - self.began > MAX_SESSION_S:
            return
        self.total += size
        self.times.append(self.last_seen)
        self.totals.append(self.total)

    def steady_gbps(self) -> float:
        """Rate between 10% and 90% of the bytes: leaves out start-up and drain."""
        if len(self.times) < 3:
            return 0.0
        low = next(i for i, t in enumerate(self.totals) if t >= 0.1 * self.total)
        high = next(i for i, t in enumerate(self.totals) if t >= 0.9 * self.total)
        if self.times[high] <= self.times[low]:
            low, high = 0, len(self.times) - 1
        elapsed = self.times[high] - self.times[low]
        moved = self.totals[high] - self.totals[low]
        return moved * 8 / elapsed / 1e9 if elapsed > 0 else 0.0


class Agent:
    """Serves measurement requests on one ROUTER socket until `stop` is set.

    The agent owns its zmq context (the ZAP handler is per context); `stopped` is set
    once its sockets are closed, and its port is free again unless a measurement was
    still running (its context then ends when the measurement does).
    """

    def __init__(self, config: AgentConfig):
        self.config = config
        self.started_at = time.time()
        self._context = zmq.Context()
        self._verifier = Verifier(config.key, not_before=self.started_at)
        self._sessions: dict[bytes, PushSession] = {}
        self._runs: OrderedDict[str, frozenset[tuple[str, int]]] = OrderedDict()
        self._results: queue.Queue[tuple[bytes, dict[str, Any]]] = queue.Queue()
        self._measuring = threading.Event()
        self.stop = threading.Event()
        self.stopped = threading.Event()
        self.refused = 0
        try:
            self._zap = self._context.socket(zmq.REP)
            self._zap.bind(ZAP_ENDPOINT)
            self._socket = self._bind()
            self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            port = int(self.endpoint.rpartition(":")[2])
            self._guard = AdmissionGuard(self._socket, port, config.max_unauthenticated,
                                         forget_after_s=config.handshake_timeout_s + 1)
        except BaseException:
            self._context.destroy(linger=0)
            raise

    def _bind(self) -> zmq.Socket:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.PLAIN_SERVER, 1)
        socket.setsockopt(zmq.ZAP_DOMAIN, b"hetsched-probe")
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        socket.setsockopt(zmq.HANDSHAKE_IVL, int(self.config.handshake_timeout_s * 1000))
        socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        socket.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        socket.bind(self.config.url)
        return socket

    @property
    def waiting_connections(self) -> int:
        """Connections accepted but not yet seen sending (at most `max_unauthenticated`)."""
        return self._guard.waiting

    def serve(self) -> None:
        log.info("agent listening on %s", self.endpoint)
        poller = zmq.Poller()
        for socket in (self._zap, self._guard.monitor, self._socket):
            poller.register(socket, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                ready = dict(poller.poll(200))
                self._step(ready)
        finally:
            self._close()

    def _step(self, ready: dict[zmq.Socket, int]) -> None:
        """One turn of the loop; nothing a peer sends may end the loop."""
        try:
            if self._guard.monitor in ready:
                self._guard.drain()
            if self._zap in ready:
                self._answer_zap()
            if self._socket in ready:
                self._receive_some()
            self._guard.enforce()
            self._send_results()
            self._expire_sessions()
        except Exception:  # noqa: BLE001 - the agent outlives any single bad message
            log.exception("error in the agent loop; continuing")

    def _close(self) -> None:
        self._guard.close()
        self._socket.close(linger=0)
        self._zap.close(linger=0)
        if self._measuring.is_set():
            threading.Thread(target=self._context.term, daemon=True).start()
        else:
            self._context.term()
        self.stopped.set()

    def _answer_zap(self) -> None:
        request = self._zap.recv_multipart()
        why = self._check_handshake(request)
        if why is not None:  # counted before the answer, which is what the peer sees
            self.refused += 1
            peer = request[3].decode(errors="replace") if len(request) > 3 else "unknown peer"
            log.warning("refused a connection from %s: %s", peer, why)
        status = [b"200", b"OK"] if why is None else [b"400", why.encode()[:200]]
        request_id = request[1] if len(request) > 1 else b""
        self._zap.send_multipart([b"1.0", request_id, *status, b"", b""])

    def _check_handshake(self, request: list[bytes]) -> str | None:
        """None for a good ZAP request, else why it is refused."""
        if len(request) != 8 or request[5] != b"PLAIN":
            return "not a PLAIN handshake"
        try:
            self._verifier.verify_credentials(request[6], request[7])
        except ProtocolError as exc:
            return str(exc)
        return None

    def _receive_some(self) -> None:
        for _ in range(BATCH):
            if not self._socket.get(zmq.EVENTS) & zmq.POLLIN:
                return
            identity = self._socket.recv(copy=False)
            body = self._rest_of_message(identity)
            if body is None:
                self._refuse(identity.bytes, None, f"message over {MAX_FRAMES} frames or "
                             f"{MAX_MESSAGE_BYTES} bytes")
            elif body:
                self._handle(identity.bytes, body)

    def _rest_of_message(self, identity: zmq.Frame) -> list[zmq.Frame] | None:
        """The frames after the routing id, or None (rest skipped) when over the caps.

        libzmq hands over a message only once its last frame has arrived; taking it frame by
        frame bounds what this process keeps of a message that breaks the caps to one frame.
        """
        body: list[zmq.Frame] = []
        size = 0
        more = identity.more
        while more:
            frame = self._socket.recv(copy=False)
            more = frame.more
            size += len(frame)
            if len(body) == MAX_FRAMES or size > MAX_MESSAGE_BYTES:
                while more:
                    more = self._socket.recv(copy=False).more
                return None
            body.append(frame)
        return body

    def _handle(self, identity: bytes, body: list[zmq.Frame]) -> None:
        self._guard.admitted(int(body[0].get(zmq.SRCFD)))
        if len(body) == 3 and body[0].bytes == b"chunk":
            self._chunk(body[1].bytes, len(body[2]))
            return
        try:
            if len(body) != 2:
                raise ProtocolError("a request is two frames: header and signature")
            header = self._verifier.verify([f.bytes for f in body])
        except ProtocolError as exc:
            self._refuse(identity, body[0], str(exc))
            return
        reply = self._dispatch_safely(identity, header)
        if reply is not None:
            self._reply(identity, reply)

    def _dispatch_safely(self, identity: bytes, header: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self._dispatch(identity, parse_request(header))
        except BadRequest as exc:
            log.warning("refused a request: %s", exc)
            return {"ok": False, "error": str(exc)}
        except Exception:  # noqa: BLE001 - the dispatch boundary: a bug must not end the agent
            log.exception("request %s failed", shown(str(header.get("op"))))
            return {"ok": False, "error": "internal error (see the agent's log)"}

    def _dispatch(self, identity: bytes, request: Request) -> dict[str, Any] | None:
        if isinstance(request, PushBegin):
            return self._push_begin(request.streams)
        if isinstance(request, PushStats):
            return self._push_stats(request.session.encode())
        if isinstance(request, DeclareRun):
            return self._declare_run(request)
        if isinstance(request, Measure):
            return self._start_measure(identity, request)
        if request.op == "local":
            return {"ok": True, "host": self.config.local}
        return {"ok": True}  # ping, push_end

    def _refuse(self, identity: bytes, frame: zmq.Frame | None, why: str) -> None:
        self.refused += 1
        peer = _peer_address(frame)
        log.warning("refused a message from %s: %s", peer, why)
        error = json.dumps({"op": "reply", "ok": False, "error": f"refused: {why}"}).encode()
        self._socket.send_multipart([identity, error, b""])

    def _reply(self, identity: bytes, reply: dict[str, Any]) -> None:
        self._socket.send_multipart([identity, *sign(self.config.key, {"op": "reply", **reply})])

    def _push_begin(self, streams: int) -> dict[str, Any]:
        if len(self._sessions) >= MAX_SESSIONS:
            return {"ok": False, "error": f"busy: {MAX_SESSIONS} bulk sessions are open"}
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

    def _declare_run(self, request: DeclareRun) -> dict[str, Any]:
        self._runs[request.run] = request.targets()
        self._runs.move_to_end(request.run)
        while len(self._runs) > MAX_RUNS:
            self._runs.popitem(last=False)
        return {"ok": True}

    def _start_measure(self, identity: bytes, request: Measure) -> dict[str, Any] | None:
        hosts = self._runs.get(request.run)
        if hosts is None:
            return {"ok": False, "error": f"unknown run {shown(request.run)}: "
                    "declare its hosts with begin_run first"}
        if request.target() not in hosts:
            return {"ok": False, "error": f"peer {shown(request.peer, 80)} is not a host "
                    f"of run {shown(request.run)}"}
        if self._measuring.is_set():
            return {"ok": False, "error": "busy: a measurement is already running"}
        args = {
            "url": zmq_url(*request.target()),
            "pings": request.pings,
            "seconds": request.seconds,
            "streams": request.streams,
            "timeout_s": request.timeout_s,
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


def _peer_address(frame: zmq.Frame | None) -> str:
    if frame is None:
        return "a peer"
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "unknown peer"


def start_agent_thread(config: AgentConfig) -> Agent:
    """Start an agent in a daemon thread (tests and in-process use); set `agent.stop` to end."""
    agent = Agent(config)
    threading.Thread(target=agent.serve, daemon=True, name="hetsched-agent").start()
    return agent
