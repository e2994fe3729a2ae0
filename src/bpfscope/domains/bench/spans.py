"""Spans: each request as one process saw it, from the request tracer's exchanges, with the thread that
handled it.

A server span runs from the request's first byte received to the response's last byte sent; a client
span from the request's first byte sent to the response's last byte received. The thread is the one
that made the message's last call: for a server, the thread that answered; for a client, the thread that
asked. The request tracer's records say which thread made each call; :class:`CallThreads` keeps that by
(socket, return time of the call), which is where every message ends.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from bpfscope.domains.requests import redact
from bpfscope.domains.requests.protocols import redis

if TYPE_CHECKING:
    from bpfscope.domains.requests.capture import Connection
    from bpfscope.domains.requests.protocols.base import Exchange

# PostgreSQL's and MySQL's connection set-up exchanges (the request tracer shows them; they are not
# requests).
SETUP = frozenset({"Startup", "SSLRequest", "GSSENCRequest", "CancelRequest", "Connect"})
# Calls remembered (a message completes within a few batches of its last call).
CALLS_KEPT = 1 << 20


@dataclass(eq=False, slots=True)
class Span:
    role: str  # server or client
    protocol: str
    pid: int
    tid: int
    cgroup: int
    comm: str
    local: tuple[str, int]
    remote: tuple[str, int]
    start_ns: int
    end_ns: int
    request_id: str  # X-Request-ID, or a traceparent's trace id; "" when neither
    what: str  # GET /path, the normalised statement, the Redis command
    component: str | None = None
    peer: Span | None = None  # the same request seen from its other end, when both are traced
    parent: Span | None = None  # client spans: the server span they were made for
    children: list[Span] = field(default_factory=list)

    @property
    def latency_ns(self) -> int:
        return self.end_ns - self.start_ns


class CallThreads:
    """(socket cookie, call return time) -> the thread that made the call, from the tracer's record heads."""

    def __init__(self, head_dtype: np.dtype) -> None:
        self.dtype = head_dtype
        self.calls: OrderedDict[tuple[int, int], int] = OrderedDict()

    def note(self, records: list[bytes]) -> None:
        size = self.dtype.itemsize
        heads = np.frombuffer(b"".join(r[:size] for r in records), dtype=self.dtype)
        for cookie, end, tid in zip(
            heads["cookie"].tolist(), heads["end_ns"].tolist(), heads["tid"].tolist(), strict=True
        ):
            self.calls[(cookie, end)] = tid
        while len(self.calls) > CALLS_KEPT:
            self.calls.popitem(last=False)

    def tid(self, cookie: int, end_ns: int, default: int) -> int:
        return self.calls.get((cookie, end_ns), default)


def request_id(headers: dict[str, str]) -> str:
    """The request's id when a header carries one: X-Request-ID, else W3C traceparent's trace id."""
    found = headers.get("x-request-id", "").strip()
    if found:
        return found
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else ""


def _what(exchange: Exchange) -> str:
    fields = exchange.request.fields
    if exchange.protocol == "http":
        return f"{fields.get('method', '')} {redact.path(fields.get('path', ''))}"
    if exchange.protocol in ("pgsql", "mysql"):
        return redact.normalize_sql(fields.get("query", ""))[:80] or fields.get("cmd", "")
    if exchange.protocol == "redis":
        return redis.command(fields.get("parts", []))[0]
    return exchange.protocol


def span_of(conn: Connection, exchange: Exchange, threads: CallThreads) -> Span | None:
    """The exchange as a span of its process, or None when it has no response (nothing to time)."""
    response = exchange.response
    if response is None or conn.trace_role not in ("server", "client"):
        return None
    if exchange.protocol in ("pgsql", "mysql") and exchange.request.fields.get("cmd") in SETUP:
        return None  # a connection being set up: no request of the workload (a client log has none)
    server = conn.trace_role == "server"
    # Who answered (server) or who asked (client): the thread of that message's last call.
    last_call = response.end_ns if server else exchange.request.end_ns
    headers = exchange.request.fields.get("headers", {}) if exchange.protocol == "http" else {}
    return Span(
        role=conn.trace_role,
        protocol=exchange.protocol,
        pid=conn.pid,
        tid=threads.tid(conn.cookie, last_call, conn.tid),
        cgroup=conn.cgroup,
        comm=conn.comm,
        local=(conn.local_addr, conn.local_port),
        remote=(conn.remote_addr, conn.remote_port),
        start_ns=exchange.request.start_ns,
        end_ns=response.end_ns,
        request_id=request_id(headers),
        what=_what(exchange),
    )
