"""bpfscope tcplife: one line per TCP connection as it closes (owner, addresses, bytes, duration), or
with --hist the distribution of lifespans (p50, p99) per service, counted in the kernel.

See tcplife.bpf.c for where a connection's life begins and ends and where its bytes come from.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.net import conn as net
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.runtime.hist import Histogram
from bpfscope.runtime.stream import stream_events

if TYPE_CHECKING:
    import numpy as np

REQUIRES = ("raw_tracepoint", "ringbuf")


class Formatter(net.EventLines):
    columns = f"{'TX_KB':>10} {'RX_KB':>10} {'MS':>10}"

    def fields(self, e: np.ndarray) -> tuple[dict[str, object], str]:
        tx, rx, duration_ms = int(e["tx_bytes"]), int(e["rx_bytes"]), int(e["duration_ns"]) / 1e6
        record = {
            "tx_bytes": tx,
            "rx_bytes": rx,
            "duration_ms": round(duration_ms, 3),
            "passive": bool(e["passive"]),
        }
        return record, f"{tx / 1024:>10.1f} {rx / 1024:>10.1f} {duration_ms:>10.2f}"


def show_lifespans(opts: RunOptions, obj: BpfObject) -> None:
    """Per service: connections closed, p50, p99 and max lifespan (ms)."""
    keys, values = obj.maps["lifespans"].items()
    rows = []
    for k, v in zip(keys, values, strict=True):
        hist = Histogram(v["slots"], "loglin")
        passive = bool(k["passive"])
        service = f"{'local' if passive else 'remote'} port {int(k['port'])}"
        p50, p99, top = hist.percentile(50), hist.percentile(99), hist.percentile(100)
        rows.append(
            [
                service,
                net.comm_text(k["comm"]) or "-",
                hist.total,
                None if p50 is None else round(p50 / 1e6, 3),
                None if p99 is None else round(p99 / 1e6, 3),
                None if top is None else round(top / 1e6, 3),
            ]
        )
    rows.sort(key=lambda r: r[2], reverse=True)
    if opts.as_json:
        opts.output.table(
            ["service", "comm", "count", "p50_ms", "p99_ms", "max_ms"],
            rows,
            extra={"kind": "lifespan"},
        )
    elif rows:
        opts.output.table(["SERVICE", "COMM", "CLOSED", "P50 ms", "P99 ms", "MAX ms"], rows)
    else:
        opts.output.line("no TCP connection closed")


EXAMPLES = """
\b
Examples:
  bpfscope tcplife                  # each connection as it closes, until Ctrl-C
  bpfscope tcplife -L 5432          # connections to local port 5432
  bpfscope tcplife --hist --duration 60   # lifespan p50/p99 per service over a minute
  bpfscope tcplife --json -p 1234   # one process's connections, JSON lines
"""


@click.command(name="tcplife", epilog=EXAMPLES)
@click.option("--hist", is_flag=True, help="Lifespan p50/p99 per service (port and process) at the end.")
@net.port_options
@tool_options
def command(opts: RunOptions, hist: bool, lport: int | None, dport: int | None) -> None:
    """Each TCP connection as it closes: process, addresses, kB sent (acknowledged) and received, and
    its duration in ms from connect() (or, accepted, from the end of the handshake) to close.

    The process is the socket's owner (the last process to connect, accept, send or receive on it);
    -p and --cgroup select by it. With --hist, lifespans are counted per service in the kernel and
    shown as percentiles at the end (or every INTERVAL).
    """
    rodata = {**opts.filters(), **net.port_filters(lport, dport), "hist_mode": hist}
    require(*REQUIRES)
    with BpfObject(tool_object("tcplife"), rodata=rodata) as obj:
        obj.attach()
        if hist:
            for elapsed in ticks(opts, "Tracing TCP connection lifespans... Ctrl-C to end."):
                opts.output.heading(f"{elapsed:.1f}s  TCP connection lifespans")
                show_lifespans(opts, obj)
        else:
            fmt = Formatter(opts.as_json, time.monotonic_ns())
            stream_events(
                "tcplife",
                "TCP connections",
                obj,
                {"connections": obj.ring_buffer("events")},
                lambda ring, batch: fmt.lines(batch),
                opts,
                header=fmt.header(),
            )
        bss = obj.bss
        lost = int(bss["births_dropped"]) + int(bss["services_dropped"])
        notes = [obj.losses()] if hist else []  # the stream's own summary has said it otherwise
        if lost:
            notes.append(f"{lost} connections not followed (maps full)")
        if notes:
            opts.output.note("tcplife: " + "; ".join(notes))
