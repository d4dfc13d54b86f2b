"""The probe agent under hostile input: floods, malformed requests, replays, token files, targets.

Everything runs on 127.0.0.1. Memory is measured on an agent in a separate process (psutil
RSS); every wait is on a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import selectors
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
import zmq
from zmq.utils.monitor import recv_monitor_message

from topology.agent import (
    MAX_FRAMES,
    MAX_UNAUTHENTICATED,
    Agent,
    AgentConfig,
    start_agent_thread,
)
from topology.errors import InputError
from topology.peer import AgentClient, open_dealer
from topology.protocol import (
    OPEN_TOKEN_FLAG,
    PeerError,
    ProtocolError,
    Verifier,
    credentials,
    load_token,
    sign,
    write_token,
)

KEY = b"h" * 32
MiB = 1024 * 1024
FLOOD_BYTES = 256 * MiB
MEMORY_BOUND = 64 * MiB
DEADLINE_S = 90.0


# --- helpers -------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return condition()


def ping(endpoint: str, key: bytes = KEY, timeout_s: float = 10.0) -> bool:
    with AgentClient(zmq.Context.instance(), endpoint, key, timeout_s=timeout_s) as client:
        return bool(client.request("ping")["ok"])


def host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host, int(port)


@pytest.fixture
def agent() -> Iterator[Agent]:
    started = start_agent_thread(AgentConfig(url="tcp://127.0.0.1:0", key=KEY, local={"n": 1}))
    yield started
    started.stop.set()
    assert started.stopped.wait(30)


AGENT_SCRIPT = """
import sys, threading
from topology.agent import Agent, AgentConfig
agent = Agent(AgentConfig(url="tcp://127.0.0.1:0", key=sys.argv[1].encode(), local={},
                          handshake_timeout_s=float(sys.argv[2])))
print(agent.endpoint, flush=True)
threading.Thread(target=lambda: (sys.stdin.read(), agent.stop.set()), daemon=True).start()
agent.serve()
"""


@dataclass
class AgentProcess:
    endpoint: str
    process: psutil.Process

    def rss(self) -> int:
        return self.process.memory_info().rss


@contextlib.contextmanager
def agent_process(tmp_path: Path, handshake_timeout_s: float = 10.0) -> Iterator[AgentProcess]:
    """An agent in its own process (its RSS is only its own), stopped by closing stdin."""
    log = (tmp_path / "agent.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, KEY.decode(), str(handshake_timeout_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            assert selector.select(60), "the agent process did not start"
        endpoint = child.stdout.readline().strip()
        assert endpoint.startswith("tcp://127.0.0.1:"), (tmp_path / "agent.log").read_text()
        assert ping(endpoint)  # warm: lazy allocations happen before the baseline
        yield AgentProcess(endpoint, psutil.Process(child.pid))
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=30)
        log.close()


# --- raw ZMTP 3.0, as a peer without the token would speak it -------------------------------


def zmtp_greeting(mechanism: bytes) -> bytes:
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + bytes(32)


def zmtp_command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes([len(name)]) + name + body
    return bytes([0x04, len(data)]) + data


def zmtp_frame(data: bytes, more: bool = True) -> bytes:
    return bytes([0x02 | int(more)]) + struct.pack(">Q", len(data)) + data


def null_prelude() -> bytes:
    """A NULL-mechanism handshake: what any plain zmq peer without credentials sends."""
    socket_type = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    return zmtp_greeting(b"NULL") + zmtp_command(b"READY", socket_type)


def forged_plain_prelude() -> bytes:
    """A PLAIN handshake with a well-formed but wrongly signed credential."""
    user, password = credentials(b"not-the-token-" + b"x" * 20)
    hello = bytes([len(user)]) + user + bytes([len(password)]) + password
    return zmtp_greeting(b"PLAIN") + zmtp_command(b"HELLO", hello)


@dataclass
class Flood:
    sent: int = 0
    connections: int = 0
    peak_rss: int = 0


def flood_never_ending_message(
    target: AgentProcess, prelude: bytes, total: int, deadline_s: float
) -> Flood:
    """Send `total` bytes of one multipart message that never ends (every frame MORE),
    reconnecting whenever the agent drops the connection; sample the agent's RSS."""
    host, port = host_port(target.endpoint)
    chunk = zmtp_frame(b"x" * (32 * 1024))
    flood = Flood(peak_rss=target.rss())
    deadline = time.monotonic() + deadline_s
    while flood.sent < total and time.monotonic() < deadline:
        with socket.create_connection((host, port), timeout=10) as conn:
            flood.connections += 1
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.sendall(prelude)
                while flood.sent < total:
                    flood.sent += conn.send(chunk)
        flood.peak_rss = max(flood.peak_rss, target.rss())
    return flood


# --- 1. a peer without the token cannot make the agent buffer --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("prelude", [null_prelude, forged_plain_prelude],
                         ids=["null-mechanism", "forged-plain-credentials"])
def test_never_ending_message_without_token_keeps_memory_bounded(
    tmp_path: Path, prelude: Callable[[], bytes]
) -> None:
    with agent_process(tmp_path) as target:
        before = target.rss()
        flood = flood_never_ending_message(target, prelude(), FLOOD_BYTES, DEADLINE_S)
        after = target.rss()
        print(f"\n{prelude.__name__}: sent {flood.sent / MiB:.0f} MiB over {flood.connections} "
              f"connections; agent RSS {before / MiB:.1f} -> peak {flood.peak_rss / MiB:.1f}, "
              f"after {after / MiB:.1f} MiB")
        assert flood.sent >= 64 * MiB, "the flood did not get going"
        assert flood.peak_rss - before < MEMORY_BOUND
        assert ping(target.endpoint)


def stalled_connection(host: str, port: int) -> socket.socket:
    """A connection that starts the PLAIN handshake and stalls inside a 60 KiB frame."""
    conn = socket.create_connection((host, port), timeout=10)
    with contextlib.suppress(OSError):  # already dropped: it counts as closed below
        conn.sendall(zmtp_greeting(b"PLAIN") + b"\x06" + struct.pack(">Q", 65000) + b"y" * 60000)
    conn.setblocking(False)
    return conn


def closed_by_peer(conn: socket.socket) -> bool:
    try:
        while True:
            if conn.recv(4096) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.slow
def test_waiting_connections_are_capped(tmp_path: Path) -> None:
    """With a long handshake timeout, only the cap can close stalled connections."""
    count, cap = 200, MAX_UNAUTHENTICATED
    with agent_process(tmp_path, handshake_timeout_s=300) as target:
        before = target.rss()
        conns = [stalled_connection(*host_port(target.endpoint)) for _ in range(count)]
        try:
            assert wait_for(lambda: sum(map(closed_by_peer, conns)) >= count - cap, 60)
            assert target.rss() - before < MEMORY_BOUND
            assert ping(target.endpoint)
        finally:
            for conn in conns:
                conn.close()


def test_handshake_timeout_drops_a_stalled_connection() -> None:
    config = AgentConfig(url="tcp://127.0.0.1:0", key=KEY, local={}, handshake_timeout_s=2)
    started = start_agent_thread(config)
    try:
        conns = [stalled_connection(*host_port(started.endpoint)) for _ in range(3)]
        assert wait_for(lambda: all(map(closed_by_peer, conns)), 30)
        assert wait_for(lambda: started.waiting_connections == 0, 30)
        assert ping(started.endpoint)
        for conn in conns:
            conn.close()
    finally:
        started.stop.set()
        assert started.stopped.wait(30)


def test_zmq_peer_without_credentials_gets_nothing_through(agent: Agent) -> None:
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(agent.endpoint)
    dealer.send_multipart(sign(KEY, {"op": "ping"}))  # even a signed request needs the handshake
    assert not dealer.poll(1000)
    dealer.close(linger=0)
    assert ping(agent.endpoint)


def test_message_over_the_frame_cap_is_skipped_and_refused(agent: Agent) -> None:
    dealer = open_dealer(zmq.Context.instance(), agent.endpoint, KEY, timeout_s=5)
    dealer.send_multipart([b"x" * 1024] * (MAX_FRAMES + 20))
    assert dealer.poll(10_000)
    assert b"refused: message over" in dealer.recv_multipart()[0]
    dealer.close(linger=0)
    assert ping(agent.endpoint)


def test_bulk_sessions_are_capped(agent: Agent) -> None:
    with AgentClient(zmq.Context.instance(), agent.endpoint, KEY, timeout_s=5) as client:
        sessions = [client.request("push_begin", streams=1)["session"] for _ in range(16)]
        with pytest.raises(PeerError, match="busy: 16 bulk sessions"):
            client.request("push_begin", streams=1)
        client.request("push_stats", session=sessions[0])
        assert client.request("push_begin", streams=1)["ok"]


# --- 2. no signed request kills the agent ------------------------------------------------------


def signed_frames(raw: bytes, key: bytes = KEY) -> list[bytes]:
    return [raw, hmac.new(key, raw, hashlib.sha256).hexdigest().encode()]


def h(**fields: object) -> bytes:
    """A header with a fresh timestamp and nonce, and `fields`."""
    return json.dumps({"ts": time.time(), "nonce": os.urandom(12).hex(), **fields}).encode()


def lit(name: str, literal: str, **fields: object) -> bytes:
    """A header with `name` set to a raw JSON literal (NaN, Infinity, 1e400, ...)."""
    return h(**fields, **{name: "@@"}).replace(b'"@@"', literal.encode())


def stamp(**fields: object) -> bytes:
    """A header without the automatic timestamp (the case sets `ts` itself)."""
    return json.dumps({"nonce": os.urandom(12).hex(), **fields}).encode()


def nested(depth: int) -> bytes:
    return b'{"op":"ping","x":' + b"[" * depth + b"]" * depth + b"}"


BIG_INT = "9" * 5000
RUN = "0123456789abcdef"
PEER = "tcp://127.0.0.1:1"
MANY_HOSTS = [f"tcp://10.0.{i // 250}.{i % 250}:1" for i in range(2000)]

# Headers signed with the right token; every one must be answered with a refusal.
HEADERS: list[tuple[str, Callable[[], bytes]]] = [
    ("not json", lambda: b"not json at all"),
    ("non-utf8", lambda: b'{"op":"ping\xff\xfe"}'),
    ("json array", lambda: b'["ping", 1]'),
    ("json string", lambda: b'"ping"'),
    ("json null", lambda: b"null"),
    ("json number", lambda: b"42"),
    ("empty header", lambda: b""),
    ("deep nesting", lambda: nested(30_000)),
    ("op a number", lambda: h(op=5)),
    ("op missing", lambda: h()),
    ("op huge", lambda: h(op="p" * 60_000)),
    ("op unknown", lambda: h(op="run", command="rm -rf /")),
    ("op dunder", lambda: h(op="__class__")),
    ("ts NaN", lambda: lit("ts", "NaN", op="ping")),
    ("ts Infinity", lambda: lit("ts", "Infinity", op="ping")),
    ("ts -Infinity", lambda: lit("ts", "-Infinity", op="ping")),
    ("ts 1e400", lambda: lit("ts", "1e400", op="ping")),
    ("ts huge int", lambda: lit("ts", BIG_INT, op="ping")),
    ("ts 1e300", lambda: stamp(op="ping", ts=1e300)),
    ("ts negative", lambda: stamp(op="ping", ts=-1)),
    ("ts string", lambda: stamp(op="ping", ts="now")),
    ("ts bool", lambda: stamp(op="ping", ts=True)),
    ("ts null", lambda: stamp(op="ping", ts=None)),
    ("ts list", lambda: stamp(op="ping", ts=[1])),
    ("ts object", lambda: stamp(op="ping", ts={})),
    ("nonce number", lambda: h(op="ping", nonce=7)),
    ("nonce empty", lambda: h(op="ping", nonce="")),
    ("nonce huge", lambda: h(op="ping", nonce="n" * 50_000)),
    ("ping extra nested field", lambda: h(op="ping", x={"y": [{"z": 1}]})),
    ("local extra field", lambda: h(op="local", host="evil")),
    ("streams missing", lambda: h(op="push_begin")),
    ("streams string", lambda: h(op="push_begin", streams="4")),
    ("streams float", lambda: h(op="push_begin", streams=4.0)),
    ("streams bool", lambda: h(op="push_begin", streams=True)),
    ("streams zero", lambda: h(op="push_begin", streams=0)),
    ("streams negative", lambda: h(op="push_begin", streams=-1)),
    ("streams 17", lambda: h(op="push_begin", streams=17)),
    ("streams 10**30", lambda: h(op="push_begin", streams=10**30)),
    ("streams huge int", lambda: lit("streams", BIG_INT, op="push_begin")),
    ("streams Infinity", lambda: lit("streams", "Infinity", op="push_begin")),
    ("streams NaN", lambda: lit("streams", "NaN", op="push_begin")),
    ("streams null", lambda: h(op="push_begin", streams=None)),
    ("streams list", lambda: h(op="push_begin", streams=[4])),
    ("streams object", lambda: h(op="push_begin", streams={"n": 4})),
    ("session number", lambda: h(op="push_stats", session=5)),
    ("session null", lambda: h(op="push_stats", session=None)),
    ("session object", lambda: h(op="push_stats", session={"$ne": 1})),
    ("session path", lambda: h(op="push_stats", session="../../etc/passwd")),
    ("session huge", lambda: h(op="push_stats", session="a" * 60_000)),
    ("push_end session list", lambda: h(op="push_end", session=["a"])),
    ("measure no run", lambda: h(op="measure", peer=PEER)),
    ("measure peer number", lambda: h(op="measure", run=RUN, peer=7070)),
    ("measure peer ipc", lambda: h(op="measure", run=RUN, peer="ipc:///tmp/x")),
    ("measure peer inproc", lambda: h(op="measure", run=RUN, peer="inproc://zeromq.zap.01")),
    ("measure pings string", lambda: h(op="measure", run=RUN, peer=PEER, pings="many")),
    ("measure pings 10**6", lambda: h(op="measure", run=RUN, peer=PEER, pings=10**6)),
    ("measure seconds Infinity", lambda: lit("seconds", "Infinity", op="measure", run=RUN,
                                             peer=PEER)),
    ("measure seconds NaN", lambda: lit("seconds", "NaN", op="measure", run=RUN, peer=PEER)),
    ("measure seconds negative", lambda: h(op="measure", run=RUN, peer=PEER, seconds=-1)),
    ("measure timeout 1e9", lambda: h(op="measure", run=RUN, peer=PEER, timeout_s=1e9)),
    ("measure streams string", lambda: h(op="measure", run=RUN, peer=PEER, streams="4")),
    ("measure unknown field", lambda: h(op="measure", run=RUN, peer=PEER, command="id")),
    ("measure unknown run", lambda: h(op="measure", run=RUN, peer=PEER)),
    ("begin_run hosts string", lambda: h(op="begin_run", run=RUN, hosts="tcp://a:1")),
    ("begin_run hosts empty", lambda: h(op="begin_run", run=RUN, hosts=[])),
    ("begin_run host number", lambda: h(op="begin_run", run=RUN, hosts=[5])),
    ("begin_run host ipc", lambda: h(op="begin_run", run=RUN, hosts=["ipc:///x"])),
    ("begin_run too many hosts", lambda: h(op="begin_run", run=RUN, hosts=MANY_HOSTS)),
    ("begin_run bad id", lambda: h(op="begin_run", run="ZZ", hosts=["tcp://a:1"])),
]
# Messages of the wrong shape on an authenticated connection: refused too.
SHAPES: list[tuple[str, Callable[[], list[bytes]]]] = [
    ("bad signature", lambda: [h(op="ping"), b"0" * 64]),
    ("no signature frame", lambda: [h(op="ping")]),
    ("three frames, not a chunk", lambda: [*sign(KEY, {"op": "ping"}), b"extra"]),
]
# Chunks are never answered (fire and forget); the agent must simply survive them.
SILENT: list[tuple[str, Callable[[], list[bytes]]]] = [
    ("chunk unknown session", lambda: [b"chunk", b"0" * 32, b"x" * 1024]),
    ("chunk huge session", lambda: [b"chunk", b"s" * 60_000, b"x"]),
    ("chunk empty", lambda: [b"chunk", b"", b""]),
]


def refusal_of(frames: list[bytes]) -> dict[str, object]:
    """The reply as a dict: signed (verified) or the agent's unsigned refusal."""
    try:
        return Verifier(KEY).verify(frames)
    except ProtocolError:
        return json.loads(frames[0])


def test_every_hostile_request_is_refused_and_the_agent_lives(agent: Agent) -> None:
    answered = [(name, lambda make=make: signed_frames(make())) for name, make in HEADERS]
    dealer = open_dealer(zmq.Context.instance(), agent.endpoint, KEY, timeout_s=5)
    try:
        for name, frames in [*answered, *SHAPES]:
            dealer.send_multipart(frames())
            assert dealer.poll(10_000), f"{name}: no reply"
            reply = refusal_of(dealer.recv_multipart())
            assert reply["ok"] is False, name
            error = str(reply["error"])
            assert "\n" not in error and len(error) < 400, f"{name}: {error[:500]}"
            assert ping(agent.endpoint), name
        for name, frames in SILENT:
            dealer.send_multipart(frames())
            assert ping(agent.endpoint), name
    finally:
        dealer.close(linger=0)
    print(f"\n{len(HEADERS) + len(SHAPES) + len(SILENT)} hostile requests, agent alive after each")


def test_hostile_replies_name_the_field(agent: Agent) -> None:
    with AgentClient(zmq.Context.instance(), agent.endpoint, KEY, timeout_s=5) as client:
        with pytest.raises(PeerError, match="bad push_begin request: streams: .*less than or"):
            client.request("push_begin", streams=10**30)
        with pytest.raises(PeerError, match="bad push_begin request: streams: .*valid integer"):
            client.request("push_begin", streams="4")
        with pytest.raises(PeerError, match="bad measure request: peer: .*tcp://HOST:PORT"):
            client.request("measure", run=RUN, peer="ipc:///run/docker.sock")


# --- 3. replays across restarts, and timestamps that are not finite numbers ------------------


def bind_agent(port: int) -> Agent:
    """A new agent on `port`, retried until the previous one's port is free."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return start_agent_thread(AgentConfig(url=f"tcp://127.0.0.1:{port}", key=KEY,
                                                  local={}))
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def exchange(endpoint: str, frames: list[bytes]) -> dict[str, object]:
    dealer = open_dealer(zmq.Context.instance(), endpoint, KEY, timeout_s=5)
    try:
        dealer.send_multipart(frames)
        assert dealer.poll(10_000)
        return refusal_of(dealer.recv_multipart())
    finally:
        dealer.close(linger=0)


def test_request_captured_before_a_restart_is_refused_after_it() -> None:
    first = start_agent_thread(AgentConfig(url="tcp://127.0.0.1:0", key=KEY, local={}))
    port = host_port(first.endpoint)[1]
    captured = sign(KEY, {"op": "push_begin", "streams": 1})
    assert exchange(first.endpoint, captured)["ok"] is True
    assert "repeated nonce" in str(exchange(first.endpoint, captured)["error"])
    first.stop.set()
    assert first.stopped.wait(30)
    second = bind_agent(port)
    try:
        assert second.endpoint == first.endpoint
        reply = exchange(second.endpoint, captured)
        assert reply["ok"] is False and "signed before this agent started" in str(reply["error"])
        assert ping(second.endpoint)
    finally:
        second.stop.set()
        assert second.stopped.wait(30)


def handshake(endpoint: str, user: bytes, password: bytes) -> int:
    """The monitor event that ends a PLAIN handshake with these credentials."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.PLAIN_USERNAME, user)
    dealer.setsockopt(zmq.PLAIN_PASSWORD, password)
    monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                        | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        dealer.connect(endpoint)
        assert monitor.poll(10_000), "the handshake neither succeeded nor failed"
        return int(recv_monitor_message(monitor)["event"])
    finally:
        dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=0)


def test_handshake_captured_before_a_restart_is_refused_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = start_agent_thread(AgentConfig(url="tcp://127.0.0.1:0", key=KEY, local={}))
    port = host_port(first.endpoint)[1]
    captured = credentials(KEY)
    assert handshake(first.endpoint, *captured) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    first.stop.set()
    assert first.stopped.wait(30)
    second = bind_agent(port)
    try:
        assert handshake(second.endpoint, *captured) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert second.refused == 1
        assert "signed before this agent started" in caplog.text
        assert ping(second.endpoint)
    finally:
        second.stop.set()
        assert second.stopped.wait(30)


def test_a_handshake_credential_works_once(agent: Agent) -> None:
    user, password = credentials(KEY)
    assert handshake(agent.endpoint, user, password) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert handshake(agent.endpoint, user, password) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert agent.refused == 1


@pytest.mark.parametrize("ts", [math.nan, math.inf, -math.inf, "1700000000", True, None, [1]],
                         ids=["nan", "inf", "-inf", "string", "bool", "null", "list"])
def test_verifier_accepts_only_finite_numeric_timestamps(ts: object) -> None:
    with pytest.raises(ProtocolError, match="timestamp|not JSON"):
        Verifier(KEY).verify(signed_frames(stamp(op="ping", ts=ts)))


def test_verifier_refuses_what_was_signed_before_not_before() -> None:
    frames = sign(KEY, {"op": "ping"})
    with pytest.raises(ProtocolError, match="signed before this agent started"):
        Verifier(KEY, not_before=time.time() + 1).verify(frames)
    assert Verifier(KEY, not_before=time.time() - 1).verify(frames)["op"] == "ping"


# --- 4. the token file -------------------------------------------------------------------------


def hetsched(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_token_is_private_from_its_first_byte(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret is written into a file that is already 0600, even under umask 000."""
    modes: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    old = os.umask(0)
    try:
        write_token(tmp_path / "token")
    finally:
        os.umask(old)
    assert modes == [0o600]
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token"]  # no temporary file left


def test_probe_token_never_overwrites_unless_forced(tmp_path: Path) -> None:
    token = tmp_path / "keys" / "probe.token"
    assert hetsched("probe", "token", "-o", str(token)).returncode == 0
    first = token.read_text()
    line = one_line_error(hetsched("probe", "token", "-o", str(token)))
    assert str(token) in line and "--force" in line
    assert token.read_text() == first
    assert hetsched("probe", "token", "-o", str(token), "--force").returncode == 0
    assert token.read_text() != first
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(list(token.parent.iterdir())) == 1


def test_probe_token_refuses_to_replace_what_is_not_a_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    line = one_line_error(hetsched("probe", "token", "-o", str(fifo), "--force"))
    assert str(fifo) in line and "not a regular file" in line
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def open_token(tmp_path: Path, mode: int) -> Path:
    token = tmp_path / "open.token"
    token.write_text("t" * 64 + "\n")
    token.chmod(mode)
    return token


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_token_refuses_a_file_open_to_others(tmp_path: Path, mode: int) -> None:
    token = open_token(tmp_path, mode)
    with pytest.raises(InputError, match=f"{OPEN_TOKEN_FLAG}"):
        load_token(token)
    assert load_token(token, allow_open=True) == b"t" * 64


def test_agent_and_coordinator_refuse_an_open_token_file(tmp_path: Path) -> None:
    token = open_token(tmp_path, 0o644)
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(yaml.safe_dump({"version": 1, "hosts": [{"name": "a",
                                                              "address": "127.0.0.1:1"}]}))
    agent_line = one_line_error(hetsched("probe", "agent", "--no-flops", "--listen",
                                         "127.0.0.1:7070", "--token-file", str(token)))
    run_line = one_line_error(hetsched("probe", "run", str(hosts), "-o",
                                       str(tmp_path / "t.yaml"), "--token-file", str(token)))
    for line in (agent_line, run_line):
        assert str(token) in line and OPEN_TOKEN_FLAG in line and "0644" in line
    assert not (tmp_path / "t.yaml").exists()


@pytest.mark.slow
def test_allow_open_token_lets_the_agent_start(tmp_path: Path) -> None:
    token = open_token(tmp_path, 0o644)
    log = tmp_path / "agent.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-m", "cli", "probe", "agent", "--no-flops",
                                  "--listen", f"127.0.0.1:{port}", "--token-file", str(token),
                                  OPEN_TOKEN_FLAG], stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "agent listening on" in log.read_text()
                        or child.poll() is not None, 120)
        assert "agent listening on" in log.read_text(), log.read_text()
    finally:
        child.terminate()
        child.wait(timeout=30)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_token_file_that_is_not_a_regular_file_is_refused_without_blocking(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    line = one_line_error(hetsched("probe", "agent", "--no-flops", "--listen", "127.0.0.1:7070",
                                   "--token-file", str(path), timeout=60))
    assert str(path) in line and "not a regular file" in line


def test_token_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a regular file"):
        load_token(tmp_path)


# --- 5. measure targets ------------------------------------------------------------------------


@pytest.fixture
def two_agents() -> Iterator[tuple[Agent, Agent]]:
    pair = tuple(start_agent_thread(AgentConfig(url="tcp://127.0.0.1:0", key=KEY, local={}))
                 for _ in range(2))
    yield pair
    for started in pair:
        started.stop.set()
    for started in pair:
        assert started.stopped.wait(60)


def test_measure_only_targets_hosts_of_the_declared_run(two_agents: tuple[Agent, Agent]) -> None:
    a, b = two_agents
    with socket.socket() as outsider:
        outsider.bind(("127.0.0.1", 0))
        outsider.listen()
        outsider.setblocking(False)
        outside = f"tcp://127.0.0.1:{outsider.getsockname()[1]}"
        with AgentClient(zmq.Context.instance(), a.endpoint, KEY, timeout_s=30) as client:
            client.request("begin_run", run=RUN, hosts=[a.endpoint, b.endpoint])
            refused = {
                "ipc:///tmp/hetsched-probe.sock": "peer: .*not a tcp://HOST:PORT",
                "inproc://zeromq.zap.01": "peer: .*not a tcp://HOST:PORT",
                "tcp://*:7070": "peer: .*not a tcp://HOST:PORT",
                "tcp://0.0.0.0:7070": "peer: .*not a host address",
                outside: "is not a host of run",
            }
            for peer, why in refused.items():
                with pytest.raises(PeerError, match=why):
                    client.request("measure", run=RUN, peer=peer, seconds=0.2, pings=3)
            with pytest.raises(PeerError, match="unknown run"):
                client.request("measure", run="f" * 16, peer=b.endpoint, seconds=0.2, pings=3)
            with pytest.raises(PeerError, match="hosts: entry 1: not a tcp"):
                client.request("begin_run", run=RUN, hosts=[a.endpoint, "ipc:///x"])
            result = client.request("measure", run=RUN, peer=b.endpoint, seconds=0.2, pings=3,
                                    streams=2, timeout_s=10)["result"]
        assert result["push"]["bytes"] > 0 and result["pings"] == 3
        with pytest.raises(BlockingIOError):
            outsider.accept()  # the agent never connected to the host outside the run
