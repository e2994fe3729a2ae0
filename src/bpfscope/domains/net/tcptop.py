"""bpfscope tcptop: the TCP connections moving the most bytes, per interval, like top.

The kernel side (tcptop.bpf.c) adds up the bytes each send and receive call returned, per socket and
process, IPv4 and IPv6, in every network namespace. Each interval reads the counters and shows their
differences, so nothing falls between two reads; rows of closed sockets are removed once shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.net import conn as net
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.sinks import top

REQUIRES = ("raw_tracepoint",)
DEFAULT_INTERVAL = 1.0

Key = bytes  # the raw struct row_key: unique, hashable, and what a map delete takes


@dataclass
class Row:
    owner: net.Owner
    conn: net.Conn
    rx_bytes: int
    tx_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.owner.to_dict(),
            **self.conn.to_dict(),
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
        }


SORTS = {
    "all": lambda r: r.rx_bytes + r.tx_bytes,
    "rx": lambda r: r.rx_bytes,
    "tx": lambda r: r.tx_bytes,
}


class ConnectionBytes:
    """Bytes per connection and process since the last call, read from a loaded tcptop object."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.before: dict[Key, tuple[int, int]] = {}

    def interval(self) -> list[Row]:
        keys, values = self.obj.maps["rows"].items()
        now: dict[Key, tuple[int, int]] = {}
        out = []
        for k, v in zip(keys, values, strict=True):
            raw = k.tobytes()
            counts = (int(v["rx_bytes"]), int(v["tx_bytes"]))
            now[raw] = counts
            rx0, tx0 = self.before.get(raw, (0, 0))
            if counts != (rx0, tx0):
                out.append(
                    Row(
                        net.Owner.from_record(k["owner"]),
                        net.Conn.from_record(k["conn"]),
                        counts[0] - rx0,
                        counts[1] - tx0,
                    )
                )
        self._forget_closed(keys, now)
        self.before = now
        return out

    def _forget_closed(self, keys: Any, now: dict[Key, tuple[int, int]]) -> None:
        """Delete the rows of closed sockets that did not change this interval: all their bytes have
        been shown, and a closed socket sends and receives no more."""
        closed = self.obj.maps["closed"]
        gone = set()
        for k in keys:
            raw = k.tobytes()
            if now[raw] == self.before.get(raw) and closed.lookup_bytes(int(k["cookie"])) is not None:
                self.obj.maps["rows"].delete(raw)
                gone.add(int(k["cookie"]))
                del now[raw]
        for sk in gone:
            closed.delete(sk)


class Screen(top.Screen):
    def __init__(self, opts: RunOptions, sort: str, max_rows: int, noclear: bool) -> None:
        super().__init__(opts, noclear, sort, max_rows)
        self.netns = net.NetnsNames()

    def show(self, rows: list[Row], elapsed: float) -> None:
        rows = sorted(rows, key=SORTS[self.sort], reverse=True)
        if self.opts.as_json:
            for r in rows:
                self.out.record({"interval": round(elapsed, 3), **r.to_dict()})
            return
        # Totals over every connection, not only the rows shown.
        rx = sum(r.rx_bytes for r in rows) / 1024
        tx = sum(r.tx_bytes for r in rows) / 1024
        rows = rows[: self.max_rows]
        heading = f"{elapsed:.1f}s  {top.loadavg()}  RX {rx:.0f} kB  TX {tx:.0f} kB  sorted by {self.sort}"
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
            for r in rows
        ]
        columns = ["PID", "COMM", "NETNS", "LADDR", "RADDR", "RX kB", "TX kB"]
        self.frame(heading, columns, table, "no TCP traffic")


EXAMPLES = """
\b
Examples:
  bpfscope tcptop                   # refresh every second until Ctrl-C
  bpfscope tcptop -C 5 3            # every 5 seconds, 3 times, no screen clearing
  bpfscope tcptop -s rx -L 5432     # connections to local port 5432, by bytes received
  bpfscope tcptop -p 1234 --json    # one process's connections, JSON lines
"""


@click.command(name="tcptop", epilog=EXAMPLES)
@top.top_options(sorted(SORTS), "all", "Sort by bytes moved (all), received or sent.")
@net.port_options
@tool_options
def command(
    opts: RunOptions, sort: str, max_rows: int, noclear: bool, lport: int | None, dport: int | None
) -> None:
    """Top TCP connections by throughput, per interval (1 s by default): process, addresses, RX and TX kB.

    Bytes are what send and receive calls returned to the process (what the application moved, as
    iperf3 counts it), in every network namespace. The process is the one that made the call.
    """
    rodata = {**opts.filters(), **net.port_filters(lport, dport)}
    require(*REQUIRES)
    screen = Screen(opts, sort, max_rows, noclear)
    # The owner map net.bpf.h declares is for tools that attribute softirq events; tcptop counts in the
    # caller's context and never uses it: one entry instead of a preallocated 65536.
    with BpfObject(tool_object("tcptop"), rodata=rodata, max_entries={"bs_owners": 1}) as obj:
        obj.attach()
        counter = ConnectionBytes(obj)
        for elapsed in ticks(opts, "Tracing TCP sends and receives... Ctrl-C to end.", DEFAULT_INTERVAL):
            screen.show(counter.interval(), elapsed)
        dropped = int(obj.bss["rows_dropped"])
        extra = f"; {dropped} bytes not counted (too many connections)" if dropped else ""
        opts.output.note(f"tcptop: {obj.losses()}{extra}")
