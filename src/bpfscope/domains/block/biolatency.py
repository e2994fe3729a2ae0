"""bpfscope biolatency: block I/O latency distributions, as BCC-style histograms with percentiles.

The kernel side (biolatency.bpf.c) keeps one log-linear histogram in nanoseconds per key (everything,
or per disk with -D, per operation and flags with -F); each interval reads them and shows what was added
since the last read, so intervals are exact and nothing falls between two reads. Percentiles come from
the log-linear buckets (at most 1/16 relative error); the ASCII histogram shows them folded into
power-of-two rows of the display unit, as BCC does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.block import disks as block
from bpfscope.runtime.collector import BpfCollector, Config, Sample
from bpfscope.runtime.hist import Histogram, log2_slot
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    from bpfscope.engine.bpf import BpfObject
    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.losses import Losses

PERCENTILES = (50, 95, 99, 99.9)

Key = tuple[int, int, int]  # (dev, op, flags), zeros where not split


@dataclass
class Entry:
    total_ns: int
    hist: Histogram


def snapshot(obj: BpfObject) -> dict[Key, Entry]:
    keys, values = obj.maps["hists"].items()
    return {
        (int(k["dev"]), int(k["op"]), int(k["flags"])): Entry(
            int(v["total_ns"]), Histogram(v["hist"]["slots"], "loglin")
        )
        for k, v in zip(keys, values, strict=True)
    }


def delta(now: dict[Key, Entry], before: dict[Key, Entry]) -> dict[Key, Entry]:
    """What each histogram gained since ``before``; keys that gained nothing are left out."""
    out = {}
    for key, entry in now.items():
        prev = before.get(key)
        diff = entry if prev is None else Entry(entry.total_ns - prev.total_ns, entry.hist - prev.hist)
        if diff.hist.total:
            out[key] = diff
    return out


def display_hist(hist: Histogram, unit_ns: int) -> Histogram:
    """A log2 histogram of the display unit (usecs, msecs), as BCC buckets latencies.

    Each log-linear nanosecond bucket goes to the row of its midpoint: a bucket is at most 1/16 of its
    value wide, so only samples that close to a row's boundary can be shown one row off. Percentiles
    are computed from the log-linear buckets, not from these rows.
    """
    nz = np.flatnonzero(hist.counts)
    if not nz.size:
        return Histogram(np.zeros(0, dtype=np.uint64), "log2")
    mids = np.array([sum(hist.bounds(int(s))) // 2 // unit_ns for s in nz], dtype=np.uint64)
    rows = log2_slot(mids)
    counts = np.zeros(int(rows.max()) + 1, dtype=np.uint64)
    np.add.at(counts, rows.astype(np.intp), hist.counts[nz])
    return Histogram(counts, "log2")


def percentile_key(q: float, suffix: str = "us") -> str:
    """Key of a percentile, named as syscount names them: p50_us, p999_us."""
    return f"p{q:g}".replace(".", "") + f"_{suffix}"


HIST_SCHEMA = Schema(
    "biolatency",
    (
        Field("disk", "str", label=True, nullable=True, doc="with -D"),
        Field("op", "str", label=True, nullable=True, doc="with -F: the operation (Read, Write, ...)"),
        Field("flags", "list", nullable=True, doc="with -F: the request flags (Sync, FUA, ...)"),
        Field("rwbs", "str", nullable=True, doc="with -F: operation and flags as blktrace shows them"),
        Field("count", "int", doc="requests completed"),
        Field("avg_us", "float", "us"),
        *(Field(percentile_key(q), "float", "us", nullable=True) for q in PERCENTILES),
        Field("hist", "list", doc="log2 buckets of microseconds: low, high, count"),
    ),
    doc="Block I/O latency over the interval: device time, or from insert with -Q.",
    interval=True,
)


@dataclass(kw_only=True)
class BiolatencyConfig(Config):
    disk: str | None = None  # only this disk (-d)
    per_disk: bool = False  # one histogram per disk (-D)
    per_flags: bool = False  # one histogram per operation and flags (-F)
    queued: bool = False  # from insert into the I/O scheduler, not from issue (-Q)


@dataclass
class LatencySample(Sample):
    ts: float
    interval_s: float
    entries: dict[Key, Entry]
    config: BiolatencyConfig
    disk_name: block.DiskNames

    def labels(self, key: Key) -> dict[str, Any]:
        dev, op, flags = key
        return {
            "disk": self.disk_name(dev) if self.config.per_disk else None,
            "op": block.op_name(op) if self.config.per_flags else None,
            "flags": block.flag_list(flags) if self.config.per_flags else None,
            "rwbs": block.rwbs(op, flags) if self.config.per_flags else None,
        }

    def sorted_keys(self) -> list[Key]:
        return sorted(
            self.entries, key=lambda k: (self.disk_name(k[0]) if self.config.per_disk else "", k[1], k[2])
        )

    def records(self) -> Iterator[dict[str, Any]]:
        for key in self.sorted_keys():
            entry = self.entries[key]
            shown = display_hist(entry.hist, 1_000)
            yield HIST_SCHEMA.record(
                {
                    "ts": self.ts,
                    "interval_s": round(self.interval_s, 6),
                    **self.labels(key),
                    **stats(entry, 1_000, "us"),
                    "hist": [
                        {"low": low, "high": high, "count": int(c)}
                        for slot, c in enumerate(shown.counts)
                        for low, high in [shown.bounds(slot)]
                        if c
                    ],
                }
            )


def stats(entry: Entry, unit_ns: int, suffix: str) -> dict[str, Any]:
    count = entry.hist.total

    def scaled(value_ns: float | None) -> float | None:
        return None if value_ns is None else round(value_ns / unit_ns, 3)

    out: dict[str, Any] = {"count": count, f"avg_{suffix}": scaled(entry.total_ns / count)}
    for q in PERCENTILES:
        out[percentile_key(q, suffix)] = scaled(entry.hist.percentile(q))
    return out


class BiolatencyCollector(BpfCollector[BiolatencyConfig]):
    """One log-linear histogram of latency per key (everything, per disk, per operation and flags); each
    sample is what the histograms gained over the interval."""

    name = "biolatency"
    bpf_object = "biolatency"
    requires = ("raw_tracepoint",)
    _schemas = (HIST_SCHEMA,)

    def __init__(self, config: BiolatencyConfig) -> None:
        super().__init__(config)
        by_task = bool(config.pid or config.cgroup)
        # Device time needs no tracking of our own where the kernel keeps the issue time: one program per
        # I/O instead of four hash-map operations (benchmarks/block_overhead.py measures the difference).
        # Requests are then the disk's, whoever submitted them, as in diskstats: bpfscope's own too, so
        # only with include_self.
        self.kernel_clock = (
            not config.queued
            and not by_task
            and config.include_self
            and block.kernel_issue_clock(config.disk)
        )
        self.loss_counters = (
            {"untimed": ("unseen", "completions without an issue time")}
            if self.kernel_clock
            else {"bs_rq_unseen": ("unseen", "requests completed unseen (no program ran at completion)")}
        )

    def rodata(self) -> dict[str, Any]:
        c = self.config
        return {
            **super().rodata(),
            **block.device_filter(c.disk),
            "per_disk": c.per_disk,
            "per_flags": c.per_flags,
            "queued": c.queued,
            "kernel_clock": self.kernel_clock,
        }

    def autoload(self) -> set[str]:
        # Latency per disk or flag needs no submitting process, unless -p or --cgroup select by it, or
        # bpfscope's own requests are to be left out.
        if self.kernel_clock:
            return {"rq_complete"}
        by_task = bool(self.config.pid or self.config.cgroup) or not self.config.include_self
        return block.programs(queue_time=self.config.queued, submitter=by_task)

    def start(self) -> None:
        assert self.obj is not None
        self.start_from_attach()
        self.before = snapshot(self.obj)

    def start_from_attach(self) -> None:
        self.disk_name = block.DiskNames()
        self.before = {}
        self.t0 = time.monotonic()

    def sample(self) -> LatencySample:
        assert self.obj is not None
        now, t = snapshot(self.obj), time.monotonic()
        sample = LatencySample(time.time(), t - self.t0, delta(now, self.before), self.config, self.disk_name)
        self.before, self.t0 = now, t
        return sample


class BiolatencyView(View):
    def __init__(self, millis: bool, intervals: bool) -> None:
        self.unit_ns = 1_000_000 if millis else 1_000
        self.unit = "msecs" if millis else "usecs"
        self.suffix = "ms" if millis else "us"
        self.intervals = intervals
        self.start = time.monotonic()

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, LatencySample)
        term.heading(f"{time.monotonic() - self.start:.1f}s" if self.intervals else "total")
        keys = sample.sorted_keys()
        if not keys:
            term.line("no block I/O")
        for key in keys:
            entry = sample.entries[key]
            labels = {k: v for k, v in sample.labels(key).items() if v is not None and k != "rwbs"}
            if "op" in labels:
                labels = {k: v for k, v in labels.items() if k not in ("op", "flags")}
                labels["flags"] = block.describe(key[1], key[2])
            if labels:
                term.line("\n" + "  ".join(f"{k} = {v}" for k, v in labels.items()))
            term.line(display_hist(entry.hist, self.unit_ns).ascii(self.unit))
            s = stats(entry, self.unit_ns, self.suffix)
            figures = [f"avg {s[f'avg_{self.suffix}']}"] + [
                f"p{q:g} {s[percentile_key(q, self.suffix)]}" for q in PERCENTILES
            ]
            term.line(f"count {s['count']}  " + "  ".join(figures) + f"  ({self.unit})")

    def summary(self, collector: Collector, losses: Losses) -> str:
        return f"biolatency: {losses.text()}"


EXAMPLES = """
\b
Examples:
  bpfscope biolatency               # one histogram of device latency until Ctrl-C
  bpfscope biolatency -m 1 10       # in milliseconds, every second, 10 times
  bpfscope biolatency -D -F         # per disk, and per operation and flags (Sync-Read, Write, ...)
  bpfscope biolatency -Q -d vda     # one disk, with the time queued in the I/O scheduler
  bpfscope biolatency --json 5      # JSON lines every 5 seconds: count, avg, p50..p99.9, buckets (us)
"""


@click.command(name="biolatency", epilog=EXAMPLES)
@option("disk")
@option("per_disk", help="One histogram per disk.")
@option("per_flags")
@option("queued", help="Include the time queued in the I/O scheduler (from insert).")
@option("millis")
@common_options
def command(run: Run, disk: str | None, per_disk: bool, per_flags: bool, queued: bool, millis: bool) -> None:
    """Block I/O latency histograms with p50, p95, p99 and p99.9.

    Latency is device time, from issue to the driver to completion; with -Q it starts when the request
    was inserted into the I/O scheduler. -p and --cgroup select by the process that submitted the I/O.
    JSON is always in microseconds; -m changes what people see.
    """
    config = run.config(BiolatencyConfig, disk=disk, per_disk=per_disk, per_flags=per_flags, queued=queued)
    view = BiolatencyView(millis, run.interval is not None)
    run.run(BiolatencyCollector(config), view, "Tracing block device I/O... Ctrl-C to end.")
