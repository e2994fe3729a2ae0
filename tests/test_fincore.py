"""bpfscope fincore against the kernel: files cached in part by reads of known pages, measured through
cachestat(), through mincore() (the fallback), through a reference mincore written here over Python's own
mmap, and through util-linux fincore(1) where it is installed. All must agree exactly: it is one kernel
answering the same question."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfscope.domains.cache.fincore import PAGE_SIZE, residency

MIB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)


def reference_mincore(path: Path) -> int:
    """Resident pages by mincore() over a mapping made by Python's mmap module (not the tool's code)."""
    size = path.stat().st_size
    with path.open("r+b") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            vec = (ctypes.c_ubyte * ((size + PAGE_SIZE - 1) // PAGE_SIZE))()
            assert _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) == 0
            return sum(b & 1 for b in vec)
        finally:
            del anchor  # the mapping cannot close while a ctypes object points into it


def util_linux_fincore(path: Path) -> int | None:
    """fincore(1)'s resident pages, or None where util-linux fincore is not installed."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(
        ["fincore", "--noheadings", "--output", "PAGES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[0])


def read_pages(path: Path, ranges: list[tuple[int, int]]) -> int:
    """Read pages [start, end) of each range with read-ahead off (POSIX_FADV_RANDOM): exactly those pages
    come into the cache. Returns how many."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for start, end in ranges:
            for page in range(start, end):
                os.pread(fd, PAGE_SIZE, page * PAGE_SIZE)
    finally:
        os.close(fd)
    return sum(end - start for start, end in ranges)


@pytest.fixture
def files() -> Iterator[list[Path]]:
    """Two 16 MiB files on disk, written back and dropped from the page cache."""
    paths = [Path(f"/var/tmp/bsc-fincore-{os.getpid()}-{i}.dat") for i in range(2)]
    try:
        for path in paths:
            with path.open("wb") as f:
                f.write(os.urandom(16 * MIB))
                f.flush()
                os.fsync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        yield paths
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def test_partly_cached_files_agree_exactly(files: list[Path]) -> None:
    ranges = [[(0, 256), (1024, 1536)], [(4000, 4001), (10, 20)]]
    for path, pages in zip(files, ranges, strict=True):
        # The host reclaims page cache now and then: when the kernel says pages of the file were evicted
        # (nr_evicted) and the answers differ, the pages are read again and everything measured anew.
        for _ in range(3):
            want = read_pages(path, pages)
            by_cachestat = residency(str(path), "cachestat")
            by_mincore = residency(str(path), "mincore")
            truths = {
                "pages read": want,
                "cachestat": by_cachestat.cached,
                "mincore": by_mincore.cached,
                "reference mincore": reference_mincore(path),
            }
            if (theirs := util_linux_fincore(path)) is not None:
                truths["util-linux fincore"] = theirs
            if len(set(truths.values())) == 1 or not residency(str(path), "cachestat").evicted:
                break
            print(f"{path}: pages evicted while measured, again: {truths}")
        assert by_cachestat.method == "cachestat" and by_mincore.method == "mincore"
        assert len(set(truths.values())) == 1, truths
        assert by_cachestat.pages == 16 * MIB // PAGE_SIZE
        assert by_cachestat.dirty == 0 and by_cachestat.writeback == 0
        assert by_mincore.dirty is None  # mincore cannot know


def test_dirty_pages(files: list[Path]) -> None:
    fd = os.open(files[0], os.O_WRONLY)
    try:
        os.pwrite(fd, b"d" * (100 * PAGE_SIZE), 0)
        res = residency(str(files[0]), "cachestat")
    finally:
        os.close(fd)
    # Written a moment ago: dirty, or already on its way to the disk if something ran sync(1) meanwhile.
    assert res.dirty + res.writeback == 100 and res.cached == 100, res


def test_cli(files: list[Path], run_cli) -> None:
    read_pages(files[0], [(0, 512)])
    result = run_cli("fincore", "--json", str(files[0]), str(files[1]))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["cached"] for r in records[:2]] == [512, 0]
    assert records[0]["cached_bytes"] == 2 * MIB and records[0]["cached_pct"] == 12.5
    total = {k: v for k, v in records[-1].items() if k != "ts"}
    assert total == {
        "record": "fincore.total",
        "total_cached_bytes": 2 * MIB,
        "total_size": 32 * MIB,
        "failed": 0,
    }

    table = run_cli("fincore", str(files[0]))
    assert table.returncode == 0
    header, row = table.stdout.strip().splitlines()
    assert header.split()[:4] == ["RES", "PAGES", "SIZE", "CACHED"]
    assert row.split()[:4] == ["2.0M", "512", "16.0M", "12.5%"]


def test_directories(files: list[Path], run_cli) -> None:
    flat = run_cli("fincore", "/var/tmp")
    assert flat.returncode == 2 and "is a directory (use -R)" in flat.stderr
    tree = files[0].parent / f"bsc-fincore-tree-{os.getpid()}"
    (tree / "sub").mkdir(parents=True)
    try:
        (tree / "sub" / "a").write_bytes(b"x" * 10000)
        result = run_cli("fincore", "-R", "--json", str(tree))
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert records[0]["path"] == str(tree / "sub" / "a") and records[0]["pages"] == 3
        assert records[0]["cached"] == 3  # just written: in the cache
    finally:
        shutil.rmtree(tree)


def test_errors_are_one_line_each(files: list[Path], run_cli) -> None:
    missing = run_cli("fincore", "/var/tmp/bsc-no-such-file", str(files[0]))
    assert missing.returncode == 2
    assert missing.stderr.strip() == "bpfscope: error: /var/tmp/bsc-no-such-file: No such file or directory"
    assert "Traceback" not in missing.stderr and str(files[0]) in missing.stdout  # the others still shown

    files[1].chmod(0o600)

    def as_nobody() -> None:
        os.setgid(65534)
        os.setuid(65534)

    unreadable = run_cli("fincore", str(files[1]), preexec=as_nobody)
    assert unreadable.returncode == 2
    assert unreadable.stderr.strip() == f"bpfscope: error: {files[1]}: Permission denied"


def deny_cachestat() -> None:
    """In the child, before exec: a seccomp filter makes cachestat() fail with ENOSYS, as on a kernel
    older than 6.5, and lets every other system call through."""
    load_nr, jump_eq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    program = (SockFilter * 4)(
        SockFilter(load_nr, 0, 0, 0),  # seccomp_data.nr
        SockFilter(jump_eq, 0, 1, 451),  # cachestat?
        SockFilter(ret, 0, 0, 0x00050000 | 38),  # SECCOMP_RET_ERRNO | ENOSYS
        SockFilter(ret, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    )
    fprog = SockFprog(4, program)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter does not check the architecture")
def test_mincore_where_cachestat_is_missing(files: list[Path], run_cli) -> None:
    want = read_pages(files[0], [(100, 300)])
    result = run_cli("fincore", "--json", str(files[0]), preexec=deny_cachestat)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    assert record["method"] == "mincore" and record["cached"] == want == residency(str(files[0])).cached
    assert record["dirty"] is None and record["writeback"] is None
