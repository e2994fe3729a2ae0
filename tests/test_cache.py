"""cachestat, cachetop and the "Page cache" health-check rule against known workloads.

The truths are independent of the tracepoints: a file's size in pages (read cold after
posix_fadvise(DONTNEED) dropped it from the cache, then warm), the bytes a process writes, and the share
of a file the kernel's own cachestat() finds resident while a memory-limited process reads it at random.

Every workload runs in a process whose pid (or cgroup) the collector filters on in the kernel, so what
other engineers run on the machine at the same time cannot enter the counts. Where that process is this
one (or its child), the collector is told to include bpfscope's own process and children, which it
leaves out by default. Files live on the root file system (ext4), not on tmpfs, whose page cache these
tracepoints do not see.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bpfscope.domains.cache.cachestat import CachestatCollector, CachestatConfig
from bpfscope.domains.cache.fincore import PAGE_SIZE, residency
from bpfscope.domains.cache.health import PageCacheRule, VfsRule
from bpfscope.domains.cache.pagecache import PageCacheSample
from bpfscope.domains.cache.vfsstat import VfsSample
from bpfscope.health.verdict import Verdict
from bpfscope.health.window import CheckWindow, run_check

MIB = 1 << 20
WORK_DIR = Path("/var/tmp")
MEMCG_V1 = Path("/sys/fs/cgroup/memory")


def make_file(path: Path, size: int) -> Path:
    """A file of ``size`` random bytes, written back and dropped from the page cache."""
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
    drop(path)
    return path


def drop(path: Path) -> None:
    """Drop one file's clean pages from the page cache (not the whole machine's, as drop_caches would)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert residency(str(path)).cached == 0, f"{path} is still in the page cache"


def read_all(path: Path, block: int = MIB) -> int:
    done = 0
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(block):
            done += len(chunk)
    return done


@contextlib.contextmanager
def cachestat(**config: Any) -> Iterator[CachestatCollector]:
    """cachestat's collector, attached and started: each sample() covers the time since the last."""
    with CachestatCollector(CachestatConfig(**config)) as collector:
        collector.open()
        collector.start()
        yield collector


def own(records: list[dict], name: str) -> list[dict]:
    """The records of one schema (the JSON ends with the losses record)."""
    return [r for r in records if r["record"] == name]


@pytest.fixture
def data_file() -> Iterator[Path]:
    path = make_file(WORK_DIR / f"bsc-cache-{os.getpid()}.dat", 32 * MIB)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_cold_then_warm_read(data_file: Path) -> None:
    pages = data_file.stat().st_size // PAGE_SIZE
    with cachestat(pid=os.getpid(), include_self=True) as sampler:
        read_all(data_file)
        cold = sampler.sample()
        read_all(data_file, 4096)
        warm = sampler.sample()
    print(f"pages {pages}; cold {list(cold.records())}; warm {list(warm.records())}")
    assert cold.hit_ratio is not None and warm.hit_ratio is not None
    # 2% of the pages: a read request is counted once however many batches the kernel splits it in, and
    # nothing but this file is read by this process between the samples.
    assert abs(cold.misses - pages) <= 0.02 * pages, cold
    assert abs(cold.lookups - pages) <= 0.02 * pages, cold
    assert cold.hit_ratio <= 2.0, cold
    assert warm.misses <= 0.02 * pages and warm.hit_ratio >= 98.0, warm
    assert abs(warm.lookups - pages) <= 0.02 * pages, warm
    assert cold.dirtied == 0 == warm.dirtied


def test_writes_are_dirtied_not_missed(tmp_path: Path) -> None:
    path = WORK_DIR / f"bsc-cache-write-{os.getpid()}.dat"
    size = 8 * MIB
    try:
        with cachestat(pid=os.getpid(), include_self=True) as sampler:
            with path.open("wb", buffering=0) as f:
                for _ in range(size // MIB):
                    f.write(b"w" * MIB)
            written = sampler.sample()
    finally:
        path.unlink(missing_ok=True)
    # Pages a write creates are neither lookups nor misses; each is dirtied once. The file is new, so
    # no page of it can have been dirty (and counted) before. A few pages of slack for the file system's
    # own metadata dirtied in this process's context (the inode, the directory).
    assert written.lookups == 0 and written.misses == 0, written
    assert size // PAGE_SIZE <= written.dirtied <= size // PAGE_SIZE + 8, written


def vmstat(name: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, value = line.split()
        if key == name:
            return int(value)
    raise KeyError(name)


def test_dirtied_matches_the_kernels_counter() -> None:
    """System-wide, dirtied pages against /proc/vmstat's nr_dirtied, which the kernel counts where the
    tracepoint fires (folio_account_dirtied). Whatever else the machine writes meanwhile is in both, and
    this process's writes too: bpfscope's own are counted here, as the kernel counts them."""
    path = WORK_DIR / f"bsc-cache-vmstat-{os.getpid()}.dat"
    try:
        with cachestat(include_self=True) as sampler:
            before = vmstat("nr_dirtied")
            with path.open("wb", buffering=0) as f:
                for _ in range(8):
                    f.write(b"v" * MIB)
            after = vmstat("nr_dirtied")
            sample = sampler.sample()
    finally:
        path.unlink(missing_ok=True)
    truth = after - before
    assert truth >= 8 * MIB // PAGE_SIZE
    # The two are read a few microseconds apart at each end: 1% (and a few pages) covers what other
    # writers dirty in that gap.
    assert abs(sample.dirtied - truth) <= 0.01 * truth + 16, (sample.dirtied, truth)


def test_cli_json_contract(data_file: Path) -> None:
    from conftest import trace_workload

    pages = data_file.stat().st_size // PAGE_SIZE
    out, err = trace_workload(
        ["cachestat", "--json", "-p", "{pid}", "-r", "3"],
        f"f = open({str(data_file)!r}, 'rb', buffering=0)\nwhile f.read(1 << 20): pass\n",
    )
    records = [json.loads(line) for line in out.splitlines()]
    totals = own(records, "cachestat")
    assert len(totals) == 1, out  # no interval: one record for the whole run
    rec = totals[0]
    assert {"lookups", "hits", "misses", "hit_ratio", "dirtied", "buffers_mb", "cached_mb"} <= set(rec)
    assert {"ts", "interval_s"} <= set(rec) and "elapsed_s" not in rec, rec
    assert abs(rec["misses"] - pages) <= 0.02 * pages, rec
    assert rec["hit_ratio"] <= 2.0, rec
    top = own(records, "cachestat.process")
    assert rec["cached_mb"] > 0 and top[0]["misses"] == rec["misses"], records
    assert records[-1]["record"] == "losses", records
    assert "events missed" in err


def test_cli_interval_records_and_null_ratio(run_cli) -> None:
    # A process that reads nothing: every interval has hit_ratio null, never a made-up 0 or 100.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        result = run_cli("cachestat", "--json", "-p", str(child.pid), "0.3", "2")
    finally:
        child.kill()
        child.wait()
    assert result.returncode == 0, result.stderr
    records = own([json.loads(line) for line in result.stdout.splitlines()], "cachestat")
    assert len(records) == 2
    for rec in records:
        assert rec["lookups"] == 0 and rec["hit_ratio"] is None, rec


@pytest.mark.parametrize(
    "args",
    [
        ["cachestat", "--cgroup", "/no/such/cgroup"],
        ["cachestat", "-p", "999999999"],
        ["cachestat", "-r", "-1"],
        ["cachestat", "0"],
        ["cachetop", "-s", "nonsense"],
        ["cachetop", "--cgroup", "relative/nowhere"],
        ["fincore"],
    ],
)
def test_bad_input_is_one_line(run_cli, args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr  # click's usage line, then the error


# --- A working set larger than a memory cgroup's limit --------------------------------------------------

RANDOM_READER = """
import os, random, sys
path, pages, warm_passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "exit":
        break
    reads = int(line)
    if reads == 0:  # fill the cgroup's share of the cache first: the steady state is what is measured
        for _ in range(warm_passes):
            os.lseek(fd, 0, 0)
            while os.read(fd, 1 << 20):
                pass
    for _ in range(reads):
        os.pread(fd, 4096, random.randrange(pages) * 4096)
    print("done", flush=True)
"""


@contextlib.contextmanager
def memory_limited(limit: int) -> Iterator[Path]:
    """A cgroup v1 memory cgroup (the memory controller is v1 on this hybrid machine) limited to ``limit``
    bytes, removed afterwards."""
    if not (MEMCG_V1 / "memory.limit_in_bytes").exists():
        pytest.fail("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    path = MEMCG_V1 / f"bsc-cache-{os.getpid()}"
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        yield path
    finally:
        # Its process has exited by now, but the kernel may take a moment to let go of it.
        deadline = time.monotonic() + 5
        while path.exists() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                path.rmdir()
            time.sleep(0.05)


def _ask(child: subprocess.Popen, line: str, timeout: float = 60) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    assert ready, f"the reader did not finish {line!r} within {timeout} s"
    assert child.stdout.readline().strip() == "done"


def test_random_reads_beyond_a_memory_limit(cgroup: Path) -> None:
    """Uniform random 4 KiB reads of a 64 MiB file by a process whose memory cgroup holds 40 MiB: in the
    steady state the chance that a read hits is the share of the file resident in the cache, which the
    kernel's cachestat() tells independently of any tracepoint; it is sampled all along the run."""
    path = make_file(WORK_DIR / f"bsc-cache-rand-{os.getpid()}.dat", 64 * MIB)
    pages = path.stat().st_size // PAGE_SIZE
    try:
        with memory_limited(40 * MIB) as v1:
            v2 = cgroup  # the cgroup v2 directory --cgroup and bpf_get_current_cgroup_id() see
            child = subprocess.Popen(
                [sys.executable, "-c", RANDOM_READER, str(path), str(pages), "2"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert child.stdout is not None and child.stdout.readline().strip() == "ready"
                (v1 / "cgroup.procs").write_text(str(child.pid))
                (v2 / "cgroup.procs").write_text(str(child.pid))
                _ask(child, "0")  # warm up: two sequential passes leave the cgroup's cache full
                cli = subprocess.Popen(
                    [sys.executable, "-m", "bpfscope", "cachestat", "--json", "--cgroup", str(v2)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                assert cli.stderr is not None
                assert cli.stderr.readline().startswith("Tracing")
                # The reader is this process's child: bpfscope's own, unless included.
                with cachestat(cgroup=str(v2), include_self=True) as sampler:
                    resident = []
                    for _ in range(10):
                        resident.append(residency(str(path)).cached / pages)
                        _ask(child, "4000")
                    resident.append(residency(str(path)).cached / pages)
                    measured = sampler.sample()
                cli.send_signal(signal.SIGINT)
                cli_out, cli_err = cli.communicate(timeout=30)
            finally:
                if child.poll() is None:
                    assert child.stdin is not None
                    child.stdin.write("exit\n")
                    child.stdin.close()
                    child.wait(timeout=10)
    finally:
        path.unlink(missing_ok=True)
    expected = 100.0 * sum(resident) / len(resident)
    print(f"resident {[round(r, 3) for r in resident]}; expected {expected:.2f}%")
    print(f"measured {list(measured.records())}")
    print(f"cli {cli_out.strip()}")
    # The limit must have bitten: a file that fits would be 100% resident and prove nothing.
    assert 20.0 < expected < 90.0, resident
    assert measured.hit_ratio is not None and measured.lookups >= 40000, measured
    # 5 points: the resident share moves a little as the cgroup's anonymous memory and reclaim batches
    # come and go (sampled 11 times along the run), and 40000 reads give a sampling error of under one
    # point at these ratios.
    assert abs(measured.hit_ratio - expected) <= 5.0, (measured, expected)
    records = own([json.loads(line) for line in cli_out.splitlines()], "cachestat")
    assert len(records) == 1, cli_out + cli_err
    cli_ratio = records[0]["hit_ratio"]
    assert records[0]["lookups"] >= measured.lookups and abs(cli_ratio - expected) <= 5.0, records


# --- Health check -----------------------------------------------------------------------------------

LOOP_READER = """
import os, sys
path, cold = sys.argv[1], sys.argv[2] == "cold"
fd = os.open(path, os.O_RDONLY)
print("ready", flush=True)
while True:
    if cold:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.lseek(fd, 0, 0)
    while os.read(fd, 1 << 20):
        pass
"""


@contextlib.contextmanager
def looping_reader(path: Path, cold: bool) -> Iterator[None]:
    child = subprocess.Popen(
        [sys.executable, "-c", LOOP_READER, str(path), "cold" if cold else "warm"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
def test_health_check_row(data_file: Path, cold: bool) -> None:
    if not cold:
        read_all(data_file)  # in the cache before the window opens
    with looping_reader(data_file, cold):  # this process's child: bpfscope's own, unless included
        report = run_check(3, rules=[PageCacheRule], include_self=True)
    (row,) = report.rows
    assert row.resource == "Page cache" and row.metric == "hit ratio" and row.threshold
    assert "lookups" in row.detail and "misses" in row.detail
    if cold:
        # The reader drops the file and reads it again as fast as it can: hundreds of MB/s of misses,
        # far more than anything else on the machine looks up, so the ratio is low.
        assert row.verdict in (Verdict.PROBLEM, Verdict.WARN), row
        assert "python" in row.detail  # the process missing most is named
    else:
        # Every page is cached: the reader's hits dwarf what other work misses meanwhile.
        assert row.verdict is Verdict.OK and row.value is not None and row.value >= 90, row


# --- cachetop -------------------------------------------------------------------------------------------


def test_cachetop_files_and_paths(tmp_path: Path) -> None:
    """Two files read cold by one process: one it keeps open (its path comes from /proc/PID/fd), one it
    closes before the interval ends (its path comes from the dentry names the kernel recorded)."""
    from conftest import trace_workload

    kept = make_file(WORK_DIR / f"bsc-cachetop-kept-{os.getpid()}.dat", 16 * MIB)
    closed = make_file(WORK_DIR / f"bsc-cachetop-closed-{os.getpid()}.dat", 8 * MIB)
    workload = (
        f"kept = open({str(kept)!r}, 'rb', buffering=0)\nwhile kept.read(1 << 20): pass\n"
        f"with open({str(closed)!r}, 'rb', buffering=0) as f:\n    while f.read(1 << 20): pass\n"
    )
    try:
        # One interval long enough for the whole run: one record per file.
        out, _ = trace_workload(["cachetop", "--json", "-p", "{pid}", "-r", "50", "60"], workload)
    finally:
        kept.unlink(missing_ok=True)
        closed.unlink(missing_ok=True)
    records = {r["path"]: r for r in own(list(map(json.loads, out.splitlines())), "cachetop")}
    for path in (kept, closed):
        assert str(path) in records, records.keys()
        rec = records[str(path)]
        pages = (16 if path == kept else 8) * MIB // PAGE_SIZE
        # 2%: as in test_cold_then_warm_read.
        assert abs(rec["misses"] - pages) <= 0.02 * pages and rec["hit_ratio"] <= 2.0, rec
        assert rec["comm"] == "python" and rec["ino"] > 0, rec
    ordered = [r["path"] for r in own(list(map(json.loads, out.splitlines())), "cachetop")]
    assert ordered.index(str(kept)) < ordered.index(str(closed))  # most misses first


def test_documented_blind_spots(data_file: Path) -> None:
    """What the module docstring says is not seen, is not: direct I/O bypasses the page cache, and tmpfs
    keeps pages without the filemap tracepoints. Should a kernel start to report them, the documentation
    (and the hit ratio's meaning) must change with it."""
    import mmap

    shm = Path(f"/dev/shm/bsc-cache-{os.getpid()}.dat")
    buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT wants
    with cachestat(pid=os.getpid(), include_self=True) as sampler:
        fd = os.open(data_file, os.O_RDONLY | os.O_DIRECT)
        try:
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)
        direct = sampler.sample()
        try:
            shm.write_bytes(os.urandom(4 * MIB))
            assert read_all(shm) == 4 * MIB
        finally:
            shm.unlink(missing_ok=True)
        tmpfs = sampler.sample()
    assert not direct.counts.active, direct.counts
    assert not tmpfs.counts.active, tmpfs.counts


# --- bpfscope never measures itself -------------------------------------------------------------------


def test_check_never_names_bpfscope(data_file: Path) -> None:
    """The check's page-cache and VFS rows over a window in which bpfscope's own process (this one, the
    check running in it) reads a cold file and makes 2000 reads: neither row names it, and neither
    collector holds a row of it. Asked to include itself, the collectors hold its work."""
    pid = os.getpid()
    pages = data_file.stat().st_size // PAGE_SIZE
    for include_self in (False, True):
        drop(data_file)
        with CheckWindow([PageCacheRule, VfsRule], include_self=include_self) as window:
            window.start()
            read_all(data_file)
            fd = os.open(data_file, os.O_RDONLY)
            try:
                for _ in range(2000):
                    os.pread(fd, 16, 0)
            finally:
                os.close(fd)
            report = window.finish()
            assert window.session is not None
            cache, vfs = (slot.last_sample for slot in window.session.slots)
        assert isinstance(cache, PageCacheSample) and isinstance(vfs, VfsSample)
        mine = [r.counts for r in cache.rows if r.key.tgid == pid]
        calls = [p.counts for p in vfs.processes if p.pid == pid]
        if include_self:
            assert sum(c.misses for c in mine) >= 0.98 * pages, mine
            assert sum(c.reads for c in calls) >= 2000, calls
        else:
            assert mine == [] and calls == [], (mine, calls)
            for row in report.rows:
                assert f"[{pid}]" not in row.detail and f"({pid})" not in row.detail, row


def test_cli_never_counts_itself(run_cli) -> None:
    """`bpfscope cachestat` imports numpy at its first sample, reading pages of its files through the page
    cache: its own process is no row of its output, unless --include-self."""
    for include_self in (False, True):
        args = ["--include-self"] if include_self else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "bpfscope", "cachestat", "--json", "-r", "100000", *args, "0.3", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        pids = {r["pid"] for r in own([json.loads(line) for line in out.splitlines()], "cachestat.process")}
        assert (proc.pid in pids) is include_self, (proc.pid, pids)
