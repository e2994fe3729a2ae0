"""Page-cache efficiency from tracepoints, shared by cachestat, cachetop and the health check.

Method (the kernel side is include/cache.bpf.h):

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
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpfscope.cli.tool import cgroup_id
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.runtime.sampler import Counts

if TYPE_CHECKING:
    import numpy as np

# The lookup and dirtying programs are BTF tracepoints (BPF_PROG_TYPE_TRACING, which libbpf cannot probe
# alone: raw tracepoints stand in); page additions a classic one, whose record carries the folio's order.
REQUIRES = ("tracepoint", "raw_tracepoint")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MEMINFO = Path("/proc/meminfo")


def kernel_dev_to_user(s_dev: int) -> int:
    """A superblock's s_dev as the kernel keeps it (major << 20 | minor) as os.stat's st_dev."""
    return os.makedev(s_dev >> 20, s_dev & 0xFFFFF)


@dataclass(frozen=True)
class CacheCounts(Counts):
    """Cumulative page counts of one row (or the total), as the kernel keeps them."""

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
    dev: int  # st_dev form (os.makedev); 0 when rows are per process only
    ino: int


@dataclass(frozen=True)
class CacheRow:
    """One process (or one process and file) over an interval."""

    key: RowKey
    counts: CacheCounts

    def to_dict(self, interval_s: float) -> dict[str, Any]:
        c = self.counts
        return {
            "pid": self.key.tgid,
            "comm": self.key.comm,
            "lookups": c.lookups,
            "hits": c.hits,
            "misses": c.misses,
            "hit_ratio": _round(c.hit_ratio),
            "dirtied": c.dirtied,
            "misses_s": round(c.misses / interval_s, 1),
        }


def _round(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(v, digits)


def meminfo_mb() -> tuple[float, float]:
    """Buffers and Cached from /proc/meminfo, in MB (MiB), as free(1) and BCC's cachestat show them."""
    values = {}
    for line in MEMINFO.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Buffers", "Cached"):
            values[name] = int(rest.split()[0]) / 1024
    return values.get("Buffers", 0.0), values.get("Cached", 0.0)


@dataclass
class CacheSample:
    """The page cache over one interval (counts in pages of PAGE_SIZE bytes)."""

    lookups: int
    hits: int
    misses: int
    hit_ratio: float | None  # percent; None without lookups
    dirtied: int
    buffers_mb: float
    cached_mb: float
    interval_s: float
    ahead: int = 0  # pages read ahead beyond this interval's lookups
    counts: CacheCounts = field(default_factory=CacheCounts)
    rows: list[CacheRow] = field(default_factory=list)  # active rows, most misses first

    @property
    def lookups_s(self) -> float:
        return self.lookups / self.interval_s

    @property
    def misses_s(self) -> float:
        return self.misses / self.interval_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "lookups": self.lookups,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": _round(self.hit_ratio),
            "dirtied": self.dirtied,
            "buffers_mb": round(self.buffers_mb, 1),
            "cached_mb": round(self.cached_mb, 1),
            "interval_s": round(self.interval_s, 3),
            "ahead": self.ahead,
        }


@dataclass
class _Snapshot:
    t_ns: int
    total: CacheCounts
    rows: dict[RowKey, CacheCounts]
    raw_keys: dict[RowKey, bytes]  # each row's key as the map has it (comm bytes not always UTF-8)


class CacheSampler:
    """Page-cache lookups, hits, misses and dirtied pages, system-wide or for one process (``pid``) or
    cgroup v2 directory (``cgroup``); ``by_file`` keeps rows per process and file (cachetop)::

        with CacheSampler() as sampler:
            time.sleep(5)
            s = sampler.sample()        # since the sampler started (or the previous sample)
            print(s.hit_ratio, s.misses, s.rows[0].key.comm)
    """

    def __init__(self, pid: int | None = None, cgroup: str | None = None, by_file: bool = False) -> None:
        require(*REQUIRES)
        rodata = {
            "bs_targ_tgid": pid or 0,
            "bs_targ_cgroup": cgroup_id(cgroup) if cgroup else 0,
            "cache_by_file": by_file,
        }
        self.by_file = by_file
        programs = {"cache_get_pages", "cache_map_pages", "cache_fault", "cache_add", "cache_dirty"}
        self._obj = BpfObject(
            tool_object("cachetop" if by_file else "cachestat"),
            rodata=rodata,
            autoload=programs | {"cache_name_file"} if by_file else programs,
            # Names are cachetop's alone: without them one slot is all the map needs.
            max_entries=None if by_file else {"cache_names": 1, "cache_name_scratch": 1},
        )
        try:
            self._obj.attach()
            self._snapshot()  # the first read builds the maps' numpy layouts: not inside an interval
            self._prev = self._snapshot()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None  # type: ignore[assignment]

    def __enter__(self) -> CacheSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def losses(self) -> str:
        dropped = int(self._obj.bss["cache_rows_dropped"])
        extra = f"; {dropped} events not in any row (too many rows; totals include them)" if dropped else ""
        return self._obj.losses() + extra

    def _snapshot(self) -> _Snapshot:
        t_ns = time.monotonic_ns()
        total_values = self._obj.maps["cache_total"].lookup(0)
        # Per-CPU counters: one value per CPU, summed.
        total = CacheCounts.from_record({f: total_values[f].sum() for f in CacheCounts.__dataclass_fields__})
        keys, values = self._obj.maps["cache_rows"].items()
        rows, raw_keys = {}, {}
        for k, v in zip(keys, values, strict=True):
            key = _row_key(k)
            rows[key] = CacheCounts.from_record(v)
            raw_keys[key] = k.tobytes()
        return _Snapshot(t_ns, total, rows, raw_keys)

    def restart(self) -> None:
        """Forget what came before: the next sample starts now."""
        self._prev = self._snapshot()

    def sample(self) -> CacheSample:
        """What the page cache did since the previous sample (or since the sampler started)."""
        cur, prev = self._snapshot(), self._prev
        self._prev = cur
        itv = max((cur.t_ns - prev.t_ns) / 1e9, 1e-9)
        rows = []
        for key, counts in cur.rows.items():
            before = prev.rows.get(key)
            diff = counts if before is None else counts - before
            if diff.active:
                rows.append(CacheRow(key, diff))
        rows.sort(key=lambda r: (r.counts.misses, r.counts.lookups), reverse=True)
        self._evict_exited(cur, prev)
        total = cur.total - prev.total
        buffers, cached = meminfo_mb()
        return CacheSample(
            lookups=total.lookups,
            hits=total.hits,
            misses=total.misses,
            hit_ratio=total.hit_ratio,
            dirtied=total.dirtied,
            buffers_mb=buffers,
            cached_mb=cached,
            interval_s=itv,
            ahead=total.ahead,
            counts=total,
            rows=rows,
        )

    def file_names(self) -> dict[tuple[int, int], tuple[list[str], bool]]:
        """(st_dev, ino) -> (names from the file system's root down, whether the root was reached), from the
        dentry chains the kernel recorded (cachetop only)."""
        out = {}
        keys, values = self._obj.maps["cache_names"].items()
        for k, v in zip(keys, values, strict=True):
            depth = int(v["depth"])
            names = [bytes(n).split(b"\0", 1)[0].decode(errors="replace") for n in v["names"][:depth]]
            complete = bool(v["complete"])
            if complete:
                names = names[:-1]  # the root's own name, "/"
            out[(kernel_dev_to_user(int(k["dev"])), int(k["ino"]))] = (names[::-1], complete)
        return out

    def _evict_exited(self, cur: _Snapshot, prev: _Snapshot) -> None:
        """Rows of processes that exited and did nothing since the last sample make room in the map: such
        a process can add nothing more, and the totals do not depend on rows."""
        cache_rows = self._obj.maps["cache_rows"]
        for key, counts in list(cur.rows.items()):
            if not key.tgid or prev.rows.get(key) != counts or Path(f"/proc/{key.tgid}").exists():
                continue
            # The key's own bytes: one rebuilt from the decoded comm would miss a name that is not UTF-8,
            # and a row left in the map but dropped here would show all its counts again next time.
            if cache_rows.delete(cur.raw_keys[key]):
                del cur.rows[key]


def _row_key(k: np.void) -> RowKey:
    comm = bytes(k["comm"]).split(b"\0", 1)[0].decode(errors="replace")
    s_dev = int(k["dev"])
    return RowKey(int(k["tgid"]), comm, kernel_dev_to_user(s_dev) if s_dev else 0, int(k["ino"]))
