"""What continuous profiling costs: CPU (user space plus the BPF programs' own run time, from
bpf_stats) as a share of the whole machine, and peak RSS, of `bpfscope profile` sampling every CPU of a
busy machine, against peers in the same run: `perf record -F HZ -g -a` (CPU and data written) and
py-spy (`py-spy record --rate HZ`, one Python process). Then the time to symbolise a binary from a cold
cache and again from the cache.

The machine is kept busy by two workloads built here: a C program without frame pointers and a CPython
program (each spending 60/30/10 of its time in three functions), one per CPU.

    .venv/bin/python benchmarks/profile_overhead.py [--seconds S] [--json]

With ``--baseline SRC`` (the ``src`` directory of another tree, its BPF objects built: ``git archive REV
src | tar -x -C DIR``, then ``python DIR/src/bpfscope/build.py``) it measures a change instead: `bpfscope
profile` at 19 Hz from that tree and from this one in turn, ``--repeat`` times, on the same workloads,
so that both see the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import common
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_profile import SHARES_C, SHARES_PY  # noqa: E402  (the workloads the accuracy tests use)


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of a process and its children, living or waited for."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def peak_rss_mb(proc: psutil.Process) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bpf_programs(names: set[str]) -> dict[int, int]:
    """Run time (kernel.bpf_stats_enabled=1) of each loaded BPF program with one of these names, by id."""
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=True)
    return {p["id"]: int(p.get("run_time_ns", 0)) for p in json.loads(out.stdout) if p.get("name") in names}


def bpf_run_ns(names: set[str], ids: set[int]) -> int:
    """Run time of these programs (one that has gone counts 0)."""
    return sum(ns for id_, ns in bpf_programs(names).items() if id_ in ids)


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(before)


def measure(
    cmd: list[str],
    marker: str | None,
    seconds: float,
    bpf_names: set[str],
    warmup: float,
    env: dict[str, str] | None = None,
) -> dict[str, float]:
    """Run a tool for ``seconds`` after ``warmup`` seconds (after ``marker`` on stderr, if any): its CPU
    share of the machine in the steady state (a continuous profiler's cost), peak RSS, and the BPF time
    of its programs."""
    # The tool's own programs: those loaded while it starts (other tools on the machine may run
    # programs of the same name).
    others = set(bpf_programs(bpf_names))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    if marker:
        line = proc.stderr.readline()
        if marker not in line:
            raise RuntimeError(f"{cmd[0]} did not start: {line}")
    ids = set(bpf_programs(bpf_names)) - others
    ps = psutil.Process(proc.pid)
    time.sleep(warmup)
    cpu0, bpf0, t0 = cpu_seconds(ps), bpf_run_ns(bpf_names, ids), time.monotonic()
    time.sleep(seconds)
    cpu1, bpf1, rss = cpu_seconds(ps), bpf_run_ns(bpf_names, ids), peak_rss_mb(ps)
    elapsed = time.monotonic() - t0
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    machine = elapsed * (os.cpu_count() or 1)
    return {
        "user_pct": round(100 * (cpu1 - cpu0) / machine, 3),
        "bpf_pct": round(100 * (bpf1 - bpf0) / 1e9 / machine, 3),
        "total_pct": round(100 * ((cpu1 - cpu0) + (bpf1 - bpf0) / 1e9) / machine, 3),
        "peak_rss_mb": round(rss, 1),
    }


def symbolisation_times(binary: str) -> dict[str, float]:
    """Reading a binary's symbols and unwind table: from a cold cache, then from the cache. CPU time
    (the machine's other work makes wall-clock times vary 2-3 fold from run to run)."""
    script = (
        "import sys, time\n"
        "from bpfscope.domains.profile.symbols import cached_binary, _unwind_table\n"
        "t = time.process_time(); b = cached_binary(sys.argv[1]); u = _unwind_table(sys.argv[1])\n"
        "print(time.process_time() - t, len(b.symbols))\n"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "BPFSCOPE_CACHE": cache}
        runs = [
            subprocess.run(
                [sys.executable, "-c", script, binary], capture_output=True, text=True, env=env, check=True
            )
            for _ in range(2)
        ]
    (cold, symbols), (cached, _) = (r.stdout.split() for r in runs)
    return {"symbols": int(symbols), "cold_s": round(float(cold), 3), "cached_s": round(float(cached), 3)}


def compare(bpfscope: str, args: argparse.Namespace) -> None:
    """`bpfscope profile` at 19 Hz from the baseline's sources and from this tree, in turn."""
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
    trees = {"baseline": {**os.environ, "PYTHONPATH": args.baseline}, "this tree": None}
    cmd = [bpfscope, "profile", "--frequency", "19", "--unwind", args.unwind]
    with bpf_stats():
        for _ in range(args.repeat):
            for name, env in trees.items():
                runs[name].append(measure(cmd, "Tracing", args.seconds, {"on_sample"}, args.warmup, env))
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    for name, results in runs.items():
        total = sorted(r["total_pct"] for r in results)
        bpf = sorted(r["bpf_pct"] for r in results)
        print(
            f"{name:10} --unwind {args.unwind} 19 Hz: total {total[0]:.3f}-{total[-1]:.3f}% "
            f"(BPF {bpf[0]:.3f}-{bpf[-1]:.3f}%) in {len(results)} runs"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--baseline", metavar="SRC", help="compare with the bpfscope of this src directory")
    parser.add_argument("--repeat", type=int, default=3, help="--baseline: runs of each")
    parser.add_argument("--unwind", choices=("dwarf", "fp"), default="dwarf", help="--baseline: the mode")
    args = parser.parse_args()
    bpfscope = common.bpfscope()
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        source = Path(tmp) / "shares.c"
        source.write_text(SHARES_C)
        binary = Path(tmp) / "shares"
        subprocess.run(
            ["gcc", "-O2", "-g", "-fomit-frame-pointer", "-o", str(binary), str(source)], check=True
        )
        script = Path(tmp) / "shares.py"
        script.write_text(SHARES_PY)
        load = [
            subprocess.Popen([str(binary), "100000"], stdout=subprocess.DEVNULL),
            subprocess.Popen(["/usr/bin/python3.11", str(script), "100000"], stdout=subprocess.DEVNULL),
        ]
        try:
            if args.baseline:
                compare(bpfscope, args)
                return
            with bpf_stats():
                for hz in (19, 99):
                    for unwind in ("dwarf", "fp"):
                        results[f"bpfscope profile {hz} Hz --unwind {unwind}"] = measure(
                            [bpfscope, "profile", "--frequency", str(hz), "--unwind", unwind],
                            "Tracing",
                            args.seconds,
                            {"on_sample"},
                            args.warmup,
                        )
                    data = Path(tmp) / f"perf-{hz}.data"
                    results[f"perf record -F {hz} -g -a"] = measure(
                        ["perf", "record", "-F", str(hz), "-g", "-a", "-o", str(data)],
                        None,
                        args.seconds,
                        set(),
                        args.warmup,
                    )
                    results[f"perf record -F {hz} -g -a"]["data_mb"] = round(data.stat().st_size / 2**20, 2)
                    results[f"py-spy record --rate {hz} (one process)"] = measure(
                        [py_spy, "record", "--rate", str(hz), "--pid", str(load[1].pid), "--nonblocking",
                         "--output", str(Path(tmp) / f"py-spy-{hz}.txt"), "--format", "raw"],
                        None,
                        args.seconds,
                        set(),
                        args.warmup,
                    )  # fmt: skip
        finally:
            for proc in load:
                proc.kill()
                proc.wait()
    # libc, the interpreter, and where installed a large Go binary (the Go toolchain's own, 10 MB: its
    # .gopclntab) and a large C++ one (libLLVM, 105 MB).
    go = shutil.which("go")
    binaries = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/bin/python3.11",
        *([os.path.realpath(go)] if go else []),
        *[p for p in ("/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1",) if os.path.exists(p)],
    ]
    symbols = {path: symbolisation_times(path) for path in binaries}
    if args.json:
        print(json.dumps({"cost": results, "symbolisation": symbols}, indent=2))
        return
    print(f"{'':44} {'user %':>8} {'BPF %':>8} {'total %':>8} {'peak RSS MB':>12} {'data MB':>8}")
    for name, r in results.items():
        print(
            f"{name:44} {r['user_pct']:>8.3f} {r['bpf_pct']:>8.3f} {r['total_pct']:>8.3f} "
            f"{r['peak_rss_mb']:>12.1f} {r.get('data_mb', ''):>8}"
        )
    for hz in (19, 99):
        ours = results[f"bpfscope profile {hz} Hz --unwind dwarf"]["total_pct"]
        fp = results[f"bpfscope profile {hz} Hz --unwind fp"]["total_pct"]
        spy = results[f"py-spy record --rate {hz} (one process)"]["total_pct"]
        # perf's own process only writes what the kernel collected: its sampling cost is not in it.
        print(
            f"{hz} Hz: bpfscope dwarf / fp: {ours / fp:.1f}; bpfscope fp (every CPU) / py-spy (one process): "
            f"{fp / spy:.2f}"
        )
    for path, r in symbols.items():
        print(f"symbolise {path}: {r['symbols']} symbols, cold {r['cold_s']} s, cached {r['cached_s']} s")


if __name__ == "__main__":
    main()
