"""bpfscope biotop: the processes doing the most block I/O, per interval, like top.

The kernel side (biotop.bpf.c) counts per process and disk (reads, writes, bytes, device time and a
latency histogram); each interval reads the counters and shows their differences, so intervals are
exact and nothing falls between two reads. On a terminal the table refreshes in place; piped, it prints
one table per interval.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.options import Run, common_options, option, top_options
from bpfscope.domains.block import disks
from bpfscope.runtime.collector import BpfCollector, Config, Sample
from bpfscope.runtime.schema import COMM, PID, Field, Schema
from bpfscope.sinks.terminal import Terminal, View, loadavg

if TYPE_CHECKING:
    from bpfscope.engine.bpf import BpfObject
    from bpfscope.runtime.hist import Histogram

Key = tuple[int, int, bytes]  # (tgid, dev, comm)


@dataclass
class Row:
    tgid: int
    dev: int
    comm: str
    reads: int
    writes: int
    others: int
    read_bytes: int
    write_bytes: int
    total_ns: int
    hist: Histogram | None

    @property
    def ios(self) -> int:
        return self.reads + self.writes + self.others

    @property
    def kbytes(self) -> float:
        return (self.read_bytes + self.write_bytes) / 1024

    @property
    def avg_ms(self) -> float:
        return self.total_ns / self.ios / 1e6 if self.ios else 0.0

    @property
    def p99_ms(self) -> float | None:
        p99 = self.hist.percentile(99) if self.hist is not None else None
        return None if p99 is None else p99 / 1e6

    def __sub__(self, before: Row) -> Row:
        hist = self.hist
        if hist is not None and before.hist is not None:
            hist = hist - before.hist
        return Row(
            self.tgid,
            self.dev,
            self.comm,
            self.reads - before.reads,
            self.writes - before.writes,
            self.others - before.others,
            self.read_bytes - before.read_bytes,
            self.write_bytes - before.write_bytes,
            self.total_ns - before.total_ns,
            hist,
        )


SORTS = {
    "ios": lambda r: r.ios,
    "kbytes": lambda r: r.kbytes,
    "avg": lambda r: r.avg_ms,
    "p99": lambda r: r.p99_ms or 0.0,
}


def snapshot(obj: BpfObject) -> dict[Key, Row]:
    from bpfscope.runtime.hist import Histogram

    hkeys, hvalues = obj.maps["hists"].items()
    hists = {
        (int(k["tgid"]), int(k["dev"]), bytes(k["comm"])): Histogram(v["slots"], "loglin")
        for k, v in zip(hkeys, hvalues, strict=True)
    }
    keys, values = obj.maps["rows"].items()
    rows = {}
    for k, v in zip(keys, values, strict=True):
        key = (int(k["tgid"]), int(k["dev"]), bytes(k["comm"]))
        rows[key] = Row(
            key[0],
            key[1],
            key[2].decode(errors="replace"),
            int(v["reads"]),
            int(v["writes"]),
            int(v["others"]),
            int(v["read_bytes"]),
            int(v["write_bytes"]),
            int(v["total_ns"]),
            hists.get(key),
        )
    return rows


def delta(now: dict[Key, Row], before: dict[Key, Row]) -> list[Row]:
    """Each row's I/O since ``before``; rows without any are left out."""
    out = []
    for key, row in now.items():
        prev = before.get(key)
        diff = row if prev is None else row - prev
        if diff.ios:
            out.append(diff)
    return out


def evict_exited(obj: BpfObject, now: dict[Key, Row], before: dict[Key, Row]) -> None:
    """Drop the rows of processes that have exited and did no I/O this interval, so that the maps do not
    fill up over a long run. Such a process can do no more I/O (its asynchronous I/O was waited for when
    it exited), so nothing counted is lost. Rows of unknown tasks (tgid 0) stay."""
    for key, row in list(now.items()):
        prev = before.get(key)
        if not key[0] or prev is None or row.ios != prev.ios or Path(f"/proc/{key[0]}").exists():
            continue
        key_bytes = _key_bytes(obj, key)
        obj.maps["rows"].delete(key_bytes)
        obj.maps["hists"].delete(key_bytes)
        del now[key]


def _key_bytes(obj: BpfObject, key: Key) -> bytes:
    import numpy as np

    record = np.zeros(1, dtype=obj.maps["rows"].key_dtype)
    record["tgid"], record["dev"], record["comm"] = key
    return record.tobytes()


@dataclass(kw_only=True)
class BiotopConfig(Config):
    disk: str | None = None  # only this disk (-d)


ROW_SCHEMA = Schema(
    "biotop",
    (
        PID,
        COMM,
        Field("disk", "str", label=True),
        Field("reads", "int", doc="requests completed"),
        Field("writes", "int", doc="writes of data (write, write zeroes, zone append)"),
        Field("read_kb", "float", "kB"),
        Field("write_kb", "float", "kB"),
        Field("avg_ms", "float", "ms", "mean device time"),
        Field("p99_ms", "float", "ms", "p99 device time (within 1/16)", nullable=True),
    ),
    doc="One process's block I/O on one disk over an interval.",
    interval=True,
)


@dataclass
class BiotopSample(Sample):
    ts: float
    interval_s: float
    rows: list[Row]
    disk_name: disks.DiskNames

    def records(self) -> Iterator[dict[str, Any]]:
        for r in self.rows:
            p99 = r.p99_ms
            yield ROW_SCHEMA.record(
                {
                    "ts": self.ts,
                    "interval_s": self.interval_s,
                    "pid": r.tgid,
                    "comm": r.comm,
                    "disk": self.disk_name(r.dev),
                    "reads": r.reads,
                    "writes": r.writes,
                    "read_kb": round(r.read_bytes / 1024, 1),
                    "write_kb": round(r.write_bytes / 1024, 1),
                    "avg_ms": round(r.avg_ms, 3),
                    "p99_ms": None if p99 is None else round(p99, 3),
                }
            )


class BiotopCollector(BpfCollector[BiotopConfig]):
    """Block I/O per process and disk, counted in the kernel; each sample is the interval's difference."""

    name = "biotop"
    bpf_object = "biotop"
    requires = ("raw_tracepoint",)
    default_interval_s = 1.0
    _schemas = (ROW_SCHEMA,)
    loss_counters = {
        "rows_dropped": ("map_full", "I/O not counted (too many processes)"),
        "bs_rq_unseen": ("unseen", "requests completed unseen (no program ran at completion)"),
    }

    def rodata(self) -> dict[str, Any]:
        return {**super().rodata(), **disks.device_filter(self.config.disk)}

    def autoload(self) -> set[str]:
        return disks.programs(queue_time=False)

    def start(self) -> None:
        assert self.obj is not None
        self.start_from_attach()
        self.before = snapshot(self.obj)

    def start_from_attach(self) -> None:
        self.disk_name = disks.DiskNames()
        self.before = {}
        self.t0 = time.monotonic()

    def sample(self) -> BiotopSample:
        assert self.obj is not None
        now = snapshot(self.obj)
        t = time.monotonic()
        rows = delta(now, self.before)
        evict_exited(self.obj, now, self.before)
        sample = BiotopSample(time.time(), t - self.t0, rows, self.disk_name)
        self.before, self.t0 = now, t
        return sample


class BiotopView(View):
    top = True

    def __init__(self, sort: str, max_rows: int, noclear: bool) -> None:
        self.sort, self.max_rows, self.noclear = sort, max_rows, noclear
        self.start = time.monotonic()

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, BiotopSample)
        rows = sorted(sample.rows, key=SORTS[self.sort], reverse=True)[: self.max_rows]
        table = [
            [
                r.tgid,
                r.comm,
                sample.disk_name(r.dev),
                r.reads,
                r.writes,
                round(r.read_bytes / 1024, 1),
                round(r.write_bytes / 1024, 1),
                round(r.avg_ms, 3),
                None if r.p99_ms is None else round(r.p99_ms, 3),
            ]
            for r in rows
        ]
        term.heading(f"{time.monotonic() - self.start:.1f}s  {loadavg()}  sorted by {self.sort}")
        if table:
            term.table(["PID", "COMM", "DISK", "READS", "WRITES", "R kB", "W kB", "AVG ms", "P99 ms"], table)
        else:
            term.line("no block I/O")


EXAMPLES = """
\b
Examples:
  bpfscope biotop                   # refresh every second until Ctrl-C
  bpfscope biotop -s p99 5          # by p99 latency, every 5 seconds
  bpfscope biotop -d vda -C 1 10    # one disk, no screen clearing, 10 times
  bpfscope biotop --json 1 3        # JSON lines, one per process and interval
"""


@click.command(name="biotop", epilog=EXAMPLES)
@option("disk")
@top_options(sorted(SORTS), "ios", "Sort by I/O count, kB moved, average or p99 device latency.")
@common_options
def command(run: Run, disk: str | None, sort: str, max_rows: int, noclear: bool) -> None:
    """Top processes by block I/O, per interval (1 s by default): reads, writes, kB, device latency.

    Processes are the ones that submitted the I/O: buffered writes show up under the kernel's flusher
    threads, direct and synchronous I/O under the process itself. -p and --cgroup select by that process.
    """
    collector = BiotopCollector(run.config(BiotopConfig, disk=disk))
    run.run(collector, BiotopView(sort, max_rows, noclear), "Tracing block I/O... Ctrl-C to end.")
