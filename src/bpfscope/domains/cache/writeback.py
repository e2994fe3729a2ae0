"""bpfscope writeback: dirty pages, pages under writeback, the kernel's flushes and why they ran, and the
writers it throttles, per interval.

From /proc/vmstat (the same counters as /proc/meminfo's Dirty and Writeback, in pages):

    dirty, writeback        nr_dirty, nr_writeback at the end of the interval
    limit, bg limit         nr_dirty_threshold and nr_dirty_background_threshold: vm.dirty_ratio (or
                            dirty_bytes) and dirty_background_ratio of the dirtyable memory; the flusher
                            starts at the background limit, writers are throttled from half-way between
                            the two and held at the limit
    dirtied/s, written/s    the change of nr_dirtied and nr_written: pages made dirty, pages whose
                            writeback completed, however it was started (flusher, fsync, O_SYNC, reclaim)

From BPF (writeback.bpf.c), per backing device and reason: flushes of the flusher threads (writeback:
writeback_start -> writeback_written) and the pages each wrote; and per process, the times
balance_dirty_pages() put a writer to sleep and for how long. Reasons are named from the tracepoint's own
format (its __print_symbolic table), so a kernel that adds one names it too.

The collector is a Python API, used by ``bpfscope check`` too::

    with WritebackSampler() as sampler:
        sampler.start()
        time.sleep(5)
        sample = sampler.sample()
        print(sample.dirty_bytes, sample.pages_by_reason(), sample.throttled_ms)
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.engine import system
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.health.check import Row, SamplerProvider, Threshold
from bpfscope.runtime.sampler import Sampler

REQUIRES = ("tracepoint",)
DEFAULT_INTERVAL = 1.0
VMSTAT = Path("/proc/vmstat")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
VMSTAT_FIELDS = (
    "nr_dirty",
    "nr_writeback",
    "nr_dirty_threshold",
    "nr_dirty_background_threshold",
    "nr_dirtied",
    "nr_written",
)


def read_vmstat(path: Path = VMSTAT) -> dict[str, int]:
    values = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name in VMSTAT_FIELDS:
            values[name] = int(value)
    return {name: values.get(name, 0) for name in VMSTAT_FIELDS}


@cache
def reason_names() -> dict[int, str]:
    """enum wb_reason -> name, from writeback_written's print format (``{ 2, "sync" }``)."""
    fmt = system.ensure_tracefs() / "events/writeback/writeback_written/format"
    try:
        text = fmt.read_text()
    except OSError:
        return {}
    return {int(n): name for n, name in re.findall(r'\{\s*(\d+),\s*"([^"]+)"\s*\}', text)}


def reason_name(reason: int) -> str:
    return reason_names().get(reason, f"reason_{reason}")


def _cstr(raw: Any) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


@dataclass
class Flushes:
    bdi: str  # backing device, "major:minor"
    reason: str
    flushes: int
    pages: int

    @property
    def pages_per_flush(self) -> float:
        return self.pages / self.flushes if self.flushes else 0.0


@dataclass
class ThrottledWriter:
    pid: int
    comm: str
    pauses: int
    pause_ms: int


@dataclass
class WritebackSample:
    seconds: float
    vmstat: dict[str, int]  # values at the end of the interval
    dirtied_pages: int  # over the interval
    written_pages: int
    flushes: list[Flushes] = field(default_factory=list)  # those with flushes in the interval
    writers: list[ThrottledWriter] = field(default_factory=list)
    throttled_pauses: int = 0  # every writer's, even those the per-process map had no room for
    throttled_ms: int = 0

    @property
    def dirty_bytes(self) -> int:
        return self.vmstat["nr_dirty"] * PAGE_SIZE

    @property
    def writeback_bytes(self) -> int:
        return self.vmstat["nr_writeback"] * PAGE_SIZE

    @property
    def dirty_limit_bytes(self) -> int:
        return self.vmstat["nr_dirty_threshold"] * PAGE_SIZE

    @property
    def background_limit_bytes(self) -> int:
        return self.vmstat["nr_dirty_background_threshold"] * PAGE_SIZE

    @property
    def throttle_start_bytes(self) -> int:
        """Where balance_dirty_pages() starts to slow writers down: half-way between the background
        limit and the limit (its "freerun" ceiling)."""
        return (self.dirty_limit_bytes + self.background_limit_bytes) // 2

    def pages_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.flushes:
            out[f.reason] = out.get(f.reason, 0) + f.pages
        return out

    def flushes_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.flushes:
            out[f.reason] = out.get(f.reason, 0) + f.flushes
        return out


class WritebackSampler(Sampler):
    """/proc/vmstat plus writeback.bpf.c; each sample() covers the time since the previous one."""

    def __init__(self, rodata: dict[str, Any] | None = None) -> None:
        require(*REQUIRES)
        self.obj = BpfObject(tool_object("writeback"), rodata=rodata)
        self._flushes: dict[tuple[str, int], tuple[int, int]] = {}
        self._writers: dict[int, tuple[str, int, int]] = {}
        self._vmstat = read_vmstat()
        self._pauses = (0, 0)
        self._t = time.monotonic()

    def start(self) -> None:
        self.obj.attach()
        self.sample()

    def sample(self) -> WritebackSample:
        now = time.monotonic()
        vmstat = read_vmstat()
        keys, values = self.obj.maps["flushes"].items()
        flushes = {
            (_cstr(k["bdi"]), int(k["reason"])): (int(v["flushes"]), int(v["pages"]))
            for k, v in zip(keys, values, strict=True)
        }
        keys, values = self.obj.maps["writers"].items()
        writers = {
            int(k): (_cstr(v["comm"]), int(v["pauses"]), int(v["pause_ms"]))
            for k, v in zip(keys, values, strict=True)
        }
        bss = self.obj.bss
        pauses = (int(bss["pauses_total"]), int(bss["pause_ms_total"]))

        rows = []
        for (bdi, reason), (count, pages) in flushes.items():
            before = self._flushes.get((bdi, reason), (0, 0))
            if count > before[0]:
                rows.append(Flushes(bdi, reason_name(reason), count - before[0], pages - before[1]))
        throttled = []
        for pid, (comm, count, ms) in writers.items():
            before = self._writers.get(pid, (comm, 0, 0))
            if count > before[1]:
                throttled.append(ThrottledWriter(pid, comm, count - before[1], ms - before[2]))
        out = WritebackSample(
            now - self._t,
            vmstat,
            vmstat["nr_dirtied"] - self._vmstat["nr_dirtied"],
            vmstat["nr_written"] - self._vmstat["nr_written"],
            sorted(rows, key=lambda f: f.pages, reverse=True),
            sorted(throttled, key=lambda w: w.pause_ms, reverse=True),
            pauses[0] - self._pauses[0],
            pauses[1] - self._pauses[1],
        )
        for pid, (_, count, _) in list(writers.items()):
            # An exited writer that was not throttled since the last sample will not be again.
            if self._writers.get(pid, ("", -1, 0))[1] == count and not Path(f"/proc/{pid}").exists():
                self.obj.maps["writers"].delete(pid)
                del writers[pid]
        self._flushes, self._writers, self._vmstat, self._pauses, self._t = (
            flushes,
            writers,
            vmstat,
            pauses,
            now,
        )
        return out


LOSSES = {
    "flushes_dropped": "flushes not counted (too many devices)",
    "pauses_dropped": "pauses not attributed to a process (too many)",
    "flushes_unpaired": "flushes under way at start counted without pages",
}


def _mib(n: int) -> float:
    return round(n / MIB, 1)


def show(opts: RunOptions, s: WritebackSample, elapsed: float) -> None:
    out = opts.output
    secs = max(s.seconds, 1e-9)
    summary = {
        "dirty_mb": _mib(s.dirty_bytes),
        "writeback_mb": _mib(s.writeback_bytes),
        "dirty_limit_mb": _mib(s.dirty_limit_bytes),
        "background_limit_mb": _mib(s.background_limit_bytes),
        "dirtied_mb_per_s": round(s.dirtied_pages * PAGE_SIZE / MIB / secs, 2),
        "written_mb_per_s": round(s.written_pages * PAGE_SIZE / MIB / secs, 2),
        "flushes_per_s": round(sum(f.flushes for f in s.flushes) / secs, 2),
        "throttled_pauses": s.throttled_pauses,
        "throttled_ms": s.throttled_ms,
    }
    flush_rows = [
        [f.bdi, f.reason, f.flushes, round(f.flushes / secs, 2), f.pages, round(f.pages_per_flush, 1)]
        for f in s.flushes
    ]
    flush_keys = ["bdi", "reason", "flushes", "flushes_per_s", "pages", "pages_per_flush"]
    writer_rows = [[w.pid, w.comm, w.pauses, w.pause_ms] for w in s.writers]
    if opts.as_json:
        interval = round(elapsed, 3)
        out.record({"kind": "summary", "interval": interval, "seconds": round(s.seconds, 3), **summary})
        extra = {"kind": "flush", "interval": interval}
        out.table(flush_keys, flush_rows, keys=flush_keys, extra=extra)
        writer_keys = ["pid", "comm", "pauses", "pause_ms"]
        out.table(
            writer_keys, writer_rows, keys=writer_keys, extra={"kind": "throttled", "interval": interval}
        )
        return
    out.heading(
        f"{elapsed:.1f}s  dirty {summary['dirty_mb']} MB  writeback {summary['writeback_mb']} MB  "
        f"(bg limit {summary['background_limit_mb']} MB, limit {summary['dirty_limit_mb']} MB)  "
        f"dirtied {summary['dirtied_mb_per_s']} MB/s  written {summary['written_mb_per_s']} MB/s"
    )
    if flush_rows:
        out.table(["BDI", "REASON", "FLUSHES", "FLUSHES/s", "PAGES", "PAGES/FLUSH"], flush_rows)
    else:
        out.line("no flushes")
    if writer_rows:
        out.table(["PID", "COMM", "THROTTLED", "PAUSED ms"], writer_rows, title="writers throttled")
    out.stream.flush()


EXAMPLES = """
\b
Examples:
  bpfscope writeback                # every second until Ctrl-C
  bpfscope writeback 5 12           # every 5 seconds for a minute
  bpfscope writeback -p 1234        # throttling of one process only (flushes are the kernel's)
  bpfscope writeback --json 1 3     # JSON lines: summary, flushes, throttled writers
"""


@click.command(name="writeback", epilog=EXAMPLES)
@tool_options
def command(opts: RunOptions) -> None:
    """Dirty and writeback memory against the dirty limits, pages dirtied and written per second, the
    flusher's flushes per device and reason (background, periodic, sync, vmscan, ...) with pages per flush,
    and the writers balance_dirty_pages() put to sleep. -p and --cgroup select throttled writers only:
    flushes are done by the kernel's flusher threads on everyone's behalf.
    """
    with WritebackSampler(opts.filters()) as sampler:
        sampler.start()
        total_flushes = total_pages = 0
        for elapsed in ticks(opts, "Tracing writeback... Ctrl-C to end.", DEFAULT_INTERVAL):
            s = sampler.sample()
            total_flushes += sum(f.flushes for f in s.flushes)
            total_pages += sum(f.pages for f in s.flushes)
            show(opts, s, elapsed)
        opts.output.note(f"writeback: {total_flushes} flushes, {total_pages} pages; {sampler.losses(LOSSES)}")


# Writers asleep in balance_dirty_pages(), as the share of the window the most throttled process slept.
# Throttling begins half-way between the background and the dirty limit, where the kernel starts pacing
# writers to the disk's speed: 1% asleep means that point was reached (the disk cannot take the writes as
# fast as they come); at 10% a writer loses a tenth of its time waiting for the disk, which the
# application feels directly (a slow write(), not a slow fsync).
THROTTLE_WARN_PCT = 1.0
THROTTLE_PROBLEM_PCT = 10.0


class WritebackProvider(SamplerProvider):
    """``bpfscope check`` rows: dirty memory against the kernel's dirty limits, and throttled writers.

    Dirty memory warns where balance_dirty_pages() starts to throttle writers (half-way between the
    background limit and the limit: the flusher is not keeping up) and is a PROBLEM at the limit, where
    every writer is held until pages are written back.
    """

    name = "Writeback"
    requires = ("bpf",)
    sampler_class = WritebackSampler

    def rows(self, window_s: float) -> list[Row]:
        s: WritebackSample = self.sample()
        secs = max(s.seconds, 1e-9)
        dirty_mb = s.dirty_bytes / MIB
        limit = Threshold(s.throttle_start_bytes / MIB, s.dirty_limit_bytes / MIB, " MB")
        flushes = ", ".join(f"{reason} {n}" for reason, n in s.flushes_by_reason().items()) or "none"
        written_mbs = s.written_pages * PAGE_SIZE / MIB / secs
        dirty = Row(
            "Writeback",
            "dirty",
            dirty_mb,
            "MB",
            f"{dirty_mb:.1f} MB",
            limit.judge(dirty_mb),
            f"warn >= {limit.warn:.0f} MB (throttling starts), PROBLEM >= {limit.problem:.0f} MB (limit)",
            f"writeback {s.writeback_bytes / MIB:.1f} MB; written {written_mbs:.1f} MB/s; "
            f"flushes: {flushes}; background limit {s.background_limit_bytes / MIB:.0f} MB",
        )
        worst = s.writers[0] if s.writers else None
        worst_ms = worst.pause_ms if worst else s.throttled_ms
        pct = 100.0 * worst_ms / (secs * 1000)
        throttle = Threshold(THROTTLE_WARN_PCT, THROTTLE_PROBLEM_PCT, "%")
        detail = f"{s.throttled_pauses} pauses, {s.throttled_ms} ms in all"
        if worst:
            detail = f"most: {worst.comm} ({worst.pid}) {worst.pause_ms} ms; " + detail
        throttled = Row(
            "Writeback",
            "writers throttled",
            pct,
            "%",
            f"{pct:.1f}% of the time",
            throttle.judge(pct),
            throttle.describe() + " of the window asleep in balance_dirty_pages",
            detail,
        )
        return [dirty, throttled]
