"""The MySQL/MariaDB parser on known conversations (the connection phase, text queries, prepared
statements, errors, commands without an answer), fed call by call as the kernel captures them, and
fuzzed: cut anywhere, captured partly, begun mid-stream, interleaved with garbage, it never raises and
the capture goes on."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocols import connection, converse
from test_protocols_fuzz import split

from bpfscope.domains.requests import protocols, records
from bpfscope.domains.requests.capture import Connections
from bpfscope.domains.requests.protocols import mysql
from bpfscope.domains.requests.protocols.base import Exchange

SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

CAPS = mysql.CLIENT_PROTOCOL_41 | 0x00008000 | 0x00080000  # 4.1, secure connection, plugin auth


def packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def packets(first_seq: int, *payloads: bytes) -> bytes:
    return b"".join(packet((first_seq + i) & 0xFF, p) for i, p in enumerate(payloads))


def greeting(caps: int = CAPS) -> bytes:
    body = (
        b"\x0a5.5.5-10.11.6-MariaDB\0" + struct.pack("<I", 42) + b"abcdefgh\0"
        + struct.pack("<H", caps & 0xFFFF) + b"\x21" + struct.pack("<H", 2) + struct.pack("<H", caps >> 16)
        + b"\x15" + bytes(10) + b"ijklmnopqrst\0mysql_native_password\0"
    )  # fmt: skip
    return packet(0, body)


def handshake_response(caps: int = CAPS, seq: int = 1) -> bytes:
    body = struct.pack("<IIB", caps, 1 << 24, 0x21) + bytes(23) + b"app\0\x14" + bytes(20) + b"db\0"
    return packet(seq, body)


def ok(seq: int = 1, affected: int = 0, status: int = 2, header: int = 0) -> bytes:
    return packet(seq, bytes([header, affected, 0]) + struct.pack("<HH", status, 0))


def eof(status: int = 2) -> bytes:
    return b"\xfe\0\0" + struct.pack("<H", status)


def err(code: int, state: str, message: str, seq: int = 1) -> bytes:
    return packet(seq, b"\xff" + struct.pack("<H", code) + b"#" + state.encode() + message.encode())


def column(name: bytes) -> bytes:
    def s(x: bytes) -> bytes:
        return bytes([len(x)]) + x

    return s(b"def") + s(b"db") + s(b"t") + s(b"t") + s(name) + s(name) + b"\x0c" + bytes(12)


def text_row(*values: bytes) -> bytes:
    return b"".join(bytes([len(v)]) + v for v in values)


def result_set(columns: int, rows: int, deprecate_eof: bool = False, status: int = 2) -> bytes:
    """A text result set (its packets numbered from 1)."""
    payloads = [bytes([columns]), *(column(b"c%d" % i) for i in range(columns))]
    if not deprecate_eof:
        payloads.append(eof())
    payloads += [text_row(*[b"v"] * columns) for _ in range(rows)]
    end = eof(status) if not deprecate_eof else b"\xfe\0\0" + struct.pack("<HH", status, 0)
    return packets(1, *payloads, end)


def command(cmd: int, body: bytes = b"") -> bytes:
    return packet(0, bytes([cmd]) + body)


def prepare_ok(stmt: int, columns: int, params: int, deprecate_eof: bool = False) -> bytes:
    payloads = [b"\0" + struct.pack("<IHHBH", stmt, columns, params, 0, 0)]
    for n in (params, columns):
        if n:
            payloads += [column(b"p")] * n + ([] if deprecate_eof else [eof()])
    return packets(1, *payloads)


def binary_result(rows: int) -> bytes:
    return packets(1, b"\x01", column(b"c"), eof(), *[b"\0\0\x01v"] * rows, eof())


def conversation(deprecate_eof: bool = False) -> list[tuple[bool, bytes]]:
    """A client's session as it sees it (ingress: received)."""
    caps = CAPS | (mysql.CLIENT_DEPRECATE_EOF if deprecate_eof else 0)
    return [
        (True, greeting(caps)),
        (False, handshake_response(caps)),
        (True, packet(2, b"\xfe" + b"mysql_native_password\0" + bytes(21))),  # an auth switch
        (False, packet(3, bytes(20))),
        (True, ok(4)),
        (False, command(mysql.QUERY, b"SELECT a, b FROM t WHERE name = 'secret' AND id = 42")),
        (True, result_set(2, 3, deprecate_eof)),
        (False, command(mysql.PREPARE, b"SELECT c FROM t WHERE id = ?")),
        (True, prepare_ok(7, 1, 1, deprecate_eof)),
        (False, command(mysql.EXECUTE, struct.pack("<IBI", 7, 0, 1) + b"\0\x01\x03\0\x05\0\0\0")),
        (True, binary_result(1) if not deprecate_eof else packets(1, b"\x01", column(b"c"), b"\0\0\x01v",
                                                                  b"\xfe\0\0\x02\0\0\0")),
        (False, command(mysql.CLOSE, struct.pack("<I", 7)) + command(0x0E)),  # no answer, then a ping
        (True, ok()),
        (False, command(mysql.INIT_DB, b"shop")),
        (True, ok()),
        (False, command(mysql.QUERY, b"SELEC 1")),
        (True, err(1064, "42000", "You have an error in your SQL syntax; check the manual that corresponds "
                   "to your MariaDB server version for the right syntax to use near 'SELEC 1' at line 1")),
        (False, command(mysql.QUERY, b"INSERT INTO t VALUES (1)")),
        (True, ok(affected=1)),
        (False, command(mysql.QUIT)),
    ]  # fmt: skip


EXPECTED = [
    ("Connect", "OK", 0),
    ("Query", "OK", 3),
    ("Prepare", "OK", 0),
    ("Execute", "OK", 1),
    ("Close stmt", "NONE", 0),
    ("Ping", "OK", 0),
    ("Init DB", "OK", 0),
    ("Query", "ERR", 0),
    ("Query", "OK", 0),
    ("Quit", "NONE", 0),
]


def feed(
    calls: list[tuple[bool, bytes]], capture: int = 1 << 20, role: str = "client", close: bool = True
) -> tuple[list[Exchange], Connections]:
    tracker = Connections()
    conn = tracker.add(("k", 7), connection(role, ports=(40000, 3306)))
    out: list = []
    for t, (ingress, data) in enumerate(calls):
        tracker.data(conn, ingress, data[:capture], len(data), t * 1000, t * 1000 + 10, b"", out)
    if close:
        tracker.close(7, 10**9, out)
    return [exchange for _, exchange in out], tracker


def summary(exchanges: list[Exchange]) -> list[tuple[str, str, int]]:
    return [
        (e.request.fields["cmd"], e.response.fields["status"], e.response.fields["rows"])  # type: ignore[union-attr]
        for e in exchanges
    ]


def sizes(exchange: Exchange) -> tuple[int, int]:
    assert exchange.response is not None
    return exchange.request.size, exchange.response.size


def test_a_session_with_and_without_eof_packets() -> None:
    for deprecate_eof in (False, True):
        calls = conversation(deprecate_eof)
        exchanges, tracker = feed(calls)
        assert summary(exchanges) == EXPECTED
        assert exchanges[3].request.fields["query"] == "SELECT c FROM t WHERE id = ?"  # joined by id
        assert exchanges[7].response.fields["error"].startswith("ERROR 1064 (42000): You have an error")  # type: ignore[union-attr]
        # Sizes on the wire: the query's exchange holds every byte of its request and response.
        assert sizes(exchanges[1]) == (len(calls[5][1]), len(calls[6][1]))
        assert exchanges[0].request.size == len(calls[1][1]) + len(calls[3][1])  # the auth data too
        assert exchanges[-1].response.end_ns == 10**9  # COM_QUIT is answered by the close
        assert tracker.counts.unmatched == tracker.counts.unanswered == tracker.counts.parse_errors == 0


def test_records_are_normalised_and_redacted() -> None:
    exchanges, _ = feed(conversation())
    conn = connection("client", ports=(40000, 3306))
    rows = [records.record(conn, e, 1.0, keep_secrets=False) for e in exchanges]
    assert rows[1]["record"] == "mysql_events"
    assert rows[1]["req_body"] == "SELECT a, b FROM t WHERE name = ? AND id = ?"
    assert rows[1]["resp_body"] == "Resultset rows = 3" and rows[1]["resp_status"] == "OK"
    assert rows[6]["req_body"] == "shop"
    bad = rows[7]
    assert bad["resp_status"] == "ERR" and bad["error"].startswith("ERROR 1064 (42000): ")
    assert bad["error"].endswith("near 'SELEC ?' at line 1") and "SELEC 1" not in bad["resp_body"]
    kept = records.record(conn, exchanges[1], 1.0, keep_secrets=True)
    assert "'secret'" in kept["req_body"]


def test_every_byte_in_its_own_call_and_all_in_one() -> None:
    calls = conversation()
    # The greeting whole (the protocol is told from a connection's first calls), then byte by byte.
    one_by_one = [calls[0]] + [
        (ingress, data[i : i + 1]) for ingress, data in calls[1:] for i in range(len(data))
    ]
    assert summary(feed(one_by_one)[0]) == EXPECTED
    # The client pipelines everything it can: several packets per call.
    merged: list[tuple[bool, bytes]] = []
    for ingress, data in calls:
        if merged and merged[-1][0] == ingress:
            merged[-1] = (ingress, merged[-1][1] + data)
        else:
            merged.append((ingress, data))
    assert summary(feed(merged)[0]) == EXPECTED


def test_a_statement_longer_than_the_capture_keeps_exact_sizes() -> None:
    query = command(mysql.QUERY, b"SELECT '" + b"x" * 10_000 + b"'")
    rows = packets(1, b"\x01", column(b"c"), eof(), *[text_row(b"y" * 200)] * 15, eof())
    tracker = Connections()
    conn = tracker.add(("k", 7), connection("client", ports=(40000, 3306)))
    out: list = []
    tracker.data(conn, False, query[:300], len(query), 0, 10, b"", out)
    tracker.data(conn, True, rows, len(rows), 20, 30, b"", out)
    # Its head cut by the capture, the next statement is parsed (the first call begins a message).
    tracker.data(conn, False, query[:300], len(query), 40, 50, b"", out)
    tracker.data(conn, True, rows, len(rows), 60, 70, b"", out)
    exchanges = [e for _, e in out]
    assert summary(exchanges) == [("Query", "OK", 15)] * 2
    assert sizes(exchanges[1]) == (len(query), len(rows))
    assert exchanges[1].request.fields["query"].startswith("SELECT 'xxx")
    assert tracker.counts.parse_errors == tracker.counts.truncated == 0


def test_begun_mid_connection() -> None:
    calls = conversation()
    # From inside the first result set: the rest of it, then the next commands.
    rest = calls[6][1][30:]
    exchanges, _ = feed([(True, rest), *calls[7:]], role="client")
    assert summary(exchanges) == EXPECTED[2:]
    # A server met with a response first (no handshake, no command seen): found by its port.
    assert protocols.detect(ok(), False, (3306, 40000)) is not None
    assert protocols.detect(ok(), False, (1234, 40000)) is None


def test_detection() -> None:
    assert protocols.detect(greeting(), False, (40000, 1)).protocol == "mysql"  # type: ignore[union-attr]
    assert not protocols.detect(greeting(), False, (40000, 1)).is_request  # type: ignore[union-attr]
    assert protocols.detect(handshake_response(), False, (1, 2)).is_request  # type: ignore[union-attr]
    assert protocols.detect(command(mysql.QUERY, b"select 1"), False, (1, 2)).protocol == "mysql"  # type: ignore[union-attr]
    assert protocols.detect(b"GET / HTTP/1.1\r\n", False, (1, 3306)).protocol == "http"  # type: ignore[union-attr]
    assert protocols.detect(command(mysql.QUERY, b"\x00\x01binary"), False, (1, 2)) is None


def test_tls_after_the_ssl_request_is_not_parsed() -> None:
    ssl = packet(1, struct.pack("<IIB", CAPS | mysql.CLIENT_SSL, 1 << 24, 0x21) + bytes(23))
    calls = [(True, greeting()), (False, ssl), (False, b"\x16\x03\x01\x02\x00" + bytes(100))]
    exchanges, tracker = feed(calls, close=False)
    assert exchanges == [] and next(iter(tracker.connections.values())).ignored == "tls"


def test_multi_results_and_a_cursor() -> None:
    calls = [
        (False, command(mysql.QUERY, b"CALL p()")),
        # Two result sets, then the procedure's own OK.
        (True, result_set(1, 2, status=2 | mysql.MORE_RESULTS_EXISTS)[:-9]
         + packet(6, eof(2 | mysql.MORE_RESULTS_EXISTS))
         + packets(7, b"\x01", column(b"c"), eof(), eof(2 | mysql.MORE_RESULTS_EXISTS))
         + ok(11)),
        (False, command(0x0E)),
        (True, ok()),
    ]  # fmt: skip
    exchanges, tracker = feed(calls)
    assert summary(exchanges) == [("Query", "OK", 2), ("Ping", "OK", 0)]
    assert tracker.counts.parse_errors == 0


# --- fuzzing --------------------------------------------------------------------------------------------
SESSION = conversation()
CLEAN = [(False, command(mysql.QUERY, b"SELECT 1")), (True, result_set(1, 1))]


@SETTINGS
@given(calls=st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=12))
def test_arbitrary_bytes_never_raise(calls: list[tuple[bool, bytes]]) -> None:
    converse(calls, role="unknown", ports=(40000, 3306))


@SETTINGS
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
    start=st.integers(min_value=0, max_value=len(SESSION) - 1),
    skip=st.integers(min_value=0, max_value=40),
    capture=st.integers(min_value=1, max_value=64),
    garbage=st.binary(max_size=40),
    where=st.integers(min_value=0, max_value=20),
    role=st.sampled_from(["client", "server", "unknown"]),
    port=st.sampled_from([3306, 40001]),
)
def test_cut_captured_partly_mid_stream_and_garbage(
    cuts: list[int], start: int, skip: int, capture: int, garbage: bytes, where: int, role: str, port: int
) -> None:
    """A session begun at any call, ``skip`` bytes in, split into calls anywhere, each captured up to
    ``capture`` bytes, garbage in between: feeding it raises nothing, and the next connection's clean
    conversation is parsed whole."""
    flip = role == "server"  # the conversation is written as its client sees it
    broken: list[tuple[bool, bytes]] = []
    for i, (ingress, data) in enumerate(SESSION[start:]):
        data = data[skip:] if i == 0 else data
        broken += [(ingress != flip, c) for c in split(data, cuts)]
    broken.insert(min(where, len(broken)), (not flip, garbage))
    tracker = Connections()
    damaged = tracker.add(("damaged", 7), connection(role, ports=(40000, port)))
    clean = tracker.add(("clean", 8), connection(role, ports=(40001, port)))
    out: list = []
    for t, (ingress, data) in enumerate(broken):
        tracker.data(damaged, ingress, data[:capture], len(data), t, t + 1, b"", out)
    tracker.close(7, 10**6, out)
    out.clear()
    for t, (ingress, data) in enumerate(CLEAN):
        tracker.data(clean, ingress != flip, data, len(data), 1000 + t, 1001 + t, b"", out)
    assert [(e.protocol, e.request.fields["cmd"]) for _, e in out] == [("mysql", "Query")]


@SETTINGS
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
def test_any_split_parses_the_same(cuts: list[int]) -> None:
    """Calls split anywhere (packets across calls, several per call) change nothing."""
    calls = [SESSION[0]] + [(ingress, c) for ingress, data in SESSION[1:] for c in split(data, cuts)]
    assert summary(feed(calls)[0]) == EXPECTED


def test_bench_leaves_the_connection_phase_out() -> None:
    """bench's spans are the workload's requests: the connection phase is set-up, as PostgreSQL's."""
    import numpy as np

    from bpfscope.domains.bench.spans import CallThreads, span_of

    exchanges, _ = feed(conversation())
    threads = CallThreads(np.dtype([("cookie", "u8"), ("end_ns", "u8"), ("tid", "u4")]))
    conn = connection("client", ports=(40000, 3306))
    spans = [span_of(conn, e, threads) for e in exchanges]
    assert spans[0] is None
    assert spans[1] is not None and spans[1].what == "SELECT a, b FROM t WHERE name = ? AND id = ?"


def test_statements_described_without_eofs_met_mid_connection() -> None:
    """No handshake seen: whether EOF packets follow a statement's description is learned from the
    packets; when nothing tells yet, the next response (or the close) ends it."""
    delete, select = b"DELETE FROM t WHERE id = ?", b"SELECT c FROM t WHERE id = ?"
    calls = [
        (False, command(mysql.PREPARE, delete)),
        (True, prepare_ok(9, 0, 1, deprecate_eof=True)),  # an EOF may follow: not known yet
        (False, command(0x0E)),
        (True, ok()),  # it did not: this is the ping's answer
        (False, command(mysql.PREPARE, select)),
        (True, prepare_ok(10, 1, 1, deprecate_eof=True)),
        (False, command(mysql.EXECUTE, struct.pack("<IBI", 10, 0, 1) + b"\0\x01\x03\0\x05\0\0\0")),
        (True, packets(1, b"\x01", column(b"c"), b"\0\0\x01v", b"\xfe\0\0\x02\0\0\0")),
        (False, command(mysql.PREPARE, delete)),
        (True, prepare_ok(11, 0, 1, deprecate_eof=True)),  # known by now: ends at once
    ]
    exchanges, tracker = feed(calls, close=False)
    assert summary(exchanges) == [("Prepare", "OK", 0), ("Ping", "OK", 0), ("Prepare", "OK", 0),
                                  ("Execute", "OK", 1), ("Prepare", "OK", 0)]  # fmt: skip
    assert exchanges[3].request.fields["query"] == select.decode()
    # A description that waits for an EOF ends with the connection when nothing else comes.
    exchanges, tracker = feed(calls[:2])
    assert summary(exchanges) == [("Prepare", "OK", 0)] and tracker.counts.unanswered == 0


def test_a_cursor_statistics_and_change_user() -> None:
    execute = command(mysql.EXECUTE, struct.pack("<IBI", 7, 1, 1))  # CURSOR_TYPE_READ_ONLY
    calls = [
        (False, command(mysql.PREPARE, b"SELECT c FROM t")),
        (True, prepare_ok(7, 1, 0)),
        (False, execute),
        (True, packets(1, b"\x01", column(b"c"), eof(2 | mysql.CURSOR_EXISTS))),  # rows by COM_STMT_FETCH
        (False, command(mysql.FETCH, struct.pack("<II", 7, 100))),
        (True, packets(1, b"\0\0\x01v", b"\0\0\x01w", eof(2 | 0x80))),  # the last row sent
        (False, command(mysql.STATISTICS)),
        (True, packet(1, b"Uptime: 5  Threads: 1  Questions: 9")),
        (False, command(mysql.CHANGE_USER, b"other\0\x14" + bytes(20) + b"db\0")),
        (True, packet(1, b"\xfe" + b"mysql_native_password\0" + bytes(21))),
        (False, packet(2, bytes(20))),
        (True, ok(3)),
    ]
    exchanges, tracker = feed(calls)
    assert summary(exchanges) == [("Prepare", "OK", 0), ("Execute", "OK", 0), ("Fetch", "OK", 2),
                                  ("Statistics", "OK", 0), ("Change user", "OK", 0)]  # fmt: skip
    assert exchanges[3].response.fields["info"].startswith("Uptime")  # type: ignore[union-attr]
    assert tracker.counts.parse_errors == tracker.counts.unmatched == 0


def test_rows_beyond_the_capture_are_counted_as_bytes_to_the_result_sets_end() -> None:
    """A result set longer than the capture: its packets after the cut are not found, but the call's
    last bytes (the kernel sends them too) hold the EOF that ends it; the size stays exact."""
    query = command(mysql.QUERY, b"SELECT c FROM t")
    rows = packets(1, b"\x01", column(b"c"), eof(), *[text_row(b"y" * 200)] * 60, eof())
    half = len(rows) // 2
    tracker = Connections()
    conn = tracker.add(("k", 7), connection("client", ports=(40000, 3306)))
    out: list = []
    for t, (ingress, data) in enumerate([(False, query), (True, rows), (False, query)]):
        head, tail = (data[:300], data[-64:]) if len(data) > 300 + 64 else (data, b"")
        tracker.data(conn, ingress, head, len(data), t * 10, t * 10 + 5, tail, out)
    # The same in two calls, each cut, the second beginning inside a row.
    tracker.data(conn, True, rows[:300], half, 40, 45, rows[half - 64 : half], out)
    tracker.data(conn, True, rows[half : half + 300], len(rows) - half, 50, 55, rows[-64:], out)
    tracker.data(conn, False, command(0x0E), 5, 60, 65, b"", out)
    tracker.data(conn, True, ok(), 11, 70, 75, b"", out)
    exchanges = [e for _, e in out]
    assert [e.request.fields["cmd"] for e in exchanges] == ["Query", "Query", "Ping"]
    assert sizes(exchanges[0]) == sizes(exchanges[1]) == (len(query), len(rows))
    assert exchanges[1].response.end_ns == 55 and exchanges[0].response.fields["cut"]  # type: ignore[union-attr]
    assert tracker.counts.parse_errors == tracker.counts.truncated == 0
