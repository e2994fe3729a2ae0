"""Health rules for CPU and RAM: the numbers dashboards show, judged against stated thresholds."""

from __future__ import annotations

from collections.abc import Mapping

from bpfscope.domains.system.cpu import CpuCollector, CpuSample, MemoryCollector, MemorySample
from bpfscope.health.rule import Rule
from bpfscope.health.verdict import Row, Threshold, pct
from bpfscope.runtime.collector import Collector, Config, Sample

# CPU busy over the window: everything but idle and iowait, over all CPUs (what top and psutil show).
# Past 80% a burst has no headroom left; past 95% runnable tasks queue for a CPU and every latency on the
# machine grows with that queue.
CPU_WARN_PCT = 80.0
CPU_PROBLEM_PCT = 95.0
# RAM used: (total - available) / total, psutil's figure. "available" already counts the page cache the
# kernel can reclaim, so this is memory it cannot get back without swapping or killing. Past 85% the page
# cache that spares the disks is being squeezed out; past 95% reclaim stalls and the OOM killer are near.
RAM_WARN_PCT = 85.0
RAM_PROBLEM_PCT = 95.0


class CpuRule(Rule):
    name = "CPU"

    def collectors(self) -> list[Collector]:
        return [CpuCollector(Config())]

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        s = samples[self.collector]
        assert isinstance(s, CpuSample)
        limit = Threshold(CPU_WARN_PCT, CPU_PROBLEM_PCT, "%")
        detail = (
            f"user {pct(s.user_pct)}, system {pct(s.system_pct)}, iowait {pct(s.iowait_pct)}, "
            f"steal {pct(s.steal_pct)}; {s.cpus} CPUs"
        )
        return [
            Row(
                "CPU",
                "busy",
                s.busy_pct,
                "%",
                pct(s.busy_pct),
                limit.judge(s.busy_pct),
                limit.describe(),
                detail,
            )
        ]


class MemoryRule(Rule):
    name = "RAM"

    def collectors(self) -> list[Collector]:
        return [MemoryCollector(Config())]

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        s = samples[self.collector]
        assert isinstance(s, MemorySample)
        gib = 1 << 30
        detail = f"available {s.available_bytes / gib:.1f} of {s.total_bytes / gib:.1f} GiB"
        if s.swap_used_pct is not None:
            detail += f"; swap {s.swap_used_pct:.0f}% used"
        limit = Threshold(RAM_WARN_PCT, RAM_PROBLEM_PCT, "%")
        return [
            Row(
                "RAM",
                "used",
                s.used_pct,
                "%",
                pct(s.used_pct),
                limit.judge(s.used_pct),
                limit.describe(),
                detail,
            )
        ]
