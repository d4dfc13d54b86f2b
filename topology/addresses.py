"""What an address in a hetsched file may be: a host, or a host with a port (an endpoint).

A host is an IPv4 address, an IPv6 address (a zone such as `%eth0` allowed) or a DNS
name (labels of letters, digits, `-` and `_`, not starting with `-`). An endpoint is a
host with an optional port: `10.0.0.1`, `10.0.0.1:7070`, `node-3.example:7070`,
`[fe80::1]:7070`, or a bare IPv6 address without a port. Anything else (a missing
bracket, a space, shell syntax such as `$(...)`) is refused when the file is loaded,
so it never reaches zmq, torchrun or ssh. `Host` and `Endpoint` are the annotated
string types the schemas use.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator

MAX_NAME_LENGTH = 253
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def check_host(text: str) -> str:
    """`text` if it is an IP address or a DNS name, else ValueError saying why."""
    if _is_ip(text):
        return text
    if len(text) > MAX_NAME_LENGTH or not _DNS_NAME.fullmatch(text):
        raise ValueError(f"{_quote(text)} is not an IP address or a host name")
    return text


def split_endpoint(text: str, default_port: int) -> tuple[str, int]:
    """`HOST[:PORT]`, `[IPV6]:PORT` or a bare IPv6 address as (host, port)."""
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"{_quote(text)} opens '[' without closing it")
        if not _is_ip(inside) or ":" not in inside:
            raise ValueError(f"{_quote(text)}: only an IPv6 address goes inside [ ]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{_quote(text)}: expected ':PORT' after ']'")
        return inside, _port(rest[1:], text) if rest else default_port
    if text.count(":") > 1:
        if not _is_ip(text):
            raise ValueError(f"{_quote(text)} is not an IPv6 address (write [ADDRESS]:PORT)")
        return text, default_port
    host, colon, port = text.partition(":")
    return check_host(host), _port(port, text) if colon else default_port


def check_endpoint(text: str) -> str:
    split_endpoint(text, 1)
    return text


def _port(text: str, whole: str) -> int:
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise ValueError(f"port out of range in {_quote(whole)} (a number in [1, 65535])")
    return int(text)


def _quote(text: str) -> str:
    """`text` quoted for an error line: escapes shown, at most about 60 characters."""
    return repr(text) if len(text) <= 60 else f"{text[:57]!r}..."


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


Host = Annotated[str, AfterValidator(check_host)]
Endpoint = Annotated[str, AfterValidator(check_endpoint)]
