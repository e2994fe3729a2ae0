"""The session: one loop that runs any number of collectors and hands what they produce to sinks.

It owns their lifecycle (open, baseline, close on every path), their intervals (each collector on its
own timer, or the session's), the waiting (one epoll over every ring buffer, the timers and a stop
token) and the stopping (a :class:`StopToken` set from a signal handler, another thread, a sink whose
reader went away, or the duration or count running out). On a stop it drains what the kernel had already
committed, takes the last, partial interval, and reports every collector's losses: a run always ends
with its summary.

It never touches signal handlers itself: the CLI wraps a run in :func:`stop_on_signals`; tests and the
Python API stop a session with :meth:`Session.stop` or a duration::

    with Session([BiotopCollector(BiotopConfig())], [MemorySink()], interval=1, count=3) as s:
        s.run()

Or step it by hand, as ``bpfscope check`` and the experiments do around a workload::

    session = Session(collectors, sinks)
    session.open(); session.start()
    ...                       # the workload
    samples = session.sample()  # every interval collector, now
    session.close()
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bpfscope.runtime.losses import UNREAD_AT_STOP, Loss, Losses

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector, Sample

# Losses are reported while running at most this often (seconds), and always at the end.
LOSS_REPORT_EVERY_S = 1.0
# A collector that failed is opened again after these waits (seconds), the last one repeating.
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 15.0, 60.0)
# A deadline this close counts as reached (timers wake a little early or late).
_SLACK_S = 1e-3
# Batches read from one collector per wake-up at most: a ring that refills as fast as it is read (the
# request tracer under a 50 MB/s load) must still leave the loop to its timers. The rest is read on the
# next turn: its descriptor stays readable, so the wait returns at once.
MAX_BATCHES_PER_TURN = 8
# How long drain() (a stop, a removal) reads one collector's rings: to their end when it can, but a ring
# refilled as fast as it is read (the request tracer under load) must not keep a stop from ending. What
# is left is counted by the collector (unread()) and reported as lost at the end of the run.
DRAIN_SECONDS = 0.5


class StopToken:
    """A flag any thread or signal handler may set, with a file descriptor that a poll wakes on."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.reason: str | None = None

    def set(self, reason: str = "stopped") -> None:
        if self.reason is None:
            self.reason = reason
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write_fd, b"\0")

    def __bool__(self) -> bool:
        return self.reason is not None

    def fileno(self) -> int:
        return self._read_fd

    def clear_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read_fd, 512):
                pass

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def stop_on_signals(token: StopToken | None = None) -> Iterator[StopToken]:
    """While active (main thread only), SIGINT and SIGTERM set the token instead of raising: a signal
    that arrives while a batch is between the ring and the screen cannot lose it."""
    token = token if token is not None else StopToken()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        for sig in signals:
            signal.signal(sig, lambda signum, frame: token.set(signal.Signals(signum).name))
        yield token
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class SinkClosed(Exception):
    """Raised by a sink whose reader went away (a closed pipe): the session stops quietly."""


class Sink:
    """Where samples go. Every method has a default that does nothing, so a sink implements what it
    uses. Sinks never raise for a collector's sake: what they cannot write they say once."""

    def open(self, session: Session) -> None:
        """The session is about to run (collectors opened and started)."""

    def emit(self, collector: Collector, sample: Sample) -> None:
        """A sample or a drained batch."""

    def status(self, collector: Collector, elapsed_s: float) -> None:
        """A stream collector's interval passed (a status line, for people)."""

    def lost(self, collector: Collector, new: Losses, total: Losses) -> None:
        """Losses while running (at most once a second per collector)."""

    def error(self, collector: Collector, exc: BaseException, retry_in_s: float | None) -> None:
        """A collector failed; ``retry_in_s`` when the session will open it again."""

    def finish(self, collector: Collector, losses: Losses, elapsed_s: float) -> None:
        """The collector's run is over: its final losses."""

    def close(self) -> None:
        """The session is over."""


@dataclass(eq=False)
class _Slot:
    """A collector and what the loop keeps about it."""

    collector: Collector
    interval_s: float | None
    next_tick: float | None = None
    next_drain: float | None = None  # paced wake-ups: the session's own next drain
    # Paced drains in a row that found nothing (see Collector.paced_idle_max_s). The idle agent's
    # security and request tracers, paced at 20 drains a second, woke its loop 28 times a second, and a
    # wake-up costs this 2-CPU VM about 0.1-0.2 ms of CPU time for a drain of a few microseconds.
    idle_drains: int = 0
    ticks: int = 0
    open: bool = False
    failures: int = 0
    retry_at: float | None = None
    reported: Losses = field(default_factory=Losses)
    last_loss_report: float = 0.0
    last_sample: Sample | None = None


class Session:
    """Runs ``collectors`` and feeds ``sinks`` (see the module's text).

    ``interval`` is the default interval of collectors that name none (None: sampled once, at the end);
    ``count`` ends the run after that many intervals; ``duration`` after that many seconds.
    ``on_error="raise"`` (tools) closes everything and raises the first failure; ``"restart"`` (the
    agent) reports it to the sinks and opens the collector again with back-off while the others run;
    ``"isolate"`` (the health check) reports it and goes on without that collector. ``from_attach``
    (tools) counts from when the programs were attached instead of from a baseline taken at start().
    """

    def __init__(
        self,
        collectors: Sequence[Collector],
        sinks: Sequence[Sink] = (),
        *,
        interval: float | None = None,
        count: int | None = None,
        duration: float | None = None,
        stop: StopToken | None = None,
        on_error: str = "raise",
        from_attach: bool = False,
    ) -> None:
        if on_error not in ("raise", "restart", "isolate"):
            raise ValueError(f"on_error must be raise, restart or isolate, not {on_error!r}")
        self.slots = [_Slot(c, c.config.interval_s or interval or c.default_interval_s) for c in collectors]
        self.sinks = list(sinks)
        self.count = count
        self.duration = duration
        self.on_error = on_error
        self.from_attach = from_attach
        self._own_stop = stop is None
        self.stop_token = stop if stop is not None else StopToken()
        self.failed: dict[Collector, BaseException] = {}
        self.started_at: float | None = None
        self._closed = False
        self._slots_changed = True  # the loop registers the rings again (see loop)

    # --- the Python API ------------------------------------------------------------------------------
    @property
    def collectors(self) -> list[Collector]:
        return [slot.collector for slot in self.slots]

    def stop(self, reason: str = "stopped") -> None:
        """End a running loop (from any thread)."""
        self.stop_token.set(reason)

    def open(self) -> Session:
        """Open every collector: load and attach, before any interval begins. Under ``raise`` the first
        failure closes what was opened and propagates; otherwise it is reported and recorded in
        ``failed``."""
        for slot in self.slots:
            self._open(slot, time.monotonic())
        return self

    def start(self) -> Session:
        """Baselines, then the clocks start; the sinks learn the session is running."""
        for slot in self.slots:
            begin = slot.collector.start_from_attach if self.from_attach else slot.collector.start
            if slot.open and self._guard(slot, begin) is not _FAILED:
                # From when this collector's baseline was taken: a slow start does not shorten its
                # first interval.
                slot.next_tick = time.monotonic() + slot.interval_s if slot.interval_s else None
                self._pace(slot, time.monotonic())
        self.started_at = time.monotonic()
        for sink in self.sinks:
            sink.open(self)
        return self

    def sample(self) -> dict[Collector, Sample]:
        """Sample every open interval collector now and hand the samples to the sinks."""
        out = {}
        for slot in self.slots:
            sample = self._sample(slot)
            if sample is not None:
                out[slot.collector] = sample
        return out

    def drain(self) -> int:
        """Everything the stream collectors' rings hold now; returns how many samples were emitted."""
        emitted = 0
        for slot in self.slots:
            if slot.open and slot.collector.fds():
                deadline = time.monotonic() + DRAIN_SECONDS
                while time.monotonic() < deadline:
                    batch = self._guard(slot, slot.collector.drain)
                    if batch is None or batch is _FAILED:
                        break
                    self._emit(slot, batch)
                    emitted += 1
        return emitted

    def add(self, collector: Collector) -> None:
        """Run one more collector from now on (between loops: the agent's reload). It is opened and
        started at once; a failure is handled as ``on_error`` says."""
        slot = _Slot(collector, collector.config.interval_s or self.interval or collector.default_interval_s)
        self.slots.append(slot)
        now = time.monotonic()
        self._open(slot, now)
        if slot.open and self._guard(slot, collector.start) is not _FAILED:
            slot.next_tick = now + slot.interval_s if slot.interval_s else None
            self._pace(slot, now)

    def remove(self, collector: Collector) -> None:
        """Stop running one collector (between loops): what its rings hold and its last partial interval
        go to the sinks, then its losses; it is closed and the others go on."""
        slot = next(s for s in self.slots if s.collector is collector)
        losses: object = Losses()
        if slot.open:
            while collector.fds():
                batch = self._guard(slot, collector.drain)
                if batch is None or batch is _FAILED:
                    break
                self._emit(slot, batch)  # type: ignore[arg-type]
            if slot.open and not collector.fds() and slot.interval_s is not None:
                self._sample(slot)
            losses = self._guard(slot, collector.losses) if slot.open else Losses()
        elapsed = time.monotonic() - (self.started_at or time.monotonic())
        for sink in self.sinks:
            sink.finish(collector, losses if isinstance(losses, Losses) else Losses(), elapsed)
        collector.close()
        self.slots.remove(slot)
        self.failed.pop(collector, None)

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Open, start, loop until stopped, finish. ``ready`` is called once everything is attached and
        the baselines are taken (the CLI prints "Tracing ..." there)."""
        try:
            if not self.started_at:
                self.open()
                self.start()
            if ready is not None:
                ready()
            self.loop()
            self.finish()
        finally:
            self.close()

    def loop(self) -> None:
        """Wait and dispatch until the stop token, the duration or the count ends the run."""
        assert self.started_at is not None, "start() the session first"
        deadline = self.started_at + self.duration if self.duration else None
        stream_only_end = self._stream_only_end()
        if stream_only_end is not None:
            deadline = min(deadline, stream_only_end) if deadline else stream_only_end
        poller = select.epoll()
        try:
            poller.register(self.stop_token.fileno(), select.EPOLLIN)
            registered = self._register(poller, {})
            self._slots_changed = False
            while not self.stop_token:
                now = time.monotonic()
                if deadline is not None and now >= deadline - _SLACK_S:
                    break
                if self._all_done():
                    self.stop_token.set("done")
                    break
                wakes = [t for t in (deadline, *self._timers()) if t is not None]
                timeout = max(0.0, min(wakes) - now) if wakes else -1
                events = poller.poll(timeout)
                if any(fd == self.stop_token.fileno() for fd, _ in events):
                    self.stop_token.clear_wakeups()
                    if self.stop_token:
                        break
                ring_ready = [registered[fd] for fd, _ in events if fd in registered]
                ring_ready += self._paced_due(time.monotonic())
                if ring_ready:
                    self._drain_ready(ring_ready)
                now = time.monotonic()
                if deadline is not None and now >= deadline - _SLACK_S:
                    break
                self._tick(now)
                self._retry(now)
                if self._slots_changed:  # a collector opened or closed: its rings came or went
                    registered = self._register(poller, registered)
                    self._slots_changed = False
                if self._count_reached():
                    self.stop_token.set("count")
        finally:
            poller.close()

    def finish(self) -> None:
        """The end of a run: what the rings still hold, the last partial interval (unless the count just
        ended the run), and every collector's losses to the sinks."""
        self.drain()
        now = time.monotonic()
        elapsed = now - (self.started_at or now)
        for slot in self.slots:
            if slot.open and slot.interval_s is not None and self.stop_token.reason == "count":
                continue
            if slot.open and not slot.collector.fds():
                self._sample(slot)
        for slot in self.slots:
            losses = self._guard(slot, slot.collector.losses) if slot.open else Losses()
            losses = losses if isinstance(losses, Losses) else Losses()
            unread = slot.collector.unread() if slot.open else 0
            if unread:
                losses += Losses([Loss(UNREAD_AT_STOP, unread, "records left in a ring at the stop")])
            for sink in self.sinks:
                sink.finish(slot.collector, losses, elapsed)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self.slots:
            slot.collector.close()
            slot.open = False
        for sink in self.sinks:
            sink.close()
        if self._own_stop:
            self.stop_token.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inside the loop -----------------------------------------------------------------------------
    def _open(self, slot: _Slot, now: float) -> None:
        self._slots_changed = True
        try:
            slot.collector.open()
        except BaseException as exc:
            slot.collector.close()
            if self.on_error == "raise" or not isinstance(exc, Exception):
                self.close()
                raise
            self._failed(slot, exc, now)
            return
        slot.open = True
        slot.retry_at = None

    def _failed(self, slot: _Slot, exc: BaseException, now: float) -> None:
        self.failed[slot.collector] = exc
        retry_in = None
        if self.on_error == "restart":
            retry_in = RESTART_BACKOFF_S[min(slot.failures, len(RESTART_BACKOFF_S) - 1)]
            slot.retry_at = now + retry_in
        slot.failures += 1
        for sink in self.sinks:
            sink.error(slot.collector, exc, retry_in)

    def _guard(self, slot: _Slot, call: Callable[[], object]) -> object:
        """Run a collector's method; a failure is raised, or reported and the collector closed."""
        try:
            return call()
        except Exception as exc:
            if self.on_error == "raise":
                raise
            slot.collector.close()
            slot.open = False
            self._slots_changed = True
            self._failed(slot, exc, time.monotonic())
            return _FAILED

    def _sample(self, slot: _Slot) -> Sample | None:
        if not slot.open:
            return None
        sample = self._guard(slot, slot.collector.sample)
        if sample is None or sample is _FAILED:
            return None
        slot.last_sample = sample  # type: ignore[assignment]
        self._emit(slot, sample)  # type: ignore[arg-type]
        return sample  # type: ignore[return-value]

    def _emit(self, slot: _Slot, sample: Sample) -> None:
        for sink in list(self.sinks):
            try:
                sink.emit(slot.collector, sample)
            except SinkClosed:
                self.sinks.remove(sink)
                self.stop_token.set("output closed")

    def _drain_ready(self, slots: list[_Slot]) -> None:
        total = 0
        for slot in dict.fromkeys(slots, None):
            drained = False
            for _ in range(MAX_BATCHES_PER_TURN):
                if not slot.open or self.stop_token:  # a stop waits for one batch, not a turn's worth
                    break
                batch = self._guard(slot, slot.collector.drain)
                if batch is None or batch is _FAILED:
                    break
                drained = True
                self._emit(slot, batch)  # type: ignore[arg-type]
                total += len(batch) if hasattr(batch, "__len__") else 1
            if slot.next_drain is not None and slot.collector.paced_idle_max_s:
                idle = 0 if drained else slot.idle_drains + 1
                if idle != slot.idle_drains:
                    slot.idle_drains = idle
                    self._pace(slot, time.monotonic())
        # After a small batch, wait a little so the next arrives in a larger one: far less CPU for
        # the consumer and a faster producer (measured in benchmarks/ringbuf.py).
        from bpfscope.engine.ringbuf import SMALL_BATCH

        if 0 < total < SMALL_BATCH:
            wait = max(self._batch_wait(s) for s in slots)
            if wait:
                time.sleep(wait)
        self._report_losses(slots)

    @staticmethod
    def _batch_wait(slot: _Slot) -> float:
        """The longest wait for a larger batch its rings allow (each ring's: see ringbuf.py)."""
        rings = getattr(slot.collector, "rings", {})
        return max((ring.batch_wait for ring in rings.values()), default=0.0)

    def _report_losses(self, slots: Sequence[_Slot], force: bool = False) -> None:
        now = time.monotonic()
        for slot in slots:
            if not slot.open or (not force and now - slot.last_loss_report < LOSS_REPORT_EVERY_S):
                continue
            losses = slot.collector.losses()
            new = losses.since(slot.reported)
            if new.total:
                for sink in self.sinks:
                    sink.lost(slot.collector, new, losses)
                slot.reported = losses
            slot.last_loss_report = now

    def _timers(self) -> list[float]:
        return [
            t
            for slot in self.slots
            for t in (slot.next_tick, slot.retry_at, slot.next_drain)
            if t is not None
        ]

    @staticmethod
    def _pace(slot: _Slot, now: float) -> None:
        every = slot.collector.drain_every() if slot.open else None
        idle_max = slot.collector.paced_idle_max_s
        if every and idle_max and slot.idle_drains:
            every = max(every, min(every * 2 ** min(slot.idle_drains, 16), idle_max))
        slot.next_drain = now + every if every else None

    def _paced_due(self, now: float) -> list[_Slot]:
        """The open collectors with paced wake-ups whose drain is due (their next one scheduled)."""
        due = []
        for slot in self.slots:
            if slot.next_drain is not None and now >= slot.next_drain - _SLACK_S:
                due.append(slot)
                self._pace(slot, now)
        return due

    def _tick(self, now: float) -> None:
        for slot in self.slots:
            if slot.next_tick is None or now < slot.next_tick - _SLACK_S:
                continue
            slot.ticks += 1
            if slot.collector.fds():
                for sink in self.sinks:
                    sink.status(slot.collector, now - (self.started_at or now))
                self._report_losses([slot], force=True)
            else:
                self._sample(slot)
            assert slot.interval_s is not None
            slot.next_tick += slot.interval_s
            if slot.next_tick < now:  # a sample that took longer than the interval: skip, don't pile up
                slot.next_tick = now + slot.interval_s

    def _retry(self, now: float) -> None:
        for slot in self.slots:
            if slot.retry_at is not None and now >= slot.retry_at:
                self._open(slot, now)
                if slot.open and self._guard(slot, slot.collector.start) is not _FAILED:
                    slot.next_tick = now + slot.interval_s if slot.interval_s else None
                    self._pace(slot, now)

    def _register(self, poller: select.epoll, registered: dict[int, _Slot]) -> dict[int, _Slot]:
        """(Re-)register the rings of open stream collectors (a restarted one has new descriptors)."""
        wanted = {fd: slot for slot in self.slots if slot.open for fd in slot.collector.fds()}
        for fd in registered.keys() - wanted.keys():
            with contextlib.suppress(OSError, ValueError):
                poller.unregister(fd)
        for fd in wanted.keys() - registered.keys():
            poller.register(fd, select.EPOLLIN)
        return wanted

    def _all_done(self) -> bool:
        """Every open collector has nothing more to give (checked before each wait, so a collector done
        at once never leaves the loop waiting for nothing)."""
        opened = [slot for slot in self.slots if slot.open]
        return bool(opened) and all(slot.collector.done() for slot in opened)

    def _count_reached(self) -> bool:
        if not self.count:
            return False
        timed = [slot for slot in self.slots if slot.interval_s is not None and slot.open]
        return bool(timed) and all(slot.ticks >= self.count for slot in timed)

    def _stream_only_end(self) -> float | None:
        """A stream collector with an interval and a count runs interval x count seconds."""
        if not self.count or self.started_at is None:
            return None
        timed = [slot for slot in self.slots if slot.interval_s is not None]
        if timed and all(slot.collector.fds() for slot in timed):
            return self.started_at + max(slot.interval_s or 0 for slot in timed) * self.count
        return None


class _Failed:
    """Marks a guarded call that failed."""


_FAILED = _Failed()


class MemorySink(Sink):
    """Keeps every sample, per collector, and the final losses: for the Python API and tests."""

    def __init__(self) -> None:
        self.samples: dict[str, list[Sample]] = {}
        self.losses: dict[str, Losses] = {}
        self.errors: dict[str, list[BaseException]] = {}
        self._lock = threading.Lock()

    def emit(self, collector: Collector, sample: Sample) -> None:
        with self._lock:
            self.samples.setdefault(collector.name, []).append(sample)

    def error(self, collector: Collector, exc: BaseException, retry_in_s: float | None) -> None:
        with self._lock:
            self.errors.setdefault(collector.name, []).append(exc)

    def finish(self, collector: Collector, losses: Losses, elapsed_s: float) -> None:
        self.losses[collector.name] = losses

    def records(self, collector: str | None = None) -> list[dict]:
        """Every record emitted (by one collector, or all), in order."""
        names = [collector] if collector else list(self.samples)
        return [rec for name in names for sample in self.samples.get(name, []) for rec in sample.records()]


def run_collectors(
    collectors: Sequence[Collector], seconds: float, interval: float | None = None
) -> MemorySink:
    """Run collectors for ``seconds`` and return what they produced (for scripts and tests)."""
    sink = MemorySink()
    Session(collectors, [sink], interval=interval, duration=seconds).run()
    return sink


__all__ = [
    "MemorySink",
    "Session",
    "Sink",
    "SinkClosed",
    "StopToken",
    "run_collectors",
    "stop_on_signals",
]
