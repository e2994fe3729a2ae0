"""bpfscope cachestat: page-cache lookups, hits, misses, hit ratio and dirtied pages, per interval.

Built on tracepoints alone (no kprobes): see pagecache.py for the method and its limits. In short,
lookups are pages asked of the page cache by reads (filemap:mm_filemap_get_pages) and mmap faults
(filemap:mm_filemap_map_pages, filemap:mm_filemap_fault); misses are pages the kernel brought in for them
(filemap:mm_filemap_add_to_page_cache, 1 << order pages per folio, less folios that writes created);
read-ahead pages count as misses when they are read, so a cold sequential read is 0% hits; hits =
lookups - misses; dirtied = pages newly marked dirty (writeback:writeback_dirty_folio). Buffers and
cached MB come from /proc/meminfo. With -r N, the N processes missing most, too.

The health check's "Page cache" rows (health.py) come from the same collector.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.cache.pagecache import PageCacheCollector, PageCacheSample
from bpfscope.runtime.collector import Config, Sample
from bpfscope.sinks.terminal import Terminal, View


@dataclass(kw_only=True)
class CachestatConfig(Config):
    processes: int = 0  # also this many processes, those missing most (-r)


class CachestatCollector(PageCacheCollector[CachestatConfig]):
    """The page cache over each interval, with every active process's share in ``rows`` (the first
    ``processes`` of them in the records)::

        with CachestatCollector(CachestatConfig(cgroup="/sys/fs/cgroup/db")) as cachestat:
            cachestat.open(); cachestat.start()
            time.sleep(5)
            s = cachestat.sample()        # since start() (or the previous sample)
            print(s.hit_ratio, s.misses, s.rows[0].key.comm)
    """

    name = "cachestat"

    def sample(self) -> PageCacheSample:
        sample = self.interval()
        sample.processes = self.config.processes
        return sample


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


class CachestatView(View):
    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, PageCacheSample)
        columns = ["TIME s", "LOOKUPS", "HITS", "MISSES", "DIRTIES", "HITRATIO", "AHEAD", "BUFFERS_MB"]
        term.table(
            [*columns, "CACHED_MB"],
            [
                [
                    round(sample.elapsed_s, 1),
                    sample.lookups,
                    sample.hits,
                    sample.misses,
                    sample.dirtied,
                    _ratio(sample.hit_ratio),
                    sample.ahead,
                    round(sample.buffers_mb, 1),
                    round(sample.cached_mb, 1),
                ]
            ],
        )
        processes = sample.rows[: sample.processes]
        if processes:
            term.table(
                ["PID", "COMM", "LOOKUPS", "HITS", "MISSES", "DIRTIES", "HITRATIO"],
                [
                    [
                        r.key.tgid,
                        r.key.comm,
                        r.counts.lookups,
                        r.counts.hits,
                        r.counts.misses,
                        r.counts.dirtied,
                        _ratio(r.counts.hit_ratio),
                    ]
                    for r in processes
                ],
            )


EXAMPLES = """
\b
Examples:
  bpfscope cachestat 1                     # every second until Ctrl-C
  bpfscope cachestat -r 5 1 10             # and the 5 processes missing most, 10 times
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
@option("rows", default=0, help="Also list this many processes by misses (try 5).")
@common_options
def command(run: Run, max_rows: int) -> None:
    """Page-cache lookups, hits, misses, hit ratio and dirtied pages per interval (counts in pages),
    with Buffers and Cached from /proc/meminfo; system-wide, or one process (-p) or cgroup (--cgroup).
    Without an interval, one line for the whole run. hit_ratio is in percent (null in JSON when there was
    no lookup).
    """
    collector = CachestatCollector(run.config(CachestatConfig, processes=max_rows))
    run.run(collector, CachestatView(), "Tracing page cache... Ctrl-C to end.")
