"""Block I/O tracing overhead: fio's IOPS at the highest rate this disk gives (4k random direct reads,
queue depth 32) with nothing attached, with `bpfscope biolatency`, with `bpfscope biosnoop`, and with
bpftrace computing the same latency histogram as biolatency, each case in the same run.

Reported: IOPS per case and as a fraction of the untraced IOPS (target: at least 97% with biolatency),
and what biosnoop saw and lost (it must keep every event or count what it dropped).

    .venv/bin/python benchmarks/block_overhead.py [--seconds S] [--rounds R] [--json]
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path

import common

BPFTRACE_HISTOGRAM = (
    "tracepoint:block:block_rq_issue { @start[args->dev, args->sector] = nsecs; } "
    "tracepoint:block:block_rq_complete /@start[args->dev, args->sector]/ { "
    "@usecs = hist((nsecs - @start[args->dev, args->sector]) / 1000); "
    "delete(@start[args->dev, args->sector]); } "
    'BEGIN { printf("attached\\n"); }'
)


def fio_iops(path: Path, seconds: int) -> float:
    job = common.fio(
        "--name=randread",
        f"--filename={path}",
        "--size=2G",
        "--rw=randread",
        "--bs=4k",
        "--direct=1",
        "--ioengine=libaio",
        "--iodepth=32",
        "--time_based",
        f"--runtime={seconds}",
    )
    return float(job["read"]["iops"])


def main() -> None:
    args = common.overhead_parser(__doc__, seconds=8).parse_args()
    bpfscope, bpftrace = common.bpfscope(), common.bpftrace()
    snoop_reports: list[str] = []
    cases: dict[str, common.Case] = {
        "none": contextlib.nullcontext,
        "biolatency": lambda: common.tracer([bpfscope, "biolatency", "-d", "vda"], "Tracing"),
        "biosnoop": lambda: common.tracer([bpfscope, "biosnoop", "-d", "vda"], "Tracing", snoop_reports),
        "bpftrace hist": lambda: common.tracer([bpftrace, "-e", BPFTRACE_HISTOGRAM], "attached"),
    }
    with tempfile.TemporaryDirectory(prefix="bpfscope-bench-", dir="/var/tmp") as tmp:
        path = Path(tmp) / "fio.dat"
        common.fio("--name=fill", f"--filename={path}", "--size=2G", "--rw=write", "--bs=1M", "--direct=1")
        result = common.alternate(cases, args.rounds, lambda: {"iops": fio_iops(path, args.seconds)})
    seen = [int(m[1]) for r in snoop_reports if (m := re.search(r"(\d+) I/O traced", r))]
    lost = [int(m[1]) for r in snoop_reports if (m := re.search(r"(\d+) events lost", r))]
    if args.json:
        print(json.dumps({"cases": result, "biosnoop_seen": seen, "biosnoop_lost": lost}))
        return
    print(
        f"{'case':14} {'IOPS (median)':>14} {'of none':>8}   fio 4k randread QD32, {args.seconds} s x "
        f"{args.rounds} rounds"
    )
    for name, r in result.items():
        print(f"{name:14} {r['iops']:14.0f} {r['iops_of_none']:8.1%}")
    print(f"biosnoop: {seen} I/Os printed per round, {lost} lost (target: biolatency >= 97% of none)")
    for report in snoop_reports[-1:]:
        print("biosnoop's own summary:", report.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
