"""The profilers' watcher of processes: every process the kernel side has sampled (its ``seen_tgids``
map) has its memory map and binaries read by a thread while the process lives, a few times a second, so
that its frames can be named at the end of the window even if it has exited by then. A process that
lived less than one period may be missed: its frames are then counted as ``no_mapping``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bpfscope.domains.profile.symbols import Symbolizer
    from bpfscope.engine.bpf import BpfObject

# How often new processes are looked for (seconds): reading the small map costs about 50 us.
PERIOD_S = 0.25


class Tracker:
    def __init__(self, obj: BpfObject, symbols: Symbolizer) -> None:
        self.obj = obj
        self.symbols = symbols
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bpfscope-tracker", daemon=True)
        self._lock = threading.Lock()
        self._exes: dict[int, str] = {}
        self._exited: set[int] = set()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PERIOD_S):
            self.refresh()

    def refresh(self) -> None:
        """Read the map of every process sampled since the previous refresh."""
        with self._lock:
            seen = self.obj.maps["seen_tgids"]
            for raw in list(seen.keys_bytes()):
                pid = int.from_bytes(raw, "little")
                if pid in self._exes or pid in self._exited:
                    continue
                if self.symbols.watch(pid):
                    process = self.symbols.process(pid)
                    self._exes[pid] = Path(process.exe).name if process is not None else ""
                else:
                    self._exited.add(pid)
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
            self._exited.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
