"""The loop every streaming tool shares: wait on its ring buffers, decode what arrived in batches, print
it in time order, and stop cleanly.

SIGINT and SIGTERM set a flag and wake the loop instead of raising: an exception raised between taking
a batch off a ring and printing it would lose the batch. On a stop the loop finishes the batch, drains
what the kernel had already committed, and reports every lost event.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bpfscope.cli.tool import RunOptions
from bpfscope.engine.bpf import BpfObject
from bpfscope.sinks.output import Output

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.engine.ringbuf import RingBuffer

# Lost events are reported while tracing at most this often (seconds), and always at the end.
DROP_REPORT_EVERY = 1.0

# (ring name, batch of records) -> (timestamp ns, line) per event, in any order.
Render = Callable[[str, "np.ndarray"], Iterable[tuple[int, str]]]


@dataclass
class StopRequest:
    requested: list[int]
    wake_fd: int

    def __bool__(self) -> bool:
        return bool(self.requested)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """While active, SIGINT and SIGTERM only set the returned flag and wake a poll on ``wake_fd``."""
    requested: list[int] = []
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        for sig in previous:
            signal.signal(sig, lambda signum, frame: requested.append(signum))
        yield StopRequest(requested, read_fd)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(read_fd)
        os.close(write_fd)


class EventStream:
    """Drains every ring at each wake-up and writes the lines in time order."""

    def __init__(
        self, tool: str, obj: BpfObject, rings: dict[str, RingBuffer], render: Render, out: Output
    ) -> None:
        self.tool = tool
        self.obj = obj
        self.rings = rings
        self.render = render
        self.out = out
        self.seen = dict.fromkeys(rings, 0)
        self._batch_wait = max((ring.batch_wait for ring in rings.values()), default=0.0)
        self._small_batch = min((ring.small_batch for ring in rings.values()), default=0)
        self._reported_drops = 0
        self._last_drop_report = 0.0

    def drain(self) -> int:
        """Everything in the rings now; returns how many lines were written."""
        lines: list[tuple[int, str]] = []
        for name, ring in self.rings.items():
            batch = ring.read()
            if len(batch):
                self.seen[name] += len(batch)
                lines.extend(self.render(name, batch))
        if not lines:
            return 0
        if len(self.rings) > 1:
            lines.sort(key=lambda pair: pair[0])
        self.out.stream.write("\n".join(line for _, line in lines) + "\n")
        self.out.stream.flush()
        return len(lines)

    def report_drops(self, force: bool = False) -> None:
        dropped = self.obj.dropped()
        now = time.monotonic()
        if dropped > self._reported_drops and (force or now - self._last_drop_report >= DROP_REPORT_EVERY):
            lost = dropped - self._reported_drops
            self.out.note(f"{self.tool}: {lost} events lost (ring buffer full; {dropped} in all)")
            self._reported_drops = dropped
            self._last_drop_report = now

    def summary(self) -> str:
        counts = ", ".join(f"{n} {name}" for name, n in self.seen.items())
        text = f"{self.tool}: {counts} traced, {self.obj.losses()}"
        malformed = sum(r.malformed for r in self.rings.values())
        return text + (f"; {malformed} malformed records skipped" if malformed else "")

    def run(self, opts: RunOptions, stop: StopRequest, status_every: float | None = None) -> None:
        """Until stop, --duration, or interval x count; with an interval, a status line each time."""
        with select.epoll() as poller:
            poller.register(stop.wake_fd, select.EPOLLIN)
            for ring in self.rings.values():
                poller.register(ring.fileno(), select.EPOLLIN)
            begin = time.monotonic()
            deadline = begin + opts.duration if opts.duration else None
            if opts.interval and opts.count:
                end = begin + opts.interval * opts.count
                deadline = min(deadline, end) if deadline else end
            next_status = begin + opts.interval if opts.interval else None
            while not stop:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wake = min((t for t in (deadline, next_status) if t is not None), default=None)
                poller.poll(-1 if wake is None else max(0.0, wake - now))
                # The small-batch wait of RingBuffer.poll (see there), over all the rings.
                if 0 < self.drain() < self._small_batch and self._batch_wait:
                    time.sleep(self._batch_wait)
                self.report_drops()
                if next_status is not None and time.monotonic() >= next_status:
                    self.out.note(f"{self.summary()} in {time.monotonic() - begin:.1f}s")
                    next_status += opts.interval or 0
            # What the kernel committed before we stopped is still in the rings: it is part of the run.
            while self.drain():
                pass
            self.report_drops(force=True)


def stream_events(
    tool: str,
    what: str,
    obj: BpfObject,
    rings: dict[str, RingBuffer],
    render: Render,
    opts: RunOptions,
    header: str | None = None,
) -> EventStream:
    """Run a streaming tool's loop from attach to summary, quiet on a closed pipe (`| head`).

    ``rings`` are named by what their records are ("execs"): the names label the summary's counts.
    """
    out = opts.output
    stream = EventStream(tool, obj, rings, render, out)
    # Stop requests are caught from here on, before the note tells anyone that tracing has begun.
    with stop_requests() as stop:
        out.note(f"Tracing {what}... Ctrl-C to end.")
        try:
            if header and not opts.as_json:
                out.line(header)
            stream.run(opts, stop)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    out.note(stream.summary())
    return stream
