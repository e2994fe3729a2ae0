"""The request tracer's user-space cost per call, apart from the load that makes the calls: the ring
records of a few seconds of paced wrk against nginx and of paced pgbench -S against PostgreSQL (both
ends of every connection, as `bpfscope requests --port PORT` captures them) are kept, then fed to the
tracker and encoded as the JSON lines sink writes them, several times; the fastest pass is kept (CPU
time of this process), so that a busy machine's noise weighs less than in requests_overhead.py.

    .venv/bin/python benchmarks/requests_replay.py [--seconds 3] [--passes 5] [--save FILE | --load FILE]

``--save`` keeps the captured records (pickle) and ``--load`` replays them instead of capturing: the
same records through two versions of the code (PYTHONPATH=OTHER/src).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import common
import requests_overhead as bench

from bpfscope.domains.requests.capture import Tracker
from bpfscope.domains.requests.requests import DRAIN_RECORDS, RequestBatch, RequestsCollector, RequestsConfig
from bpfscope.sinks.jsonl import dumps


def capture(port: int, load: Callable[[int, int], object], seconds: int) -> list[bytes]:
    """The ring's records while ``load`` runs (TLS uprobes left out)."""
    collector = RequestsCollector(RequestsConfig(ports=(port,), tls=False))
    collector.open()
    try:
        ring = collector.ring("events")
        done = threading.Event()
        runner = threading.Thread(target=lambda: (load(port, seconds), done.set()))
        runner.start()
        records: list[bytes] = []
        while not done.is_set():
            records.extend(ring.read_sized())
            time.sleep(0.01)
        runner.join()
        records.extend(ring.read_sized())
        lost = collector.losses().total
        if lost:
            print(f"(capture lost {lost} records)")
        return records
    finally:
        collector.close()


def replay(records: list[bytes]) -> tuple[float, int]:
    """One pass: CPU seconds, exchanges."""
    tracker = Tracker(RequestsCollector.btf(), 0, None, None)
    exchanges = 0
    start = time.process_time()
    for i in range(0, len(records), DRAIN_RECORDS):
        pairs = tracker.feed(records[i : i + DRAIN_RECORDS])
        batch = RequestBatch(pairs, tracker, False)
        if batch.json_lines() is None:  # (code from before the encoder: the sink's own encoding)
            "".join(dumps(r) + "\n" for r in batch.records())
        exchanges += len(pairs)
    return time.process_time() - start, exchanges


def main() -> None:
    args = common.replay_arguments(__doc__)

    def capture_both() -> dict[str, list[bytes]]:
        out = {}
        with tempfile.TemporaryDirectory(prefix="bpfscope-reqreplay-") as tmp:
            with bench.nginx(Path(tmp) / "nginx") as port:
                out["nginx, wrk paced"] = capture(port, bench.CASES["nginx paced"][1], args.seconds)
            with bench.postgres(Path(tmp) / "pg") as port:
                out["pgbench -S -R 2000"] = capture(port, bench.CASES["pgbench -S -R 2000"][1], args.seconds)
        return out

    captured = common.captured(args, capture_both)
    print("| load | calls | exchanges (two a request) | CPU per call | CPU per request (both ends) |")
    print("|---|---|---|---|---|")
    for name, records in captured.items():
        cpu, exchanges = min(replay(records) for _ in range(args.passes))
        # Both ends are traced: a request is two exchanges, four calls.
        print(f"| {name} | {len(records):,} | {exchanges:,} | {cpu * 1e6 / len(records):.1f} us | "
              f"{cpu * 2e6 / max(exchanges, 1):.1f} us |")  # fmt: skip


if __name__ == "__main__":
    main()
