"""The parsers never crash and never stop a capture: arbitrary bytes, valid conversations cut at any
point, captured partly (gaps), begun mid-stream or interleaved with garbage, in any call sizes, for every
protocol. Whatever goes in, feeding a connection raises nothing, and the connection parses what comes
after it."""

from __future__ import annotations

import itertools
import os

import dns.message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocols import (
    connection,
    converse,
    h2_conversation,
    http_request,
    http_response,
    pg_message,
    redis_command,
)

from bpfscope.domains.requests.capture import Connections

# FUZZ_EXAMPLES=4000 for a longer search (46 s); CI runs 300.
SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_H2 = h2_conversation(1)

CONVERSATIONS = {
    "http2": [
        (False, b"".join(d for ingress, d in _H2 if not ingress)),
        (True, b"".join(d for ingress, d in _H2 if ingress)),
    ],
    "http": [
        (False, http_request("/a") + http_request("/b", b"body", "POST")),
        (True, http_response(200, b"hello") + http_response(500, b"abcdefghijkl", chunked=True)),
    ],
    "redis": [
        (False, redis_command(b"SET", b"k", b"v") + redis_command(b"MGET", b"a", b"b")),
        (True, b"+OK\r\n*2\r\n$1\r\nx\r\n_\r\n"),
    ],
    "pgsql": [
        (False, pg_message(b"Q", b"SELECT 1\0")),
        (True, pg_message(b"C", b"SELECT 1\0") + pg_message(b"Z", b"I")),
    ],
    "dns": [
        (False, len(q := dns.message.make_query("a.test", "A").to_wire()).to_bytes(2, "big") + q),
        (
            True,
            len(r := dns.message.make_response(dns.message.from_wire(q)).to_wire()).to_bytes(2, "big") + r,
        ),
    ],
}


PORTS = {"pgsql": 5432, "redis": 6379, "dns": 53}
PROTOCOL = {"http2": "http"}  # the table each conversation's exchanges go to


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


calls = st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=12)


@SETTINGS
@given(calls=calls, udp=st.booleans(), port=st.sampled_from([80, 53, 5432, 6379, 443]))
def test_arbitrary_bytes_never_raise(calls: list[tuple[bool, bytes]], udp: bool, port: int) -> None:
    converse(calls, role="unknown", udp=udp, ports=(40000, port))


@SETTINGS
@given(
    protocol=st.sampled_from(sorted(CONVERSATIONS)),
    cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=6),
    skip=st.integers(min_value=0, max_value=40),
    capture=st.integers(min_value=1, max_value=64),
    garbage=st.binary(max_size=40),
    role=st.sampled_from(["client", "server", "unknown"]),
)
def test_cut_captured_partly_mid_stream_and_garbage(
    protocol: str, cuts: list[int], skip: int, capture: int, garbage: bytes, role: str
) -> None:
    """A conversation split into calls anywhere, begun ``skip`` bytes in, each call captured up to
    ``capture`` bytes, garbage in between: feeding it raises nothing, and the capture goes on: the next
    connection's clean conversation is parsed whole."""
    request, response = CONVERSATIONS[protocol]
    if role == "server":  # the conversations are written as their clients see them
        request, response = (not request[0], request[1]), (not response[0], response[1])
    port = PORTS.get(protocol, 80)
    broken = [(request[0], c) for c in split(request[1][skip:], cuts)]
    broken += [(True, garbage)] + [(response[0], c) for c in split(response[1], cuts)]
    tracker = Connections()
    damaged = tracker.add(("damaged",), connection(role, ports=(40000, port)))
    clean = tracker.add(("clean",), connection(role, ports=(40001, port)))
    out: list = []
    for t, (ingress, data) in enumerate(broken):
        tracker.data(damaged, ingress, data[:capture], len(data), t, t + 1, b"", out)
    out.clear()
    for t, (ingress, data) in enumerate([request, response]):
        tracker.data(clean, ingress, data, len(data), 1000 + t, 1001 + t, b"", out)
    assert len(out) == (2 if protocol in ("http", "redis") else 1)
    assert {exchange.protocol for _, exchange in out} == {PROTOCOL.get(protocol, protocol)}
