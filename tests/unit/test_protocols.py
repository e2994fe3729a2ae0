"""The request parsers on known conversations, fed call by call as the kernel captures them (exact
sizes, first bytes, gaps), through the connection tracker's protocol half (capture.Connections)."""

from __future__ import annotations

import struct

import dns.message
import dns.rrset

from bpfscope.domains.requests import protocols, redact
from bpfscope.domains.requests.capture import (
    DETECT_TRIES,
    IGNORED_BYTES,
    PROBE_BYTES,
    Connection,
    Connections,
)
from bpfscope.domains.requests.protocols.base import Exchange


def connection(
    role: str = "unknown", udp: bool = False, ports: tuple[int, int] = (40000, 8080)
) -> Connection:
    return Connection(
        pid=1, tid=1, comm="test", cgroup=0, fd=3, cookie=7, udp=udp, encrypted=False,
        local_addr="127.0.0.1", local_port=ports[0], remote_addr="127.0.0.1", remote_port=ports[1], role=role,
    )  # fmt: skip


def converse(
    calls: list[tuple[bool, bytes]], role: str = "client", capture: int = 1 << 20, **kw: object
) -> tuple[list[Exchange], Connections]:
    """Feed calls (ingress?, bytes) to one connection; each call captured up to ``capture`` bytes."""
    tracker = Connections()
    conn = tracker.add(("k",), connection(role, **kw))  # type: ignore[arg-type]
    out: list = []
    for t, (ingress, data) in enumerate(calls):
        tracker.data(conn, ingress, data[:capture], len(data), t * 1000, t * 1000 + 10, b"", out)
    return [exchange for _, exchange in out], tracker


def http_request(path: str, body: bytes = b"", method: str = "GET") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nCookie: a=b\r\n{length}\r\n".encode() + body


def http_response(status: int, body: bytes = b"", chunked: bool = False) -> bytes:
    if chunked:
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 5]), body[i : i + 5]) for i in range(0, len(body), 5)
        )
        return f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def test_http_keepalive_pipelining_chunked_and_latency() -> None:
    calls = [
        (False, http_request("/a") + http_request("/b", b"xyz", "POST")),
        (True, http_response(200, b"hello") + http_response(201, b"abcdefghijkl", chunked=True)[:20]),
        (True, http_response(201, b"abcdefghijkl", chunked=True)[20:]),
        (False, http_request("/c", method="HEAD")),
        (True, http_response(200)[:-2] + b"Content-Length: 1000\r\n\r\n"),  # HEAD: no body whatever it says
    ]
    exchanges, tracker = converse(calls)
    got = [
        (e.request.fields["method"], e.request.fields["path"], e.response.fields["status"]) for e in exchanges
    ]
    assert got == [("GET", "/a", 200), ("POST", "/b", 201), ("HEAD", "/c", 200)]
    assert (
        exchanges[1].request.fields["body"] == b"xyz"
        and exchanges[1].response.fields["body"] == b"abcdefghijkl"
    )
    # request's first byte sent (call 0 entry) to response's last byte received (call 2 return)
    assert exchanges[1].latency_ns == 2010
    assert tracker.counts.parse_errors == 0


def test_http_body_beyond_the_capture_is_stepped_over() -> None:
    big = bytes(100_000)
    calls = [(False, http_request("/big")), (True, http_response(200, big)), (False, http_request("/next")),
             (True, http_response(404))]  # fmt: skip
    exchanges, tracker = converse(calls, capture=4096)
    assert [e.response.fields["status"] for e in exchanges] == [200, 404]
    assert exchanges[0].response.fields["body_size"] == 100_000
    assert tracker.counts.truncated == tracker.counts.parse_errors == 0


def test_http_mid_stream_start_resynchronises_at_the_next_call() -> None:
    calls = [
        (True, http_response(200, b"x" * 50)[30:]),
        (False, http_request("/a")),
        (True, http_response(200)),
    ]
    exchanges, _ = converse(calls)
    assert [e.request.fields["path"] for e in exchanges] == ["/a"]


def redis_command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_redis_pipelined_resp3_and_pushes() -> None:
    calls = [
        (False, redis_command(b"SET", b"k", b"v") + redis_command(b"HGETALL", b"h") + b"PING\r\n"),
        (True, b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n+OK\r\n%1\r\n$1\r\na\r\n$1\r\nb\r\n+PONG\r\n"),
    ]
    exchanges, _ = converse(calls)
    from bpfscope.domains.requests.protocols import redis

    got = [(redis.command(e.request.fields["parts"])[0], redis.reply(e.response.fields["parts"], True)[0])
           for e in exchanges]  # fmt: skip
    assert got == [("SET", "OK"), ("HGETALL", "[1 items]"), ("PING", "PONG")]


def pg_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack(">i", len(body) + 4) + body


ERROR = b"SERROR\0C42601\0Mboom\0\0"


def test_postgres_simple_extended_and_error() -> None:
    startup = struct.pack(">ii", 8 + 9, 196608) + b"user\0pg\0\0"
    ready = pg_message(b"Z", b"I")
    calls = [
        (False, startup),
        (True, pg_message(b"R", b"\0\0\0\0") + pg_message(b"S", b"a\0b\0") + ready),
        (False, pg_message(b"Q", b"SELECT 'secret', 42 FROM t WHERE x = 1.5\0")),
        (True, pg_message(b"T", b"...") + pg_message(b"D", b"...") + pg_message(b"C", b"SELECT 1\0") + ready),
        (False, pg_message(b"P", b"s1\0SELECT $1\0\0\0") + pg_message(b"B", b"\0s1\0" + bytes(6))
         + pg_message(b"E", b"\0\0\0\0\0") + pg_message(b"S", b"")),
        (True, pg_message(b"1", b"") + pg_message(b"2", b"") + pg_message(b"E", ERROR) + ready),
    ]  # fmt: skip
    exchanges, _ = converse(calls)
    assert [e.request.fields["cmd"] for e in exchanges] == ["Startup", "Query", "Execute"]
    assert redact.normalize_sql(exchanges[1].request.fields["query"]) == "SELECT ?, ? FROM t WHERE x = ?"
    assert exchanges[1].response.fields["tags"] == ["SELECT 1"] and exchanges[1].response.fields["rows"] == 1
    assert exchanges[2].request.fields["query"] == "SELECT $1"
    assert exchanges[2].response.fields["error"] == "ERROR: boom (42601)"


def test_dns_udp_pairs_by_transaction_id() -> None:
    q1, q2 = dns.message.make_query("a.test", "A"), dns.message.make_query("b.test", "AAAA")
    r2 = dns.message.make_response(q2)
    r2.set_rcode(dns.rcode.NXDOMAIN)
    r1 = dns.message.make_response(q1)
    r1.answer.append(dns.rrset.from_text("a.test.", 60, "IN", "A", "10.0.0.1"))
    calls = [(True, q1.to_wire()), (True, q2.to_wire()), (False, r2.to_wire()), (False, r1.to_wire())]
    exchanges, _ = converse(calls, role="unknown", udp=True, ports=(53, 40000))
    got = [
        (e.request.fields["name"], e.response.fields["rcode"], e.response.fields["answers"])
        for e in exchanges
    ]
    assert got == [("b.test", "NXDOMAIN", []), ("a.test", "NOERROR", ["A 10.0.0.1"])]


def test_detection_and_redaction() -> None:
    assert protocols.detect(b"GET / HTTP/1.1\r\n", False, (1, 2)).is_request  # type: ignore[union-attr]
    assert protocols.detect(b"\x16\x03\x01\x00", False, (1, 2)) is None and protocols.is_tls(b"\x16\x03\x01")
    assert redact.path("/s?q=x&flag&n=2") == "/s?q=<redacted>&flag&n=<redacted>"
    assert redact.headers({"authorization": "Bearer t", "accept": "*/*"}) == {
        "authorization": "<redacted>",
        "accept": "*/*",
    }
    assert redact.normalize_sql("select  $$a$b$$, t1.c2 from t1 where id in (1, -2)") == (
        "select ?, t1.c2 from t1 where id in (?, ?)"
    )


def h2_conversation(requests: int) -> list[tuple[bool, bytes]]:
    """A client and a server (the h2 library) exchanging gRPC-like requests, each call's bytes as the
    client sees them (egress: what it sent)."""
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    calls: list[tuple[bool, bytes]] = []

    def send(data: bytes, to_server: bool) -> None:
        if data:
            calls.append((not to_server, data))
            (server if to_server else client).receive_data(data)

    client.initiate_connection()
    send(client.data_to_send(), True)
    server.initiate_connection()
    send(server.data_to_send(), False)
    send(client.data_to_send(), True)
    for i in range(requests):
        sid = client.get_next_available_stream_id()
        path = f"/demo.Greeter/{'Hello' if i % 2 else 'Fail'}"
        client.send_headers(sid, [(":method", "POST"), (":path", path), (":scheme", "http"),
                                  (":authority", "x"), ("content-type", "application/grpc")])  # fmt: skip
        client.send_data(sid, b"\0\0\0\0\2hi", end_stream=True)
        send(client.data_to_send(), True)
        server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        server.send_data(sid, b"\0\0\0\0\2ok")
        server.send_headers(sid, [("grpc-status", "0" if i % 2 else "5")], end_stream=True)
        send(server.data_to_send(), False)
        send(client.data_to_send(), True)  # window updates
    return calls


def test_http2_streams_pair_by_id_and_survive_a_mid_connection_start() -> None:
    calls = h2_conversation(6)
    exchanges, _ = converse(calls)
    got = [(e.request.fields["path"], e.response.fields["headers"]["grpc-status"]) for e in exchanges]
    assert got == [(f"/demo.Greeter/{'Hello' if i % 2 else 'Fail'}", "0" if i % 2 else "5") for i in range(6)]
    assert all(e.response.fields["status"] == 200 and e.request.fields["method"] == "POST" for e in exchanges)
    # Met after the preface and the first two requests: every stream still pairs, with the fields the
    # capture never saw added to the HPACK table as <unknown>.
    start = [i for i, (ingress, data) in enumerate(calls) if not ingress and b"\2hi" in data][2]
    late, tracker = converse(calls[start:])
    assert len(late) == 4
    assert {e.response.fields["headers"].get("grpc-status") for e in late} <= {"0", "5", None}
    assert tracker.counts.parse_errors == tracker.counts.truncated == 0


def test_calls_the_kernel_skipped_are_a_gap_at_their_place() -> None:
    """A body of 1 MB: once the parser steps over it, the tracker asks the kernel to skip its calls; the
    kernel's positions then say where the next call begins, and the body is counted whole."""
    told: list[tuple[bool, int]] = []
    tracker = Connections(skip=lambda conn, ingress, until, probe: told.append((ingress, until)))
    conn = tracker.add(("k",), connection("client"))
    head = http_response(200, bytes(1_000_000))[:-1_000_000]
    out: list = []
    request = http_request("/big")
    tracker.data(conn, False, request, len(request), 0, 1, b"", out, pos=0)
    tracker.data(conn, True, head + bytes(4096 - len(head)), 4096, 2, 3, b"", out, pos=0)
    assert told == [(True, len(head) + 1_000_000)]
    # The kernel sent nothing more until the call with the body's last byte, then the next response.
    last = len(head) + 1_000_000 - 100
    tracker.data(
        conn, True, bytes(100) + http_response(404), 100 + len(http_response(404)), 8, 9, b"", out, last
    )
    tracker.data(conn, False, request, len(request), 7, 7, b"", out, pos=len(request))
    assert [(e.response.fields["status"], e.response.fields["body_size"]) for _, e in out] == [
        (200, 1_000_000)
    ]
    assert out[0][1].response.end_ns == 9
    assert tracker.counts.parse_errors == 0


def test_a_connection_met_inside_a_body_is_probed_until_a_message_begins() -> None:
    """Met in the middle of a large response: nothing fits a protocol, so the kernel is asked for the
    calls' first bytes only; the next request is recognised by its first bytes and whole calls resume."""
    told: list[tuple[bool, int, int]] = []
    tracker = Connections(skip=lambda conn, ingress, until, probe: told.append((ingress, until, probe)))
    conn = tracker.add(("k",), connection("client"))
    out: list = []
    pos = 0
    for t in range(DETECT_TRIES):
        tracker.data(conn, True, bytes(4096), 65536, t, t + 1, b"", out, pos=pos)
        pos += 65536
    assert tracker.counts.undetected == 1 and conn.probing
    assert told == [(False, 0, PROBE_BYTES), (True, 0, PROBE_BYTES)]
    # The rest of the body, cut at the probe; then the next exchange, whole again.
    tracker.data(conn, True, bytes(PROBE_BYTES), 65536, 10, 11, b"", out, pos=pos)
    request = http_request("/next")
    tracker.data(conn, False, request, len(request), 20, 21, b"", out, pos=7000)
    assert not conn.probing and told[-2:] == [(False, 0, 0), (True, 0, 0)]
    response = http_response(404)
    tracker.data(conn, True, response, len(response), 30, 31, b"", out, pos=pos + 65536)
    assert [(e.request.fields["path"], e.response.fields["status"]) for _, e in out] == [("/next", 404)]
    assert conn.bytes_recv == pos + 65536 + len(response) and conn.bytes_sent == 7000 + len(request)


def test_a_lost_head_is_probed_for_and_a_message_cut_by_the_probe_is_counted() -> None:
    """A response whose head was lost (a gap before it) fails to parse: the tracker probes; the first call
    that begins a message but was cut at the probe is counted as truncated, the one after is parsed."""
    told: list[tuple[bool, int, int]] = []
    tracker = Connections(skip=lambda conn, ingress, until, probe: told.append((ingress, until, probe)))
    conn = tracker.add(("k",), connection("client"))
    out: list = []
    request = http_request("/a")
    tracker.data(conn, False, request, len(request), 0, 1, b"", out, pos=0)
    tracker.data(conn, True, b"garbage that is no response\r\n\r\n", 32, 2, 3, b"", out, pos=0)
    assert conn.probing and told[-1] == (True, 0, PROBE_BYTES)
    big = http_response(200, bytes(10_000))
    tracker.data(conn, True, big[:PROBE_BYTES], len(big), 6, 7, b"", out, pos=32)
    assert not conn.probing and tracker.counts.truncated == 1 and not out
    tracker.data(conn, False, request, len(request), 8, 9, b"", out, pos=len(request))
    small = http_response(204)
    tracker.data(conn, True, small, len(small), 10, 11, b"", out, pos=32 + len(big))
    assert [(e.request.fields["path"], e.response.fields["status"]) for _, e in out] == [("/a", 204)]


def test_tls_ciphertext_is_not_parsed_but_its_bytes_are_counted() -> None:
    """Ciphertext on the syscalls (its plaintext comes from the OpenSSL uprobes): the kernel sends one
    byte of each call from then on, and the positions count every byte for conn_stats."""
    told: list[tuple[bool, int, int]] = []
    tracker = Connections(skip=lambda conn, ingress, until, probe: told.append((ingress, until, probe)))
    conn = tracker.add(("k",), connection("client"))
    out: list = []
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(505)
    tracker.data(conn, False, hello, len(hello), 0, 1, b"", out, pos=0)
    assert conn.ignored == "tls" and told == [(False, 0, IGNORED_BYTES), (True, 0, IGNORED_BYTES)]
    tracker.data(conn, True, b"\x17", 5000, 2, 3, b"", out, pos=0)
    tracker.data(conn, True, b"\x17", 3000, 4, 5, b"", out, pos=90_000)  # calls lost between
    assert (conn.bytes_sent, conn.bytes_recv) == (len(hello), 93_000) and not out
