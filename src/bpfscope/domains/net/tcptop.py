"""bpfscope tcptop: the TCP connections moving the most bytes, per interval, like top.

The kernel side (tcptop.bpf.c) adds up the bytes each send and receive call returned, per socket and
process, IPv4 and IPv6, in every network namespace. Each interval reads the counters and shows their
differences, so nothing falls between two reads; rows of closed sockets are removed once shown.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import click

from bpfscope.cli.options import Run, common_options, option, top_options
from bpfscope.domains.net.conn import (
    OWNER_FIELDS,
    Conn,
    ConnCollector,
    ConnConfig,
    NetnsNames,
    Owner,
    conn_fields,
)
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import Sample
from bpfscope.runtime.schema import Schema, btf_fields
from bpfscope.sinks.terminal import Terminal, View, loadavg

Key = bytes  # the raw struct row_key: unique, hashable, and what a map delete takes


@dataclass
class Row:
    owner: Owner
    conn: Conn
    rx_bytes: int
    tx_bytes: int


SORTS = {
    "all": lambda r: r.rx_bytes + r.tx_bytes,
    "rx": lambda r: r.rx_bytes,
    "tx": lambda r: r.tx_bytes,
}


@cache
def row_schema() -> Schema:
    btf = TcptopCollector.btf()
    return Schema(
        "tcptop",
        (
            *OWNER_FIELDS,
            *conn_fields(btf),
            *btf_fields(
                btf.struct("row_bytes"),
                rx_bytes={"doc": "bytes receive calls returned"},
                tx_bytes={"doc": "bytes send calls returned"},
            ),
        ),
        doc="One connection's bytes moved by one process over an interval.",
        interval=True,
    )


@dataclass
class TcptopSample(Sample):
    ts: float
    interval_s: float
    rows: list[Row]  # by the configured sort, the busiest first

    def records(self) -> Iterator[dict[str, Any]]:
        schema = row_schema()
        for r in self.rows:
            yield schema.record(
                {
                    "ts": self.ts,
                    "interval_s": self.interval_s,
                    **r.owner.to_dict(),
                    **r.conn.to_dict(),
                    "rx_bytes": r.rx_bytes,
                    "tx_bytes": r.tx_bytes,
                }
            )


@dataclass(kw_only=True)
class TcptopConfig(ConnConfig):
    sort: str = "all"  # the order of a sample's rows (SORTS)

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise BpfscopeError(f"tcptop cannot sort by {self.sort!r}", hint=", ".join(SORTS))


class TcptopCollector(ConnCollector[TcptopConfig]):
    """Bytes per connection and process, counted in the kernel; each sample is the interval's difference."""

    name = "tcptop"
    bpf_object = "tcptop"
    requires = ("raw_tracepoint",)
    default_interval_s = 1.0
    loss_counters = {"rows_dropped": ("map_full", "bytes not counted (too many connections)")}

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return (row_schema(),)

    def streams_events(self) -> bool:
        return False

    def max_entries(self) -> dict[str, int]:
        # The owner map net.bpf.h declares is for tools that attribute softirq events; tcptop counts in
        # the caller's context and never uses it: one entry instead of a preallocated 65536.
        return {"bs_owners": 1}

    def start(self) -> None:
        self.before: dict[Key, tuple[int, int]] = self._counts()[0]
        self.t0 = time.monotonic()

    def sample(self) -> TcptopSample:
        assert self.obj is not None
        now, keys = self._counts()
        t = time.monotonic()
        rows = []
        for k in keys:
            raw = k.tobytes()
            rx, tx = now[raw]
            rx0, tx0 = self.before.get(raw, (0, 0))
            if (rx, tx) != (rx0, tx0):
                rows.append(
                    Row(Owner.from_record(k["owner"]), Conn.from_record(k["conn"]), rx - rx0, tx - tx0)
                )
        self._forget_closed(keys, now)
        rows.sort(key=SORTS[self.config.sort], reverse=True)
        sample = TcptopSample(time.time(), t - self.t0, rows)
        self.before, self.t0 = now, t
        return sample

    def _counts(self) -> tuple[dict[Key, tuple[int, int]], Any]:
        assert self.obj is not None
        keys, values = self.obj.maps["rows"].items()
        counts = {
            k.tobytes(): (int(v["rx_bytes"]), int(v["tx_bytes"])) for k, v in zip(keys, values, strict=True)
        }
        return counts, keys

    def _forget_closed(self, keys: Any, now: dict[Key, tuple[int, int]]) -> None:
        """Delete the rows of closed sockets that did not change this interval: all their bytes have
        been shown, and a closed socket sends and receives no more."""
        assert self.obj is not None
        closed = self.obj.maps["closed"]
        gone = set()
        for k in keys:
            raw = k.tobytes()
            if now[raw] == self.before.get(raw) and closed.lookup_bytes(int(k["cookie"])) is not None:
                self.obj.maps["rows"].delete(raw)
                gone.add(int(k["cookie"]))
                del now[raw]
        for cookie in gone:
            closed.delete(cookie)


class TcptopView(View):
    top = True

    def __init__(self, sort: str, max_rows: int, noclear: bool) -> None:
        self.sort, self.max_rows, self.noclear = sort, max_rows, noclear
        self.start = time.monotonic()
        self.netns = NetnsNames()

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, TcptopSample)
        # Totals over every connection, not only the rows shown.
        rx = sum(r.rx_bytes for r in sample.rows) / 1024
        tx = sum(r.tx_bytes for r in sample.rows) / 1024
        term.heading(
            f"{time.monotonic() - self.start:.1f}s  {loadavg()}  RX {rx:.0f} kB  TX {tx:.0f} kB  "
            f"sorted by {self.sort}"
        )
        table = [
            [
                r.owner.pid,
                r.owner.comm,
                self.netns(r.conn.netns),
                r.conn.local,
                r.conn.remote,
                round(r.rx_bytes / 1024, 1),
                round(r.tx_bytes / 1024, 1),
            ]
            for r in sample.rows[: self.max_rows]
        ]
        if table:
            term.table(["PID", "COMM", "NETNS", "LADDR", "RADDR", "RX kB", "TX kB"], table)
        else:
            term.line("no TCP traffic")


EXAMPLES = """
\b
Examples:
  bpfscope tcptop                   # refresh every second until Ctrl-C
  bpfscope tcptop -C 5 3            # every 5 seconds, 3 times, no screen clearing
  bpfscope tcptop -s rx --lport 5432   # connections to local port 5432, by bytes received
  bpfscope tcptop -p 1234 --json    # one process's connections, JSON lines
"""


@click.command(name="tcptop", epilog=EXAMPLES)
@top_options(sorted(SORTS), "all", "Sort by bytes moved (all), received or sent.")
@option("lport")
@option("dport")
@common_options
def command(run: Run, sort: str, max_rows: int, noclear: bool, lport: int | None, dport: int | None) -> None:
    """Top TCP connections by throughput, per interval (1 s by default): process, addresses, RX and TX kB.

    Bytes are what send and receive calls returned to the process (what the application moved, as
    iperf3 counts it), in every network namespace. The process is the one that made the call.
    """
    config = run.config(TcptopConfig, sort=sort, lport=lport, dport=dport)
    view = TcptopView(sort, max_rows, noclear)
    run.run(TcptopCollector(config), view, "Tracing TCP sends and receives... Ctrl-C to end.")
