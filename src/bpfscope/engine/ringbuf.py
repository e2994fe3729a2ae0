"""A batch consumer of a BPF ring buffer: numpy views over the memory-mapped ring, not one callback per
record.

The ring's layout is the kernel's (kernel/bpf/ringbuf.c): a consumer page we write, a producer page we
read, then the data area. Each record is an 8-byte header (length with BUSY and DISCARD bits, page
offset) and the event, padded to 8 bytes. Records of one event type have one stride, so a run of them is
a numpy structured array we can check and copy in one go.

The kernel lets a consumer map the data area twice in a row, so that a record that wraps is contiguous
(libbpf does). We map it once and join the two pieces of a record that wraps: every page of the mapping
is resident from mmap() on, so the second copy counted the rings twice in the RSS (the agent's 56 MiB
of rings: 261 -> 200 MB idle; `secure`'s 24 MiB: 91 -> 67 MB), for no speed (benchmarks/ringbuf.py's
drain 27-34 M records/s either way).

A ring declared with BS_RINGBUF_VAR carries records of variable length (a header and as much payload as
there was, sent with bs_output): those are decoded one at a time, each zero-padded to the full event
struct, with its length in the extra field ``_size``. Fixed-size rings keep the batch path.
"""

from __future__ import annotations

import mmap
import select
import struct
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from bpfscope.errors import BpfscopeError

if TYPE_CHECKING:
    from bpfscope.engine.bpf import Map
    from bpfscope.engine.btf import Struct

_HEADER = 8
_BUSY = 1 << 31
_DISCARD = 1 << 30
_LENGTH = ~(_BUSY | _DISCARD)
_header_at = struct.Struct("<I").unpack_from
_MAP_TYPE_RINGBUF = 27
# After a small batch the consumer waits a little before reading again, so records arrive in larger
# batches: far less consumer CPU, and a faster producer (measured in benchmarks/ringbuf.py), for at most
# this much added latency.
SMALL_BATCH = 1024
BATCH_WAIT_S = 200e-6
# The wait never lets more than a quarter of the ring fill at this event rate.
_FAST_PRODUCER = 20e6


class RingBuffer:
    def __init__(
        self, ring_map: Map, event: Struct, dropped: Callable[[], int], variable: bool = False
    ) -> None:
        if ring_map.type != _MAP_TYPE_RINGBUF:
            raise BpfscopeError(f"map {ring_map.name} is not a ring buffer")
        self.name = ring_map.name
        self.event = event
        self.size = ring_map.max_entries
        self._mask = self.size - 1
        self._page = mmap.PAGESIZE
        self._stride = (_HEADER + event.size + 7) & ~7
        self._dropped = dropped
        self.variable = variable
        if variable:
            base = event.dtype
            self._var_dtype = np.dtype(
                {
                    "names": [*base.names, "_size"],
                    "formats": [base.fields[n][0] for n in base.names] + ["<u4"],
                    "offsets": [base.fields[n][1] for n in base.names] + [base.itemsize],
                    "itemsize": base.itemsize + 8,
                }
            )
        fd = ring_map.fd
        self._consumer = mmap.mmap(
            fd, self._page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._data = mmap.mmap(fd, self._page + self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=self._page)
        self._end = self._page + self.size
        # The positions are read and written as single aligned 8-byte loads and stores (numpy element
        # access): a store done in pieces could show the kernel a consumer position of 0 for a moment,
        # which to it means a full ring.
        self._consumer_pos = np.frombuffer(self._consumer, dtype="<u8", count=1)
        self._producer_pos = np.frombuffer(self._data, dtype="<u8", count=1)
        # Records are sliced out of one byte view of the mapping: a run of n records is an (n, stride)
        # block whose first 4 bytes per row are the lengths and whose next bytes are the events.
        self._bytes = np.frombuffer(self._data, dtype=np.uint8)
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)
        quarter_fill_s = (self.size / 4) / self._stride / _FAST_PRODUCER
        self.small_batch = SMALL_BATCH
        self.batch_wait = 0.0 if self.size <= 32 * 1024 else min(BATCH_WAIT_S, quarter_fill_s)
        # Records delivered to the caller, and records of another size than the event (a bug in the
        # BPF program: counted, never silently decoded wrong).
        self.consumed = 0
        self.malformed = 0
        # What a read of an empty ring returns: made once (an empty structured array for each read of a
        # quiet ring was a tenth of secure's time under an exec storm, its hits' ring read each drain).
        self._none = np.empty(0, dtype=self.dtype)
        self._none.flags.writeable = False

    @property
    def dtype(self) -> np.dtype:
        return self._var_dtype if self.variable else self.event.dtype

    @property
    def dropped(self) -> int:
        """Events the kernel could not reserve: counted in BPF, reported here."""
        return self._dropped()

    def read(self) -> np.ndarray:
        """Every committed record now in the ring, as one array of events; never blocks."""
        if self.variable:
            return self._read_variable()
        cons = int(self._consumer_pos[0])
        prod = int(self._producer_pos[0])
        batches: list[np.ndarray] = []
        event_size = self.event.size
        while cons < prod:
            offset = self._page + (cons & self._mask)
            # The batch stops at the end of the mapping; a record across it is taken on its own below.
            n = min(prod - cons, self._end - offset) // self._stride
            if n:
                rows = self._bytes[offset : offset + n * self._stride].reshape(n, self._stride)
                # Headers first, then data: x86 and arm64 (with the kernel's release store) order these
                # loads so a header read as committed guarantees the event bytes read after it.
                lengths = rows[:, :4].copy().view("<u4").reshape(n)
                not_plain = np.flatnonzero(lengths != event_size)
                k = int(not_plain[0]) if not_plain.size else n
                if k:
                    events = rows[:k, _HEADER : _HEADER + event_size].copy()
                    batches.append(events.view(self.event.dtype).reshape(k))
                    cons += k * self._stride
                    continue
            (header,) = struct.unpack_from("<I", self._data, offset)
            if header & _BUSY:
                break
            length = header & ~(_BUSY | _DISCARD)
            if not header & _DISCARD:
                if length != event_size:
                    self.malformed += 1
                elif offset + self._stride <= self._end:
                    # Committed between the batch read and now: take it on the next pass.
                    continue
                else:
                    event = self._record(offset, length)
                    batches.append(np.frombuffer(bytearray(event), dtype=self.event.dtype, count=1))
            cons += (_HEADER + length + 7) & ~7
        self._consumer_pos[0] = cons
        if not batches:
            return self._none
        out = batches[0] if len(batches) == 1 else np.concatenate(batches)
        self.consumed += len(out)
        return out

    def _read_variable(self) -> np.ndarray:
        event_size = self.event.size
        itemsize = self._var_dtype.itemsize
        records = self.read_sized()
        out = bytearray(len(records) * itemsize)
        for i, record in enumerate(records):
            start = i * itemsize
            out[start : start + len(record)] = record
            struct.pack_into("<I", out, start + event_size, len(record))
        return np.frombuffer(out, dtype=self._var_dtype, count=len(records))

    def pending(self) -> int:
        """Records committed and not read yet (counted, not consumed): what a stop leaves behind."""
        cons = int(self._consumer_pos[0])
        prod = int(self._producer_pos[0])
        count = 0
        while cons < prod:
            (header,) = struct.unpack_from("<I", self._data, self._page + (cons & self._mask))
            if header & _BUSY:
                break
            count += not header & _DISCARD
            cons += (_HEADER + (header & ~(_BUSY | _DISCARD)) + 7) & ~7
        return count

    def read_sized(self, limit: int | None = None) -> list[bytes]:
        """A variable-length ring's records as sent, each at its own length (not padded to the struct:
        records of a few hundred bytes in a ring whose struct holds kilobytes of payload); never blocks.
        At most ``limit`` records (the rest stay for the next read): a consumer that turns each record
        into many objects keeps its memory bounded however full the ring got."""
        cons = int(self._consumer_pos[0])
        prod = int(self._producer_pos[0])
        event_size = self.event.size
        records: list[bytes] = []
        # Names bound once and the slice taken here, not in _record() but for a record that wraps: an
        # exec storm reads two records an exec, and this loop was 1.2 us of the tool's 9.5 an exec.
        append, data, page, mask, end = records.append, self._data, self._page, self._mask, self._end
        room = prod - cons if limit is None else limit  # without a limit, a bound never reached
        while cons < prod and len(records) < room:
            offset = page + (cons & mask)
            (header,) = _header_at(data, offset)
            if header & _BUSY:
                break
            length = header & _LENGTH
            if not header & _DISCARD:
                start = offset + _HEADER
                if length > event_size:
                    self.malformed += 1
                elif start + length <= end:
                    append(data[start : start + length])
                else:
                    append(self._record(offset, length))
            cons += (_HEADER + length + 7) & ~7
        self._consumer_pos[0] = cons
        self.consumed += len(records)
        return records

    def _record(self, offset: int, length: int) -> bytes:
        """The record whose header is at ``offset``: one slice, or two joined where it wraps (a header
        never does: records start 8-byte aligned in a ring of a power-of-two size)."""
        start = offset + _HEADER
        end = start + length
        if end <= self._end:
            return self._data[start:end]
        return self._data[start : self._end] + self._data[self._page : self._page + end - self._end]

    def poll(self, timeout: float | None = None) -> np.ndarray:
        """Records available now, or wait up to ``timeout`` seconds (None: forever) for some."""
        out = self.read()
        if not len(out):
            self._epoll.poll(-1 if timeout is None else timeout)
            out = self.read()
        if 0 < len(out) < self.small_batch and self.batch_wait:
            time.sleep(self.batch_wait)
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        """Batches forever (until the caller stops or Ctrl-C)."""
        while True:
            batch = self.poll(1.0)
            if len(batch):
                yield batch

    def fileno(self) -> int:
        return self._epoll.fileno()

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._epoll.close()
        # The position views export the maps' buffers: release them before unmapping.
        del self._consumer_pos, self._producer_pos, self._bytes
        self._consumer.close()
        self._data.close()
