"""bpfscope filetop: the files read and written most, per process, per interval, like top.

The kernel side (filetop.bpf.c) counts, per process and file (device, inode), the read- and write-family
system calls that succeeded (read, pread64, readv, preadv, preadv2 and their write twins) and the bytes
they returned, and walks each file's path from its dentry once, when the file is first seen: the path
is right for files closed or deleted since, which a user-space lookup of /proc/PID/fd could not name.
Each interval shows the counters' differences, so nothing falls between two reads.

These are the bytes the system calls moved, whether the page cache served them or a disk did: what a
process asked of its files, not disk I/O (biotop shows that). mmap() page faults, io_uring, sendfile,
splice and copy_file_range are not seen. bpfscope's own calls are left out unless asked.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import click

from bpfscope.cli.options import Run, common_options, top_options
from bpfscope.domains.cache.vfs import dev_text, present_tracepoints_only, st_dev
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample
from bpfscope.runtime.schema import COMM, PID, Field, Schema, btf_field, btf_fields
from bpfscope.sinks.terminal import Terminal, View, loadavg

File = tuple[int, int]  # (st_dev, ino)
Key = tuple[int, int, int]  # (tgid, st_dev, ino)
COUNTERS = ("reads", "writes", "read_bytes", "write_bytes")  # struct file_stats' counters


@dataclass
class FileRow:
    pid: int
    comm: str
    dev: int  # st_dev
    ino: int
    mode: int  # i_mode: the file's type
    path: str
    reads: int
    writes: int
    read_bytes: int
    write_bytes: int

    @property
    def kind(self) -> str:
        """R regular, S socket, P pipe, O other: BCC filetop's TYPE column (P added)."""
        if stat.S_ISREG(self.mode):
            return "R"
        if stat.S_ISSOCK(self.mode):
            return "S"
        return "P" if stat.S_ISFIFO(self.mode) else "O"

    @property
    def calls(self) -> int:
        return self.reads + self.writes

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def minus(self, before: FileRow) -> FileRow:
        return replace(self, **{name: getattr(self, name) - getattr(before, name) for name in COUNTERS})


SORTS: dict[str, Callable[[FileRow], tuple[int, int]]] = {
    "bytes": lambda r: (r.bytes, r.calls),
    "rbytes": lambda r: (r.read_bytes, r.reads),
    "wbytes": lambda r: (r.write_bytes, r.writes),
    "calls": lambda r: (r.calls, r.bytes),
    "reads": lambda r: (r.reads, r.read_bytes),
    "writes": lambda r: (r.writes, r.write_bytes),
}


def _cstr(raw: Any) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def _path(record: Any, mode: int) -> str:
    """The path from the kernel's walk (names from the file up); names it could not reach, '...'. A file
    without one ('?') was first seen while the paths map was full."""
    names = [_cstr(record["names"][i]) for i in range(int(record["depth"]))]
    if not names:
        return "[socket]" if stat.S_ISSOCK(mode) else "[pipe]" if stat.S_ISFIFO(mode) else "?"
    return ("..." if record["truncated"] else "") + "/" + "/".join(reversed(names))


@cache
def filetop_schema() -> Schema:
    btf = FiletopCollector.btf()
    return Schema(
        "filetop",
        (
            PID,
            COMM,
            Field("type", "enum", values=("R", "S", "P", "O"), doc="regular file, socket, pipe, other"),
            Field("dev", "str", label=True, doc="the file's file system device, major:minor"),
            btf_field("ino", btf.struct("file_key").field("ino").type, label=True, doc="its inode number"),
            Field("path", "str", label=True, doc="as the kernel walked it when the file was first seen"),
            *btf_fields(btf.struct("file_stats"), only=COUNTERS),
        ),
        doc="One process's successful reads and writes of one file over an interval.",
        interval=True,
    )


@dataclass
class Snapshot:
    """The maps at one moment: rows, and each row's and path's key as the map has it (to delete it)."""

    rows: dict[Key, FileRow] = field(default_factory=dict)
    keys: dict[Key, bytes] = field(default_factory=dict)
    path_keys: dict[File, bytes] = field(default_factory=dict)


@dataclass
class FiletopSample(Sample):
    ts: float
    interval_s: float
    elapsed_s: float  # since the collector started (for views)
    rows: list[FileRow]  # the first ``rows`` by the sort

    def records(self) -> Iterator[dict[str, Any]]:
        schema = filetop_schema()
        for r in self.rows:
            values = {name: getattr(r, name) for name in ("pid", "comm", "ino", "path", *COUNTERS)}
            yield schema.record(
                {"ts": self.ts, "interval_s": round(self.interval_s, 6), **values}
                | {"type": r.kind, "dev": dev_text(r.dev)}
            )


@dataclass(kw_only=True)
class FiletopConfig(Config):
    all_files: bool = False  # pipes, sockets and devices too, not only regular files
    sort: str = "bytes"  # a key of SORTS
    rows: int = 20  # rows kept, the first by ``sort``


class FiletopCollector(BpfCollector[FiletopConfig]):
    """Each (process, file)'s calls and bytes since the previous sample, the first ``rows`` by ``sort``."""

    name = "filetop"
    bpf_object = "filetop"
    requires = ("tracepoint",)
    default_interval_s = 1.0
    loss_counters = {
        "files_dropped": ("map_full", "calls not counted (too many files)"),
        "paths_dropped": ("map_full", "files left without a path (too many files)"),
        "calls_unseen": ("unseen", "calls not counted (no task storage for the thread)"),
    }

    def __init__(self, config: FiletopConfig) -> None:
        if config.sort not in SORTS:
            raise BpfscopeError(f"filetop sorts by {', '.join(SORTS)}, not {config.sort!r}")
        super().__init__(config)
        self._paths: dict[File, str] = {}
        self._before = Snapshot()
        self._start = self._t = time.monotonic()

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return (filetop_schema(),)

    def rodata(self) -> dict[str, Any]:
        return {**super().rodata(), "all_files": self.config.all_files}

    def configure(self) -> None:
        assert self.obj is not None
        present_tracepoints_only(self.obj)

    def start(self) -> None:
        self._snapshot()  # the first read builds the maps' numpy layouts: not inside the interval
        self._before = self._snapshot()
        self._start = self._t = time.monotonic()

    def start_from_attach(self) -> None:
        self._before = Snapshot()
        self._start = self._t = time.monotonic()

    def _snapshot(self) -> Snapshot:
        assert self.obj is not None
        snap = Snapshot()
        pkeys, pvalues = self.obj.maps["paths"].items()
        walked = {}
        for k, v in zip(pkeys, pvalues, strict=True):
            file = (st_dev(int(k["dev"])), int(k["ino"]))
            walked[file] = v
            snap.path_keys[file] = k.tobytes()
        keys, values = self.obj.maps["files"].items()
        for k, v in zip(keys, values, strict=True):
            file, mode = (st_dev(int(k["dev"])), int(k["ino"])), int(v["mode"])
            if file not in self._paths and file in walked:
                # The kernel adds the path just after the row: a row read first gets it next time.
                self._paths[file] = _path(walked[file], mode)
            key = (int(k["tgid"]), *file)
            counters = {name: int(v[name]) for name in COUNTERS}
            path = self._paths.get(file, "?")
            snap.rows[key] = FileRow(key[0], _cstr(v["comm"]), *file, mode, path, **counters)
            snap.keys[key] = k.tobytes()
        return snap

    def sample(self) -> FiletopSample:
        now = self._snapshot()
        t = time.monotonic()
        rows = []
        for key, row in now.rows.items():
            prev = self._before.rows.get(key)
            diff = row if prev is None else row.minus(prev)
            if diff.calls:
                rows.append(diff)
        rows = sorted(rows, key=SORTS[self.config.sort], reverse=True)[: self.config.rows]
        sample = FiletopSample(time.time(), max(t - self._t, 1e-9), t - self._start, rows)
        self._evict_exited(now)
        self._before, self._t = now, t
        return sample

    def _evict_exited(self, now: Snapshot) -> None:
        """Forget the rows of processes that have exited and made no call since the last sample (they can
        make no more), so the map does not fill up over a long run; their paths are dropped with them."""
        assert self.obj is not None
        gone = []
        for key, row in now.rows.items():
            prev = self._before.rows.get(key)
            if prev is not None and prev.calls == row.calls and not Path(f"/proc/{key[0]}").exists():
                gone.append(key)
        for key in gone:
            self.obj.maps["files"].delete(now.keys.pop(key))
            del now.rows[key]
        still_used = {key[1:] for key in now.rows}
        for file in {key[1:] for key in gone} - still_used:
            if file in now.path_keys:
                self.obj.maps["paths"].delete(now.path_keys.pop(file))
            self._paths.pop(file, None)


def _kib(n: int) -> float:
    return round(n / 1024, 1)


class FiletopView(View):
    top = True

    def __init__(self, sort: str, noclear: bool) -> None:
        self.sort, self.noclear = sort, noclear

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, FiletopSample)
        term.heading(f"{sample.elapsed_s:.1f}s  {loadavg()}  sorted by {self.sort}")
        if not sample.rows:
            term.line("no file reads or writes")
            return
        term.table(
            ["PID", "COMM", "READS", "WRITES", "R kB", "W kB", "T", "FILE"],
            [
                [r.pid, r.comm, r.reads, r.writes, _kib(r.read_bytes), _kib(r.write_bytes), r.kind, r.path]
                for r in sample.rows
            ],
        )


EXAMPLES = """
\b
Examples:
  bpfscope filetop                  # refresh every second until Ctrl-C
  bpfscope filetop -s wbytes 5      # by bytes written, every 5 seconds
  bpfscope filetop -a -C 1 10       # all files (pipes, sockets, devices), no clearing, 10 times
  bpfscope filetop -p 1234 --json   # one process, JSON lines
"""


@click.command(name="filetop", epilog=EXAMPLES)
@click.option("-a", "--all-files", is_flag=True, help="All files, not only regular ones.")
@top_options(
    list(SORTS), "bytes", "Sort by bytes (read + written), bytes read or written, calls, reads or writes."
)
@common_options
def command(run: Run, all_files: bool, sort: str, max_rows: int, noclear: bool) -> None:
    """Top files by bytes read and written, per process, per interval (1 s by default), with their paths.

    Counts the read and write system calls that succeeded (read, pread64, readv, preadv, preadv2, and the
    write ones) and the bytes they returned: page-cache hits included, mmap(), io_uring, sendfile and
    splice not seen. Regular files only, unless -a.
    """
    config = run.config(FiletopConfig, all_files=all_files, sort=sort, rows=max_rows)
    view = FiletopView(sort, noclear)
    run.run(FiletopCollector(config), view, "Tracing file reads and writes... Ctrl-C to end.")
