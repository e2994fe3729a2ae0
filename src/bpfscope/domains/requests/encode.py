"""Request records as JSON lines, written in parts instead of through a dict per record: the same text
as ``json.dumps(records.record(...))`` (tests/unit/test_requests_encode.py compares them), at a
fraction of the cost.

Building each record's dict and encoding it whole took about a third of the tracer's time (nginx under
wrk, both ends traced: 16 of 43 us per call); most of a record does not change between two requests of
one connection (process, addresses, role), and an HTTP header block repeats request after request. So a
connection's part is encoded once and kept on it, headers once per parsed header dict (the HTTP/1
parser shares the dict of a block it saw lately), and only what differs is encoded per record.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _string  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any

from bpfscope.domains.requests import redact
from bpfscope.domains.requests.records import BUILDERS, SCHEMAS, _common
from bpfscope.sinks.jsonl import _default

if TYPE_CHECKING:
    from bpfscope.domains.requests.capture import Connection
    from bpfscope.domains.requests.protocols.base import Exchange

# Header dicts encoded lately, by identity and --no-redact: (the dict, kept so that its id is not
# reused while it is here, and its JSON). Cleared when full.
_HEADERS: dict[tuple[int, bool], tuple[dict[str, str], str]] = {}
_HEADERS_MAX = 1024


def line(conn: Connection, exchange: Exchange, ts: float, keep_secrets: bool) -> str:
    """One record's JSON line, newline included."""
    response = exchange.response
    protocol = exchange.protocol
    parts = conn.json_parts
    if not parts or parts[0] != protocol:
        parts = conn.json_parts = _conn_parts(conn, exchange)
    if protocol == "http":
        rest = _http(exchange, keep_secrets)
    else:
        rest = json.dumps(BUILDERS[protocol](exchange, keep_secrets), default=_default)[1:]
    return (
        f'{parts[1]}{ts!r}{parts[2]}{exchange.latency_ns}, "req_bytes": {exchange.request.size}, '
        f'"resp_bytes": {response.size if response is not None else 0}, {rest}\n'
    )


def _conn_parts(conn: Connection, exchange: Exchange) -> tuple[str, str, str]:
    """(protocol, what comes before ts, from ts to latency's value): a connection's role is fixed once
    its protocol is, so this part of its records never changes after."""
    per_exchange = ("latency", "req_bytes", "resp_bytes")  # records._common's last fields
    fields = {k: v for k, v in _common(conn, exchange).items() if k not in per_exchange}
    text = json.dumps(fields, default=_default)[1:-1]
    name = _string(SCHEMAS[exchange.protocol].name)
    return exchange.protocol, f'{{"record": {name}, "ts": ', f', {text}, "latency": '


def _header_json(headers: dict[str, str], keep: bool) -> str:
    key = (id(headers), keep)
    known = _HEADERS.get(key)
    if known is not None and known[0] is headers:
        return known[1]
    text = json.dumps(headers if keep else redact.headers(headers))
    if len(_HEADERS) >= _HEADERS_MAX:
        _HEADERS.clear()
    _HEADERS[key] = (headers, text)
    return text


def _http(exchange: Exchange, keep: bool) -> str:
    """records._http's fields, in its order, and the closing brace."""
    req = exchange.request.fields
    resp: dict[str, Any] = exchange.response.fields if exchange.response is not None else {}
    path = req.get("path", "")
    req_body = req.get("body", b"").decode("utf-8", errors="replace") if keep else ""
    resp_body = resp.get("body", b"").decode("utf-8", errors="replace") if keep else ""
    return (
        f'"major_version": {req.get("major_version", 1)}, '
        f'"minor_version": {req.get("minor_version", 1)}, '
        f'"content_type": {_string(resp.get("content_type", ""))}, '
        f'"req_headers": {_header_json(req.get("headers", {}), keep)}, '
        f'"req_method": {_string(req.get("method", ""))}, '
        f'"req_path": {_string(path if keep else redact.path(path))}, '
        f'"req_body": {_string(req_body)}, '
        f'"req_body_size": {req.get("body_size", 0)}, '
        f'"resp_headers": {_header_json(resp.get("headers", {}), keep)}, '
        f'"resp_status": {resp.get("status", 0)}, '
        f'"resp_message": {_string(resp.get("reason", ""))}, '
        f'"resp_body": {_string(resp_body)}, '
        f'"resp_body_size": {resp.get("body_size", 0)}}}'
    )
