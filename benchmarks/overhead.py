"""Per-event overhead of tracing a syscall-heavy loop, each case measured in the same run:

  none       no tracing
  floor      an empty program on raw_syscalls:sys_enter, as a classic tracepoint (what bpftrace's
             tracepoint: probes use)
  floor_raw  the same as a raw tracepoint (no record formatted: what bpfscope uses when a query reads
             no field of the record, as this one)
  bpfscope   bpfscope trace raw_syscalls:sys_enter --count-by pid
  bpftrace   bpftrace -e 'tracepoint:raw_syscalls:sys_enter { @[pid] = count(); }'

The loop is a C program making getppid() calls; each case runs it several times and takes the median
of the mean ns per call. Reported: ns per call, ns added per event over `none`, and bpfscope's added
cost as a fraction of bpftrace's (target: at most 0.5).

    .venv/bin/python benchmarks/overhead.py [--calls N] [--repeats R] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import common

from bpfscope.build import compile_bpf
from bpfscope.engine.bpf import BpfObject

HERE = Path(__file__).resolve().parent
BPFTRACE_PROGRAM = 'tracepoint:raw_syscalls:sys_enter { @[pid] = count(); } BEGIN { printf("attached\\n"); }'


def loop_ns(binary: Path, calls: int, repeats: int, cpu: int) -> float:
    """Median ns per call of the loop pinned to one CPU (costs differ between CPUs: measure each)."""
    cmd = ["taskset", "-c", str(cpu), str(binary), str(calls)]
    runs = [
        float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout) for _ in range(repeats)
    ]
    return statistics.median(runs)


@contextlib.contextmanager
def floor_program(workdir: Path, program: str) -> Iterator[None]:
    obj_path = compile_bpf(HERE / "empty.bpf.c", workdir / "empty.bpf.o")
    with BpfObject(obj_path, autoload={program}) as obj:
        obj.attach()
        yield


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    bpftrace = common.bpftrace()
    bpfscope = common.bpfscope()
    with tempfile.TemporaryDirectory(prefix="bpfscope-overhead-") as tmp:
        workdir = Path(tmp)
        loop = workdir / "getppid_loop"
        subprocess.run(["gcc", "-O2", "-o", str(loop), str(HERE / "getppid_loop.c")], check=True)
        cases = {
            "none": contextlib.nullcontext,
            "floor": lambda: floor_program(workdir, "empty"),
            "floor_raw": lambda: floor_program(workdir, "empty_raw"),
            "bpfscope": lambda: common.tracer(
                [bpfscope, "trace", "raw_syscalls:sys_enter", "--count-by", "pid"], "Tracing"
            ),
            "bpftrace": lambda: common.tracer([bpftrace, "-e", BPFTRACE_PROGRAM], "attached"),
        }
        cpus = sorted(os.sched_getaffinity(0))
        # Two rounds, alternating the cases, so drift on the machine touches every case alike.
        samples: dict[str, dict[int, list[float]]] = {name: {cpu: [] for cpu in cpus} for name in cases}
        for _ in range(2):
            for name, case in cases.items():
                with case():
                    for cpu in cpus:
                        samples[name][cpu].append(loop_ns(loop, args.calls, args.repeats, cpu))
        per_cpu = {
            name: {cpu: statistics.median(v) for cpu, v in by_cpu.items()} for name, by_cpu in samples.items()
        }
        results = {name: statistics.mean(by_cpu.values()) for name, by_cpu in per_cpu.items()}
    added = {name: results[name] - results["none"] for name in results}
    ratio = added["bpfscope"] / added["bpftrace"] if added["bpftrace"] > 0 else float("nan")
    if args.json:
        print(
            json.dumps(
                {
                    "ns_per_call": results,
                    "ns_per_call_by_cpu": per_cpu,
                    "ns_added": added,
                    "bpfscope_over_bpftrace": ratio,
                }
            )
        )
        return
    cpu_heads = " ".join(f"{'cpu' + str(c):>8}" for c in cpus)
    print(
        f"{'case':10} {cpu_heads} {'mean':>8} {'ns added':>9}   "
        f"({args.calls} calls x {args.repeats} x 2 rounds on each CPU)"
    )
    for name, ns in results.items():
        by_cpu = " ".join(f"{per_cpu[name][c]:8.1f}" for c in cpus)
        print(f"{name:10} {by_cpu} {ns:8.1f} {added[name]:9.1f}")
    print(
        f"bpfscope adds {ratio:.2f}x what bpftrace adds (target <= 0.5); "
        f"above its hook's floor: bpfscope {added['bpfscope'] - added['floor_raw']:.1f} ns, "
        f"bpftrace {added['bpftrace'] - added['floor']:.1f} ns"
    )


if __name__ == "__main__":
    main()
