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
from bpfscope.domains.requests.protocols import mysql, redis
from bpfscope.domains.requests.protocols.base import Exchange
from bpfscope.runtime.schema import CGROUP, COMM, PID, RECORD_KEY, Field, Schema

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

PGSQL = Schema(
    "pgsql_events",
    (
        *COMMON,
        Field(
            "req_cmd", "str", label=True, doc="Query (simple protocol), Execute or Parse (extended), Startup"
        ),
        Field("req", "str", label=True, doc="the statement, normalised (literals as ?) unless --no-redact"),
        Field("resp", "str", doc="command tags (SELECT 1, UPDATE 3) or the error"),
        Field("error", "str", doc="the error (severity: message (SQLSTATE)), empty when none"),
        Field("rows", "int", doc="data rows returned"),
    ),
    doc="A PostgreSQL request (a Query, or extended-protocol messages up to Sync) and its response.",
)

MYSQL_STATUSES = ("UNKNOWN", "NONE", "OK", "ERR")

MYSQL = Schema(
    "mysql_events",
    (
        *COMMON,
        Field(
            "req_cmd",
            "str",
            label=True,
            doc="the command as SHOW PROCESSLIST names it: Query, Prepare, Execute, Close stmt, Ping, "
            "Init DB, Quit, ...; Connect for the connection phase (Pixie has the command's number)",
        ),
        Field(
            "req_body",
            "str",
            label=True,
            doc="the statement (Query, Prepare; Execute: its prepared text), normalised (literals as ?) "
            "unless --no-redact; Init DB: the schema",
        ),
        Field(
            "resp_status",
            "enum",
            values=MYSQL_STATUSES,
            doc="OK (an OK, EOF or result set), ERR, NONE (a command that gets no answer)",
        ),
        Field("resp_body", "str", doc="Resultset rows = N, the error message, or empty"),
        Field("error", "str", doc="the error (ERROR code (SQLSTATE): message), empty when none"),
        Field(
            "rows",
            "int",
            doc="result set rows returned (a result longer than the capture: those before the cut)",
        ),
    ),
    doc="A MySQL or MariaDB command (or the connection phase) and its response.",
)

REDIS = Schema(
    "redis_events",
    (
        *COMMON,
        Field(
            "req_cmd", "str", label=True, doc="the command (two words for CONFIG GET, CLIENT SETNAME, ...)"
        ),
        Field("req_args", "list", doc="first bytes of each argument: the key kept, values redacted"),
        Field("resp", "str", doc="the reply (statuses and numbers; values only with --no-redact)"),
        Field("error", "str", doc="the error reply, empty when none"),
    ),
    doc="A Redis command and its reply.",
)

DNS = Schema(
    "dns_events",
    (
        *COMMON,
        Field("req_header", "dict", doc="the query's header: txid, flags, section counts"),
        Field("req_body", "dict", doc="the question: name and type"),
        Field("resp_header", "dict", doc="the response's header: txid, flags, rcode, section counts"),
        Field("resp_body", "dict", doc="the answers"),
        Field("query_name", "str", label=True, doc="the name asked"),
        Field("query_type", "str", label=True, doc="A, AAAA, MX, ..."),
        Field("rcode", "str", label=True, doc="NOERROR, NXDOMAIN, SERVFAIL, ..."),
        Field("answers", "list", doc="answers as TYPE DATA (A 10.0.0.1)"),
    ),
    doc="A DNS query and its response.",
)

SCHEMAS: dict[str, Schema] = {"http": HTTP, "pgsql": PGSQL, "mysql": MYSQL, "redis": REDIS, "dns": DNS}


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


def _pgsql(exchange: Exchange, keep: bool) -> dict[str, Any]:
    req = exchange.request.fields
    resp = exchange.response.fields if exchange.response is not None else {}
    error = resp.get("error", "")
    query = req.get("query", "")
    return {
        "req_cmd": req.get("cmd", ""),
        "req": query if keep else redact.normalize_sql(query),
        "resp": error or "; ".join(resp.get("tags", [])),
        "error": error,
        "rows": resp.get("rows", 0),
    }


def _mysql(exchange: Exchange, keep: bool) -> dict[str, Any]:
    req = exchange.request.fields
    resp = exchange.response.fields if exchange.response is not None else {}
    cmd, text = req.get("cmd", ""), req.get("query", "")
    error = resp.get("error", "")
    if not keep:
        error = mysql.redact_error(error, redact.normalize_sql)
    if error:
        body = error.partition(": ")[2]
    elif resp.get("columns") and cmd != "Prepare":
        # A result longer than the capture: its rows after the cut were not seen.
        body = f"Resultset rows {'>=' if resp.get('cut') else '='} {resp.get('rows', 0)}"
    else:
        body = resp.get("info", "")
    return {
        "req_cmd": cmd,
        "req_body": redact.normalize_sql(text) if cmd in mysql.SQL and not keep else text,
        "resp_status": resp.get("status", "UNKNOWN"),
        "resp_body": body,
        "error": error,
        "rows": resp.get("rows", 0),
    }


def _redis(exchange: Exchange, keep: bool) -> dict[str, Any]:
    name, args = redis.command(exchange.request.fields.get("parts", []))
    parts = exchange.response.fields.get("parts", []) if exchange.response is not None else []
    reply, failed = redis.reply(parts, keep)
    if not keep:
        # The first argument names the data (a key, a channel): kept; the rest is the data.
        args = args[:1] + [redact.REDACTED] * len(args[1:])
    return {"req_cmd": name, "req_args": args, "resp": reply, "error": reply if failed else ""}


def _dns(exchange: Exchange, keep: bool) -> dict[str, Any]:
    req = exchange.request.fields
    resp = exchange.response.fields if exchange.response is not None else {}

    def header(fields: dict[str, Any]) -> dict[str, Any]:
        out = {
            "txid": fields.get("id", 0),
            "flags": fields.get("flags", 0),
            "counts": fields.get("counts", []),
        }
        if "rcode" in fields:
            out["rcode"] = fields["rcode"]
        return out

    return {
        "req_header": header(req),
        "req_body": {"queries": [{"name": req.get("name", ""), "type": req.get("type", "")}]},
        "resp_header": header(resp),
        "resp_body": {"answers": resp.get("answers", [])},
        "query_name": req.get("name", ""),
        "query_type": req.get("type", ""),
        "rcode": resp.get("rcode", ""),
        "answers": resp.get("answers", []),
    }


BUILDERS: dict[str, Callable[[Exchange, bool], dict[str, Any]]] = {
    "http": _http,
    "pgsql": _pgsql,
    "mysql": _mysql,
    "redis": _redis,
    "dns": _dns,
}


def record(conn: Connection, exchange: Exchange, ts: float, keep_secrets: bool) -> dict[str, Any]:
    """The exchange as a record of its protocol's table. Built in the schema's order at once (each
    builder gives its fields in its schema's order: tests/unit/test_requests_encode.py), where
    Schema.record built the dict a second time to order it (about a fifth of a record's cost in a
    profile of the tracer's records())."""
    protocol = exchange.protocol
    return {
        RECORD_KEY: SCHEMAS[protocol].name,
        "ts": ts,
        **_common(conn, exchange),
        **BUILDERS[protocol](exchange, keep_secrets),
    }
