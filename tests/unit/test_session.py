"""The session loop with fake collectors: intervals, counts, durations, streams on real file
descriptors, stopping from another thread, a closed output, and what happens when a collector fails."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bpfscope.runtime import session as session_mod
from bpfscope.runtime.collector import Collector, Config, Sample
from bpfscope.runtime.losses import Loss, Losses
from bpfscope.runtime.schema import Field, Schema
from bpfscope.runtime.session import MemorySink, Session, Sink, SinkClosed, StopToken

TICK = Schema("tick", (Field("n", "int"),), interval=True)


@dataclass
class Tick(Sample):
    ts: float
    interval_s: float
    n: int

    def records(self) -> Iterator[dict[str, Any]]:
        yield TICK.record(vars(self))


class Counter(Collector[Config]):
    """An interval collector: each sample is numbered and knows how long its interval was."""

    name = "counter"
    _schemas = (TICK,)

    def __init__(self, config: Config | None = None, fail_at: int | None = None) -> None:
        super().__init__(config or Config())
        self.n = 0
        self.fail_at = fail_at
        self.opened = self.closed = self.started = 0

    def open(self) -> None:
        self.opened += 1

    def start(self) -> None:
        self.started += 1
        self.t0 = time.monotonic()

    def sample(self) -> Tick:
        self.n += 1
        if self.fail_at is not None and self.n == self.fail_at:
            raise RuntimeError("sample failed")
        now = time.monotonic()
        tick = Tick(time.time(), now - self.t0, self.n)
        self.t0 = now
        return tick

    def close(self) -> None:
        self.closed += 1


@dataclass
class Bytes(Sample):
    ts: float
    data: bytes

    def __len__(self) -> int:
        return len(self.data)


class PipeStream(Collector[Config]):
    """A stream collector on a pipe: what is written to it is what it drains."""

    name = "pipe"

    def __init__(self) -> None:
        super().__init__(Config())
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK)
        self.lost = 0

    def fds(self) -> list[int]:
        return [self.read_fd]

    def drain(self) -> Bytes | None:
        try:
            data = os.read(self.read_fd, 65536)
        except BlockingIOError:
            return None
        return Bytes(time.time(), data) if data else None

    def losses(self) -> Losses:
        return Losses([Loss("ring_full", self.lost, "events lost (ring buffer full)")])

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_intervals_then_the_last_partial_one() -> None:
    sink = MemorySink()
    counter = Counter()
    Session([counter], [sink], interval=0.2, duration=0.72).run()
    ticks = sink.samples["counter"]
    # Three whole intervals, then the partial one at the deadline: what happened after the last tick
    # is never dropped.
    assert [t.n for t in ticks] == [1, 2, 3, 4]
    assert all(abs(t.interval_s - 0.2) < 0.1 for t in ticks[:3])
    assert ticks[3].interval_s < 0.2
    assert counter.opened == counter.started == counter.closed == 1
    assert [r["record"] for r in sink.records()] == ["tick"] * 4


def test_count_ends_the_run_without_an_extra_sample() -> None:
    sink = MemorySink()
    Session([Counter()], [sink], interval=0.02, count=3).run()
    assert [t.n for t in sink.samples["counter"]] == [1, 2, 3]


def test_no_interval_is_one_sample_at_the_end() -> None:
    sink = MemorySink()
    Session([Counter()], [sink], duration=0.05).run()
    (tick,) = sink.samples["counter"]
    assert tick.interval_s >= 0.05 - 0.002


def test_each_collector_keeps_its_own_interval() -> None:
    sink = MemorySink()
    fast, slow = Counter(Config(interval_s=0.02)), Counter(Config(interval_s=0.1))
    slow.name = "slow"
    Session([fast, slow], [sink], duration=0.21).run()
    assert 9 <= len(sink.samples["counter"]) <= 12
    assert len(sink.samples["slow"]) == 3  # two intervals and the last partial one


def test_stream_is_drained_when_ready_and_at_the_end() -> None:
    sink = MemorySink()
    pipe = PipeStream()
    # Only the stop ends this run early: its duration is far longer than any delay a loaded machine adds.
    session = Session([pipe], [sink], duration=60.0)
    session.open()
    session.start()

    def feed() -> None:
        os.write(pipe.write_fd, b"a" * 10)
        time.sleep(0.05)
        os.write(pipe.write_fd, b"b" * 5)
        session.stop("test")

    threading.Thread(target=feed).start()
    began = time.monotonic()
    session.loop()
    session.finish()
    session.close()
    assert time.monotonic() - began < 30, "the stop token did not wake the loop"
    assert b"".join(s.data for s in sink.samples["pipe"]) == b"a" * 10 + b"b" * 5
    assert sink.losses["pipe"]["ring_full"] == 0


class PacedStream(PipeStream):
    """A stream whose records wake nobody (paced wake-ups): the descriptor it gives the session never
    becomes readable, so only the session's own drains every ``paced_drain_s`` read the pipe."""

    name = "paced"
    paced_drain_s = 0.02

    def __init__(self) -> None:
        super().__init__()
        self.silent_fd, self.silent_write_fd = os.pipe2(os.O_NONBLOCK)

    def fds(self) -> list[int]:
        return [self.silent_fd]

    def close(self) -> None:
        super().close()
        for fd in (self.silent_fd, self.silent_write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_a_paced_stream_is_drained_on_the_session_timer() -> None:
    sink = MemorySink()
    paced = PacedStream()
    session = Session([paced], [sink], duration=60.0)
    session.open()
    session.start()
    seen_while_running = threading.Event()

    def feed() -> None:
        os.write(paced.write_fd, b"x" * 7)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not sink.samples.get("paced"):
            time.sleep(0.01)
        if sink.samples.get("paced"):
            seen_while_running.set()
        session.stop("test")

    threading.Thread(target=feed).start()
    session.loop()
    session.finish()
    session.close()
    # Read by a drain of the running loop, not by the final one after the stop.
    assert seen_while_running.is_set()
    assert b"".join(s.data for s in sink.samples["paced"]) == b"x" * 7


class IdlePacedStream(PacedStream):
    """Paced drains further apart while they find nothing (the agent's)."""

    paced_idle_max_s = 0.16

    def __init__(self) -> None:
        super().__init__()
        self.drains: list[float] = []

    def drain(self) -> Bytes | None:
        self.drains.append(time.monotonic())
        return super().drain()


def run_beside(collector: Collector, feed: Callable[[Session, MemorySink], None]) -> MemorySink:
    """``collector`` run by a session until ``feed``, run in another thread, stops it."""
    sink = MemorySink()
    session = Session([collector], [sink], duration=60.0)  # only the stop ends it
    session.open()
    session.start()
    threading.Thread(target=feed, args=(session, sink)).start()
    session.loop()
    session.finish()
    session.close()
    return sink


def test_idle_paced_drains_come_further_apart_until_a_record() -> None:
    paced = IdlePacedStream()
    seen: list[float] = []

    def feed(session: Session, sink: MemorySink) -> None:
        time.sleep(1.0)  # idle: drains 0.02, 0.04, 0.08, then 0.16 s apart (50 at 0.02 s)
        idle_drains = len(paced.drains)
        written = time.monotonic()
        os.write(paced.write_fd, b"x" * 3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not sink.samples.get("paced"):
            time.sleep(0.005)
        seen.extend([idle_drains, time.monotonic() - written])
        time.sleep(0.1)  # back to a drain every 0.02 s after the record
        seen.append(len(paced.drains) - idle_drains)
        session.stop("test")

    sink = run_beside(paced, feed)
    idle_drains, waited, after = seen
    assert idle_drains < 20, paced.drains
    assert waited < 0.16 + 0.5  # the record waited one idle pace at most (and a loaded machine's delay)
    assert after >= 3
    assert b"".join(s.data for s in sink.samples["paced"]) == b"x" * 3


def test_stop_from_another_thread_ends_with_the_summary() -> None:
    sink = MemorySink()
    session = Session([Counter()], [sink], interval=10.0)
    threading.Timer(0.05, session.stop).start()
    began = time.monotonic()
    session.run()
    assert time.monotonic() - began < 5.0  # the interval (10 s) never came
    # The interval never came, but the run ends with its partial interval and its losses.
    assert [t.n for t in sink.samples["counter"]] == [1]
    assert "counter" in sink.losses


def test_a_stop_token_given_by_the_caller_is_used() -> None:
    token = StopToken()
    token.set("before")
    sink = MemorySink()
    Session([Counter()], [sink], interval=10.0, stop=token).run()
    assert token.reason == "before" and len(sink.samples["counter"]) == 1
    token.close()


def test_losses_are_reported_while_running_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    reports: list[int] = []

    class Lost(Sink):
        def lost(self, collector: Collector, new: Losses, total: Losses) -> None:
            reports.append(new.total)

    monkeypatch.setattr(session_mod, "LOSS_REPORT_EVERY_S", 0.0)
    pipe = PipeStream()
    session = Session([pipe], [Lost()], duration=1.0)
    session.open()
    session.start()

    def feed() -> None:
        pipe.lost = 3
        os.write(pipe.write_fd, b"x")
        time.sleep(0.05)
        pipe.lost = 5
        os.write(pipe.write_fd, b"y")
        time.sleep(0.05)
        session.stop()

    threading.Thread(target=feed).start()
    session.loop()
    session.close()
    assert reports == [3, 2]


def test_a_failing_collector_raises_by_default_and_everything_closes() -> None:
    bad, good = Counter(fail_at=2), Counter()
    good.name = "good"
    with pytest.raises(RuntimeError, match="sample failed"):
        Session([bad, good], [MemorySink()], interval=0.01, count=5).run()
    assert bad.closed >= 1 and good.closed == 1


def test_restart_with_back_off_while_the_others_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_mod, "RESTART_BACKOFF_S", (0.03,))
    sink = MemorySink()
    bad, good = Counter(fail_at=2), Counter()
    good.name = "good"
    Session([bad, good], [sink], interval=0.01, duration=0.2, on_error="restart").run()
    assert len(sink.errors["counter"]) == 1
    assert bad.opened == 2, "opened again after the back-off"
    assert len(sink.samples["good"]) >= 10, "the other collector kept running"
    assert len(sink.samples["counter"]) >= 5, "samples resumed after the restart"


def test_isolate_records_a_failed_open_and_runs_the_rest() -> None:
    class Broken(Counter):
        name = "broken"

        def open(self) -> None:
            raise RuntimeError("cannot load")

    sink = MemorySink()
    broken, good = Broken(), Counter()
    session = Session([broken, good], [sink], duration=0.02, on_error="isolate")
    session.run()
    assert str(session.failed[broken]) == "cannot load"
    assert len(sink.samples["counter"]) == 1 and "broken" not in sink.samples


def test_a_closed_output_stops_the_session_quietly() -> None:
    class ClosedPipe(Sink):
        def emit(self, collector: Collector, sample: Sample) -> None:
            raise SinkClosed()

    counter = Counter()
    session = Session([counter], [ClosedPipe()], interval=0.01, duration=5.0)
    began = time.monotonic()
    session.run()
    # Well before the duration: the first sample's closed output ended the run.
    assert time.monotonic() - began < 4.0 and session.stop_token.reason == "output closed"
    assert counter.closed == 1


def test_a_ring_refilled_as_fast_as_it_is_read_does_not_hold_up_the_stop() -> None:
    class Endless(Collector[Config]):
        """A ring that always has more: what the final drain leaves is counted, not dropped silently."""

        name = "endless"

        def __init__(self) -> None:
            super().__init__(Config())
            self.read_fd, self.write_fd = os.pipe()
            os.write(self.write_fd, b"x")

        def fds(self) -> list[int]:
            return [self.read_fd]

        def drain(self) -> Bytes:
            return Bytes(time.time(), b"x")

        def unread(self) -> int:
            return 42

        def close(self) -> None:
            for fd in (self.read_fd, self.write_fd):
                os.close(fd)

    sink = MemorySink()
    session = Session([Endless()], [sink], duration=60.0)
    threading.Timer(0.2, session.stop).start()
    session.run()
    assert sink.losses["endless"]["unread_at_stop"] == 42
    assert len(sink.samples["endless"]) > 1
