"""The OTLP exporter: records as OpenTelemetry spans and logs, and a metrics sink's values as OTLP
metrics, encoded with opentelemetry-proto and sent over HTTP (``/v1/traces``, ``/v1/logs``,
``/v1/metrics``, ``application/x-protobuf``) to a collector every ``interval_s``.

What a record means as a span or a log is the caller's to say (``spans``/``logs``: a record kind -> a
function returning ``(resource attributes, Span or LogRecord)``). Sending happens in a thread of its own:
a collector that is slow or away never holds up the session. What could not be sent is counted
(``dropped``, ``failures``) and what waits is bounded (``max_pending``), never an unbounded queue.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from bpfscope.runtime.session import Sink

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector, Sample

Resource = tuple[tuple[str, Any], ...]
Translation = Callable[[Mapping[str, Any]], "tuple[Resource, Any] | None"]


def attributes(values: Mapping[str, Any]) -> list[Any]:
    """OTLP KeyValues (str, bool, int, float) from a mapping; None values left out."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    out = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            any_value = AnyValue(bool_value=value)
        elif isinstance(value, int):
            any_value = AnyValue(int_value=value)
        elif isinstance(value, float):
            any_value = AnyValue(double_value=value)
        else:
            any_value = AnyValue(string_value=str(value))
        out.append(KeyValue(key=key, value=any_value))
    return out


class OtlpSink(Sink):
    def __init__(
        self,
        endpoint: str,
        spans: Mapping[str, Translation],
        logs: Mapping[str, Translation],
        metrics: Callable[[], list[Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        interval_s: float = 10.0,
        resource: Mapping[str, Any] | None = None,
        max_pending: int = 50_000,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.span_of, self.log_of, self.metrics = spans, logs, metrics
        self.headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        self.interval_s = interval_s
        self.resource = dict(resource or {})
        self.max_pending = max_pending
        self.pending: dict[str, dict[Resource, list[Any]]] = {"spans": {}, "logs": {}}
        self.pending_count = 0
        self.sent = {"spans": 0, "logs": 0, "metrics": 0}
        self.dropped = 0  # records past max_pending
        self.failures = 0  # requests the collector refused or did not answer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bpfscope-otlp", daemon=True)
        self._thread.start()

    def emit(self, collector: Collector, sample: Sample) -> None:
        for record in sample.records():
            kind = record["record"]
            for signal, table in (("spans", self.span_of), ("logs", self.log_of)):
                translate = table.get(kind)
                if translate is None:
                    continue
                made = translate(record)
                if made is None:
                    continue
                with self._lock:
                    if self.pending_count >= self.max_pending:
                        self.dropped += 1
                        continue
                    resource, item = made
                    self.pending[signal].setdefault(resource, []).append(item)
                    self.pending_count += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.export()

    def export(self) -> None:
        """Everything pending, and the metrics as they are now, to the collector."""
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
        from opentelemetry.proto.logs.v1.logs_pb2 import ResourceLogs, ScopeLogs
        from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics, ScopeMetrics
        from opentelemetry.proto.resource.v1.resource_pb2 import Resource as OtlpResource
        from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans

        with self._lock:
            pending, self.pending = self.pending, {"spans": {}, "logs": {}}
            self.pending_count = 0
        scope = InstrumentationScope(name="bpfscope")

        def resource(extra: Resource) -> Any:
            return OtlpResource(attributes=attributes({**self.resource, **dict(extra)}))

        if pending["spans"]:
            request = ExportTraceServiceRequest(
                resource_spans=[
                    ResourceSpans(resource=resource(r), scope_spans=[ScopeSpans(scope=scope, spans=spans)])
                    for r, spans in pending["spans"].items()
                ]
            )
            self._post("/v1/traces", request.SerializeToString(), "spans", request)
        if pending["logs"]:
            request = ExportLogsServiceRequest(
                resource_logs=[
                    ResourceLogs(resource=resource(r), scope_logs=[ScopeLogs(scope=scope, log_records=logs)])
                    for r, logs in pending["logs"].items()
                ]
            )
            self._post("/v1/logs", request.SerializeToString(), "logs", request)
        metrics = self.metrics() if self.metrics is not None else []
        if metrics:
            request = ExportMetricsServiceRequest(
                resource_metrics=[
                    ResourceMetrics(
                        resource=resource(()), scope_metrics=[ScopeMetrics(scope=scope, metrics=metrics)]
                    )
                ]
            )
            self._post("/v1/metrics", request.SerializeToString(), "metrics", request)

    def _post(self, path: str, body: bytes, signal: str, request: Any) -> None:
        count = _count(signal, request)
        try:
            post = urllib.request.Request(
                self.endpoint + path, data=body, headers=self.headers, method="POST"
            )
            with urllib.request.urlopen(post, timeout=10) as response:
                response.read()
            self.sent[signal] += count
        except OSError:
            self.failures += 1
            if signal != "metrics":
                self.dropped += count  # metrics are cumulative: the next export carries them

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.export()


def _count(signal: str, request: Any) -> int:
    if signal == "spans":
        return sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
    if signal == "logs":
        return sum(len(s.log_records) for r in request.resource_logs for s in r.scope_logs)
    return sum(len(s.metrics) for r in request.resource_metrics for s in r.scope_metrics)


__all__ = ["OtlpSink", "attributes"]
