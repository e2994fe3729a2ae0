"""Block I/O tracing overhead: fio's IOPS at the highest rate this disk gives (4k random direct reads,
queue depth 32) with nothing attached, with `bpfscope biolatency`, with `bpfscope biosnoop`, and with
bpftrace computing the same latency histogram as biolatency, each case in the same run.

Reported: IOPS per case and as a fraction of the untraced IOPS (target: at least 97% with biolatency),
and what biosnoop saw and lost (it must keep every event or count what it dropped).

    .venv/bin/python benchmarks/block_overhead.py [--seconds S] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import tempfile
from collections.abc import Callable
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
    result = subprocess.run(
        [
            "fio",
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
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(result.stdout)["jobs"][0]["read"]["iops"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bpfscope, bpftrace = common.bpfscope(), common.bpftrace()
    snoop_reports: list[str] = []
    cases: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "none": contextlib.nullcontext,
        "biolatency": lambda: common.tracer([bpfscope, "biolatency", "-d", "vda"], "Tracing"),
        "biosnoop": lambda: common.tracer([bpfscope, "biosnoop", "-d", "vda"], "Tracing", snoop_reports),
        "bpftrace hist": lambda: common.tracer([bpftrace, "-e", BPFTRACE_HISTOGRAM], "attached"),
    }
    with tempfile.TemporaryDirectory(prefix="bpfscope-bench-", dir="/var/tmp") as tmp:
        path = Path(tmp) / "fio.dat"
        subprocess.run(
            [
                "fio",
                "--name=fill",
                f"--filename={path}",
                "--size=2G",
                "--rw=write",
                "--bs=1M",
                "--direct=1",
                "--output-format=terse",
            ],
            capture_output=True,
            check=True,
        )
        samples: dict[str, list[float]] = {name: [] for name in cases}
        # Rounds alternate the cases so that drift on the machine touches every case alike.
        for _ in range(args.rounds):
            for name, case in cases.items():
                with case():
                    samples[name].append(fio_iops(path, args.seconds))
    iops = {name: statistics.median(v) for name, v in samples.items()}
    fraction = {name: v / iops["none"] for name, v in iops.items()}
    seen = [int(m[1]) for r in snoop_reports if (m := re.search(r"(\d+) I/O traced", r))]
    lost = [int(m[1]) for r in snoop_reports if (m := re.search(r"(\d+) events lost", r))]
    if args.json:
        print(json.dumps({"iops": iops, "fraction": fraction, "biosnoop_seen": seen, "biosnoop_lost": lost}))
        return
    print(
        f"{'case':14} {'IOPS (median)':>14} {'of none':>8}   fio 4k randread QD32, {args.seconds} s x "
        f"{args.rounds} rounds"
    )
    for name in cases:
        print(f"{name:14} {iops[name]:14.0f} {fraction[name]:8.1%}")
    print(f"biosnoop: {seen} I/Os printed per round, {lost} lost (target: biolatency >= 97% of none)")
    for report in snoop_reports[-1:]:
        print("biosnoop's own summary:", report.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
