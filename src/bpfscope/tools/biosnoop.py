"""bpfscope biosnoop: one line per block I/O request, with the process that submitted it, its disk,
operation, sector and size, its time queued in the I/O scheduler and its time on the device.

The kernel side (biosnoop.bpf.c, on block.bpf.h's request tracking) filters and sends one record per
completed request; this side decodes them in batches and prints them. It streams until Ctrl-C, SIGTERM
or --duration, and ends with how many requests it showed and how many the kernel could not send.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from bpfscope.core import block
from bpfscope.core.bpf import BpfObject, require, tool_object
from bpfscope.core.stream import stream_events
from bpfscope.core.tool import RunOptions, tool_options

if TYPE_CHECKING:
    import numpy as np

# BTF tracepoints are BPF_PROG_TYPE_TRACING, which libbpf cannot probe alone: raw tracepoints stand in.
REQUIRES = ("raw_tracepoint", "ringbuf")

TASK_FROM = {
    block.TASK_SUBMITTER: "submitter",
    block.TASK_INSERTER: "inserter",
    block.TASK_ISSUER: "issuer",
}


class Formatter:
    """Batches of completed requests -> lines (human or JSON), with their completion times."""

    def __init__(self, as_json: bool, show_queue: bool, start_ns: int) -> None:
        self.as_json = as_json
        self.show_queue = show_queue
        self.start_ns = start_ns
        self.disk_name = block.DiskNames()
        self._rwbs: dict[tuple[int, int], str] = {}

    def header(self) -> str:
        queue = f"{'QUE(ms)':>8} " if self.show_queue else ""
        return (
            f"{'TIME(s)':<11} {'COMM':<15} {'PID':>7} {'DISK':<7} {'T':<3} {'SECTOR':>12} {'BYTES':>8} "
            f"{queue}{'LAT(ms)':>8}"
        )

    def rwbs(self, op: int, flags: int) -> str:
        key = (op, flags)
        if key not in self._rwbs:
            self._rwbs[key] = block.rwbs(op, flags)
        return self._rwbs[key]

    def lines(self, batch: np.ndarray) -> Iterator[tuple[int, str]]:
        # Whole columns to Python lists first: much faster than one numpy scalar per field.
        ts = batch["ts"].tolist()
        sectors = batch["sector"].tolist()
        queue = batch["queue_ns"].tolist()
        latency = batch["latency_ns"].tolist()
        devs = batch["dev"].tolist()
        sizes = batch["bytes"].tolist()
        pids = batch["tgid"].tolist()
        ops = batch["op"].tolist()
        flags = batch["flags"].tolist()
        task_from = batch["task_from"].tolist()
        errors = batch["error"].tolist()
        comms = batch["comm"].tolist()
        for i, t in enumerate(ts):
            comm = comms[i].decode(errors="replace")
            disk = self.disk_name(devs[i])
            if self.as_json:
                record = {
                    "time": round((t - self.start_ns) / 1e9, 6),
                    "comm": comm,
                    "pid": pids[i],
                    "disk": disk,
                    "rwbs": self.rwbs(ops[i], flags[i]),
                    "op": block.op_name(ops[i]),
                    "flags": block.flag_list(flags[i]),
                    "sector": sectors[i],
                    "bytes": sizes[i],
                    "queue_ms": round(queue[i] / 1e6, 6),
                    "latency_ms": round(latency[i] / 1e6, 6),
                    "error": errors[i],
                    "task": TASK_FROM.get(task_from[i], "unknown"),
                }
                yield t, json.dumps(record)
                continue
            que = f"{queue[i] / 1e6:>8.3f} " if self.show_queue else ""
            yield (
                t,
                f"{(t - self.start_ns) / 1e9:<11.6f} {comm:<15} {pids[i]:>7} {disk:<7} "
                f"{self.rwbs(ops[i], flags[i]):<3} {sectors[i]:>12} {sizes[i]:>8} {que}"
                f"{latency[i] / 1e6:>8.3f}",
            )


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
@click.option("-d", "--disk", metavar="DISK", help="Only this disk (vda, /dev/vda or major:minor).")
@click.option("-Q", "--queued", is_flag=True, help="Show the time queued in the I/O scheduler (QUE).")
@click.option(
    "--min-lat",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="MS",
    help="Only requests at least this many milliseconds on the device (filtered in the kernel).",
)
@tool_options
def command(opts: RunOptions, disk: str | None, queued: bool, min_lat: float) -> None:
    """Block I/O requests as they complete: process, disk, operation, sector, size and latency.

    LAT is device time, from issue to the driver to completion; QUE (-Q) is the time before that in the
    I/O scheduler. The process is the one that submitted the I/O (for buffered writes, usually the
    kernel's flusher thread). -p and --cgroup select by that process.
    """
    rodata = {**opts.filters(), **block.device_filter(disk), "min_latency_ns": int(min_lat * 1e6)}
    require(*REQUIRES)
    with BpfObject(tool_object("biosnoop"), rodata=rodata, autoload=block.programs()) as obj:
        obj.attach()
        fmt = Formatter(opts.as_json, queued, time.monotonic_ns())
        stream_events(
            "biosnoop",
            "block I/O",
            obj,
            {"I/O": obj.ring_buffer("events")},
            lambda ring, batch: fmt.lines(batch),
            opts,
            header=fmt.header(),
        )
        if block.unseen(obj):
            opts.output.note(f"biosnoop: {block.unseen_note(obj)}")
