"""What the store's files cost its readers and its writer: the agent flushes a Parquet file per table every
10 s (360 an hour), and a query reads every file's footer. Measured, on a store made for the run with
HOURS hours of one table (the health rows' shape: labels, numbers, a nullable share, a dict) written as
the agent writes it, FILES_PER_HOUR flushes of ROWS records an hour:

- a query over the whole table (count and a group-by, as the UI's history asks), wall time, median of
  ROUNDS, with each hour's files as flushed and after the writer merged every hour into one file
  (StoreWriter.merge_hours, as the agent does once an hour is over);
- what merging cost the writer: CPU time (user and system) per hour merged;
- what a flush of one small file costs the writer: CPU time per flush, the median of ROUNDS rounds of
  100 flushes.

    .venv/bin/python benchmarks/store_files.py [--hours 6] [--files-per-hour 360] [--rows 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.store import Store, StoreWriter

SCHEMA = Schema(
    "bench.row",
    (
        Field("rule", "str", label=True),
        Field("verdict", "enum", values=("ok", "warn", "bad")),
        Field("value", "float"),
        Field("share", "float", nullable=True),
        Field("count", "int"),
        Field("detail", "str"),
        Field("reasons", "dict"),
    ),
    interval=True,
)
BASE = 1_796_000_000.0 - 1_796_000_000.0 % 3600
QUERY = 'SELECT rule, count(*), avg(value), max(ts) FROM "bench.row" GROUP BY rule ORDER BY rule'


def record(ts: float, i: int) -> dict:
    return SCHEMA.record(
        {
            "ts": ts,
            "interval_s": 10.0,
            "rule": f"rule{i % 5}",
            "verdict": "ok",
            "value": i * 0.5,
            "share": None if i % 3 else 0.25,
            "count": i,
            "detail": "within its limits",
            "reasons": {"seen": i},
        }
    )


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def query_ms(store: Store, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        store.query(QUERY)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--files-per-hour", type=int, default=360)
    parser.add_argument("--rows", type=int, default=5, help="records a flush")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        writer = StoreWriter(Path(tmp) / "flushes", [SCHEMA], flush_s=float("inf"))
        per_flush = []
        for _ in range(args.rounds):
            began = cpu_s()
            for i in range(100):
                writer.add([record(BASE + i, j) for j in range(args.rows)])
                writer.flush()
            per_flush.append((cpu_s() - began) * 10)
        results["flush_cpu_ms"] = round(statistics.median(per_flush), 2)

        store = Store(Path(tmp) / "store")
        writer = StoreWriter(store.path, [SCHEMA], flush_s=float("inf"))
        step = 3600 / args.files_per_hour
        for hour in range(args.hours):
            for flush in range(args.files_per_hour):
                ts = BASE + hour * 3600 + flush * step
                writer.add([record(ts, j) for j in range(args.rows)])
                writer.flush()
        files = len(list(store.path.glob("*/date=*/hour=*/*.parquet")))
        before = query_ms(store, args.rounds)
        began = cpu_s()
        merged = writer.merge_hours(now=BASE + (args.hours + 1) * 3600, budget_s=float("inf"))
        merge_s = cpu_s() - began
        after = query_ms(store, args.rounds)
        results.update(
            {
                "hours": args.hours,
                "files_before": files,
                "files_after": len(list(store.path.glob("*/date=*/hour=*/*.parquet"))),
                "query_ms_as_flushed": round(before, 1),
                "query_ms_merged": round(after, 1),
                "query_ratio": round(after / before, 3),
                "merge_cpu_ms_per_hour": round(merge_s * 1000 / max(1, len(merged)), 1),
            }
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
