"""bpfscope secure's process cache: its resident memory with many live processes (target: 65,536 processes
in at most 64 MB RSS).

The machine's pid_max bounds how many processes can live at once (32,768 here): the benchmark starts as
many sleeping processes as fit (--processes, at most pid_max less a margin), starts the tool (which seeds
its caches from /proc), and reads its VmRSS once it traces; then the same with only the machine's own
processes. The cost per cached process is the difference over the count, and the figure for 65,536 is
the baseline plus that cost times 65,536 (the kernel's cache is charged to the kernel, not to RSS).

    .venv/bin/python benchmarks/secure_cache.py [--processes N] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
TARGET_PROCESSES = 65_536


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and its parts: RssAnon is the process's own memory (the caches); RssFile is mapped files,
    among them the ring buffers (kernel memory mapped twice over, as the ring's layout wants)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB", status, re.M)}


def wait_for_execs(count: int, timeout_s: float = 120.0) -> None:
    """Until ``count`` sleepers run their own command line (each executes itself again after its fork)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = 0
        for entry in Path("/proc").iterdir():
            try:
                done += entry.name.isdigit() and (entry / "cmdline").read_bytes().endswith(b"\0child\0")
            except OSError:
                continue
        if done >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the sleepers did not all execute within {timeout_s:g} s")


def measure() -> dict[str, float]:
    """The tool's memory once it traces, and how many processes it holds."""
    tool = subprocess.Popen(
        [common.bpfscope(), "secure", "--no-default-policy", "--cache-size", "262144"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert tool.stderr is not None
    started = time.monotonic()
    line = tool.stderr.readline()
    if not line.startswith("Tracing"):
        raise RuntimeError(f"bpfscope secure did not start: {line}{tool.stderr.read()}")
    seeded_s = time.monotonic() - started
    time.sleep(1.0)
    memory = memory_kb(tool.pid)
    tool.send_signal(signal.SIGINT)
    _, err = tool.communicate(timeout=120)
    cached = int(re.search(r"(\d+) processes cached", err).group(1))  # type: ignore[union-attr]
    return {
        "processes_cached": cached,
        "rss_mb": memory["VmRSS"] / 1024,
        "peak_rss_mb": memory["VmHWM"] / 1024,
        "anon_mb": memory["RssAnon"] / 1024,
        "file_mb": memory["RssFile"] / 1024,
        "start_s": seeded_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=None, help="Sleeping processes to start.")
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="Each sleeper with a command line of its own (default: forked, sharing their parent's).",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    running = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit())
    wanted = args.processes or min(TARGET_PROCESSES, pid_max - running - 2000)
    with tempfile.TemporaryDirectory(prefix="bpfscope-cache-") as tmp:
        binary = Path(tmp) / "sleepers"
        subprocess.run(
            ["gcc", "-O2", "-static", "-o", str(binary), str(HERE / "secure_sleepers.c")], check=True
        )
        baseline = measure()
        sleepers = subprocess.Popen(
            [str(binary), str(wanted), *(["distinct"] if args.distinct else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert sleepers.stdin is not None and sleepers.stdout is not None
        try:
            started = int(sleepers.stdout.readline().split()[1])
            if args.distinct:
                wait_for_execs(started)
            loaded = measure()
        finally:
            sleepers.stdin.write("end\n")
            sleepers.stdin.close()
            sleepers.wait(timeout=120)
    added = loaded["processes_cached"] - baseline["processes_cached"]
    per_process_kb = (loaded["rss_mb"] - baseline["rss_mb"]) * 1024 / added
    more = per_process_kb * (TARGET_PROCESSES - baseline["processes_cached"]) / 1024
    at_target = baseline["rss_mb"] + more
    report = {
        "distinct_command_lines": args.distinct,
        "pid_max": pid_max,
        "sleepers_started": started,
        "baseline": baseline,
        "loaded": loaded,
        "kb_per_cached_process": per_process_kb,
        "rss_mb_at_65536": at_target,
        "anon_mb_at_65536": baseline["anon_mb"] + more,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"baseline: {baseline['processes_cached']:.0f} processes cached, RSS {baseline['rss_mb']:.1f} MB; "
        f"with {started} sleepers: {loaded['processes_cached']:.0f} cached, RSS {loaded['rss_mb']:.1f} MB "
        f"(peak {loaded['peak_rss_mb']:.1f}), started in {loaded['start_s']:.1f} s; "
        f"{per_process_kb:.2f} kB per process; at 65,536 processes: {at_target:.1f} MB "
        f"({report['anon_mb_at_65536']:.1f} MB of it the process's own, the rest mapped files and rings)"
    )


if __name__ == "__main__":
    main()
