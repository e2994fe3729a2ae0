"""The cache analysis experiment in its short mode (PostgreSQL in a memory cgroup at three RAM limits):
the conclusions it draws must hold, and bpfscope's page-cache and VFS counts must agree with the kernel's
own per-process and per-cgroup accounting of the same window."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bpfscope.domains.system.health import RAM_WARN_PCT

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "cache-analysis" / "run.py"
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("cache-analysis")
    run = subprocess.run(
        [sys.executable, str(EXPERIMENT), "--short", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def by_limit(results: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(results["settings"], key=lambda s: s["limit_mb"])


def own_cpu_pct(setting: dict[str, Any]) -> float:
    """The CPU the experiment used (server and pgbench), in percent of the machine."""
    return setting["cpu_busy_pct"] - setting["cpu_others_pct"]


def test_less_ram_fewer_hits_more_disk_reads_lower_tps(results: tuple[Path, dict[str, Any]]) -> None:
    _, data = results
    settings = by_limit(data)
    # bpfscope's cachestat and vfsstat measured every window.
    assert all(s["cache"]["lookups"] > 0 and s["vfs_reads"] > 0 for s in settings), settings
    ratios = [s["cache"]["hit_ratio"] for s in settings]
    # Disk reads per transaction: per second they are capped by the volume's IOPS limit whenever the
    # cache misses, so what grows as RAM shrinks is how many each query costs.
    disk_per_tx = [s["cgroup_read_ios"] / (s["tps"] * s["seconds"]) for s in settings]
    # The smallest limit holds about a third of the data set, the middle one two thirds, the largest all
    # of it: uniform random lookups make the hit ratio follow, steps far apart from any noise.
    assert ratios[0] + 10 < ratios[1] < ratios[2] - 10, ratios
    assert ratios[0] < 60 and ratios[-1] > 99, ratios
    assert disk_per_tx[0] > 1.3 * disk_per_tx[1] > 1.3 * disk_per_tx[2], disk_per_tx
    assert disk_per_tx[-1] < 0.01, disk_per_tx
    # TPS rises with RAM: starved, each query waits for the volume (about 3000 TPS at 3000 reads/s);
    # cached, it runs at CPU speed (about 50000 TPS alone on this machine). Other programs on this 2-CPU
    # machine can take half of it in a window, hence only 3x asserted.
    tps = [s["tps"] for s in settings]
    assert tps[0] < tps[1] and tps[-1] > 3 * tps[0], tps
    assert data["read_iops"] and disk_per_tx[0] * tps[0] <= 1.05 * data["read_iops"], "the throttle held"
    # Meanwhile the machine's RAM looks unremarkable to a dashboard, while the server's own cgroup is full;
    # so does the CPU the starved server uses (its own share: the machine's busy time less other programs').
    for s in settings:
        assert s["ram_used_pct"] < RAM_WARN_PCT, s
        rows = [r for r in s["check"] if r["record"] == "check.row"]
        ram = next(r for r in rows if r["resource"] == "RAM" and r["metric"] == "used")
        assert ram["verdict"] == "ok", ram  # and so bpfscope check says, over the same window
    assert own_cpu_pct(settings[0]) < 50, settings[0]
    smallest = settings[0]
    assert smallest["memory_after"]["usage_in_bytes"] > 0.9 * smallest["limit_mb"] * (1 << 20)


def test_bpfscope_agrees_with_the_kernels_accounting(results: tuple[Path, dict[str, Any]]) -> None:
    """bpfscope and the independent counters are read back to back at the window's start and end; tens of
    thousands of pages a second pass in the few milliseconds between, out of hundreds of thousands in the
    window: a 2% tolerance on counts holds that with room (measured: within 1%)."""
    _, data = results
    for s in by_limit(data):
        cache, io = s["cache"], s["proc_io"]
        # Lookups by read calls, against the bytes those calls returned.
        assert cache["read_pages"] == pytest.approx(io["rchar"] / PAGE, rel=0.02), s
        # Misses (pages brought in, for reads and faults), against the bytes the cgroup read from disk.
        assert cache["misses"] == pytest.approx(s["cgroup_read_bytes"] / PAGE, rel=0.02, abs=200), s
        # The independent hit ratio counts read calls only; bpfscope's also counts the server's page faults
        # on its mapped binary and libraries, which the cgroup's limit evicts and brings back (mostly hits).
        # Their share of the lookups bounds the difference, beside the counts' 2%.
        faults = 100.0 * cache["fault_pages"] / cache["lookups"]
        assert abs(cache["hit_ratio"] - s["truth_hit_ratio"]) <= 2.0 + faults, s
        # VFS reads: read calls counted by vfsstat, against the processes' own read-call counters.
        assert s["vfs_reads"] == pytest.approx(io["syscr"], rel=0.02), s


def test_cachestat_command_shows_the_same(results: tuple[Path, dict[str, Any]]) -> None:
    """`bpfscope cachestat --json --cgroup PATH 1` beside the collector: its whole seconds inside the window
    give the same hit ratio. They cover most of the window but not all of it, and one second's ratio
    moves by a few points at the smallest limit (25-30% measured), hence 5 points."""
    _, data = results
    for s in by_limit(data):
        records = s["cachestat_cli"]
        assert sum(r["interval_s"] for r in records) >= s["seconds"] / 2, s
        lookups, misses = sum(r["lookups"] for r in records), sum(r["misses"] for r in records)
        assert 100.0 * (lookups - misses) / lookups == pytest.approx(s["cache"]["hit_ratio"], abs=5.0), s


def test_report_states_where_more_ram_stops_paying(results: tuple[Path, dict[str, Any]]) -> None:
    out, data = results
    report = (out / "report.md").read_text()
    largest = by_limit(data)[-1]
    assert f"Adding RAM stops paying at **{largest['limit_mb']} MB**" in report
    assert (out / "tps_hit_ratio_vs_ram.png").read_bytes()[:4] == b"\x89PNG"


def leftovers(pid: int) -> list[str]:
    found = [str(p) for p in Path("/var/tmp").glob(f"bse-cache-{pid}-*")]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/bse-cache-{pid}")]
    return found


def _signals_as_a_terminal_leaves_them() -> None:
    """In the child: SIGINT and SIGTERM unblocked and at their defaults. A blocked signal mask is
    inherited across exec, and something earlier in a full test run leaves SIGINT blocked in this
    process: the experiment then never saw the Ctrl-C and ran to its end (twice in full runs; with
    SIGINT blocked before pytest starts, the test fails the same way without this)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_run_cleans_up(tmp_path: Path, how: str) -> None:
    """Ctrl-C (SIGINT to the whole foreground group, as a terminal sends it) or SIGTERM (to the experiment
    alone) in the middle of a measurement: the server stops, its cgroups and files go, one line says so."""
    proc = subprocess.Popen(
        [sys.executable, str(EXPERIMENT), "--short", "--out", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=_signals_as_a_terminal_leaves_them,
    )
    assert proc.stderr is not None
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 120)
        assert ready and proc.stderr.readline().startswith("loading"), "the experiment did not start"
        time.sleep(8)  # past the load, inside the first setting
        assert leftovers(proc.pid), "the experiment's cgroups and directory should exist while it runs"
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, err  # its last lines say where the interrupt went
    assert err.strip().splitlines()[-1].startswith("cache-analysis: interrupted"), err
    assert leftovers(proc.pid) == []


def test_failure_cleans_up(tmp_path: Path) -> None:
    """A RAM limit too small for the server: the memory cgroup's OOM killer stops it from starting; one
    line says why, and nothing is left behind."""
    run = subprocess.Popen(
        [sys.executable, str(EXPERIMENT), "--scale", "1", "--limits", "4", "--out", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1
    assert err.strip().splitlines()[-1] == (
        "cache-analysis: PostgreSQL did not start: the RAM limit is too small for the server itself"
    ), err
    assert leftovers(run.pid) == []


def test_not_root_is_one_line() -> None:
    run = subprocess.run(
        [sys.executable, str(EXPERIMENT), "--short"],
        capture_output=True,
        text=True,
        timeout=60,
        user="nobody",
        cwd="/",
    )
    assert run.returncode != 0
    assert (
        run.stderr.strip()
        == "cache-analysis: run it as root: it starts PostgreSQL in cgroups and loads BPF programs"
    )
