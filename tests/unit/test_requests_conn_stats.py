"""The request tracer's connections for conn_stats: the tracker's index of connections by socket cookie
(a close finds its connections without scanning the others)."""

from __future__ import annotations

import time

from bpfscope.domains.requests import capture
from bpfscope.domains.requests.capture import Connection, Connections


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
