"""Start-up: time from process start to programs attached, and peak RSS, bpfscope against bpftrace.

Both count system calls per process in a kernel hash map from raw_syscalls:sys_exit:
  bpftrace -e 'tracepoint:raw_syscalls:sys_exit { @[pid, comm] = count(); } BEGIN { printf("attached\\n"); }'
  bpfscope syscount -P
bpftrace runs BEGIN once every probe is attached; bpfscope prints "Tracing syscalls..." once its programs
are attached. The time to that line, the CPU time the process has used by then (every thread's, from
/proc/PID/task/*/schedstat: less sensitive than the wall clock to a loaded machine) and the peak RSS then
(VmHWM) are measured for each run; the median over the runs is reported. bpfscope runs byte-compiled, as
installed: its modules are compiled by the warm-up run into a cache of this benchmark's own, even where
PYTHONDONTWRITEBYTECODE is set.

    .venv/bin/python benchmarks/startup.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BPFTRACE_PROGRAM = (
    'tracepoint:raw_syscalls:sys_exit { @[pid, comm] = count(); } BEGIN { printf("attached\\n"); }'
)


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    """CPU time the process's live threads have used, in seconds."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(stat.read_text().split()[0])
    return total / 1e9


def measure(
    cmd: list[str], marker: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[float, int, float]:
    """Seconds from spawn until ``marker`` appears on stdout or stderr, the peak RSS then (kB), and the
    CPU seconds used by then."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        buffers = {proc.stdout.fileno(): "", proc.stderr.fileno(): ""}
        while True:
            ready, _, _ = select.select(list(buffers), [], [], timeout)
            if not ready:
                raise RuntimeError(f"{cmd[0]} did not attach within {timeout} s")
            for fd in ready:
                chunk = os.read(fd, 65536).decode(errors="replace")
                if not chunk and proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited: {buffers}")
                buffers[fd] += chunk
            if any(marker in text for text in buffers.values()):
                elapsed = time.perf_counter() - start
                return elapsed, _peak_rss_kb(proc.pid), _cpu_s(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    bpfscope = shutil.which("bpfscope", path=str(Path(sys.executable).parent)) or "bpfscope"
    bpftrace = shutil.which("bpftrace")
    if bpftrace is None:
        sys.exit("bpftrace is not installed (apt-get install bpftrace)")
    bytecode = tempfile.TemporaryDirectory(prefix="bpfscope-startup-")
    compiled = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    compiled["PYTHONPYCACHEPREFIX"] = bytecode.name
    peers = {
        "bpfscope": ([bpfscope, "syscount", "-P"], "Tracing syscalls", compiled),
        "bpftrace": ([bpftrace, "-e", BPFTRACE_PROGRAM], "attached", None),
    }
    results: dict[str, dict[str, float]] = {}
    samples: dict[str, list[tuple[float, int, float]]] = {name: [] for name in peers}
    # One warm-up each (page cache, bytecode), then alternate so both see the same machine state.
    with bytecode:
        for cmd, marker, env in peers.values():
            measure(cmd, marker, env)
        for _ in range(args.runs):
            for name, (cmd, marker, env) in peers.items():
                samples[name].append(measure(cmd, marker, env))
    for name, runs in samples.items():
        results[name] = {
            "startup_s": statistics.median(t for t, _, _ in runs),
            "startup_min_s": min(t for t, _, _ in runs),
            "startup_max_s": max(t for t, _, _ in runs),
            "cpu_s": statistics.median(c for _, _, c in runs),
            "peak_rss_mb": statistics.median(r for _, r, _ in runs) / 1024,
        }
    ratio_time = results["bpfscope"]["startup_s"] / results["bpftrace"]["startup_s"]
    ratio_cpu = results["bpfscope"]["cpu_s"] / results["bpftrace"]["cpu_s"]
    ratio_rss = results["bpfscope"]["peak_rss_mb"] / results["bpftrace"]["peak_rss_mb"]
    load = os.getloadavg()[0]
    if args.json:
        print(
            json.dumps(
                {
                    "runs": args.runs,
                    **results,
                    "time_ratio": ratio_time,
                    "cpu_ratio": ratio_cpu,
                    "rss_ratio": ratio_rss,
                    "load_1min": load,
                }
            )
        )
        return
    print(
        f"{'tool':10} {'start-up (median)':>18} {'(min-max)':>12} {'CPU (median)':>13} {'peak RSS':>10}"
        f"   over {args.runs} runs, load {load:.1f} on {os.cpu_count()} CPUs"
    )
    for name, r in results.items():
        span = f"{r['startup_min_s'] * 1000:.0f}-{r['startup_max_s'] * 1000:.0f} ms"
        print(
            f"{name:10} {r['startup_s'] * 1000:15.0f} ms {span:>12} {r['cpu_s'] * 1000:10.0f} ms"
            f" {r['peak_rss_mb']:7.1f} MB"
        )
    print(
        f"bpfscope / bpftrace: start-up {ratio_time:.2f}x (target <= 1), CPU {ratio_cpu:.2f}x, "
        f"peak RSS {ratio_rss:.2f}x (target <= 0.5)"
    )


if __name__ == "__main__":
    main()
