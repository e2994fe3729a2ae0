"""Health rules for disks and I/O pressure: per disk its device latency, load, queue depth and
utilisation (from the iostat collector: sysstat's formulas on /proc/diskstats, device latency and depth
at issue from BPF), and PSI io, the symptom that points at a cause elsewhere."""

from __future__ import annotations

from collections.abc import Mapping

from bpfscope.domains.block.iostat import DiskCollector, DiskConfig, DiskInterval, DiskSample, IoPressure
from bpfscope.health.rule import Rule, unmet
from bpfscope.health.verdict import Row, Threshold, Verdict, ms, pct
from bpfscope.runtime.collector import Collector, Sample

# p99 device time of a disk (issue to completion). SSDs, NVMe and virtual disks answer in well under a
# millisecond and a spinning disk in 5-15 ms (seek and rotation): a p99 of 20 ms is slow for anything but
# a busy HDD, and 100 ms is a request stuck behind a long queue, a throttled or a failing device on any.
DISK_P99_WARN_MS = 20.0
DISK_P99_PROBLEM_MS = 100.0
# A percentile of a handful of requests is one request's latency: below this many in the window a slow
# disk only warns (one slow flush on an idle disk is not a problem).
DISK_MIN_REQUESTS = 20
# Queue depth (aqu-sz: the time-average of requests from allocation to completion, scheduler included) as
# a share of nr_requests, which bounds exactly those requests. At nr_requests, submitters sleep for a free
# request and the queue adds latency of its own; half full means the disk is fed faster than it drains.
DISK_DEPTH_WARN_FRAC = 0.5
DISK_DEPTH_PROBLEM_FRAC = 0.9
# %util, the share of time with a request in flight: 100% means never idle, not saturated, for disks that
# serve requests in parallel (SSD, NVMe, virtio, RAID), so on its own it only warns.
DISK_UTIL_WARN_PCT = 90.0
# PSI io "some": share of the window in which at least one task was stalled waiting for I/O. 10% is
# slowness people notice; past 30% waiting for I/O is what the machine mostly does.
PSI_IO_WARN_PCT = 10.0
PSI_IO_PROBLEM_PCT = 30.0
# A process is named beside a busy disk when it moved at least this share of the disk's bytes.
NAMED_SHARE = 0.05


class DiskRule(Rule):
    """Rows per disk: real disks always (one row when idle), virtual ones (loop, zram, device-mapper) when
    they did I/O."""

    name = "Disk"

    def collectors(self) -> list[Collector]:
        # Without BPF the disks are still judged, on diskstats' mean await instead of the p99.
        self.no_bpf = unmet("bpf")
        return [DiskCollector(DiskConfig(bpf=self.no_bpf is None, include_self=self.include_self))]

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        sample = samples[self.collector]
        assert isinstance(sample, DiskInterval)
        shown = [d for d in sample.disks.values() if not d.virtual or d.active]
        rows: list[Row] = []
        for disk in sorted(shown, key=lambda d: (d.virtual, d.name)):
            rows += self._disk_rows(disk)
        return rows

    def _disk_rows(self, disk: DiskSample) -> list[Row]:
        res = f"Disk {disk.name}"
        depth = disk.aqu_sz if disk.active else None
        # Who moves the bytes before the queue depth: the compact view keeps the first clauses that fit.
        context = [f"{pct(disk.util)} util", *who(disk)]
        if depth is not None:
            context.append(f"queue depth {depth:.0f}")
        rows = [self._latency_row(res, disk, context)]
        if not disk.active:
            return rows  # an idle disk: one row, so that the busy ones stand out
        rows.append(
            Row(
                res,
                "IOPS r/w",
                disk.r_s + disk.w_s,
                "/s",
                f"{disk.r_s:.0f} / {disk.w_s:.0f}",
                Verdict.OK,
                "no limit: load, not a fault",
            )
        )
        mbs = (disk.rkb_s + disk.wkb_s) / 1024
        rows.append(
            Row(
                res,
                "MB/s",
                mbs,
                "MB/s",
                f"{mbs:.1f}",
                Verdict.OK,
                "no limit: load, not a fault",
                f"read {disk.rkb_s / 1024:.1f}, write {disk.wkb_s / 1024:.1f}",
            )
        )
        rows.append(self._depth_row(res, disk, depth))
        util_verdict = Verdict.WARN if disk.util >= DISK_UTIL_WARN_PCT else Verdict.OK
        rows.append(
            Row(
                res,
                "%util",
                disk.util,
                "%",
                pct(disk.util),
                util_verdict,
                f"warn >= {DISK_UTIL_WARN_PCT:g}%, never PROBLEM alone",
            )
        )
        return rows

    def _latency_row(self, res: str, disk: DiskSample, context: list[str]) -> Row:
        limit = Threshold(DISK_P99_WARN_MS, DISK_P99_PROBLEM_MS, " ms")
        metric = "p99" if disk.latency is not None else "await"
        if not disk.active:
            return Row(
                res, metric, None, "ms", "no I/O", Verdict.OK, limit.describe(), "idle over the window"
            )
        if disk.latency is not None:
            count = disk.latency.total
            p99 = disk.latency_us(99)
            value = None if p99 is None else p99 / 1000
            detail = [*context, f"p50 {ms(disk.latency_us(50))}", f"p95 {ms(disk.latency_us(95))}"]
            # None: no request was both issued and completed while we watched.
            text = ms(p99)
        else:
            # No BPF (or a bio-based disk): diskstats' mean time per request, scheduler included.
            count = disk.reads + disk.writes
            await_ms = (disk.r_await * disk.reads + disk.w_await * disk.writes) / count if count else None
            value = await_ms
            detail = [*context, "mean await: " + ("no BPF" if self.no_bpf else "bio-based disk")]
            text = "-" if await_ms is None else ms(await_ms * 1000)
        verdict = limit.judge(value)
        if verdict is Verdict.PROBLEM and count < DISK_MIN_REQUESTS:
            verdict = Verdict.WARN
            detail.append(f"only {count} requests")
        return Row(res, metric, value, "ms", text, verdict, limit.describe(), "; ".join(detail))

    def _depth_row(self, res: str, disk: DiskSample, depth: float | None) -> Row:
        nr = disk.nr_requests
        text = "-" if depth is None else f"{depth:.1f}"
        detail = []
        if disk.depth_mean is not None:
            # BPF's view: requests already on the device as each one was issued to it.
            detail.append(f"on device at issue: mean {disk.depth_mean:.1f}, max {disk.depth_max}")
        if nr:
            detail.append(f"nr_requests {nr}")
            limit = Threshold(DISK_DEPTH_WARN_FRAC * nr, DISK_DEPTH_PROBLEM_FRAC * nr, "")
            verdict = limit.judge(depth)
            rule = (
                f"warn >= {DISK_DEPTH_WARN_FRAC:.0%}, PROBLEM >= {DISK_DEPTH_PROBLEM_FRAC:.0%} of nr_requests"
            )
        else:
            verdict, rule = Verdict.OK, "no nr_requests (bio-based disk)"
        return Row(res, "queue depth", depth, "", text, verdict, rule, "; ".join(detail))

    def refine(self, rows: list[Row]) -> list[Row]:
        """A disk never idle while tasks stall on I/O is the cause of that stall: the disk is saturated,
        even if each request is fast once on the device (the waiting happens in the queue before it)."""
        stalled = any(r.symptom and r.resource == "PSI io" and r.verdict is Verdict.PROBLEM for r in rows)
        if not stalled:
            return rows
        busy = [
            r for r in rows if r.metric == "%util" and r.value is not None and r.value >= DISK_UTIL_WARN_PCT
        ]
        for row in busy:
            row.verdict = Verdict.PROBLEM
            row.threshold = f">= {DISK_UTIL_WARN_PCT:g}% while I/O pressure is a PROBLEM: saturated"
            depth = next((r for r in rows if r.resource == row.resource and r.metric == "queue depth"), None)
            row.detail = "saturated: tasks wait for this disk" + (
                f"; queue depth {depth.text}" if depth else ""
            )
        return rows


def who(disk: DiskSample) -> list[str]:
    """The processes that moved the disk's bytes, as they would be named beside a slow disk:
    ``fio[123] does 99% of the bytes`` (bpfscope's own I/O never counts). Shares are of every process's
    bytes, not only of the few listed."""
    moved = [(p, p.read_bytes + p.write_bytes) for p in disk.top]
    total = max(disk.process_bytes, sum(b for _, b in moved))
    named = [(p, b) for p, b in moved if total and b / total >= NAMED_SHARE]
    if not named:
        return []
    lead, lead_bytes = named[0]
    words = [f"{lead.comm}[{lead.pid}] does {lead_bytes / total:.0%} of the bytes"]
    others = ", ".join(f"{p.comm}[{p.pid}] {b / total:.0%}" for p, b in named[1:])
    return words + ([f"also {others}"] if others else [])


class IoPressureRule(Rule):
    """PSI io: a symptom (tasks waiting for I/O) whose cause is a disk, a throttle or remote storage."""

    name = "I/O pressure"
    requires = ("psi",)

    def collectors(self) -> list[Collector]:
        # diskstats and PSI only: the disk rule's collector has the BPF part.
        return [DiskCollector(DiskConfig(bpf=False))]

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        sample = samples[self.collector]
        assert isinstance(sample, DiskInterval)
        p: IoPressure | None = sample.io_pressure
        if p is None:
            return []
        limit = Threshold(PSI_IO_WARN_PCT, PSI_IO_PROBLEM_PCT, "%")
        return [
            Row(
                "PSI io",
                "some",
                p.some_pct,
                "%",
                pct(p.some_pct),
                limit.judge(p.some_pct),
                limit.describe() + " of the window",
                f"full {pct(p.full_pct)}; avg10 some {p.some_avg10:.1f}%, full {p.full_avg10:.1f}%",
                symptom=True,
            )
        ]
