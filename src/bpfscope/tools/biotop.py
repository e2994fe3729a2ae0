"""bpfscope biotop: the processes doing the most block I/O, per interval, like top.

The kernel side (biotop.bpf.c) counts per process and disk (reads, writes, bytes, device time and a
latency histogram); each interval reads the counters and shows their differences, so intervals are
exact and nothing falls between two reads. On a terminal the table refreshes in place; piped, it prints
one table per interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from bpfscope.core import block, top
from bpfscope.core.bpf import BpfObject, require, tool_object
from bpfscope.core.hist import Histogram
from bpfscope.core.tool import RunOptions, ticks, tool_options

# BTF tracepoints are BPF_PROG_TYPE_TRACING, which libbpf cannot probe alone: raw tracepoints stand in.
REQUIRES = ("raw_tracepoint",)
DEFAULT_INTERVAL = 1.0

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


class Screen(top.Screen):
    def __init__(self, opts: RunOptions, sort: str, max_rows: int, noclear: bool) -> None:
        super().__init__(opts, noclear, sort, max_rows)
        self.disk_name = block.DiskNames()

    def show(self, rows: list[Row], elapsed: float) -> None:
        rows = sorted(rows, key=SORTS[self.sort], reverse=True)[: self.max_rows]
        columns = ["PID", "COMM", "DISK", "READS", "WRITES", "R kB", "W kB", "AVG ms", "P99 ms"]
        keys = ["pid", "comm", "disk", "reads", "writes", "read_kb", "write_kb", "avg_ms", "p99_ms"]
        table: list[list[Any]] = []
        for r in rows:
            p99 = r.p99_ms
            table.append(
                [
                    r.tgid,
                    r.comm,
                    self.disk_name(r.dev),
                    r.reads,
                    r.writes,
                    round(r.read_bytes / 1024, 1),
                    round(r.write_bytes / 1024, 1),
                    round(r.avg_ms, 3),
                    None if p99 is None else round(p99, 3),
                ]
            )
        if self.opts.as_json:
            self.out.table(columns, table, keys=keys, extra={"interval": f"{elapsed:.1f}s"})
            return
        self.frame(f"{elapsed:.1f}s  {top.loadavg()}  sorted by {self.sort}", columns, table, "no block I/O")


EXAMPLES = """
\b
Examples:
  bpfscope biotop                   # refresh every second until Ctrl-C
  bpfscope biotop -s p99 5          # by p99 latency, every 5 seconds
  bpfscope biotop -d vda -C 1 10    # one disk, no screen clearing, 10 times
  bpfscope biotop --json 1 3        # JSON lines, one per process and interval
"""


@click.command(name="biotop", epilog=EXAMPLES)
@click.option("-d", "--disk", metavar="DISK", help="Only this disk (vda, /dev/vda or major:minor).")
@top.top_options(sorted(SORTS), "ios", "Sort by I/O count, kB moved, average or p99 device latency.")
@tool_options
def command(opts: RunOptions, disk: str | None, sort: str, max_rows: int, noclear: bool) -> None:
    """Top processes by block I/O, per interval (1 s by default): reads, writes, kB, device latency.

    Processes are the ones that submitted the I/O: buffered writes show up under the kernel's flusher
    threads, direct and synchronous I/O under the process itself. -p and --cgroup select by that process.
    """
    rodata = {**opts.filters(), **block.device_filter(disk)}
    require(*REQUIRES)
    screen = Screen(opts, sort, max_rows, noclear)
    with BpfObject(tool_object("biotop"), rodata=rodata, autoload=block.programs(queue_time=False)) as obj:
        obj.attach()
        before: dict[Key, Row] = {}
        note = "Tracing block I/O... Ctrl-C to end."
        for elapsed in ticks(opts, note, DEFAULT_INTERVAL):
            now = snapshot(obj)
            screen.show(delta(now, before), elapsed)
            evict_exited(obj, now, before)
            before = now
        dropped = int(obj.bss["rows_dropped"])
        extra = f"; {dropped} I/O not counted (too many processes)" if dropped else ""
        opts.output.note(f"biotop: {obj.losses()}, {block.unseen_note(obj)}{extra}")
