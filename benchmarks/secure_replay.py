"""bpfscope secure's user-space cost per exec, apart from the storm that makes the execs: the lifecycle
ring's records of a few seconds of an exec storm (benchmarks/secure_spawn.c, a static do-nothing binary,
two spawners) are kept as the collector drained them, then fed again, drain by drain, to a fresh process
cache and written as the compact view's lines (to memory), several times; the fastest pass is kept (CPU
time of this process), so that the storm's own noise weighs less than in secure_overhead.py.

    .venv/bin/python benchmarks/secure_replay.py [--seconds 3] [--passes 5] [--save FILE | --load FILE]

``--save`` keeps the captured drains (pickle) and ``--load`` replays them instead of capturing: the
same records through two versions of the code (PYTHONPATH=OTHER/src).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import secure_overhead as bench

from bpfscope.domains.security.events import Formatter
from bpfscope.domains.security.processes import ProcessCache
from bpfscope.domains.security.secure import SecureCollector, SecureConfig


def capture(seconds: int) -> list[list[bytes]]:
    """The lifecycle ring's records while the storm runs, one list per drain."""
    collector = SecureCollector(SecureConfig(default_policy=False))
    collector.open()
    try:
        ring = collector.ring("lifecycle")
        with tempfile.TemporaryDirectory() as tmp:
            bins = bench.build(Path(tmp))
            storm = subprocess.Popen(
                [str(bins["secure_spawn"]), "5000", str(seconds), "2", str(bins["nothing"])],
                stdout=subprocess.PIPE,
                text=True,
            )
            drains: list[list[bytes]] = []
            while storm.poll() is None:
                drains.append(ring.read_sized())
                time.sleep(0.005)
            time.sleep(0.1)
            drains.append(ring.read_sized())
        lost = collector.losses().total
        if lost:
            print(f"(capture lost {lost} records)")
        return [d for d in drains if d]
    finally:
        collector.close()


def replay(collector: SecureCollector, drains: list[list[bytes]]) -> tuple[float, int]:
    """One pass through a fresh cache: CPU seconds, exec events."""
    collector.cache = ProcessCache(None, collector.config.cache_size)
    collector.formatter = Formatter(collector.cache, ancestors=collector.config.ancestors)
    collector.seen = dict.fromkeys(collector.seen, 0)
    no_hits = np.zeros(0, dtype=collector.rings["hits"].dtype)
    lines: list[str] = []
    start = time.process_time()
    for records in drains:
        lines.extend(event.compact() for event in collector._lifecycle(records, no_hits))
    # The exec events the collector counted itself: counting them here would be timed too.
    return time.process_time() - start, collector.seen["exec"]


def main() -> None:
    args = common.replay_arguments(__doc__)
    drains = common.captured(args, lambda: capture(args.seconds))
    # A collector opened for its layout and kinds (read from its BPF object), its rings never read.
    collector = SecureCollector(SecureConfig(default_policy=False))
    collector.open()
    try:
        best, execs = min(replay(collector, drains) for _ in range(args.passes))
    finally:
        collector.close()
    records = sum(len(d) for d in drains)
    print(
        f"{records} records in {len(drains)} drains, {execs} execs: {best * 1e3:.1f} ms, "
        f"{best / execs * 1e6:.2f} us an exec (the fastest of {args.passes} passes)"
    )


if __name__ == "__main__":
    main()
