"""The profilers' watcher of processes: every process the kernel side has sampled (its ``seen_tgids``
map) has its memory map and mapped files held by a thread while the process lives, a few times a
second, so that its frames can be named at the end of the window even if it has exited by then. A
process that lived less than one period may be missed: its frames are then counted as ``no_mapping``.

With ``--unwind dwarf`` the same thread takes the samples' user stacks from the ring as they come and
unwinds them at once (unwind.py), while their processes' maps are known, and counts the stacks."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bpfscope.domains.profile import python
from bpfscope.domains.profile.symbols import NotReady
from bpfscope.domains.profile.unwind import Registers, StackCopy, unwind

if TYPE_CHECKING:
    from bpfscope.domains.profile.symbols import Symbolizer
    from bpfscope.engine.bpf import BpfObject
    from bpfscope.engine.ringbuf import RingBuffer

# (tgid, tid, comm, cgroup, user addresses leaf first, kernel addresses leaf first, Python frames
# innermost first as (qualified name, file, is_entry))
PythonFrames = tuple[tuple[str, str, bool], ...]
StackKey = tuple[int, int, bytes, int, tuple[int, ...], tuple[int, ...], PythonFrames]
# Samples kept while a binary they need is read (a large one takes seconds: python3.11 about 2 s),
# about 12 KiB each; beyond this many the oldest are dropped, and counted.
BACKLOG = 4096
# A window waits for them at most this long (reading a binary's symbols the first time a machine sees
# it takes up to seconds); samples still waiting then go to the next window, and at the end are
# counted as lost.
BACKLOG_MAX_WAIT_S = 30.0
BACKLOG_POLL_S = 0.05


@dataclass
class CopiedStack:
    """A sample's user stack as the kernel copied it, waiting to be unwound."""

    pid: int
    tid: int
    comm: bytes
    cgroup: int
    regs: Registers
    stack: StackCopy
    kernel: tuple[int, ...]
    weight_ns: int
    python: tuple[int, ...]  # code object addresses, innermost first, bit 0: is_entry


# How often new processes are looked for and the ring read (seconds): reading the small map costs
# about 50 us.
PERIOD_S = 0.1


@cache
def _head_dtype(sample: np.dtype) -> np.dtype:
    """struct user_sample's fields before its stack copy."""
    stack_at = sample.fields["stack"][1]
    names = [name for name in sample.names if sample.fields[name][1] < stack_at]
    return np.dtype(
        {
            "names": names,
            "formats": [sample.fields[name][0] for name in names],
            "offsets": [sample.fields[name][1] for name in names],
            "itemsize": stack_at,
        }
    )


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


class Tracker:
    def __init__(self, obj: BpfObject, symbols: Symbolizer, ring: RingBuffer | None = None) -> None:
        self.obj = obj
        self.symbols = symbols
        self.ring = ring
        # Unwound here since the last take_stacks(): [samples, nanoseconds the records carried].
        self.stacks: dict[StackKey, list[int]] = {}
        self.unwinds: Counter[str] = Counter()  # how each unwind ended (root, truncated, lost)
        self.backlog: list[CopiedStack] = []
        self.backlog_dropped = 0
        self.gave_up = 0  # stacks still waiting when the last window was cut
        self.python: dict[int, python.PyProcess] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bpfscope-tracker", daemon=True)
        self._lock = threading.RLock()
        self._exes: dict[int, str] = {}
        self._exited: set[int] = set()
        self.error: Exception | None = None

    def start(self, pid: int | None = None) -> None:
        """Start watching; the process ``pid`` (or every Python interpreter running, with the kernel
        side's filter deciding which are sampled) is read at once: a process is otherwise read only once
        it has been sampled, and its first samples would have no Python frames."""
        for candidate in [pid] if pid else _pids():
            if candidate == os.getpid():
                continue
            if pid or python.is_interpreter(_exe(candidate)):
                self._watch(candidate)
        self._thread.start()

    def _run(self) -> None:
        # The ring holds a second of samples: reading it 10 times a second unwinds in batches instead of
        # waking for every sample.
        while not self._stop.wait(PERIOD_S):
            try:
                self.refresh()
            except Exception as exc:  # raised again in the session's thread, at the next take_stacks()
                self.error = exc
                return

    def refresh(self) -> None:
        """Read the map of every process sampled since the previous refresh, and unwind the stacks the
        ring holds."""
        with self._lock:
            if self.ring is None:
                self._watch_new()
            else:  # each copied stack names its process: no map to read (50 us a key, and its delete)
                self._unwind_ring()
                self._unwind_backlog()

    def take_stacks(self) -> dict[StackKey, list[int]]:
        """The stacks unwound since the previous call; the backlog is unwound first, waiting for the
        binaries it needs, so that a window holds every sample taken in it."""
        deadline = time.monotonic() + BACKLOG_MAX_WAIT_S
        while True:
            if self.error is not None:
                raise self.error
            with self._lock:
                self.refresh()
                if not self.backlog or time.monotonic() > deadline:
                    # Left for the next window; if this was the last, they are lost.
                    self.gave_up = len(self.backlog)
                    out, self.stacks = self.stacks, {}
                    return out
            # Binaries are being read in the background; meanwhile the thread keeps the ring drained.
            time.sleep(BACKLOG_POLL_S)

    def _unwind_ring(self) -> None:
        assert self.ring is not None
        records = self.ring.read_sized()
        if not records:
            return
        # Each record is the sample's fields, then as many bytes of stack as were copied: the fields
        # are read for the whole batch at once, column by column, and each copy is its record's tail
        # (reading records padded to the struct as numpy rows cost 50 us a record).
        head = _head_dtype(self.ring.event.dtype)
        size = head.itemsize
        fields = np.frombuffer(b"".join(r[:size] for r in records), dtype=head)
        kernel, py = fields["kernel"], fields["py"]
        columns = zip(
            *(fields[name].tolist() for name in ("tgid", "tid", "cgroup", "ip", "sp", "bp", "stack_base")),
            fields["kernel_frames"].tolist(),
            fields["py_frames"].tolist(),
            fields["weight_ns"].tolist(),
            strict=True,
        )
        for i, (pid, tid, cgroup, ip, sp, bp, base, n_kernel, n_py, weight) in enumerate(columns):
            if pid not in self._exes:
                self._watch(pid)
            self.backlog.append(
                CopiedStack(
                    pid,
                    tid,
                    fields[i]["comm"].tobytes(),
                    cgroup,
                    Registers(ip, sp, bp),
                    StackCopy(base, records[i][size:]),
                    tuple(kernel[i, :n_kernel].tolist()) if n_kernel > 0 else (),
                    weight,
                    tuple(py[i, :n_py].tolist()) if n_py > 0 else (),
                )
            )
        if len(self.backlog) > BACKLOG:
            self.backlog_dropped += len(self.backlog) - BACKLOG
            del self.backlog[: len(self.backlog) - BACKLOG]

    def _unwind_backlog(self) -> None:
        waiting = []
        for sample in self.backlog:
            try:
                result = unwind(
                    sample.regs, sample.stack, lambda pc, pid=sample.pid: self.symbols.rule_at(pid, pc)
                )
            except NotReady:
                waiting.append(sample)
                continue
            self.unwinds[result.status] += 1
            key = (
                sample.pid,
                sample.tid,
                sample.comm,
                sample.cgroup,
                tuple(result.addresses),
                sample.kernel,
                self.python_frames(sample.pid, sample.python),
            )
            counted = self.stacks.setdefault(key, [0, 0])
            counted[0] += 1
            counted[1] += sample.weight_ns
        self.backlog = waiting

    def python_frames(self, pid: int, frames: tuple[int, ...]) -> PythonFrames:
        """The Python frames the kernel recorded (code object addresses, bit 0: is_entry), named."""
        py = self.python.get(pid)
        if py is None or not frames:
            return ()
        return tuple((*py.code_name(value & ~1), bool(value & 1)) for value in frames)

    def _watch(self, pid: int) -> None:
        if not self.symbols.watch(pid):
            self._exited.add(pid)
            return
        process = self.symbols.process(pid)
        self._exes[pid] = Path(process.exe).name if process is not None else ""
        if process is not None:
            # A Python interpreter: the kernel side walks its frames from now on.
            py = python.detect(process)
            if py is not None:
                self.python[pid] = py
                self.obj.maps["py_processes"].update(pid, py.bpf_entry())

    def _watch_new(self) -> None:
        seen = self.obj.maps["seen_tgids"]
        for raw in list(seen.keys_bytes()):
            pid = int.from_bytes(raw, "little")
            if pid not in self._exes and pid not in self._exited:
                self._watch(pid)
            # Seen once is enough: the map keeps room for new processes.
            seen.delete(raw)

    def exe(self, pid: int) -> str:
        """The executable's file name of a process watched, "" if it was never seen alive."""
        return self._exes.get(pid, "")

    def forget_exited(self) -> None:
        """After a window: processes that have exited since are forgotten (their samples are in)."""
        with self._lock:
            for pid in list(self._exes):
                if not Path(f"/proc/{pid}").exists():
                    self.symbols.forget(pid)
                    del self._exes[pid]
                    if self.python.pop(pid, None) is not None:
                        self.obj.maps["py_processes"].delete(pid)
            self._exited.clear()
            self.symbols.prune()  # files no live process maps, past a bound

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
