"""bpfscope fincore: how much of each file is in the page cache, and how much of that is dirty or under
writeback.

The kernel's cachestat() system call (Linux 6.5+, ``cachestat(fd, &range, &stats, 0)``) answers for a
whole file at once, with dirty and writeback pages and recent evictions. Where it is missing (ENOSYS:
older kernels, or seccomp) fincore falls back to mincore() over a read-only shared mapping of the file,
which reports residency page by page but knows nothing of dirty or writeback pages. No BPF is involved:
nothing is traced, the kernel is asked.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click

from bpfscope.sinks.output import Output

PAGE_SIZE = mmap.PAGESIZE
# cachestat() has the same number on every architecture (the generic table), from Linux 6.5.
SYS_CACHESTAT = 451

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _CachestatRange(ctypes.Structure):
    """include/uapi/linux/mman.h: struct cachestat_range."""

    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    """include/uapi/linux/mman.h: struct cachestat."""

    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class Residency:
    """One file's pages in the page cache. dirty, writeback and evictions are None from mincore."""

    path: str
    size: int
    pages: int  # pages the file spans
    cached: int
    dirty: int | None
    writeback: int | None
    evicted: int | None
    recently_evicted: int | None
    method: str  # "cachestat" or "mincore"

    @property
    def cached_pct(self) -> float:
        return 100.0 * self.cached / self.pages if self.pages else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "pages": self.pages,
            "cached": self.cached,
            "cached_bytes": self.cached * PAGE_SIZE,
            "cached_pct": round(self.cached_pct, 2),
            "dirty": self.dirty,
            "writeback": self.writeback,
            "evicted": self.evicted,
            "recently_evicted": self.recently_evicted,
            "method": self.method,
        }


class CachestatUnavailable(Exception):
    """The kernel has no cachestat() (ENOSYS), or refuses it for this file type."""


def cachestat(fd: int, offset: int = 0, length: int = 0) -> _Cachestat:
    """The kernel's cachestat() for fd's range (length 0: to the end of the file)."""
    if platform.machine() not in ("x86_64", "aarch64", "riscv64", "loongarch64", "s390x", "ppc64le"):
        raise CachestatUnavailable("system call number unknown here")
    rng = _CachestatRange(offset, length)
    out = _Cachestat()
    if _libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(out), 0) < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
            # EBADF: a file cachestat() does not cover (hugetlbfs): mincore may still answer.
            raise CachestatUnavailable(os.strerror(err))
        raise OSError(err, os.strerror(err))
    return out


def mincore_pages(fd: int, size: int) -> list[bool]:
    """Page by page: resident in the page cache (mincore over a read-only shared mapping of the file)."""
    if size == 0:
        return []
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    try:
        npages = (size + PAGE_SIZE - 1) // PAGE_SIZE
        vec = (ctypes.c_ubyte * npages)()
        if _libc.mincore(addr, size, vec) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return [bool(b & 1) for b in vec]
    finally:
        _libc.munmap(addr, size)


def residency(path: str, method: str = "auto") -> Residency:
    """How much of ``path`` is in the page cache; ``method`` is auto (cachestat, else mincore), cachestat
    or mincore. OSError for a file that cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
        if method in ("auto", "cachestat"):
            try:
                cs = cachestat(fd)
                return Residency(
                    path,
                    size,
                    pages,
                    cs.nr_cache,
                    cs.nr_dirty,
                    cs.nr_writeback,
                    cs.nr_evicted,
                    cs.nr_recently_evicted,
                    "cachestat",
                )
            except CachestatUnavailable:
                if method == "cachestat":
                    raise
        cached = sum(mincore_pages(fd, size))
        return Residency(path, size, pages, cached, None, None, None, None, "mincore")
    finally:
        os.close(fd)


def human(n: float) -> str:
    """Bytes in powers of 1024, as ls -h and fincore(1) print them."""
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 100 else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}P"


def expand(paths: tuple[str, ...], recursive: bool) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each regular file to measure, or (path, error) for what cannot be measured."""
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            yield path, exc.strerror or str(exc)
            continue
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                yield path, "is a directory (use -r)"
                continue
            for root, dirs, files in os.walk(path, onerror=None):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    if os.path.isfile(full) and not os.path.islink(full):
                        yield full, None
        elif stat.S_ISREG(st.st_mode):
            yield path, None
        else:
            yield path, "not a regular file"


EXAMPLES = """
\b
Examples:
  bpfscope fincore /var/lib/postgresql/15/main/base/*/*
  bpfscope fincore -r /var/log --json
  bpfscope fincore --mincore big.db     # page by page, as util-linux fincore does
"""


@click.command(name="fincore", epilog=EXAMPLES)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-r", "--recursive", is_flag=True, help="Measure every file under the directories given.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines: one per file, then a total.")
@click.option("--mincore", "use_mincore", is_flag=True, help="Use mincore() even where cachestat() exists.")
@click.option("-b", "--bytes", "raw_bytes", is_flag=True, help="Sizes in bytes, not human-readable.")
def command(
    paths: tuple[str, ...], recursive: bool, as_json: bool, use_mincore: bool, raw_bytes: bool
) -> None:
    """How much of each file is resident in the page cache (RES, % of the file), and of that how much is
    dirty and under writeback, from the kernel's cachestat() system call (Linux 6.5+), or mincore() where
    cachestat() is missing (no dirty or writeback figures then). Errors for single files (missing,
    unreadable) are one line each on stderr; the exit status is 2 if any file could not be measured.
    """
    out = Output(as_json)
    size = (lambda n: n) if raw_bytes or as_json else human
    rows: list[list[Any]] = []
    failed = 0
    total_cached = total_size = 0
    for path, error in expand(paths, recursive):
        if error is None:
            try:
                res = residency(path, "mincore" if use_mincore else "auto")
            except OSError as exc:
                error = exc.strerror or str(exc)
        if error is not None:
            failed += 1
            out.note(f"bpfscope: error: {path}: {error}")
            continue
        total_cached += res.cached
        total_size += res.size
        if as_json:
            out.record(res.to_dict())
            continue
        rows.append(
            [
                size(res.cached * PAGE_SIZE),
                res.cached,
                size(res.size),
                f"{res.cached_pct:.1f}%",
                "-" if res.dirty is None else res.dirty,
                "-" if res.writeback is None else res.writeback,
                res.path,
            ]
        )
    if as_json:
        out.record(
            {"total_cached_bytes": total_cached * PAGE_SIZE, "total_size": total_size, "failed": failed}
        )
    elif rows:
        out.table(["RES", "PAGES", "SIZE", "CACHED", "DIRTY", "WRITEBACK", "FILE"], rows)
    if failed:
        raise SystemExit(2)
