# Each service's requests over the last 5 minutes: rate, errors and latency, as its servers saw them.
import px

df = px.DataFrame(table="http_events", start_time="-5m")
df = df[df.trace_role == "server"]
df.service = px.select(df.comm == "", "unknown", df.comm)
df.failure = df.resp_status >= 400
df = df.groupby(["service", "local_port"]).agg(
    requests=("latency", px.count),
    errors=("failure", px.sum),
    latency=("latency", px.quantiles),
    first=("ts", px.min),
    last=("ts", px.max),
)
df.error_pct = 100.0 * df.errors / df.requests
df.p50_ms = px.pluck_float64(df.latency, "p50") / 1e6
df.p99_ms = px.pluck_float64(df.latency, "p99") / 1e6
px.display(df[["service", "local_port", "requests", "error_pct", "p50_ms", "p99_ms"]], "service_stats")
