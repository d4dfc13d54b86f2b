"""The probe wire protocol: signed request/reply frames over pyzmq, and the shared token.

A message is two or three zmq frames: a JSON header, its HMAC-SHA256 under the shared
token (hex), and for bulk-transfer chunks a payload. The header always carries `op`, a
timestamp `ts` and a random `nonce`; the receiver checks the MAC, that the header is a
JSON object with finite numbers only, the clock window, and that the nonce was not seen
before (no replays). Payloads are not MAC'd (that would cost a core at 10 Gbit/s); a
chunk is only counted when it names a bulk session the agent handed out to an
authenticated client, and its size is capped.

Connections are authenticated before any message is accepted: the client's zmq PLAIN
handshake carries a signed header (`op: connect`) as user name and its MAC as password,
checked by the agent like a request (`credentials`, `Verifier.verify_credentials`).
Each credential is good for one connection; an eavesdropper who replays it is refused.

The token file is created mode 0600 from its first byte (`write_token`), and a token
file that group or others may read or write is refused unless the caller allows it
(`load_token`).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topology.errors import InputError

MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 64 * 1024
# zmq's per-frame cap: also what one unauthenticated connection can make zmq buffer.
MAX_FRAME_BYTES = max(MAX_HEADER_BYTES, MAX_CHUNK_BYTES)
MAX_NONCE_CHARS = 64
MAX_TOKEN_FILE_BYTES = 4096
CLOCK_WINDOW_S = 300.0
DEFAULT_PORT = 7070
HANDSHAKE_OP = "connect"
OPEN_TOKEN_FLAG = "--allow-open-token"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$")
_TCP_URL = re.compile(r"^tcp://(?:\[([0-9A-Za-z:.%]+)\]|([^\[\]:;/*]+)):([0-9]{1,5})$")


class ProtocolError(Exception):
    """A frame that is malformed, too large, unsigned, badly signed or replayed."""


class PeerError(Exception):
    """A peer agent did not answer in time, or answered with an error."""


def load_token(path: str | Path, allow_open: bool = False) -> bytes:
    """Read the shared token from `path` (surrounding whitespace ignored).

    Refuses anything but a small regular file, and a file whose mode lets group or
    others read or write it unless `allow_open`.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError("token file not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read token file: {exc.strerror}", path) from None
    try:
        _check_token_file(path, os.fstat(fd), allow_open)
        token = os.read(fd, MAX_TOKEN_FILE_BYTES + 1).strip()
    finally:
        os.close(fd)
    if len(token) < 16:
        raise InputError("token is too short (need at least 16 characters)", path)
    return token


def _check_token_file(path: Path, info: os.stat_result, allow_open: bool) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise InputError("token file is not a regular file", path)
    if info.st_size > MAX_TOKEN_FILE_BYTES:
        raise InputError(f"token file is larger than {MAX_TOKEN_FILE_BYTES} bytes", path)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077 and not allow_open:
        raise InputError(f"token file is open to group or others (mode {mode:04o}): "
                         f"chmod 600 it, or pass {OPEN_TOKEN_FLAG}", path)


def new_token() -> str:
    return secrets.token_hex(32)


def write_token(path: str | Path, force: bool = False) -> None:
    """Write a new token to `path`, mode 0600 from its first byte, then move it in place.

    An existing file is kept unless `force`, and even then only a regular file is
    replaced (never a device node, folder or socket). Nothing is left behind on failure.
    """
    path = Path(path)
    _check_token_target(path, force)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise InputError(f"cannot create token file: {exc.strerror}", path) from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(new_token() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _move_into_place(tmp, path, force)
    finally:
        tmp.unlink(missing_ok=True)


def _check_token_target(path: Path, force: bool) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not force:
        raise InputError("token file exists; pass --force to replace it", path)
    if not stat.S_ISREG(info.st_mode):
        raise InputError("not a regular file; refusing to replace it with a token", path)


def _move_into_place(tmp: Path, path: Path, force: bool) -> None:
    """Rename `tmp` to `path`; without `force`, never over a file that appeared meanwhile."""
    try:
        if force:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            _check_token_target(path, force=False)  # no hard links here: check, then rename
            os.rename(tmp, path)
    except FileExistsError:
        raise InputError("token file exists; pass --force to replace it", path) from None
    except OSError as exc:
        raise InputError(f"cannot create token file: {exc.strerror}", path) from None


def sign(key: bytes, header: dict[str, Any]) -> list[bytes]:
    """The two signed frames for `header`, adding a timestamp and a nonce."""
    header = {**header, "ts": time.time(), "nonce": secrets.token_hex(12)}
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return [raw, hmac.new(key, raw, hashlib.sha256).hexdigest().encode()]


def credentials(key: bytes) -> tuple[bytes, bytes]:
    """A one-connection PLAIN user name and password: a signed `connect` header and its MAC."""
    raw, mac = sign(key, {"op": HANDSHAKE_OP})
    return raw, mac


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number")


@dataclass
class Verifier:
    """Checks signatures, clock window and nonces of incoming headers.

    `not_before` (seconds since the epoch) refuses anything signed earlier: an agent sets
    it to its start time, so what was captured before a restart cannot be replayed after
    it even though the nonces seen before the restart are forgotten.
    """

    key: bytes
    window_s: float = CLOCK_WINDOW_S
    not_before: float = -math.inf
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
        header = _parse_header(raw)
        self._check_fresh(header)
        return header

    def verify_credentials(self, username: bytes, password: bytes) -> None:
        """Check a PLAIN handshake's credentials (see `credentials`)."""
        if self.verify([username, password])["op"] != HANDSHAKE_OP:
            raise ProtocolError("credentials are not a connect header")

    def _check_fresh(self, header: dict[str, Any]) -> None:
        now = time.time()
        ts = _finite_timestamp(header.get("ts"))
        if ts < self.not_before:
            raise ProtocolError("signed before this agent started (replay across a restart, "
                                "or the signer's clock is behind)")
        if abs(now - ts) > self.window_s:
            raise ProtocolError("timestamp outside the accepted window (clock skew or replay)")
        nonce = header.get("nonce")
        if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE_CHARS:
            raise ProtocolError("missing or malformed nonce")
        if nonce in self._seen:
            raise ProtocolError("repeated nonce (replay)")
        self._seen[nonce] = now
        if len(self._seen) > 100_000:
            self._seen = {n: t for n, t in self._seen.items() if now - t < self.window_s}


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not JSON: {str(exc)[:80]}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ProtocolError("header is not a request (an object with a string 'op')")
    return header


def _finite_timestamp(ts: object) -> float:
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ProtocolError("timestamp missing or not a number")
    try:
        value = float(ts)
    except OverflowError:
        raise ProtocolError("timestamp out of range") from None
    if not math.isfinite(value):
        raise ProtocolError("timestamp is not a finite number")
    return value


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


def parse_tcp_target(url: object) -> tuple[str, int]:
    """(host, port) of `tcp://HOST:PORT`, HOST an IP literal or a host name; else ValueError.

    Nothing else zmq can connect to passes: no ipc://, inproc:// or other transports,
    no wildcard or source-address forms (`*`, `iface;host`), no unspecified or multicast
    addresses. IP literals come back in canonical form and names in lower case, so two
    spellings of one endpoint compare equal.
    """
    match = _TCP_URL.match(url) if isinstance(url, str) and len(url) <= 300 else None
    if match is None:
        raise ValueError("not a tcp://HOST:PORT endpoint")
    host, port = match.group(1) or match.group(2), int(match.group(3))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return _canonical_host(host), port


def _canonical_host(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _NAME.match(host) or ".." in host:
            raise ValueError(f"'{host[:60]}' is neither an IP address nor a host name") from None
        return host.lower()
    if address.is_unspecified or address.is_multicast:
        raise ValueError(f"{address} is not a host address")
    return str(address)


def zmq_url(addr: str, port: int) -> str:
    return f"tcp://[{addr}]:{port}" if ":" in addr else f"tcp://{addr}:{port}"


def payload(size: int) -> bytes:
    """Incompressible filler for bulk transfers."""
    return os.urandom(size)
