"""bpfscope tcpconn: TCP connects, accepts and failures (refused, timed out, reset), one line each or
counted per process, remote address and outcome with their rate per second (-c).

See tcpconn.bpf.c for what each kind means and where it is seen.
"""

from __future__ import annotations

import errno
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
    Owner,
    address,
    conn_fields,
)
from bpfscope.runtime.collector import Sample
from bpfscope.runtime.schema import Field, Schema, btf_field, enum_names
from bpfscope.sinks.terminal import Terminal, View


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err)) if err else ""


@cache
def kinds() -> dict[int, str]:
    """enum conn_event (tcpconn.bpf.c): value -> ``connect``, ``accept``, ``fail``, ``reset``."""
    return enum_names(TcpconnCollector.btf().enum("conn_event"))


def _kind_field() -> Field:
    event = TcpconnCollector.btf().pointee("bs_record__events")
    return btf_field("kind", event.field("kind").type, label=True, doc="connect, accept, fail or reset")


ERRNO = Field("errno", "int", doc="the socket's error (0: none)")
ERROR = Field("error", "str", label=True, doc="its name (ECONNREFUSED, ETIMEDOUT, ...), empty if none")


class ConnEventBatch(EventBatch):
    """Connection events that arrived since the previous drain."""

    def rows(self) -> list[dict[str, Any]]:
        rows = super().rows()
        names = kinds()
        columns = zip(rows, self.events["kind"].tolist(), self.events["err"].tolist(), strict=True)
        for row, kind, err in columns:
            row.update(kind=names[kind], errno=err, error=errno_name(err))
        return rows

    def records(self) -> Iterator[dict[str, Any]]:
        schema = event_schema()
        for row in self.rows():
            yield schema.record(row)


@cache
def event_schema() -> Schema:
    return Schema(
        "tcpconn",
        (*OWNER_FIELDS, *conn_fields(TcpconnCollector.btf()), _kind_field(), ERRNO, ERROR),
        doc="A TCP connect, accept, failed connect or reset.",
    )


@cache
def count_schema() -> Schema:
    return Schema(
        "tcpconn.count",
        (
            *OWNER_FIELDS,
            _kind_field(),
            ERRNO,
            ERROR,
            Field("daddr", "str", label=True, doc="remote address"),
            Field("count", "int", doc="events in the interval"),
            Field("per_s", "float", "/s"),
        ),
        doc="Connection events of one process, kind, error and remote address over an interval.",
        interval=True,
    )


@dataclass
class ConnCount:
    owner: Owner
    kind: str
    err: int
    daddr: str
    count: int

    @property
    def error(self) -> str:
        return errno_name(self.err)


@dataclass
class ConnCountSample(Sample):
    ts: float
    interval_s: float
    counts: list[ConnCount]  # most first

    def per_s(self, count: ConnCount) -> float:
        return round(count.count / max(self.interval_s, 1e-9), 2)

    def records(self) -> Iterator[dict[str, Any]]:
        schema = count_schema()
        for c in self.counts:
            yield schema.record(
                {
                    "ts": self.ts,
                    "interval_s": self.interval_s,
                    **c.owner.to_dict(),
                    "kind": c.kind,
                    "errno": c.err,
                    "error": c.error,
                    "daddr": c.daddr,
                    "count": c.count,
                    "per_s": self.per_s(c),
                }
            )


@dataclass(kw_only=True)
class TcpconnConfig(ConnConfig):
    count_mode: bool = False  # per process, kind, error and remote (-c); else each event


class TcpconnCollector(ConnCollector[TcpconnConfig]):
    """Each connect, accept, failure and reset streamed; or (count_mode) counted over each interval."""

    name = "tcpconn"
    bpf_object = "tcpconn"
    loss_counters = {"rows_dropped": ("map_full", "events not counted (too many rows)")}

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return (event_schema(), count_schema())

    def rodata(self) -> dict[str, Any]:
        return {**super().rodata(), "count_mode": self.config.count_mode}

    def streams_events(self) -> bool:
        return not self.config.count_mode

    def drain(self) -> ConnEventBatch | None:
        events = self.read_events() if self.rings else None
        return None if events is None else ConnEventBatch(events, self.wall_offset_ns)

    def start(self) -> None:
        if self.config.count_mode:
            assert self.obj is not None
            self.before = _counts(*self.obj.maps["counts"].items())
            self.t0 = time.monotonic()

    def sample(self) -> ConnCountSample | None:
        if not self.config.count_mode:
            return None
        assert self.obj is not None
        keys, values = self.obj.maps["counts"].items()
        t = time.monotonic()
        now = _counts(keys, values)
        names = kinds()
        counts = []
        for k, n in zip(keys, now.values(), strict=True):
            new = n - self.before.get(k.tobytes(), 0)
            if new:
                owner = Owner.from_record(k["owner"])
                daddr = address(int(k["family"]), k["raddr"])
                counts.append(ConnCount(owner, names[int(k["kind"])], int(k["err"]), daddr, new))
        counts.sort(key=lambda c: c.count, reverse=True)
        sample = ConnCountSample(time.time(), t - self.t0, counts)
        self.before, self.t0 = now, t
        return sample


def _counts(keys: Any, values: Any) -> dict[bytes, int]:
    """Raw key -> events counted, in the map's order."""
    return {k.tobytes(): int(v) for k, v in zip(keys, values, strict=True)}


class ConnEventLines(ConnEventView):
    columns = f"{'KIND':<8} ERROR"

    def text(self, row: dict[str, Any]) -> str:
        return f"{row['kind'].upper():<8} {row['error']}"


class ConnCountView(View):
    def __init__(self) -> None:
        self.start = time.monotonic()

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, ConnCountSample)
        term.heading(f"{time.monotonic() - self.start:.1f}s  TCP connections over {sample.interval_s:.1f}s")
        if not sample.counts:
            term.line("no TCP connection opened or failed")
            return
        term.table(
            ["PID", "COMM", "KIND", "ERROR", "RADDR", "COUNT", "/s"],
            [
                [c.owner.pid, c.owner.comm, c.kind, c.error, c.daddr, c.count, sample.per_s(c)]
                for c in sample.counts
            ],
        )


EXAMPLES = """
\b
Examples:
  bpfscope tcpconn                  # each connect, accept and failure until Ctrl-C
  bpfscope tcpconn -c 5             # counts and rates per process and remote, every 5 seconds
  bpfscope tcpconn --dport 5432 --json   # connections to remote port 5432, JSON lines
"""


@click.command(name="tcpconn", epilog=EXAMPLES)
@option("count", help="Count per process, outcome and remote.")
@option("lport")
@option("dport")
@common_options
def command(run: Run, count_mode: bool, lport: int | None, dport: int | None) -> None:
    """TCP connection opens and failures: CONNECT (active open done), ACCEPT, FAIL (connect failed, with
    its errno: ECONNREFUSED, ETIMEDOUT, ...) and RESET (RST on an open connection).

    The process is the one that called connect() or accept(); -p and --cgroup select by it. With -c,
    counts per process, kind, error and remote address, and their rate per second, per interval.
    """
    config = run.config(TcpconnConfig, count_mode=count_mode, lport=lport, dport=dport)
    view = ConnCountView() if count_mode else ConnEventLines()
    run.run(TcpconnCollector(config), view, "Tracing TCP connections... Ctrl-C to end.")
