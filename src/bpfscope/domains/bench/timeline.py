"""Each thread's timeline, from tsa's off-CPU episodes: where any interval of a thread's time went.

An episode is one stretch off the CPU: from ``off`` to ``wake`` blocked in its state (nothing when it was
preempted), from ``wake`` to ``on`` in the run queue. Between two episodes the thread ran. So the time of
an interval is, state by state, its overlap with the episodes, and the rest on a CPU: the states of any
interval add up to its length. Before a thread was first seen nothing is known: that part is unknown
(the tree's residual).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from bpfscope.domains.sched.tsa import states


class Timeline:
    def __init__(self) -> None:
        self._parts: dict[int, list[np.ndarray]] = defaultdict(list)
        self._threads: dict[int, tuple[np.ndarray, ...]] = {}
        self.known_from: dict[int, int] = {}  # tid -> when it was first seen
        self.names = states()
        self.cpu = self.names.index("cpu")
        self.runqueue = self.names.index("runqueue")

    def add(self, episodes: np.ndarray) -> None:
        """A batch of struct tsa_episode records."""
        if not len(episodes):
            return
        order = np.argsort(episodes["tid"], kind="stable")
        sorted_eps = episodes[order]
        tids, starts = np.unique(sorted_eps["tid"], return_index=True)
        for tid, part in zip(tids.tolist(), np.split(sorted_eps, starts[1:]), strict=True):
            self._parts[tid].append(part)
            first = int(part["off_ns"].min())
            self.known_from[tid] = min(self.known_from.get(tid, first), first)
        self._threads.clear()

    def seen(self, tid: int, since_ns: int) -> None:
        """The thread was followed from ``since_ns`` (read from the kernel's map at the start)."""
        self.known_from[tid] = min(self.known_from.get(tid, since_ns), since_ns)

    def _thread(self, tid: int) -> tuple[np.ndarray, ...] | None:
        found = self._threads.get(tid)
        if found is None and tid in self._parts:
            eps = np.concatenate(self._parts[tid])
            eps = eps[np.argsort(eps["on_ns"], kind="stable")]
            found = self._threads[tid] = (
                eps["off_ns"].astype(np.int64),
                eps["wake_ns"].astype(np.int64),
                eps["on_ns"].astype(np.int64),
                eps["state"].astype(np.int64),
            )
        return found

    def states(self, tid: int, intervals: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
        """(time per state, unknown time) of a thread over intervals (ns, each [start, end)). One more
        slot at the end: of the run-queue time, the part after disk-read waits (a read's own wait for a
        CPU once its I/O is done: the reader's clock, such as PostgreSQL's track_io_timing, counts it)."""
        out = np.zeros(len(self.names) + 1, np.int64)
        disk_read = self.names.index("disk_read")
        unknown = 0
        known = self.known_from.get(tid)
        eps = self._thread(tid)
        for start, end in intervals:
            if known is None or end <= known:
                unknown += max(0, end - start)
                continue
            if start < known:
                unknown += known - start
                start = known
            length = end - start
            if length <= 0:
                continue
            off_cpu = 0
            if eps is not None:
                offs, wakes, ons, kinds = eps
                i = int(np.searchsorted(ons, start, side="right"))
                while i < len(ons) and offs[i] < end:
                    blocked = max(0, min(wakes[i], end) - max(offs[i], start))
                    queued = max(0, min(ons[i], end) - max(wakes[i], start))
                    if blocked:
                        out[kinds[i]] += blocked
                    out[self.runqueue] += queued
                    if kinds[i] == disk_read:
                        out[-1] += queued
                    off_cpu += blocked + queued
                    i += 1
            out[self.cpu] += length - off_cpu
        return out, unknown

    def woken_before(self, tid: int, at_ns: int, state: str) -> int | None:
        """When the thread was last woken before ``at_ns`` from a wait in ``state`` (None: it was not,
        or it was running since before its last wait of another kind)."""
        eps = self._thread(tid)
        if eps is None:
            return None
        offs, wakes, ons, kinds = eps
        i = int(np.searchsorted(ons, at_ns, side="right")) - 1
        if i < 0 or kinds[i] != self.names.index(state) or wakes[i] == offs[i]:
            return None
        return int(wakes[i])
