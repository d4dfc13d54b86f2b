"""topology.protocol and topology.agent: signatures, replays, refusals, size caps."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from topology.agent import Agent, AgentConfig, start_agent_thread
from topology.errors import InputError
from topology.peer import AgentClient, measure_peer, open_dealer, receive_reply, send_signed
from topology.protocol import (
    PeerError,
    ProtocolError,
    Verifier,
    load_token,
    parse_endpoint,
    sign,
    zmq_url,
)

KEY = b"k" * 32


@pytest.fixture
def agent() -> Iterator[Agent]:
    started = start_agent_thread(
        AgentConfig(url="tcp://127.0.0.1:0", key=KEY, local={"name": "here"}, idle_timeout_s=1)
    )
    yield started
    started.stop.set()


def test_signed_header_verifies_once() -> None:
    frames = sign(KEY, {"op": "ping"})
    verifier = Verifier(KEY)
    assert verifier.verify(frames)["op"] == "ping"
    with pytest.raises(ProtocolError, match="replay"):
        verifier.verify(frames)


def test_wrong_key_and_tampering_are_rejected() -> None:
    frames = sign(KEY, {"op": "ping"})
    with pytest.raises(ProtocolError, match="bad signature"):
        Verifier(b"x" * 32).verify(frames)
    tampered = [frames[0].replace(b"ping", b"pong"), frames[1]]
    with pytest.raises(ProtocolError, match="bad signature"):
        Verifier(KEY).verify(tampered)
    with pytest.raises(ProtocolError, match="missing"):
        Verifier(KEY).verify(frames[:1])


def test_stale_timestamp_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = sign(KEY, {"op": "ping"})
    later = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(ProtocolError, match="window"):
        Verifier(KEY).verify(frames)


def test_agent_answers_signed_requests(agent: Agent) -> None:
    with AgentClient(zmq.Context.instance(), agent.endpoint, KEY, timeout_s=5) as client:
        assert client.request("ping")["ok"]
        assert client.request("local")["host"] == {"name": "here"}
        with pytest.raises(PeerError, match="unknown request 'run'"):
            client.request("run", command="rm -rf /")


def test_agent_refuses_bad_token_at_the_handshake_and_counts_it(agent: Agent) -> None:
    client = AgentClient(zmq.Context.instance(), agent.endpoint, b"w" * 32, timeout_s=5)
    with client, pytest.raises(PeerError, match="refused the connection: wrong token"):
        client.request("ping")
    assert agent.refused >= 1


def test_agent_refuses_unsigned_frames_on_an_authenticated_connection(agent: Agent) -> None:
    socket = open_dealer(zmq.Context.instance(), agent.endpoint, KEY, timeout_s=5)
    socket.send_multipart([b'{"op": "ping"}'])
    assert socket.poll(5000)
    assert b"refused" in socket.recv_multipart()[0]
    socket.close(linger=0)


def test_oversized_chunk_is_dropped(agent: Agent) -> None:
    ctx = zmq.Context.instance()
    with AgentClient(ctx, agent.endpoint, KEY, timeout_s=5) as client:
        session = client.request("push_begin", streams=2)["session"]
        big = open_dealer(ctx, agent.endpoint, KEY, timeout_s=5)
        small = open_dealer(ctx, agent.endpoint, KEY, timeout_s=5)
        monitor = big.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        big.send_multipart([b"chunk", session.encode(), b"x" * (8 * 1024 * 1024)])
        assert monitor.poll(10_000), "the agent kept a peer that sent an oversized frame"
        small.send_multipart([b"chunk", session.encode(), b"y" * 1024])
        send_signed(small, KEY, agent.endpoint, {"op": "push_end", "session": session})
        receive_reply(small, Verifier(KEY), agent.endpoint, 5)  # the chunk was taken in first
        assert client.request("push_stats", session=session)["bytes"] == 1024
        big.disable_monitor()
        for socket in (monitor, big, small):
            socket.close(linger=0)


def test_idle_push_session_expires(agent: Agent) -> None:
    with AgentClient(zmq.Context.instance(), agent.endpoint, KEY, timeout_s=5) as client:
        session = client.request("push_begin", streams=1)["session"]
        time.sleep(1.6)
        with pytest.raises(PeerError, match="unknown or expired"):
            client.request("push_stats", session=session)


def test_measure_between_two_agents_on_loopback(agent: Agent) -> None:
    other = start_agent_thread(AgentConfig(url="tcp://127.0.0.1:0", key=KEY, local={}))
    try:
        result = measure_peer(
            zmq.Context.instance(), agent.endpoint, KEY,
            pings=10, seconds=0.3, streams=2, timeout_s=5,
        )
    finally:
        other.stop.set()
    assert result.pings == 10
    assert 0 < result.latency_ms < 50
    assert result.push.bytes > 0 and result.push.receiver_gbps > 0


def test_timeout_names_the_silent_peer() -> None:
    """A peer that accepts the handshake and then never answers."""
    context = zmq.Context()
    zap = context.socket(zmq.REP)
    zap.bind("inproc://zeromq.zap.01")
    silent = context.socket(zmq.ROUTER)
    silent.setsockopt(zmq.PLAIN_SERVER, 1)
    port = silent.bind_to_random_port("tcp://127.0.0.1")

    def accept_one() -> None:
        if zap.poll(10_000):
            request = zap.recv_multipart()
            zap.send_multipart([b"1.0", request[1], b"200", b"OK", b"", b""])

    handshake = threading.Thread(target=accept_one, daemon=True)
    handshake.start()
    url = f"tcp://127.0.0.1:{port}"
    client = AgentClient(zmq.Context.instance(), url, KEY, timeout_s=5)
    with client, pytest.raises(PeerError, match=f"no answer from {url} within 0.3 s"):
        client.request("ping", timeout_s=0.3)
    handshake.join(timeout=10)
    context.destroy(linger=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.0.0.1", ("10.0.0.1", 7070)), ("10.0.0.1:9", ("10.0.0.1", 9)),
     ("[fe80::1]:7071", ("fe80::1", 7071)), ("host-a", ("host-a", 7070))],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "a:b", "a:70000"])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_zmq_url_brackets_ipv6() -> None:
    assert zmq_url("fe80::1", 7) == "tcp://[fe80::1]:7"


def test_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="token file not found"):
        load_token(tmp_path / "none")
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(InputError, match="too short"):
        load_token(short)
