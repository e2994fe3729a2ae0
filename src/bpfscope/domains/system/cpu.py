"""CPU and memory use, as a dashboard shows them (psutil), for the health check and the agent.

No BPF: these are the two numbers people already watch, shown beside what they miss.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bpfscope.runtime.collector import Collector, Config, Sample
from bpfscope.runtime.schema import Field, Schema

CPU_SCHEMA = Schema(
    "cpu",
    (
        Field("busy_pct", "float", "%", "everything but idle and iowait, over all CPUs"),
        Field("user_pct", "float", "%", "user and nice"),
        Field("system_pct", "float", "%", "system, irq and softirq"),
        Field("iowait_pct", "float", "%"),
        Field("steal_pct", "float", "%", "taken by the hypervisor"),
        Field("cpus", "int", doc="logical CPUs"),
    ),
    doc="CPU time over the interval, as top and psutil count it.",
    interval=True,
)
MEMORY_SCHEMA = Schema(
    "memory",
    (
        Field("used_pct", "float", "%", "(total - available) / total"),
        Field("available_bytes", "int", "bytes"),
        Field("total_bytes", "int", "bytes"),
        Field("swap_used_pct", "float", "%", nullable=True),
    ),
    doc="Memory the kernel cannot get back without swapping or killing, at the end of the interval.",
    interval=True,
)


@dataclass
class CpuSample(Sample):
    ts: float
    interval_s: float
    busy_pct: float
    user_pct: float
    system_pct: float
    iowait_pct: float
    steal_pct: float
    cpus: int

    def records(self) -> Iterator[dict[str, Any]]:
        yield CPU_SCHEMA.record(vars(self))


class CpuCollector(Collector[Config]):
    """CPU time over each interval, from /proc/stat (psutil.cpu_times)."""

    name = "cpu"
    _schemas = (CPU_SCHEMA,)

    def start(self) -> None:
        import psutil

        self._before = psutil.cpu_times()
        self._t0 = time.monotonic()

    def sample(self) -> CpuSample:
        import psutil

        after = psutil.cpu_times()
        now = time.monotonic()
        delta = {f: max(0.0, getattr(after, f) - getattr(self._before, f)) for f in after._fields}
        # user and nice already include guest time (as psutil counts it).
        total = sum(v for f, v in delta.items() if f not in ("guest", "guest_nice")) or 1e-9
        idle = delta.get("idle", 0.0) + delta.get("iowait", 0.0)

        def share(*names: str) -> float:
            return 100.0 * sum(delta.get(f, 0.0) for f in names) / total

        sample = CpuSample(
            ts=time.time(),
            interval_s=now - self._t0,
            busy_pct=max(0.0, 100.0 * (total - idle) / total),
            user_pct=share("user", "nice"),
            system_pct=share("system", "irq", "softirq"),
            iowait_pct=share("iowait"),
            steal_pct=share("steal"),
            cpus=psutil.cpu_count() or 1,
        )
        self._before, self._t0 = after, now
        return sample


@dataclass
class MemorySample(Sample):
    ts: float
    interval_s: float
    used_pct: float
    available_bytes: int
    total_bytes: int
    swap_used_pct: float | None

    def records(self) -> Iterator[dict[str, Any]]:
        yield MEMORY_SCHEMA.record(vars(self))


class MemoryCollector(Collector[Config]):
    """Memory in use at the end of each interval (psutil.virtual_memory: "available" already counts the
    page cache the kernel can reclaim)."""

    name = "memory"
    _schemas = (MEMORY_SCHEMA,)

    def start(self) -> None:
        self._t0 = time.monotonic()

    def sample(self) -> MemorySample:
        import psutil

        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
        now = time.monotonic()
        sample = MemorySample(
            ts=time.time(),
            interval_s=now - self._t0,
            used_pct=float(vm.percent),
            available_bytes=int(vm.available),
            total_bytes=int(vm.total),
            swap_used_pct=float(swap.percent) if swap.total else None,
        )
        self._t0 = now
        return sample
