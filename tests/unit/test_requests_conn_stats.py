"""conn_stats from the request tracer's connections: the tracker's index of connections by socket cookie
(a close finds its connections without scanning the others) and the join of tcpretrans's retransmitted
segments per cookie into the rows."""

from __future__ import annotations

import time

from bpfscope.domains.requests import capture
from bpfscope.domains.requests.capture import Connection, Connections
from bpfscope.domains.requests.stats import ConnStats


def connection(cookie: int, pid: int = 1, encrypted: bool = False, remote_port: int = 8080) -> Connection:
    return Connection(
        pid=pid, tid=pid, comm="test", cgroup=0, fd=3, cookie=cookie, udp=False, encrypted=encrypted,
        local_addr="10.0.0.1", local_port=40000 + cookie, remote_addr="10.0.0.2", remote_port=remote_port,
        role="client",
    )  # fmt: skip


def test_close_takes_the_cookies_connections_only() -> None:
    tracker = Connections()
    for cookie in range(1, 6):
        tracker.add((1, cookie, False), connection(cookie))
    tracker.add((1, 3, True), connection(3, encrypted=True))  # the same socket through OpenSSL
    tracker.add((2, 3, False), connection(3, pid=2))  # and shared with another process
    tracker.close(3, 10**9, [])
    assert sorted(tracker.connections) == [(1, c, False) for c in (1, 2, 4, 5)]
    assert sorted((c.pid, c.encrypted) for c in tracker.take_closed()) == [(1, False), (1, True), (2, False)]
    assert 3 not in tracker.by_cookie
    tracker.close(3, 10**9, [])  # closed twice, or never seen: nothing
    tracker.close(99, 10**9, [])
    assert len(tracker.connections) == 4 and tracker.take_closed() == []


def test_the_index_follows_forgotten_connections(monkeypatch) -> None:
    monkeypatch.setattr(capture, "MAX_CONNECTIONS", 3)
    tracker = Connections()
    for cookie in range(1, 6):
        tracker.add((1, cookie, False), connection(cookie))
    # The two least recently used were forgotten past the limit: a close of theirs finds nothing.
    assert [c.cookie for c in tracker.take_closed()] == [1, 2]
    assert set(tracker.by_cookie) == {3, 4, 5}
    tracker.close(1, 10**9, [])
    assert tracker.take_closed() == []
    # Silent ones are swept.
    for conn in tracker.connections.values():
        conn.last_ns = time.monotonic_ns()
    tracker.connections[(1, 4, False)].last_ns = 1
    tracker._last_sweep = 0
    tracker._sweep([])
    assert set(tracker.by_cookie) == {3, 5} and [c.cookie for c in tracker.take_closed()] == [4]
    tracker.close(5, 10**9, [])
    assert list(tracker.connections) == [(1, 3, False)] and set(tracker.by_cookie) == {3}


def rows(stats: ConnStats) -> dict[tuple[int, int], int]:
    """(pid, remote port) -> retransmitted segments."""
    return {(r["pid"], r["remote_port"]): r["retrans"] for r in stats.records(0.0, 1.0)}


def test_retransmissions_join_their_connection_by_cookie() -> None:
    stats = ConnStats()
    a, b = connection(1, remote_port=80), connection(2, remote_port=81)
    stats.update([a, b], [], {1: 3, 2: 0, 9: 5})  # 9: a socket the tracer does not follow
    assert rows(stats) == {(1, 80): 3, (1, 81): 0}
    # Cumulative: the next interval adds to the row.
    stats.update([a, b], [], {1: 2, 2: 4})
    assert rows(stats) == {(1, 80): 5, (1, 81): 4}
    # Connection 2 closed with its last retransmissions since the previous read (its row's final count).
    stats.update([a], [b], {2: 1}, forgotten=frozenset({2}))
    assert rows(stats) == {(1, 80): 5, (1, 81): 5}
    assert stats.unclaimed == {9: 5}


def test_retransmissions_before_the_tracer_sees_the_connection_are_kept() -> None:
    stats = ConnStats()
    # SYNs retransmitted before the first bytes: the tracer does not know the connection yet.
    stats.update([], [], {4: 2})
    stats.update([], [], {})
    late = connection(4)
    stats.update([late], [], {4: 1})
    assert rows(stats) == {(1, 8080): 3}


def test_a_closed_connections_count_waits_one_update_for_the_tracer() -> None:
    stats = ConnStats()
    # The kernel's row was read (and let go) before the tracer read the connection's close.
    stats.update([], [], {5: 7}, forgotten=frozenset({5}))
    stats.update([], [connection(5)], {})
    assert rows(stats) == {(1, 8080): 7} and stats.unclaimed == {}
    # Never claimed: let go after one more update, not kept for ever.
    stats.update([], [], {6: 2}, forgotten=frozenset({6}))
    stats.update([], [], {})
    assert stats.unclaimed == {} and stats.let_go == frozenset()
    stats.update([connection(6)], [], {})
    assert rows(stats)[(1, 8080)] == 7  # the same row (pid 1, port 8080): nothing added


def test_a_socket_seen_through_openssl_counts_once_on_its_plain_connection() -> None:
    stats = ConnStats()
    tls = connection(8, encrypted=True)
    plain = connection(8)
    stats.update([tls, plain], [], {8: 4})
    by_ssl = {r["ssl"]: r["retrans"] for r in stats.records(0.0, 1.0)}
    assert by_ssl == {True: 0, False: 4}
    shared = connection(8, pid=2)  # another process on the same socket: not counted twice
    stats.update([plain, shared], [], {8: 1})
    assert sum(r["retrans"] for r in stats.records(0.0, 1.0)) == 5
