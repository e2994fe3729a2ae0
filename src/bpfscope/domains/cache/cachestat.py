"""bpfscope cachestat: page-cache lookups, hits, misses, hit ratio and dirtied pages, per interval.

Built on tracepoints alone (no kprobes): see core/cache.py for the method and its limits. In short,
lookups are pages asked of the page cache by reads (filemap:mm_filemap_get_pages) and mmap faults
(filemap:mm_filemap_map_pages, filemap:mm_filemap_fault); misses are pages the kernel brought in for them
(filemap:mm_filemap_add_to_page_cache, 1 << order pages per folio, less folios that writes created);
read-ahead pages count as misses when they are read, so a cold sequential read is 0% hits; hits =
lookups - misses; dirtied = pages newly marked dirty (writeback:writeback_dirty_folio). Buffers and
cached MB come from /proc/meminfo.

The health-check provider "Page cache" (:class:`PageCacheProvider`) judges the hit ratio over the window.
"""

from __future__ import annotations

from typing import Any, ClassVar

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.cache.pagecache import CacheSample, CacheSampler
from bpfscope.health.check import Provider, Row, Verdict

DEFAULT_TOP = 5

# --- Health-check thresholds ------------------------------------------------------------------------
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


def _pct(v: float) -> str:
    return f"{v:.0f}%" if v >= 10 else f"{v:.1f}%"


def _top_line(sample: CacheSample) -> str | None:
    worst = next((r for r in sample.rows if r.counts.misses), None)
    if worst is None:
        return None
    c = worst.counts
    ratio = c.hit_ratio
    return f"most misses: {worst.key.comm}[{worst.key.tgid}] {c.misses / sample.interval_s:.0f}/s" + (
        "" if ratio is None else f", hit ratio {_pct(ratio)}"
    )


def judge(sample: CacheSample) -> tuple[Verdict, str]:
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


class PageCacheProvider(Provider):
    """Rows for ``bpfscope check``: the page-cache hit ratio over the window, with lookups/s, misses/s
    and the process missing most."""

    name: ClassVar[str] = "Page cache"
    requires: ClassVar[tuple[str, ...]] = ("bpf",)

    def __init__(self) -> None:
        self._sampler: CacheSampler | None = None

    def prepare(self) -> None:
        self._sampler = CacheSampler()

    def start(self) -> None:
        assert self._sampler is not None
        self._sampler.restart()

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()

    def rows(self, window_s: float) -> list[Row]:
        assert self._sampler is not None
        s = self._sampler.sample()
        verdict, note = judge(s)
        detail = [
            f"lookups {s.lookups_s:.0f}/s, misses {s.misses_s:.0f}/s",
            f"dirtied {s.dirtied / s.interval_s:.0f} pages/s",
            f"cached {s.cached_mb:.0f} MB",
        ]
        top = _top_line(s)
        if top:
            detail.append(top)
        if note:
            detail.append(note)
        rule = (
            f"warn < {CACHE_HIT_WARN_PCT:g}%, PROBLEM < {CACHE_HIT_PROBLEM_PCT:g}% with >= "
            f"{CACHE_PROBLEM_MIN_MISSES_S:g} misses/s; none under {CACHE_MIN_LOOKUPS_S:g} lookups/s"
        )
        text = "-" if s.hit_ratio is None else _pct(s.hit_ratio)
        return [Row("Page cache", "hit ratio", s.hit_ratio, "%", text, verdict, rule, "; ".join(detail))]


def _report(opts: RunOptions, sample: CacheSample, top: int, elapsed: float) -> None:
    out = opts.output
    procs = sample.rows[:top]
    if opts.as_json:
        record: dict[str, Any] = {"elapsed_s": round(elapsed, 3), **sample.to_dict()}
        if top:
            record["top"] = [r.to_dict(sample.interval_s) for r in procs]
        out.record(record)
        return
    ratio = "-" if sample.hit_ratio is None else f"{sample.hit_ratio:.2f}%"
    out.table(
        ["TIME s", "LOOKUPS", "HITS", "MISSES", "DIRTIES", "HITRATIO", "AHEAD", "BUFFERS_MB", "CACHED_MB"],
        [
            [
                round(elapsed, 1),
                sample.lookups,
                sample.hits,
                sample.misses,
                sample.dirtied,
                ratio,
                sample.ahead,
                round(sample.buffers_mb, 1),
                round(sample.cached_mb, 1),
            ]
        ],
    )
    if procs:
        out.table(
            ["PID", "COMM", "LOOKUPS", "HITS", "MISSES", "DIRTIES", "HITRATIO"],
            [
                [
                    r.key.tgid,
                    r.key.comm,
                    r.counts.lookups,
                    r.counts.hits,
                    r.counts.misses,
                    r.counts.dirtied,
                    "-" if r.counts.hit_ratio is None else f"{r.counts.hit_ratio:.2f}%",
                ]
                for r in procs
            ],
        )
    out.stream.flush()


EXAMPLES = """
\b
Examples:
  bpfscope cachestat 1                     # every second until Ctrl-C
  bpfscope cachestat -T 5 1 10             # and the 5 processes missing most, 10 times
  bpfscope cachestat -p 1234 1             # one process
  bpfscope cachestat --json --cgroup /sys/fs/cgroup/unified/db 5 3
  bpfscope cachestat --duration 30         # one line for the whole 30 seconds
\b
Method and limits: lookups are pages asked by reads (filemap:mm_filemap_get_pages, once per read
request) and by mmap faults (filemap:mm_filemap_map_pages, filemap:mm_filemap_fault); misses are pages
added to the page cache for them (filemap:mm_filemap_add_to_page_cache, 1 << order pages per folio, less
folios writes created). Read-ahead counts as a miss when read: a cold sequential read is 0% hits. Pages
read ahead beyond the interval's lookups show as AHEAD (asked later, they are hits then). Direct I/O
bypasses the cache (not counted); shmem/tmpfs files are not seen; for mmap, lookups are the pages the
kernel mapped, not every access. DIRTIES are pages newly marked dirty (writeback:writeback_dirty_folio).
"""


@click.command(name="cachestat", epilog=EXAMPLES)
@click.option(
    "-T",
    "--top",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help=f"Also list this many processes by misses (try {DEFAULT_TOP}).",
)
@tool_options
def command(opts: RunOptions, top: int) -> None:
    """Page-cache lookups, hits, misses, hit ratio and dirtied pages per interval (counts in pages),
    with Buffers and Cached from /proc/meminfo; system-wide, or one process (-p) or cgroup (--cgroup).
    hit_ratio is in percent (null in JSON when there was no lookup).
    """
    with CacheSampler(pid=opts.pid, cgroup=opts.cgroup) as sampler:
        for elapsed in ticks(opts, "Tracing page cache... Ctrl-C to end."):
            _report(opts, sampler.sample(), top, elapsed)
        opts.output.note(f"cachestat: {sampler.losses()}")
