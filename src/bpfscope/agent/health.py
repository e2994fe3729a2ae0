"""The check, always on: every rule of ``bpfscope check`` over windows that follow one another, each
window's verdicts (``check.row``, ``check.summary``) with the machine-wide records of the collectors
behind them, and per disk the device-latency histogram of the window (``agent.disk_latency``, for
heatmaps and Prometheus histograms).

It is one collector to the agent's session: if a rule's collector fails while sampling, the whole check
is restarted with the session's back-off; a rule that cannot run here is a row that says why, as in the
check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from bpfscope.errors import BpfscopeError
from bpfscope.health.verdict import ROW_SCHEMA, SUMMARY_SCHEMA, Report
from bpfscope.health.window import CheckWindow
from bpfscope.runtime.collector import Collector, Config, Sample
from bpfscope.runtime.losses import Loss, Losses
from bpfscope.runtime.schema import Field, Schema

# The collectors' records kept beside the verdicts: machine-wide totals. Per-process, per-connection and
# per-socket records stay out: under load they would be most of the store (a thousand sockets every
# window) for what the verdicts' details already name.
KEPT = ("cpu", "memory", "iostat", "cachestat", "vfsstat", "writeback", "tcpretrans.total")

DISK_LATENCY_SCHEMA = Schema(
    "agent.disk_latency",
    (
        Field("disk", "str", label=True),
        Field("count", "int", doc="requests timed on the device in the window"),
        Field("sum_s", "float", "s", "their device time added up (from bucket midpoints)"),
        Field(
            "buckets",
            "dict",
            doc="log2 buckets of device time: exponent k -> requests taking [2^k, 2^(k+1)) ns",
        ),
    ),
    doc="One disk's device-latency histogram over a health window (issue to completion).",
    interval=True,
)


@dataclass(kw_only=True)
class HealthConfig(Config):
    pass


@dataclass
class HealthSample(Sample):
    ts: float
    interval_s: float
    report: Report
    samples: dict[str, Sample] = field(default_factory=dict)  # the first collector of each name
    disk_latency: dict[str, dict[int, int]] = field(default_factory=dict)

    def records(self) -> Iterator[dict[str, Any]]:
        yield from self.report.records(self.ts)
        for name, sample in self.samples.items():
            if name in KEPT:
                yield from (r for r in sample.records() if r["record"] in KEPT)
        for disk, buckets in self.disk_latency.items():
            count = sum(buckets.values())
            # A bucket's midpoint stands for its requests: within a third of the truth at worst.
            total_ns = sum(n * 1.5 * 2.0**k for k, n in buckets.items())
            yield DISK_LATENCY_SCHEMA.record(
                {
                    "ts": self.ts,
                    "interval_s": round(self.interval_s, 6),
                    "disk": disk,
                    "count": count,
                    "sum_s": total_ns / 1e9,
                    "buckets": {str(k): n for k, n in sorted(buckets.items())},
                }
            )


def log2_buckets(histogram: Any) -> dict[int, int]:
    """A latency histogram (ns, either layout) as log2 buckets: exponent -> count. Every slot of both
    layouts lies within one power of two, so nothing is split."""
    out: dict[int, int] = {}
    for slot in (int(s) for s in histogram.counts.nonzero()[0]):
        low, _ = histogram.bounds(slot)
        k = int(math.log2(low)) if low > 0 else 0
        out[k] = out.get(k, 0) + int(histogram.counts[slot])
    return out


@cache
def health_schemas() -> tuple[Schema, ...]:
    """The verdicts' schemas, the kept records' schemas and the disk histograms'."""
    from bpfscope.health.rule import default_rules

    kept: dict[str, Schema] = {}
    for rule in default_rules():
        for collector in rule().collectors():
            kept.update({s.name: s for s in collector.schemas() if s.name in KEPT})
    return (ROW_SCHEMA, SUMMARY_SCHEMA, *kept.values(), DISK_LATENCY_SCHEMA)


class HealthCollector(Collector[HealthConfig]):
    name = "health"
    default_interval_s = 10.0

    def __init__(self, config: HealthConfig) -> None:
        super().__init__(config)
        self.window: CheckWindow | None = None

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return health_schemas()

    def open(self) -> None:
        self.window = CheckWindow(include_self=self.config.include_self)
        self.window.open()

    def start(self) -> None:
        assert self.window is not None
        self.window.start()

    def sample(self) -> HealthSample:
        assert self.window is not None and self.window.session is not None
        try:
            report = self.window.report()
        except Exception as exc:
            failed = self.window.session.failed
            if failed:  # a rule's collector failed: the agent restarts the check
                collector, error = next(iter(failed.items()))
                raise BpfscopeError(f"{collector.name}: {error}") from exc
            raise
        samples: dict[str, Sample] = {}
        for collector, sample in self.window.samples.items():
            samples.setdefault(collector.name, sample)
        latency = {}
        disks = samples.get("iostat")
        for name, disk in getattr(disks, "disks", {}).items():
            if disk.latency is not None and disk.latency.total:
                latency[name] = log2_buckets(disk.latency)
        return HealthSample(time.time(), report.window_s, report, samples, latency)

    def losses(self) -> Losses:
        """Every rule collector's losses, each reason named after its collector."""
        if self.window is None or self.window.session is None:
            return Losses()
        return Losses(
            Loss(f"{collector.name}/{loss.reason}", loss.count, loss.what)
            for collector in self.window.session.collectors
            for loss in collector.losses()
        )

    def close(self) -> None:
        if self.window is not None:
            self.window.close()
            self.window = None
