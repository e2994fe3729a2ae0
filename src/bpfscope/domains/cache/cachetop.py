"""bpfscope cachetop: the files (or processes) that miss the page cache most, per interval, like top.

The counting is cachestat's (pagecache.py: lookups from filemap:mm_filemap_get_pages, map_pages and
fault; misses from filemap:mm_filemap_add_to_page_cache; read-ahead counted as a miss when read), on the
same BPF object configured to keep rows per process and file: the file is the (s_dev, i_ino) pair the
tracepoints carry.

Paths are found in two ways, the first that answers wins:

1. by inode, among the files the processes on the row hold open (/proc/PID/fd) or have mapped
   (/proc/PID/maps): the path the process itself used, exact, and free for the kernel;
2. for files already closed when the interval ends (a short ``cat``, a compiler's headers), from the
   kernel: the first time a file gets a page, a tp_btf program on mm_filemap_add_to_page_cache walks its
   dentry up to the file system's root (at most 12 names; a deeper path shows as ``.../its/last/12/names``),
   and user space puts it under the mount point of its device. A file that only hits and is closed by
   then has no name: it shows as ``[major:minor inode N]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import click

from bpfscope.cli.options import Run, common_options, option, top_options
from bpfscope.domains.cache.pagecache import (
    CacheCounts,
    CacheRow,
    PageCacheCollector,
    PageCacheSample,
    count_fields,
    count_values,
    rounded,
)
from bpfscope.domains.cache.vfs import dev_text
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import Config, Sample
from bpfscope.runtime.schema import COMM, PID, Field, Schema, btf_field
from bpfscope.sinks.terminal import Terminal, View


@dataclass
class Group:
    """Rows summed over processes (one file) or over files (one process)."""

    dev: int  # st_dev; 0 for a process
    ino: int
    tgid: int  # 0 for a file
    comm: str
    counts: CacheCounts = field(default_factory=CacheCounts)
    members: list[CacheRow] = field(default_factory=list)
    path: str = ""  # a file's

    def add(self, row: CacheRow) -> None:
        self.counts = self.counts + row.counts
        self.members.append(row)

    @property
    def worst(self) -> CacheRow:
        """The member missing most: the process that stands for a file."""
        return max(self.members, key=lambda r: (r.counts.misses, r.counts.lookups))


SORTS: dict[str, Callable[[Group], tuple[float, float]]] = {
    "misses": lambda g: (g.counts.misses, g.counts.lookups),
    "lookups": lambda g: (g.counts.lookups, g.counts.misses),
    "dirtied": lambda g: (g.counts.dirtied, g.counts.misses),
    # Lowest hit ratio first; among equals, the most misses.
    "hit": lambda g: (-(g.counts.hit_ratio if g.counts.hit_ratio is not None else 101.0), g.counts.misses),
}


def by_file(rows: list[CacheRow]) -> list[Group]:
    groups: dict[tuple[int, int], Group] = {}
    for row in rows:
        key = (row.key.dev, row.key.ino)
        if key not in groups:
            groups[key] = Group(row.key.dev, row.key.ino, 0, "")
        groups[key].add(row)
    return list(groups.values())


def by_process(rows: list[CacheRow]) -> list[Group]:
    groups: dict[tuple[int, str], Group] = {}
    for row in rows:
        key = (row.key.tgid, row.key.comm)
        if key not in groups:
            groups[key] = Group(0, 0, row.key.tgid, row.key.comm)
        groups[key].add(row)
    return list(groups.values())


def _mount_points() -> dict[int, str]:
    """st_dev -> where the root of that file system is mounted (the first such mount)."""
    out: dict[int, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        major, minor = (int(x) for x in parts[2].split(":"))
        dev = os.makedev(major, minor)
        if parts[3] == "/" and dev not in out:
            out[dev] = parts[4].replace("\\040", " ")
    return out


class PathResolver:
    """(st_dev, ino) -> path: open descriptors and mappings of the processes involved first, then the
    dentry names the kernel recorded (see the module docstring)."""

    def __init__(self) -> None:
        self.known: dict[tuple[int, int], str] = {}
        self.mounts = _mount_points()
        self._scanned: set[int] = set()

    def new_interval(self) -> None:
        self._scanned.clear()  # processes open other files as they go

    def _scan(self, pid: int) -> None:
        if pid in self._scanned:
            return
        self._scanned.add(pid)
        try:
            with os.scandir(f"/proc/{pid}/fd") as fds:
                for entry in fds:
                    try:
                        st = os.stat(entry.path)
                        self.known.setdefault((st.st_dev, st.st_ino), os.readlink(entry.path))
                    except OSError:
                        continue  # closed meanwhile, or not a file
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return  # the process has exited
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                self.known.setdefault((os.makedev(major, minor), int(parts[4])), parts[5])

    def path(self, group: Group, kernel_names: dict[tuple[int, int], tuple[list[str], bool]]) -> str:
        key = (group.dev, group.ino)
        if key not in self.known:
            for row in group.members:
                self._scan(row.key.tgid)
        if key in self.known:
            return self.known[key]
        if key in kernel_names:
            names, complete = kernel_names[key]
            mount = self.mounts.get(group.dev)
            if complete and mount is not None:
                return os.path.join(mount, *names)
            return os.path.join("...", *names)
        return f"[{dev_text(group.dev)} inode {group.ino}]"


@cache
def cachetop_schemas() -> tuple[Schema, Schema]:
    """cachetop's records: one per file (the process missing most on it named), or per process (-P)."""
    key = CachetopCollector.btf().struct("cache_key")
    counts = count_fields()
    file = Schema(
        "cachetop",
        (
            Field("path", "str", label=True, doc="the file's path, or [major:minor inode N]"),
            Field("dev", "str", label=True, doc="its file system's device, major:minor"),
            btf_field("ino", key.field("ino").type, label=True, doc="its inode number"),
            replace(PID, doc="the process missing most on the file"),
            COMM,
            *counts,
        ),
        doc="One file's page-cache use over an interval, the files missing most first.",
        interval=True,
    )
    process = Schema(
        "cachetop.process",
        (PID, COMM, Field("files", "int", doc="files the process used the page cache of"), *counts),
        doc="One process's page-cache use over an interval (-P), the processes missing most first.",
        interval=True,
    )
    return file, process


@dataclass(kw_only=True)
class CachetopConfig(Config):
    per_process: bool = False  # a row per process instead of per file
    sort: str = "misses"  # a key of SORTS
    rows: int = 20  # rows kept, the first by ``sort``


@dataclass
class CachetopSample(Sample):
    cache: PageCacheSample  # the whole page cache over the interval (every row)
    groups: list[Group]  # the files (or processes) shown, in order, with their paths
    per_process: bool

    @property
    def ts(self) -> float:  # type: ignore[override]
        return self.cache.ts

    @property
    def interval_s(self) -> float:
        return self.cache.interval_s

    def records(self) -> Iterator[dict[str, Any]]:
        file, process = cachetop_schemas()
        common = {"ts": self.ts, "interval_s": round(self.interval_s, 6)}
        for g in self.groups:
            counts = count_values(g.counts)
            if self.per_process:
                values = {"pid": g.tgid, "comm": g.comm, "files": len(g.members)}
                yield process.record({**common, **values, **counts})
            else:
                worst = g.worst.key
                values = {"path": g.path, "dev": dev_text(g.dev), "ino": g.ino, "pid": worst.tgid}
                yield file.record({**common, **values, "comm": worst.comm, **counts})


class CachetopCollector(PageCacheCollector[CachetopConfig]):
    """The files (or processes) using the page cache over each interval, the first ``rows`` by ``sort``,
    files with their paths."""

    name = "cachetop"
    by_file = True
    default_interval_s = 1.0

    def __init__(self, config: CachetopConfig) -> None:
        if config.sort not in SORTS:
            raise BpfscopeError(f"cachetop sorts by {', '.join(SORTS)}, not {config.sort!r}")
        super().__init__(config)
        self.resolver = PathResolver()

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return cachetop_schemas()

    def sample(self) -> CachetopSample:
        cache = self.interval()
        groups = by_process(cache.rows) if self.config.per_process else by_file(cache.rows)
        groups = sorted(groups, key=SORTS[self.config.sort], reverse=True)[: self.config.rows]
        if groups and not self.config.per_process:
            self.resolver.new_interval()
            names = self.file_names()
            for g in groups:
                g.path = self.resolver.path(g, names)
        return CachetopSample(cache, groups, self.config.per_process)


class CachetopView(View):
    top = True

    def __init__(self, sort: str, noclear: bool) -> None:
        self.sort, self.noclear = sort, noclear

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, CachetopSample)
        table: list[list[Any]] = []
        for g in sample.groups:
            c = g.counts
            ratio = rounded(c.hit_ratio)
            if sample.per_process:
                table.append([g.tgid, g.comm, len(g.members), c.lookups, c.misses, ratio, c.dirtied])
            else:
                worst = g.worst.key
                table.append([c.lookups, c.misses, ratio, c.dirtied, f"{worst.comm}[{worst.tgid}]", g.path])
        cache = sample.cache
        ratio = "-" if cache.hit_ratio is None else f"{cache.hit_ratio:.1f}%"
        term.heading(
            f"{cache.elapsed_s:.1f}s  lookups {cache.lookups}  misses {cache.misses}  hit ratio {ratio}  "
            f"cached {cache.cached_mb:.0f} MB  sorted by {self.sort}"
        )
        if not table:
            term.line("no page-cache activity")
        elif sample.per_process:
            term.table(["PID", "COMM", "FILES", "LOOKUPS", "MISSES", "HIT%", "DIRTIED"], table)
        else:
            term.table(["LOOKUPS", "MISSES", "HIT%", "DIRTIED", "PROCESS", "FILE"], table)


EXAMPLES = """
\b
Examples:
  bpfscope cachetop                  # files missing most, every second, until Ctrl-C
  bpfscope cachetop -P 5             # processes instead of files, every 5 seconds
  bpfscope cachetop -s hit -r 10 1 3 # lowest hit ratio first, 10 rows, 3 times
  bpfscope cachetop --json -p 1234 2 # one process's files, JSON lines
\b
Counts are pages. A file is its (device, inode); its path is the one a process on the row holds open or
has mapped, else the dentry names the kernel recorded when the file got its first page (12 at most),
else [major:minor inode N]. Read-ahead counts as a miss when read; direct I/O and tmpfs are not seen.
"""


@click.command(name="cachetop", epilog=EXAMPLES)
@option("per_process", help="One row per process instead of per file.")
@top_options(sorted(SORTS), "misses", "Sort by misses, lookups, dirtied pages, or lowest hit ratio first.")
@common_options
def command(run: Run, per_process: bool, sort: str, max_rows: int, noclear: bool) -> None:
    """Files (or processes, -P) that miss the page cache most, per interval (1 s by default): lookups,
    misses, hit ratio and dirtied pages, with the file's path and the process missing most on it.
    """
    config = run.config(CachetopConfig, per_process=per_process, sort=sort, rows=max_rows)
    view = CachetopView(sort, noclear)
    run.run(CachetopCollector(config), view, "Tracing page cache by file... Ctrl-C to end.")
