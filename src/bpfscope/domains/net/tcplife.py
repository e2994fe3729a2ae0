"""bpfscope tcplife: one line per TCP connection as it closes (owner, addresses, bytes, duration), or
with --hist the distribution of lifespans (p50, p99) per service, counted in the kernel.

See tcplife.bpf.c for where a connection's life begins and ends and where its bytes come from.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import click

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.net.conn import (
    OWNER_FIELDS,
    ConnCollector,
    ConnConfig,
    ConnEventView,
    EventBatch,
    comm_text,
    conn_fields,
)
from bpfscope.runtime.collector import Sample
from bpfscope.runtime.hist import Histogram
from bpfscope.runtime.schema import COMM, Field, Schema, btf_fields
from bpfscope.sinks.terminal import Terminal, View

ServiceKey = tuple[int, bool, str]  # (port, passive, comm)


class LifeBatch(EventBatch):
    """Connections that closed since the previous drain."""

    def rows(self) -> list[dict[str, Any]]:
        rows = super().rows()
        e = self.events
        columns = zip(
            rows,
            e["tx_bytes"].tolist(),
            e["rx_bytes"].tolist(),
            e["duration_ns"].tolist(),
            e["passive"].tolist(),
            strict=True,
        )
        for row, tx, rx, duration_ns, passive in columns:
            row.update(
                tx_bytes=tx, rx_bytes=rx, duration_ms=round(duration_ns / 1e6, 3), passive=bool(passive)
            )
        return rows

    def records(self) -> Iterator[dict[str, Any]]:
        schema = life_schema()
        for row in self.rows():
            yield schema.record(row)


@cache
def life_schema() -> Schema:
    btf = TcplifeCollector.btf()
    event = btf.pointee("bs_record__events")
    return Schema(
        "tcplife",
        (
            *OWNER_FIELDS,
            *conn_fields(btf),
            *btf_fields(
                event,
                only=("tx_bytes", "rx_bytes"),
                tx_bytes={"doc": "payload sent and acknowledged by the peer"},
                rx_bytes={"doc": "payload received"},
            ),
            Field(
                "duration_ms", "float", "ms", "from connect() (or the end of an accepted handshake) to close"
            ),
            Field("passive", "bool", doc="accepted (else connected)"),
        ),
        doc="A TCP connection, as it closed.",
    )


@dataclass
class Lifespans:
    """The lifespans of one service's connections that closed over an interval."""

    port: int
    passive: bool
    comm: str
    hist: Histogram  # nanoseconds, log-linear

    @property
    def service(self) -> str:
        return f"{'local' if self.passive else 'remote'} port {self.port}"

    def percentile_ms(self, q: float) -> float | None:
        value = self.hist.percentile(q)
        return None if value is None else round(value / 1e6, 3)


LIFESPAN_SCHEMA = Schema(
    "tcplife.lifespan",
    (
        Field("service", "str", label=True, doc="local port N (accepted) or remote port N (connected)"),
        COMM,
        Field("count", "int", doc="connections closed"),
        Field("p50_ms", "float", "ms", "median lifespan (within 1/16)", nullable=True),
        Field("p99_ms", "float", "ms", nullable=True),
        Field("max_ms", "float", "ms", nullable=True),
    ),
    doc="The lifespans of one service's connections that closed over an interval.",
    interval=True,
)


@dataclass
class LifespanSample(Sample):
    ts: float
    interval_s: float
    services: list[Lifespans]  # most connections first

    def records(self) -> Iterator[dict[str, Any]]:
        for s in self.services:
            yield LIFESPAN_SCHEMA.record(
                {
                    "ts": self.ts,
                    "interval_s": self.interval_s,
                    "service": s.service,
                    "comm": s.comm,
                    "count": s.hist.total,
                    "p50_ms": s.percentile_ms(50),
                    "p99_ms": s.percentile_ms(99),
                    "max_ms": s.percentile_ms(100),
                }
            )


@dataclass(kw_only=True)
class TcplifeConfig(ConnConfig):
    hist: bool = False  # lifespans per service, counted in the kernel (--hist); else each connection


class TcplifeCollector(ConnCollector[TcplifeConfig]):
    """Each TCP connection as it closes, streamed; or (hist) lifespans per service over each interval."""

    name = "tcplife"
    bpf_object = "tcplife"
    loss_counters = {
        "births_dropped": ("map_full", "connections not followed (too many open)"),
        "services_dropped": ("map_full", "lifespans not counted (too many services)"),
    }

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return (life_schema(), LIFESPAN_SCHEMA)

    def rodata(self) -> dict[str, Any]:
        return {**super().rodata(), "hist_mode": self.config.hist}

    def streams_events(self) -> bool:
        return not self.config.hist

    def drain(self) -> LifeBatch | None:
        events = self.read_events() if self.rings else None
        return None if events is None else LifeBatch(events, self.wall_offset_ns)

    def start(self) -> None:
        if self.config.hist:
            self.before = self._lifespans()
            self.t0 = time.monotonic()

    def sample(self) -> LifespanSample | None:
        if not self.config.hist:
            return None
        now = self._lifespans()
        t = time.monotonic()
        services = []
        for key, hist in now.items():
            before = self.before.get(key)
            closed = hist if before is None else hist - before
            if closed.total:
                services.append(Lifespans(*key, closed))
        services.sort(key=lambda s: s.hist.total, reverse=True)
        sample = LifespanSample(time.time(), t - self.t0, services)
        self.before, self.t0 = now, t
        return sample

    def _lifespans(self) -> dict[ServiceKey, Histogram]:
        assert self.obj is not None
        keys, values = self.obj.maps["lifespans"].items()
        return {
            (int(k["port"]), bool(k["passive"]), comm_text(k["comm"])): Histogram(v["slots"], "loglin")
            for k, v in zip(keys, values, strict=True)
        }


class LifeView(ConnEventView):
    columns = f"{'TX_KB':>10} {'RX_KB':>10} {'MS':>10}"
    what = "connections"

    def text(self, row: dict[str, Any]) -> str:
        return f"{row['tx_bytes'] / 1024:>10.1f} {row['rx_bytes'] / 1024:>10.1f} {row['duration_ms']:>10.2f}"


class LifespanView(View):
    def __init__(self) -> None:
        self.start = time.monotonic()

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, LifespanSample)
        term.heading(f"{time.monotonic() - self.start:.1f}s  TCP connection lifespans")
        rows = [
            [
                s.service,
                s.comm or "-",
                s.hist.total,
                s.percentile_ms(50),
                s.percentile_ms(99),
                s.percentile_ms(100),
            ]
            for s in sample.services
        ]
        if rows:
            term.table(["SERVICE", "COMM", "CLOSED", "P50 ms", "P99 ms", "MAX ms"], rows)
        else:
            term.line("no TCP connection closed")


EXAMPLES = """
\b
Examples:
  bpfscope tcplife                  # each connection as it closes, until Ctrl-C
  bpfscope tcplife -L 5432          # connections to local port 5432 (--lport)
  bpfscope tcplife --hist --duration 60   # lifespan p50/p99 per service over a minute
  bpfscope tcplife --json -p 1234   # one process's connections, JSON lines
"""


@click.command(name="tcplife", epilog=EXAMPLES)
@click.option("--hist", is_flag=True, help="Lifespan p50/p99 per service (port and process), per interval.")
@option("lport", "-L")
@option("dport", "-D")
@common_options
def command(run: Run, hist: bool, lport: int | None, dport: int | None) -> None:
    """Each TCP connection as it closes: process, addresses, kB sent (acknowledged) and received, and
    its duration in ms from connect() (or, accepted, from the end of the handshake) to close.

    The process is the socket's owner (the last process to connect, accept, send or receive on it);
    -p and --cgroup select by it. With --hist, lifespans are counted per service in the kernel and
    shown as percentiles at the end (or of each INTERVAL's connections).
    """
    config = run.config(TcplifeConfig, hist=hist, lport=lport, dport=dport)
    view = LifespanView() if hist else LifeView()
    note = "Tracing TCP connection lifespans..." if hist else "Tracing TCP connections..."
    run.run(TcplifeCollector(config), view, f"{note} Ctrl-C to end.")
