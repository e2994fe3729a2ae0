"""One direction of a connection as a parser reads it: the bytes captured, in order, with gaps where a
call moved more bytes than were copied (the capture limit) or none at all (sendfile).

A parser asks for the bytes it can see up to the next gap (:meth:`Stream.view`), consumes what it parsed
(:meth:`Stream.consume`, which also steps over gaps: a body is counted, not read), and asks when its
first and last bytes moved (:meth:`Stream.start_ns`, :meth:`Stream.consumed_end_ns`). Datagram protocols
read whole calls instead (:meth:`Stream.pop_segment`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# A message whose head needs more than this many bytes is not waited for: the parser gives up on it.
MAX_HEAD_BYTES = 64 * 1024


@dataclass(slots=True)
class Segment:
    """One call's bytes: ``data`` captured, then ``missing`` more that moved but were not copied."""

    data: bytes
    missing: int
    start_ns: int
    end_ns: int

    @property
    def size(self) -> int:
        return len(self.data) + self.missing


class Stream:
    """``ingress``: bytes the process received (a byte moved when its call returned); else sent (when
    its call was entered)."""

    def __init__(self, ingress: bool = False) -> None:
        self.ingress = ingress
        self.segments: deque[Segment] = deque()
        self.head = 0  # bytes of segments[0] already consumed
        self.available = 0  # bytes not consumed, gaps included
        self.last_end_ns = 0  # end of the call that held the last byte consumed
        self.end: int | None = None  # offset after the last byte appended (TCP: the kernel's count)
        # Up to where the parser steps over bytes by count (a body): the tracker asks the kernel not to
        # send the calls wholly before it (requests.bpf.c, skips).
        self.skip_until = 0

    @property
    def position(self) -> int:
        """The offset of the next unconsumed byte in the direction's bytes."""
        return (self.end or 0) - self.available

    def skipping(self, n: int) -> None:
        """The parser steps over the next ``n`` bytes, whatever they are."""
        self.skip_until = max(self.skip_until, self.position + n)

    def append(
        self, data: bytes, size: int, start_ns: int, end_ns: int, tail: bytes = b"", pos: int | None = None
    ) -> None:
        """One call's bytes: ``data`` its first, ``tail`` its last (when the call was longer than the
        capture: what lies between is a gap). ``pos`` is where the call's bytes begin: calls the kernel
        did not send (a body skipped, or lost) are a gap before it."""
        if size <= 0:
            return
        if pos is not None:
            if self.end is not None and pos > self.end:
                self.segments.append(Segment(b"", pos - self.end, start_ns, start_ns))
                self.available += pos - self.end
            self.end = pos + size
        elif self.end is not None:
            self.end += size
        self.segments.append(Segment(data, size - len(data) - len(tail), start_ns, end_ns))
        if tail:
            self.segments.append(Segment(tail, 0, start_ns, end_ns))
        self.available += size

    def __len__(self) -> int:
        return self.available

    def start_ns(self) -> int:
        """When the next unconsumed byte moved: its call's entry when sent, its return when received
        (a blocking read is entered long before anything arrives)."""
        if not self.segments:
            return 0
        seg = self.segments[0]
        return seg.end_ns if self.ingress else seg.start_ns

    def gap_at(self, n: int) -> bool:
        """The byte ``n`` bytes ahead was not captured: what a parser waits for there is never seen."""
        for i, seg in enumerate(self.segments):
            offset = self.head if i == 0 else 0
            here = seg.size - offset
            if n < here:
                return n >= len(seg.data) - offset
            n -= here
        return False

    def at_gap(self) -> bool:
        """The next byte was not captured."""
        return bool(self.segments) and self.head >= len(self.segments[0].data)

    def view(self, limit: int = MAX_HEAD_BYTES) -> bytes:
        """Captured bytes from the next one up to the next gap (at most ``limit``)."""
        segments = self.segments
        if not segments:
            return b""
        first = segments[0]
        if first.missing or len(segments) == 1:
            # The common case (a call parsed as it arrives): its own bytes, not joined.
            head = self.head
            data = first.data
            if head or len(data) > limit:
                return data[head : head + limit]
            return data
        parts: list[bytes] = []
        n = 0
        for i, seg in enumerate(self.segments):
            data = seg.data[self.head :] if i == 0 else seg.data
            parts.append(data)
            n += len(data)
            if seg.missing or n >= limit:
                break
        return b"".join(parts)[:limit] if len(parts) != 1 else parts[0][:limit]

    def consume(self, n: int) -> int:
        """Step over ``n`` bytes (captured or not); returns how many there were (fewer when the stream
        holds fewer: the caller waits for the rest)."""
        segments = self.segments
        if segments and n > 0:
            # The common case: within the first call's bytes (messages parsed one after another).
            seg = segments[0]
            after = self.head + n
            size = len(seg.data) + seg.missing
            if after <= size:
                self.last_end_ns = seg.end_ns
                self.available -= n
                if after == size:
                    segments.popleft()
                    self.head = 0
                else:
                    self.head = after
                return n
        done = 0
        while n > done and self.segments:
            seg = self.segments[0]
            left = seg.size - self.head
            step = min(left, n - done)
            self.head += step
            done += step
            if self.head >= seg.size:
                self.last_end_ns = seg.end_ns
                self.segments.popleft()
                self.head = 0
            else:
                self.last_end_ns = seg.end_ns
        self.available -= done
        return done

    def step_over(self, n: int) -> int:
        """Step over ``n`` bytes whatever they are (a body counted, not read); returns how many are still
        to come, which the kernel is told it need not send."""
        left = n - self.consume(n) if n else 0
        if left:
            self.skipping(left)
        return left

    def discard(self, size: int, pos: int | None) -> None:
        """A call not parsed (the connection is being resynchronised): only its place is kept."""
        self.clear()
        if pos is not None:
            self.end = pos + size
        elif self.end is not None:
            self.end += size

    def pop_segment(self) -> Segment | None:
        """The next call's bytes whole (datagrams: one call, one message)."""
        if not self.segments:
            return None
        seg = self.segments.popleft()
        if self.head:
            skipped = max(0, self.head - len(seg.data))
            seg = Segment(seg.data[self.head :], seg.missing - skipped, seg.start_ns, seg.end_ns)
        self.head = 0
        self.available -= seg.size
        self.last_end_ns = seg.end_ns
        return seg

    def clear(self) -> int:
        """Drop everything (after a parse error: the parser resynchronises at the next call); returns
        the bytes dropped."""
        dropped = self.available
        if self.segments:
            self.last_end_ns = self.segments[-1].end_ns
        self.segments.clear()
        self.head = 0
        self.available = 0
        self.skip_until = 0  # what the parser stepped over is no longer known: skip nothing
        return dropped

    def skip_to_next_call(self) -> int:
        """Drop the rest of the current call's bytes (resynchronise where the next call begins)."""
        if not self.segments:
            return 0
        return self.consume(self.segments[0].size - self.head)
