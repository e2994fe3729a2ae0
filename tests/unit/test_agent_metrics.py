"""The Prometheus exporter without a kernel: records of the agent's kinds become the metrics their names
promise (parsed back with prometheus_client's own parser), histograms take whole buckets, and one
label that takes endless values cannot grow a scrape past max_series."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bpfscope.agent.metrics import prometheus_sink
from bpfscope.agent.service import Records
from bpfscope.runtime.collector import Collector, Config
from bpfscope.sinks.prometheus import OTHER


def scrape(sink: Any) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} of every sample in the exposition."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(sink.exposition().decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def emit(sink: Any, *records: dict[str, Any]) -> None:
    sink.emit(Collector(Config()), Records(0.0, list(records)))


def http(status: int, latency_ms: float, method: str = "GET", role: str = "server") -> dict[str, Any]:
    return {
        "record": "http_events",
        "trace_role": role,
        "comm": "nginx",
        "req_method": method,
        "resp_status": status,
        "latency": int(latency_ms * 1e6),
    }


def test_health_disks_and_requests_as_metrics() -> None:
    sink = prometheus_sink(max_series=100)
    emit(
        sink,
        {
            "record": "check.row",
            "resource": "Disk vda",
            "metric": "p99",
            "value": 0.4,
            "unit": "ms",
            "verdict": "warn",
        },
        {
            "record": "check.row",
            "resource": "PSI io",
            "metric": "some",
            "value": None,
            "unit": "%",
            "verdict": "n/a",
        },
        {"record": "agent.disk_latency", "disk": "vda", "buckets": {"17": 3, "20": 1}},
        {"record": "agent.disk_latency", "disk": "vda", "buckets": {"17": 2}},
        http(200, 3),
        http(200, 30),
        http(503, 300),
        http(200, 1, method="BREW"),
    )
    m = scrape(sink)
    assert m["bpfscope_health_verdict"][(("metric", "p99"), ("resource", "Disk vda"))] == 1
    assert m["bpfscope_health_verdict"][(("metric", "some"), ("resource", "PSI io"))] == -1
    assert m["bpfscope_health_value"] == {(("metric", "p99"), ("resource", "Disk vda"), ("unit", "ms")): 0.4}
    # 2^17 ns = 131 us: five requests at or under 2^18 ns = 262 us, the sixth under 2^21 ns = 2.1 ms.
    buckets = {dict(k)["le"]: v for k, v in m["bpfscope_disk_device_latency_seconds_bucket"].items()}
    assert buckets[repr(2.0**18 / 1e9)] == 5 and buckets[repr(2.0**21 / 1e9)] == 6 and buckets["+Inf"] == 6
    assert m["bpfscope_disk_device_latency_seconds_count"][(("system_device", "vda"),)] == 6
    count = m["http_server_request_duration_seconds_count"]
    ok = (("http_request_method", "GET"), ("http_response_status_code", "200"), ("service_name", "nginx"))
    assert count[ok] == 2
    assert count[(("http_request_method", "_OTHER"), *ok[1:])] == 1  # methods outside the conventions'
    le = {
        dict(k)["le"]: v
        for k, v in m["http_server_request_duration_seconds_bucket"].items()
        if dict(k)["http_response_status_code"] == "503"
    }
    assert le["0.25"] == 0 and le["0.5"] == 1


def test_label_sets_are_bounded() -> None:
    sink = prometheus_sink(max_series=10)
    emit(sink, *({**http(200, 1), "comm": f"worker-{i}"} for i in range(50)))
    series = scrape(sink)["http_server_request_duration_seconds_count"]
    assert len(series) == 11  # ten kept, and the rest under _other
    other = next(v for k, v in series.items() if dict(k)["service_name"] == OTHER)
    assert other == 40 and sum(series.values()) == 50
    assert "http_server_request_duration_seconds" in sink.overflowed
