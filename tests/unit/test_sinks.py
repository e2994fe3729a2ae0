"""The JSON lines and terminal sinks: what a reader gets, whole, even when Ctrl-C interrupts a write to a
full pipe, and a reader that goes away."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

WRITER = textwrap.dedent(
    """
    import sys
    from dataclasses import dataclass
    from bpfscope.runtime.collector import Collector, Config, Sample
    from bpfscope.runtime.schema import Field, Schema
    from bpfscope.runtime.session import stop_on_signals
    from bpfscope.sinks.jsonl import JsonLinesSink

    ROW = Schema("row", (Field("n", "int"), Field("pad", "str")))

    @dataclass
    class Rows(Sample):
        ts: float
        first: int

        def records(self):
            for n in range(self.first, self.first + 2000):
                yield ROW.record({"ts": self.ts, "n": n, "pad": "x" * 80})

    collector = Collector(Config())
    collector.name = "rows"
    sink = JsonLinesSink()
    with stop_on_signals() as stop:
        batches = 0
        while not stop:
            sink.emit(collector, Rows(0.0, batches * 2000))   # about 200 kB a batch
            batches += 1
    print(batches, file=sys.stderr)
    """
)


def test_a_signal_during_a_write_to_a_full_pipe_loses_nothing() -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    time.sleep(1.0)  # the pipe is full (64 KiB) and the writer blocked in the middle of a batch
    writer.send_signal(signal.SIGINT)
    out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    batches = int(err.strip().splitlines()[-1])
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["n"] for r in records] == list(range(batches * 2000))


def test_a_reader_that_goes_away_stops_the_writer_quietly() -> None:
    from bpfscope.runtime.collector import Collector, Config
    from bpfscope.runtime.collector import Sample as BaseSample
    from bpfscope.runtime.session import SinkClosed
    from bpfscope.sinks.jsonl import JsonLinesSink

    class Closed:
        def fileno(self) -> int:
            raise OSError  # not a file: written with write()

        def write(self, text: str) -> None:
            raise BrokenPipeError

        def flush(self) -> None:
            pass

    class Sample(BaseSample):
        def records(self):
            yield {"record": "x", "ts": 0.0}

    collector = Collector(Config())
    sink = JsonLinesSink(Closed())  # type: ignore[arg-type]
    try:
        sink.emit(collector, Sample())  # type: ignore[arg-type]
    except SinkClosed:
        return
    raise AssertionError("a closed reader must end the session (SinkClosed)")
