"""bpfscope biolatency: block I/O latency distributions, as BCC-style histograms with percentiles.

The kernel side (biolatency.bpf.c) keeps one log-linear histogram in nanoseconds per key (everything,
or per disk with -D, per operation and flags with -F); each interval reads them and shows what was added
since the last read, so intervals are exact and nothing falls between two reads. Percentiles come from
the log-linear buckets (at most 1/16 relative error); the ASCII histogram shows them folded into
power-of-two rows of the display unit, as BCC does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click
import numpy as np

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.block import disks as block
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.runtime.hist import Histogram, log2_slot

# BTF tracepoints are BPF_PROG_TYPE_TRACING, which libbpf cannot probe alone: raw tracepoints stand in.
REQUIRES = ("raw_tracepoint",)
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


class Report:
    def __init__(self, opts: RunOptions, per_disk: bool, per_flags: bool, millis: bool) -> None:
        self.opts = opts
        self.per_disk = per_disk
        self.per_flags = per_flags
        self.unit_ns = 1_000_000 if millis else 1_000
        self.unit = "msecs" if millis else "usecs"
        self.suffix = "ms" if millis else "us"
        self.disk_name = block.DiskNames()

    def _sort_key(self, key: Key) -> tuple[str, int, int]:
        dev, op, flags = key
        return (self.disk_name(dev) if self.per_disk else "", op, flags)

    def _labels(self, key: Key) -> dict[str, Any]:
        dev, op, flags = key
        labels: dict[str, Any] = {}
        if self.per_disk:
            labels["disk"] = self.disk_name(dev)
        if self.per_flags:
            labels["flags"] = block.describe(op, flags)
            labels["rwbs"] = block.rwbs(op, flags)
        return labels

    def _scaled(self, value_ns: float | None) -> float | None:
        return None if value_ns is None else round(value_ns / self.unit_ns, 3)

    def stats(self, entry: Entry) -> dict[str, Any]:
        count = entry.hist.total
        stats: dict[str, Any] = {"count": count, f"avg_{self.suffix}": self._scaled(entry.total_ns / count)}
        for q in PERCENTILES:
            stats[self.percentile_key(q)] = self._scaled(entry.hist.percentile(q))
        return stats

    def percentile_key(self, q: float) -> str:
        """JSON key of a percentile, named as syscount names them: p50_us, p999_us."""
        return f"p{q:g}".replace(".", "") + f"_{self.suffix}"

    def show(self, entries: dict[Key, Entry], title: str) -> None:
        out = self.opts.output
        keys = sorted(entries, key=self._sort_key)
        if self.opts.as_json:
            for key in keys:
                entry = entries[key]
                shown = display_hist(entry.hist, self.unit_ns)
                out.record(
                    {
                        "interval": title,
                        **self._labels(key),
                        "unit": self.unit,
                        **self.stats(entry),
                        "hist": [
                            {"low": low, "high": high, "count": int(c)}
                            for slot, c in enumerate(shown.counts)
                            for low, high in [shown.bounds(slot)]
                            if c
                        ],
                    }
                )
            return
        out.heading(title)
        if not keys:
            out.line("no block I/O")
        for key in keys:
            entry = entries[key]
            labels = self._labels(key)
            if labels:
                out.line("\n" + "  ".join(f"{k} = {v}" for k, v in labels.items() if k != "rwbs"))
            out.line(display_hist(entry.hist, self.unit_ns).ascii(self.unit))
            stats = self.stats(entry)
            figures = [f"avg {stats[f'avg_{self.suffix}']}"] + [
                f"p{q:g} {stats[self.percentile_key(q)]}" for q in PERCENTILES
            ]
            out.line(f"count {stats['count']}  " + "  ".join(figures) + f"  ({self.unit})")
        out.stream.flush()


EXAMPLES = """
\b
Examples:
  bpfscope biolatency               # one histogram of device latency until Ctrl-C
  bpfscope biolatency -m 1 10       # in milliseconds, every second, 10 times
  bpfscope biolatency -D -F         # per disk, and per operation and flags (Sync-Read, Write, ...)
  bpfscope biolatency -Q -d vda     # one disk, with the time queued in the I/O scheduler
  bpfscope biolatency --json 5      # JSON lines every 5 seconds: count, avg, p50..p99.9, buckets
"""


@click.command(name="biolatency", epilog=EXAMPLES)
@click.option("-d", "--disk", metavar="DISK", help="Only this disk (vda, /dev/vda or major:minor).")
@click.option("-D", "--disks", "per_disk", is_flag=True, help="One histogram per disk.")
@click.option("-F", "--flags", "per_flags", is_flag=True, help="One histogram per operation and flags.")
@click.option(
    "-Q", "--queued", is_flag=True, help="Include the time queued in the I/O scheduler (from insert)."
)
@click.option("-m", "--milliseconds", "millis", is_flag=True, help="Show milliseconds, not microseconds.")
@tool_options
def command(
    opts: RunOptions, disk: str | None, per_disk: bool, per_flags: bool, queued: bool, millis: bool
) -> None:
    """Block I/O latency histograms with p50, p95, p99 and p99.9.

    Latency is device time, from issue to the driver to completion; with -Q it starts when the request
    was inserted into the I/O scheduler. -p and --cgroup select by the process that submitted the I/O.
    """
    by_task = bool(opts.pid or opts.cgroup)
    # Device time needs no tracking of our own where the kernel keeps the issue time: one program per
    # I/O instead of four hash-map operations (benchmarks/block_overhead.py measures the difference).
    kernel_clock = not queued and not by_task and block.kernel_issue_clock(disk)
    rodata = {
        **opts.filters(),
        **block.device_filter(disk),
        "per_disk": per_disk,
        "per_flags": per_flags,
        "queued": queued,
        "kernel_clock": kernel_clock,
    }
    require(*REQUIRES)
    report = Report(opts, per_disk, per_flags, millis)
    # Latency per disk or flag needs no submitting process, unless -p or --cgroup select by it.
    autoload = {"rq_complete"} if kernel_clock else block.programs(queue_time=queued, submitter=by_task)
    with BpfObject(tool_object("biolatency"), rodata=rodata, autoload=autoload) as obj:
        obj.attach()
        before: dict[Key, Entry] = {}
        for elapsed in ticks(opts, "Tracing block device I/O... Ctrl-C to end."):
            now = snapshot(obj)
            if opts.interval:
                report.show(delta(now, before), f"{elapsed:.1f}s")
            before = now
        if not opts.interval:
            report.show(delta(before, {}), "total")
        lost = (
            f"{obj.bss['untimed']} completions without an issue time"
            if kernel_clock
            else block.unseen_note(obj)
        )
        opts.output.note(f"biolatency: {obj.losses()}, {lost}")
