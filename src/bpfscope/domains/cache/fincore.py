"""bpfscope fincore: how much of each file is in the page cache, and how much of that is dirty or under
writeback.

The kernel's cachestat() system call (Linux 6.5+, ``cachestat(fd, &range, &stats, 0)``) answers for a
whole file at once, with dirty and writeback pages and recent evictions; its structs' layouts are read
from the kernel's BTF. Where it is missing (ENOSYS: older kernels, or seccomp) fincore falls back to
mincore() over a read-only shared mapping of the file, which reports residency page by page but knows
nothing of dirty or writeback pages. No BPF is involved: nothing is traced, the kernel is asked, once.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import click

from bpfscope.cli.options import Run, option
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import Collector, Config, Sample
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.terminal import Terminal, View, note

PAGE_SIZE = mmap.PAGESIZE
# cachestat() has the same number on every architecture (the generic table), from Linux 6.5.
SYS_CACHESTAT = 451
METHODS = ("auto", "cachestat", "mincore")

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

    def values(self) -> dict[str, Any]:
        """The fields of a fincore record."""
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


@cache
def _cachestat_structs() -> tuple[Any, Any]:
    """include/uapi/linux/mman.h's struct cachestat_range and struct cachestat, from the kernel's BTF."""
    from bpfscope.engine.btf import kernel_btf

    try:
        btf = kernel_btf()
        return btf.struct("cachestat_range"), btf.struct("cachestat")
    except BpfscopeError as exc:
        raise CachestatUnavailable(str(exc)) from None


def cachestat(fd: int, offset: int = 0, length: int = 0) -> dict[str, int]:
    """The kernel's cachestat() for fd's range (length 0: to the end of the file), as struct cachestat's
    fields (nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted)."""
    if platform.machine() not in ("x86_64", "aarch64", "riscv64", "loongarch64", "s390x", "ppc64le"):
        raise CachestatUnavailable("system call number unknown here")
    range_type, stats_type = _cachestat_structs()
    rng = ctypes.create_string_buffer(range_type.encode({"off": offset, "len": length}), range_type.size)
    out = ctypes.create_string_buffer(stats_type.size)
    if _libc.syscall(SYS_CACHESTAT, fd, rng, out, 0) < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
            # EBADF: a file cachestat() does not cover (hugetlbfs): mincore may still answer.
            raise CachestatUnavailable(os.strerror(err))
        raise OSError(err, os.strerror(err))
    return stats_type.decode(out.raw)


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
                    cs["nr_cache"],
                    cs["nr_dirty"],
                    cs["nr_writeback"],
                    cs["nr_evicted"],
                    cs["nr_recently_evicted"],
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
                yield path, "is a directory (use -R)"
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


FILE_SCHEMA = Schema(
    "fincore",
    (
        Field("path", "str", label=True),
        Field("size", "int", "bytes", "the file's size"),
        Field("pages", "int", "pages", "pages the file spans"),
        Field("cached", "int", "pages", "pages in the page cache"),
        Field("cached_bytes", "int", "bytes"),
        Field("cached_pct", "float", "%", "cached pages of the file's pages"),
        Field("dirty", "int", "pages", "dirty among the cached (null from mincore)", nullable=True),
        Field("writeback", "int", "pages", "under writeback (null from mincore)", nullable=True),
        Field("evicted", "int", "pages", "evicted from the cache (null from mincore)", nullable=True),
        Field("recently_evicted", "int", "pages", "evicted recently (null from mincore)", nullable=True),
        Field("method", "enum", values=("cachestat", "mincore"), doc="which system call answered"),
    ),
    doc="One file's residency in the page cache, as the kernel tells it.",
)
TOTAL_SCHEMA = Schema(
    "fincore.total",
    (
        Field("total_cached_bytes", "int", "bytes", "cached bytes of every file measured"),
        Field("total_size", "int", "bytes", "their sizes"),
        Field("failed", "int", doc="paths that could not be measured (each said on stderr)"),
    ),
    doc="The files measured, in all; the last record.",
)


@dataclass
class FincoreSample(Sample):
    ts: float
    files: list[Residency] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, why it could not be measured)

    def records(self) -> Iterator[dict[str, Any]]:
        for res in self.files:
            yield FILE_SCHEMA.record({"ts": self.ts, **res.values()})
        yield TOTAL_SCHEMA.record(
            {
                "ts": self.ts,
                "total_cached_bytes": sum(r.cached for r in self.files) * PAGE_SIZE,
                "total_size": sum(r.size for r in self.files),
                "failed": len(self.errors),
            }
        )


@dataclass(kw_only=True)
class FincoreConfig(Config):
    paths: tuple[str, ...] = ()
    recursive: bool = False  # every file under the directories given
    method: str = "auto"  # cachestat() where the kernel has it, else mincore(); or either alone


class FincoreCollector(Collector[FincoreConfig]):
    """The residency of the configured files, measured at each sample (no baseline: the kernel keeps it)."""

    name = "fincore"
    _schemas = (FILE_SCHEMA, TOTAL_SCHEMA)

    def __init__(self, config: FincoreConfig) -> None:
        if config.method not in METHODS:
            raise BpfscopeError(f"fincore measures with {', '.join(METHODS)}, not {config.method!r}")
        super().__init__(config)

    def sample(self) -> FincoreSample:
        sample = FincoreSample(time.time())
        for path, error in expand(self.config.paths, self.config.recursive):
            if error is None:
                try:
                    sample.files.append(residency(path, self.config.method))
                except OSError as exc:
                    error = exc.strerror or str(exc)
            if error is not None:
                sample.errors.append((path, error))
        return sample


class FincoreView(View):
    def __init__(self, raw_bytes: bool) -> None:
        self.size = (lambda n: n) if raw_bytes else human

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, FincoreSample)
        rows = [
            [
                self.size(res.cached * PAGE_SIZE),
                res.cached,
                self.size(res.size),
                f"{res.cached_pct:.1f}%",
                "-" if res.dirty is None else res.dirty,
                "-" if res.writeback is None else res.writeback,
                res.path,
            ]
            for res in sample.files
        ]
        if rows:
            term.table(["RES", "PAGES", "SIZE", "CACHED", "DIRTY", "WRITEBACK", "FILE"], rows)


EXAMPLES = """
\b
Examples:
  bpfscope fincore /var/lib/postgresql/15/main/base/*/*
  bpfscope fincore -R /var/log --json
  bpfscope fincore --mincore big.db     # page by page, as util-linux fincore does
"""


@click.command(name="fincore", epilog=EXAMPLES)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-R", "--recursive", is_flag=True, help="Measure every file under the directories given.")
@option("json", help="JSON lines: one per file, then a total.")
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
    config = FincoreConfig(paths=paths, recursive=recursive, method="mincore" if use_mincore else "auto")
    collector = FincoreCollector(config)
    # One measurement, now: the session is stepped once rather than run until a stop (no interval, no
    # losses to report: nothing is traced).
    with Run(as_json=as_json).session([collector], FincoreView(raw_bytes)) as session:
        session.open().start()
        sample = session.sample()[collector]
    assert isinstance(sample, FincoreSample)
    for path, error in sample.errors:
        note(f"bpfscope: error: {path}: {error}")
    if sample.errors:
        raise SystemExit(2)
