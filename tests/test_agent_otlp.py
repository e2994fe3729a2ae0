"""The agent's OTLP exporter against a receiver that decodes what it is sent with opentelemetry-proto, as
an OpenTelemetry Collector would: every request of a real HTTP server a span (server kind, status,
method, path), a security event a log record with Tetragon's JSON as its body, and the request duration
histogram under its semantic-convention name."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from test_agent import start_agent
from test_agent_prometheus import SERVER

REQUESTS = 20
SERVER_COMM = "promtest-srv"  # the server of test_agent_prometheus names itself so
DECODERS = {
    "/v1/traces": ExportTraceServiceRequest,
    "/v1/logs": ExportLogsServiceRequest,
    "/v1/metrics": ExportMetricsServiceRequest,
}


class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.received: dict[str, list] = {path: [] for path in DECODERS}
        self.content_types: set[str] = set()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.content_types.add(self.headers["Content-Type"])
                outer.received[self.path].append(DECODERS[self.path].FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def attrs(kvs: list) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kvs}


def spans_of(receiver: Receiver) -> list[tuple[dict, Span]]:
    return [
        (attrs(rs.resource.attributes), span)
        for request in receiver.received["/v1/traces"]
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]


def test_spans_logs_and_metrics_reach_an_otlp_receiver(receiver: Receiver, tmp_path: Path) -> None:
    port = receiver.server_address[1]
    agent = start_agent(
        tmp_path,
        "collectors: {health: {interval: 1s}, profile: {enabled: false}}\n"
        f'exporters: {{otlp: {{enabled: true, endpoint: "http://127.0.0.1:{port}", interval: 1s}}}}\n',
    )
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        http_port = int(server.stdout.readline())
        time.sleep(1.0)
        with socket.create_connection(("127.0.0.1", http_port)) as conn:
            for i in range(REQUESTS):
                path = "/fail" if i % 5 == 0 else f"/ok/{i}?secret=1"
                conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                got = b""
                while not got.endswith((b"ok", b"down")):
                    got += conn.recv(4096)
        subprocess.run(["/bin/true", "otlp-marker"], check=True)
        deadline = time.monotonic() + 30
        served: list[tuple[dict, Span]] = []
        while time.monotonic() < deadline:
            served = [(r, s) for r, s in spans_of(receiver) if r.get("service.name") == SERVER_COMM]
            if len(served) >= REQUESTS:
                break
            time.sleep(0.5)
    finally:
        server.kill()
        server.wait()
        agent.proc.terminate()
        agent.proc.communicate(timeout=60)
    assert receiver.content_types == {"application/x-protobuf"}
    # Every request exactly once, as a server span with the conventions' attributes.
    assert len(served) == REQUESTS
    assert all(s.kind == Span.SPAN_KIND_SERVER and s.name == "GET" for _, s in served)
    failed = [s for _, s in served if s.status.code == Status.STATUS_CODE_ERROR]
    assert len(failed) == REQUESTS // 5
    assert all(attrs(s.attributes)["http.response.status_code"] == 503 for s in failed)
    paths = {attrs(s.attributes)["url.path"] for _, s in served}
    assert "/fail" in paths and "/ok/1" in paths and not any("secret" in p for p in paths)
    assert all(s.end_time_unix_nano > s.start_time_unix_nano for _, s in served)
    # The security event, with its Tetragon JSON.
    bodies = [
        json.loads(log.body.string_value)
        for request in receiver.received["/v1/logs"]
        for rl in request.resource_logs
        for sl in rl.scope_logs
        for log in sl.log_records
    ]
    marked = [
        b
        for b in bodies
        if "process_exec" in b and b["process_exec"]["process"]["arguments"] == "otlp-marker"
    ]
    assert len(marked) == 1
    # The duration histogram under its OpenTelemetry name: the last export counts every request.
    last = receiver.received["/v1/metrics"][-1]
    points = [
        point
        for rm in last.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "http.server.request.duration" and metric.unit == "s"
        for point in metric.histogram.data_points
        if attrs(point.attributes).get("service.name") == SERVER_COMM
    ]
    by_status = {attrs(p.attributes)["http.response.status_code"]: p.count for p in points}
    assert by_status == {"200": REQUESTS - REQUESTS // 5, "503": REQUESTS // 5}
