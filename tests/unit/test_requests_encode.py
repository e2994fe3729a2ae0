"""The request records' JSON lines written in parts (encode.py) are the text the JSON lines sink would
write for the records' dicts, byte for byte: every protocol, redacted and not, a connection reused."""

from __future__ import annotations

import pytest
from test_protocols import connection, http_request, http_response, pg_message, redis_command

from bpfscope.domains.requests import encode, records
from bpfscope.domains.requests.capture import Connections
from bpfscope.domains.requests.protocols.base import Exchange, Message
from bpfscope.sinks.jsonl import dumps

READY = pg_message(b"Z", b"I")
CONVERSATIONS = {
    "http": (
        (40000, 8080),
        [
            (False, http_request("/a?q=secret&page=2")),
            (True, http_response(200, b"hello")),
            (False, http_request("/b", b"xyz\xff", "POST")),
            (True, http_response(201, b"abcdefghijkl", chunked=True)),
            (False, http_request("/a?q=secret&page=2")),  # the same head again: its headers shared
            (True, http_response(404, "d\u00e9j\u00e0".encode())),
        ],
    ),
    "pgsql": (
        (40000, 5432),
        [
            (False, pg_message(b"Q", b"SELECT 'secret', 42 FROM t WHERE x = 1.5\0")),
            (
                True,
                pg_message(b"T", b"...") + pg_message(b"D", b"...") + pg_message(b"C", b"SELECT 1\0") + READY,
            ),
        ],
    ),
    "redis": (
        (40000, 6379),
        [(False, redis_command(b"SET", b"k", b"v")), (True, b"+OK\r\n")],
    ),
}


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("protocol", sorted(CONVERSATIONS))
def test_json_lines_are_the_records_encoded(protocol: str, keep: bool) -> None:
    ports, calls = CONVERSATIONS[protocol]
    tracker = Connections()
    conn = tracker.add(("k",), connection("client", ports=ports))
    conn.comm = 't\u00e9st "x"'  # escaped alike
    out: list = []
    for t, (ingress, data) in enumerate(calls):
        tracker.data(conn, ingress, data, len(data), t * 1000, t * 1000 + 10, b"", out)
    assert len(out) == len(calls) // 2
    for i, (c, exchange) in enumerate(out):
        ts = 1700000000.123456 + i / 3
        expected = dumps(records.record(c, exchange, ts, keep)) + "\n"
        assert encode.line(c, exchange, ts, keep) == expected


@pytest.mark.parametrize("protocol", sorted(records.BUILDERS))
def test_records_are_built_in_their_schemas_order(protocol: str) -> None:
    # records.record puts the builders' fields after the common ones without reordering them.
    exchange = Exchange(protocol, Message(0, 0, 0, {}), Message(0, 0, 0, {}))
    record = records.record(connection(), exchange, 1.0, False)
    schema = records.SCHEMAS[protocol]
    assert list(record) == list(schema.record(record)) == ["record", *schema.names]
