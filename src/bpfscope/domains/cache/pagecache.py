"""Page-cache efficiency from tracepoints, shared by cachestat, cachetop and the health check: one BPF
object (cachestat.bpf.c), counting per process or, for cachetop, per process and file.

Method (the kernel side is cache.bpf.h):

- **lookups** are pages asked of the page cache: by reads (``filemap:mm_filemap_get_pages``, its
  index..last_index range, counted once per read request even though the kernel reports each batch of
  it) and through mmap (``filemap:mm_filemap_map_pages``, the range fault-around mapped, and
  ``filemap:mm_filemap_fault``, a page fault-around did not find).
- **misses** are pages the kernel had to bring in: ``filemap:mm_filemap_add_to_page_cache``, 1 << order
  pages per folio, less the folios writes created (added, then at once marked dirty by the same task:
  nobody looked them up).
- **read-ahead pages count as misses when they are added**, not when they are asked: a page read ahead
  came from the disk because of the workload, so a cold sequential read is 0% hits and a warm one 100%,
  as a person means it. Pages read ahead but not asked in the same interval (the read-ahead window at the
  end of a read, read-around of mmap, or read-ahead nobody uses) would make misses exceed lookups: misses
  are capped at lookups and the excess is reported apart as ``ahead``. Over intervals of a second or more
  the window's few hundred kilobytes do not move the ratio.
- **hits** = lookups - misses; **hit ratio** = hits / lookups, in percent (None without lookups).
- **dirtied** = pages marked dirty (``writeback:writeback_dirty_folio``, folio size from BTF).

Limits: direct I/O (O_DIRECT) bypasses the page cache and is neither a lookup nor a miss. shmem and tmpfs
files (and so /dev/shm, memfd, SysV shared memory) have a page cache of their own without these
tracepoints: invisible. Pages an mmap'ed program touches after fault-around mapped them are not lookups
the kernel sees (no fault), so for mmap, lookups count pages made available, not accesses: reading a cold
32 MiB file through mmap, one byte a page, gave 6892 lookups for its 8192 pages (0% hits, the rest
``ahead``), and warm 6704 lookups, all hits: through mmap, lookups undercount the pages touched (by about
a fifth there), while the hit ratio holds. Reads served by a file system that keeps no page cache (FUSE
with direct_io, some network file systems in direct mode) are not seen. Attribution is to the task in
whose context the kernel ran: synchronous and asynchronous read-ahead run in the reader's context, so
misses are charged to the reader.

bpfscope's own reads (its start-up, its reads of /proc) are left out, in the kernel, unless asked
(``include_self``): right after a cache drop they would otherwise be what misses most.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bpfscope.domains.cache.vfs import st_dev
from bpfscope.runtime.collector import BpfCollector, C, Sample
from bpfscope.runtime.counts import Counts
from bpfscope.runtime.schema import COMM, PID, Field, Schema, btf_field

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.engine.bpf import BpfObject

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class CacheCounts(Counts):
    """Page counts of one row (or the total), named as struct cache_counts' fields (cache.bpf.h)."""

    read_pages: int = 0
    fault_pages: int = 0
    added: int = 0
    write_added: int = 0
    dirtied: int = 0

    @property
    def lookups(self) -> int:
        return self.read_pages + self.fault_pages

    @property
    def brought_in(self) -> int:
        """Pages added for lookups (read, read-ahead, faults), not created by writes."""
        return max(0, self.added - self.write_added)

    @property
    def misses(self) -> int:
        return min(self.brought_in, self.lookups)

    @property
    def ahead(self) -> int:
        """Pages brought in beyond the lookups: read ahead and not (yet) asked."""
        return self.brought_in - self.misses

    @property
    def hits(self) -> int:
        return self.lookups - self.misses

    @property
    def hit_ratio(self) -> float | None:
        return 100.0 * self.hits / self.lookups if self.lookups else None

    @property
    def active(self) -> bool:
        return any(self.to_dict().values())


@dataclass(frozen=True)
class RowKey:
    tgid: int
    comm: str
    dev: int  # os.stat's st_dev; 0 when rows are per process only
    ino: int


@dataclass(frozen=True)
class CacheRow:
    """One process (or one process and file) over an interval."""

    key: RowKey
    counts: CacheCounts


def rounded(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(v, digits)


def meminfo_mb() -> tuple[float, float]:
    """Buffers and Cached from /proc/meminfo, in MB (MiB), as free(1) and BCC's cachestat show them."""
    values = {}
    for line in MEMINFO.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Buffers", "Cached"):
            values[name] = int(rest.split()[0]) / 1024
    return values.get("Buffers", 0.0), values.get("Cached", 0.0)


@cache
def count_fields() -> tuple[Field, ...]:
    """The fields of a row's (or the total's) page counts, in every cachestat and cachetop record."""
    dirtied = PageCacheCollector.btf().struct("cache_counts").field("dirtied").type
    return (
        Field("lookups", "int", "pages", "pages asked of the page cache by reads and mmap faults"),
        Field("hits", "int", "pages", "lookups - misses"),
        Field("misses", "int", "pages", "pages brought in for the lookups (read-ahead included)"),
        Field("hit_ratio", "float", "%", "hits / lookups; null without lookups", nullable=True),
        btf_field("dirtied", dirtied, unit="pages", doc="pages marked dirty"),
    )


def count_values(c: CacheCounts) -> dict[str, Any]:
    """A CacheCounts as the values of count_fields()."""
    return {
        "lookups": c.lookups,
        "hits": c.hits,
        "misses": c.misses,
        "hit_ratio": rounded(c.hit_ratio),
        "dirtied": c.dirtied,
    }


@cache
def cachestat_schemas() -> tuple[Schema, Schema]:
    """cachestat's records: the page cache over an interval, and a process's share of it."""
    counts = count_fields()
    total = Schema(
        "cachestat",
        (
            *counts,
            Field("ahead", "int", "pages", "pages read ahead beyond this interval's lookups"),
            Field("buffers_mb", "float", "MB", "Buffers in /proc/meminfo at the end of the interval"),
            Field("cached_mb", "float", "MB", "Cached in /proc/meminfo at the end of the interval"),
        ),
        doc="The page cache over an interval (system-wide, or the tasks -p or --cgroup select).",
        interval=True,
    )
    process = Schema(
        "cachestat.process",
        (PID, COMM, *counts, Field("misses_per_s", "float", "/s", "misses per second of the interval")),
        doc="One process's page-cache use over an interval, the processes missing most first.",
        interval=True,
    )
    return total, process


@dataclass
class PageCacheSample(Sample):
    """The page cache over one interval (counts in pages of PAGE_SIZE bytes)."""

    ts: float
    interval_s: float
    elapsed_s: float  # since the collector started (for views)
    counts: CacheCounts
    buffers_mb: float
    cached_mb: float
    rows: list[CacheRow] = field(default_factory=list)  # active rows, most misses first
    processes: int = 0  # rows given as cachestat.process records

    @property
    def lookups(self) -> int:
        return self.counts.lookups

    @property
    def hits(self) -> int:
        return self.counts.hits

    @property
    def misses(self) -> int:
        return self.counts.misses

    @property
    def hit_ratio(self) -> float | None:
        """Percent; None without lookups."""
        return self.counts.hit_ratio

    @property
    def dirtied(self) -> int:
        return self.counts.dirtied

    @property
    def ahead(self) -> int:
        return self.counts.ahead

    @property
    def lookups_s(self) -> float:
        return self.lookups / self.interval_s

    @property
    def misses_s(self) -> float:
        return self.misses / self.interval_s

    def records(self) -> Iterator[dict[str, Any]]:
        total, process = cachestat_schemas()
        common = {"ts": self.ts, "interval_s": round(self.interval_s, 6)}
        yield total.record(
            {
                **common,
                **count_values(self.counts),
                "ahead": self.ahead,
                "buffers_mb": round(self.buffers_mb, 1),
                "cached_mb": round(self.cached_mb, 1),
            }
        )
        for row in self.rows[: self.processes]:
            yield process.record(
                {
                    **common,
                    "pid": row.key.tgid,
                    "comm": row.key.comm,
                    **count_values(row.counts),
                    "misses_per_s": round(row.counts.misses / self.interval_s, 1),
                }
            )


@dataclass
class Snapshot:
    t_ns: int  # when the totals were read (CLOCK_MONOTONIC)
    ts: float  # the same moment, wall-clock
    total: CacheCounts
    rows: dict[RowKey, CacheCounts]
    raw_keys: dict[RowKey, bytes]  # each row's key as the map has it (comm bytes not always UTF-8)


def snapshot(obj: BpfObject) -> Snapshot:
    total_values = obj.maps["cache_total"].lookup(0)
    # Timed after the read: the first one builds the map's numpy layout, which takes a while.
    t_ns, ts = time.monotonic_ns(), time.time()
    # Per-CPU counters: one value per CPU, summed.
    total = CacheCounts.from_record({f: total_values[f].sum() for f in CacheCounts.__dataclass_fields__})
    keys, values = obj.maps["cache_rows"].items()
    rows, raw_keys = {}, {}
    for k, v in zip(keys, values, strict=True):
        key = _row_key(k)
        rows[key] = CacheCounts.from_record(v)
        raw_keys[key] = k.tobytes()
    return Snapshot(t_ns, ts, total, rows, raw_keys)


def _row_key(k: np.void) -> RowKey:
    comm = bytes(k["comm"]).split(b"\0", 1)[0].decode(errors="replace")
    s_dev = int(k["dev"])
    return RowKey(int(k["tgid"]), comm, st_dev(s_dev) if s_dev else 0, int(k["ino"]))


class PageCacheCollector(BpfCollector[C]):
    """Page-cache lookups, hits, misses and dirtied pages, system-wide or for the tasks the configuration
    selects, with a row per process (``by_file``: per process and file). Each ``sample()`` covers the time
    since the previous one (or ``start()``). cachestat and cachetop are its two configurations."""

    bpf_object = "cachestat"
    # The lookup and dirtying programs are BTF tracepoints (BPF_PROG_TYPE_TRACING, which libbpf cannot
    # probe alone: raw tracepoints stand in); page additions a classic one, whose record carries the
    # folio's order.
    requires = ("tracepoint", "raw_tracepoint")
    loss_counters = {
        "cache_rows_dropped": ("map_full", "events not in any row (too many rows; totals include them)")
    }
    by_file: ClassVar[bool] = False
    PROGRAMS = frozenset({"cache_get_pages", "cache_map_pages", "cache_fault", "cache_add", "cache_dirty"})
    NAMING_PROGRAM = "cache_name_file"  # the dentry names of files (per-file rows only)

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return cachestat_schemas()

    def rodata(self) -> dict[str, Any]:
        return {**super().rodata(), "cache_by_file": self.by_file}

    def autoload(self) -> set[str]:
        return set(self.PROGRAMS | {self.NAMING_PROGRAM} if self.by_file else self.PROGRAMS)

    def max_entries(self) -> dict[str, int]:
        # The names are for per-file rows alone: without them one slot is all their maps need.
        return {} if self.by_file else {"cache_names": 1, "cache_name_scratch": 1}

    def start(self) -> None:
        assert self.obj is not None
        snapshot(self.obj)  # the first read builds the maps' numpy layouts: not inside the interval
        self._prev = snapshot(self.obj)
        self._start_ns = self._prev.t_ns

    def start_from_attach(self) -> None:
        self._prev = Snapshot(time.monotonic_ns(), time.time(), CacheCounts(), {}, {})
        self._start_ns = self._prev.t_ns

    def interval(self) -> PageCacheSample:
        """What the page cache did since the previous sample (or start), every active row included."""
        assert self.obj is not None
        cur, prev = snapshot(self.obj), self._prev
        self._prev = cur
        rows = []
        for key, counts in cur.rows.items():
            before = prev.rows.get(key)
            diff = counts if before is None else counts - before
            if diff.active:
                rows.append(CacheRow(key, diff))
        rows.sort(key=lambda r: (r.counts.misses, r.counts.lookups), reverse=True)
        self._evict_exited(cur, prev)
        buffers, cached = meminfo_mb()
        return PageCacheSample(
            ts=cur.ts,
            interval_s=max((cur.t_ns - prev.t_ns) / 1e9, 1e-9),
            elapsed_s=(cur.t_ns - self._start_ns) / 1e9,
            counts=cur.total - prev.total,
            buffers_mb=buffers,
            cached_mb=cached,
            rows=rows,
        )

    def file_names(self) -> dict[tuple[int, int], tuple[list[str], bool]]:
        """(st_dev, ino) -> (names from the file system's root down, whether the root was reached), from
        the dentry chains the kernel recorded (per-file rows only)."""
        assert self.obj is not None
        out = {}
        keys, values = self.obj.maps["cache_names"].items()
        for k, v in zip(keys, values, strict=True):
            depth = int(v["depth"])
            names = [bytes(n).split(b"\0", 1)[0].decode(errors="replace") for n in v["names"][:depth]]
            complete = bool(v["complete"])
            if complete:
                names = names[:-1]  # the root's own name, "/"
            out[(st_dev(int(k["dev"])), int(k["ino"]))] = (names[::-1], complete)
        return out

    def _evict_exited(self, cur: Snapshot, prev: Snapshot) -> None:
        """Rows of processes that exited and did nothing since the last sample make room in the map: such
        a process can add nothing more, and the totals do not depend on rows."""
        assert self.obj is not None
        cache_rows = self.obj.maps["cache_rows"]
        for key, counts in list(cur.rows.items()):
            if not key.tgid or prev.rows.get(key) != counts or Path(f"/proc/{key.tgid}").exists():
                continue
            # The key's own bytes: one rebuilt from the decoded comm would miss a name that is not UTF-8,
            # and a row left in the map but dropped here would show all its counts again next time.
            if cache_rows.delete(cur.raw_keys[key]):
                del cur.rows[key]
