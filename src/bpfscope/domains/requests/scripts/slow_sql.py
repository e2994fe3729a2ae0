# Find slow database queries: p99 latency per normalised statement over the last 5 minutes, above 100 ms
# (Pixie's "slow database queries" example).
import px

df = px.DataFrame(table="pgsql_events", start_time="-5m")
df = df[df.trace_role == "server"]
df = df.groupby("req").agg(count=("latency", px.count), latency=("latency", px.quantiles))
df.p99_ms = px.pluck_float64(df.latency, "p99") / 1e6
df = df[df.p99_ms > 100]
px.display(df[["req", "count", "p99_ms"]].sort("p99_ms", ascending=False), "slow_queries")
