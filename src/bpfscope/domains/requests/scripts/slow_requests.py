# The slowest HTTP requests of the last 5 minutes, and the endpoints with the highest p99.
import px

df = px.DataFrame(table="http_events", start_time="-5m")
df = df[df.trace_role == "server"]
df.latency_ms = df.latency / 1e6
slowest = df[["time_", "comm", "req_method", "req_path", "resp_status", "latency_ms"]]
px.display(slowest.sort("latency_ms", ascending=False).head(20), "slowest_requests")

endpoints = df.groupby(["req_method", "req_path"]).agg(
    count=("latency", px.count), latency=("latency", px.quantiles)
)
endpoints.p99_ms = px.pluck_float64(endpoints.latency, "p99") / 1e6
endpoints = endpoints[["req_method", "req_path", "count", "p99_ms"]]
px.display(endpoints.sort("p99_ms", ascending=False).head(20), "slowest_endpoints")
