"""Thread-state accounting overhead: what `bpfscope tsa` (programs on every context switch and wakeup)
costs a context-switch-heavy workload and a database, against untraced, in the same run.

- `perf bench sched pipe`: two tasks passing a token through a pipe, two context switches per round
  trip: the time per operation (lower is better).
- pgbench -S (select-only, 4 clients) on a throw-away PostgreSQL: transactions a second.

Cases: nothing attached; `bpfscope tsa` system-wide (per process, every second); `bpfscope tsa` with
bench's timeline (every off-CPU episode sent to user space, as `bpfscope bench` runs it). Rounds alternate
the cases, the median of each is kept.

    .venv/bin/python benchmarks/tsa_overhead.py [--seconds S] [--rounds R] [--json]
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import common

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments" / "io-aware-benchmark"))
import rig  # noqa: E402  (a throw-away PostgreSQL in a cgroup)

PIPE_LOOPS = 500_000


def pipe_usecs_per_op() -> float:
    out = subprocess.run(
        ["perf", "bench", "sched", "pipe", "-l", str(PIPE_LOOPS)], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"([\d.]+) usecs/op", out)
    if found is None:
        raise RuntimeError(f"perf bench sched pipe said: {out}")
    return float(found[1])


def pgbench_tps(db: rig.Postgres, seconds: int) -> float:
    out = subprocess.run(
        ["pgbench", "-h", db.host, "-p", str(db.port), "-U", "postgres", "-n", "-S", "-c", "4", "-j", "2",
         "-T", str(seconds), "postgres"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = re.search(r"tps = ([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"pgbench said: {out}")
    return float(found[1])


@contextlib.contextmanager
def timeline() -> Iterator[None]:
    """tsa's collector with its timeline on, in this process, its ring drained as bench drains it. The
    workloads are this process's children: include_self, or they would be left out."""
    import threading

    from bpfscope.domains.sched.tsa import TsaCollector, TsaConfig
    from bpfscope.runtime.session import Session, Sink, StopToken

    stop = StopToken()
    session = Session([TsaCollector(TsaConfig(timeline=True, include_self=True))], [Sink()], stop=stop)
    session.open()
    session.start()
    thread = threading.Thread(target=session.loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set("done")
        thread.join(60)
        session.close()


def main() -> None:
    args = common.overhead_parser(__doc__, seconds=8).parse_args()
    bpfscope = common.bpfscope()
    cases: dict[str, common.Case] = {
        "none": contextlib.nullcontext,
        "tsa": lambda: common.tracer([bpfscope, "tsa", "1"], "Tracing"),
        "tsa timeline": timeline,
    }
    group = rig.Group("bench-db")
    db = rig.Postgres(Path("/var/tmp/bpfscope-tsa-overhead"), group, shared_buffers="256MB")
    try:
        db.start()
        db.pgbench_init(10)
        pgbench_tps(db, 2)  # warm the cache
        result = common.alternate(
            cases,
            args.rounds,
            lambda: {"pipe_usecs_op": pipe_usecs_per_op(), "pgbench_tps": pgbench_tps(db, args.seconds)},
        )
    finally:
        db.stop()
        group.close()
    if args.json:
        print(json.dumps({"cases": result}))
        return
    print(
        f"{'case':14} {'pipe usecs/op':>14} {'of none':>8} {'pgbench tps':>12} {'of none':>8}   "
        f"perf bench sched pipe -l {PIPE_LOOPS}; pgbench -S -c 4, {args.seconds} s; {args.rounds} rounds"
    )
    for name, r in result.items():
        print(
            f"{name:14} {r['pipe_usecs_op']:14.3f} {r['pipe_usecs_op_of_none']:8.1%} "
            f"{r['pgbench_tps']:12.0f} {r['pgbench_tps_of_none']:8.1%}"
        )


if __name__ == "__main__":
    main()
