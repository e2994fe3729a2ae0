"""bpfscope vfsstat: file system calls per second (reads, writes, opens, creates, fsyncs, unlinks),
system-wide and per process.

Counted in the kernel (vfsstat.bpf.c) at the entry of each system call, from the syscall tracepoints:
failed calls count, as attempts. What each column counts is listed in vfsstat.bpf.c; in short, the
read and write families (read, pread64, readv, preadv, preadv2 and their write twins), every open
(open, openat, openat2, creat, open_by_handle_at), creates as the opens that created their file (asked
for O_CREAT and marked FMODE_CREATED by the kernel at the call's exit), fsyncs as
fsync, fdatasync, sync_file_range, syncfs, sync and msync(MS_SYNC), unlinks of files. io_uring
operations and page faults on mmap()ed files are not system calls and are not seen. bpfscope's own
calls are left out unless asked (``include_self``).

The collector is the Python API, which ``bpfscope check`` uses too (health.py)::

    with VfsCollector(VfsConfig()) as vfs:
        vfs.open(); vfs.start()
        time.sleep(5)
        sample = vfs.sample()      # everything since start()
        print(sample.total.per_second(sample.interval_s), sample.top(3))
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import click

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.cache.vfs import present_tracepoints_only
from bpfscope.runtime.collector import BpfCollector, Collector, Config, Sample
from bpfscope.runtime.counts import Counts
from bpfscope.runtime.losses import Losses
from bpfscope.runtime.schema import COMM, PID, Field, Schema, btf_fields
from bpfscope.sinks.terminal import Terminal, View


@dataclass
class VfsCounts(Counts):
    """Calls of each kind, named as struct vfs_counts' fields (see the module docstring)."""

    reads: int = 0
    writes: int = 0
    opens: int = 0
    creates: int = 0
    fsyncs: int = 0
    unlinks: int = 0

    @property
    def ops(self) -> int:
        """Every counted call (creates are opens already, so they are not added again)."""
        return self.reads + self.writes + self.opens + self.fsyncs + self.unlinks


COLUMNS = [f.name for f in fields(VfsCounts)]


@dataclass
class ProcessVfs:
    pid: int
    comm: str
    counts: VfsCounts


@cache
def vfsstat_schemas() -> tuple[Schema, Schema]:
    """vfsstat's records: every selected task's calls over an interval, and one process's (-P)."""
    counts = btf_fields(VfsCollector.btf().struct("vfs_counts"), only=COLUMNS)
    total = Schema(
        "vfsstat",
        (*counts, *(Field(f"{name}_per_s", "float", "/s", f"{name} per second") for name in COLUMNS)),
        doc="File system calls over an interval (system-wide, or the tasks -p or --cgroup select).",
        interval=True,
    )
    process = Schema(
        "vfsstat.process",
        (PID, COMM, *counts),
        doc="One process's file system calls over an interval (-P), the busiest first.",
        interval=True,
    )
    return total, process


def _rates(counts: VfsCounts, seconds: float) -> dict[str, float]:
    return {name: round(rate, 1) for name, rate in counts.per_second(seconds).items()}


@dataclass
class VfsSample(Sample):
    ts: float
    interval_s: float
    elapsed_s: float  # since the collector started (for views)
    total: VfsCounts
    processes: list[ProcessVfs] = field(default_factory=list)  # with calls in the interval, busiest first
    shown: int = 0  # processes given as vfsstat.process records

    def top(self, n: int) -> list[ProcessVfs]:
        return self.processes[:n]

    def records(self) -> Iterator[dict[str, Any]]:
        total, process = vfsstat_schemas()
        common = {"ts": self.ts, "interval_s": round(self.interval_s, 6)}
        rates = {f"{name}_per_s": rate for name, rate in _rates(self.total, self.interval_s).items()}
        yield total.record({**common, **self.total.to_dict(), **rates})
        for p in self.top(self.shown):
            yield process.record({**common, "pid": p.pid, "comm": p.comm, **p.counts.to_dict()})


@dataclass(kw_only=True)
class VfsConfig(Config):
    per_process: bool = False  # vfsstat.process records, the busiest first
    rows: int = 10  # how many of them


Processes = dict[int, tuple[str, VfsCounts]]  # pid -> (comm, its calls so far)


class VfsCollector(BpfCollector[VfsConfig]):
    """File system calls, in all and per process; each sample is the interval since the previous one."""

    name = "vfsstat"
    bpf_object = "vfsstat"
    requires = ("tracepoint",)
    default_interval_s = 1.0
    loss_counters = {
        "processes_dropped": ("map_full", "calls not attributed to a process (too many processes)"),
        "creates_unseen": ("unseen", "opens with O_CREAT not known to create (no task storage)"),
    }

    def __init__(self, config: VfsConfig) -> None:
        super().__init__(config)
        self.run_total = VfsCounts()  # every call sampled so far, for the run's summary
        self._start = self._t = time.monotonic()

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return vfsstat_schemas()

    @property
    def run_s(self) -> float:
        """Seconds since start()."""
        return time.monotonic() - self._start

    def configure(self) -> None:
        assert self.obj is not None
        present_tracepoints_only(self.obj)

    def start(self) -> None:
        self._read()  # the first read builds the maps' numpy layouts: not inside the interval
        self._baseline(*self._read())

    def start_from_attach(self) -> None:
        self._baseline(VfsCounts(), {})

    def _baseline(self, total: VfsCounts, processes: Processes) -> None:
        self._total, self._processes = total, processes
        self._t = self._start = time.monotonic()
        self.run_total = VfsCounts()

    def _read(self) -> tuple[VfsCounts, Processes]:
        assert self.obj is not None
        # Per-CPU totals: one value per CPU, summed.
        per_cpu = self.obj.maps["totals"].lookup(0)
        total = VfsCounts(**{name: int(per_cpu[name].sum()) for name in COLUMNS})
        keys, values = self.obj.maps["processes"].items()
        processes = {
            int(k): (
                bytes(v["comm"]).split(b"\0", 1)[0].decode(errors="replace"),
                VfsCounts.from_record(v["ops"]),
            )
            for k, v in zip(keys, values, strict=True)
        }
        return total, processes

    def sample(self) -> VfsSample:
        total, processes = self._read()
        now = time.monotonic()
        rows = []
        for pid, (comm, counts) in processes.items():
            before = self._processes.get(pid)
            diff = counts - before[1] if before else counts
            if diff.ops:
                rows.append(ProcessVfs(pid, comm, diff))
        rows.sort(key=lambda p: p.counts.ops, reverse=True)
        interval = total - self._total
        self.run_total += interval
        sample = VfsSample(
            ts=time.time(),
            interval_s=max(now - self._t, 1e-9),
            elapsed_s=now - self._start,
            total=interval,
            processes=rows,
            shown=self.config.rows if self.config.per_process else 0,
        )
        self._evict_exited(processes)
        self._total, self._processes, self._t = total, processes, now
        return sample

    def _evict_exited(self, processes: Processes) -> None:
        """Forget processes that have exited and made no call since the last sample, so the map does not
        fill up over a long run; an exited process can make no more calls, so nothing is lost."""
        assert self.obj is not None
        for pid, (_, counts) in list(processes.items()):
            before = self._processes.get(pid)
            if before and before[1].ops == counts.ops and not Path(f"/proc/{pid}").exists():
                self.obj.maps["processes"].delete(pid)
                del processes[pid]


HEADERS = [name.upper() + "/s" for name in COLUMNS]


class VfsView(View):
    """One line per interval under one header, as vmstat prints; per process (-P), a table each time."""

    def __init__(self, per_process: bool) -> None:
        self.per_process = per_process
        self.header = None if per_process else f"{'TIME':>8} " + " ".join(f"{h:>10}" for h in HEADERS)

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, VfsSample)
        rates = _rates(sample.total, sample.interval_s)
        if not self.per_process:
            term.line(f"{sample.elapsed_s:>7.1f}s " + " ".join(f"{v:>10.1f}" for v in rates.values()))
            return
        term.heading(
            f"{sample.elapsed_s:.1f}s  total: " + ", ".join(f"{c} {v:g}/s" for c, v in rates.items())
        )
        table = [
            [p.pid, p.comm, *_rates(p.counts, sample.interval_s).values()] for p in sample.top(sample.shown)
        ]
        if table:
            term.table(["PID", "COMM", *HEADERS], table)
        else:
            term.line("no file system calls")

    def summary(self, collector: Collector, losses: Losses) -> str:
        assert isinstance(collector, VfsCollector)
        counts = ", ".join(f"{c} {v}" for c, v in collector.run_total.to_dict().items())
        return f"vfsstat: {collector.run_s:.1f} s, {counts}; {losses.text()}"


EXAMPLES = """
\b
Examples:
  bpfscope vfsstat                  # system-wide calls per second, every second
  bpfscope vfsstat -P 5             # the busiest processes, every 5 seconds
  bpfscope vfsstat -p 1234 1 10     # one process, 10 times
  bpfscope vfsstat --json -P 1 3    # JSON lines: totals, then one line per process
"""


@click.command(name="vfsstat", epilog=EXAMPLES)
@option("per_process", help="Per process, busiest first.")
@option("rows", default=10, type=click.IntRange(min=1), help="Processes shown with -P.")
@common_options
def command(run: Run, per_process: bool, max_rows: int) -> None:
    """File system calls per second (1 s intervals by default): reads, writes, opens, creates (opens that
    created their file), fsyncs (fsync, fdatasync, sync_file_range, syncfs, sync, msync MS_SYNC) and
    unlinks, counted in the kernel at each system call. Failed calls count. io_uring and mmap() page
    faults are not system calls and are not seen; sendfile, splice and copy_file_range are not counted.
    """
    collector = VfsCollector(run.config(VfsConfig, per_process=per_process, rows=max_rows))
    run.run(collector, VfsView(per_process), "Tracing file system calls... Ctrl-C to end.")
