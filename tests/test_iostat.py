"""iostat against sysstat's iostat and fio, on the same run.

fio runs a known pattern on vda (direct 4k random reads and random writes at fixed rates) while
``bpfscope iostat`` and sysstat's ``iostat -x`` sample the disk every second. The two read the same kernel
counters, so they can only differ by when they read them: bpfscope starts first, and sysstat is started
the moment bpfscope has taken its first reading (its "Tracing" line), so the interval boundaries of the
two are a few milliseconds apart. Then fio starts, and its whole run lies inside the window. Rates are
compared as sums over the whole window (7 intervals): a boundary offset of a few ms only moves a few
requests from one interval to the next, which cancels out over the window except at its two ends, where
fio is not running. sysstat also measures its intervals with /proc/uptime's 10 ms steps (up to 1% of a
second), which the sum averages out too.

fio's own view is exact only for its own I/O, and other processes may use vda too: so fio is compared
with the per-process figures bpfscope keeps in the kernel (fio runs with --thread: one process, its pid
known before it starts). Every one of fio's I/Os falls in some interval, so bpfscope's count of them over
fio's run time is fio's IOPS; a window inside fio's run would not do, since fio makes up for any stall
by running above its rate for a while. The disk-wide counts must be at least fio's.

Queue depth is checked where the device, not fio, sets the pace: a loop device whose I/O to the disk
under it is throttled (blk-throttle), so fio's iodepth requests sit on the device and each completion
lets one more in: the time-average on the device (device_aqu_sz) is iodepth. The depth each request
finds at issue is a little lower, since the throttle releases reads in small batches every 100 ms and
the requests that refill a batch find the others gone. On vda itself, 4k reads at iodepth 16 are bound
by fio's CPU and the disk completes them in batches: the requests that refill the queue find 1, 2, ...
16 there, a mean near 8 at issue, with aqu-sz about 10.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bpfscope.domains.block import disks as block

DISK = "vda"
FIO_FILE = Path("/var/tmp/bpfscope-test-iostat.dat")
FILE_SIZE = "256M"
INTERVALS = 7
FIO_SECONDS = 5
READ_IOPS = 2000
WRITE_IOPS = 500
# fio starts paused: the test knows its pid, and everything attaches before it runs.
LAUNCHER = "import os, sys\nsys.stdin.readline()\nos.execvp(sys.argv[1], sys.argv[1:])"


def fio_layout(path: Path, size: str) -> None:
    """Write the file once, so that reads hit the disk (holes and unwritten extents are read without I/O)."""
    layout = ["--name=layout", f"--filename={path}", f"--size={size}", "--rw=write", "--bs=1M", "--direct=1"]
    subprocess.run(["fio", *layout, "--end_fsync=1", "--output=/dev/null"], check=True, timeout=120)


@pytest.fixture(scope="module")
def fio_file() -> Iterator[Path]:
    if shutil.which("fio") is None:
        pytest.fail("fio is missing: `./setup.sh test` installs it")
    fio_layout(FIO_FILE, FILE_SIZE)
    yield FIO_FILE
    FIO_FILE.unlink(missing_ok=True)


def _wait_tracing(tool: subprocess.Popen[str], timeout: float = 30.0) -> None:
    assert tool.stderr is not None
    ready, _, _ = select.select([tool.stderr], [], [], timeout)
    assert ready, f"{tool.args} did not start within {timeout} s"
    line = tool.stderr.readline()
    assert line.startswith("Tracing"), line + tool.stderr.read()


def start_fio(args: list[str], report: Path) -> subprocess.Popen[str]:
    """fio, paused until a line arrives on its stdin."""
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "fio", *args, "--output-format=json", f"--output={report}"],
        stdin=subprocess.PIPE,
        text=True,
    )


def go(fio: subprocess.Popen[str]) -> None:
    assert fio.stdin is not None
    fio.stdin.write("go\n")
    fio.stdin.close()


def stop(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def bpfscope(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bpfscope", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def close(a: float, b: float, rel: float, floor: float = 0.0) -> bool:
    """a and b within ``rel`` of the larger, or within ``floor`` (for figures near zero that sysstat rounds
    to two decimals)."""
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), floor)


# --- The same run seen by bpfscope, sysstat and fio -------------------------------------------------


@pytest.fixture(scope="module")
def run(fio_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if shutil.which("iostat") is None:
        pytest.fail("sysstat's iostat is missing: `./setup.sh test` installs it")
    tmp = tmp_path_factory.mktemp("iostat")
    common = [f"--filename={fio_file}", f"--size={FILE_SIZE}", "--bs=4k", "--direct=1", "--ioengine=libaio"]
    common += ["--thread", "--time_based", f"--runtime={FIO_SECONDS}", "--randrepeat=0"]
    fio = start_fio(
        [
            *common,
            "--name=reads",
            "--rw=randread",
            "--iodepth=16",
            f"--rate_iops={READ_IOPS}",
            "--name=writes",
            "--rw=randwrite",
            "--iodepth=4",
            f"--rate_iops={WRITE_IOPS}",
        ],
        tmp / "fio.json",
    )
    tool = sysstat = None
    try:
        tool = bpfscope("iostat", "--json", "-d", DISK, "-r", "10", "1", str(INTERVALS))
        _wait_tracing(tool)
        sysstat = subprocess.Popen(
            ["iostat", "-x", "-d", "-y", "-o", "JSON", DISK, "1", str(INTERVALS)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        # fio's whole run lies inside the window: every one of its I/Os is in some interval.
        go(fio)
        out, err = tool.communicate(timeout=60)
        assert tool.returncode == 0, err
        sys_out, _ = sysstat.communicate(timeout=60)
        assert fio.wait(timeout=60) == 0
    finally:
        stop(fio, *(p for p in (tool, sysstat) if p is not None))
    stats = json.loads(sys_out)["sysstat"]["hosts"][0]["statistics"]
    records = [json.loads(line) for line in out.splitlines()]
    return {
        "bpfscope": [r for r in records if r["record"] == "iostat"],
        "losses": records[-1],
        "sysstat": [next(d for d in s["disk"] if d["disk_device"] == DISK) for s in stats],
        "fio": json.loads((tmp / "fio.json").read_text()),
        "fio_pid": fio.pid,
        "stderr": err,
    }


def _fio_share(run: dict) -> list[dict]:
    """fio's own line in each interval's processes (zeros where it did no I/O)."""
    zero = {"r_s": 0.0, "w_s": 0.0, "avg_device_ms": 0.0, "comm": "fio"}
    return [next((p for p in r["top"] if p["pid"] == run["fio_pid"]), zero) for r in run["bpfscope"]]


def test_same_intervals_as_sysstat(run: dict) -> None:
    ours, theirs = run["bpfscope"], run["sysstat"]
    assert len(ours) == len(theirs) == INTERVALS
    # One record per interval for the disk, in order: each ends (ts) one interval after the one before.
    assert all(r["device"] == DISK for r in ours)
    assert all(abs(r["interval_s"] - 1.0) < 0.05 for r in ours)
    for before, after in itertools.pairwise(ours):
        assert abs(after["ts"] - before["ts"] - after["interval_s"]) < 0.05, (before["ts"], after)


@pytest.mark.parametrize(
    ("ours", "theirs", "rel", "floor"),
    [
        ("r_s", "r/s", 0.02, 0.0),
        ("w_s", "w/s", 0.02, 0.0),
        ("rkb_s", "rkB/s", 0.02, 0.0),
        ("wkb_s", "wkB/s", 0.02, 0.0),
        # diskstats' io_ticks (sysstat's %util) counts whole jiffies: at this run's 0.5% utilisation an
        # interval's few milliseconds of busy time move by a jiffy at each burst (4.0 against 3.6 once
        # over the 7 intervals, a floor of 0.05 each allowing 0.35).
        ("util", "util", 0.05, 0.1),
        ("aqu_sz", "aqu-sz", 0.05, 0.005),
    ],
)
def test_matches_sysstat(run: dict, ours: str, theirs: str, rel: float, floor: float) -> None:
    a = sum(r[ours] for r in run["bpfscope"])
    b = sum(r[theirs] for r in run["sysstat"])
    assert close(a, b, rel, floor * INTERVALS), (ours, a, theirs, b)


def test_await_matches_sysstat(run: dict) -> None:
    # Means of a ratio: compared per request over the window, weighted as sysstat weighs each interval.
    for ours, theirs, rate in (("r_await", "r_await", "r/s"), ("w_await", "w_await", "w/s")):
        a = sum(r[ours] * r[rate.replace("/", "_")] for r in run["bpfscope"]) / sum(
            r[rate.replace("/", "_")] for r in run["bpfscope"]
        )
        b = sum(r[theirs] * r[rate] for r in run["sysstat"]) / sum(r[rate] for r in run["sysstat"])
        assert close(a, b, 0.05, 0.01), (ours, a, b)


def test_fio_own_iops(run: dict) -> None:
    jobs = {job["jobname"]: job for job in run["fio"]["jobs"]}
    reads, writes = jobs["reads"]["read"], jobs["writes"]["write"]
    assert close(reads["iops"], READ_IOPS, 0.02) and close(writes["iops"], WRITE_IOPS, 0.02), (
        "fio missed its rate"
    )
    mine = _fio_share(run)
    assert {p["comm"] for p in mine} == {"fio"}
    # fio's I/Os as bpfscope counted them, over fio's own run time: fio's IOPS.
    counted_reads = sum(p["r_s"] * r["interval_s"] for p, r in zip(mine, run["bpfscope"], strict=True))
    counted_writes = sum(p["w_s"] * r["interval_s"] for p, r in zip(mine, run["bpfscope"], strict=True))
    r_iops = counted_reads / (reads["runtime"] / 1000)
    w_iops = counted_writes / (writes["runtime"] / 1000)
    assert close(r_iops, reads["iops"], 0.02), (r_iops, reads["iops"])
    assert close(w_iops, writes["iops"], 0.02), (w_iops, writes["iops"])
    # The disk did fio's I/O and possibly others'.
    disk_reads = sum(r["r_s"] * r["interval_s"] for r in run["bpfscope"])
    disk_writes = sum(r["w_s"] * r["interval_s"] for r in run["bpfscope"])
    assert disk_reads >= 0.98 * reads["total_ios"] and disk_writes >= 0.98 * writes["total_ios"]


def test_latency_and_depth_are_consistent(run: dict) -> None:
    nr_requests = block.queue_limits(DISK).nr_requests
    busy = [r for r in run["bpfscope"] if r["latency_count"]]
    assert len(busy) >= FIO_SECONDS
    for r in busy:
        assert 0 < r["p50_us"] <= r["p95_us"] <= r["p99_us"] < 1_000_000, r
        assert r["nr_requests"] == nr_requests
        assert sum(r["depth_hist"].values()) == r["depth_samples"]
        assert 1 <= r["depth_mean"] <= r["depth_max"] <= nr_requests, r
    # Every request the disk completed was timed. Summed over the window: the maps are read a moment
    # after diskstats, which moves a few requests between intervals when others load the disk too.
    timed = sum(r["latency_count"] for r in run["bpfscope"])
    completed = sum((r["r_s"] + r["w_s"] + r["d_s"] + r["f_s"]) * r["interval_s"] for r in run["bpfscope"])
    # (Fails when the kernel drops completion events, as it does while other tools attach programs to
    # the same tracepoints: the tool's last line then counts request ends unseen.)
    assert close(timed, completed, 0.01, 20), (timed, completed, run["stderr"].strip().splitlines()[-1])
    # fio's latency, from before io_submit() to reaping the completion, contains each of its I/Os' device
    # time (not its clat alone: the request is often issued to the device inside io_submit()). Others'
    # requests on vda may be slower: fio's own are compared, on average.
    jobs = {job["jobname"]: job for job in run["fio"]["jobs"]}
    reads, writes = jobs["reads"]["read"], jobs["writes"]["write"]
    fio_lat_ms = (
        (reads["lat_ns"]["mean"] * reads["total_ios"] + writes["lat_ns"]["mean"] * writes["total_ios"])
        / (reads["total_ios"] + writes["total_ios"])
        / 1e6
    )
    mine = _fio_share(run)
    device_ms = sum(p["avg_device_ms"] * (p["r_s"] + p["w_s"]) for p in mine) / sum(
        p["r_s"] + p["w_s"] for p in mine
    )
    assert 0 < device_ms <= fio_lat_ms * 1.1, (device_ms, fio_lat_ms)


def test_io_pressure_in_every_interval(run: dict) -> None:
    for r in run["bpfscope"]:
        psi = r["psi_io"]
        assert 0 <= psi["full_pct"] <= psi["some_pct"] <= 100
    # The run ends with what was lost: no event missed, and request ends unseen counted (even at zero).
    losses = run["losses"]
    assert losses["record"] == "losses" and losses["collector"] == "iostat", losses
    assert losses["reasons"]["recursion"] == 0 and "unseen:unseen_ends" in losses["reasons"], losses
    assert "0 events missed" in run["stderr"]
    unseen_ends = losses["reasons"]["unseen:unseen_ends"]
    assert not unseen_ends or f"{unseen_ends} request ends unseen" in run["stderr"], run["stderr"]


# --- Queue depth where the device sets the pace -----------------------------------------------------


def _whole_disk_of(path: Path) -> block.Disk:
    st = path.stat()
    disk = block.disks(partitions=True)[block.mkdev(os.major(st.st_dev), os.minor(st.st_dev))]
    return block.resolve_disk(disk.parent) if disk.partition else disk


def _blkio_cgroup(disk: block.Disk, read_iops: int, name: str) -> tuple[Path, Path]:
    """A cgroup whose reads from ``disk`` blk-throttle holds to read_iops: cgroup v1's blkio where it is
    mounted (as on hybrid machines), else cgroup v2 with the io controller. (directory, cgroup.procs)."""
    v1 = Path("/sys/fs/cgroup/blkio")
    if (v1 / "blkio.throttle.read_iops_device").exists():
        path = v1 / name
        path.mkdir()
        (path / "blkio.throttle.read_iops_device").write_text(f"{disk.major}:{disk.minor} {read_iops}\n")
        return path, path / "cgroup.procs"
    from bpfscope.sources.cgroups import cgroup2_mounts

    for root in cgroup2_mounts():
        if "io" in (root / "cgroup.controllers").read_text().split():
            (root / "cgroup.subtree_control").write_text("+io\n")
            path = root / name
            path.mkdir()
            (path / "io.max").write_text(f"{disk.major}:{disk.minor} riops={read_iops}\n")
            return path, path / "cgroup.procs"
    pytest.fail("no blk-throttle here: neither cgroup v1 blkio nor the cgroup v2 io controller")


@contextmanager
def throttled_loop(backing: Path, read_iops: int) -> Iterator[tuple[str, Callable[[int], None]]]:
    """A loop device (direct I/O) on ``backing``, and a cgroup whose reads from the disk under the file are
    throttled to read_iops. The loop driver does its I/O on behalf of the cgroup of the task that
    submitted it, so a task in the cgroup reading the loop device sees each request stay on the loop
    device until the throttle lets its read through: a slow disk, on demand.

    Yields the loop device's name and a function that moves a process into the cgroup. fio should be
    moved once it runs: started inside, its own start-up is throttled too and takes seconds.
    """
    disk = _whole_disk_of(backing)
    loop_dev = subprocess.run(
        ["losetup", "--direct-io=on", "--find", "--show", str(backing)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    name = Path(loop_dev).name
    cgroup = None
    try:
        assert (block.SYS_BLOCK / name / "loop" / "dio").read_text().strip() == "1", "loop without direct I/O"
        cgroup, procs = _blkio_cgroup(disk, read_iops, f"bpfscope-test-{os.getpid()}")
        yield name, lambda pid: procs.write_text(f"{pid}\n")
    finally:
        subprocess.run(["losetup", "-d", loop_dev], check=False)
        if cgroup is not None:
            # Empty once fio has exited; its removal may wait for the last task to be reaped.
            for _ in range(50):
                try:
                    cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


@pytest.fixture(scope="module")
def loop_backing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loop") / "backing.dat"
    fio_layout(path, "64M")
    return path


def test_depth_near_iodepth_on_a_device_bound_disk(loop_backing: Path, tmp_path: Path) -> None:
    iodepth, iops = 16, 50
    with throttled_loop(loop_backing, read_iops=iops) as (loop, join):
        job = [f"--filename=/dev/{loop}", "--name=deep", "--rw=randread", "--bs=4k", "--direct=1", "--thread"]
        fio = start_fio(
            [*job, "--ioengine=libaio", f"--iodepth={iodepth}", "--time_based", "--runtime=6"],
            tmp_path / "fio.json",
        )
        tool = None
        try:
            go(fio)
            time.sleep(0.3)
            join(fio.pid)
            time.sleep(1.0)  # the unthrottled start drains; the queue holds iodepth requests
            tool = bpfscope("iostat", "--json", "-d", loop, "1", "3")
            out, err = tool.communicate(timeout=60)
            assert tool.returncode == 0, err
            assert fio.wait(timeout=60) == 0
        finally:
            stop(fio, *(p for p in (tool,) if p is not None))
    records = [r for line in out.splitlines() if (r := json.loads(line))["record"] == "iostat"]
    assert len(records) == 3
    expected_us = iodepth / iops * 1e6  # iodepth requests served iops a second: each waits this long
    for r in records:
        assert r["device"] == loop
        # The throttle's batches of reads fall on one side of an interval boundary or the other.
        assert close(r["r_s"], iops, 0.2), r["r_s"]
        assert r["depth_max"] == iodepth <= r["nr_requests"], (records.index(r), r)
        assert 0.5 * expected_us <= r["p50_us"] <= r["p99_us"] <= 2 * expected_us, r
        assert r["aqu_sz"] > 0.9 * iodepth and r["util"] > 95
        assert r["top"][0]["pid"] == fio.pid
    # The requests on the device when bpfscope attached are not counted: in the first interval, depth
    # reads low until they have drained (a third of a second here). From the second on:
    for r in records[1:]:
        # Over time the device holds fio's iodepth requests.
        assert 0.95 * iodepth <= r["device_aqu_sz"] <= iodepth + 0.05, r
        # Each request issued finds the others still there. The throttle lets reads through in small
        # batches (every 100 ms here), so the requests that follow a batch find a few fewer.
        assert 0.75 * iodepth <= r["depth_mean"] <= iodepth, r["depth_hist"]


def test_stops_on_sigint_with_a_summary(fio_file: Path) -> None:
    tool = bpfscope("iostat", "-d", DISK)
    try:
        _wait_tracing(tool)
        time.sleep(0.5)
        tool.send_signal(signal.SIGINT)
        out, err = tool.communicate(timeout=30)
    finally:
        stop(tool)
    assert tool.returncode == 0, err
    assert "interval total" in out and DISK in out and "r_await" in out
    assert "events missed" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-d", "nosuchdisk"], "unknown disk 'nosuchdisk'"),
        (["-p", "1"], "iostat reports whole disks"),
        (["0"], "Invalid value for '[INTERVAL]'"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "iostat", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
