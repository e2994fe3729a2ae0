"""The request tables: one schema per protocol, named and laid out as Pixie's (``http_events``,
``pgsql_events``, ...), with Pixie's column names where the meaning is the same (``remote_addr``,
``trace_role``, ``req_path``, ``resp_status``, ``latency`` in nanoseconds, ...). Pixie's ``time_`` is
bpfscope's ``ts`` (seconds, as in every bpfscope record) and its ``upid`` is ``pid`` with ``comm`` and
``cgroup``. A record's time is its response's last byte: when the exchange completed.

The store (sinks/store.py) makes its tables from these schemas; ``bpfscope requests --json`` prints
records of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bpfscope.domains.requests import redact
from bpfscope.domains.requests.capture import Connection
from bpfscope.domains.requests.protocols.base import Exchange
from bpfscope.runtime.schema import CGROUP, COMM, PID, Field, Schema

ROLES = ("client", "server", "unknown")

COMMON = (
    PID,
    COMM,
    CGROUP,
    Field("remote_addr", "str", label=True, doc="the peer's address"),
    Field("remote_port", "int", label=True, doc="the peer's port"),
    Field("local_addr", "str", label=True, doc="this process's address"),
    Field("local_port", "int", label=True, doc="this process's port"),
    Field("trace_role", "enum", values=ROLES, label=True, doc="client: this process sent the request"),
    Field("encrypted", "bool", doc="captured as TLS plaintext (OpenSSL)"),
    Field("latency", "int", "ns", "request's first byte to response's last byte, as this process saw them"),
    Field("req_bytes", "int", "bytes", "request size on the wire"),
    Field("resp_bytes", "int", "bytes", "response size on the wire"),
)

HTTP = Schema(
    "http_events",
    (
        *COMMON,
        Field("major_version", "int", doc="HTTP major version"),
        Field("minor_version", "int", doc="HTTP minor version"),
        Field("content_type", "str", doc="the response's Content-Type"),
        Field("req_headers", "dict", doc="request headers (secrets redacted)"),
        Field("req_method", "str", label=True, doc="GET, POST, ..."),
        Field("req_path", "str", label=True, doc="request target (query values redacted)"),
        Field("req_body", "str", doc="first bytes of the request body (--no-redact only)"),
        Field("req_body_size", "int", "bytes", "request body size"),
        Field("resp_headers", "dict", doc="response headers (secrets redacted)"),
        Field("resp_status", "int", doc="status code"),
        Field("resp_message", "str", doc="reason phrase"),
        Field("resp_body", "str", doc="first bytes of the response body (--no-redact only)"),
        Field("resp_body_size", "int", "bytes", "response body size"),
    ),
    doc="An HTTP/1.x or HTTP/2 request and its response.",
)

SCHEMAS: dict[str, Schema] = {"http": HTTP}


def _common(conn: Connection, exchange: Exchange) -> dict[str, Any]:
    response = exchange.response
    return {
        "pid": conn.pid,
        "comm": conn.comm,
        "cgroup": conn.cgroup,
        "remote_addr": conn.remote_addr,
        "remote_port": conn.remote_port,
        "local_addr": conn.local_addr,
        "local_port": conn.local_port,
        "trace_role": conn.trace_role if conn.trace_role in ROLES else "unknown",
        "encrypted": conn.encrypted,
        "latency": exchange.latency_ns,
        "req_bytes": exchange.request.size,
        "resp_bytes": response.size if response is not None else 0,
    }


def _text(data: bytes, keep: bool) -> str:
    return data.decode("utf-8", errors="replace") if keep else ""


def _http(exchange: Exchange, keep: bool) -> dict[str, Any]:
    req = exchange.request.fields
    resp = exchange.response.fields if exchange.response is not None else {}
    req_headers, resp_headers = req.get("headers", {}), resp.get("headers", {})
    return {
        "major_version": req.get("major_version", 1),
        "minor_version": req.get("minor_version", 1),
        "content_type": resp.get("content_type", ""),
        "req_headers": req_headers if keep else redact.headers(req_headers),
        "req_method": req.get("method", ""),
        "req_path": req.get("path", "") if keep else redact.path(req.get("path", "")),
        "req_body": _text(req.get("body", b""), keep),
        "req_body_size": req.get("body_size", 0),
        "resp_headers": resp_headers if keep else redact.headers(resp_headers),
        "resp_status": resp.get("status", 0),
        "resp_message": resp.get("reason", ""),
        "resp_body": _text(resp.get("body", b""), keep),
        "resp_body_size": resp.get("body_size", 0),
    }


BUILDERS: dict[str, Callable[[Exchange, bool], dict[str, Any]]] = {"http": _http}


def record(conn: Connection, exchange: Exchange, ts: float, keep_secrets: bool) -> dict[str, Any]:
    """The exchange as a record of its protocol's table."""
    schema = SCHEMAS[exchange.protocol]
    return schema.record(
        {"ts": ts, **_common(conn, exchange), **BUILDERS[exchange.protocol](exchange, keep_secrets)}
    )
