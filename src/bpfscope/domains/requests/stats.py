"""Pixie's two other tables beside the requests: ``conn_stats`` (each process's connections to each
peer: bytes and connections opened and closed, cumulative since the tool started) and
``process_stats`` (the CPU, memory and I/O of the processes that spoke, from /proc), one record per
row at each interval.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bpfscope.domains.requests.requests import RequestsCollector

from bpfscope.domains.requests.capture import Connection
from bpfscope.runtime.collector import Collector, Sample
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
    open_keys: set = field(default_factory=set)


class ConnStats:
    """Cumulative counters per (process, peer, role, protocol): connections are counted once when first
    seen and once when closed, bytes as they move."""

    def __init__(self) -> None:
        self.rows: dict[tuple, PeerStats] = {}
        self.pids: set[int] = set()

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

    def update(self, connections: Iterable[Connection], closed: Iterable[Connection]) -> None:
        """Fold in the connections' counters (the tracker's, cumulative per connection)."""
        for conn in connections:
            self._count(conn, closing=False)
        for conn in closed:
            self._count(conn, closing=True)

    def _count(self, conn: Connection, closing: bool) -> None:
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
    interval collector beside the stream one, in the same session)."""

    name = "requests.stats"
    # Pixie samples its stats every 10 s too.
    default_interval_s = 10.0
    _schemas = (CONN_STATS, PROCESS_STATS)

    def __init__(self, requests: RequestsCollector) -> None:
        super().__init__(requests.config)
        self.requests = requests
        self.conn_stats = ConnStats()
        self.rows = 0
        self.last = time.monotonic()

    def start(self) -> None:
        self.last = time.monotonic()

    def sample(self) -> StatsSample | None:
        tracker = getattr(self.requests, "tracker", None)
        if tracker is None:
            return None
        now = time.monotonic()
        interval, self.last = now - self.last, now
        self.conn_stats.update(tracker.iter_connections(), tracker.take_closed())
        ts = time.time()
        rows = [*self.conn_stats.records(ts, interval), *process_stats(self.conn_stats.pids, ts, interval)]
        # Processes with connections open stay in process_stats; the others leave it.
        self.conn_stats.pids = {c.pid for c in tracker.iter_connections()}
        self.rows += len(rows)
        return StatsSample(rows, ts)
