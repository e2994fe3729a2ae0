"""Page-cache and VFS tracing overhead on the hottest path they watch: 4 KiB reads served from the page
cache (fio, buffered random reads of a file held in memory, one job per CPU), with nothing attached, with
each of `bpfscope cachestat`, `vfsstat` and `filetop`, and with bpftrace programs doing the same work,
each case in the same run.

Reported: reads per second per case and as a fraction of the untraced run.

    .venv/bin/python benchmarks/cache_overhead.py [--seconds S] [--rounds R] [--json]
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import common

FILE_SIZE = "256M"

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


def fio_reads_per_s(path: Path, seconds: int) -> float:
    job = common.fio(
        "--name=cached",
        f"--filename={path}",
        f"--size={FILE_SIZE}",
        "--rw=randread",
        "--bs=4k",
        "--ioengine=psync",
        f"--numjobs={os.cpu_count() or 1}",
        "--group_reporting",
        "--time_based",
        f"--runtime={seconds}",
    )
    return float(job["read"]["iops"])


def main() -> None:
    args = common.overhead_parser(__doc__, seconds=5).parse_args()
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
        path = Path(tmp) / "cached.dat"
        path.write_bytes(os.urandom(1 << 20) * 256)
        fio_reads_per_s(path, 1)  # every page in the cache before the first measured case
        result = common.alternate(
            cases, args.rounds, lambda: {"reads_per_s": fio_reads_per_s(path, args.seconds)}
        )
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"fio 4k buffered random reads from the page cache, {os.cpu_count()} jobs, {args.seconds} s x "
        f"{args.rounds} rounds (medians)"
    )
    print(f"{'case':20} {'reads/s':>12} {'of none':>8}")
    for name, r in result.items():
        print(f"{name:20} {r['reads_per_s']:12.0f} {r['reads_per_s_of_none']:8.1%}")


if __name__ == "__main__":
    main()
