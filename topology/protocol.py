"""The probe wire protocol: signed request/reply frames over pyzmq.

A message is two or three zmq frames: a JSON header, its HMAC-SHA256 under the shared
token (hex), and for bulk-transfer chunks a payload. The header always carries `op`, a
timestamp `ts` and a random `nonce`; the receiver checks the MAC, the clock window and
that the nonce was not seen before (no replays). Payloads are not MAC'd (that would cost
a core at 10 Gbit/s); a chunk is only counted when its signed header names a bulk
session the agent handed out to an authenticated client, and its size is capped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topology.errors import InputError

MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
CLOCK_WINDOW_S = 300.0
DEFAULT_PORT = 7070


class ProtocolError(Exception):
    """A frame that is malformed, too large, unsigned, badly signed or replayed."""


class PeerError(Exception):
    """A peer agent did not answer in time, or answered with an error."""


def load_token(path: str | Path) -> bytes:
    """Read the shared token from `path` (surrounding whitespace ignored)."""
    path = Path(path)
    try:
        token = path.read_bytes().strip()
    except FileNotFoundError:
        raise InputError("token file not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read token file: {exc.strerror}", path) from None
    if len(token) < 16:
        raise InputError("token is too short (need at least 16 characters)", path)
    return token


def new_token() -> str:
    return secrets.token_hex(32)


def sign(key: bytes, header: dict[str, Any]) -> list[bytes]:
    """The two signed frames for `header`, adding a timestamp and a nonce."""
    header = {**header, "ts": time.time(), "nonce": secrets.token_hex(12)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return [raw, hmac.new(key, raw, hashlib.sha256).hexdigest().encode()]


@dataclass
class Verifier:
    """Checks signatures, clock window and nonces of incoming headers."""

    key: bytes
    window_s: float = CLOCK_WINDOW_S
    _seen: dict[str, float] = field(default_factory=dict)

    def verify(self, frames: list[bytes]) -> dict[str, Any]:
        if len(frames) < 2:
            raise ProtocolError("missing header or signature frame")
        raw, mac = bytes(frames[0]), bytes(frames[1])
        if len(raw) > MAX_HEADER_BYTES:
            raise ProtocolError("header too large")
        expected = hmac.new(self.key, raw, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(expected, mac):
            raise ProtocolError("bad signature (wrong or missing token)")
        header = json.loads(raw)
        if not isinstance(header, dict) or not isinstance(header.get("op"), str):
            raise ProtocolError("header is not a request")
        self._check_fresh(header)
        return header

    def _check_fresh(self, header: dict[str, Any]) -> None:
        now = time.time()
        ts, nonce = header.get("ts"), header.get("nonce")
        if not isinstance(ts, int | float) or abs(now - ts) > self.window_s:
            raise ProtocolError("timestamp outside the accepted window (clock skew or replay)")
        if not isinstance(nonce, str) or nonce in self._seen:
            raise ProtocolError("missing or repeated nonce (replay)")
        self._seen[nonce] = now
        if len(self._seen) > 100_000:
            self._seen = {n: t for n, t in self._seen.items() if now - t < self.window_s}


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split `ADDR[:PORT]` or `[V6ADDR]:PORT` into (address, port)."""
    text = text.strip()
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        addr, port_text = text.split(":")
    else:
        addr, port_text = text, ""
    if not addr:
        raise ValueError(f"no address in '{text}'")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"bad port in '{text}'") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in '{text}'")
    return addr, port


def zmq_url(addr: str, port: int) -> str:
    return f"tcp://[{addr}]:{port}" if ":" in addr else f"tcp://{addr}:{port}"


def payload(size: int) -> bytes:
    """Incompressible filler for bulk transfers."""
    return os.urandom(size)
