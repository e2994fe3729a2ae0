"""Health rules for the page cache, file system calls and writeback, on the collectors of cachestat,
vfsstat and writeback. bpfscope's own work is never what they judge or name (its collectors leave it
out) unless the check is asked to include it."""

from __future__ import annotations

from collections.abc import Mapping

from bpfscope.domains.cache.cachestat import CachestatCollector, CachestatConfig
from bpfscope.domains.cache.pagecache import PAGE_SIZE, PageCacheSample
from bpfscope.domains.cache.vfsstat import VfsCollector, VfsConfig, VfsSample
from bpfscope.domains.cache.writeback import MIB, WritebackCollector, WritebackConfig, WritebackSample
from bpfscope.health.rule import Rule
from bpfscope.health.verdict import Row, Threshold, Verdict, pct
from bpfscope.runtime.collector import Collector, Sample

# --- Page cache ---------------------------------------------------------------------------------------
# A hit costs about a microsecond (a copy from memory); a miss costs a disk read: about 0.1 ms on an SSD
# or a virtual disk, 5-10 ms on a spinning disk, 100x to 10000x more. At a 90% hit ratio the one read in
# ten that misses already takes most of the time spent reading, so below 90% the cache is what limits
# reads: warn. Below 50% most reads go to the disk: with a miss rate that loads a disk, a PROBLEM.
CACHE_HIT_WARN_PCT = 90.0
CACHE_HIT_PROBLEM_PCT = 50.0
# Misses per second under which even a low hit ratio is no PROBLEM: 1000 pages/s is about 4 MB/s of reads
# from disk, far from loading any disk, so it only warns (a backup reading a file once misses every page
# and that is how it should be).
CACHE_PROBLEM_MIN_MISSES_S = 1000.0
# Lookups per second under which no verdict is given: a handful of reads of a cold file (a program
# starting, a config file read) would be a 0% hit ratio that means nothing. 100 pages/s is 400 kB/s.
CACHE_MIN_LOOKUPS_S = 100.0

# --- Writeback ----------------------------------------------------------------------------------------
# Writers asleep in balance_dirty_pages(), as the share of the window the most throttled process slept.
# Throttling begins half-way between the background and the dirty limit, where the kernel starts pacing
# writers to the disk's speed: 1% asleep means that point was reached (the disk cannot take the writes as
# fast as they come); at 10% a writer loses a tenth of its time waiting for the disk, which the
# application feels directly (a slow write(), not a slow fsync).
THROTTLE_WARN_PCT = 1.0
THROTTLE_PROBLEM_PCT = 10.0


def judge_hit_ratio(sample: PageCacheSample) -> tuple[Verdict, str]:
    """The verdict on one window's hit ratio, and the note that explains it when not plain."""
    if sample.hit_ratio is None or sample.lookups_s < CACHE_MIN_LOOKUPS_S:
        return Verdict.OK, f"fewer than {CACHE_MIN_LOOKUPS_S:g} lookups/s: too few to judge"
    if sample.hit_ratio < CACHE_HIT_PROBLEM_PCT:
        if sample.misses_s >= CACHE_PROBLEM_MIN_MISSES_S:
            return Verdict.PROBLEM, ""
        return Verdict.WARN, f"under {CACHE_PROBLEM_MIN_MISSES_S:g} misses/s: no PROBLEM"
    if sample.hit_ratio < CACHE_HIT_WARN_PCT:
        return Verdict.WARN, ""
    return Verdict.OK, ""


def _most_misses(sample: PageCacheSample) -> str | None:
    worst = next((r for r in sample.rows if r.counts.misses), None)
    if worst is None:
        return None
    c = worst.counts
    ratio = "" if c.hit_ratio is None else f", hit ratio {pct(c.hit_ratio)}"
    return f"most misses: {worst.key.comm}[{worst.key.tgid}] {c.misses / sample.interval_s:.0f}/s{ratio}"


class PageCacheRule(Rule):
    """The page-cache hit ratio over the window, with lookups/s, misses/s and the process missing most."""

    name = "Page cache"
    requires = ("bpf",)

    def collectors(self) -> list[Collector]:
        return [CachestatCollector(CachestatConfig(include_self=self.include_self))]

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        s = samples[self.collector]
        assert isinstance(s, PageCacheSample)
        verdict, note = judge_hit_ratio(s)
        detail = [
            f"lookups {s.lookups_s:.0f}/s, misses {s.misses_s:.0f}/s",
            f"dirtied {s.dirtied / s.interval_s:.0f} pages/s",
            f"cached {s.cached_mb:.0f} MB",
        ]
        if (most := _most_misses(s)) is not None:
            detail.append(most)
        if note:
            detail.append(note)
        threshold = (
            f"warn < {CACHE_HIT_WARN_PCT:g}%, PROBLEM < {CACHE_HIT_PROBLEM_PCT:g}% with >= "
            f"{CACHE_PROBLEM_MIN_MISSES_S:g} misses/s; none under {CACHE_MIN_LOOKUPS_S:g} lookups/s"
        )
        text = "-" if s.hit_ratio is None else pct(s.hit_ratio)
        return [Row("Page cache", "hit ratio", s.hit_ratio, "%", text, verdict, threshold, "; ".join(detail))]


class VfsRule(Rule):
    """File system calls per second and the process making most of them.

    Informational, always ok: a rate of calls is load, not a fault. An fsync storm or a flood of small
    reads shows up as latency on the disk rows (device p99, queue depth, PSI io), which judge it; what
    is "too many" fsyncs depends on the disk (a few hundred per second saturate a spinning disk, an
    NVMe drive takes tens of thousands), so a fixed threshold here would be wrong on one or the other.
    This row says who is calling when those rows are red.
    """

    name = "VFS"
    requires = ("bpf",)

    def collectors(self) -> list[Collector]:
        return [VfsCollector(VfsConfig(include_self=self.include_self))]

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        s = samples[self.collector]
        assert isinstance(s, VfsSample)
        rate = s.total.per_second(s.interval_s)
        ops = s.total.ops / s.interval_s
        text = f"{ops:.0f}"
        kinds = ("reads", "writes", "opens", "fsyncs", "creates", "unlinks")
        detail = [", ".join(f"{k} {rate[k]:.0f}/s" for k in kinds)]
        for p in s.top(1):
            detail.insert(0, f"top: {p.comm} ({p.pid}) {p.counts.ops / s.interval_s:.0f} calls/s")
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


class WritebackRule(Rule):
    """Dirty memory against the kernel's dirty limits, and throttled writers.

    Dirty memory warns where balance_dirty_pages() starts to throttle writers (half-way between the
    background limit and the limit: the flusher is not keeping up) and is a PROBLEM at the limit, where
    every writer is held until pages are written back.
    """

    name = "Writeback"
    requires = ("bpf",)

    def collectors(self) -> list[Collector]:
        return [WritebackCollector(WritebackConfig(include_self=self.include_self))]

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        s = samples[self.collector]
        assert isinstance(s, WritebackSample)
        dirty_mb = s.dirty_bytes / MIB
        limit = Threshold(s.throttle_start_bytes / MIB, s.dirty_limit_bytes / MIB, " MB")
        flushes = ", ".join(f"{reason} {n}" for reason, n in s.flushes_by_reason().items()) or "none"
        written_mbs = s.written_pages * PAGE_SIZE / MIB / s.interval_s
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
        asleep = 100.0 * worst_ms / (s.interval_s * 1000)
        throttle = Threshold(THROTTLE_WARN_PCT, THROTTLE_PROBLEM_PCT, "%")
        detail = f"{s.throttled_pauses} pauses, {s.throttled_ms} ms in all"
        if worst:
            detail = f"most: {worst.comm} ({worst.pid}) {worst.pause_ms} ms; " + detail
        throttled = Row(
            "Writeback",
            "writers throttled",
            asleep,
            "%",
            f"{asleep:.1f}% of the time",
            throttle.judge(asleep),
            throttle.describe() + " of the window asleep in balance_dirty_pages",
            detail,
        )
        return [dirty, throttled]
