"""bpfscope check: verdicts on an idle machine, on a disk made slow on purpose, the compact and verbose
views, bpfscope leaving itself out, and the rule contract.

The slow disk is a loop device whose reads from the disk under it are throttled for fio's cgroup
(blk-throttle; see test_iostat.throttled_loop): requests wait on the loop device for as long as the
throttle holds them, so its latency, queue and utilisation are those of a saturated disk while the real
disk stays nearly idle.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_iostat import _whole_disk_of, fio_layout, go, start_fio, stop, throttled_loop

from bpfscope.domains.block import health as block_health
from bpfscope.domains.block.health import DiskRule, who
from bpfscope.domains.block.iostat import DiskSample, ProcessIO
from bpfscope.errors import BpfscopeError
from bpfscope.health import rule as health_rule
from bpfscope.health.check import WIDTH, compact, compact_summary
from bpfscope.health.rule import Rule
from bpfscope.health.verdict import Report, Row, Threshold, Verdict
from bpfscope.health.window import CheckWindow, run_check
from bpfscope.runtime.collector import Collector, Config, Sample
from bpfscope.sinks.terminal import Terminal

VERDICTS = {"ok", "warn", "PROBLEM"}


def run_check_cli(*args: str) -> tuple[int, list[dict], str]:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "check", *args], capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in result.stderr, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()] if "--json" in args else []
    return result.returncode, lines, result.stdout


def resource_of(line: str, known: set[str]) -> str:
    """The resource a line of the compact view is about: its name is the resource's, then the metric's
    (``Disk vda p99``, ``Page cache hit ratio``). ``known``: the resources of a JSON run alike; a disk
    that was busy in one run only is told by its name."""
    named = [r for r in known if line.startswith(r + " ")]
    if named:
        return max(named, key=len)
    match = re.match(r"Disk \S+", line)
    assert match, (line, known)
    return match.group(0)


def check_compact(out: str, known: set[str]) -> tuple[dict[str, str], str]:
    """The compact view's lines by resource, and its summary; every line fits WIDTH columns and each
    resource has one line."""
    lines = out.rstrip("\n").splitlines()
    assert lines, out
    too_wide = [line for line in lines if len(line) > WIDTH]
    assert not too_wide, too_wide
    *rows, summary = lines
    resources = [resource_of(line, known) for line in rows]
    assert len(resources) == len(set(resources)), rows
    # Every resource of the JSON run has its line (disks aside: a virtual one shows only when busy).
    assert {r for r in known if not r.startswith("Disk ")} <= set(resources), (known, rows)
    return dict(zip(resources, rows, strict=True)), summary


def test_idle_machine_is_ok() -> None:
    rc, lines, _ = run_check_cli("--duration", "3", "--json")
    rows = {r["name"]: r for r in lines if r["record"] == "check.row"}
    summary = lines[-1]
    assert summary["record"] == "check.summary"
    # vda has a row even if nothing used it in the window (then only that one).
    assert {"CPU busy", "RAM used", "Disk vda p99"} <= set(rows)
    for row in rows.values():
        assert row["verdict"] in VERDICTS, row
        assert row["threshold"], row
    assert 0 <= rows["CPU busy"]["value"] <= 100 and 0 < rows["RAM used"]["value"] < 100
    assert 2.9 <= summary["window_s"] < 4
    # Fails, rightly, when something else keeps this machine busy: the summary says what.
    assert rc == 0 == summary["exit_code"], f"the machine is not idle: {summary['summary']}"
    assert summary["summary"].startswith("no problem found") and not summary["problem"]


def test_compact_for_people() -> None:
    _, records, _ = run_check_cli("--duration", "1", "--json")
    rc, _, out = run_check_cli("--duration", "1")
    lines, summary = check_compact(out, {r["resource"] for r in records if r["record"] == "check.row"})
    assert rc == 0, f"the machine is not idle: {summary}"
    # One line per resource, led by its telling metric.
    assert {"CPU", "RAM", "Disk vda"} <= lines.keys()
    assert lines["CPU"].startswith("CPU busy") and lines["Disk vda"].startswith("Disk vda p99")
    # Nothing wrong: no table heading, and a line that is ok carries no detail.
    assert not any(line.startswith("CHECK") for line in lines.values())
    assert all(line.endswith(" ok") or re.search(r" (warn|n/a) ", line) for line in lines.values()), lines
    assert summary.startswith("no problem found")


def test_verbose_table() -> None:
    rc, _, out = run_check_cli("--duration", "1", "--verbose")
    lines = out.strip().splitlines()
    assert rc == 0, f"the machine is not idle: {lines[-1]}"
    assert lines[0].split() == ["CHECK", "VALUE", "VERDICT", "DETAIL", "THRESHOLD"]
    assert any(line.startswith("CPU busy") for line in lines)
    assert any(line.startswith("Disk vda p99") for line in lines)
    # Every row, each with the threshold behind its verdict (a long detail may go on to the next line).
    threshold = lines[0].index("THRESHOLD")
    rows = [line for line in lines[1:-1] if not line[0].isspace()]
    assert all(line[threshold:].strip() for line in rows), lines
    assert lines[-1].startswith("no problem found")


def test_help_documents_exit_status() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "check", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "Exit status" in result.stdout and "1  at least one PROBLEM row" in result.stdout
    assert "--verbose" in result.stdout and "--include-self" in result.stdout


@pytest.fixture(scope="module")
def loop_backing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loop") / "backing.dat"
    fio_layout(path, "64M")
    return path


def test_saturated_disk_is_the_problem(loop_backing: Path, tmp_path: Path) -> None:
    with throttled_loop(loop_backing, read_iops=50) as (loop, join):
        # 32 requests served 50 a second: each waits about 640 ms on the loop device.
        job = [f"--filename=/dev/{loop}", "--name=slow", "--rw=randread", "--bs=4k", "--direct=1", "--thread"]
        fio = start_fio(
            [*job, "--ioengine=libaio", "--iodepth=32", "--time_based", "--runtime=15"], tmp_path / "f"
        )
        try:
            go(fio)
            time.sleep(0.3)
            join(fio.pid)
            time.sleep(1.0)
            rc, lines, _ = run_check_cli("--duration", "3", "--json")
            # The same disk, as people see it.
            compact_rc, _, out = run_check_cli("--duration", "3")
        finally:
            stop(fio)
    rows = {r["name"]: r for r in lines if r["record"] == "check.row"}
    summary = lines[-1]
    p99 = rows[f"Disk {loop} p99"]
    assert p99["verdict"] == "PROBLEM" and p99["value"] >= block_health.DISK_P99_PROBLEM_MS, p99
    assert "100% util" in p99["detail"] or "99% util" in p99["detail"], p99
    # The process doing the I/O is named beside the slow disk.
    assert re.search(rf"\bfio\[{fio.pid}\] does (99|100)% of the bytes", p99["detail"]), p99
    assert rows[f"Disk {loop} %util"]["verdict"] == "warn"
    # diskstats adds each request's whole time in queue at its completion, so a 3 s window gains or loses
    # part of the ~640 ms of the requests that straddle its edges (32.6 seen once): fio's 32 within 3%.
    assert 28 <= rows[f"Disk {loop} queue depth"]["value"] <= 33
    assert rc == 1 == summary["exit_code"]
    # Named first among causes, unless something else on the machine is a problem too.
    assert summary["problem"] and f"Disk {loop} p99" in summary["summary"], summary
    assert summary["summary"].startswith("PROBLEM: ") and "PSI" not in summary["summary"].split(loop)[0]
    # The real disk under it does 50 reads a second: no culprit there.
    assert rows["Disk vda p99"]["verdict"] != "PROBLEM"

    # The compact view: a line per resource within 100 columns; the slow disk's line gives its p99, the
    # verdict and who does its bytes, and the summary names it.
    assert compact_rc == 1, out
    by_resource, last = check_compact(out, {r["resource"] for r in lines if r["record"] == "check.row"})
    line = by_resource[f"Disk {loop}"]
    assert line.startswith(f"Disk {loop} p99 ") and " PROBLEM " in line, line
    assert re.search(rf"\bfio\[{fio.pid}\] does (99|100)% of the bytes", line), line
    assert last.startswith("PROBLEM: ") and f"Disk {loop} p99" in last, last


# --- bpfscope leaves itself out ------------------------------------------------------------------------

IO_FILE = Path("/var/tmp/bpfscope-test-check.dat")
IO_SIZE = 64 << 20
IO_BLOCK = 64 << 10


@pytest.fixture(scope="module")
def io_file() -> Iterator[Path]:
    fio_layout(IO_FILE, "64M")
    yield IO_FILE
    IO_FILE.unlink(missing_ok=True)


def own_io(path: Path) -> tuple[int, list[int]]:
    """Disk I/O by this process and a child of it: direct reads, and page-cache writes made durable with
    fsync. Returns the requests it made at least, and the pids that did them."""
    # Enough requests and bytes to stand out even beside another test's fio on the same disk.
    reads = 2000
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, IO_BLOCK)  # page-aligned, as O_DIRECT wants
    try:
        for _ in range(reads):
            os.preadv(fd, [buf], random.randrange(IO_SIZE // IO_BLOCK) * IO_BLOCK)
    finally:
        os.close(fd)
        buf.close()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(4 << 20), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    child = subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"])
    assert child.wait(timeout=60) == 0
    return reads + IO_SIZE // (1 << 20), [os.getpid(), child.pid]


def disk_rows_during_own_io(path: Path, include_self: bool) -> tuple[dict[str, Row], float, int, list[int]]:
    """The check's rows for the disk under ``path`` over a window in which this process did I/O; the
    window's length, the requests made and by whom."""
    disk = _whole_disk_of(path).name
    with CheckWindow([DiskRule], include_self=include_self) as window:
        window.start()
        requests, pids = own_io(path)
        report = window.finish()
    rows = {r.metric: r for r in report.rows if r.resource == f"Disk {disk}"}
    return rows, report.window_s, requests, pids


def test_check_leaves_itself_out(io_file: Path) -> None:
    # This process runs the check here: its I/O and its child's are bpfscope's own.
    rows, window_s, requests, pids = disk_rows_during_own_io(io_file, include_self=False)
    # The disk did the I/O (diskstats counts every request, whoever made it) ...
    iops = rows["IOPS r/w"]
    assert iops.value is not None and iops.value * window_s >= 0.99 * requests, (iops, window_s, requests)
    # ... but bpfscope is never named as a process doing it.
    for row in rows.values():
        assert not any(f"[{pid}]" in row.detail for pid in pids), row

    # Asked to, it watches itself too: then it is named, doing (nearly) all the bytes here.
    rows, _, _, pids = disk_rows_during_own_io(io_file, include_self=True)
    assert f"[{pids[0]}]" in rows["p99"].detail, rows["p99"]


def test_include_self_option() -> None:
    rc, lines, _ = run_check_cli("--duration", "1", "--json", "--include-self")
    assert lines and lines[-1]["record"] == "check.summary", lines
    assert rc == lines[-1]["exit_code"]


# --- The verdicts and the compact view, without the kernel -------------------------------------------


def _row(resource: str, metric: str, verdict: Verdict, symptom: bool = False, detail: str = "why") -> Row:
    return Row(resource, metric, 1.0, "", "1", verdict, "rule", detail, symptom=symptom)


def test_threshold_levels() -> None:
    limit = Threshold(20, 100, " ms")
    assert [limit.judge(v) for v in (None, 19.9, 20, 99, 100)] == [
        Verdict.OK,
        Verdict.OK,
        Verdict.WARN,
        Verdict.WARN,
        Verdict.PROBLEM,
    ]
    assert limit.describe() == "warn >= 20 ms, PROBLEM >= 100 ms"


def test_summary_names_causes_before_symptoms() -> None:
    report = Report(
        [
            _row("CPU", "busy", Verdict.OK),
            _row("Disk sdb", "p99", Verdict.PROBLEM),
            _row("Disk sdb", "queue depth", Verdict.PROBLEM),
            _row("PSI io", "some", Verdict.PROBLEM, symptom=True),
        ],
        3.0,
    )
    assert report.summary() == "PROBLEM: Disk sdb p99 1 (why); PSI io some 1"
    assert report.exit_code() == 1
    only_symptom = Report([_row("PSI io", "some", Verdict.PROBLEM, symptom=True)], 3.0)
    assert "no disk is slow" in only_symptom.summary()
    # A stall with nothing past its PROBLEM level names what warns instead (a page cache that misses).
    with_suspect = Report(
        [
            _row("Page cache", "hit ratio", Verdict.WARN),
            _row("PSI io", "some", Verdict.PROBLEM, symptom=True),
        ],
        3.0,
    )
    assert with_suspect.summary() == (
        "PROBLEM: PSI io some 1; nothing else past its PROBLEM level, but Page cache hit ratio 1 warns (why)"
    )
    warned = Report([_row("Disk sdb", "%util", Verdict.WARN)], 3.0)
    assert warned.summary() == "no problem found (warnings: Disk sdb %util)" and warned.exit_code() == 0


def test_compact_view_fits() -> None:
    long = "; ".join(f"clause {i} of a long explanation" for i in range(12))
    report = Report(
        [
            _row("CPU", "busy", Verdict.OK, detail=long),
            _row("Disk nvme0n1", "p99", Verdict.WARN, detail=long),
            _row("Disk nvme0n1", "queue depth", Verdict.PROBLEM, detail="queue full; nr_requests 256"),
            _row("Disk nvme0n1", "%util", Verdict.PROBLEM, detail=long),
            _row("PSI io", "some", Verdict.WARN, symptom=True, detail="x" * 300),
        ],
        3.0,
    )
    out = io.StringIO()
    compact(report, Terminal(out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(len(line) <= WIDTH for line in lines), lines
    cpu, disk, psi = lines
    # An ok line is name, value and verdict; a bad one adds what fits of its detail, cut between clauses.
    assert cpu.split() == ["CPU", "busy", "1", "ok"]
    # The worst row leads its resource (the first of equals: rules put the telling metric first).
    assert disk.split()[:6] == ["Disk", "nvme0n1", "queue", "depth", "1", "PROBLEM"], disk
    assert disk.endswith(" queue full; nr_requests 256"), disk
    assert psi.startswith("PSI io some") and psi.endswith("…")
    # Its last line names the resources at fault and leaves their details to the lines above.
    assert compact_summary(report) == "PROBLEM: Disk nvme0n1 queue depth 1"
    many = Report([_row(f"Disk sd{c}", "p99", Verdict.PROBLEM, detail=long) for c in "abcdefghijklm"], 3.0)
    assert len(compact_summary(many)) <= WIDTH < len(many.summary(details=False))


def test_disk_names_who_does_its_bytes() -> None:
    def proc(pid: int, mib: int) -> ProcessIO:
        return ProcessIO(pid, "dd", mib, 0, mib << 20, 0, 0, 1.0)

    counters = dict.fromkeys(("reads", "writes", "discards", "flushes"), 0)
    rates = dict.fromkeys(("r_s", "w_s", "d_s", "f_s", "rkb_s", "wkb_s", "dkb_s"), 0.0)
    rates.update(r_await=0.0, w_await=0.0, aqu_sz=0.0, util=0.0)
    disk = DiskSample("sdb", 0, 1.0, False, True, **counters, **rates)
    # Four processes, the three busiest listed: shares are of all four's bytes.
    every = [proc(1, 50), proc(2, 20), proc(3, 20), proc(4, 10)]
    disk.top, disk.process_bytes = every[:3], 100 << 20
    assert who(disk) == ["dd[1] does 50% of the bytes", "also dd[2] 20%, dd[3] 20%"]
    # Below 5% of the bytes a process is not named.
    disk.top, disk.process_bytes = [proc(1, 4)], 100 << 20
    assert who(disk) == []


# --- The rule contract, without the kernel -------------------------------------------------------------


@dataclass
class HitSample(Sample):
    ts: float
    hits: int


def test_rules_are_pluggable(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    class Probe(Collector[Config]):
        name = "probe"

        def open(self) -> None:
            events.append(f"open include_self={self.config.include_self}")

        def start(self) -> None:
            events.append("start")

        def sample(self) -> HitSample:
            events.append("sample")
            return HitSample(time.time(), 42)

        def close(self) -> None:
            events.append("close")

    class Cache(Rule):
        name = "Cache"

        def collectors(self) -> list[Collector]:
            return [Probe(Config(include_self=self.include_self))]

        def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
            sample = samples[self.collector]
            assert isinstance(sample, HitSample) and 0 < window_s < 5
            events.append("rows")
            return [Row("Cache", "hit ratio", sample.hits, "%", "42%", Verdict.PROBLEM, "rule", "why")]

        def refine(self, rows: list[Row]) -> list[Row]:
            events.append(f"refine {[r.resource for r in rows]}")
            return rows

    class Network(Rule):
        name = "Network"
        requires = ("nic",)

        def collectors(self) -> list[Collector]:
            raise AssertionError("a rule whose requirement is unmet creates no collector")

    class Broken(Collector[Config]):
        name = "broken"

        def open(self) -> None:
            raise BpfscopeError("cannot load here")

    class Sockets(Rule):
        name = "Sockets"

        def collectors(self) -> list[Collector]:
            return [Broken(Config())]

    monkeypatch.setitem(health_rule.REQUIREMENTS, "nic", lambda: "no network card")
    report = run_check(0.01, rules=[Network, Sockets, Cache], include_self=True)
    assert events == [
        "open include_self=True",
        "start",
        "sample",
        "rows",
        "refine ['Network', 'Sockets', 'Cache']",
        "close",
    ]
    assert [(r.resource, r.verdict) for r in report.rows] == [
        ("Network", Verdict.UNKNOWN),
        ("Sockets", Verdict.UNKNOWN),
        ("Cache", Verdict.PROBLEM),
    ]
    assert report.rows[0].detail == "no network card" and report.rows[0].text == "-"
    assert report.rows[1].detail == "cannot load here"
    assert report.summary().startswith("PROBLEM: Cache hit ratio")


def test_stop_ends_the_window_and_stays_the_callers() -> None:
    from bpfscope.domains.system.health import CpuRule
    from bpfscope.runtime.session import StopToken

    def open_fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    stop = StopToken()
    try:
        before = open_fds()
        report = run_check(0.05, rules=[CpuRule], stop=stop)
        assert [r.name for r in report.rows] == ["CPU busy"]
        # The window closed what it opened, and neither closed nor kept the caller's token.
        assert open_fds() == before
        os.fstat(stop.fileno())
        # Set (Ctrl-C in bpfscope check), the token ends the window at once, with the rows so far.
        stop.set("SIGINT")
        started = time.monotonic()
        report = run_check(30, rules=[CpuRule], stop=stop)
        assert time.monotonic() - started < 5 and report.window_s < 5
        assert [r.name for r in report.rows] == ["CPU busy"]
    finally:
        stop.close()
