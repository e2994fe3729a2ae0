"""vfsstat and filetop against workloads whose calls are known exactly.

The workload is Python code in a child (conftest.trace_workload) that makes a known number of each
call with os.* functions, which are one system call each. Around it, the harness itself makes two calls
the tools see: once the work is done the child prints "done" (one write, to a pipe) and waits on stdin
again (one read, entered before the tool stops). The line that started the work was read by a call
entered before the tool attached, which is not counted: calls are counted at entry.

Filtered on the child's pid in the kernel, the counts are exact whatever else runs on the machine; the
system-wide totals hold everyone's calls (but bpfscope's own), so they are at least the child's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunCli, trace_workload

from bpfscope.domains.cache.health import VfsRule
from bpfscope.health.verdict import Verdict
from bpfscope.health.window import CheckWindow, run_check

# Calls of each kind the workload makes.
READS = {"read": 11, "pread": 7, "readv": 3}
WRITES = {"write": 13, "pwrite": 5, "writev": 2}
CREATES = 4  # os.open with O_CREAT of new files
FSYNCS = {"fsync": 3, "fdatasync": 2}

# The harness's own calls after the work: print("done") and the readline that waits to exit.
HARNESS_READS = 1
HARNESS_WRITES = 2

VFS_WORKLOAD = """
d = {dir!r}
fds = [os.open(f"{{d}}/f{{i}}", os.O_CREAT | os.O_RDWR, 0o600) for i in range({creates})]
fd = fds[0]
for _ in range({write}):
    os.write(fd, b"x" * 100)
for _ in range({pwrite}):
    os.pwrite(fd, b"y" * 10, 0)
for _ in range({writev}):
    os.writev(fd, [b"a", b"b"])
for _ in range({fsync}):
    os.fsync(fd)
for _ in range({fdatasync}):
    os.fdatasync(fd)
rd = os.open(f"{{d}}/f0", os.O_CREAT | os.O_RDONLY)  # O_CREAT on an existing file: not a create
for _ in range({read}):
    os.read(rd, 10)
for _ in range({pread}):
    os.pread(rd, 10, 0)
buf = bytearray(4)
for _ in range({readv}):
    os.readv(rd, [buf])
for i in range({creates}):
    os.unlink(f"{{d}}/f{{i}}")
"""

EXPECTED = {
    "reads": sum(READS.values()) + HARNESS_READS,
    "writes": sum(WRITES.values()) + HARNESS_WRITES,
    "opens": CREATES + 1,
    "creates": CREATES,
    "fsyncs": sum(FSYNCS.values()),
    "unlinks": CREATES,
}


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = Path(f"/var/tmp/bsd-vfs-{os.getpid()}")
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def vfs_workload(directory: Path) -> str:
    return VFS_WORKLOAD.format(dir=str(directory), creates=CREATES, **READS, **WRITES, **FSYNCS)


def records(out: str, name: str) -> list[dict]:
    """The JSON records of one schema (the output ends with the losses record)."""
    return [r for r in map(json.loads, out.splitlines()) if r["record"] == name]


def summed(lines: list[dict], pid: int | None = None) -> dict[str, int]:
    totals = dict.fromkeys(EXPECTED, 0)
    for r in lines:
        if pid is None or r["pid"] == pid:
            for key in totals:
                totals[key] += r[key]
    return totals


def test_vfsstat_counts_one_process_exactly(work_dir: Path) -> None:
    out, err = trace_workload(["vfsstat", "--json", "-p", "{pid}", "0.5"], vfs_workload(work_dir))
    assert summed(records(out, "vfsstat")) == EXPECTED
    assert "vfsstat:" in err


def test_vfsstat_system_wide_holds_the_process(work_dir: Path) -> None:
    out, _ = trace_workload(["vfsstat", "--json", "-P", "-r", "100000"], vfs_workload(work_dir))
    lines = records(out, "vfsstat.process")
    pids = {r["pid"] for r in lines if r["comm"] == "python"}
    pids |= {r["pid"] for r in lines if r["comm"].startswith("python3")}
    # The child's own row is exact system-wide too; which pid it is: the one with our exact creates.
    rows = [summed(lines, pid) for pid in pids]
    assert EXPECTED in rows, rows
    total = summed(records(out, "vfsstat"))
    assert all(total[k] >= v for k, v in EXPECTED.items()), total


def test_vfsstat_cgroup_filter(work_dir: Path, cgroup: Path) -> None:
    # Calls made before the child joins the cgroup (the join's own open and write included: they enter
    # outside it) are not counted; the known work after it is, exactly.
    join = f"""
os.close(os.open({str(work_dir / "outside")!r}, os.O_CREAT | os.O_WRONLY, 0o600))
with open({str(cgroup / "cgroup.procs")!r}, "w") as procs:
    procs.write(str(os.getpid()))
"""
    out, _ = trace_workload(["vfsstat", "--json", "--cgroup", str(cgroup)], join + vfs_workload(work_dir))
    assert summed(records(out, "vfsstat")) == EXPECTED


def test_vfsstat_table(run_cli: RunCli) -> None:
    result = run_cli("vfsstat", "0.3", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "TIME",
        "READS/s",
        "WRITES/s",
        "OPENS/s",
        "CREATES/s",
        "FSYNCS/s",
        "UNLINKS/s",
    ]
    assert len(lines) == 3


# filetop: X bytes written to A in known calls, Y bytes read from B.
A_WRITES = [4109] * 7  # os.write calls
A_PWRITES = [333, 1]  # os.pwrite calls
B_SIZE = 15000
B_READS = [3000] * 5  # os.pread, none at end of file

FILETOP_WORKLOAD = """
a = os.open({a!r}, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
for n in {writes!r}:
    assert os.write(a, b"w" * n) == n
for i, n in enumerate({pwrites!r}):
    assert os.pwrite(a, b"p" * n, i * 10) == n
os.close(a)
b = os.open({b!r}, os.O_RDONLY)
offset = 0
for n in {reads!r}:
    assert len(os.pread(b, n, offset)) == n
    offset += n
os.close(b)
"""


@pytest.fixture
def file_pair(work_dir: Path) -> Iterator[tuple[Path, Path]]:
    # A on tmpfs (/dev/shm), B on the root file system: the path walk crosses a mount point for A.
    a = Path(f"/dev/shm/bsd-filetop-{os.getpid()}/deep/er/a.dat")
    a.parent.mkdir(parents=True)
    b = work_dir / "b.dat"
    b.write_bytes(b"r" * B_SIZE)
    try:
        yield a, b
    finally:
        shutil.rmtree(a.parents[2], ignore_errors=True)


def test_filetop_bytes_calls_and_paths(file_pair: tuple[Path, Path]) -> None:
    a, b = file_pair
    workload = FILETOP_WORKLOAD.format(a=str(a), b=str(b), writes=A_WRITES, pwrites=A_PWRITES, reads=B_READS)
    out, err = trace_workload(["filetop", "--json", "-p", "{pid}", "-r", "1000", "0.5"], workload)
    by_path: dict[str, dict[str, int]] = {}
    for r in records(out, "filetop"):
        row = by_path.setdefault(
            r["path"], dict.fromkeys(["reads", "writes", "read_bytes", "write_bytes"], 0)
        )
        for key in row:
            row[key] += r[key]
        assert r["type"] == "R", r  # regular files only by default: the pipes to the harness are not
    assert by_path[str(a)] == {
        "reads": 0,
        "writes": len(A_WRITES) + len(A_PWRITES),
        "read_bytes": 0,
        "write_bytes": sum(A_WRITES) + sum(A_PWRITES),
    }, by_path
    assert by_path[str(b)] == {"reads": len(B_READS), "writes": 0, "read_bytes": B_SIZE, "write_bytes": 0}
    assert "filetop:" in err


def test_filetop_all_files_shows_pipes(work_dir: Path) -> None:
    # With -a, the harness's "done" line on the child's stdout pipe is a write of 5 bytes to a pipe.
    out, _ = trace_workload(["filetop", "--json", "-a", "-p", "{pid}", "0.5"], "")
    pipes = [r for r in records(out, "filetop") if r["type"] == "P"]
    assert sum(r["write_bytes"] for r in pipes) == len("done\n"), pipes


@pytest.mark.parametrize(
    "args",
    [
        ["vfsstat", "-p", "999999999"],
        ["vfsstat", "--cgroup", "/bsd-no-such-cgroup"],
        ["vfsstat", "0"],
        ["vfsstat", "-r", "0"],
        ["filetop", "-s", "bogus"],
        ["filetop", "-p", "999999999"],
        ["filetop", "1", "-1"],
    ],
)
def test_bad_input(run_cli: RunCli, args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_vfs_check_rule(work_dir: Path) -> None:
    # The rule's window, driven by hand so that known work falls inside it: 2000 reads from here, by
    # bpfscope's own process (the check runs in this one), so the window includes it.
    path = work_dir / "bsd-check.dat"
    path.write_bytes(b"x" * 4096)
    with CheckWindow([VfsRule], include_self=True) as window:
        start = time.monotonic()
        window.start()
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(2000):
                os.pread(fd, 16, 0)
        finally:
            os.close(fd)
        (row,) = window.finish().rows
        window_s = time.monotonic() - start  # at least the collector's own interval, over which it divides
    assert row.resource == "VFS" and row.verdict is Verdict.OK
    # Calls per second over the window: at least this process's reads, and the process is named.
    assert row.value is not None and row.value * window_s >= 2000, (row.value, window_s)
    assert "reads" in row.detail and f"({os.getpid()})" in row.detail, row.detail
    assert run_check(0.2, rules=[VfsRule]).rows[0].verdict is Verdict.OK


def test_tables_for_people(run_cli: RunCli, file_pair: tuple[Path, Path]) -> None:
    result = run_cli("vfsstat", "-P", "0.3", "1")
    assert result.returncode == 0, result.stderr
    assert "total: reads" in result.stdout
    # filetop, piped: one table per interval, never a screen clear.
    result = run_cli("filetop", "0.3", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("sorted by bytes") == 2 and "\033[" not in result.stdout


def test_filetop_cgroup_filter(file_pair: tuple[Path, Path], cgroup: Path) -> None:
    # The child writes a file, then joins the cgroup and does the known work: only that is counted.
    a, b = file_pair
    outside = a.with_suffix(".outside")
    workload = f"""
os.write(os.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY, 0o600), b"o" * 77)
with open({str(cgroup / "cgroup.procs")!r}, "w") as procs:
    procs.write(str(os.getpid()))
"""
    workload += FILETOP_WORKLOAD.format(a=str(a), b=str(b), writes=A_WRITES, pwrites=A_PWRITES, reads=B_READS)
    out, _ = trace_workload(["filetop", "--json", "--cgroup", str(cgroup), "0.5"], workload)
    written: dict[str, int] = {}
    read: dict[str, int] = {}
    for r in records(out, "filetop"):
        written[r["path"]] = written.get(r["path"], 0) + r["write_bytes"]
        read[r["path"]] = read.get(r["path"], 0) + r["read_bytes"]
    assert written == {str(a): sum(A_WRITES) + sum(A_PWRITES), str(b): 0}, written
    assert read[str(b)] == B_SIZE


def test_filetop_deep_path_is_marked_truncated(work_dir: Path) -> None:
    # 24 names: deeper than the 16 the kernel walks, so the path shows its last 16 after "...".
    deep = work_dir.joinpath(*(f"d{i}" for i in range(20)), "f.dat")
    deep.parent.mkdir(parents=True)
    workload = f"os.write(os.open({str(deep)!r}, os.O_CREAT | os.O_WRONLY, 0o600), b'z' * 3)"
    out, _ = trace_workload(["filetop", "--json", "-p", "{pid}", "0.5"], workload)
    rows = records(out, "filetop")
    assert [r["path"] for r in rows] == [".../" + "/".join(deep.parts[-16:])], rows
    assert rows[0]["write_bytes"] == 3


def test_vfsstat_never_counts_itself() -> None:
    """`bpfscope vfsstat` writes a JSON line at each interval, a write() the next interval sees: its own
    process is no row of its output, unless --include-self."""
    for include_self in (False, True):
        args = ["--include-self"] if include_self else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "bpfscope", "vfsstat", "--json", "-P", "-r", "100000", *args, "0.2", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        mine = [r for r in records(out, "vfsstat.process") if r["pid"] == proc.pid]
        if include_self:
            assert sum(r["writes"] for r in mine) >= 4, mine  # the lines of intervals 1 to 4, at least
        else:
            assert mine == [], mine
