"""bpfscope biosnoop: one line per block I/O request, with the process that submitted it, its disk,
operation, sector and size, its time queued in the I/O scheduler and its time on the device.

The kernel side (biosnoop.bpf.c, on block.bpf.h's request tracking) filters and sends one record per
completed request; :class:`BiosnoopCollector` decodes them in batches (:class:`IoBatch`), and the view
prints them. It streams until Ctrl-C, SIGTERM or --duration, and ends with how many requests it showed and
how many the kernel could not send.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.block import disks
from bpfscope.runtime.collector import BpfCollector, Config, Sample, wall_clock_offset_ns
from bpfscope.runtime.schema import COMM, PID, Field, Schema, btf_field
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.losses import Losses


@dataclass(kw_only=True)
class BiosnoopConfig(Config):
    disk: str | None = None  # only this disk (-d)
    min_latency_ms: float = 0.0  # only requests at least this long on the device (filtered in the kernel)


class BiosnoopCollector(BpfCollector[BiosnoopConfig]):
    """Every completed block I/O request, streamed."""

    name = "biosnoop"
    bpf_object = "biosnoop"
    # BTF tracepoints are BPF_PROG_TYPE_TRACING, which libbpf cannot probe alone: raw tracepoints stand in.
    requires = ("raw_tracepoint", "ringbuf")
    loss_counters = {"bs_rq_unseen": ("unseen", "requests completed unseen (no program ran at completion)")}

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return (io_schema(),)

    def rodata(self) -> dict[str, Any]:
        return {
            **super().rodata(),
            **disks.device_filter(self.config.disk),
            "min_latency_ns": int(self.config.min_latency_ms * 1e6),
        }

    def autoload(self) -> set[str]:
        return disks.programs()

    def attach(self) -> None:
        super().attach()
        self.ring("events")
        self.seen = 0
        self.disk_name = disks.DiskNames()
        self.wall_offset_ns = wall_clock_offset_ns()

    def drain(self) -> IoBatch | None:
        batch = self.rings["events"].read()
        if not len(batch):
            return None
        self.seen += len(batch)
        return IoBatch(batch, self.disk_name, self.wall_offset_ns)


@cache
def io_schema() -> Schema:
    event = BiosnoopCollector.btf().pointee("bs_record__events")
    ops = tuple(disks.op_names().values())
    return Schema(
        "biosnoop",
        (
            COMM,
            PID,
            Field("disk", "str", label=True, doc="whole disk"),
            Field("rwbs", "str", doc="operation and flags as blktrace shows them (RS, W, FWS, ...)"),
            Field("op", "enum", values=ops, doc="the kernel's enum req_op"),
            Field("flags", "list", doc="request flags (Sync, Meta, FUA, PreFlush, ReadAhead, ...)"),
            btf_field("sector", event.field("sector").type),
            btf_field("bytes", event.field("bytes").type),
            Field("queue_ms", "float", "ms", "time in the I/O scheduler (insert to issue)"),
            Field("latency_ms", "float", "ms", "time on the device (issue to completion)"),
            btf_field("error", event.field("error").type, doc="blk_status_t, 0 on success"),
            btf_field("task_from", event.field("task_from").type, doc="where the process was seen"),
        ),
        doc="A block I/O request, at its completion.",
    )


@dataclass
class IoBatch(Sample):
    """Requests that completed since the previous drain, as the kernel's records (numpy)."""

    events: np.ndarray
    disk_name: disks.DiskNames
    wall_offset_ns: int

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ts(self) -> float:  # type: ignore[override]
        return (int(self.events["ts"][-1]) + self.wall_offset_ns) / 1e9

    def rows(self) -> Iterator[dict[str, Any]]:
        """The records as dictionaries; whole columns become Python lists first (much faster than one
        numpy scalar per field)."""
        e = self.events
        ops, flags = e["op"].tolist(), e["flags"].tolist()
        sources = disks.task_sources()
        rwbs: dict[tuple[int, int], str] = {}
        columns = zip(
            e["ts"].tolist(),
            e["comm"].tolist(),
            e["tgid"].tolist(),
            e["dev"].tolist(),
            ops,
            flags,
            e["sector"].tolist(),
            e["bytes"].tolist(),
            e["queue_ns"].tolist(),
            e["latency_ns"].tolist(),
            e["error"].tolist(),
            e["task_from"].tolist(),
            strict=True,
        )
        for ts, comm, pid, dev, op, flag, sector, size, queue, latency, error, task in columns:
            key = (op, flag)
            if key not in rwbs:
                rwbs[key] = disks.rwbs(op, flag)
            yield {
                "ts": round((ts + self.wall_offset_ns) / 1e9, 6),
                "comm": comm.decode(errors="replace"),
                "pid": pid,
                "disk": self.disk_name(dev),
                "rwbs": rwbs[key],
                "op": disks.op_name(op),
                "flags": disks.flag_list(flag),
                "sector": sector,
                "bytes": size,
                "queue_ms": round(queue / 1e6, 6),
                "latency_ms": round(latency / 1e6, 6),
                "error": error,
                "task_from": sources.get(task, "none"),
            }

    def records(self) -> Iterator[dict[str, Any]]:
        schema = io_schema()
        for row in self.rows():
            yield schema.record(row)


class BiosnoopView(View):
    def __init__(self, show_queue: bool) -> None:
        self.show_queue = show_queue
        self.start = time.time()
        queue = f"{'QUE(ms)':>8} " if show_queue else ""
        self.header = (
            f"{'TIME(s)':<11} {'COMM':<15} {'PID':>7} {'DISK':<7} {'T':<3} {'SECTOR':>12} {'BYTES':>8} "
            f"{queue}{'LAT(ms)':>8}"
        )

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, IoBatch)
        lines = []
        for r in sample.rows():
            que = f"{r['queue_ms']:>8.3f} " if self.show_queue else ""
            lines.append(
                f"{r['ts'] - self.start:<11.6f} {r['comm']:<15} {r['pid']:>7} {r['disk']:<7} "
                f"{r['rwbs']:<3} {r['sector']:>12} {r['bytes']:>8} {que}{r['latency_ms']:>8.3f}"
            )
        term.lines(lines)

    def summary(self, collector: Collector, losses: Losses) -> str:
        seen = getattr(collector, "seen", 0)
        return f"biosnoop: {seen} I/O traced, {losses.text()}"


EXAMPLES = """
\b
Examples:
  bpfscope biosnoop                 # every block I/O until Ctrl-C
  bpfscope biosnoop -Q              # with the time queued in the I/O scheduler
  bpfscope biosnoop -d vda --min-lat 10   # one disk, only requests slower than 10 ms on the device
  bpfscope biosnoop -p 1234 --json  # one process's I/O, JSON lines
  bpfscope biosnoop --cgroup system.slice/postgresql.service
"""


@click.command(name="biosnoop", epilog=EXAMPLES)
@option("disk")
@option("queued", help="Show the time queued in the I/O scheduler (QUE).")
@click.option(
    "--min-lat",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="MS",
    help="Only requests at least this many milliseconds on the device (filtered in the kernel).",
)
@common_options
def command(run: Run, disk: str | None, queued: bool, min_lat: float) -> None:
    """Block I/O requests as they complete: process, disk, operation, sector, size and latency.

    LAT is device time, from issue to the driver to completion; QUE (-Q) is the time before that in the
    I/O scheduler. The process is the one that submitted the I/O (for buffered writes, usually the
    kernel's flusher thread). -p and --cgroup select by that process.
    """
    config = run.config(BiosnoopConfig, disk=disk, min_latency_ms=min_lat)
    run.run(BiosnoopCollector(config), BiosnoopView(queued), "Tracing block I/O... Ctrl-C to end.")
