"""writeback against a known amount of dirty data flushed by syncfs, on a file system of the test's own.

The file system is ext4 on a loop device made for the test, so its backing device (bdi "7:N") is
nobody else's: whatever other tests write to the machine's disks, the flushes of this bdi are ours.
Written with buffered writes and flushed with `sync -f` (syncfs), the data is written back by the
flusher threads with reason "sync": the pages they report must be the pages written, plus at most a few
pages of file system metadata that ext4 keeps in the block device's page cache (bitmaps, inode tables),
which go to the same bdi. Measured here: exactly the data pages (4096 for 16 MiB), with the device
taking 6 more pages of journal and metadata that jbd2 writes without the flusher.

Two independent counts of the same run bound it from the other side: the loop device's sectors written
(/sys/block/loopN/stat, data + journal + metadata) and /proc/vmstat nr_written (every page written back on
the machine, the loop's backing file on the real disk included) are at least the flushed pages.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RunCli, trace_workload

from bpfscope.domains.cache.health import WritebackRule
from bpfscope.domains.cache.writeback import PAGE_SIZE, WritebackCollector, WritebackConfig, reason_names
from bpfscope.health.verdict import Report, Verdict
from bpfscope.health.window import CheckWindow

DATA_MIB = 16
DATA_PAGES = DATA_MIB * (1 << 20) // PAGE_SIZE
# ext4 metadata the flusher may write to the same bdi with the data: 64 pages (256 KiB) is many times the
# block and inode bitmaps and inode table blocks one file touches.
METADATA_PAGES = 64


@dataclass
class LoopFs:
    mount: Path
    device: str  # loopN
    bdi: str  # major:minor, the bdi's name

    def set_limits(self, strict: bool, max_ratio: int | None = None, max_bytes: int | None = None) -> None:
        bdi = Path(f"/sys/class/bdi/{self.bdi}")
        (bdi / "strict_limit").write_text("1" if strict else "0")
        if max_ratio is not None:
            (bdi / "max_ratio").write_text(str(max_ratio))
        if max_bytes is not None:
            (bdi / "max_bytes").write_text(str(max_bytes))

    def sectors_written(self) -> int:
        return int(Path(f"/sys/block/{self.device}/stat").read_text().split()[6])


@pytest.fixture(scope="module")
def loop_fs() -> Iterator[LoopFs]:
    base = Path(f"/var/tmp/bsd-wb-{os.getpid()}")
    image, mount = base.with_suffix(".img"), base.with_suffix(".mnt")
    subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
    device = ""
    try:
        device = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
        mount.mkdir()
        subprocess.run(["mount", device, str(mount)], check=True)
        name = Path(device).name
        fs = LoopFs(mount, name, Path(f"/sys/block/{name}/dev").read_text().strip())
        # A loop disk keeps its bdi's limits from one attachment to the next: start from the defaults.
        fs.set_limits(strict=False, max_ratio=100)
        yield fs
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        if device:
            subprocess.run(["losetup", "-d", device], capture_output=True)
        if mount.exists():
            mount.rmdir()
        image.unlink(missing_ok=True)


def write_and_syncfs(path: Path, mib: int) -> None:
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(b"w" * (1 << 20))
    subprocess.run(["sync", "-f", str(path)], check=True)


def test_reason_names_from_the_tracepoint_format() -> None:
    names = reason_names()
    assert {"background", "vmscan", "sync", "periodic"} <= set(names.values()), names


def test_syncfs_pages_are_the_data_written(loop_fs: LoopFs) -> None:
    with WritebackCollector(WritebackConfig()) as sampler:
        sampler.open()
        sampler.start()
        sectors = loop_fs.sectors_written()
        write_and_syncfs(loop_fs.mount / "sync.dat", DATA_MIB)
        sample = sampler.sample()
        sectors = loop_fs.sectors_written() - sectors
    ours = [f for f in sample.flushes if f.bdi == loop_fs.bdi]
    pages = {f.reason: f.pages for f in ours}
    assert DATA_PAGES <= pages.get("sync", 0) <= DATA_PAGES + METADATA_PAGES, ours
    # No other reason wrote our data (a periodic flush may run, with nothing old enough to write).
    assert sum(pages.values()) <= DATA_PAGES + METADATA_PAGES, ours
    assert sectors * 512 >= pages["sync"] * PAGE_SIZE, (sectors, pages)
    assert sample.written_pages >= pages["sync"], sample.written_pages
    assert sample.dirtied_pages >= DATA_PAGES, sample.dirtied_pages


def test_cli_json(loop_fs: LoopFs) -> None:
    path = loop_fs.mount / "cli.dat"
    workload = f"""
with open({str(path)!r}, "wb") as f:
    for _ in range({DATA_MIB}):
        f.write(b"c" * (1 << 20))
os.system("sync -f {path}")
"""
    out, err = trace_workload(["writeback", "--json", "0.5"], workload)
    lines = [json.loads(line) for line in out.splitlines()]
    summaries = [r for r in lines if r["record"] == "writeback"]
    assert summaries and all(r["dirty_limit_mb"] >= r["background_limit_mb"] > 0 for r in summaries)
    assert all(r["interval_s"] > 0 for r in summaries) and lines[-1]["record"] == "losses", lines
    sync_pages = sum(
        r["pages"]
        for r in lines
        if r["record"] == "writeback.flush" and r["bdi"] == loop_fs.bdi and r["reason"] == "sync"
    )
    assert DATA_PAGES <= sync_pages <= DATA_PAGES + METADATA_PAGES, lines
    assert "writeback:" in err and "flushes" in err


def test_table(loop_fs: LoopFs, run_cli: RunCli) -> None:
    result = run_cli("writeback", "0.3", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("dirty ") == 2 and "limit" in result.stdout


@pytest.mark.parametrize(
    "args",
    [["writeback", "-p", "999999999"], ["writeback", "--cgroup", "/bsd-no-such"], ["writeback", "1", "0"]],
)
def test_bad_input(run_cli: RunCli, args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def check_with_writer(path: Path, mib: int) -> Report:
    """The rule's rows over a window in which dd writes ``mib`` MiB to ``path`` and syncfs flushes it; the
    window closes once they are done, so their flushes and pauses are all inside it. They are this
    process's children: bpfscope's own, which the window is asked to include."""
    with CheckWindow([WritebackRule], include_self=True) as window:
        window.start()
        command = f"dd if=/dev/zero of={path} bs=1M count={mib} status=none; sync -f {path}"
        subprocess.run(["sh", "-c", command], check=True, timeout=60)
        return window.finish()


def test_check_rule(loop_fs: LoopFs) -> None:
    report = check_with_writer(loop_fs.mount / "check.dat", DATA_MIB)
    rows = {r.metric: r for r in report.rows}
    assert set(rows) == {"dirty", "writers throttled"}
    # A writer flushing its own 16 MiB is no fault: dirty stays far below the limits (GiBs here).
    dirty = rows["dirty"]
    assert dirty.verdict is Verdict.OK and dirty.value is not None and dirty.value >= 0
    assert "sync" in dirty.detail and "MB (limit)" in dirty.threshold, dirty
    throttled = rows["writers throttled"]
    assert throttled.verdict is Verdict.OK and throttled.value is not None, throttled


def test_check_rule_throttled_writer(throttled_bdi: LoopFs) -> None:
    # Measured: dd asleep about 300 ms of a 1 s window (30%): a PROBLEM, dd named.
    report = check_with_writer(throttled_bdi.mount / "slow.dat", DATA_MIB)
    throttled = next(r for r in report.rows if r.metric == "writers throttled")
    assert throttled.verdict in (Verdict.WARN, Verdict.PROBLEM), throttled
    assert throttled.detail.startswith("most: dd ("), throttled


@pytest.fixture
def throttled_bdi(loop_fs: LoopFs) -> Iterator[LoopFs]:
    """The loop's bdi held to 1 MiB of dirty pages (strict_limit: even far below the global limits), so
    that balance_dirty_pages() throttles whoever writes to it, and only them."""
    loop_fs.set_limits(strict=True, max_bytes=1 << 20)
    try:
        yield loop_fs
    finally:
        loop_fs.set_limits(strict=False, max_ratio=100)  # max_ratio 100 clears max_bytes


def jiffy_ms() -> float:
    """The kernel's tick (CONFIG_HZ), or the longest usual one (HZ=100) when the config is not readable."""
    config = Path(f"/boot/config-{os.uname().release}")
    text = config.read_text() if config.exists() else ""
    hz = next((int(line[10:]) for line in text.splitlines() if line.startswith("CONFIG_HZ=")), 100)
    return 1000 / hz


THROTTLED_WORKLOAD = """
import json
start, cpu = time.monotonic(), os.times()
with open({path!r}, "wb") as f:
    for _ in range({mib}):
        f.write(b"t" * (1 << 20))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
cpu_after = os.times()
json.dump({{
    "wall_ms": (time.monotonic() - start) * 1000,
    "cpu_ms": (cpu_after.user + cpu_after.system - cpu.user - cpu.system) * 1000,
    "voluntary_switches": int(status["voluntary_ctxt_switches"]),
}}, open({report!r}, "w"))
"""


def test_throttled_writer(throttled_bdi: LoopFs, tmp_path: Path) -> None:
    """The writer's own clock and scheduler counts bound what the tool reports: each pause is a sleep (a
    voluntary context switch), and the time asleep in them fits in the writer's wall time minus its
    CPU time, give or take the CPU time's ticks and a jiffy per pause (a pause of n jiffies sleeps
    between n - 1 and n of them)."""
    report = tmp_path / "writer.json"
    workload = THROTTLED_WORKLOAD.format(path=str(throttled_bdi.mount / "t.dat"), mib=64, report=str(report))
    out, _ = trace_workload(["writeback", "--json", "-p", "{pid}", "0.5"], workload)
    writer = json.loads(report.read_text())
    lines = [json.loads(line) for line in out.splitlines()]
    throttled = [r for r in lines if r["record"] == "writeback.throttled"]
    pauses = sum(r["pauses"] for r in throttled)
    pause_ms = sum(r["pause_ms"] for r in throttled)
    assert pauses > 0 and all(r["comm"].startswith("python") for r in throttled), throttled
    assert pauses <= writer["voluntary_switches"], (pauses, writer)
    # Measured: 63 pauses, 964 ms reported, the writer 1244 ms wall and 50 ms CPU, 66 voluntary switches.
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    slack_ms = 2 * tick_ms + pauses * jiffy_ms()
    assert pause_ms <= writer["wall_ms"] - writer["cpu_ms"] + slack_ms, (pause_ms, writer)
    summaries = [r for r in lines if r["record"] == "writeback"]
    assert sum(r["throttled_pauses"] for r in summaries) == pauses
