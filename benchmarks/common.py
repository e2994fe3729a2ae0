"""What the benchmarks share: running a tracer until it has attached, and finding the commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def bpfscope() -> str:
    return shutil.which("bpfscope", path=str(Path(sys.executable).parent)) or "bpfscope"


def bpftrace() -> str:
    path = shutil.which("bpftrace")
    if path is None:
        sys.exit("bpftrace is not installed (apt-get install bpftrace)")
    return path


@contextlib.contextmanager
def tracer(cmd: list[str], marker: str, output: list[str] | None = None) -> Iterator[None]:
    """Run a tracer until ``marker`` shows on its stdout or stderr; stop it with SIGINT afterwards.
    Its stdout is discarded (a pipe nobody reads would stall it); its stderr goes to ``output``."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL if marker_on_stderr(cmd) else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    streams = [s for s in (proc.stdout, proc.stderr) if s is not None]
    seen = ""
    try:
        # Raw reads: a buffered readline could keep the marker in its buffer, where select never sees it.
        while marker not in seen:
            ready, _, _ = select.select(streams, [], [], 30)
            if not ready or proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} did not attach: {seen}")
            seen += os.read(ready[0].fileno(), 65536).decode(errors="replace")
        if proc.stdout is not None:
            # bpftrace prints its marker on stdout, then nothing until it exits.
            proc.stdout.close()
            proc.stdout = None
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if output is not None:
            output.append(err or "")


def marker_on_stderr(cmd: list[str]) -> bool:
    """bpfscope says "Tracing ..." on stderr; bpftrace's BEGIN prints on stdout."""
    return Path(cmd[0]).name == "bpfscope"


Case = Callable[[], contextlib.AbstractContextManager[None]]


def overhead_parser(doc: str | None, seconds: int) -> argparse.ArgumentParser:
    """The options every overhead benchmark takes: --seconds per measurement, --rounds, --json."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=seconds, help="Length of each measurement.")
    parser.add_argument("--rounds", type=int, default=3, help="Measurements per case (the median is kept).")
    parser.add_argument("--json", action="store_true", help="One JSON object instead of the table.")
    return parser


Measure = Callable[[], dict[str, float]]


def alternate(cases: dict[str, Case], rounds: int, measure: Measure) -> dict[str, dict[str, float]]:
    """Each case's median of ``measure()`` (metric -> value) over ``rounds``, with the fraction of the
    first case ("none") as ``METRIC_of_none``. Rounds alternate the cases so that drift on the machine
    touches every case alike."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            with case():
                samples[name].append(measure())
    medians = {
        name: {metric: statistics.median(s[metric] for s in runs) for metric in runs[0]}
        for name, runs in samples.items()
    }
    baseline = next(iter(medians.values()))
    for values in medians.values():
        values.update({f"{m}_of_none": values[m] / baseline[m] for m in list(values) if baseline[m]})
    return medians


def fio(*args: str) -> dict[str, Any]:
    """fio's JSON report of its first job (or of all jobs, with --group_reporting)."""
    cmd = ["fio", *args, "--output-format=json"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["jobs"][0]


def replay_arguments(doc: str) -> argparse.Namespace:
    """The replay benchmarks' options: a capture of --seconds, replayed --passes times, kept with --save
    FILE or read back with --load FILE (the same records through two versions of the code)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--load", type=Path)
    return parser.parse_args()


def captured(args: argparse.Namespace, capture: Callable[[], Any]) -> Any:
    """What --load names, else a new capture (kept where --save says)."""
    import pickle

    if args.load:
        return pickle.loads(args.load.read_bytes())
    data = capture()
    if args.save:
        args.save.write_bytes(pickle.dumps(data))
    return data
