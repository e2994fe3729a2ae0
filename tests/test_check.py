"""bpfscope check: verdicts on an idle machine, on a disk made slow on purpose, and the provider framework.

The slow disk is a loop device whose reads from the disk under it are throttled for fio's cgroup
(blk-throttle; see test_iostat.throttled_loop): requests wait on the loop device for as long as the
throttle holds them, so its latency, queue and utilisation are those of a saturated disk while the real
disk stays nearly idle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_iostat import fio_layout, go, start_fio, stop, throttled_loop

from bpfscope.health import check
from bpfscope.health.check import Provider, Report, Row, Threshold, Verdict, run_check

VERDICTS = {"ok", "warn", "PROBLEM"}


def run_check_cli(*args: str) -> tuple[int, list[dict], str]:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "check", *args], capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in result.stderr, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()] if "--json" in args else []
    return result.returncode, lines, result.stdout


def test_idle_machine_is_ok() -> None:
    rc, lines, _ = run_check_cli("--duration", "3", "--json")
    rows = {r["name"]: r for r in lines if r["kind"] == "row"}
    summary = lines[-1]
    assert summary["kind"] == "summary"
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


def test_table_for_people() -> None:
    rc, _, out = run_check_cli("--duration", "1")
    lines = out.strip().splitlines()
    assert rc == 0, f"the machine is not idle: {lines[-1]}"
    assert lines[0].split()[:3] == ["CHECK", "VALUE", "VERDICT"]
    assert any(line.startswith("CPU busy") for line in lines)
    assert any(line.startswith("Disk vda p99") for line in lines)
    assert lines[-1].startswith("no problem found")


def test_help_documents_exit_status() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "check", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "Exit status" in result.stdout and "1  at least one PROBLEM row" in result.stdout


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
            [*job, "--ioengine=libaio", "--iodepth=32", "--time_based", "--runtime=7"], tmp_path / "f"
        )
        try:
            go(fio)
            time.sleep(0.3)
            join(fio.pid)
            time.sleep(1.0)
            rc, lines, _ = run_check_cli("--duration", "3", "--json")
        finally:
            stop(fio)
    rows = {r["name"]: r for r in lines if r["kind"] == "row"}
    summary = lines[-1]
    p99 = rows[f"Disk {loop} p99"]
    assert p99["verdict"] == "PROBLEM" and p99["value"] >= check.DISK_P99_PROBLEM_MS, p99
    assert "100% util" in p99["detail"] or "99% util" in p99["detail"], p99
    assert rows[f"Disk {loop} %util"]["verdict"] == "warn"
    assert 28 <= rows[f"Disk {loop} queue depth"]["value"] <= 32.5
    assert rc == 1 == summary["exit_code"]
    # Named first among causes, unless something else on the machine is a problem too.
    assert summary["problem"] and f"Disk {loop} p99" in summary["summary"], summary
    assert summary["summary"].startswith("PROBLEM: ") and "PSI" not in summary["summary"].split(loop)[0]
    # The real disk under it does 50 reads a second: no culprit there.
    assert rows["Disk vda p99"]["verdict"] != "PROBLEM"


# --- The framework, without the kernel ---------------------------------------------------------------


def _row(resource: str, metric: str, verdict: Verdict, symptom: bool = False) -> Row:
    return Row(resource, metric, 1.0, "", "1", verdict, "rule", "why", symptom=symptom)


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


def test_providers_are_pluggable(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    class Cache(Provider):
        name = "Cache"

        def prepare(self) -> None:
            events.append("prepare")

        def start(self) -> None:
            events.append("start")

        def rows(self, window_s: float) -> list[Row]:
            events.append("rows")
            return [_row("Cache", "hit ratio", Verdict.PROBLEM)]

        def close(self) -> None:
            events.append("close")

    class Network(Provider):
        name = "Network"
        requires = ("nic",)

    monkeypatch.setitem(check.REQUIREMENTS, "nic", lambda: "no network card")
    report = run_check(0.01, providers=[Network, Cache])
    assert events == ["prepare", "start", "rows", "close"]
    assert [(r.resource, r.verdict) for r in report.rows] == [
        ("Network", Verdict.UNKNOWN),
        ("Cache", Verdict.PROBLEM),
    ]
    assert report.rows[0].detail == "no network card"
    assert report.summary().startswith("PROBLEM: Cache hit ratio")
