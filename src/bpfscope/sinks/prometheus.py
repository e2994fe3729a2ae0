"""The Prometheus exporter: records turned into metrics, served in the text exposition format.

What a record means as metrics is the caller's to say (``translations``: a record kind -> a function that
sets, adds or observes through this sink); the sink keeps the values, bounds every metric's label sets
(past ``max_series``, new label sets are counted under ``_other``, so one noisy label cannot grow a
scrape without end) and writes them out through prometheus_client. Histograms take whole buckets at once
(a window of a disk's device times is one call, not one per request).

Metrics are declared up front as :class:`Family` objects; a scrape from another thread sees each value
whole (one lock).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bpfscope.runtime.session import Sink

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector, Sample

OTHER = "_other"


@dataclass
class Family:
    """One metric: ``kind`` gauge, counter or histogram (``bounds``: the buckets' upper bounds)."""

    name: str
    kind: str
    doc: str
    labels: tuple[str, ...] = ()
    bounds: tuple[float, ...] = ()
    values: dict[tuple[str, ...], Any] = field(default_factory=dict)


@dataclass
class _Buckets:
    counts: list[int]  # per bound, not cumulative; the last is +Inf
    total: float = 0.0


Translation = Callable[["PrometheusSink", Mapping[str, Any]], None]


class PrometheusSink(Sink):
    def __init__(
        self,
        families: Iterable[Family],
        translations: Mapping[str, Translation],
        max_series: int = 2000,
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.families = {f.name: f for f in families}
        self.translations = translations
        self.max_series = max_series
        self.overflowed: set[str] = set()  # metrics that reached max_series
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # type: ignore[arg-type]

    # --- what translations call ----------------------------------------------------------------------
    def set(self, name: str, value: float, **labels: Any) -> None:
        with self._lock:
            family = self.families[name]
            family.values[self._key(family, labels)] = float(value)

    def add(self, name: str, amount: float, **labels: Any) -> None:
        with self._lock:
            family = self.families[name]
            key = self._key(family, labels)
            family.values[key] = family.values.get(key, 0.0) + float(amount)

    def observe(self, name: str, value: float, count: int = 1, **labels: Any) -> None:
        """``count`` observations of ``value`` (a bucket's worth at once)."""
        with self._lock:
            family = self.families[name]
            key = self._key(family, labels)
            buckets = family.values.get(key)
            if buckets is None:
                buckets = family.values[key] = _Buckets([0] * (len(family.bounds) + 1))
            buckets.counts[bisect.bisect_left(family.bounds, value)] += count
            buckets.total += value * count

    def _key(self, family: Family, labels: Mapping[str, Any]) -> tuple[str, ...]:
        key = tuple(str(labels[name]) for name in family.labels)
        if key not in family.values and len(family.values) >= self.max_series:
            self.overflowed.add(family.name)
            return (OTHER,) * len(family.labels)
        return key

    # --- the sink ------------------------------------------------------------------------------------
    def emit(self, collector: Collector, sample: Sample) -> None:
        for record in sample.records():
            translate = self.translations.get(record["record"])
            if translate is not None:
                translate(self, record)

    def snapshot(self) -> list[tuple[Family, dict[tuple[str, ...], Any]]]:
        """Every family with a copy of its values (histograms as (counts, total)), for other exporters."""
        with self._lock:
            return [
                (
                    f,
                    {
                        k: (list(v.counts), v.total) if isinstance(v, _Buckets) else v
                        for k, v in f.values.items()
                    },
                )
                for f in self.families.values()
            ]

    # --- the exposition ------------------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        """prometheus_client's collector protocol: every family as it is now."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            for family in self.families.values():
                labels = list(family.labels)
                if family.kind == "histogram":
                    metric: Any = HistogramMetricFamily(family.name, family.doc, labels=labels)
                    for key, b in family.values.items():
                        cumulative, buckets = 0, []
                        for bound, count in zip([*family.bounds, float("inf")], b.counts, strict=True):
                            cumulative += count
                            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                        metric.add_metric(list(key), buckets, b.total)
                else:
                    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                    metric = kind(family.name, family.doc, labels=labels)
                    for key, value in family.values.items():
                        metric.add_metric(list(key), value)
                yield metric

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def family(
    name: str, kind: str, doc: str, labels: Sequence[str] = (), bounds: Sequence[float] = ()
) -> Family:
    return Family(name, kind, doc, tuple(labels), tuple(bounds))


__all__ = ["OTHER", "Family", "PrometheusSink", "Translation", "family"]
