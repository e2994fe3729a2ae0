"""What the agent's records mean as Prometheus metrics.

Names follow the OpenTelemetry semantic conventions where one exists, as the OpenTelemetry-to-Prometheus
translation spells them (dots to underscores, the unit as a suffix, ``_total`` for counters):
``http.server.request.duration`` is ``http_server_request_duration_seconds``, ``system.disk.io`` is
``system_disk_io_bytes_total`` with ``system_device`` and ``disk_io_direction``. What the conventions do
not name is ``bpfscope_*``. Every label comes from a bounded set (resources, disks, HTTP methods
normalised as the conventions say, status codes, process names), and the sink caps label sets per
metric besides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from bpfscope.sinks.prometheus import PrometheusSink, Translation, family

VERDICT_LEVELS = {"ok": 0, "warn": 1, "PROBLEM": 2, "n/a": -1}
# The semantic conventions' known methods; any other is _OTHER (a method is client input: unbounded).
HTTP_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
# The conventions' advice for http.*.request.duration buckets (seconds).
HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# Device latency: log2 buckets of nanoseconds from 2^10 (1 us) to 2^35 (34 s), as the kernel counts them.
DISK_EXPONENTS = range(10, 36)
DISK_BUCKETS_S = tuple(2.0 ** (k + 1) / 1e9 for k in DISK_EXPONENTS)

FAMILIES = (
    family(
        "bpfscope_health_verdict",
        "gauge",
        "The check's verdict per resource and metric: 0 ok, 1 warn, 2 PROBLEM, -1 cannot run here",
        ("resource", "metric"),
    ),
    family(
        "bpfscope_health_value",
        "gauge",
        "The check's value per resource and metric, in the unit label",
        ("resource", "metric", "unit"),
    ),
    family("bpfscope_health_problem", "gauge", "1 when the last check window found a PROBLEM"),
    family("system_cpu_utilization_ratio", "gauge", "CPU time by mode over the window, 0-1", ("cpu_mode",)),
    family("system_memory_utilization_ratio", "gauge", "Memory used: (total - available) / total"),
    family(
        "system_disk_operations",
        "counter",
        "Disk operations completed",
        ("system_device", "disk_io_direction"),
    ),
    family("system_disk_io_bytes", "counter", "Disk bytes moved", ("system_device", "disk_io_direction")),
    family(
        "bpfscope_disk_utilization_ratio",
        "gauge",
        "Share of the window busy (%util / 100)",
        ("system_device",),
    ),
    family(
        "bpfscope_disk_queue_depth", "gauge", "Requests in flight, time-average (aqu-sz)", ("system_device",)
    ),
    family(
        "bpfscope_disk_device_latency_seconds",
        "histogram",
        "Device time of block requests, issue to completion",
        ("system_device",),
        DISK_BUCKETS_S,
    ),
    family("bpfscope_page_cache_lookups", "counter", "Page-cache lookups (pages)"),
    family("bpfscope_page_cache_misses", "counter", "Page-cache misses (pages)"),
    family("bpfscope_page_cache_hit_ratio", "gauge", "Page-cache hits / lookups over the window, 0-1"),
    family("bpfscope_tcp_segments_sent", "counter", "TCP segments sent"),
    family("bpfscope_tcp_retransmitted_segments", "counter", "TCP segments retransmitted"),
    family("bpfscope_tcp_connections_opened", "counter", "TCP connections opened", ("direction",)),
    family(
        "http_server_request_duration_seconds",
        "histogram",
        "Duration of HTTP server requests, as the server process saw them",
        ("service_name", "http_request_method", "http_response_status_code"),
        HTTP_BUCKETS_S,
    ),
    family(
        "http_client_request_duration_seconds",
        "histogram",
        "Duration of HTTP client requests, as the client process saw them",
        ("service_name", "http_request_method", "http_response_status_code"),
        HTTP_BUCKETS_S,
    ),
    family("bpfscope_security_events", "counter", "Security events", ("kind", "policy", "action")),
    family("bpfscope_profile_samples", "counter", "On-CPU samples taken", ("profile",)),
    family(
        "bpfscope_agent_collector_up",
        "gauge",
        "1 while a collector runs, 0 while it waits for a restart",
        ("collector",),
    ),
    family(
        "bpfscope_agent_collector_failures",
        "gauge",
        "Times a collector failed since the agent started",
        ("collector",),
    ),
    family(
        "bpfscope_agent_lost_events", "gauge", "Events a collector lost (its running count)", ("collector",)
    ),
)


def _row(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    m.set(
        "bpfscope_health_verdict",
        VERDICT_LEVELS.get(r["verdict"], -1),
        resource=r["resource"],
        metric=r["metric"],
    )
    if r["value"] is not None:
        m.set("bpfscope_health_value", r["value"], resource=r["resource"], metric=r["metric"], unit=r["unit"])


def _cpu(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    for mode in ("user", "system", "iowait", "steal"):
        m.set("system_cpu_utilization_ratio", r[f"{mode}_pct"] / 100, cpu_mode=mode)


def _iostat(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    seconds, disk = r["interval_s"], r["device"]
    for direction, ops, kb in (("read", "r_s", "rkb_s"), ("write", "w_s", "wkb_s")):
        m.add(
            "system_disk_operations", round(r[ops] * seconds), system_device=disk, disk_io_direction=direction
        )
        m.add("system_disk_io_bytes", r[kb] * 1024 * seconds, system_device=disk, disk_io_direction=direction)
    m.set("bpfscope_disk_utilization_ratio", r["util"] / 100, system_device=disk)
    m.set("bpfscope_disk_queue_depth", r["aqu_sz"], system_device=disk)


def _disk_latency(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    for exponent, count in r["buckets"].items():
        # The bucket [2^k, 2^(k+1)) ns, by its midpoint: it falls in the same Prometheus bucket.
        k = min(max(int(exponent), DISK_EXPONENTS[0]), DISK_EXPONENTS[-1] + 1)
        m.observe("bpfscope_disk_device_latency_seconds", 1.5 * 2.0**k / 1e9, count, system_device=r["disk"])


def _cachestat(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    m.add("bpfscope_page_cache_lookups", r["lookups"])
    m.add("bpfscope_page_cache_misses", r["misses"])
    if r["hit_ratio"] is not None:
        m.set("bpfscope_page_cache_hit_ratio", r["hit_ratio"] / 100)


def _tcp(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    m.add("bpfscope_tcp_segments_sent", r["segs_out"])
    m.add("bpfscope_tcp_retransmitted_segments", r["retrans"])
    m.add("bpfscope_tcp_connections_opened", r["active_opens"], direction="active")
    m.add("bpfscope_tcp_connections_opened", r["passive_opens"], direction="passive")


def _http(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    role = r["trace_role"]
    if role not in ("server", "client"):
        return
    method = r["req_method"] if r["req_method"] in HTTP_METHODS else "_OTHER"
    m.observe(
        f"http_{role}_request_duration_seconds",
        r["latency"] / 1e9,
        service_name=r["comm"],
        http_request_method=method,
        http_response_status_code=r["resp_status"],
    )


def _security(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    kind = r["record"].removeprefix("secure.")
    body = r[kind]
    m.add(
        "bpfscope_security_events",
        1,
        kind=kind,
        policy=body.get("policy_name", ""),
        action=body.get("action", ""),
    )


def _profile_window(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    m.add("bpfscope_profile_samples", r["samples"], profile=r["profile"])


def _collector(m: PrometheusSink, r: Mapping[str, Any]) -> None:
    name = r["collector"]
    m.set("bpfscope_agent_collector_up", 1 if r["state"] == "running" else 0, collector=name)
    m.set("bpfscope_agent_collector_failures", r["failures"], collector=name)
    m.set("bpfscope_agent_lost_events", r["lost"], collector=name)


TRANSLATIONS: dict[str, Translation] = {
    "check.row": _row,
    "check.summary": lambda m, r: m.set("bpfscope_health_problem", int(r["problem"])),
    "cpu": _cpu,
    "memory": lambda m, r: m.set("system_memory_utilization_ratio", r["used_pct"] / 100),
    "iostat": _iostat,
    "agent.disk_latency": _disk_latency,
    "cachestat": _cachestat,
    "tcpretrans.total": _tcp,
    "http_events": _http,
    "secure.process_exec": _security,
    "secure.process_exit": _security,
    "secure.process_tracepoint": _security,
    "profile.window": _profile_window,
    "agent.collector": _collector,
}


def prometheus_sink(max_series: int) -> PrometheusSink:
    """A sink with its own copy of every family (values start empty)."""
    return PrometheusSink([replace(f, values={}) for f in FAMILIES], TRANSLATIONS, max_series)
