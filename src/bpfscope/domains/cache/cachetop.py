"""bpfscope cachetop: the files (or processes) that miss the page cache most, per interval, like top.

The counting is cachestat's (core/cache.py: lookups from filemap:mm_filemap_get_pages, map_pages and
fault; misses from filemap:mm_filemap_add_to_page_cache; read-ahead counted as a miss when read), kept in
the kernel per process and file: the file is the (s_dev, i_ino) pair the tracepoints carry.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.cache.pagecache import CacheCounts, CacheRow, CacheSample, CacheSampler
from bpfscope.sinks import top

DEFAULT_INTERVAL = 1.0


@dataclass
class Group:
    """Rows summed over files (one process) or over processes (one file)."""

    dev: int
    ino: int
    tgid: int
    comm: str
    counts: CacheCounts = field(default_factory=CacheCounts)
    members: list[CacheRow] = field(default_factory=list)

    def add(self, row: CacheRow) -> None:
        self.counts = self.counts + row.counts
        self.members.append(row)

    @property
    def worst(self) -> CacheRow:
        return max(self.members, key=lambda r: (r.counts.misses, r.counts.lookups))


SORTS = {
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

    def __init__(self, sampler: CacheSampler) -> None:
        self.sampler = sampler
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
        return f"[{os.major(group.dev)}:{os.minor(group.dev)} inode {group.ino}]"


class Screen(top.Screen):
    def __init__(
        self,
        opts: RunOptions,
        sampler: CacheSampler,
        processes: bool,
        sort: str,
        max_rows: int,
        noclear: bool,
    ) -> None:
        super().__init__(opts, noclear, sort, max_rows)
        self.processes = processes
        self.resolver = PathResolver(sampler)
        self.sampler = sampler

    def show(self, sample: CacheSample, elapsed: float) -> None:
        groups = by_process(sample.rows) if self.processes else by_file(sample.rows)
        groups = sorted(groups, key=SORTS[self.sort], reverse=True)[: self.max_rows]
        self.resolver.new_interval()
        names = self.sampler.file_names() if groups and not self.processes else {}
        table: list[list[Any]] = []
        out = self.opts.output
        for g in groups:
            c = g.counts
            ratio = None if c.hit_ratio is None else round(c.hit_ratio, 2)
            counts = {"lookups": c.lookups, "hits": c.hits, "misses": c.misses, "hit_ratio": ratio}
            if self.processes:
                record = {"pid": g.tgid, "comm": g.comm, "files": len(g.members), **counts}
                table.append([g.tgid, g.comm, len(g.members), c.lookups, c.misses, ratio, c.dirtied])
            else:
                # The process missing most on the file stands for it (in JSON too: pid and comm).
                worst, path = g.worst.key, self.resolver.path(g, names)
                record = {"path": path, "dev": g.dev, "ino": g.ino, "pid": worst.tgid, "comm": worst.comm}
                record.update(counts)
                table.append([c.lookups, c.misses, ratio, c.dirtied, f"{worst.comm}[{worst.tgid}]", path])
            if self.opts.as_json:
                out.record({"elapsed_s": round(elapsed, 3), **record, "dirtied": c.dirtied})
        if self.opts.as_json:
            return
        if self.processes:
            columns = ["PID", "COMM", "FILES", "LOOKUPS", "MISSES", "HIT%", "DIRTIED"]
        else:
            columns = ["LOOKUPS", "MISSES", "HIT%", "DIRTIED", "PROCESS", "FILE"]
        ratio = "-" if sample.hit_ratio is None else f"{sample.hit_ratio:.1f}%"
        heading = (
            f"{elapsed:.1f}s  lookups {sample.lookups}  misses {sample.misses}  hit ratio {ratio}  "
            f"cached {sample.cached_mb:.0f} MB  sorted by {self.sort}"
        )
        self.frame(heading, columns, table, "no page-cache activity")


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
@click.option("-P", "--processes", is_flag=True, help="One row per process instead of per file.")
@top.top_options(
    sorted(SORTS), "misses", "Sort by misses, lookups, dirtied pages, or lowest hit ratio first."
)
@tool_options
def command(opts: RunOptions, processes: bool, sort: str, max_rows: int, noclear: bool) -> None:
    """Files (or processes, -P) that miss the page cache most, per interval (1 s by default): lookups,
    misses, hit ratio and dirtied pages, with the file's path and the process missing most on it.
    """
    with CacheSampler(pid=opts.pid, cgroup=opts.cgroup, by_file=True) as sampler:
        screen = Screen(opts, sampler, processes, sort, max_rows, noclear)
        for elapsed in ticks(opts, "Tracing page cache by file... Ctrl-C to end.", DEFAULT_INTERVAL):
            screen.show(sampler.sample(), elapsed)
        opts.output.note(f"cachetop: {sampler.losses()}")
