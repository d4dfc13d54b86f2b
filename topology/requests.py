"""The requests a probe agent accepts: each field's type and range, checked before use.

Every request header is validated strictly against its model here (no coercion: a
string is not a number, `true` is not 1, NaN and infinities are refused, unknown fields
are errors), so the agent's handlers only ever see values inside the documented bounds.
`parse_request` turns any failure into one line naming the field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from topology.protocol import parse_tcp_target
from topology.validation import describe_validation_error

MAX_STREAMS = 16
MAX_PUSH_SECONDS = 30.0
MAX_PINGS = 1000
MAX_MEASURE_TIMEOUT_S = 120.0
MAX_RUN_HOSTS = 1024
RUN_ID = r"^[0-9a-f]{8,64}$"
SESSION_ID = r"^[0-9a-f]{32}$"

Endpoint = Annotated[str, Field(max_length=300)]


class Request(BaseModel):
    """Fields every signed header carries (checked for form by the Verifier already)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)

    op: str
    ts: float
    nonce: str


class Ping(Request):
    pass


class Local(Request):
    pass


class PushBegin(Request):
    streams: int = Field(ge=1, le=MAX_STREAMS)


class PushEnd(Request):
    session: str = Field(max_length=64)


class PushStats(Request):
    session: str = Field(pattern=SESSION_ID)


class DeclareRun(Request):
    """The hosts of one probe run: the only endpoints `measure` may target in that run."""

    run: str = Field(pattern=RUN_ID)
    hosts: list[Endpoint] = Field(min_length=1, max_length=MAX_RUN_HOSTS)

    @field_validator("hosts")
    @classmethod
    def _tcp_hosts(cls, hosts: list[str]) -> list[str]:
        for i, url in enumerate(hosts):
            try:
                parse_tcp_target(url)
            except ValueError as exc:
                raise ValueError(f"entry {i}: {exc}") from None
        return hosts

    def targets(self) -> frozenset[tuple[str, int]]:
        return frozenset(parse_tcp_target(url) for url in self.hosts)


class Measure(Request):
    run: str = Field(pattern=RUN_ID)
    peer: Endpoint
    pings: int = Field(20, ge=0, le=MAX_PINGS)
    seconds: float = Field(1.0, gt=0, le=MAX_PUSH_SECONDS)
    streams: int = Field(4, ge=1, le=MAX_STREAMS)
    timeout_s: float = Field(10.0, gt=0, le=MAX_MEASURE_TIMEOUT_S)

    @field_validator("peer")
    @classmethod
    def _tcp_peer(cls, peer: str) -> str:
        parse_tcp_target(peer)
        return peer

    def target(self) -> tuple[str, int]:
        return parse_tcp_target(self.peer)


REQUESTS: dict[str, type[Request]] = {
    "ping": Ping,
    "local": Local,
    "push_begin": PushBegin,
    "push_end": PushEnd,
    "push_stats": PushStats,
    "begin_run": DeclareRun,
    "measure": Measure,
}


class BadRequest(Exception):
    """A signed request the agent will not act on; the text names the field."""


def parse_request(header: dict[str, object]) -> Request:
    """The validated request for `header`, or BadRequest naming what is wrong."""
    op = str(header.get("op"))
    model = REQUESTS.get(op)
    if model is None:
        raise BadRequest(f"unknown request {shown(op)}")
    try:
        return model.model_validate(header)
    except ValidationError as exc:
        field, message = describe_validation_error(exc)
        raise BadRequest(f"bad {op} request: {field}: {message}") from None


def shown(text: str, limit: int = 40) -> str:
    """`text` quoted for a message, cut to `limit` characters."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))
