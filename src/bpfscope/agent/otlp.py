"""What the agent's records mean in OpenTelemetry: each HTTP exchange a span (its process the resource,
as if the service had been instrumented: ``service.name`` is its process name), each security event a
log record with Tetragon's JSON as its body, and the Prometheus exporter's metrics as OTLP metrics under
their semantic-convention names where they have one (``http.server.request.duration``, ...).

Names and attributes follow the OpenTelemetry semantic conventions (HTTP spans: ``http.request.method``,
``url.path``, ``http.response.status_code``, ``server.port``, ``network.peer.address``; a span's name is
its method alone, the path being unbounded).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bpfscope.agent.metrics import HTTP_METHODS
from bpfscope.sinks.otlp import OtlpSink, Resource, attributes

if TYPE_CHECKING:
    from bpfscope.agent.config import OtlpSection
    from bpfscope.sinks.prometheus import PrometheusSink

# Prometheus family -> (OpenTelemetry name, unit) where the semantic conventions name the metric.
OTEL_NAMES = {
    "http_server_request_duration_seconds": ("http.server.request.duration", "s"),
    "http_client_request_duration_seconds": ("http.client.request.duration", "s"),
    "system_disk_io_bytes": ("system.disk.io", "By"),
    "system_disk_operations": ("system.disk.operations", "{operation}"),
    "system_cpu_utilization_ratio": ("system.cpu.utilization", "1"),
    "system_memory_utilization_ratio": ("system.memory.utilization", "1"),
}
# Prometheus label -> OpenTelemetry attribute, for the conventions' metrics.
OTEL_ATTRIBUTES = {
    "http_request_method": "http.request.method",
    "http_response_status_code": "http.response.status_code",
    "service_name": "service.name",
    "system_device": "system.device",
    "disk_io_direction": "disk.io.direction",
    "cpu_mode": "cpu.mode",
}


def http_span(r: Mapping[str, Any]) -> tuple[Resource, Any] | None:
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    role = r["trace_role"]
    if role not in ("server", "client"):
        return None
    end_ns = int(r["ts"] * 1e9)
    status = r["resp_status"]
    failed = status >= 500 or (role == "client" and status >= 400)
    method = r["req_method"] if r["req_method"] in HTTP_METHODS else "_OTHER"
    span = Span(
        # Each exchange its own trace: bpfscope sees no propagated context (that would take the payload).
        trace_id=os.urandom(16),
        span_id=os.urandom(8),
        name=method if method != "_OTHER" else "HTTP",
        kind=Span.SPAN_KIND_SERVER if role == "server" else Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=end_ns - int(r["latency"]),
        end_time_unix_nano=end_ns,
        attributes=attributes(
            {
                "http.request.method": method,
                "url.path": r["req_path"].split("?", 1)[0],
                "http.response.status_code": status,
                "server.port": r["local_port"] if role == "server" else r["remote_port"],
                "network.peer.address": r["remote_addr"],
                "network.peer.port": r["remote_port"],
                "http.request.body.size": r.get("req_body_size"),
                "http.response.body.size": r.get("resp_body_size"),
            }
        ),
        status=Status(code=Status.STATUS_CODE_ERROR if failed else Status.STATUS_CODE_UNSET),
    )
    resource = (("service.name", r["comm"]), ("process.pid", r["pid"]))
    return resource, span


def security_log(r: Mapping[str, Any]) -> tuple[Resource, Any] | None:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord as OtlpLog
    from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

    kind = r["record"].removeprefix("secure.")
    body = r[kind]
    process = body.get("process", {})
    hit = kind == "process_tracepoint"
    log = OtlpLog(
        time_unix_nano=int(r["ts"] * 1e9),
        observed_time_unix_nano=int(r["ts"] * 1e9),
        severity_number=SeverityNumber.SEVERITY_NUMBER_WARN if hit else SeverityNumber.SEVERITY_NUMBER_INFO,
        severity_text="WARN" if hit else "INFO",
        body=AnyValue(string_value=json.dumps({kind: body, "node_name": r["node_name"], "time": r["time"]})),
        attributes=attributes(
            {
                "event.name": f"bpfscope.security.{kind}",
                "process.pid": process.get("pid"),
                "process.executable.path": process.get("binary"),
                "process.command_args": process.get("arguments"),
                "bpfscope.policy": body.get("policy_name"),
                "bpfscope.action": body.get("action"),
            }
        ),
    )
    return (("service.name", "bpfscope-security"),), log


SPANS = {"http_events": http_span}
LOGS = {f"secure.{kind}": security_log for kind in ("process_exec", "process_exit", "process_tracepoint")}


def otlp_metrics(prometheus: PrometheusSink) -> list[Any]:
    """The Prometheus exporter's families as OTLP metrics (cumulative, as Prometheus keeps them)."""
    import time

    from opentelemetry.proto.metrics.v1.metrics_pb2 import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        NumberDataPoint,
        Sum,
    )

    now = time.time_ns()
    cumulative = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    out = []
    for family, values in prometheus.snapshot():
        if not values:
            continue
        name, unit = OTEL_NAMES.get(family.name, (family.name, ""))

        def labels(key: tuple[str, ...], family: Any = family) -> list[Any]:
            return attributes({OTEL_ATTRIBUTES.get(n, n): v for n, v in zip(family.labels, key, strict=True)})

        if family.kind == "histogram":
            points = [
                HistogramDataPoint(
                    attributes=labels(key),
                    time_unix_nano=now,
                    count=sum(counts),
                    sum=total,
                    bucket_counts=counts,
                    explicit_bounds=list(family.bounds),
                )
                for key, (counts, total) in values.items()
            ]
            metric = Metric(
                name=name,
                unit=unit,
                description=family.doc,
                histogram=Histogram(data_points=points, aggregation_temporality=cumulative),
            )
        else:
            points = [
                NumberDataPoint(attributes=labels(key), time_unix_nano=now, as_double=value)
                for key, value in values.items()
            ]
            if family.kind == "counter":
                data = {"sum": Sum(data_points=points, aggregation_temporality=cumulative, is_monotonic=True)}
            else:
                data = {"gauge": Gauge(data_points=points)}
            metric = Metric(name=name, unit=unit, description=family.doc, **data)
        out.append(metric)
    return out


def otlp_sink(section: OtlpSection, prometheus: PrometheusSink | None, node: str) -> OtlpSink:
    return OtlpSink(
        section.endpoint,
        SPANS,
        LOGS,
        metrics=(lambda: otlp_metrics(prometheus)) if prometheus is not None else None,
        headers=dict(section.headers),
        interval_s=section.interval,
        resource={"host.name": node, "telemetry.sdk.name": "bpfscope"},
    )
