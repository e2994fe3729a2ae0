"""Pixie's two other tables beside the requests: ``conn_stats`` (each process's connections to each
peer: bytes, TCP segments retransmitted, connections opened and closed, cumulative since the tool
started) and ``process_stats`` (the CPU, memory and I/O of the processes that spoke, from /proc), one
record per row at each interval.

Retransmitted segments are the network domain's: tcpretrans's count mode counts them per socket cookie in
the kernel, exactly as /proc/net/snmp RetransSegs does (tcpretrans.bpf.c), and keeps a closed
connection's row until it is read; each interval's counts are joined to the request tracer's connections
by their cookie.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bpfscope.domains.requests.requests import RequestsCollector

from bpfscope.domains.net.tcpretrans import TcpretransCollector, TcpretransConfig
from bpfscope.domains.requests.capture import Connection
from bpfscope.runtime.collector import Collector, Sample
from bpfscope.runtime.losses import Losses
from bpfscope.runtime.schema import CGROUP, COMM, PID, Field, Schema

CONN_STATS = Schema(
    "conn_stats",
    (
        PID,
        COMM,
        CGROUP,
        Field("remote_addr", "str", label=True, doc="the peer's address"),
        Field(
            "remote_port",
            "int",
            label=True,
            doc="the peer's port; a server's row: its own (its clients' are many)",
        ),
        Field("trace_role", "enum", values=("client", "server", "unknown"), label=True),
        Field("protocol", "str", label=True, doc="http, dns, pgsql, mysql, redis, tls, unknown"),
        Field("ssl", "bool", doc="TLS plaintext captured through OpenSSL"),
        Field("conn_open", "int", doc="connections seen, since the start"),
        Field("conn_close", "int", doc="of them closed"),
        Field("conn_active", "int", doc="open now"),
        Field("bytes_sent", "int", "bytes", "sent, since the start"),
        Field("bytes_recv", "int", "bytes", "received, since the start"),
        Field(
            "retrans",
            "int",
            doc="TCP segments retransmitted, since the start (as /proc/net/snmp RetransSegs counts them)",
        ),
    ),
    doc="A process's connections to one peer (a server's: to all its clients on one port).",
    interval=True,
)

PROCESS_STATS = Schema(
    "process_stats",
    (
        PID,
        COMM,
        Field("cpu_utime_ns", "int", "ns", "user CPU time, since the process started"),
        Field("cpu_ktime_ns", "int", "ns", "system CPU time, since the process started"),
        Field("num_threads", "int"),
        Field("vsize_bytes", "int", "bytes"),
        Field("rss_bytes", "int", "bytes"),
        Field("rchar_bytes", "int", "bytes", "read by the process (any file or socket)"),
        Field("wchar_bytes", "int", "bytes", "written by the process"),
        Field("read_bytes", "int", "bytes", "read from storage"),
        Field("write_bytes", "int", "bytes", "written to storage"),
        Field("major_faults", "int"),
        Field("minor_faults", "int"),
    ),
    doc="A process that sent or answered requests, as /proc sees it.",
    interval=True,
)


@dataclass
class PeerStats:
    pid: int
    comm: str
    cgroup: int
    remote_addr: str
    remote_port: int
    trace_role: str
    protocol: str
    ssl: bool
    conn_open: int = 0
    conn_close: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    retrans: int = 0
    open_keys: set = field(default_factory=set)


class ConnStats:
    """Cumulative counters per (process, peer, role, protocol): connections are counted once when first
    seen and once when closed, bytes as they move, retransmitted segments as tcpretrans reads them."""

    def __init__(self) -> None:
        self.rows: dict[tuple, PeerStats] = {}
        self.pids: set[int] = set()
        # Segments retransmitted per socket cookie that no row has taken yet: the tracer has not seen the
        # connection yet (a SYN retransmitted before its first bytes, records still in its ring), or
        # never will (a process or port not traced). Kept while the connection is open, and one update
        # after tcpretrans let its row go (the tracer may read the close after the kernel's row was read).
        self.unclaimed: dict[int, int] = {}
        self.let_go: Set[int] = frozenset()

    def _row(self, conn: Connection) -> PeerStats:
        role = conn.trace_role if conn.trace_role in ("client", "server") else "unknown"
        # A server's clients come from ports without number: one row per its own port instead.
        port = conn.local_port if role == "server" else conn.remote_port
        addr = "" if role == "server" else conn.remote_addr
        key = (conn.pid, addr, port, role, conn.protocol, conn.encrypted)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = PeerStats(
                conn.pid, conn.comm, conn.cgroup, addr, port, role, conn.protocol, conn.encrypted
            )
        return row

    def update(
        self,
        connections: Iterable[Connection],
        closed: Iterable[Connection],
        retransmitted: Mapping[int, int] | None = None,
        forgotten: Set[int] = frozenset(),
    ) -> None:
        """Fold in the connections' counters (the tracker's, cumulative per connection) and the segments
        retransmitted since the previous update per socket cookie, with the cookies whose rows
        tcpretrans has let go since (``forgotten``: closed connections, whose counts are final)."""
        seen = [(conn, self._count(conn, closing=False)) for conn in connections]
        seen += [(conn, self._count(conn, closing=True)) for conn in closed]
        if retransmitted is not None:
            self._join_retransmitted(seen, retransmitted, forgotten)

    def _join_retransmitted(
        self, seen: list[tuple[Connection, PeerStats]], retransmitted: Mapping[int, int], forgotten: Set[int]
    ) -> None:
        unclaimed = self.unclaimed
        for cookie, segments in retransmitted.items():
            if segments:
                unclaimed[cookie] = unclaimed.get(cookie, 0) + segments
        if unclaimed:
            # A socket seen through OpenSSL too has two connections: its segments go to the plain one,
            # whose bytes are the wire's, and once only (processes sharing a socket: to the first).
            for encrypted in (False, True):
                for conn, row in seen:
                    if conn.encrypted == encrypted and conn.cookie in unclaimed:
                        row.retrans += unclaimed.pop(conn.cookie)
        for cookie in self.let_go:
            unclaimed.pop(cookie, None)
        self.let_go = forgotten & unclaimed.keys()

    def _count(self, conn: Connection, closing: bool) -> PeerStats:
        row = self._row(conn)
        self.pids.add(conn.pid)
        key = id(conn)
        if key not in row.open_keys and not closing:
            row.open_keys.add(key)
            row.conn_open += 1
        sent, recv = conn.bytes_sent - conn.counted_sent, conn.bytes_recv - conn.counted_recv
        row.bytes_sent += sent
        row.bytes_recv += recv
        conn.counted_sent, conn.counted_recv = conn.bytes_sent, conn.bytes_recv
        if closing:
            if key not in row.open_keys:
                row.conn_open += 1
            row.open_keys.discard(key)
            row.conn_close += 1
        return row

    def records(self, ts: float, interval_s: float) -> Iterator[dict[str, Any]]:
        for row in self.rows.values():
            yield CONN_STATS.record(
                {
                    "ts": ts,
                    "interval_s": interval_s,
                    "pid": row.pid,
                    "comm": row.comm,
                    "cgroup": row.cgroup,
                    "remote_addr": row.remote_addr,
                    "remote_port": row.remote_port,
                    "trace_role": row.trace_role,
                    "protocol": row.protocol,
                    "ssl": row.ssl,
                    "conn_open": row.conn_open,
                    "conn_close": row.conn_close,
                    "conn_active": len(row.open_keys),
                    "bytes_sent": row.bytes_sent,
                    "bytes_recv": row.bytes_recv,
                    "retrans": row.retrans,
                }
            )


_TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_stats(pids: Iterable[int], ts: float, interval_s: float) -> Iterator[dict[str, Any]]:
    """A process_stats record per live process (those gone since are skipped)."""
    for pid in sorted(pids):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - read at once
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            f = stat[stat.rindex(")") + 2 :].split()
            io = dict(line.split(": ") for line in open(f"/proc/{pid}/io").read().splitlines())  # noqa: SIM115
            yield PROCESS_STATS.record(
                {
                    "ts": ts,
                    "interval_s": interval_s,
                    "pid": pid,
                    "comm": comm,
                    "cpu_utime_ns": int(int(f[11]) * _TICK_NS),
                    "cpu_ktime_ns": int(int(f[12]) * _TICK_NS),
                    "num_threads": int(f[17]),
                    "vsize_bytes": int(f[20]),
                    "rss_bytes": int(f[21]) * _PAGE,
                    "rchar_bytes": int(io["rchar"]),
                    "wchar_bytes": int(io["wchar"]),
                    "read_bytes": int(io["read_bytes"]),
                    "write_bytes": int(io["write_bytes"]),
                    "major_faults": int(f[9]),
                    "minor_faults": int(f[7]),
                }
            )


@dataclass
class StatsSample(Sample):
    """One interval's conn_stats and process_stats records."""

    rows: list[dict[str, Any]]
    ts: float

    def records(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)


class StatsCollector(Collector):
    """conn_stats and process_stats at each interval, from a requests collector's connections (an
    interval collector beside the stream one, in the same session) and tcpretrans's count mode."""

    name = "requests.stats"
    # Pixie samples its stats every 10 s too.
    default_interval_s = 10.0
    _schemas = (CONN_STATS, PROCESS_STATS)

    def __init__(self, requests: RequestsCollector) -> None:
        super().__init__(requests.config)
        self.requests = requests
        self.conn_stats = ConnStats()
        # Retransmissions by socket cookie: neither the sockets' owners nor the rates' segments sent,
        # which the join does not need (they cost a program at every TCP send and receive, and a
        # sock_diag listing of every namespace at each interval).
        self.tcpretrans = TcpretransCollector(TcpretransConfig(count_mode=True, owners=False, rates=False))
        self.rows = 0
        self.last = time.monotonic()

    def open(self) -> None:
        self.tcpretrans.open()

    def start(self) -> None:
        self.last = time.monotonic()
        self.tcpretrans.start()

    def sample(self) -> StatsSample | None:
        tracker = getattr(self.requests, "tracker", None)
        if tracker is None:
            return None
        now = time.monotonic()
        interval, self.last = now - self.last, now
        # The tracker first: a connection it closed has left its final count in tcpretrans's rows.
        connections, closed = list(tracker.iter_connections()), tracker.take_closed()
        retrans = self.tcpretrans.sample()
        assert retrans is not None  # count mode
        retransmitted = {c.cookie: c.retrans for c in retrans.conns if c.retrans}
        self.conn_stats.update(connections, closed, retransmitted, retrans.forgotten)
        ts = time.time()
        rows = [*self.conn_stats.records(ts, interval), *process_stats(self.conn_stats.pids, ts, interval)]
        # Processes with connections open stay in process_stats; the others leave it.
        self.conn_stats.pids = {c.pid for c in tracker.iter_connections()}
        self.rows += len(rows)
        return StatsSample(rows, ts)

    def losses(self) -> Losses:
        return self.tcpretrans.losses()

    def close(self) -> None:
        self.tcpretrans.close()
