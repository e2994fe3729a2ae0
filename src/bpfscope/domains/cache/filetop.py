"""bpfscope filetop: the files read and written most, per process, per interval, like top.

The kernel side (filetop.bpf.c) counts, per process and file (device, inode), the read- and write-family
system calls that succeeded (read, pread64, readv, preadv, preadv2 and their write twins) and the bytes
they returned, and walks each file's path from its dentry once, when the file is first seen: the path
is right for files closed or deleted since, which a user-space lookup of /proc/PID/fd could not name.
Each interval shows the counters' differences, so nothing falls between two reads.

These are the bytes the system calls moved, whether the page cache served them or a disk did: what a
process asked of its files, not disk I/O (biotop shows that). mmap() page faults, io_uring, sendfile,
splice and copy_file_range are not seen.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.cache.vfsstat import present_tracepoints_only
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.runtime.sampler import Sampler
from bpfscope.sinks import top

REQUIRES = ("tracepoint",)
DEFAULT_INTERVAL = 1.0

Key = tuple[int, int, int]  # (tgid, dev, ino)


@dataclass
class FileRow:
    pid: int
    comm: str
    dev: int  # kernel encoding: major << 20 | minor
    ino: int
    mode: int
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
        return FileRow(
            self.pid,
            self.comm,
            self.dev,
            self.ino,
            self.mode,
            self.path,
            self.reads - before.reads,
            self.writes - before.writes,
            self.read_bytes - before.read_bytes,
            self.write_bytes - before.write_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "type": self.kind,
            "dev": f"{self.dev >> 20}:{self.dev & 0xFFFFF}",
            "ino": self.ino,
            "path": self.path,
            "reads": self.reads,
            "writes": self.writes,
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
        }


SORTS = {
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


class FileSampler(Sampler):
    """Loads filetop.bpf.c; sample() returns each (process, file)'s calls and bytes since the last one."""

    def __init__(self, rodata: dict[str, Any] | None = None) -> None:
        require(*REQUIRES)
        self.obj = BpfObject(tool_object("filetop"), rodata=rodata)
        present_tracepoints_only(self.obj)
        self._before: dict[Key, FileRow] = {}
        self._paths: dict[tuple[int, int], str] = {}

    def start(self) -> None:
        self.obj.attach()

    def _snapshot(self) -> dict[Key, FileRow]:
        pkeys, pvalues = self.obj.maps["paths"].items()
        records = {(int(k["dev"]), int(k["ino"])): v for k, v in zip(pkeys, pvalues, strict=True)}
        keys, values = self.obj.maps["files"].items()
        rows = {}
        for k, v in zip(keys, values, strict=True):
            key = (int(k["tgid"]), int(k["dev"]), int(k["ino"]))
            mode = int(v["mode"])
            file = key[1:]
            if file not in self._paths and file in records:
                # The kernel adds the path just after the row: a row read first gets it next time.
                self._paths[file] = _path(records[file], mode)
            rows[key] = FileRow(
                key[0],
                _cstr(v["comm"]),
                key[1],
                key[2],
                mode,
                self._paths.get(file, "?"),
                int(v["reads"]),
                int(v["writes"]),
                int(v["read_bytes"]),
                int(v["write_bytes"]),
            )
        return rows

    def sample(self) -> list[FileRow]:
        now = self._snapshot()
        out = []
        for key, row in now.items():
            prev = self._before.get(key)
            diff = row if prev is None else row.minus(prev)
            if diff.calls:
                out.append(diff)
        self._evict_exited(now)
        self._before = now
        return out

    def _evict_exited(self, now: dict[Key, FileRow]) -> None:
        """Forget the rows of processes that have exited and made no call since the last sample (they can
        make no more), so the map does not fill up over a long run; their paths are dropped with them."""
        gone = []
        for key, row in now.items():
            prev = self._before.get(key)
            if prev is not None and prev.calls == row.calls and not Path(f"/proc/{key[0]}").exists():
                gone.append(key)
        if not gone:
            return
        import numpy as np

        files_map = self.obj.maps["files"]
        for key in gone:
            record = np.zeros(1, dtype=files_map.key_dtype)
            record["tgid"], record["dev"], record["ino"] = key
            files_map.delete(record.tobytes())
            del now[key]
        still_open = {key[1:] for key in now}
        paths_map = self.obj.maps["paths"]
        for file in {key[1:] for key in gone} - still_open:
            record = np.zeros(1, dtype=paths_map.key_dtype)
            record["dev"], record["ino"] = file
            paths_map.delete(record.tobytes())
            self._paths.pop(file, None)


LOSSES = {
    "rows_dropped": "calls not counted (too many files)",
    "calls_dropped": "calls not counted (too many threads in a call)",
}


def _kib(n: int) -> float:
    return round(n / 1024, 1)


def show(
    opts: RunOptions, screen: top.Screen, rows: list[FileRow], elapsed: float, sort: str, max_rows: int
) -> None:
    rows = sorted(rows, key=SORTS[sort], reverse=True)[:max_rows]
    if opts.as_json:
        for r in rows:
            opts.output.record({"interval": round(elapsed, 3), **r.to_dict()})
        return
    table = [
        [r.pid, r.comm, r.reads, r.writes, _kib(r.read_bytes), _kib(r.write_bytes), r.kind, r.path]
        for r in rows
    ]
    columns = ["PID", "COMM", "READS", "WRITES", "R kB", "W kB", "T", "FILE"]
    heading = f"{elapsed:.1f}s  {top.loadavg()}  sorted by {sort}"
    screen.frame(heading, columns, table, "no file reads or writes")


EXAMPLES = """
\b
Examples:
  bpfscope filetop                  # refresh every second until Ctrl-C
  bpfscope filetop -s wbytes 5      # by bytes written, every 5 seconds
  bpfscope filetop -a -C 1 10       # all files (pipes, sockets, devices), no clearing, 10 times
  bpfscope filetop -p 1234 --json   # one process, JSON lines at Ctrl-C
"""


@click.command(name="filetop", epilog=EXAMPLES)
@click.option("-a", "--all-files", is_flag=True, help="All files, not only regular ones.")
@top.top_options(
    list(SORTS), "bytes", "Sort by bytes (read + written), bytes read or written, calls, reads or writes."
)
@tool_options
def command(opts: RunOptions, all_files: bool, sort: str, max_rows: int, noclear: bool) -> None:
    """Top files by bytes read and written, per process, per interval (1 s by default), with their paths.

    Counts the read and write system calls that succeeded (read, pread64, readv, preadv, preadv2, and the
    write ones) and the bytes they returned: page-cache hits included, mmap(), io_uring, sendfile and
    splice not seen. Regular files only, unless -a.
    """
    screen = top.Screen(opts, noclear)
    with FileSampler({**opts.filters(), "all_files": all_files}) as sampler:
        sampler.start()
        note = "Tracing file reads and writes... Ctrl-C to end."
        for elapsed in ticks(opts, note, DEFAULT_INTERVAL):
            show(opts, screen, sampler.sample(), elapsed, sort, max_rows)
        opts.output.note(f"filetop: {sampler.losses(LOSSES)}")
