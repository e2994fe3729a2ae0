"""bpfscope vfsstat: file system calls per second (reads, writes, opens, creates, fsyncs, unlinks),
system-wide and per process.

Counted in the kernel (vfsstat.bpf.c) at the entry of each system call, from the syscall tracepoints:
failed calls count, as attempts. What each column counts is listed in vfsstat.bpf.c; in short, the
read and write families (read, pread64, readv, preadv, preadv2 and their write twins), every open
(open, openat, openat2, creat, open_by_handle_at), creates as the opens that created their file (asked
for O_CREAT and marked FMODE_CREATED by the kernel at the call's exit), fsyncs as
fsync, fdatasync, sync_file_range, syncfs, sync and msync(MS_SYNC), unlinks of files. io_uring
operations and page faults on mmap()ed files are not system calls and are not seen.

The collector is a Python API, used by ``bpfscope check`` too::

    with VfsSampler() as sampler:
        sampler.start()
        time.sleep(5)
        sample = sampler.sample()      # everything since start()
        print(sample.total.per_second(sample.seconds), sample.top(3))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.engine import system
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.health.check import Row, SamplerProvider, Verdict
from bpfscope.runtime.sampler import Counts, Sampler

REQUIRES = ("tracepoint",)
DEFAULT_INTERVAL = 1.0


def present_tracepoints_only(obj: BpfObject) -> None:
    """Load only the programs whose syscall tracepoint this kernel has: arm64 has no open, creat or
    unlink (only their *at forms), and a kernel may lack a recent syscall such as openat2."""
    # A kernel without syscall tracepoints (CONFIG_FTRACE_SYSCALLS off) gets the one-line error here.
    system.require_tracepoint("syscalls", "sys_enter_read")
    have = system.tracepoints()
    for program in obj.programs.values():
        kind, _, target = program.section.partition("/")
        if kind == "tracepoint":
            program.autoload = target.replace("/", ":", 1) in have


@dataclass
class VfsCounts(Counts):
    """Calls of each kind (see the module docstring for what each counts)."""

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


@dataclass
class ProcessVfs:
    pid: int
    comm: str
    counts: VfsCounts


@dataclass
class VfsSample:
    seconds: float
    total: VfsCounts
    processes: list[ProcessVfs] = field(default_factory=list)  # those with calls in the interval
    processes_dropped: int = 0  # calls not attributed to a process (its map was full), since start

    def top(self, n: int, key: str = "ops") -> list[ProcessVfs]:
        return sorted(self.processes, key=lambda p: getattr(p.counts, key), reverse=True)[:n]


class VfsSampler(Sampler):
    """Loads vfsstat.bpf.c and returns, at each sample(), the calls since the previous one."""

    def __init__(self, rodata: dict[str, Any] | None = None) -> None:
        require(*REQUIRES)
        self.obj = BpfObject(tool_object("vfsstat"), rodata=rodata)
        present_tracepoints_only(self.obj)
        self._total = VfsCounts()
        self._processes: dict[int, tuple[str, VfsCounts]] = {}
        self._t = time.monotonic()

    def start(self) -> None:
        self.obj.attach()
        self.sample()

    def _read(self) -> tuple[VfsCounts, dict[int, tuple[str, VfsCounts]]]:
        _, per_cpu = self.obj.maps["totals"].items()
        total = sum((VfsCounts.from_record(v) for v in per_cpu[0]), VfsCounts())
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
        now = time.monotonic()
        total, processes = self._read()
        rows = []
        for pid, (comm, counts) in processes.items():
            before = self._processes.get(pid)
            diff = counts - before[1] if before else counts
            if diff.ops:
                rows.append(ProcessVfs(pid, comm, diff))
        out = VfsSample(now - self._t, total - self._total, rows, int(self.obj.bss["processes_dropped"]))
        self._evict_exited(processes)
        self._total, self._processes, self._t = total, processes, now
        return out

    def _evict_exited(self, processes: dict[int, tuple[str, VfsCounts]]) -> None:
        """Forget processes that have exited and made no call since the last sample, so the map does not
        fill up over a long run; an exited process can make no more calls, so nothing is lost."""
        for pid, (_, counts) in list(processes.items()):
            before = self._processes.get(pid)
            if before and before[1].ops == counts.ops and not Path(f"/proc/{pid}").exists():
                self.obj.maps["processes"].delete(pid)
                del processes[pid]


COLUMNS = [f.name for f in fields(VfsCounts)]


def _rates(counts: VfsCounts, seconds: float) -> list[float]:
    return [round(v, 1) for v in counts.per_second(seconds).values()]


def show(
    opts: RunOptions, sample: VfsSample, elapsed: float, per_process: bool, rows: int, first: bool
) -> None:
    out = opts.output
    headers = [c.upper() + "/s" for c in COLUMNS]
    if opts.as_json:
        out.record(
            {
                "kind": "total",
                "interval": round(elapsed, 3),
                "seconds": round(sample.seconds, 3),
                **sample.total.to_dict(),
                **{
                    f"{c}_per_s": v
                    for c, v in zip(COLUMNS, _rates(sample.total, sample.seconds), strict=True)
                },
            }
        )
        if per_process:
            for p in sample.top(rows):
                out.record(
                    {
                        "kind": "process",
                        "interval": round(elapsed, 3),
                        "pid": p.pid,
                        "comm": p.comm,
                        **p.counts.to_dict(),
                    }
                )
        return
    if per_process:
        out.heading(
            f"{elapsed:.1f}s  total: "
            + ", ".join(
                f"{c} {v:g}/s" for c, v in zip(COLUMNS, _rates(sample.total, sample.seconds), strict=True)
            )
        )
        table = [[p.pid, p.comm, *_rates(p.counts, sample.seconds)] for p in sample.top(rows)]
        if table:
            out.table(["PID", "COMM", *headers], table)
        else:
            out.line("no file system calls")
    else:
        # One line per interval under one header, as vmstat prints.
        if first:
            out.line(f"{'TIME':>8} " + " ".join(f"{h:>10}" for h in headers))
        rates = _rates(sample.total, sample.seconds)
        out.line(f"{elapsed:>7.1f}s " + " ".join(f"{v:>10.1f}" for v in rates))
    out.stream.flush()


EXAMPLES = """
\b
Examples:
  bpfscope vfsstat                  # system-wide calls per second, every second
  bpfscope vfsstat -P 5             # the busiest processes, every 5 seconds
  bpfscope vfsstat -p 1234 1 10     # one process, 10 times
  bpfscope vfsstat --json -P 1 3    # JSON lines: totals, then one line per process
"""


@click.command(name="vfsstat", epilog=EXAMPLES)
@click.option("-P", "--processes", "per_process", is_flag=True, help="Per process, busiest first.")
@click.option(
    "-r", "--rows", type=click.IntRange(min=1), default=10, show_default=True, help="Processes shown with -P."
)
@tool_options
def command(opts: RunOptions, per_process: bool, rows: int) -> None:
    """File system calls per second (1 s intervals by default): reads, writes, opens, creates (opens that
    created their file), fsyncs (fsync, fdatasync, sync_file_range, syncfs, sync, msync MS_SYNC) and
    unlinks, counted in the kernel at each system call. Failed calls count. io_uring and mmap() page
    faults are not system calls and are not seen; sendfile, splice and copy_file_range are not counted.
    """
    with VfsSampler(opts.filters()) as sampler:
        sampler.start()
        grand = VfsCounts()
        start = time.monotonic()
        note = "Tracing file system calls... Ctrl-C to end."
        for n, elapsed in enumerate(ticks(opts, note, DEFAULT_INTERVAL)):
            sample = sampler.sample()
            grand += sample.total
            show(opts, sample, elapsed, per_process, rows, first=n == 0)
        seconds = time.monotonic() - start
        losses = sampler.losses({"processes_dropped": "calls not attributed (too many processes)"})
        counts = ", ".join(f"{c} {v}" for c, v in grand.to_dict().items())
        opts.output.note(f"vfsstat: {seconds:.1f} s, {counts}; {losses}")


class VfsProvider(SamplerProvider):
    """``bpfscope check`` row: file system calls per second and the process making most of them.

    Informational, always ok: a rate of calls is load, not a fault. An fsync storm or a flood of small
    reads shows up as latency on the disk rows (device p99, queue depth, PSI io), which judge it; what
    is "too many" fsyncs depends on the disk (a few hundred per second saturate a spinning disk, an
    NVMe drive takes tens of thousands), so a fixed threshold here would be wrong on one or the other.
    This row says who is calling when those rows are red.
    """

    name = "VFS"
    requires = ("bpf",)
    sampler_class = VfsSampler

    def rows(self, window_s: float) -> list[Row]:
        sample: VfsSample = self.sample()
        rate = sample.total.per_second(sample.seconds)
        ops = sample.total.ops / max(sample.seconds, 1e-9)
        text = ", ".join(f"{rate[k]:.0f} {k}" for k in ("reads", "writes", "opens", "fsyncs")) + " /s"
        detail = [f"creates {rate['creates']:.0f}/s, unlinks {rate['unlinks']:.0f}/s"]
        top = sample.top(1)
        if top:
            p = top[0]
            detail.insert(
                0, f"top: {p.comm} ({p.pid}) {p.counts.ops / max(sample.seconds, 1e-9):.0f} calls/s"
            )
        return [
            Row(
                "VFS",
                "calls/s",
                ops,
                "/s",
                text,
                Verdict.OK,
                "informational: load, not a fault (disk rows judge its effect)",
                "; ".join(detail),
            )
        ]
