"""Admission of inbound connections to the agent: a cap on those not yet authenticated.

libzmq authenticates a connection (the signed PLAIN handshake) before it accepts any
message from it, caps each frame (MAXMSGSIZE) and drops a connection that has not
finished its handshake within HANDSHAKE_IVL. What it does not cap is how many
connections may be in that state at once, and each can hold up to one frame in memory.
`AdmissionGuard` adds that cap: it follows the socket's monitor (a connection is
accepted with its descriptor, later disconnected), counts a connection as admitted once
a message arrives from its descriptor (zmq's SRCFD), and when more than `limit` are
waiting it shuts the oldest down. libzmq then sees an ordinary reset and cleans up.

A shutdown goes through a duplicate of the descriptor, and only after checking that it
is still the same TCP connection (same local and peer address as when it was accepted),
so a descriptor number reused by another connection is never touched.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("hetsched.agent")

Address = tuple[object, ...]


@dataclass(frozen=True)
class Waiting:
    """A connection accepted but not yet seen sending: when, and which TCP connection."""

    since: float
    local: Address
    peer: Address


class AdmissionGuard:
    """Keeps at most `limit` inbound connections of `zsocket` waiting for admission."""

    def __init__(self, zsocket: zmq.Socket, port: int, limit: int, forget_after_s: float):
        self.monitor = zsocket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._zsocket = zsocket
        self._port = port
        self._limit = limit
        self._forget_after_s = forget_after_s
        self._waiting: OrderedDict[int, Waiting] = OrderedDict()
        self._admitted: set[int] = set()
        self.dropped = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def drain(self) -> None:
        """Take in every queued accept and disconnect event."""
        while self.monitor.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self.monitor)
            fd = int(event["value"])
            self._waiting.pop(fd, None)
            self._admitted.discard(fd)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._track(fd)

    def admitted(self, fd: int) -> None:
        """A message came from descriptor `fd`: its connection passed the handshake."""
        if fd in self._admitted:
            return
        self.drain()  # its accept event was queued before the message: take it in first
        self._waiting.pop(fd, None)
        self._admitted.add(fd)

    def enforce(self) -> None:
        """Shut the oldest waiting connections down until at most `limit` remain."""
        now = time.monotonic()
        for fd, waiting in list(self._waiting.items()):
            if now - waiting.since > self._forget_after_s:
                del self._waiting[fd]  # libzmq drops unauthenticated ones by now
        while len(self._waiting) > self._limit:
            fd, waiting = self._waiting.popitem(last=False)
            if _shut_down(fd, waiting):
                self.dropped += 1
                log.warning("dropped a connection from %s: more than %d connections waiting "
                            "to authenticate", waiting.peer[0], self._limit)

    def close(self) -> None:
        self._zsocket.disable_monitor()
        self.monitor.close(linger=0)

    def _track(self, fd: int) -> None:
        addresses = _addresses(fd)
        if addresses is not None and addresses[0][1] == self._port:
            self._waiting[fd] = Waiting(time.monotonic(), *addresses)


def _duplicate(fd: int) -> socket.socket | None:
    """A socket object on a duplicate of `fd` (closing it leaves `fd` open), or None."""
    try:
        copy = os.dup(fd)
    except OSError:
        return None
    try:
        return socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        return None


def _addresses(fd: int) -> tuple[Address, Address] | None:
    """(local, peer) address of the TCP connection on `fd`, or None if there is none."""
    conn = _duplicate(fd)
    if conn is None:
        return None
    with conn:
        try:
            return conn.getsockname(), conn.getpeername()
        except OSError:
            return None


def _shut_down(fd: int, waiting: Waiting) -> bool:
    """Shut the connection on `fd` down if it is still the one described by `waiting`."""
    conn = _duplicate(fd)
    if conn is None:
        return False
    with conn:
        try:
            if (conn.getsockname(), conn.getpeername()) != (waiting.local, waiting.peer):
                return False
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
    return True
