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

The collector is the Python API, which ``bpfscope check`` uses too (health.py)::

    with WritebackCollector(WritebackConfig()) as writeback:
        writeback.open(); writeback.start()
        time.sleep(5)
        sample = writeback.sample()
        print(sample.dirty_bytes, sample.pages_by_reason(), sample.throttled_ms)
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import click

from bpfscope.cli.options import Run, common_options
from bpfscope.engine import system
from bpfscope.runtime.collector import BpfCollector, Collector, Config, Sample
from bpfscope.runtime.losses import Losses
from bpfscope.runtime.schema import COMM, PID, Field, Schema, btf_field, btf_fields
from bpfscope.sinks.terminal import Terminal, View

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


def _mib(n: int) -> float:
    return round(n / MIB, 1)


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


@cache
def writeback_schemas() -> tuple[Schema, Schema, Schema]:
    """writeback's records: the interval's summary, flushes per device and reason, throttled writers."""
    btf = WritebackCollector.btf()
    summary = Schema(
        "writeback",
        (
            Field("dirty_mb", "float", "MB", "dirty pages at the end of the interval (nr_dirty)"),
            Field("writeback_mb", "float", "MB", "pages under writeback at its end (nr_writeback)"),
            Field("dirty_limit_mb", "float", "MB", "where writers are held (nr_dirty_threshold)"),
            Field("background_limit_mb", "float", "MB", "where the flusher starts (background threshold)"),
            Field("dirtied_mb_per_s", "float", "MB/s", "pages made dirty (nr_dirtied)"),
            Field("written_mb_per_s", "float", "MB/s", "pages whose writeback completed (nr_written)"),
            Field("flushes_per_s", "float", "/s", "flusher runs, every device and reason"),
            Field("throttled_pauses", "int", doc="sleeps balance_dirty_pages() imposed on writers"),
            Field("throttled_ms", "int", "ms", "their length, in all"),
        ),
        doc="Dirty memory against its limits and the writeback over an interval.",
        interval=True,
    )
    flush = Schema(
        "writeback.flush",
        (
            btf_field("bdi", btf.struct("flush_key").field("bdi").type, label=True, doc="major:minor"),
            Field("reason", "str", label=True, doc="as the writeback_written tracepoint names it"),
            *btf_fields(btf.struct("flush_stats"), only=("flushes", "pages")),
            Field("flushes_per_s", "float", "/s"),
            Field("pages_per_flush", "float", "pages"),
        ),
        doc="The flusher's runs for one backing device and reason over an interval.",
        interval=True,
    )
    throttled = Schema(
        "writeback.throttled",
        (PID, COMM, *btf_fields(btf.struct("writer_stats"), only=("pauses", "pause_ms"))),
        doc="One writer balance_dirty_pages() put to sleep over an interval, the longest asleep first.",
        interval=True,
    )
    return summary, flush, throttled


@dataclass
class WritebackSample(Sample):
    ts: float
    interval_s: float
    elapsed_s: float  # since the collector started (for views)
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

    def summary(self) -> dict[str, Any]:
        """The interval in MB and per second, as the heading and the summary record show it."""
        secs = self.interval_s
        return {
            "dirty_mb": _mib(self.dirty_bytes),
            "writeback_mb": _mib(self.writeback_bytes),
            "dirty_limit_mb": _mib(self.dirty_limit_bytes),
            "background_limit_mb": _mib(self.background_limit_bytes),
            "dirtied_mb_per_s": round(self.dirtied_pages * PAGE_SIZE / MIB / secs, 2),
            "written_mb_per_s": round(self.written_pages * PAGE_SIZE / MIB / secs, 2),
            "flushes_per_s": round(sum(f.flushes for f in self.flushes) / secs, 2),
            "throttled_pauses": self.throttled_pauses,
            "throttled_ms": self.throttled_ms,
        }

    def records(self) -> Iterator[dict[str, Any]]:
        summary, flush, throttled = writeback_schemas()
        common = {"ts": self.ts, "interval_s": round(self.interval_s, 6)}
        yield summary.record({**common, **self.summary()})
        for f in self.flushes:
            rates = {
                "flushes_per_s": round(f.flushes / self.interval_s, 2),
                "pages_per_flush": round(f.pages_per_flush, 1),
            }
            values = {"bdi": f.bdi, "reason": f.reason, "flushes": f.flushes, "pages": f.pages}
            yield flush.record({**common, **values, **rates})
        for w in self.writers:
            values = {"pid": w.pid, "comm": w.comm, "pauses": w.pauses, "pause_ms": w.pause_ms}
            yield throttled.record({**common, **values})


@dataclass(kw_only=True)
class WritebackConfig(Config):
    """The task filter selects throttled writers only: flushes are the kernel's, done by its flusher
    threads on everyone's behalf."""


FlushCounts = dict[tuple[str, int], tuple[int, int]]  # (bdi, enum wb_reason) -> (flushes, pages)
WriterCounts = dict[int, tuple[str, int, int]]  # pid -> (comm, pauses, pause_ms)


class WritebackCollector(BpfCollector[WritebackConfig]):
    """/proc/vmstat plus writeback.bpf.c; each sample covers the time since the previous one."""

    name = "writeback"
    bpf_object = "writeback"
    requires = ("tracepoint",)
    default_interval_s = 1.0
    loss_counters = {
        "flushes_dropped": ("map_full", "flushes not counted (too many devices)"),
        "pauses_dropped": ("map_full", "pauses not attributed to a process (too many)"),
        "flushes_unpaired": ("unseen", "flushes under way at start counted without pages"),
    }

    def __init__(self, config: WritebackConfig) -> None:
        super().__init__(config)
        self.run_flushes = self.run_pages = 0  # every flush sampled so far, for the run's summary
        self._start = self._t = time.monotonic()

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return writeback_schemas()

    def start(self) -> None:
        self._read()  # the first read builds the maps' numpy layouts: not inside the interval
        self._baseline(*self._read())

    def start_from_attach(self) -> None:
        self._baseline({}, {}, (0, 0))

    def _baseline(self, flushes: FlushCounts, writers: WriterCounts, pauses: tuple[int, int]) -> None:
        self._flushes, self._writers, self._pauses = flushes, writers, pauses
        self._vmstat = read_vmstat()
        self._start = self._t = time.monotonic()

    def _read(self) -> tuple[FlushCounts, WriterCounts, tuple[int, int]]:
        """The counters so far: flushes, throttled writers, and every writer's (pauses, pause_ms)."""
        assert self.obj is not None
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
        return flushes, writers, (int(bss["pauses_total"]), int(bss["pause_ms_total"]))

    def sample(self) -> WritebackSample:
        assert self.obj is not None
        flushes, writers, pauses = self._read()
        vmstat = read_vmstat()
        now = time.monotonic()
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
        sample = WritebackSample(
            ts=time.time(),
            interval_s=max(now - self._t, 1e-9),
            elapsed_s=now - self._start,
            vmstat=vmstat,
            dirtied_pages=vmstat["nr_dirtied"] - self._vmstat["nr_dirtied"],
            written_pages=vmstat["nr_written"] - self._vmstat["nr_written"],
            flushes=sorted(rows, key=lambda f: f.pages, reverse=True),
            writers=sorted(throttled, key=lambda w: w.pause_ms, reverse=True),
            throttled_pauses=pauses[0] - self._pauses[0],
            throttled_ms=pauses[1] - self._pauses[1],
        )
        self.run_flushes += sum(f.flushes for f in rows)
        self.run_pages += sum(f.pages for f in rows)
        for pid, (_, count, _) in list(writers.items()):
            # An exited writer that was not throttled since the last sample will not be again.
            if self._writers.get(pid, ("", -1, 0))[1] == count and not Path(f"/proc/{pid}").exists():
                self.obj.maps["writers"].delete(pid)
                del writers[pid]
        self._flushes, self._writers, self._pauses = flushes, writers, pauses
        self._vmstat, self._t = vmstat, now
        return sample


class WritebackView(View):
    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, WritebackSample)
        s = sample.summary()
        term.heading(
            f"{sample.elapsed_s:.1f}s  dirty {s['dirty_mb']} MB  writeback {s['writeback_mb']} MB  "
            f"(bg limit {s['background_limit_mb']} MB, limit {s['dirty_limit_mb']} MB)  "
            f"dirtied {s['dirtied_mb_per_s']} MB/s  written {s['written_mb_per_s']} MB/s"
        )
        secs = sample.interval_s
        flushes = [
            [f.bdi, f.reason, f.flushes, round(f.flushes / secs, 2), f.pages, round(f.pages_per_flush, 1)]
            for f in sample.flushes
        ]
        if flushes:
            term.table(["BDI", "REASON", "FLUSHES", "FLUSHES/s", "PAGES", "PAGES/FLUSH"], flushes)
        else:
            term.line("no flushes")
        if sample.writers:
            term.table(
                ["PID", "COMM", "THROTTLED", "PAUSED ms"],
                [[w.pid, w.comm, w.pauses, w.pause_ms] for w in sample.writers],
                title="writers throttled",
            )

    def summary(self, collector: Collector, losses: Losses) -> str:
        assert isinstance(collector, WritebackCollector)
        return f"writeback: {collector.run_flushes} flushes, {collector.run_pages} pages; {losses.text()}"


EXAMPLES = """
\b
Examples:
  bpfscope writeback                # every second until Ctrl-C
  bpfscope writeback 5 12           # every 5 seconds for a minute
  bpfscope writeback -p 1234        # throttling of one process only (flushes are the kernel's)
  bpfscope writeback --json 1 3     # JSON lines: summary, flushes, throttled writers
"""


@click.command(name="writeback", epilog=EXAMPLES)
@common_options
def command(run: Run) -> None:
    """Dirty and writeback memory against the dirty limits, pages dirtied and written per second, the
    flusher's flushes per device and reason (background, periodic, sync, vmscan, ...) with pages per flush,
    and the writers balance_dirty_pages() put to sleep. -p and --cgroup select throttled writers only:
    flushes are done by the kernel's flusher threads on everyone's behalf.
    """
    collector = WritebackCollector(run.config(WritebackConfig))
    run.run(collector, WritebackView(), "Tracing writeback... Ctrl-C to end.")
