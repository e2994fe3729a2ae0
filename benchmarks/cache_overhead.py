"""Page-cache and VFS tracing overhead on the hottest path they watch: 4 KiB pread() calls served from
the page cache (pread_loop.c: one page-cache lookup and one file read system call each, about 0.7 us),
with nothing attached, with each of `bpfscope cachestat`, `vfsstat` and `filetop`, and with bpftrace
programs doing the same counts, each case in the same run.

Reported: nanoseconds per read per case (the median of the rounds), and the nanoseconds tracing adds to
each read, bpfscope's against bpftrace's.

    .venv/bin/python benchmarks/cache_overhead.py [--seconds S] [--rounds R] [--json]
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
FILE_MIB = 64

# The same counts as each bpfscope tool, the way bpftrace writes them.
BPFTRACE_CACHESTAT = (
    "tracepoint:filemap:mm_filemap_get_pages { @lookups = sum(args->last_index - args->index + 1); } "
    "tracepoint:filemap:mm_filemap_add_to_page_cache { @added = sum(1 << args->order); } "
    'BEGIN { printf("attached\\n"); }'
)
BPFTRACE_VFSSTAT = (
    "tracepoint:syscalls:sys_enter_read, tracepoint:syscalls:sys_enter_pread64, "
    "tracepoint:syscalls:sys_enter_write, tracepoint:syscalls:sys_enter_pwrite64, "
    "tracepoint:syscalls:sys_enter_openat, tracepoint:syscalls:sys_enter_fsync { @[pid, probe] = count(); } "
    'BEGIN { printf("attached\\n"); }'
)
BPFTRACE_FILETOP = (
    "tracepoint:syscalls:sys_enter_pread64 { @fd[tid] = args->fd; } "
    "tracepoint:syscalls:sys_exit_pread64 /@fd[tid] && args->ret > 0/ { "
    "@bytes[pid, comm, @fd[tid]] = sum(args->ret); @calls[pid, comm, @fd[tid]] = count(); "
    "delete(@fd[tid]); } "
    'BEGIN { printf("attached\\n"); }'
)


def ns_per_read(loop: Path, path: Path, seconds: float) -> float:
    """The loop on one CPU (the tracer's user space runs on the other), about ``seconds`` long."""
    calls = str(int(seconds * 1.3e6))
    cmd = ["taskset", "-c", "1", str(loop), str(path), calls]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pread_loop failed: {result.stderr.strip()}")
    return float(result.stdout)


def main() -> None:
    args = common.overhead_parser(__doc__, seconds=2).parse_args()
    bpfscope, bpftrace = common.bpfscope(), common.bpftrace()
    cases: dict[str, common.Case] = {
        "none": contextlib.nullcontext,
        "bpfscope cachestat": lambda: common.tracer([bpfscope, "cachestat", "1"], "Tracing"),
        "bpftrace cachestat": lambda: common.tracer([bpftrace, "-e", BPFTRACE_CACHESTAT], "attached"),
        "bpfscope vfsstat": lambda: common.tracer([bpfscope, "vfsstat", "1"], "Tracing"),
        "bpftrace vfsstat": lambda: common.tracer([bpftrace, "-e", BPFTRACE_VFSSTAT], "attached"),
        "bpfscope filetop": lambda: common.tracer([bpfscope, "filetop", "-C", "1"], "Tracing"),
        "bpftrace filetop": lambda: common.tracer([bpftrace, "-e", BPFTRACE_FILETOP], "attached"),
    }
    with tempfile.TemporaryDirectory(prefix="bpfscope-bench-", dir="/var/tmp") as tmp:
        loop = Path(tmp) / "pread_loop"
        subprocess.run(["gcc", "-O2", "-o", str(loop), str(HERE / "pread_loop.c")], check=True)
        path = Path(tmp) / "cached.dat"
        path.write_bytes(os.urandom(1 << 20) * FILE_MIB)
        ns_per_read(loop, path, 0.5)  # every page in the cache before the first measured case
        result = common.alternate(cases, args.rounds, lambda: {"ns": ns_per_read(loop, path, args.seconds)})
    base = result["none"]["ns"]
    for r in result.values():
        r["added_ns"] = r["ns"] - base
    if args.json:
        print(json.dumps(result))
        return
    print(f"4 KiB pread() from the page cache, {args.seconds} s x {args.rounds} rounds (medians)")
    print(f"{'case':20} {'ns/read':>9} {'added':>7}")
    for name, r in result.items():
        print(f"{name:20} {r['ns']:9.1f} {r['added_ns']:7.1f}")


if __name__ == "__main__":
    main()
