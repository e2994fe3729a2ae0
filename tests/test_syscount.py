"""syscount against a known workload: a child makes an exact number of calls while it is traced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import trace_workload

WORKLOAD = """
for _ in range(1000):
    os.getppid()
for _ in range(300):
    try:
        os.close(-1)
    except OSError:
        pass
for _ in range(40):
    time.sleep(0.004)
"""


def _traced_run(*args: str, cgroup: Path | None = None) -> list[dict]:
    """Trace the workload child by pid, or by the cgroup it moves itself into before it starts; the
    per-syscall records (the run's losses record, which ends the output, is checked and left out)."""
    work = WORKLOAD
    selector = ["-p", "{pid}"]
    if cgroup is not None:
        # The child joins the cgroup once the tool has attached, then does its work.
        work = f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n" + WORKLOAD
        selector = ["--cgroup", str(cgroup)]
    out, _ = trace_workload(["syscount", *selector, "--json", *args], work)
    *records, losses = [json.loads(line) for line in out.splitlines()]
    assert losses["record"] == "losses" and losses["total"] == 0, losses
    assert all(r["record"] == "syscount.syscall" for r in records), records
    return records


def test_counts_and_errors_are_exact() -> None:
    rows = {r["syscall"]: r for r in _traced_run("-r", "100")}
    assert rows["getppid"]["count"] == 1000
    assert rows["getppid"]["errors"] == 0
    assert rows["close"]["errors"] == 300
    assert rows["close"]["count"] >= 300
    # Without an interval the whole run is one interval, reported once at its end.
    assert len({(r["ts"], r["interval_s"]) for r in rows.values()}) == 1
    assert all(r["interval_s"] > 0 for r in rows.values())


def test_latency_percentiles_of_known_sleeps() -> None:
    rows = {r["syscall"]: r for r in _traced_run("-L", "--syscall", "clock_nanosleep")}
    assert set(rows) == {"clock_nanosleep"}
    sleep = rows["clock_nanosleep"]
    assert sleep["count"] == 40
    # Each call sleeps 4 ms plus timer slack and wake-up latency.
    assert 4000 <= sleep["p50_us"] <= 6000
    assert 4000 <= sleep["avg_us"] <= 8000
    assert sleep["p50_us"] <= sleep["p99_us"] <= sleep["p999_us"]


def test_cgroup_filter_sees_only_that_cgroup(cgroup: Path) -> None:
    # A busy process outside the cgroup must not be counted.
    noise = subprocess.Popen([sys.executable, "-c", "import os\nwhile True: os.getppid()"])
    try:
        rows = {r["syscall"]: r for r in _traced_run("-r", "100", cgroup=cgroup)}
    finally:
        noise.kill()
        noise.wait()
    assert rows["getppid"]["count"] == 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--syscall", "opnat"], "unknown syscall 'opnat' (did you mean openat"),
        (["-p", "999999999"], "no process with pid 999999999"),
        (["--cgroup", "no/such/group"], "no cgroup v2 directory"),
        (["0"], "Invalid value for '[INTERVAL]'"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "syscount", *args], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
